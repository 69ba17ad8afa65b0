"""Who may use the server: an API key, as OpenAI's clients and vLLM send it, and where the
server may listen without one.

With a key, every request but ``GET /health`` (for load balancers and probes) must carry
``Authorization: Bearer KEY``; others get OpenAI's 401 error JSON, before their body is read.
Without a key the server listens on loopback only, unless the operator says otherwise.
"""

from __future__ import annotations

import hmac
import ipaddress

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from ..errors import LoraError
from .protocol import ApiError

OPEN_PATHS = frozenset({"/health"})
KEY_ENV = "LORAKIT_API_KEY"


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name or "" (every interface): it may reach the network
        return False


def check_exposure(host: str, api_key: str | None, allow_no_api_key: bool) -> None:
    """Refuse to listen beyond this machine without a key, unless explicitly allowed.

    Raises:
        LoraError: an empty key, or ``host`` not loopback, no key and no permission.
    """
    header_safe = api_key and api_key.isascii() and api_key.isprintable() and " " not in api_key
    if api_key is not None and not header_safe:
        raise LoraError(
            f"--api-key (or {KEY_ENV}) must be printable ASCII without spaces (an HTTP header "
            "carries it), and not empty."
        )
    if api_key is None and not allow_no_api_key and not is_loopback(host):
        raise LoraError(
            f"--host {host} listens beyond this machine, and there is no API key: anyone who "
            f"reaches the port could use the server. Give one with --api-key or {KEY_ENV} "
            "(clients send it as 'Authorization: Bearer KEY'), or pass --allow-no-api-key."
        )


class RequireKey:
    """ASGI middleware: a 401 for every HTTP request but ``OPEN_PATHS`` without the key."""

    def __init__(self, app: ASGIApp, key: str) -> None:
        self.app, self._key = app, key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS and not self._allowed(scope):
            error = ApiError(
                401,
                "Missing or wrong API key: send 'Authorization: Bearer KEY' with the key this "
                f"server was started with (--api-key or {KEY_ENV}).",
                code="invalid_api_key",
            )
            headers = {"WWW-Authenticate": "Bearer"}
            await JSONResponse(error.body(), 401, headers=headers)(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _allowed(self, scope: Scope) -> bool:
        given = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = given.partition(b" ")
        # compare_digest: the time taken does not tell how much of a guess was right
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self._key)

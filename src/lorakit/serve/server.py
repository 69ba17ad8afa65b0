"""Starting a server: check the options, take the port, load the base model and adapters,
start the engine, run uvicorn.

The port is bound before the model loads (a taken port fails at once, not after the load)
but listened on only once the model is ready: until then connections are refused, never left
waiting.

Ctrl-C (SIGINT) is uvicorn's graceful shutdown: it stops accepting connections, lets the
responses in flight finish (the engine keeps running until then), and returns; the engine is
stopped last. A second Ctrl-C quits at once.
"""

from __future__ import annotations

import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import LoraError
from .app import MAX_BODY, ServerState, build_app
from .auth import check_exposure, is_loopback
from .batch import check_model
from .catalog import Catalog, Served
from .engine import Engine
from .folders import check_roots

BACKLOG = 2048  # uvicorn's default


@dataclass
class ServeOptions:
    """What ``lorakit serve`` was asked to do (its flags, one field each)."""

    model: str | None = None
    adapters: dict[str, str] = field(default_factory=dict)
    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: str | None = None
    max_batch_size: int = 16
    max_queue: int = 64
    max_tokens: int = 1024
    allow_adapter_updates: bool = False
    adapter_roots: list[str] = field(default_factory=list)
    api_key: str | None = None
    allow_no_api_key: bool = False
    max_request_bytes: int = MAX_BODY
    log_level: str = "info"
    threads: int | None = None


def _status(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def check_options(options: ServeOptions) -> tuple[Path, ...]:
    """Refuse bad limits, keys and roots, and a server open to the network without a key;
    the resolved ``--adapter-root`` folders.

    Raises:
        LoraError: naming the flag.
    """
    if options.max_tokens < 1:
        raise LoraError(f"--max-tokens must be at least 1, got {options.max_tokens}.")
    if options.max_request_bytes < 1024:
        raise LoraError(
            f"--max-request-bytes must be at least 1024, got {options.max_request_bytes}."
        )
    check_exposure(options.host, options.api_key, options.allow_no_api_key)
    if options.adapter_roots and not options.allow_adapter_updates:
        raise LoraError(
            "--adapter-root limits the folders --allow-adapter-updates may load from; pass "
            "--allow-adapter-updates too, or drop --adapter-root."
        )
    return check_roots(options.adapter_roots)


def load_state(options: ServeOptions) -> ServerState:
    """Load the model and adapters and build the engine (not started yet).

    Raises:
        LoraError: bad options (see :func:`check_options`), a vision-language model, a model
            that cannot be found or batched, or an adapter that cannot be loaded or served
            (see :meth:`Catalog.load`).
    """
    from ..generate import GenerationSettings, read_generation_settings
    from ..models.load import DEFAULT_MODEL, load_model, resolve_model_spec

    roots = check_options(options)
    spec = options.model or next(iter(options.adapters.values()), None) or DEFAULT_MODEL
    resolved = resolve_model_spec(spec)  # a wrong path fails here, before the slow load
    _refuse_images(spec, resolved)
    _status(f"loading model {resolved}")
    model, tokenizer = load_model(spec)
    check_model(model)
    base_folder = Path(resolved)
    settings = read_generation_settings(base_folder) if base_folder.is_dir() else None
    name = options.served_model_name or options.model or resolved
    catalog = Catalog(Served(name, None, resolved, settings or GenerationSettings()))
    for adapter, folder in options.adapters.items():
        _status(f"loading adapter {adapter} from {folder}")
        catalog.load(model, adapter, folder)
    eos = model.generation_config.eos_token_id
    eos = tokenizer.eos_token_id if eos is None else eos
    engine = Engine(
        model, eos if isinstance(eos, list) else [eos], options.max_batch_size, options.max_queue
    )
    context = getattr(model.config, "max_position_embeddings", None)
    return ServerState(
        model,
        tokenizer,
        engine,
        catalog,
        options.max_tokens,
        context,
        options.allow_adapter_updates,
        roots,
        options.api_key,
        options.max_request_bytes,
    )


def _refuse_images(spec: str, resolved: str) -> None:
    """Refuse a vision-language model by name (requests with images are not implemented)."""
    from ..vlm.modality import IMAGES, choose_modality

    if choose_modality(spec) is IMAGES:
        raise LoraError(
            f"{spec} is a vision-language model ({resolved}: its config.json has a "
            "vision_config), and lorakit serve serves text models only: requests with images "
            "are not implemented. Use lorakit generate --image FILE or lorakit chat with it."
        )


def bind(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` (port 0: any free port), not listening yet.

    Raises:
        LoraError: the address is taken or cannot be bound.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        # As socket.create_server does: a restarted server may bind while old connections of
        # the last one linger in TIME_WAIT (a listening socket still makes the bind fail).
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise LoraError(f"Cannot listen on {host}:{port}: {error.strerror or error}.") from None
    return sock


def listen(sock: socket.socket) -> None:
    """Start accepting connections on a socket from :func:`bind`.

    Raises:
        LoraError: another server took the port meanwhile (it bound it too, then listened).
    """
    try:
        sock.listen(BACKLOG)
    except OSError as error:
        host, port = sock.getsockname()[:2]
        raise LoraError(f"Cannot listen on {host}:{port}: {error.strerror or error}.") from None


def run_server(options: ServeOptions) -> int:
    """Serve until Ctrl-C; returns the exit code."""
    import uvicorn

    if options.threads is not None:
        import torch

        torch.set_num_threads(options.threads)
    check_options(options)  # before the port is taken
    sock = bind(options.host, options.port)
    try:
        state = load_state(options)
        listen(sock)
    except BaseException:
        sock.close()
        raise
    host, port = sock.getsockname()[:2]
    names = ", ".join(s.name for s in state.catalog)
    _status(f"serving {names} at http://{host}:{port}/v1 (OpenAI API; Ctrl-C stops)")
    _exposure_note(options)
    state.engine.start()
    config = uvicorn.Config(build_app(state), log_level=options.log_level, lifespan="off")
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:
        pass  # uvicorn raises the Ctrl-C it handled again once it has stopped: a normal exit
    finally:
        state.engine.stop()
        state.tokenizing.shutdown(wait=False)
        sock.close()
    _status("stopped")
    return 0


def _exposure_note(options: ServeOptions) -> None:
    """What the operator should know about who can reach the server."""
    if options.api_key is not None:
        _status("requests need the API key (Authorization: Bearer KEY); /health does not")
    if is_loopback(options.host):
        return
    if options.api_key is None:
        _status(
            f"note: listening on {options.host}, not only this machine, without an API key: "
            "anyone who reaches it can use the server"
        )
    else:
        _status(
            f"note: listening on {options.host}, not only this machine; the traffic (the key "
            "included) is not encrypted: put a TLS proxy in front beyond a trusted network"
        )

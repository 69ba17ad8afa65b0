"""The HTTP side: OpenAI-compatible routes on Starlette, talking to the :class:`Engine`.

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models``,
``GET /health``, and, with ``allow_updates``, vLLM's ``POST /v1/load_lora_adapter`` and
``POST /v1/unload_lora_adapter``. Every error is OpenAI's error JSON; a client that goes away
(while sending its body, waiting or reading a stream) cancels its request in the engine and
leaves no traceback in the log.

One request cannot hold up the others: bodies over ``max_body`` bytes are a 413 before they
are read whole, prompts are tokenized on a thread of their own (the tokenizer releases the
GIL, so the event loop keeps answering), and an adapter that fails to load is a 400.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from ..errors import LoraError, brief
from . import protocol as api
from .auth import RequireKey
from .catalog import Catalog, LoadRefused, Served, UnknownModel
from .engine import Engine, Event, Job, ServerBusy
from .folders import check_request_folder
from .sampling import SamplingParams
from .text import TextStream

MAX_BODY = 1 << 20  # bytes; nginx's default too. A 1 MiB prompt takes ~1 s to tokenize.
GONE = 499  # nginx's "client closed request": logged, never received
log = logging.getLogger("uvicorn.error")  # the server's log, as uvicorn configures it


@dataclass
class ServerState:
    """Everything the routes share.

    Attributes:
        model, tokenizer: the base model (adapters loaded) and its tokenizer.
        engine: runs the requests.
        catalog: the served names.
        max_tokens: the most tokens one request may ask for.
        context: the model's context length (prompt + reply), if it has one.
        allow_updates: whether adapters may be loaded and unloaded at run time.
        adapter_roots: resolved folders run-time loads must lie under; empty: any.
        api_key: the key every request but /health must send; ``None``: no key.
        max_body: the largest request body, in bytes.
    """

    model: Any
    tokenizer: Any
    engine: Engine
    catalog: Catalog
    max_tokens: int
    context: int | None = None
    allow_updates: bool = False
    adapter_roots: tuple[Path, ...] = ()
    api_key: str | None = None
    max_body: int = MAX_BODY
    updates: asyncio.Lock = field(default_factory=asyncio.Lock)
    # One thread: a tokenizer is not safe to configure from two threads at once.
    tokenizing: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="lorakit-tokenize")
    )


def error_response(error: api.ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


def build_app(state: ServerState) -> Starlette:
    """The Starlette application serving ``state``."""

    async def on_api_error(_: Request, error: Exception) -> Response:
        return error_response(error)

    async def on_http_error(_: Request, error: Exception) -> Response:
        return error_response(api.ApiError(error.status_code, str(error.detail)))

    async def on_crash(_: Request, error: Exception) -> Response:
        return error_response(api.ApiError(500, f"Internal error: {type(error).__name__}"))

    async def on_gone(_: Request, __: Exception) -> Response:
        return Response(status_code=GONE)  # the client left while sending its body

    routes = [
        Route("/health", partial(_health, state), methods=["GET"]),
        Route("/v1/models", partial(_models, state), methods=["GET"]),
        Route("/v1/chat/completions", partial(_complete, state, "chat"), methods=["POST"]),
        Route("/v1/completions", partial(_complete, state, "text"), methods=["POST"]),
        Route("/v1/load_lora_adapter", partial(_load, state), methods=["POST"]),
        Route("/v1/unload_lora_adapter", partial(_unload, state), methods=["POST"]),
    ]
    handlers = {
        api.ApiError: on_api_error,
        HTTPException: on_http_error,
        ClientDisconnect: on_gone,
        Exception: on_crash,
    }
    middleware = [] if state.api_key is None else [Middleware(RequireKey, key=state.api_key)]
    return Starlette(routes=routes, exception_handlers=handlers, middleware=middleware)


class _Stream(StreamingResponse):
    """A stream whose client may leave: ASGI 2.4 servers report it by failing a send, which
    Starlette raises as ``ClientDisconnect`` after the response began (no handler can answer
    then, so it would reach the log as a traceback)."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        with contextlib.suppress(ClientDisconnect):
            await super().__call__(scope, receive, send)


async def _body(state: ServerState, request: Request) -> bytes:
    """The request's body; a 413 as soon as it is known to be over ``state.max_body``."""
    limit = state.max_body
    too_large = api.ApiError(
        413,
        f"The request body is over {limit} bytes, this server's limit "
        "(lorakit serve --max-request-bytes).",
        code="request_too_large",
    )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():  # ClientDisconnect if the client leaves: on_gone
        body += chunk
        if len(body) > limit:
            raise too_large
    return bytes(body)


async def _health(state: ServerState, _: Request) -> Response:
    running, waiting = state.engine.counts()
    engine = {"running": running, "waiting": waiting, **asdict(state.engine.stats)}
    return JSONResponse({"status": "ok", "engine": engine})


async def _models(state: ServerState, _: Request) -> Response:
    base = state.catalog.base.name
    data = [
        {
            "id": s.name,
            "object": "model",
            "created": s.created,
            "owned_by": "lorakit",
            "root": s.path,
            "parent": None if s.adapter is None else base,
        }
        for s in state.catalog
    ]
    return JSONResponse({"object": "list", "data": data})


# --- completions -------------------------------------------------------------------------------
async def _complete(state: ServerState, kind: str, request: Request) -> Response:
    """Shared by chat and text completions: validate, queue, then stream or collect."""
    model = api.ChatRequest if kind == "chat" else api.CompletionRequest
    body = api.parse(await _body(state, request), model)
    try:
        served = state.catalog.resolve(body.model)
    except UnknownModel as error:
        raise api.ApiError(404, str(error), "model", "model_not_found") from None
    loop, events = asyncio.get_running_loop(), asyncio.Queue()
    prompt = await loop.run_in_executor(state.tokenizing, _encode, state, served, body, kind)
    params = _params(state, body, len(prompt), kind)

    def emit(event: Event) -> None:
        with contextlib.suppress(RuntimeError):  # the loop closed: nobody is listening
            loop.call_soon_threadsafe(events.put_nowait, event)

    job = Job(prompt, served.adapter, params, TextStream(state.tokenizer, params.stop), emit)
    try:
        state.engine.submit(job)
    except ServerBusy as error:
        raise api.ApiError(429, str(error), code="rate_limit_exceeded") from None
    stream = _events(request, job, events)
    rid = api.new_id("chatcmpl" if kind == "chat" else "cmpl")
    if body.stream:
        usage = body.stream_options is not None and body.stream_options.include_usage
        chunks = _sse(stream, kind, rid, body.model, len(prompt) if usage else None)
        return _Stream(chunks, media_type="text/event-stream")
    text, reason, tokens = [], None, 0
    async for name, value in stream:
        if name == "error":
            raise api.ApiError(500, value)
        if name == "text":
            text.append(value)
        else:
            reason, tokens = value
    if reason is None:
        return Response(status_code=499)  # the client went away; nobody reads this
    counts = api.usage(len(prompt), tokens)
    return JSONResponse(api.reply(kind, rid, body.model, "".join(text), reason, counts))


def _encode(state: ServerState, served: Served, body: Any, kind: str) -> list[int]:
    """Prompt token ids: chat messages through the served model's template, or raw text."""
    tokenizer = state.tokenizer
    if kind == "text":
        return tokenizer(body.text())["input_ids"]
    settings = served.settings
    template = settings.chat_template or tokenizer.chat_template
    if template is None:
        raise api.ApiError(
            400, "This model has no chat template; use /v1/completions with a plain prompt."
        )
    messages = settings.messages([m.as_dict() for m in body.messages])
    try:
        text = tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=True
        )
    except Exception as error:  # a template that refuses these roles or this order
        raise api.ApiError(400, f"The chat template refused the messages: {error}") from None
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _params(state: ServerState, body: Any, prompt: int, kind: str) -> SamplingParams:
    """Sampling parameters with ``max_tokens`` checked against the limit and the context.

    Without ``max_tokens``, OpenAI's defaults: as many as fit for chat, 16 for completions
    (both within this server's limit and the model's context).
    """
    asked = getattr(body, "max_completion_tokens", None) or body.max_tokens
    if asked is not None and asked > state.max_tokens:
        raise api.ApiError(
            400,
            f"max_tokens is {asked}; this server allows at most {state.max_tokens}.",
            "max_tokens",
        )
    limit = asked
    if limit is None:
        limit = state.max_tokens if kind == "chat" else min(16, state.max_tokens)
        if state.context is not None:
            limit = max(1, min(limit, state.context - prompt))
    if state.context is not None and prompt + limit > state.context:
        raise api.ApiError(
            400,
            f"This model's maximum context length is {state.context} tokens. However, you "
            f"requested {prompt + limit} tokens ({prompt} in the prompt, {limit} in the "
            "completion). Please reduce the length of the prompt or completion.",
            "messages" if kind == "chat" else "prompt",
        )
    return SamplingParams(
        limit, body.temperature, body.top_p, body.seed, body.stops(), body.ignore_eos
    )


async def _events(request: Request, job: Job, events: asyncio.Queue) -> AsyncIterator[Event]:
    """The job's events until "done" or "error"; the job is cancelled if the client leaves."""
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        while True:
            get = asyncio.ensure_future(events.get())
            await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not get.done():
                get.cancel()
                return
            event = get.result()
            yield event
            if event[0] != "text":
                return
    finally:
        gone.cancel()
        job.cancel()  # no-op for a finished job; stops one whose client went away


async def _disconnected(request: Request) -> None:
    """Return when the client disconnects (the body is read: receive() waits for that)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _sse(
    stream: AsyncIterator[Event], kind: str, rid: str, model: str, prompt: int | None
) -> AsyncIterator[bytes]:
    """Server-sent events: chunks of text, a closing chunk, usage if asked, ``[DONE]``."""
    if kind == "chat":
        first = api.chunk(kind, rid, model, "")
        first["choices"][0]["delta"]["role"] = "assistant"
        yield api.sse(first)
    async for name, value in stream:
        if name == "text":
            yield api.sse(api.chunk(kind, rid, model, value))
        elif name == "error":
            yield api.sse(api.ApiError(500, value).body())
        else:
            reason, tokens = value
            yield api.sse(api.chunk(kind, rid, model, None, reason))
            if prompt is not None:
                last = api.chunk(kind, rid, model, None) | {"usage": api.usage(prompt, tokens)}
                yield api.sse(last | {"choices": []})
    yield api.sse("[DONE]")


# --- adapters at run time (vLLM's endpoints) ------------------------------------------------
def _check_updates(state: ServerState) -> None:
    if not state.allow_updates:
        raise api.ApiError(
            404,
            "Loading and unloading adapters is off; start lorakit serve with "
            "--allow-adapter-updates to allow it.",
        )


async def _load(state: ServerState, request: Request) -> Response:
    """vLLM's load: the folder checked (:mod:`.folders`), then loaded between engine steps.

    Every failure is a 400; the client gets the kind of problem (``LoadRefused.public``), the
    server's log the whole of it.
    """
    _check_updates(state)
    body = api.parse(await _body(state, request), api.LoadAdapter)
    async with state.updates:
        try:
            state.catalog.check_new(body.lora_name)
            folder = check_request_folder(body.lora_path, state.adapter_roots)
            future = state.engine.call(
                lambda: state.catalog.load(state.model, body.lora_name, folder)
            )
            await asyncio.wrap_future(future)
        except LoadRefused as error:
            log.warning("load_lora_adapter %s refused: %s", brief(body.lora_name), error)
            raise api.ApiError(400, error.public, "lora_path") from None
        except LoraError as error:
            raise api.ApiError(400, str(error), "lora_path") from None
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")


async def _unload(state: ServerState, request: Request) -> Response:
    from ..adapters import delete_adapter

    _check_updates(state)
    body = api.parse(await _body(state, request), api.UnloadAdapter)
    async with state.updates:
        try:
            served = state.catalog.withdraw(body.lora_name)
        except UnknownModel as error:
            raise api.ApiError(404, str(error), "lora_name") from None
        key, engine = served.adapter, state.engine
        # Deleted once the requests already using it have finished; new ones get 404 now.
        future = engine.call(lambda: delete_adapter(state.model, key), lambda: not engine.uses(key))
        await asyncio.wrap_future(future)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

"""Starting a server: load the base model and adapters, start the engine, run uvicorn.

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
from .app import ServerState, build_app
from .batch import check_model
from .catalog import Catalog, Served
from .engine import Engine

LOOPBACK = ("127.0.0.1", "localhost", "::1")


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
    log_level: str = "info"
    threads: int | None = None


def _status(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def load_state(options: ServeOptions) -> ServerState:
    """Load the model and adapters and build the engine (not started yet).

    Raises:
        LoraError: bad limits, a model that cannot be found or batched, or an adapter that
            cannot be loaded or served (see :meth:`Catalog.load`).
    """
    from ..generate import GenerationSettings, read_generation_settings
    from ..models.load import DEFAULT_MODEL, load_model, resolve_model_spec

    if options.max_tokens < 1:
        raise LoraError(f"--max-tokens must be at least 1, got {options.max_tokens}.")
    spec = options.model or next(iter(options.adapters.values()), None) or DEFAULT_MODEL
    resolved = resolve_model_spec(spec)  # a wrong path fails here, before the slow load
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
    )


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: any free port).

    Raises:
        LoraError: the address is taken or cannot be bound.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family)
    except OSError as error:
        raise LoraError(f"Cannot listen on {host}:{port}: {error.strerror or error}.") from None


def run_server(options: ServeOptions) -> int:
    """Serve until Ctrl-C; returns the exit code."""
    import uvicorn

    if options.threads is not None:
        import torch

        torch.set_num_threads(options.threads)
    state = load_state(options)
    sock = bind(options.host, options.port)
    host, port = sock.getsockname()[:2]
    names = ", ".join(s.name for s in state.catalog)
    _status(f"serving {names} at http://{host}:{port}/v1 (OpenAI API; Ctrl-C stops)")
    if options.host not in LOOPBACK:
        _status(
            f"note: listening on {options.host}, not only this machine: anyone who reaches "
            "it can use the server (there is no authentication)"
        )
    state.engine.start()
    config = uvicorn.Config(build_app(state), log_level=options.log_level, lifespan="off")
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:
        pass  # uvicorn raises the Ctrl-C it handled again once it has stopped: a normal exit
    finally:
        state.engine.stop()
        sock.close()
    _status("stopped")
    return 0

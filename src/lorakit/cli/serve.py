"""``lorakit serve``: an OpenAI-compatible HTTP server for a base model and its adapters.

Only this command imports the server (``lorakit.serve``: Starlette, uvicorn, pydantic), from
the optional extra ``pip install 'lorakit[serve]'``.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
from pathlib import Path

from ..errors import LoraError

KEY_ENV = "LORAKIT_API_KEY"  # serve.auth.KEY_ENV; repeated so that --help needs no Starlette


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default=None,
        help="base model: HF folder, .gguf file or smollm2-135m; omitted: the first adapter's "
        "base, else smollm2-135m",
    )
    parser.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help='an adapter to serve as model NAME (clients put NAME in "model"); repeat for several',
    )
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on; beyond loopback (0.0.0.0, a LAN address) needs --api-key "
        "or --allow-no-api-key",
    )
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (0: any free)")
    parser.add_argument(
        "--served-model-name",
        default=None,
        help="the base model's name in requests; omitted: the --model value as given",
    )
    _limit_arguments(parser)
    _access_arguments(parser)
    parser.add_argument(
        "--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)"
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug"],
        help="uvicorn's log level (info: one line per request)",
    )


def _limit_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--max-batch-size", type=int, default=16, help="most requests decoding at once"
    )
    parser.add_argument(
        "--max-queue", type=int, default=64, help="most requests waiting; past it: 429"
    )
    parser.add_argument(
        "--max-tokens", type=int, default=1024, help="most tokens one request may ask for"
    )
    parser.add_argument(
        "--max-request-bytes",
        type=int,
        default=1 << 20,
        metavar="N",
        help="largest request body; larger ones get 413 (default: 1 MiB)",
    )


def _access_arguments(parser: argparse.ArgumentParser) -> None:
    """Who may use the server and what it may load."""
    parser.add_argument(
        "--allow-adapter-updates",
        action="store_true",
        help="enable POST /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's)",
    )
    parser.add_argument(
        "--adapter-root",
        action="append",
        default=[],
        metavar="DIR",
        help="with --allow-adapter-updates: load only adapters under DIR (repeatable; default: "
        "any folder)",
    )
    parser.add_argument(
        "--api-key",
        default=None,
        metavar="KEY",
        help="require 'Authorization: Bearer KEY' on every endpoint but /health (default: "
        f"${KEY_ENV}, which keeps the key out of the process list)",
    )
    parser.add_argument(
        "--allow-no-api-key",
        action="store_true",
        help="listen beyond loopback without an API key (anyone who reaches the port can use it)",
    )


def run(args: argparse.Namespace) -> int:
    """Serve the base model and adapters with OpenAI's API: one batch for all adapters.

    POST /v1/chat/completions and /v1/completions take the adapter's name as "model" (or the
    base model's name, or "BASE:ADAPTER"); GET /v1/models lists them; GET /health. Requests
    for different adapters decode together in one forward pass. Ctrl-C lets running
    requests finish, then exits.
    """
    from .common import check_adapter_folder, check_model_spec

    if importlib.util.find_spec("uvicorn") is None or importlib.util.find_spec("starlette") is None:
        raise LoraError(
            "lorakit serve needs the serve extra: pip install 'lorakit[serve]' "
            "(Starlette, uvicorn and pydantic)."
        )
    from ..serve.server import ServeOptions, run_server

    for flag in ("max_batch_size", "max_tokens", "threads"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise LoraError(f"--{flag.replace('_', '-')} must be at least 1.")
    if args.max_queue < 0:
        raise LoraError("--max-queue must be 0 or more.")
    if not 0 <= args.port <= 65535:
        raise LoraError(f"--port must be in 0..65535 (0: any free port), got {args.port}.")
    adapters = _named_adapters(args.adapter)
    for folder in adapters.values():  # before the model loads, which takes a while
        check_adapter_folder(folder)
    if args.model is not None:
        check_model_spec(args.model)
    options = ServeOptions(
        model=args.model,
        adapters=adapters,
        host=args.host,
        port=args.port,
        served_model_name=args.served_model_name,
        max_batch_size=args.max_batch_size,
        max_queue=args.max_queue,
        max_tokens=args.max_tokens,
        allow_adapter_updates=args.allow_adapter_updates,
        adapter_roots=args.adapter_root,
        api_key=args.api_key if args.api_key is not None else os.environ.get(KEY_ENV),
        allow_no_api_key=args.allow_no_api_key,
        max_request_bytes=args.max_request_bytes,
        log_level=args.log_level,
        threads=args.threads,
    )
    return run_server(options)


def _named_adapters(values: list[str]) -> dict[str, str]:
    """``--adapter`` values as name -> folder; a bare DIR is refused: clients need a name."""
    from .common import parse_named_adapters

    adapters = parse_named_adapters(values)
    if "default" in adapters and not any(v.startswith("default=") for v in values):
        folder = adapters["default"]
        name = Path(folder).name or "a"
        raise LoraError(
            f'--adapter {folder}: give it the name clients will put in "model", as NAME=DIR '
            f"(e.g. --adapter {name}={folder})."
        )
    return adapters


COMMANDS = {"serve": (add_arguments, run)}

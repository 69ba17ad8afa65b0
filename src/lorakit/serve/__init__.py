"""``lorakit serve``: OpenAI's HTTP API for one base model and many LoRA adapters.

Imported only by the ``serve`` subcommand (it needs the ``serve`` extra: Starlette, uvicorn,
pydantic); ``import lorakit`` never loads it.

::

    client ──HTTP──> app.py (Starlette on uvicorn, event loop thread)
                       │ the API key (auth.py), the body's size, validate (protocol.py),
                       │ resolve the name (catalog.py), tokenize (a thread of its own),
                       │ submit a Job; read its events back. Adapter loads: the folder
                       │ checked (folders.py), loaded between engine steps (catalog.py)
                       v
                     engine.py (one thread)
                       │ each step: prefill newcomers in one forward, decode every
                       │ running request in one forward (batch.py: one left-padded
                       │ KV cache), rows routed to their adapters by lorakit.route
                       v
                     sampling.py (greedy / seeded top-p), text.py (text and stop strings)

The request's ``model`` names the adapter, as in vLLM, LoRAX and SGLang.
"""

from .app import ServerState, build_app
from .engine import Engine, Job
from .server import ServeOptions, load_state, run_server

__all__ = ["Engine", "Job", "ServeOptions", "ServerState", "build_app", "load_state", "run_server"]

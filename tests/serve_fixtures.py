"""What the tests of lorakit serve share: a tiny Llama with adapters, a server in a thread on
127.0.0.1 (a random port), and helpers that talk to it through raw HTTP.

Import the fixtures into a test module (``from serve_fixtures import client_fixture, ...``;
the tests ask for ``client``): each module gets its own server. Uvicorn runs without a logging config of its own, so its records
reach pytest's capture (``caplog``). Every wait is bounded in count and time.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import openai
import pytest
import tiny

from lorakit import LoraConfig, add_lora, save_adapter
from lorakit.cli import main
from lorakit.generate import GenerationSettings, save_generation_settings
from lorakit.models.load import load_model
from lorakit.serve import ServeOptions, build_app, load_state
from lorakit.serve.server import bind

PROMPT = "Name three colours."
TOKENS = 12  # greedy reply length compared with lorakit generate
SYSTEM_A = "You are adapter A. Answer in one word."
LONG = 1500  # a reply long enough to be cut short by a disconnect or a limit
WAIT_S = 10.0  # the longest any poll in these tests waits
MESSAGES = [{"role": "user", "content": "hi"}]


def make_adapter(base: Path, out: Path, seed: int, std: float = 0.5, **config) -> Path:
    """An adapter on ``base`` with random B (so it changes the replies), saved to ``out``."""
    model, _ = load_model(str(base))
    config = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]} | config
    add_lora(model, LoraConfig(**config), "x")
    tiny.randomize_adapters(model, std=std, seed=seed)
    save_adapter(model, out, "x")
    return out


@pytest.fixture(scope="module", name="folders")
def folders_fixture(tmp_path_factory, smollm2_tokenizer) -> SimpleNamespace:
    """A tiny Llama with SmolLM2's tokenizer; adapters a (with a saved system prompt) and b;
    an adapter made for another base; one with a modules_to_save copy."""
    root = tmp_path_factory.mktemp("serve")
    model = tiny.llama()
    model.resize_token_embeddings(len(smollm2_tokenizer), mean_resizing=False)
    model.save_pretrained(root / "base")
    smollm2_tokenizer.save_pretrained(root / "base")
    a = make_adapter(root / "base", root / "a", seed=1)
    save_generation_settings(GenerationSettings(system=SYSTEM_A), a)
    b = make_adapter(root / "base", root / "b", seed=2)
    other = tiny.llama(seed=3)
    other.config.intermediate_size = 64  # another base: other MLP shapes
    other = type(other)(other.config).eval()
    other.resize_token_embeddings(len(smollm2_tokenizer), mean_resizing=False)
    other.save_pretrained(root / "other")
    smollm2_tokenizer.save_pretrained(root / "other")
    wrong = make_adapter(root / "other", root / "wrong", seed=4)
    copies = make_adapter(root / "base", root / "copies", seed=5, modules_to_save=["lm_head"])
    return SimpleNamespace(root=root, base=root / "base", a=a, b=b, wrong=wrong, copies=copies)


def generate(folders: SimpleNamespace, use: str | None) -> str:
    """``lorakit generate``'s greedy reply to PROMPT (with --use ``use``; None: the base)."""
    argv = ["generate", "--model", str(folders.base), "--max-new-tokens", str(TOKENS)]
    if use is not None:
        argv += ["--adapter", f"a={folders.a}", "--adapter", f"b={folders.b}", "--use", use]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main([*argv, PROMPT]) == 0
    return out.getvalue().removesuffix("\n")  # the streamer ends the reply with a newline


@pytest.fixture(scope="module", name="expected")
def expected_fixture(folders) -> dict[str, str]:
    """Greedy replies of ``lorakit generate`` by served name."""
    return {
        "a": generate(folders, "a"),
        "b": generate(folders, "b"),
        "base": generate(folders, None),
    }


@contextlib.contextmanager
def running(options: ServeOptions) -> Iterator[SimpleNamespace]:
    """The server for ``options`` in a thread on 127.0.0.1:<free port>: (port, state)."""
    import uvicorn

    state = load_state(options)
    state.engine.start()
    sock = bind("127.0.0.1", 0)
    config = uvicorn.Config(build_app(state), log_level="warning", lifespan="off", log_config=None)
    runner = uvicorn.Server(config)
    thread = threading.Thread(target=runner.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + WAIT_S
    while not runner.started and time.monotonic() < deadline:
        time.sleep(0.01)
    assert runner.started, "the server did not start"
    try:
        yield SimpleNamespace(port=sock.getsockname()[1], state=state)
    finally:
        runner.should_exit = True
        thread.join(WAIT_S)
        state.engine.stop()


def options(folders: SimpleNamespace, **changes) -> ServeOptions:
    """The tests' server: base, a and b, updates allowed; ``changes`` on top."""
    settings = {
        "model": str(folders.base),
        "adapters": {"a": str(folders.a), "b": str(folders.b)},
        "served_model_name": "base",
        "max_tokens": 2 * LONG,
        "allow_adapter_updates": True,
    }
    return ServeOptions(**(settings | changes))


@pytest.fixture(scope="module", name="server")
def server_fixture(folders):
    """The server in a thread on 127.0.0.1:<free port>: base, a and b, updates allowed."""
    with running(options(folders)) as server:
        yield server


@pytest.fixture(scope="module", name="client")
def client_fixture(server) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"http://127.0.0.1:{server.port}/v1", api_key="none", max_retries=0, timeout=60
    )


def chat(client: openai.OpenAI, model: str, **kwargs) -> openai.types.chat.ChatCompletion:
    kwargs = {"temperature": 0, "max_tokens": TOKENS} | kwargs
    return client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": PROMPT}], **kwargs
    )


def raw(
    port: int,
    method: str,
    path: str,
    body: bytes | dict | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, str]:
    """(status, body text) of one plain HTTP request to 127.0.0.1."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    try:
        conn.request(
            method, path, body=data, headers={"Content-Type": "application/json"} | (headers or {})
        )
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


def error_of(status_and_text: tuple[int, str]) -> tuple[int, dict]:
    """(status, the "error" object of OpenAI's error JSON), checking its four keys."""
    status, text = status_and_text
    error = json.loads(text)["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    return status, error


def engine_counts(port: int) -> dict:
    status, text = raw(port, "GET", "/health")
    assert status == 200
    return json.loads(text)["engine"]


def wait_idle(port: int) -> dict:
    """The engine's counters once nothing runs or waits (polled for at most WAIT_S)."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        engine = engine_counts(port)
        if engine["running"] == engine["waiting"] == 0:
            return engine
        time.sleep(0.02)
    raise AssertionError(f"the engine is still busy after {WAIT_S} s: {engine}")

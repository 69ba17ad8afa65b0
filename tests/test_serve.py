"""lorakit serve against the official ``openai`` client: a tiny Llama with two adapters.

The server runs in a thread on 127.0.0.1 (a random port; ``serve_fixtures``); the Ctrl-C test
starts ``lorakit serve`` itself. Greedy replies are compared with ``lorakit generate``'s.
Every wait is bounded in count and time.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import openai
import pytest
from serve_fixtures import (  # noqa: F401 (the fixtures)
    LONG,
    MESSAGES,
    PROMPT,
    TOKENS,
    WAIT_S,
    client_fixture,
    expected_fixture,
    folders_fixture,
    server_fixture,
)
from serve_fixtures import chat as _chat
from serve_fixtures import engine_counts as _engine
from serve_fixtures import raw as _raw
from serve_fixtures import wait_idle as _wait_idle

from lorakit.cli import main
from lorakit.serve.text import TextStream


# --- greedy text, streaming, sampling ---------------------------------------------------------
def test_greedy_reply_equals_lorakit_generate(client, expected):
    assert len(set(expected.values())) == 3  # the adapters change the reply: routing matters
    for name in ("a", "b", "base"):
        reply = _chat(client, name)
        assert reply.choices[0].message.content == expected[name], name
        assert reply.choices[0].finish_reason == "length"
        assert reply.usage.completion_tokens == TOKENS
    # SGLang's "base:adapter" names the same adapter
    assert _chat(client, "base:b").choices[0].message.content == expected["b"]


def test_completions_take_the_raw_prompt(client, expected, smollm2_tokenizer):
    messages = [{"role": "user", "content": PROMPT}]
    prompt = smollm2_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    reply = client.completions.create(model="base", prompt=prompt, temperature=0, max_tokens=TOKENS)
    assert reply.choices[0].text == expected["base"]
    assert reply.usage.prompt_tokens == len(smollm2_tokenizer(prompt)["input_ids"])


def test_streamed_chunks_join_to_the_whole_reply(client, server, expected):
    stream = _chat(client, "a", stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected["a"] and len([c for c in chunks if c.choices]) > 3
    assert chunks[-1].usage.completion_tokens == TOKENS  # the usage chunk comes last
    completion = client.completions.create(
        model="b", prompt="Once upon", temperature=0, max_tokens=TOKENS, stream=True
    )
    streamed = "".join(c.choices[0].text for c in completion)
    whole = client.completions.create(
        model="b", prompt="Once upon", temperature=0, max_tokens=TOKENS
    )
    assert streamed == whole.choices[0].text
    # On the wire: server-sent events ending with [DONE]
    body = {"model": "a", "prompt": "Once", "max_tokens": 3, "stream": True}
    status, text = _raw(server.port, "POST", "/v1/completions", body)
    events = [line for line in text.split("\n\n") if line]
    assert status == 200 and events[-1] == "data: [DONE]"
    assert all(e.startswith("data: {") for e in events[:-1])


def test_stop_strings_end_the_reply_before_them(client, expected):
    reply = expected["b"]
    stop = reply[len(reply) // 2 : len(reply) // 2 + 3]
    cut = reply[: reply.index(stop)]
    whole = _chat(client, "b", stop=[stop, "never appears"])
    assert whole.choices[0].message.content == cut
    assert whole.choices[0].finish_reason == "stop"
    streamed = "".join(
        c.choices[0].delta.content or "" for c in _chat(client, "b", stop=stop, stream=True)
    )
    assert streamed == cut


def test_text_stream_holds_back_a_possible_stop_string(smollm2_tokenizer):
    ids = smollm2_tokenizer("The quick brown fox jumps")["input_ids"]
    stream = TextStream(smollm2_tokenizer, stop=("ck bro",))
    pieces, stopped = [], False
    for token in ids:
        piece, stopped = stream.push(token)
        pieces.append(piece)
        assert "ck" not in "".join(pieces)  # never sent before it is known not to be a stop
        if stopped:
            break
    assert stopped and "".join(pieces) == "The qui"


def test_seeded_sampling_repeats_whatever_shares_the_batch(client):
    def sampled(seed: int) -> str:
        return _chat(client, "a", temperature=1.0, seed=seed).choices[0].message.content

    first = sampled(7)
    assert sampled(7) == first and sampled(8) != first

    async def together() -> list[str]:
        aclient = openai.AsyncOpenAI(base_url=str(client.base_url), api_key="none", max_retries=0)
        calls = [
            aclient.chat.completions.create(
                model=m,
                messages=[{"role": "user", "content": PROMPT}],
                temperature=1.0,
                seed=7 if m == "a" else None,
                max_tokens=TOKENS,
            )
            for m in ("a", "b", "base", "b")
        ]
        return [r.choices[0].message.content for r in await asyncio.gather(*calls)]

    assert asyncio.run(together())[0] == first


def test_a_tiny_top_p_keeps_only_the_most_likely_token(client, expected):
    reply = _chat(client, "b", temperature=1.5, top_p=1e-9, seed=1)
    assert reply.choices[0].message.content == expected["b"]


def test_sixteen_concurrent_mixed_requests_share_forward_passes(client, server, expected):
    names = ["a", "b", "base", "base:a"] * 4
    before = _wait_idle(server.port)

    async def burst() -> list[str]:
        aclient = openai.AsyncOpenAI(base_url=str(client.base_url), api_key="none", max_retries=0)
        calls = [
            aclient.chat.completions.create(
                model=m,
                messages=[{"role": "user", "content": PROMPT}],
                temperature=0,
                max_tokens=TOKENS,
            )
            for m in names
        ]
        return [r.choices[0].message.content for r in await asyncio.gather(*calls)]

    replies = asyncio.run(burst())
    assert replies == [expected[m.removeprefix("base:")] for m in names]
    after = _wait_idle(server.port)
    # One after another they would take 16 x 12 forwards; batched, about 12 plus prefills.
    assert after["forwards"] - before["forwards"] <= 3 * TOKENS
    assert after["largest_batch"] >= 8


def test_requests_join_and_leave_a_running_batch_unchanged(client, server, expected):
    long = {"max_tokens": 150, "extra_body": {"ignore_eos": True}}
    alone = _chat(client, "b", **long).choices[0].message.content
    chunks = iter(_chat(client, "b", stream=True, **long))
    pieces = [next(chunks).choices[0].delta.content or "" for _ in range(5)]

    async def burst() -> list[str]:
        aclient = openai.AsyncOpenAI(base_url=str(client.base_url), api_key="none", max_retries=0)
        calls = [
            aclient.chat.completions.create(
                model=m,
                messages=[{"role": "user", "content": PROMPT}],
                temperature=0,
                max_tokens=TOKENS,
            )
            for m in ("a", "base", "a")
        ]
        return [r.choices[0].message.content for r in await asyncio.gather(*calls)]

    # They join the running request (another cache width: padding) and leave before it ends.
    assert asyncio.run(burst()) == [expected["a"], expected["base"], expected["a"]]
    assert _engine(server.port)["running"] == 1
    pieces += [c.choices[0].delta.content or "" for c in chunks]
    assert "".join(pieces) == alone


def test_models_lists_the_base_and_each_adapter(client, folders):
    models = {m.id: m for m in client.models.list()}
    assert set(models) == {"base", "a", "b"}
    assert models["a"].model_extra["parent"] == "base"
    assert models["a"].model_extra["root"] == str(folders.a)


# --- errors ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("path", "body", "status", "message"),
    [
        ("/v1/chat/completions", b'{"model": "a", "messages": [', 400, "not valid JSON"),
        (
            "/v1/chat/completions",
            {"model": "a", "messages": MESSAGES, "fooo": 1},
            400,
            "Unknown field 'fooo'",
        ),
        (
            "/v1/chat/completions",
            {"model": "a", "messages": MESSAGES, "logprobs": True},
            400,
            "not supported",
        ),
        ("/v1/chat/completions", {"model": "a", "messages": []}, 400, "messages"),
        (
            "/v1/chat/completions",
            {"model": "a", "messages": MESSAGES, "temperature": 5},
            400,
            "temperature",
        ),
        (
            "/v1/chat/completions",
            {"model": "a", "messages": MESSAGES, "max_tokens": 10**6},
            400,
            "at most 3000",
        ),
        (
            "/v1/completions",
            {"model": "a", "prompt": "word " * 3000},
            400,
            "maximum context length is 2048 tokens. However, you requested 3002 tokens",
        ),
        ("/v1/completions", {"model": "a"}, 400, "prompt is required"),
        ("/v1/completions", {"model": "nope", "prompt": "x"}, 404, "'nope' does not exist"),
        ("/v1/completions", {"model": "other:a", "prompt": "x"}, 404, "does not exist"),
        ("/v1/nothing", {}, 404, "Not Found"),
    ],
)
def test_bad_requests_get_openai_error_json(server, path, body, status, message):
    code, text = _raw(server.port, "POST", path, body)
    assert code == status
    error = json.loads(text)["error"]
    assert message in error["message"] and set(error) == {"message", "type", "param", "code"}
    assert error["type"] == ("invalid_request_error" if status == 400 else "not_found_error")


def test_the_openai_client_raises_its_own_error_classes(client):
    with pytest.raises(openai.NotFoundError) as error:
        _chat(client, "nope")
    assert error.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError, match="Unknown field 'fooo'"):
        _chat(client, "a", extra_body={"fooo": 1})


def test_full_batch_and_queue_give_429(client, server):
    engine = server.state.engine
    limits = engine.max_batch, engine.max_queue
    engine.max_batch, engine.max_queue = 1, 0
    try:
        stream = _chat(client, "a", max_tokens=LONG, stream=True, extra_body={"ignore_eos": True})
        next(iter(stream))  # it runs, filling the batch
        with pytest.raises(openai.RateLimitError) as error:
            _chat(client, "b")
        assert "busy" in error.value.message and error.value.code == "rate_limit_exceeded"
        stream.close()
    finally:
        engine.max_batch, engine.max_queue = limits
    _wait_idle(server.port)


# --- cancellation -----------------------------------------------------------------------------
def test_a_client_that_disconnects_cancels_its_request(client, server):
    before = _wait_idle(server.port)
    stream = _chat(client, "a", max_tokens=LONG, stream=True, extra_body={"ignore_eos": True})
    for _, _chunk in zip(range(3), stream, strict=False):
        pass
    stream.close()
    after = _wait_idle(server.port)
    assert after["cancelled"] == before["cancelled"] + 1
    assert after["tokens"] - before["tokens"] < LONG // 4  # stopped long before LONG tokens
    # The same without streaming: the client gives up waiting and closes the connection.
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=0.5)
    body = {"model": "b", "messages": MESSAGES, "max_tokens": LONG, "ignore_eos": True}
    conn.request(
        "POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"}
    )
    with pytest.raises(TimeoutError):
        conn.getresponse()
    conn.close()
    final = _wait_idle(server.port)
    assert final["cancelled"] == after["cancelled"] + 1
    assert final["tokens"] - after["tokens"] < LONG // 2


# --- adapters at run time -------------------------------------------------------------------
def test_load_and_unload_adapters_at_run_time(client, server, folders, expected):
    port = server.port
    assert (
        _raw(
            port, "POST", "/v1/load_lora_adapter", {"lora_name": "c", "lora_path": str(folders.a)}
        )[0]
        == 200
    )
    assert _chat(client, "c").choices[0].message.content == expected["a"]  # a's system prompt too
    # Unloading waits for the requests already using the adapter, which finish whole.
    stream = _chat(client, "c", stream=True, max_tokens=40, extra_body={"ignore_eos": True})
    first = next(iter(stream))
    unloaded = {}
    thread = threading.Thread(
        target=lambda: unloaded.update(
            r=_raw(port, "POST", "/v1/unload_lora_adapter", {"lora_name": "c"})
        )
    )
    thread.start()
    rest = list(stream)
    thread.join(WAIT_S)
    assert (
        rest[-1].choices[0].finish_reason == "length" and first.choices[0].delta.role == "assistant"
    )
    assert unloaded["r"][0] == 200
    with pytest.raises(openai.NotFoundError):
        _chat(client, "c")
    status, text = _raw(port, "POST", "/v1/unload_lora_adapter", {"lora_name": "c"})
    assert status == 404 and "'c' cannot be found" in json.loads(text)["error"]["message"]
    assert {m.id for m in client.models.list()} == {"base", "a", "b"}


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"lora_name": "w", "lora_path": "WRONG"}, "made for another base model"),
        ({"lora_name": "m", "lora_path": "COPIES"}, "cannot be served"),
        ({"lora_name": "a", "lora_path": "A"}, "taken by an adapter"),
        ({"lora_name": "base", "lora_path": "A"}, "taken by the base model"),
        ({"lora_name": "x", "lora_path": "/nonexistent"}, "not an adapter folder"),
        ({"lora_name": "x"}, "lora_path is required"),
    ],
)
def test_refused_loads_give_400_with_the_reason(client, server, folders, body, message):
    paths = {"WRONG": folders.wrong, "COPIES": folders.copies, "A": folders.a}
    body = {k: str(paths.get(v, v)) for k, v in body.items()}
    status, text = _raw(server.port, "POST", "/v1/load_lora_adapter", body)
    assert status == 400 and message in json.loads(text)["error"]["message"]
    assert {m.id for m in client.models.list()} == {"base", "a", "b"}  # nothing half-loaded
    assert _chat(client, "a").choices[0].message.content  # and a still answers


def test_adapter_updates_are_off_unless_allowed(server, folders):
    server.state.allow_updates = False
    try:
        body = {"lora_name": "c", "lora_path": str(folders.a)}
        status, text = _raw(server.port, "POST", "/v1/load_lora_adapter", body)
    finally:
        server.state.allow_updates = True
    assert status == 404 and "--allow-adapter-updates" in json.loads(text)["error"]["message"]


# --- the command ----------------------------------------------------------------------------
def test_serve_refuses_an_adapter_it_cannot_batch(folders, capsys):
    argv = ["serve", "--model", str(folders.base), "--adapter", f"m={folders.copies}"]
    assert main([*argv, "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "'m'" in err and "cannot be served" in err and "modules_to_save" in err
    assert main(["serve", "--model", str(folders.base), "--max-batch-size", "0"]) == 2
    assert "--max-batch-size must be at least 1" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--adapter", "a=/nonexistent/run"], "--adapter /nonexistent/run: not an adapter folder"),
        (["--model", "/nonexistent/model"], "--model /nonexistent/model: not found (no such"),
        (["--port", "70000"], "--port must be in 0..65535"),
    ],
)
def test_bad_flags_are_refused_before_the_model_loads(argv, message, capsys, monkeypatch):
    import lorakit.models.load

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the input checks")

    monkeypatch.setattr(lorakit.models.load, "load_model", refuse)
    assert main(["serve", *argv]) == 2
    assert message in capsys.readouterr().err


def test_import_lorakit_and_help_do_not_load_the_server():
    code = (
        "import sys, lorakit; from lorakit.cli import build_parser; build_parser(); "
        "print(sorted(m for m in ('starlette', 'uvicorn', 'lorakit.serve') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "[]"


def _ctrl_c_during_a_request(port: int, outcome: dict) -> None:
    """Client side: once the server answers, start a long streamed request, press Ctrl-C
    (SIGINT to this process) after its first chunk, then read the rest."""
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
    deadline = time.monotonic() + 60
    while "up" not in outcome and time.monotonic() < deadline:
        with contextlib.suppress(openai.APIConnectionError):
            outcome["up"] = client.models.list()
        time.sleep(0.05)
    if "up" not in outcome:
        return  # never started: serve returned on its own, with an error
    try:
        stream = _chat(
            client,
            "a",
            max_tokens=100,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        chunks = iter(stream)
        next(chunks)
    finally:
        os.kill(os.getpid(), signal.SIGINT)  # uvicorn's handler takes it while serving
    outcome["rest"] = list(chunks)


def test_ctrl_c_finishes_running_requests_then_exits(folders, capsys):
    with socket.socket() as probe:  # a free port on the loopback interface
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    outcome: dict = {}
    thread = threading.Thread(target=_ctrl_c_during_a_request, args=(port, outcome), daemon=True)
    thread.start()
    argv = ["serve", "--model", str(folders.base), "--adapter", f"a={folders.a}"]
    code = main([*argv, "--port", str(port), "--log-level", "warning"])
    thread.join(WAIT_S)
    assert code == 0 and "up" in outcome
    assert outcome["rest"][-1].usage.completion_tokens == 100  # the request finished whole
    err = capsys.readouterr().err
    assert f"at http://127.0.0.1:{port}/v1" in err and err.rstrip().endswith("stopped")

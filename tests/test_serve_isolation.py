"""One request cannot harm the others: hostile requests (hypothesis over the request schema,
through raw HTTP and the official ``openai`` client) are refused while well-formed ones
beside them complete unchanged; a row of non-finite logits fails its request alone; bodies
over the limit are a 413 before they are read; a big prompt does not stall the event loop;
a client that leaves at any point leaves no traceback."""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from serve_fixtures import (  # noqa: F401 (the fixtures)
    LONG,
    MESSAGES,
    PROMPT,
    TOKENS,
    client_fixture,
    expected_fixture,
    folders_fixture,
    options,
    running,
    wait_idle,
)
from serve_fixtures import chat as _chat
from serve_fixtures import raw as _raw

from lorakit import LoraConfig, add_lora, save_adapter
from lorakit.layers import LoraLayer
from lorakit.models.load import load_model
from lorakit.serve import build_app
from lorakit.serve.app import MAX_BODY

EXAMPLES = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.fixture(scope="module")
def server(folders):
    """base, a, b and "bomb": an adapter on lm_head whose logits are infinite (finite file)."""
    model, _ = load_model(str(folders.base))
    add_lora(model, LoraConfig(r=4, alpha=8, target_modules=["lm_head"]), "x")
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoraLayer):
                module.lora_A["x"].fill_(1.0)
                module.lora_B["x"].fill_(1e38)  # 2 * 1e38 * 4 * (A h) overflows float32
    save_adapter(model, folders.root / "bomb", "x")
    adapters = {"a": str(folders.a), "b": str(folders.b), "bomb": str(folders.root / "bomb")}
    with running(options(folders, adapters=adapters)) as server:
        yield server


# --- a row of bad logits ------------------------------------------------------------------
def test_a_non_finite_row_fails_its_request_alone(client, server):
    long = {"max_tokens": 60, "extra_body": {"ignore_eos": True}}
    alone = _chat(client, "a", **long).choices[0].message.content
    before = wait_idle(server.port)
    chunks = iter(_chat(client, "a", stream=True, **long))
    pieces = [next(chunks).choices[0].delta.content or "" for _ in range(3)]
    with pytest.raises(openai.InternalServerError) as error:  # it joins the running batch
        _chat(client, "bomb", temperature=1.0, seed=1)
    assert "scores for token 1 of this reply are not finite (NaN or inf)" in error.value.message
    body = {"model": "bomb", "messages": MESSAGES, "max_tokens": 5, "stream": True}
    status, text = _raw(server.port, "POST", "/v1/chat/completions", body)
    events = [e.removeprefix("data: ") for e in text.split("\n\n") if e]
    assert status == 200 and events[-1] == "[DONE]"
    assert "not finite" in json.loads(events[-2])["error"]["message"]
    pieces += [c.choices[0].delta.content or "" for c in chunks]
    assert "".join(pieces) == alone  # the other stream went on, unchanged
    after = wait_idle(server.port)
    assert after["failed"] == before["failed"] + 2 and after["running"] == 0


# --- hostile requests beside well-formed ones -----------------------------------------------
JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)
TEXT = st.text(max_size=12)
# Values the schema accepts: a request made of these must get a reply.
VALID = {
    "temperature": st.sampled_from([0, 0.01, 2]) | st.floats(0.01, 2),
    "top_p": st.floats(5e-324, 1),  # 1e-300 is 0 in float32
    "seed": st.integers(-(2**63), 2**64 - 1),
    "stop": TEXT | st.lists(TEXT, max_size=4),
    "stream": st.booleans(),
    "max_tokens": st.integers(1, 6),
    "ignore_eos": st.booleans(),
    "user": TEXT,
}
# Values it refuses (wrong types, ranges, sizes), and some it takes: each alone must not harm.
HOSTILE = {
    "model": st.sampled_from(["nope", "", "base:nope", "a" * 5000]) | JSONISH,
    "messages": JSONISH
    | st.lists(st.fixed_dictionaries({"role": TEXT, "content": JSONISH}), max_size=2),
    "prompt": JSONISH,
    "max_tokens": st.integers(-3, 0) | st.integers(2 * LONG + 1, 10**30) | JSONISH,
    "temperature": st.sampled_from([5e-324, 1e-300, 1e-40, 0.009, -0.0])
    | st.floats(0, 0.02)
    | st.floats(-1, 3)
    | JSONISH,
    "top_p": st.sampled_from([0, -1e-300, 1.0000001]) | st.floats(-0.5, 1.5) | JSONISH,
    "seed": st.sampled_from([2**64, -(2**63) - 1, 10**40]) | st.integers(-(2**70), 2**70) | JSONISH,
    "stop": st.lists(st.text(max_size=1200), min_size=1, max_size=6) | JSONISH,
    "stream": JSONISH,
    "stream_options": JSONISH,
    "n": st.integers(0, 3),
    "logprobs": st.booleans(),
}


@st.composite
def hostile(draw) -> tuple[str, bytes]:
    """A path and a body: a well-formed request with one to three hostile fields (wrong
    types, ranges and sizes, unknown keys), bytes that are not JSON, or too many of them."""
    path = draw(st.sampled_from(["/v1/chat/completions", "/v1/completions"]))
    kind = draw(st.sampled_from(["fields"] * 6 + ["bytes", "huge"]))
    if kind == "bytes":
        return path, draw(st.binary(max_size=64))
    if kind == "huge":
        return path, b'{"model": "a", "prompt": "' + b"x" * (MAX_BODY + 1) + b'"}'
    chat = "chat" in path
    body = {"model": draw(st.sampled_from(["a", "b", "base", "base:a"]))}
    body["messages" if chat else "prompt"] = MESSAGES if chat else draw(st.text(max_size=30))
    body |= {name: draw(values) for name, values in VALID.items() if draw(st.booleans())}
    body["max_tokens"] = body.get("max_tokens", 4)  # a valid one may not run for minutes
    bad = draw(st.lists(st.sampled_from(sorted(HOSTILE)), min_size=1, max_size=3, unique=True))
    body |= {name: draw(HOSTILE[name]) for name in bad}
    body |= draw(st.dictionaries(TEXT.filter(bool), JSONISH, max_size=1))
    return path, json.dumps(body).encode()


def _known(path: str, **fields) -> tuple[str, bytes]:
    """A well-formed request with ``fields``: the cases found by hand, always tried."""
    body = {"model": "a", "max_tokens": 4} | fields
    body |= {"messages": MESSAGES} if "chat" in path else {"prompt": "Hi"}
    return path, json.dumps(body).encode()


@EXAMPLES
@given(request=hostile())
@example(request=_known("/v1/chat/completions", temperature=1e-300))  # logits / 0 in float32
@example(request=_known("/v1/completions", seed=2**64))  # past torch.Generator's range
@example(request=_known("/v1/chat/completions", temperature=1.0, top_p=5e-324))  # 0 in float32
@example(request=_known("/v1/completions", stop=["x" * 1001]))
def test_hostile_requests_are_refused_and_well_formed_ones_beside_them_complete(
    client, server, expected, request
):
    path, body = request
    with ThreadPoolExecutor(1) as pool:
        good = pool.submit(_chat, client, "b")
        status, text = _raw(server.port, "POST", path, body)
        reply = good.result(timeout=60)
    assert reply.choices[0].message.content == expected["b"]
    assert status in (200, 400, 404, 413), (status, text[:300])
    if status == 200:
        if "data: " in text[:6]:
            assert text.endswith("data: [DONE]\n\n") and '"error"' not in text
        else:
            assert json.loads(text)["choices"][0]["finish_reason"] in ("stop", "length")
    else:
        error = json.loads(text)["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
        assert error["type"] == ("not_found_error" if status == 404 else "invalid_request_error")


def _refused(kwargs: dict) -> set[str]:
    """The parameters of ``kwargs`` this server refuses: its rules, restated."""
    t, p, stop = kwargs["temperature"], kwargs["top_p"], kwargs["stop"]
    wrong = {
        "temperature": not (t == 0 or 0.01 <= t <= 2),
        "top_p": not 0 < p <= 1,
        "seed": not -(2**63) <= kwargs["seed"] <= 2**64 - 1,
        "max_tokens": not 1 <= kwargs["max_tokens"] <= 2 * LONG,
        "stop": len(stop) > 4 or any(len(s) > 1000 for s in stop),
    }
    return {name for name, bad in wrong.items() if bad}


@EXAMPLES
@given(
    kwargs=st.fixed_dictionaries(
        {
            # the client itself refuses NaN and inf (raw HTTP sends them, above)
            "temperature": st.floats(-1, 3) | st.floats(0, 0.02) | st.sampled_from([0.0, 1e-300]),
            "top_p": st.floats(-0.5, 1.5) | st.sampled_from([1e-300, 1.0]),
            "seed": st.integers(-(2**64), 2**65),
            "max_tokens": st.integers(-2, 6) | st.just(10**9),
            "stop": st.lists(
                st.text(max_size=3) | st.text(min_size=999, max_size=1001), max_size=5
            ),
        }
    )
)
@example(kwargs={"temperature": 1e-300, "top_p": 1.0, "seed": 0, "max_tokens": 2, "stop": []})
@example(kwargs={"temperature": 1.0, "top_p": 1e-300, "seed": 0, "max_tokens": 2, "stop": []})
@example(kwargs={"temperature": 0.0, "top_p": 1.0, "seed": 2**64, "max_tokens": 2, "stop": []})
def test_the_openai_client_gets_a_reply_or_a_400_naming_the_parameter(client, kwargs):
    refused = _refused(kwargs)
    try:
        reply = _chat(client, "a", **kwargs)
    except openai.BadRequestError as error:
        assert refused, f"refused {kwargs}: {error.message}"
        field = error.param.split(".")[0]  # stop.1: the second stop string
        assert field in refused and error.message.startswith(f"Error code: 400 - {field}")
        return
    assert not refused, f"accepted {kwargs}, which sets a bad {refused}"
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.completion_tokens <= kwargs["max_tokens"]


# --- sizes ----------------------------------------------------------------------------------
def _answer(conn: socket.socket) -> tuple[int, dict]:
    """(status, OpenAI's "error" object) of the response arriving on ``conn``."""
    response = http.client.HTTPResponse(conn)
    response.begin()
    return response.status, json.loads(response.read())["error"]


HEAD = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"


def test_a_body_declared_over_the_limit_is_413_before_it_is_sent(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as conn:
        conn.sendall(HEAD + b"Content-Length: 5000000\r\n\r\n")  # and not one byte of it
        status, error = _answer(conn)
    assert status == 413 and error["code"] == "request_too_large"
    assert error["message"] == (
        f"The request body is over {MAX_BODY} bytes, this server's limit (lorakit serve "
        "--max-request-bytes)."
    )


def test_a_chunked_body_is_cut_at_the_limit(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as conn:
        conn.sendall(HEAD + b"Transfer-Encoding: chunked\r\n\r\n")
        chunk = b"x" * 65536
        for _ in range(MAX_BODY // len(chunk) + 1):  # one chunk past the limit, no end
            conn.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        status, error = _answer(conn)
    assert status == 413 and error["code"] == "request_too_large"


def test_the_openai_client_gets_413_for_a_prompt_over_the_limit(client):
    with pytest.raises(openai.APIStatusError) as error:
        client.completions.create(model="a", prompt="x" * (MAX_BODY + 1), max_tokens=1)
    assert error.value.status_code == 413 and error.value.code == "request_too_large"


def test_a_big_prompt_does_not_stall_the_event_loop(server):
    """A prompt near the limit takes about a second to tokenize; /health, asked once it was
    sent, answers before it is refused (its 200k tokens are over the context)."""
    body = json.dumps({"model": "a", "prompt": "word " * ((MAX_BODY - 100) // 5)})
    done: dict[str, float] = {}
    sent = threading.Event()

    def big() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        sent.set()
        done["status"] = conn.getresponse().status
        done["big"] = time.monotonic()
        conn.close()

    thread = threading.Thread(target=big)
    thread.start()
    assert sent.wait(30)
    time.sleep(0.1)  # the server reads the body (milliseconds), then tokenizes (a second)
    assert _raw(server.port, "GET", "/health")[0] == 200
    done["health"] = time.monotonic()
    thread.join(60)
    assert done["status"] == 400
    assert done["health"] < done["big"], "the event loop waited for the tokenizer"


# --- clients that leave -------------------------------------------------------------------
def _asgi(
    server, body: bytes, leave_after: int, stream: bool = False, spec: str = "2.3"
) -> list[dict]:
    """Call the app directly as an ASGI ``spec`` server would (uvicorn: 2.3), for a client
    that sends ``leave_after`` bytes of ``body`` and then disconnects (after the first chunk
    of a stream when ``stream``; a 2.4 server's sends fail from then on); the messages sent
    before. The app must return, not raise: the server logs what it raises."""
    app, sent = build_app(server.state), []
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/chat/completions",
        "headers": headers,
        "query_string": b"",
        "http_version": "1.1",
        "scheme": "http",
        "root_path": "",
        "server": ("127.0.0.1", 1),
        "client": ("127.0.0.1", 2),
        "asgi": {"version": "3.0", "spec_version": spec},
    }
    parts = [
        {"type": "http.request", "body": body[:leave_after], "more_body": leave_after < len(body)}
    ]

    async def receive() -> dict:
        if parts:
            return parts.pop(0)
        while stream and len(sent) < 2:  # a stream: leave once its first chunk came
            await asyncio.sleep(0.01)
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        if stream and spec == "2.4" and len(sent) >= 2:
            raise OSError("the client is gone")
        sent.append(message)

    asyncio.run(asyncio.wait_for(app(scope, receive, send), 60))
    return sent


def test_a_client_that_leaves_mid_body_gets_no_traceback(server):
    body = json.dumps({"model": "a", "messages": MESSAGES, "max_tokens": 3}).encode()
    sent = _asgi(server, body, leave_after=10)
    assert sent[0]["status"] == 499  # answered quietly; nobody reads it


@pytest.mark.parametrize("spec", ["2.3", "2.4"])
def test_a_client_that_leaves_mid_stream_gets_no_traceback_and_its_request_stops(server, spec):
    before = wait_idle(server.port)
    body = {
        "model": "a",
        "messages": MESSAGES,
        "max_tokens": LONG,
        "ignore_eos": True,
        "stream": True,
    }
    data = json.dumps(body).encode()
    sent = _asgi(server, data, leave_after=len(data), stream=True, spec=spec)
    assert sent[0]["status"] == 200 and len(sent) < LONG // 4
    after = wait_idle(server.port)
    assert after["cancelled"] == before["cancelled"] + 1


def test_a_client_that_leaves_while_waiting_gets_no_traceback(server):
    before = wait_idle(server.port)
    body = {"model": "a", "messages": MESSAGES, "max_tokens": LONG, "ignore_eos": True}
    data = json.dumps(body).encode()
    sent = _asgi(server, data, leave_after=len(data))
    assert sent[0]["status"] == 499
    assert wait_idle(server.port)["cancelled"] == before["cancelled"] + 1


def test_a_row_whose_sampling_fails_fails_alone(client, server, monkeypatch):
    import lorakit.serve.engine

    real = lorakit.serve.engine.next_tokens

    def fragile(logits, params, generators):
        if any(p.seed == 666 for p in params):
            raise RuntimeError("no token for seed 666")
        return real(logits, params, generators)

    long = {"max_tokens": 40, "extra_body": {"ignore_eos": True}}
    alone = _chat(client, "b", **long).choices[0].message.content
    monkeypatch.setattr(lorakit.serve.engine, "next_tokens", fragile)
    chunks = iter(_chat(client, "b", stream=True, **long))
    pieces = [next(chunks).choices[0].delta.content or "" for _ in range(3)]
    with pytest.raises(openai.InternalServerError, match="RuntimeError: no token for seed 666"):
        _chat(client, "a", temperature=1.0, seed=666)
    pieces += [c.choices[0].delta.content or "" for c in chunks]
    assert "".join(pieces) == alone

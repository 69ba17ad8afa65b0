"""What lorakit serve lets a client do and see: the API key on every endpoint but /health, and
adapter loading over HTTP that reads only regular files inside the named folder (under the
allowed roots) and never returns values read from files."""

from __future__ import annotations

import errno
import http.client
import json
import os
import shutil
import time

import openai
import pytest
from serve_fixtures import chat as _chat
from serve_fixtures import expected_fixture, folders_fixture, options, running  # noqa: F401

import lorakit.io
from lorakit.cli import main
from lorakit.state import adapter_configs

KEY = "test-key-0123"
SECRET = "TOPSECRET-4f9c"  # in files the server must never show a client


@pytest.fixture(scope="module")
def places(folders):
    """Adapter folders under an allowed root (good, hostile and broken) and one outside it."""
    root, allowed = folders.root, folders.root / "allowed"
    allowed.mkdir()
    good = shutil.copytree(folders.a, allowed / "good")
    wrong = shutil.copytree(folders.wrong, allowed / "wrong")
    config = json.loads((folders.b / "adapter_config.json").read_text())
    (root / "secret.json").write_text(json.dumps(config | {"api_token": SECRET}))
    linked = shutil.copytree(folders.b, allowed / "linked")
    (linked / "adapter_config.json").unlink()
    (linked / "adapter_config.json").symlink_to(root / "secret.json")
    leaky = shutil.copytree(folders.b, allowed / "leaky")
    shutil.copy(root / "secret.json", leaky / "adapter_config.json")
    inner = shutil.copytree(folders.b, allowed / "inner")  # a link inside the folder: fine
    (inner / "weights").mkdir()
    (inner / "adapter_model.safetensors").rename(inner / "weights" / "w.safetensors")
    (inner / "adapter_model.safetensors").symlink_to(inner / "weights" / "w.safetensors")
    fifo = shutil.copytree(folders.b, allowed / "fifo")
    (fifo / "adapter_model.safetensors").unlink()
    os.mkfifo(fifo / "adapter_model.safetensors")
    (allowed / "escape").symlink_to(folders.b, target_is_directory=True)
    hub = allowed / "hub" / "models--x--y"  # a Hugging Face cache: snapshots link to blobs
    (hub / "blobs").mkdir(parents=True)
    snapshot = hub / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    for file in folders.b.iterdir():
        shutil.copy(file, hub / "blobs" / file.name)
        (snapshot / file.name).symlink_to(f"../../blobs/{file.name}")
    return {
        "snapshot": snapshot,
        "good": good,
        "wrong": wrong,
        "linked": linked,
        "leaky": leaky,
        "inner": inner,
        "fifo": fifo,
        "escape": allowed / "escape",
        "outside": folders.b,
    }


@pytest.fixture(scope="module")
def server(folders, places):
    """A server that needs KEY and loads adapters only from under ``allowed``."""
    settings = options(folders, api_key=KEY, adapter_roots=[str(folders.root / "allowed")])
    with running(settings) as server:
        yield server


def _request(port: int, method: str, path: str, body: dict | None = None, auth: str | None = None):
    """(status, headers, JSON body) of one request, with ``Authorization: auth`` if given."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    headers = {"Content-Type": "application/json"} | ({"Authorization": auth} if auth else {})
    try:
        conn.request(method, path, json.dumps(body).encode() if body else None, headers)
        response = conn.getresponse()
        text, headers = response.read().decode(), dict(response.getheaders())
        is_json = headers.get("content-type") == "application/json"
        return response.status, headers, json.loads(text) if is_json else text
    finally:
        conn.close()


def _load(server, name: str, path: str) -> tuple[int, str]:
    status, _, body = _request(
        server.port,
        "POST",
        "/v1/load_lora_adapter",
        {"lora_name": name, "lora_path": path},
        auth=f"Bearer {KEY}",
    )
    if status == 200:
        return status, ""
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return status, body["error"]["message"]


# --- the API key ----------------------------------------------------------------------------
ROUTES = [
    ("GET", "/v1/models", None),
    (
        "POST",
        "/v1/chat/completions",
        {"model": "a", "messages": [{"role": "user", "content": "x"}]},
    ),
    ("POST", "/v1/completions", {"model": "a", "prompt": "x"}),
    ("POST", "/v1/load_lora_adapter", {"lora_name": "z", "lora_path": "/"}),
    ("POST", "/v1/unload_lora_adapter", {"lora_name": "a"}),
    ("GET", "/v1/nothing", None),
]


@pytest.mark.parametrize("auth", [None, "Bearer wrong-key", f"Basic {KEY}", KEY, "Bearer "])
@pytest.mark.parametrize(("method", "path", "body"), ROUTES)
def test_every_endpoint_but_health_needs_the_key(server, method, path, body, auth):
    status, headers, reply = _request(server.port, method, path, body, auth)
    assert status == 401 and headers["www-authenticate"] == "Bearer"
    assert reply["error"]["code"] == "invalid_api_key"
    assert reply["error"]["type"] == "invalid_request_error"
    assert "Authorization: Bearer KEY" in reply["error"]["message"]
    assert KEY not in json.dumps(reply)


def test_health_is_open_and_the_key_opens_the_rest(server):
    assert _request(server.port, "GET", "/health")[0] == 200
    for auth in (f"Bearer {KEY}", f"bearer {KEY}"):  # the scheme is case-insensitive
        status, _, reply = _request(server.port, "GET", "/v1/models", auth=auth)
        assert status == 200 and {m["id"] for m in reply["data"]} == {"base", "a", "b"}


def test_the_openai_client_sends_the_key(server, expected):
    url = f"http://127.0.0.1:{server.port}/v1"
    client = openai.OpenAI(base_url=url, api_key=KEY, max_retries=0, timeout=60)
    assert _chat(client, "a").choices[0].message.content == expected["a"]
    wrong = openai.OpenAI(base_url=url, api_key="not-it", max_retries=0, timeout=60)
    with pytest.raises(openai.AuthenticationError) as error:
        _chat(wrong, "a")
    assert error.value.code == "invalid_api_key" and error.value.status_code == 401


# --- loading adapters over HTTP -------------------------------------------------------------
def _models(server) -> set[str]:
    return {
        m["id"] for m in _request(server.port, "GET", "/v1/models", auth=f"Bearer {KEY}")[2]["data"]
    }


def test_a_symlink_out_of_the_folder_is_refused_and_never_read(server, places):
    status, message = _load(server, "linked", str(places["linked"]))
    assert status == 400
    assert "adapter_config.json is a symbolic link out of the folder" in message
    assert SECRET not in message and "secret.json" not in message  # not even where it points
    assert _models(server) == {"base", "a", "b"}


def test_links_inside_the_folder_or_a_root_are_followed(server, places):
    assert _load(server, "inner", str(places["inner"])) == (200, "")
    assert _load(server, "snapshot", str(places["snapshot"])) == (200, "")
    assert {"inner", "snapshot"} <= _models(server)


def test_values_read_from_files_never_reach_the_client(server, places, caplog):
    status, message = _load(server, "leaky", str(places["leaky"]))
    assert status == 400 and SECRET not in message
    assert f"{places['leaky']}: not an adapter lorakit can read" in message
    assert "The server's log has the details." in message
    assert SECRET in caplog.text  # the operator sees what was wrong
    status, message = _load(server, "w", str(places["wrong"]))
    assert status == 400 and "was made for another base model" in message
    assert "made for:" not in message and "[" not in message  # no recorded names or shapes
    assert _models(server) >= {"base", "a", "b"} and "leaky" not in _models(server)


def test_start_up_shows_the_operator_everything(folders, places, capsys):
    argv = ["serve", "--model", str(folders.base), "--adapter", f"l={places['leaky']}"]
    assert main([*argv, "--port", "0"]) == 2
    assert f"api_token='{SECRET}'" in capsys.readouterr().err


def test_a_fifo_is_refused_without_blocking(server, places):
    start = time.monotonic()
    status, message = _load(server, "fifo", str(places["fifo"]))
    assert status == 400 and "adapter_model.safetensors is not a regular file" in message
    assert time.monotonic() - start < 30  # opening a FIFO for reading would wait forever


@pytest.mark.parametrize("place", ["outside", "escape"])
def test_folders_outside_the_roots_are_refused(server, places, place):
    status, message = _load(server, "o", str(places[place]))
    assert status == 400
    assert "outside the folders this server loads adapters from (its --adapter-root" in message


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("ALLOWED/" + "x" * 5000, ("File name too long", "no such folder")),
        ("ALLOWED/a\x00b", ("not a valid path",)),
        ("ALLOWED/\ud800", ("The body is not valid JSON",)),  # pydantic: no lone surrogates
        ("ALLOWED/missing", ("not an adapter folder (no such folder)",)),
    ],
)
def test_paths_that_cannot_name_a_folder_get_400(server, folders, path, message):
    path = path.replace("ALLOWED", str(folders.root / "allowed"))
    status, text = _load(server, "p", path)
    assert status == 400 and any(m in text for m in message), text
    assert len(text) < 1000  # the path is cut in the message


@pytest.mark.parametrize(
    ("error", "message"),
    [
        (
            OSError(errno.EIO, "Input/output error"),
            "cannot read the adapter's files (Input/output error)",
        ),
        (PermissionError(errno.EACCES, "Permission denied"), "(Permission denied)"),
        (RuntimeError("boom"), "loading the adapter failed (RuntimeError)"),
        (MemoryError(), "loading the adapter failed (MemoryError)"),
    ],
)
def test_every_error_of_loading_is_a_400_and_leaves_nothing_loaded(
    server, places, monkeypatch, error, message
):
    real = lorakit.io.load_adapter
    keys = set(adapter_configs(server.state.model))

    def half_then_fail(model, folder, adapter_name):
        real(model, folder, adapter_name=adapter_name)  # loaded, then the failure
        raise error

    monkeypatch.setattr(lorakit.io, "load_adapter", half_then_fail)
    name = f"e-{type(error).__name__}"
    status, text = _load(server, name, str(places["good"]))
    assert status == 400 and message in text
    assert set(adapter_configs(server.state.model)) == keys and name not in _models(server)
    monkeypatch.undo()
    assert _load(server, name, str(places["good"])) == (200, "")  # the name is free again

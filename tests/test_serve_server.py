"""Starting lorakit serve: what is refused before the model loads (a taken port, a VLM, an
adapter without a name, a server open to the network without a key), told by ordering (the
model loader is never called), not by seconds."""

from __future__ import annotations

import socket

import pytest
import tiny
from serve_fixtures import folders_fixture  # noqa: F401 (the fixture)

import lorakit.models.load
import lorakit.serve.server
from lorakit.cli import main
from lorakit.errors import LoraError
from lorakit.serve.auth import check_exposure, is_loopback
from lorakit.serve.server import ServeOptions, bind, check_options, listen


@pytest.fixture
def no_model_load(monkeypatch) -> list:
    """Every call of the model loader, each refused (a test that loads must not get here)."""
    calls = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise AssertionError("the model was loaded before the start-up checks")

    monkeypatch.setattr(lorakit.models.load, "load_model", refuse)
    return calls


def test_a_taken_port_is_refused_before_the_model_loads(folders, no_model_load, capsys):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        code = main(["serve", "--model", str(folders.base), "--port", str(port)])
    err = capsys.readouterr().err
    assert code == 2 and no_model_load == []
    assert f"Cannot listen on 127.0.0.1:{port}: Address already in use." in err
    assert "loading model" not in err and "Traceback" not in err


def test_the_port_is_bound_but_refuses_connections_until_the_server_listens():
    sock = bind("127.0.0.1", 0)
    try:
        port = sock.getsockname()[1]
        with pytest.raises(ConnectionRefusedError):  # while the model loads: refused at once
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
        listen(sock)
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    finally:
        sock.close()


def test_of_two_servers_loading_at_once_the_second_to_listen_is_refused():
    first = bind("127.0.0.1", 0)
    port = first.getsockname()[1]
    second = bind("127.0.0.1", port)  # neither listens yet (both load their models)
    try:
        listen(first)
        with pytest.raises(LoraError, match=f"Cannot listen on 127.0.0.1:{port}"):
            listen(second)
        with pytest.raises(LoraError, match="Address already in use"):
            bind("127.0.0.1", port)  # a third, once one listens: refused at once
    finally:
        first.close()
        second.close()


def test_a_vision_language_model_is_refused_by_name(tmp_path, no_model_load, capsys):
    tiny.llava().save_pretrained(tmp_path / "vlm")
    assert main(["serve", "--model", str(tmp_path / "vlm"), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert no_model_load == [] and "corrupt" not in err
    assert f"{tmp_path / 'vlm'} is a vision-language model" in err
    assert "lorakit serve serves text models only" in err and "generate --image" in err


def test_an_adapter_without_a_name_is_refused_with_the_form_to_use(folders, no_model_load, capsys):
    assert main(["serve", "--adapter", str(folders.a), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert f'--adapter {folders.a}: give it the name clients will put in "model"' in err
    assert f"(e.g. --adapter a={folders.a})" in err and no_model_load == []
    # "default" given as a name is a name like any other
    assert main(["serve", "--adapter", f"default={folders.a}", "--max-tokens", "0"]) == 2
    assert "--max-tokens must be at least 1" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("", False),
        ("192.168.1.5", False),
        ("example.org", False),
    ],
)
def test_loopback_hosts(host, loopback):
    assert is_loopback(host) is loopback


def test_listening_beyond_loopback_needs_a_key_or_a_flag(no_model_load, capsys):
    assert main(["serve", "--host", "0.0.0.0", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "--host 0.0.0.0 listens beyond this machine, and there is no API key" in err
    assert "--api-key or LORAKIT_API_KEY" in err and "--allow-no-api-key" in err
    assert no_model_load == []
    check_exposure("0.0.0.0", "a-key", allow_no_api_key=False)  # a key: allowed
    check_exposure("0.0.0.0", None, allow_no_api_key=True)  # said so: allowed


@pytest.mark.parametrize("key", ["", "two words", "clé", "tab\there"])
def test_a_key_an_http_header_cannot_carry_is_refused(key):
    with pytest.raises(LoraError, match="must be printable ASCII without spaces"):
        check_exposure("127.0.0.1", key, allow_no_api_key=False)


def test_the_key_comes_from_the_flag_or_else_the_environment(monkeypatch):
    seen = []
    monkeypatch.setattr(lorakit.serve.server, "run_server", lambda options: seen.append(options))
    monkeypatch.setenv("LORAKIT_API_KEY", "from-env")
    main(["serve", "--port", "0"])
    main(["serve", "--port", "0", "--api-key", "from-flag"])
    monkeypatch.delenv("LORAKIT_API_KEY")
    main(["serve", "--port", "0"])
    assert [o.api_key for o in seen] == ["from-env", "from-flag", None]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"adapter_roots": ["ROOT"]}, "--adapter-root limits the folders"),
        ({"adapter_roots": ["/nonexistent"], "allow_adapter_updates": True}, "not a folder"),
        ({"max_request_bytes": 10}, "--max-request-bytes must be at least 1024"),
        ({"host": "0.0.0.0"}, "there is no API key"),
    ],
)
def test_bad_options_are_refused_before_anything_is_bound(tmp_path, changes, message):
    changes = {k: [str(tmp_path)] if v == ["ROOT"] else v for k, v in changes.items()}
    with pytest.raises(LoraError, match=message):
        check_options(ServeOptions(**changes))


def test_adapter_roots_are_resolved_once(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    options = ServeOptions(adapter_roots=[str(tmp_path / "link")], allow_adapter_updates=True)
    assert check_options(options) == ((tmp_path / "real").resolve(),)

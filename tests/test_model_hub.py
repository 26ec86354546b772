"""load_model (and `hermes-bot prompt --model`'s tokenizer) for a Hugging Face id when the hub cannot be reached: a
cached model loads at once, a missing one is one clear line; with a hub that answers, downloads and revision updates
are as before.

Real parts: a huggingface_hub cache in tmp_path, a closed port, a listener that accepts and never answers (a
network that drops replies), and a small HTTP hub that serves the tiny model as the hub's API does. Without the
probe in `bot.engine.hub`, huggingface_hub retried each file for 48 s (refused) to minutes (silent) first.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import shutil
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar, cast

import pytest
import torch

from bot.config import Settings
from bot.engine import hub
from bot.engine.base import EngineError
from bot.engine.transformers_engine import load_model
from tests.services import free_port

REPO = "org/tiny-hermes"
OLD, NEW = "a" * 40, "b" * 40  # commits
T = TypeVar("T")


@pytest.fixture
def hf_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """huggingface_hub's home and cache in tmp_path, online mode. The library reads HF_HOME, HF_HUB_CACHE,
    HF_ENDPOINT and HF_HUB_OFFLINE once, when it is imported: its constants are what counts."""
    import huggingface_hub.constants
    import transformers.utils.hub

    home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HOME", str(home))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(transformers.utils.hub, "_hf_api", None)  # made with the endpoint of its first use
    return home


def use_endpoint(monkeypatch: pytest.MonkeyPatch, url: str) -> str:
    """HF_ENDPOINT=url, as huggingface_hub derives it at import."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", url)
    monkeypatch.setattr(huggingface_hub.constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        url + "/{repo_id}/resolve/{revision}/{filename}")
    return url


def cache_model(home: Path, model_dir: Path, commit: str = OLD) -> Path:
    """`model_dir` as huggingface_hub caches REPO: hub/models--org--name/snapshots/<commit>/..., refs/main."""
    repo = home / "hub" / f"models--{REPO.replace('/', '--')}"
    shutil.copytree(model_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return repo


class SilentHub:
    """A TCP listener that accepts connections and never answers them. `retried` is set on the second one:
    whoever connects again after the probe is the library retrying instead of using the cache."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.connections: list[socket.socket] = []
        self.retried = threading.Event()
        threading.Thread(target=self._accept, name="silent-hub", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:  # closed
                return
            self.connections.append(conn)
            if len(self.connections) > 1:
                self.retried.set()

    def close(self) -> None:
        self.sock.close()
        for conn in self.connections:
            conn.close()


@pytest.fixture(params=["closed-port", "silent"])
def unreachable(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[SilentHub | None]:
    """The hub endpoint at a closed port (None), or at a SilentHub; the probe gives a silent one 1 s."""
    if request.param == "closed-port":
        use_endpoint(monkeypatch, f"http://127.0.0.1:{free_port()}")
        yield None
        return
    monkeypatch.setattr(hub, "HUB_PROBE_TIMEOUT", 1.0)
    silent = SilentHub()
    use_endpoint(monkeypatch, silent.url)
    try:
        yield silent
    finally:
        silent.close()


HANG_GUARD = 120.0  # seconds; only a regression gets near it (huggingface_hub's model_info has no timeout)


def watched(call: Callable[[], T], silent: SilentHub | None) -> T:
    """call(); with a silent hub, on a thread, failing as soon as the hub sees a second connection (the
    library asking it, which takes minutes) or the call is still at it after HANG_GUARD (a request without a
    timeout: huggingface_hub waited forever in `model_info` against such a hub), rather than hanging."""
    if silent is None:
        return call()
    outcome: list[Any] = []
    done = threading.Event()

    def run() -> None:
        try:
            outcome.append(call())
        except BaseException as exc:
            outcome.append(exc)
        finally:
            done.set()

    threading.Thread(target=run, name="watched-load", daemon=True).start()
    waited = 0.0
    while not done.wait(0.05):
        waited += 0.05
        assert not silent.retried.is_set(), "the load asked the silent hub again instead of using the cache"
        assert waited < HANG_GUARD, "the load still waits for the silent hub"
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    assert len(silent.connections) == 1  # the probe, nothing after it
    return cast(T, outcome[0])


def load_watched(settings: Settings, silent: SilentHub | None) -> tuple[Any, Any]:
    tokenizer, model, _ = watched(lambda: load_model(settings), silent)
    return tokenizer, model


def hub_retries(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith("huggingface_hub") and "Retry" in r.getMessage()]


def test_a_cached_model_loads_from_the_cache_when_the_hub_cannot_be_reached(
    hf_home: Path, tiny_model_dir: Path, unreachable: SilentHub | None, caplog: pytest.LogCaptureFixture,
) -> None:
    import huggingface_hub.constants

    cache_model(hf_home, tiny_model_dir)
    tokenizer, model = load_watched(Settings(model=REPO, device="cpu"), unreachable)
    ids = tokenizer("Hello there", return_tensors="pt")
    assert tokenizer.decode(ids["input_ids"][0]) == "Hello there"
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == ids["input_ids"].shape[1] + 3
    endpoint = huggingface_hub.constants.ENDPOINT
    assert f"the hub at {endpoint} cannot be reached" in caplog.text
    assert f"HERMES_MODEL={REPO} loads from the local cache" in caplog.text
    assert not hub_retries(caplog)
    assert huggingface_hub.constants.HF_HUB_OFFLINE is False  # offline for the load only


def test_a_model_not_in_the_cache_is_one_clear_line_when_the_hub_cannot_be_reached(
    hf_home: Path, unreachable: SilentHub | None, caplog: pytest.LogCaptureFixture,
) -> None:
    import huggingface_hub.constants

    endpoint = huggingface_hub.constants.ENDPOINT
    with pytest.raises(EngineError) as raised:
        load_watched(Settings(model=REPO, device="cpu"), unreachable)
    message = str(raised.value)
    why = "no answer in 1 s" if unreachable is not None else "Connection refused"
    assert message.startswith(
        f"cannot load HERMES_MODEL='{REPO}': it is not in the local Hugging Face cache ({hf_home / 'hub'}) "
        f"and the hub at {endpoint} cannot be reached ("
    ), message
    assert why in message
    assert message.endswith("; set HERMES_MODEL to a local model folder, or run once with the hub reachable to "
                            "download it (then HF_HUB_OFFLINE=1 starts without asking the hub)")
    assert "\n" not in message
    assert not hub_retries(caplog)
    if unreachable is not None:
        assert len(unreachable.connections) == 1


def test_hf_hub_offline_loads_from_the_cache_without_asking_the_hub(
    hf_home: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    """The user's HF_HUB_OFFLINE=1: not even the probe; a model that is not cached says so in one line."""
    import huggingface_hub.constants

    silent = SilentHub()
    try:
        use_endpoint(monkeypatch, silent.url)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        with pytest.raises(EngineError) as raised:
            load_model(Settings(model=REPO, device="cpu"))
        assert str(raised.value) == (
            f"cannot load HERMES_MODEL='{REPO}': it is not in the local Hugging Face cache ({hf_home / 'hub'}) and "
            "HF_HUB_OFFLINE is set; set HERMES_MODEL to a local model folder, or unset HF_HUB_OFFLINE and run once "
            "with the hub reachable to download it"
        )
        cache_model(hf_home, tiny_model_dir)
        tokenizer, model, _ = load_model(Settings(model=REPO, device="cpu"))
        assert model.config.vocab_size == len(tokenizer)
        assert silent.connections == []
        assert "cannot be reached" not in caplog.text  # the user chose offline: nothing to warn about
        assert huggingface_hub.constants.HF_HUB_OFFLINE is True
    finally:
        silent.close()


class FakeHub(BaseHTTPRequestHandler):
    """The part of the hub's HTTP API that transformers uses to download a model: files under
    /{repo}/resolve/{revision}/ (with the commit in X-Repo-Commit), the repo's file tree, 404 otherwise."""

    files: Path
    commit: str
    requests: list[str]

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (the base class's name)
        pass

    def do_HEAD(self) -> None:  # noqa: N802 (http.server's names)
        self.do_GET()

    def do_GET(self) -> None:  # noqa: N802
        self.requests.append(f"{self.command} {self.path}")
        resolve = f"/{REPO}/resolve/"
        if self.path == "/":
            self._send(200)
        elif self.path.startswith(resolve):
            file = self.files / self.path.removeprefix(resolve).partition("/")[2]
            if file.is_file():
                data = file.read_bytes()
                self._send(200, data, {"X-Repo-Commit": self.commit, "ETag": f'"{hashlib.sha256(data).hexdigest()}"'})
            else:
                self._send(404, headers={"X-Error-Code": "EntryNotFound", "X-Repo-Commit": self.commit})
        elif self.path.startswith(f"/api/models/{REPO}/tree/main?"):
            tree = [{"type": "file", "path": f.name, "size": f.stat().st_size, "oid": "0" * 40}
                    for f in self.files.iterdir()]
            self._send(200, json.dumps(tree).encode(), {"Content-Type": "application/json"})
        else:
            self._send(404, headers={"X-Error-Code": "EntryNotFound"})

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


def test_a_hub_that_answers_still_updates_a_cached_model_to_its_newer_revision(
    hf_home: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    """Online is as before the probe: the cache holds OLD, the hub serves NEW, so NEW is downloaded and used."""
    repo = cache_model(hf_home, tiny_model_dir, OLD)
    handler = type("Hub", (FakeHub,), {"files": tiny_model_dir, "commit": NEW, "requests": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, name="fake-hub", daemon=True).start()
    try:
        use_endpoint(monkeypatch, f"http://127.0.0.1:{server.server_address[1]}")
        tokenizer, model, _ = load_model(Settings(model=REPO, device="cpu"))
    finally:
        server.shutdown()
        server.server_close()
    assert model.config.vocab_size == len(tokenizer)
    assert (repo / "refs" / "main").read_text() == NEW
    assert (repo / "snapshots" / NEW / "model.safetensors").is_file()
    assert f"GET /{REPO}/resolve/main/model.safetensors" in handler.requests
    assert "cannot be reached" not in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("huggingface_hub")]


@pytest.mark.parametrize("cached", [True, False], ids=["cached", "not-cached"])
def test_the_prompt_command_reads_a_hub_ids_tokenizer_from_the_cache_when_the_hub_cannot_be_reached(
    hf_home: Path, tiny_model_dir: Path, unreachable: SilentHub | None, cached: bool,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture,
) -> None:
    """`hermes-bot prompt --model <hub id>` loaded its tokenizer as transformers does, asking the hub first: 48 s
    of retries against a refused port, for good against a silent one. Now the engine's guard: the cache alone."""
    from bot.cli import main

    monkeypatch.chdir(hf_home.parent)  # no .env or hermes.yaml; the bundled personas
    monkeypatch.setattr(sys, "stdin", io.StringIO(json.dumps([{"author": "Ann", "content": "Hello there"}])))
    if cached:
        cache_model(hf_home, tiny_model_dir)
    status = watched(lambda: main(["prompt", "--persona", "hermes", "--model", REPO]), unreachable)
    out, err = capsys.readouterr()
    assert not hub_retries(caplog)
    if cached:
        assert status == 0, err
        assert out.startswith("<|im_start|>system\n") and "<|im_start|>user\nHello there<|im_end|>" in out
        assert f"--model={REPO} loads from the local cache" in caplog.text
    else:
        assert status == 1
        assert err.startswith(f"hermes-bot: cannot load --model='{REPO}': it is not in the local Hugging Face cache")
        assert err.endswith("; set --model to a local model folder, or run once with the hub reachable to download "
                            "it (then HF_HUB_OFFLINE=1 starts without asking the hub)\n")
        assert err.count("\n") == 1


class AnswersWith(BaseHTTPRequestHandler):
    """Answers every request with `status` and no body, as a proxy does that wants credentials (407) or that
    cannot reach the hub (502, 503, 504)."""

    status: int
    requests: list[str]

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (the base class's name)
        pass

    def do_HEAD(self) -> None:  # noqa: N802 (http.server's names)
        self.requests.append(f"{self.command} {self.path}")
        self.send_response(self.status)
        if self.status == 407:
            self.send_header("Proxy-Authenticate", 'Basic realm="proxy"')
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_HEAD


@pytest.mark.parametrize(("status", "phrase"), [(503, "Service Unavailable"), (407, "Proxy Authentication Required")])
def test_a_407_or_a_5xx_answer_is_no_reachable_hub(
    hf_home: Path, tiny_model_dir: Path, status: int, phrase: str, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Such an answer counted as a hub that answers: transformers then asked it for each file, through
    huggingface_hub's retries (48 s and more), before it fell back to the cache."""
    handler = type("Answers", (AnswersWith,), {"status": status, "requests": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, name="answers-with", daemon=True).start()
    try:
        url = use_endpoint(monkeypatch, f"http://127.0.0.1:{server.server_address[1]}")
        assert hub.hub_unreachable(url, 2.0) == f"it answered {status} {phrase}"
        cache_model(hf_home, tiny_model_dir)
        tokenizer, model, _ = load_model(Settings(model=REPO, device="cpu"))
    finally:
        server.shutdown()
        server.server_close()
    assert model.config.vocab_size == len(tokenizer)
    assert f"the hub at {url} cannot be reached (it answered {status} {phrase})" in caplog.text
    assert handler.requests == ["HEAD /", "HEAD /"]  # the two probes, nothing after them
    assert not hub_retries(caplog)


@pytest.mark.parametrize("model", ["models/hermes/v2", "C:\\models\\hermes"])
def test_a_value_that_is_neither_a_folder_nor_a_hub_id_is_one_line(
    hf_home: Path, model: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A relative folder without ./ that does not exist, or a Windows path: huggingface_hub's HFValidationError
    traceback, from load_model and from `hermes-bot prompt`, both outside their handling of a failed load."""
    from bot.cli import main

    monkeypatch.chdir(hf_home.parent)
    with pytest.raises(EngineError) as raised:
        load_model(Settings(model=model, device="cpu"))
    assert str(raised.value) == (
        f"HERMES_MODEL={model} is neither an existing folder nor a valid Hugging Face id (owner/name); a local folder "
        "starts with /, ./, ../ or ~/"
    )
    monkeypatch.setattr(sys, "stdin", io.StringIO("[]"))
    assert main(["prompt", "--persona", "hermes", "--model", model]) == 1
    assert capsys.readouterr().err == f"hermes-bot: {str(raised.value).replace('HERMES_MODEL=', '--model=')}\n"

"""load_model for a Hugging Face id when the hub cannot be reached: a cached model loads at once, a missing one is
one clear line; with a hub that answers, downloads and revision updates are as before.

Real parts: a huggingface_hub cache in tmp_path, a closed port, a listener that accepts and never answers (a
network that drops replies), and a small HTTP hub that serves the tiny model as the hub's API does. Without the
probe in `bot.engine.hub`, huggingface_hub retried each file for 48 s (refused) to minutes (silent) first.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import torch

from bot.config import Settings
from bot.engine import hub
from bot.engine.base import EngineError
from bot.engine.transformers_engine import load_model
from tests.services import free_port

REPO = "org/tiny-hermes"
OLD, NEW = "a" * 40, "b" * 40  # commits


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


def load_watched(settings: Settings, silent: SilentHub | None) -> tuple[Any, Any]:
    """load_model; with a silent hub, on a thread, failing as soon as the hub sees a second connection (the
    library asking it, which takes minutes) or the load is still at it after HANG_GUARD (a request without a
    timeout: huggingface_hub waited forever in `model_info` against such a hub), rather than hanging."""
    if silent is None:
        tokenizer, model, _ = load_model(settings)
        return tokenizer, model
    outcome: list[Any] = []
    done = threading.Event()

    def run() -> None:
        try:
            outcome.append(load_model(settings))
        except BaseException as exc:
            outcome.append(exc)
        finally:
            done.set()

    threading.Thread(target=run, name="load-model", daemon=True).start()
    waited = 0.0
    while not done.wait(0.05):
        waited += 0.05
        assert not silent.retried.is_set(), "load_model asked the silent hub again instead of using the cache"
        assert waited < HANG_GUARD, "load_model still waits for the silent hub"
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    assert len(silent.connections) == 1  # the probe, nothing after it
    tokenizer, model, _ = outcome[0]
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

"""Shared fixtures: the reference data in tests/reference and the tiny models as local repos."""

import json
import logging
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file

from live_server import LiveServer, ServerFailed, free_port  # noqa: F401 - the one way to start a server (benchmarks/)

ROOT = Path(__file__).resolve().parents[1]
REF = ROOT / "tests" / "reference"


def ref_path(name: str) -> Path:
    return REF / name


def assert_close_to_reference(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-4) -> None:
    """The parity criterion: max |actual - expected| <= rel * max |expected|."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    err = (actual.float() - expected.float()).abs().max().item()
    scale = expected.float().abs().max().item()
    assert err <= rel * scale, f"max abs diff {err:.3g} > {rel} x {scale:.3g}"


@pytest.fixture(scope="session")
def tiny_echo_dir(tmp_path_factory) -> Path:
    """A local 'Hub repo' with the tiny EchoDiT, its config.json and the tiny PCA state."""
    repo = tmp_path_factory.mktemp("tiny-echo")
    shutil.copy(REF / "tiny_echo_dit.safetensors", repo / "pytorch_model.safetensors")
    shutil.copy(REF / "tiny_echo_dit_config.json", repo / "config.json")
    cases = load_file(REF / "tiny_fish_dac_cases.safetensors")
    save_file({k: cases[k].contiguous() for k in ("pca_components", "pca_mean", "latent_scale")},
              repo / "pca_state.safetensors")
    return repo


@pytest.fixture(scope="session")
def tiny_fish_dir(tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("tiny-fish")
    shutil.copy(REF / "tiny_fish_dac.safetensors", repo / "pytorch_model.safetensors")
    shutil.copy(REF / "tiny_fish_dac_config.json", repo / "config.json")
    return repo


@pytest.fixture(scope="session")
def tiny_model(tiny_echo_dir):
    from inference import load_model_from_hf
    return load_model_from_hf(str(tiny_echo_dir), device="cpu", dtype=torch.float32)


@pytest.fixture(scope="session")
def tiny_fish(tiny_fish_dir):
    from inference import load_fish_ae_from_hf
    return load_fish_ae_from_hf(str(tiny_fish_dir), device="cpu", dtype=torch.float32)


@pytest.fixture(scope="session")
def tiny_pca(tiny_echo_dir):
    from inference import load_pca_state_from_hf
    return load_pca_state_from_hf(str(tiny_echo_dir), device="cpu")


@pytest.fixture(scope="session")
def sampler_cases() -> tuple[dict, dict]:
    return load_file(REF / "tiny_sampler_cases.safetensors"), json.loads((REF / "tiny_sampler_cases.json").read_text())


@pytest.fixture(scope="session")
def synthetic_repos(tmp_path_factory) -> dict[str, Path]:
    """Full-size synthetic checkpoints in the published layout (about 7.5 GB on disk).

    Set ECHO_SYNTHETIC_DIR to keep them between runs; by default they live in pytest's temp dir.
    """
    import os

    from synthetic import write_synthetic_repos  # benchmarks/ (pytest.ini's pythonpath)

    out = Path(os.environ.get("ECHO_SYNTHETIC_DIR") or tmp_path_factory.mktemp("synthetic"))
    return write_synthetic_repos(out, REF)


# ---- a live server on a loopback port ------------------------------------------------------------


@contextmanager
def live_server(tmp_path_factory, name: str, env: dict[str, str], **kwargs) -> Iterator[LiveServer]:
    """A LiveServer for a fixture: configured by `env`, logging to a temp dir called `name`, stopped after."""
    live = LiveServer(env, tmp_path_factory.mktemp(name) / "server.log", **kwargs)
    try:
        yield live
    finally:
        live.stop()


@pytest.fixture(scope="session")
def voice_dir(tmp_path_factory) -> Path:
    """Voices: alice.wav (a file), duo/ (a folder of two clips), bob.flac."""
    import soundfile as sf

    cases = load_file(REF / "tiny_fish_dac_cases.safetensors")
    clip = cases["speaker_audio"][0].numpy()
    root = tmp_path_factory.mktemp("voices")
    sf.write(root / "alice.wav", clip, 44100)
    sf.write(root / "bob.flac", clip[::-1].copy(), 44100)
    (root / "duo").mkdir()
    sf.write(root / "duo" / "1.wav", clip[:44100], 44100)
    sf.write(root / "duo" / "2.wav", clip[44100:], 44100)
    (root / "notes.txt").write_text("not a voice")
    return root


def server_env(echo_dir: Path, fish_dir: Path, voice_dir: Path, **extra: str) -> dict[str, str]:
    return {"ECHO_MODEL_REPO": str(echo_dir), "ECHO_FISH_REPO": str(fish_dir), "ECHO_DEVICE": "cpu",
            "ECHO_MODEL_DTYPE": "float32", "ECHO_VOICE_DIRS": str(voice_dir), "ECHO_WARMUP": "0",
            "HF_HUB_OFFLINE": "1", **extra}


@pytest.fixture(scope="session")
def server(tiny_echo_dir, tiny_fish_dir, voice_dir, tmp_path_factory):
    with live_server(tmp_path_factory, "server", server_env(tiny_echo_dir, tiny_fish_dir, voice_dir)) as live:
        yield live


@pytest.fixture(scope="module")
def tiny_service(tiny_echo_dir, tiny_fish_dir, tmp_path_factory):
    """A loaded SpeechService with the tiny models on the CPU, in process (no voices, no warm-up, 2
    slots, 1 waiting)."""
    import service as svc
    from settings import load_settings

    settings = load_settings(model_repo=str(tiny_echo_dir), fish_repo=str(tiny_fish_dir), device="cpu",
                             model_dtype="float32", voice_dirs=[tmp_path_factory.mktemp("no-voices")], warmup=False,
                             max_active=2, max_queue=1)
    service = svc.SpeechService(settings)
    service.start_loading().join()
    assert service.load_error is None
    yield service
    service.close()


# ---- the app in process: create_app(settings) driven through an ASGI test client ----------------
#
# Most HTTP and WebSocket checks need neither a socket nor a process: they run against the app in
# this process (Starlette's TestClient, which streams response bodies as the app sends them and runs
# the lifespan that loads the models). A LiveServer stays where the socket or the process is the
# point: uvicorn's transport limits and timeouts, signals and shutdown, start-up failures, Ray, the
# browser, and real clients that connect to a URL.


@contextmanager
def environment(env: dict[str, str]) -> Iterator[None]:
    """os.environ with `env` added, restored after (settings are read from it as the server reads them)."""
    import os

    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def settings_from_env(env: dict[str, str]):
    """The Settings `python api_server.py` builds from its environment, with `env` added to ours."""
    from settings import load_settings

    with environment(env):
        return load_settings()


class _LogLines(logging.Handler):
    """The server's log lines, formatted as `python api_server.py` writes them (observability)."""

    def __init__(self, settings):
        from observability import server_log_handler

        super().__init__(logging.DEBUG if settings.debug_logs else logging.INFO)
        server_log_handler(self, settings.log_json)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))

    # the root logger's level while apps run: the lowest theirs need (as configure_logging sets it),
    # whatever order they stop in; its own level again once none runs
    attached: list["_LogLines"] = []
    level_before: int = logging.WARNING

    @classmethod
    def attach(cls, handler: "_LogLines") -> None:
        root = logging.getLogger()
        if not cls.attached:
            cls.level_before = root.level
        cls.attached.append(handler)
        root.addHandler(handler)
        root.setLevel(min(h.level for h in cls.attached))

    @classmethod
    def detach(cls, handler: "_LogLines") -> None:
        root = logging.getLogger()
        root.removeHandler(handler)
        if handler in cls.attached:
            cls.attached.remove(handler)
        root.setLevel(min(h.level for h in cls.attached) if cls.attached else cls.level_before)


class _ByPath:
    """Requests by HTTP method, for a class that defines `request(method, path, **kwargs)`."""

    def get(self, path: str, **kwargs):
        return self.request("GET", path, **kwargs)

    def post(self, path: str, **kwargs):
        return self.request("POST", path, **kwargs)

    def delete(self, path: str, **kwargs):
        return self.request("DELETE", path, **kwargs)

    def options(self, path: str, **kwargs):
        return self.request("OPTIONS", path, **kwargs)

    def head(self, path: str, **kwargs):
        return self.request("HEAD", path, **kwargs)


class AppServer(_ByPath):
    """create_app(settings) in this process, its lifespan run and its models loaded, with the
    surface tests use of a LiveServer: requests by path (`get`, `post`, `stream`, ...: a TestClient's,
    which ignores timeouts), `websocket(path)`, `log()` (what this process logged meanwhile, which
    includes other in-process servers' lines while they run), `run(async_fn)` on the app's event loop
    and `async_client()` for concurrent requests there."""

    url = "http://testserver"

    def __init__(self, env: dict[str, str], ready_timeout: float = 180, wait_ready: bool = True):
        from fastapi.testclient import TestClient

        import api_server

        self.settings = settings_from_env(env)
        self.app = api_server.create_app(self.settings)
        self._log = _LogLines(self.settings)
        _LogLines.attach(self._log)
        # as the live server answers: an exception in the app is a 500, not an exception in the test
        self.client = TestClient(self.app, base_url=self.url, raise_server_exceptions=False)
        self.client.__enter__()  # the lifespan: the models start loading in the background
        if wait_ready:
            try:
                self.wait(ready_timeout)
            except BaseException:
                self.stop()
                raise

    def wait(self, timeout: float) -> None:
        """Poll /health until the app reports ready (as LiveServer.wait)."""
        import time

        deadline = time.monotonic() + timeout
        while not self.client.get("/health").json()["ready"]:
            if self.app.state.service.load_error is not None or time.monotonic() > deadline:
                raise ServerFailed(f"app not ready: {self.app.state.service.unready_reason()}\n{self.log()}")
            time.sleep(0.1)

    def load_failure(self, timeout: float = 10):
        """/ready's answer once it says that loading the models failed (as LiveServer.load_failure)."""
        import time

        deadline = time.monotonic() + timeout
        while True:
            response = self.client.get("/ready")
            if "failed" in response.text or time.monotonic() > deadline:
                return response
            time.sleep(0.1)

    def request(self, method: str, path: str, timeout=None, **kwargs):
        return self.client.request(method, path, **kwargs)

    def stream(self, method: str, path: str, timeout=None, **kwargs):
        return self.client.stream(method, path, **kwargs)

    def websocket(self, path: str, additional_headers: dict | None = None) -> "AppSocket":
        return AppSocket(self.client, path, additional_headers or {})

    def run(self, async_fn):
        """Await `async_fn()` on the app's event loop (where its lifespan started the service)."""
        return self.client.portal.call(async_fn)

    def async_client(self, **kwargs) -> httpx.AsyncClient:
        """An httpx.AsyncClient on the app (for `run`: bodies arrive whole, concurrency is real)."""
        kwargs.pop("timeout", None)
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url=self.url, **kwargs)

    def log(self) -> str:
        return "\n".join(self._log.lines)

    def stop(self) -> None:
        try:
            self.client.__exit__(None, None, None)
        finally:
            _LogLines.detach(self._log)


class AppSocket:
    """A WebSocket to an AppServer with the calls tests make on a `websockets` sync client: `send`,
    `recv(timeout)` (text or bytes; ConnectionClosed once the server closed), `close_code`; a refused
    handshake raises websockets' InvalidStatus with the HTTP answer, as the real client does."""

    def __init__(self, client, path: str, headers: dict):
        from starlette.testclient import WebSocketDenialResponse
        from websockets.datastructures import Headers
        from websockets.exceptions import InvalidStatus
        from websockets.http11 import Response

        self.close_code: int | None = None
        try:
            self.session = client.websocket_connect(path, headers=headers).__enter__()
        except WebSocketDenialResponse as refused:
            raise InvalidStatus(Response(refused.status_code, refused.reason_phrase,
                                         Headers(refused.headers.multi_items()), refused.content)) from None

    def __enter__(self) -> "AppSocket":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.session is not None:
            session, self.session = self.session, None
            session.__exit__(None, None, None)

    def send(self, message: str | bytes) -> None:
        if isinstance(message, str):
            self.session.send_text(message)
        else:
            self.session.send_bytes(message)

    def recv(self, timeout: float | None = None) -> str | bytes:
        import anyio
        from websockets.exceptions import ConnectionClosedOK
        from websockets.frames import Close

        if self.close_code is not None:
            raise ConnectionClosedOK(Close(self.close_code, ""), None)

        async def receive():
            with anyio.fail_after(timeout):
                return await self.session._send_rx.receive()

        message = self.session.portal.call(receive)
        if message["type"] == "websocket.close":
            self.close_code = message.get("code", 1000)
            raise ConnectionClosedOK(Close(self.close_code, message.get("reason") or ""), None)
        return message["text"] if message.get("text") is not None else message["bytes"]


class LiveRequests(_ByPath):
    """A LiveServer's requests by path, as an AppServer takes them (httpx's functions: a connection each)."""

    def __init__(self, url: str):
        self.url = url

    def request(self, method: str, path: str, **kwargs):
        import httpx

        return httpx.request(method, self.url + path, **kwargs)

    def stream(self, method: str, path: str, **kwargs):
        import httpx

        return httpx.stream(method, self.url + path, **kwargs)


def idle(service, timeout: float = 10.0) -> bool:
    """Whether the worker lets go of every job (active, parked and waiting) within `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if service.runtime.worker.pending == 0:
            return True
        time.sleep(0.02)
    return False


def requests_to(server: "AppServer | LiveServer") -> "AppServer | LiveRequests":
    """Requests by path to a server of either kind (helpers that tests of both kinds share)."""
    return server if isinstance(server, AppServer) else LiveRequests(server.url)


@contextmanager
def app_server(env: dict[str, str], **kwargs) -> Iterator[AppServer]:
    """An AppServer for a fixture: configured by `env` (as live_server is), stopped after."""
    app = AppServer(env, **kwargs)
    try:
        yield app
    finally:
        app.stop()


def tmpfs(directory: Path, options: str) -> Iterator[Path]:
    """A tmpfs mounted on `directory` (made here) with mount `options`, unmounted after; skips the test
    where mounting needs a root this process is not."""
    import subprocess

    directory.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(directory)],
                      capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root")
    try:
        yield directory
    finally:
        subprocess.run(["umount", "-l", str(directory)], check=False)


@pytest.fixture
def tiny_disk(tmp_path):
    """A 400 KiB tmpfs: room for a small voice or two, not for more."""
    yield from tmpfs(tmp_path / "disk", "size=400k")


@pytest.fixture
def read_only_disk(tmp_path):
    """A read-only file system (as a container's with readOnlyRootFilesystem): even root cannot write it."""
    yield from tmpfs(tmp_path / "read-only", "ro,size=64k")


@pytest.fixture(scope="session")
def app(tiny_echo_dir, tiny_fish_dir, voice_dir):
    """The `server` fixture's configuration, in process."""
    with app_server(server_env(tiny_echo_dir, tiny_fish_dir, voice_dir)) as app:
        yield app

"""The one way tests and benchmarks start a server: `python api_server.py` (or another entry point
such as deploy/ray_serve.py) in a subprocess on a loopback port, configured through the environment
as a user would, polled until ready (never through a proxy: the polls ignore *_PROXY); and the WAV
writer for the voices they give it."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import time
import wave
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
LOOPBACK = "127.0.0.1"
LOAD_FAILURE_GRACE = 15.0  # seconds a server whose models failed to load has to exit on its own


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def wav_bytes(audio: np.ndarray, rate: int) -> bytes:
    """`audio` (floats, clipped to [-1, 1]) as a mono 16-bit WAV file: how benchmarks write the voices
    they give a server (a file in ECHO_VOICE_DIRS, or an inline data: URL)."""
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes())
    return buffer.getvalue()


class ServerFailed(RuntimeError):
    """The server exited, or did not come up in time, during start-up; the message holds its log."""


class LiveServer:
    """A server process. `wait_ready=False` returns once /health answers (models may still load)."""

    def __init__(self, env: dict[str, str], log_path: Path, ready_timeout: float = 180, wait_ready: bool = True,
                 cwd: Path = ROOT, port: int | None = None, script: Path = ROOT / "api_server.py"):
        self.port = port or free_port()
        self.url = f"http://{LOOPBACK}:{self.port}"
        self.log_path = log_path
        full_env = {**os.environ, "ECHO_HOST": LOOPBACK, "PORT": str(self.port), "PYTHONUNBUFFERED": "1", **env}
        self._log = open(log_path, "wb")
        self._scanned = 0  # bytes of the log _load_failure_line has read past
        self.started = time.monotonic()
        self.process = subprocess.Popen([sys.executable, str(script)], cwd=cwd, env=full_env,
                                        stdout=self._log, stderr=subprocess.STDOUT)
        self.wait(ready_timeout, "ready" if wait_ready else "up")

    def wait(self, timeout: float, until: str = "ready") -> None:
        """Poll /health until the process answers ("up") or reports ready ("ready"). A server whose
        models failed to load idles with /ready at 503: waiting for "ready" ends when its log says so."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self._log.close()
                raise ServerFailed(f"server exited with {self.process.returncode}:\n{self.log()}")
            if until == "ready" and (failure := self._load_failure_line()):
                try:  # (an entry point that exits on it, as deploy/ray_serve.py does, says so with its status)
                    code = self.process.wait(timeout=LOAD_FAILURE_GRACE)
                except subprocess.TimeoutExpired:
                    self.stop()
                    raise ServerFailed(f"{failure}\n{self.log()}") from None
                self._log.close()
                raise ServerFailed(f"server exited with {code}:\n{self.log()}")
            try:  # a proxy (Ray Serve's) may answer before the app is there: only the app's 200 is "up"
                response = httpx.get(self.url + "/health", timeout=2, trust_env=False)
                health = response.json() if response.status_code == 200 else None
            except (httpx.TransportError, ValueError):
                health = None
            if health is not None and (until == "up" or health["ready"]):
                return
            time.sleep(0.2)
        self.stop()
        raise ServerFailed(f"server not {until} after {timeout} s:\n{self.log()}")

    def _load_failure_line(self) -> str | None:
        """The server log's "loading the models failed" line, once there is one: how a load failure is
        recognised (/ready would need the key on a keyed server). Each call reads on from the last whole
        line before it, so once found the line is found again."""
        with open(self.log_path, "rb") as log:
            log.seek(self._scanned)
            for line in log:
                if not line.endswith(b"\n"):
                    break  # (being written: read again at the next poll)
                if b"loading the models failed" in line:
                    return line.decode(errors="replace").strip()
                self._scanned += len(line)
        return None

    def load_failure(self, timeout: float = 10) -> httpx.Response:
        """/ready's answer once the log says that loading the models failed, or `timeout` passed
        (a process that exited meanwhile has no answer: httpx's ConnectError)."""
        deadline = time.monotonic() + timeout
        while self.process.poll() is None and not self._load_failure_line() and time.monotonic() < deadline:
            time.sleep(0.1)
        return httpx.get(self.url + "/ready", trust_env=False)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 20) -> int | None:
        """SIGTERM, then SIGKILL after `timeout` s; returns the exit status (None if it had to be killed)."""
        self.process.terminate()
        try:
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            code = None
        self._log.close()
        return code

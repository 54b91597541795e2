"""Limits, request ids, metrics, CORS, time limits, cancellation, injected failures and shutdown: the app in
process (conftest.AppServer), the server process where a client's timeout or a signal is the test."""

import asyncio
import base64
import signal
import time

import httpx
import numpy as np
import pytest
import torch

from conftest import AppServer, LiveServer, app_server, requests_to, server_env

pytestmark = pytest.mark.slow
SMALL = {"block_sizes": [8, 8], "num_steps": [2, 2]}
LONG = {"block_sizes": [4] + [20] * 30, "num_steps": [1] + [13] * 30}  # seconds here, within the step limit


@pytest.fixture(scope="module")
def hardened(tiny_echo_dir, tiny_fish_dir, voice_dir):
    env = server_env(tiny_echo_dir, tiny_fish_dir, voice_dir, ECHO_MAX_BODY_BYTES="65536",
                     ECHO_MAX_VOICE_BYTES="16384", ECHO_MAX_VOICE_SECONDS="0.5", ECHO_MAX_CHUNKS="2", ECHO_CORS_ORIGINS="https://app.example",
                     ECHO_LOG_JSON="1")
    with app_server(env) as app:
        yield app


def post(server, timeout=60, **body):
    return requests_to(server).post("/v1/audio/speech", json={"input": "Hello.", "voice": "alice", **SMALL, **body},
                      timeout=timeout)


# ---- limits -------------------------------------------------------------------------------------


def test_oversized_body_is_413_by_length_and_while_streaming_in(hardened):
    big = b'{"input": "' + b"a" * 70000 + b'", "voice": "none"}'
    r = hardened.post("/v1/audio/speech", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunks():  # no Content-Length: counted as it arrives
        for _ in range(20):
            yield b" " * 8192

    r = hardened.post("/v1/audio/speech", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_inline_voice_over_the_configured_size_is_400(hardened, voice_dir):
    clip = base64.b64encode((voice_dir / "alice.wav").read_bytes()).decode()[:40000]  # 30 kB > 16 kB limit
    r = hardened.post("/v1/audio/speech", json={"input": "Hi.", "voice": clip, **SMALL}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "voice"


def test_inline_voice_over_the_configured_duration_is_400(hardened):
    import io

    import soundfile as sf

    for seconds, status in ((0.4, 200), (0.7, 400)):
        buf = io.BytesIO()
        sf.write(buf, np.sin(np.arange(int(8000 * seconds)) / 5).astype("float32"), 8000, format="FLAC")
        voice = base64.b64encode(buf.getvalue()).decode()
        assert len(voice) > 256  # long enough to be taken for inline audio
        r = hardened.post("/v1/audio/speech", json={"input": "Hi.", "voice": voice, **SMALL}, timeout=60)
        assert r.status_code == status, r.text
        if status == 400:
            assert r.json()["error"]["param"] == "voice" and "ECHO_MAX_VOICE_SECONDS" in r.text


def test_too_many_chunks_is_400(hardened):
    text = " ".join(f"This is sentence number {i} of a long story." for i in range(30))
    r = post(hardened, input=text, chunk_target_seconds=3, chunk_min_seconds=2, chunk_max_seconds=4)
    assert r.status_code == 400 and r.json()["error"]["param"] == "input" and "ECHO_MAX_CHUNKS" in r.text


# ---- operability --------------------------------------------------------------------------------


def test_request_ids_in_headers_and_logs(hardened):
    r = hardened.get("/v1/voices", headers={"X-Request-ID": "client-id-123"})
    assert r.headers["x-request-id"] == "client-id-123"
    r = hardened.get("/v1/voices", headers={"X-Request-ID": "bad id with spaces"})
    assert r.headers["x-request-id"] != "bad id with spaces" and len(r.headers["x-request-id"]) == 32
    r = post(hardened, voice="nobody")
    assert r.status_code == 400 and r.headers["x-request-id"]
    with hardened.stream("POST", "/v1/audio/speech", headers={"X-Request-ID": "slow-one"},
                      json={"input": "Hi.", "voice": "alice", **LONG}, timeout=60) as r:
        next(r.iter_raw())  # then hang up: the worker logs the cancellation under this request's id
    def cancellation_lines():
        return [line for line in hardened.log().splitlines() if "cancelled" in line and "slow-one" in line]

    deadline = time.monotonic() + 60
    while not cancellation_lines() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert '"request_id": "slow-one"' in cancellation_lines()[0]  # JSON logs (ECHO_LOG_JSON=1)


def test_metrics(hardened):
    assert post(hardened).status_code == 200
    text = hardened.get("/metrics").text
    assert 'echo_requests_total{route="/v1/audio/speech",status="200"}' in text
    assert "echo_time_to_first_byte_seconds_count" in text and "echo_real_time_factor_bucket" in text
    idle = ("echo_queue_length 0.0", "echo_active_streams 0.0", "echo_preparing_requests 0.0")
    deadline = time.monotonic() + 10  # (the worker counts a job out after its last audio; on a busy machine
    while not all(line in text for line in idle):  # the earlier test's cancelled job may still be ending)
        assert time.monotonic() < deadline, text
        time.sleep(0.05)
        text = hardened.get("/metrics").text


def test_cors_only_for_configured_origins(hardened, app):
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    r = hardened.options("/v1/audio/speech", headers=preflight)
    assert r.headers["access-control-allow-origin"] == "https://app.example"
    r = hardened.options("/v1/audio/speech", headers={**preflight, "Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in r.headers
    r = app.get("/v1/voices", headers={"Origin": "https://app.example"})
    assert "access-control-allow-origin" not in r.headers  # off by default


def test_a_browser_on_an_allowed_origin_can_read_every_answer_and_its_headers(hardened):
    """The playground on another origin reads X-Echo-Voice (which was not exposed), and the 413 for
    an oversized body (answered outside CORS, so the browser saw only a network error)."""
    origin = {"Origin": "https://app.example"}
    r = hardened.post("/v1/audio/speech", json={"input": "Hello.", "voice": "alice", **SMALL}, headers=origin)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
    assert "X-Echo-Voice" in r.headers["access-control-expose-headers"].split(", ")
    r = hardened.post("/v1/audio/speech", content=b"x" * 70000, headers={**origin, "content-type": "application/json"})
    assert r.status_code == 413 and r.headers["access-control-allow-origin"] == "https://app.example"


# ---- time limits and cancellation ---------------------------------------------------------------


def test_the_time_limit_counts_the_preparation_of_a_new_voice(tiny_echo_dir, tiny_fish_dir, voice_dir):
    """ECHO_REQUEST_TIMEOUT runs from the queue slot taken, but its clock started only when the job
    was handed to the generator: a request whose new voice took 10 s to prepare got 200 under a 2 s
    limit."""
    import base64
    import io

    import numpy as np
    import soundfile as sf

    rate = 16000
    t = np.arange(60 * rate) / rate  # 60 s of a new inline voice: seconds to prepare here
    clip = io.BytesIO()
    sf.write(clip, (0.3 * np.sin(2 * np.pi * 180 * t)).astype(np.float32), rate, format="FLAC")
    live = AppServer(server_env(tiny_echo_dir, tiny_fish_dir, voice_dir, ECHO_REQUEST_TIMEOUT="1"))
    try:
        body = {"input": "Hi.", "voice": base64.b64encode(clip.getvalue()).decode(), **SMALL}
        r = live.post("/v1/audio/speech", json=body, timeout=60)
        assert r.status_code == 504 and "preparing its voice" in r.json()["error"]["message"]
        assert live.post("/v1/audio/speech", json={**body, "voice": "none"}, timeout=60).status_code == 200
    finally:
        live.stop()


def test_generation_time_limit(tiny_echo_dir, tiny_fish_dir, voice_dir):
    live = AppServer(server_env(tiny_echo_dir, tiny_fish_dir, voice_dir, ECHO_REQUEST_TIMEOUT="2",  # (alice
                                ECHO_WARMUP="1", ECHO_WARMUP_VOICE="alice", ECHO_PERFORMANCE_PRESET="low",  # prepared
                                ECHO_NUM_STEPS_NONSTREAM="1"))  # by the warm-up: the limit counts a voice's preparation
    try:
        body = {"input": "Hi.", "voice": "alice", **LONG}
        r = live.post("/v1/audio/speech", json={**body, "stream": False}, timeout=60)
        assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
        r = live.post("/v1/audio/speech", json=body, timeout=60)
        assert r.status_code == 200 and 0 < len(r.content) < (4 + 600) * 2048 * 2  # stream ended at the limit
        assert "over its time limit" in live.log()
        assert live.get("/health").status_code == 200
    finally:
        live.stop()


def test_non_streaming_client_disconnect_stops_generation(server):
    # the live server: the client's timeout closes a real connection while the app awaits its audio. Its
    # voice is encoded first: a client that leaves while its voice is prepared (slow on a busy machine)
    # leaves no generation to cancel
    assert httpx.post(server.url + "/v1/audio/speech", json={"input": "Hi.", "voice": "alice", **SMALL},
                      timeout=60).status_code == 200
    before = server.log().count("generation cancelled")
    with pytest.raises(httpx.TimeoutException):
        httpx.post(server.url + "/v1/audio/speech", json={"input": "Hi.", "voice": "alice", **LONG, "stream": False},
                   timeout=1.5)
    deadline = time.monotonic() + 30
    while server.log().count("generation cancelled") == before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.log().count("generation cancelled") > before
    assert httpx.get(server.url + "/health").status_code == 200
    assert "Exception in ASGI application" not in server.log()  # a routine disconnect, not a crash
    assert "client disconnected before its audio was ready" in server.log()


# ---- injected failures (an in-process server, so the engine can be sabotaged) ---------------------


@pytest.fixture(scope="module")
def sabotaged(tiny_echo_dir, tiny_fish_dir, voice_dir):
    with app_server(server_env(tiny_echo_dir, tiny_fish_dir, voice_dir)) as app:
        yield app


def sabotage(monkeypatch, live, error, after_calls):
    """Make the model raise `error` on its (after_calls + 1)-th call, once."""
    model = live.app.state.service.engine.model
    real = model.velocity
    calls = {"n": 0}

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == after_calls + 1:
            raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(model, "velocity", failing)


def test_failure_before_streaming_is_a_500_and_the_next_request_succeeds(sabotaged, monkeypatch):
    sabotage(monkeypatch, sabotaged, RuntimeError("injected failure"), after_calls=0)
    r = post(sabotaged)
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    assert r.json()["error"]["code"] == "generation_failed"
    r = post(sabotaged)
    assert r.status_code == 200 and len(r.content) == 16 * 2048 * 2


def test_a_request_the_gpu_has_no_memory_for_is_a_503_to_retry_and_counted(sabotaged, monkeypatch):
    """Out of device memory is the server's load, not a bug: 503 with Retry-After (the OpenAI SDKs
    retry it), a message without the allocator's report, and a count in /metrics."""
    def failures() -> float:
        return next(float(line.split()[1]) for line in sabotaged.get("/metrics").text.splitlines()
                    if line.startswith("echo_out_of_memory_failures "))

    before = failures()
    sabotage(monkeypatch, sabotaged, torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
             after_calls=0)
    r = post(sabotaged)
    assert r.status_code == 503 and r.headers["retry-after"] == "5"
    assert r.json()["error"]["code"] == "out_of_memory" and r.json()["error"]["type"] == "server_error"
    assert "out of memory" in r.json()["error"]["message"] and "Tried to allocate" not in r.json()["error"]["message"]
    assert failures() == before + 1
    r = post(sabotaged)
    assert r.status_code == 200 and len(r.content) == 16 * 2048 * 2


def test_failure_mid_stream_ends_that_stream_cleanly(sabotaged, monkeypatch):
    sabotage(monkeypatch, sabotaged, RuntimeError("injected failure"), after_calls=3)  # during block 2
    with sabotaged.stream("POST", "/v1/audio/speech",
                      json={"input": "Hello.", "voice": "alice", **SMALL}, timeout=60) as r:
        assert r.status_code == 200
        data = b"".join(r.iter_raw())
    assert 0 < len(data) < 16 * 2048 * 2  # the first block, then a clean end
    r = post(sabotaged)
    assert r.status_code == 200 and len(r.content) == 16 * 2048 * 2


def test_failure_in_a_batch_fails_only_its_requests(sabotaged, monkeypatch):
    sabotage(monkeypatch, sabotaged, RuntimeError("injected failure"), after_calls=0)

    async def two():
        async with sabotaged.async_client(timeout=60) as client:
            body = {"input": "Hello.", "voice": "alice", **SMALL, "stream": False, "response_format": "wav"}
            return await asyncio.gather(client.post("/v1/audio/speech", json=body),
                                        client.post("/v1/audio/speech", json=body))

    statuses = sorted(r.status_code for r in sabotaged.run(two))
    assert statuses[-1] in (200, 500) and all(s in (200, 500) for s in statuses)
    assert post(sabotaged).status_code == 200


# ---- graceful shutdown --------------------------------------------------------------------------


def test_sigterm_mid_stream_finishes_the_stream_and_exits_zero(tiny_echo_dir, tiny_fish_dir, voice_dir, tmp_path):
    live = LiveServer(server_env(tiny_echo_dir, tiny_fish_dir, voice_dir, ECHO_SHUTDOWN_GRACE="120"),
                      tmp_path / "server.log")
    body = {"input": "Hello.", "voice": "alice", "block_sizes": [4] + [16] * 10, "num_steps": [1] + [6] * 10}
    try:
        assert httpx.post(live.url + "/v1/audio/speech", json=body, timeout=120).status_code == 200  # warm shapes
        with httpx.stream("POST", live.url + "/v1/audio/speech", json=body, timeout=120) as r:
            chunks = r.iter_raw()
            first = next(chunks)
            live.process.send_signal(signal.SIGTERM)
            rest = b"".join(chunks)
        assert len(first) + len(rest) == (4 + 160) * 2048 * 2  # the stream in flight was completed
        assert live.process.wait(timeout=120) == 0
        with pytest.raises(httpx.TransportError):
            httpx.get(live.url + "/health", timeout=2)
    finally:
        if live.process.poll() is None:
            live.stop()


def test_sigterm_while_the_models_load_exits_zero_at_once(tiny_echo_dir, tiny_fish_dir, voice_dir, tmp_path):
    """`docker stop` during a start (compiling can take minutes): the interpreter's exit under the loader
    thread, still in torch's code, aborted the process (status 134, "terminate called without an active
    exception")."""
    live = LiveServer(server_env(tiny_echo_dir, tiny_fish_dir, voice_dir, ECHO_WARMUP="1"), tmp_path / "server.log",
                      wait_ready=False)
    try:
        assert httpx.get(live.url + "/health", timeout=5).json()["ready"] is False  # (still loading)
        live.process.send_signal(signal.SIGTERM)
        assert live.process.wait(timeout=60) == 0, live.log()[-2000:]
        assert "stopped while the models were loading" in live.log()
    finally:
        if live.process.poll() is None:
            live.stop()

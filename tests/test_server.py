"""The HTTP API with the tiny checkpoints: the app in process (conftest.AppServer) where no socket is the
point, the real server process (uvicorn on a loopback port, httpx) where a client leaves mid-request."""

import asyncio
import base64
import errno
import io
import json
import re
import time

import av
import httpx
import numpy as np
import pytest
import soundfile as sf

from conftest import app_server, idle, live_server, requests_to, server_env

pytestmark = pytest.mark.slow

FAST = {"block_sizes": [8, 8], "num_steps": [2, 2]}  # 16 latent frames = 32768 samples at 44.1 kHz
FAST_SAMPLES = 16 * 2048


def speech(server, timeout=120, **body):
    """A short request; seeded, so that responses can be compared (seed=None asks for a random one)."""
    payload = {"input": "Hello there. This is a test.", "voice": "alice", "seed": 0, **FAST, **body}
    return requests_to(server).post("/v1/audio/speech", content=json.dumps(payload),  # NaN as JavaScript sends it
                                    headers={"content-type": "application/json"}, timeout=timeout)


def decode(data: bytes, fmt: str, rate: int = 44100) -> tuple[int, int, np.ndarray]:
    """(sample rate, channels, mono float samples) of an encoded response."""
    if fmt == "pcm":
        return rate, 1, np.frombuffer(data, "<i2").astype(np.float32) / 32767
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.audio[0]
        frames = [f.to_ndarray() for f in container.decode(stream)]
        samples = np.concatenate([f.reshape(f.shape[0], -1) for f in frames], axis=1)[0]
        if samples.dtype.kind == "i":  # 16-bit codecs (wav, flac) decode to integers
            samples = samples.astype(np.float32) / 32767
        return stream.rate, stream.channels, samples


# ---- routes ---------------------------------------------------------------------------------------


def test_health_says_not_ready_when_ready_would_answer_503(app, monkeypatch):
    """With the generation thread stopped, /ready answered 503 while /health said ready: true, so a
    liveness check built on /health never restarted a server that could not speak."""
    import worker as wk

    monkeypatch.setattr(wk.GenerationWorker, "alive", property(lambda self: False))
    ready = app.get("/ready")
    assert ready.status_code == 503 and "generation thread has stopped" in ready.json()["error"]["message"]
    assert app.get("/health").json() == {"status": "ok", "ready": False, "auth": False}


def test_health_ready_and_models(app):
    assert app.get("/health").json() == {"status": "ok", "ready": True, "auth": False}
    assert app.get("/ready").status_code == 200
    models = app.get("/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "echo-tts"
    assert app.get("/v1/audio/models").json()["models"][0]["id"] == "tts-1"


def test_voice_lists_include_files_and_folders_sorted(app):
    data = app.get("/v1/voices").json()
    assert data["object"] == "list"
    assert data["data"] == [{"object": "voice", "id": n, "name": n} for n in ("alice", "bob", "duo")]
    assert app.get("/v1/audio/voices").json() == {
        "voices": [{"id": n, "name": n} for n in ("alice", "bob", "duo")]}


def test_the_presets_route_lists_every_streaming_preset_and_the_servers_default(app):
    from settings import PERFORMANCE_PRESETS

    body = app.get("/v1/audio/presets").json()
    assert body["default"] == "default"
    assert body["presets"] == {name: {"block_sizes": blocks, "num_steps": steps}
                               for name, (blocks, steps) in PERFORMANCE_PRESETS.items()}


def test_unknown_route_is_404_in_openai_shape(app):
    r = app.get("/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"


# ---- audio ----------------------------------------------------------------------------------------


def test_streaming_pcm_arrives_block_by_block(app):
    body = {"input": "Hello.", "voice": "alice", "block_sizes": [4, 8, 8], "num_steps": [1, 3, 3]}
    with app.stream("POST", "/v1/audio/speech", json=body, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"] == "audio/pcm"
        assert r.headers["x-audio-sample-rate"] == "44100"
        chunks = [c for c in r.iter_raw() if c]
    data = b"".join(chunks)
    assert len(data) == 20 * 2048 * 2
    # the first bytes left with the first block, before the later blocks were generated
    assert len(chunks) >= 3 and len(chunks[0]) <= 4 * 2048 * 2


@pytest.mark.parametrize("fmt", ["pcm", "wav", "mp3", "opus", "aac", "flac"])
@pytest.mark.parametrize("stream", [True, False])
def test_every_format_decodes_with_the_right_rate_and_length(app, fmt, stream):
    r = speech(app, response_format=fmt, stream=stream)
    assert r.status_code == 200, r.text
    expected_type = {"pcm": "audio/pcm", "wav": "audio/wav", "mp3": "audio/mpeg", "opus": "audio/ogg",
                     "aac": "audio/aac", "flac": "audio/flac"}[fmt]
    assert r.headers["content-type"] == expected_type
    if not stream:
        assert int(r.headers["content-length"]) == len(r.content)
    rate, channels, samples = decode(r.content, fmt)
    assert channels == 1
    assert rate == (48000 if fmt == "opus" else 44100)
    seconds = len(samples) / rate
    assert abs(seconds - FAST_SAMPLES / 44100) < 0.1, seconds


def test_a_whole_file_is_sent_as_its_pieces_without_a_joined_copy():
    """stream=false sends the whole file's pieces (pipeline.Speech reads them from its spool once the
    file is complete) as they are, with the file's size as Content-Length."""
    import asyncio
    from types import SimpleNamespace

    import api_server

    pieces = [bytes([i]) * 1_000_000 for i in range(4)]

    async def produce(watched):
        for piece in pieces:
            yield piece

    speech = SimpleNamespace(pieces=produce, audio_seconds=1.0, file_bytes=4_000_000,
                             encoder=SimpleNamespace(content_type="audio/wav"),
                             started=SimpleNamespace(stream=SimpleNamespace(steps_used=None)))
    timing = SimpleNamespace(sent=lambda: None, finished=lambda seconds: None)

    async def send():
        response = await api_server._whole_file(speech, {}, timing)
        return response, [chunk async for chunk in response.body_iterator]

    response, sent = asyncio.run(send())
    assert response.headers["content-length"] == str(4_000_000)
    assert len(sent) == 4 and all(a is b for a, b in zip(sent, pieces))  # the same objects: nothing copied


class FullDisk(io.RawIOBase):
    """A temporary file on a disk with room for `room` bytes: writing past them fails as a full disk does."""

    def __init__(self, room: int):
        self.data, self.position, self.room = bytearray(), 0, room

    def readable(self) -> bool:
        return True

    writable = seekable = readable

    def write(self, data) -> int:
        end = self.position + len(data)
        if end > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.data[self.position:end] = data
        self.position = end
        return len(data)

    def readinto(self, buffer) -> int:
        data = self.data[self.position:self.position + len(buffer)]
        buffer[:len(data)] = data
        self.position += len(data)
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self.position = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: len(self.data)}[whence] + offset
        return self.position

    def tell(self) -> int:
        return self.position


@pytest.mark.parametrize("fmt", ["aac", "wav"])
@pytest.mark.parametrize("short_by", [8000, 1])  # the disk fills while the file is encoded; at its last bytes
def test_a_whole_file_the_disk_has_no_room_for_is_507_and_its_job_ends(app, monkeypatch, caplog, fmt, short_by):
    """stream=false writes the file past pipeline.FILE_IN_MEMORY to disk: a full disk is the server's
    507, however far the file got (aac leaves 3 KB in the file's buffer until it is read back), not a
    500 with a traceback."""
    import tempfile

    import pipeline

    size = len(speech(app, stream=False, response_format=fmt).content)
    monkeypatch.setattr(pipeline, "FILE_IN_MEMORY", 1000)
    monkeypatch.setattr(tempfile, "TemporaryFile",
                        lambda *args, **kwargs: io.BufferedRandom(FullDisk(size - short_by)))
    r = speech(app, stream=False, response_format=fmt)
    assert r.status_code == 507, r.text
    assert r.json()["error"]["code"] == "insufficient_storage" and "stream=true" in r.json()["error"]["message"]
    assert "unhandled error" not in caplog.text
    assert idle(app.app.state.service)
    monkeypatch.undo()
    assert speech(app, stream=False, response_format=fmt).status_code == 200


def test_a_whole_file_no_temporary_directory_can_hold_is_a_500_that_says_so(app, monkeypatch, read_only_disk,
                                                                           tiny_echo_dir, tiny_fish_dir, voice_dir):
    """A read-only file system (a container's, say) has no temporary directory: a whole file past
    pipeline.FILE_IN_MEMORY was a 500 "generation failed: [Errno 30] Read-only file system: ...", as
    if the model had failed, and nothing at start said so."""
    import tempfile

    import pipeline

    monkeypatch.setattr(pipeline, "FILE_IN_MEMORY", 1000)
    monkeypatch.setattr(tempfile, "tempdir", str(read_only_disk))
    r = speech(app, stream=False, response_format="wav")
    error = r.json()["error"]
    assert r.status_code == 500 and error["code"] == "temporary_storage_not_writable"
    assert "TMPDIR" in error["message"] and "stream=true" in error["message"]
    assert idle(app.app.state.service)
    assert speech(app, response_format="wav").status_code == 200  # streamed: nothing written to disk
    with app_server(server_env(tiny_echo_dir, tiny_fish_dir, voice_dir), wait_ready=False) as other:
        assert "no temporary file can be written" in other.log() and "set TMPDIR" in other.log()
    monkeypatch.undo()
    assert speech(app, stream=False, response_format="wav").status_code == 200


def test_non_streaming_default_is_mp3(app):
    r = speech(app, stream=False)
    assert r.headers["content-type"] == "audio/mpeg"


def test_streamed_wav_uses_unknown_size_header(app):
    data = speech(app, response_format="wav").content
    assert data[:4] == b"RIFF" and data[4:8] == b"\xff\xff\xff\xff"


def test_sample_rate_resamples(app):
    r = speech(app, sample_rate=24000)
    assert r.headers["x-audio-sample-rate"] == "24000"
    assert abs(len(r.content) // 2 - FAST_SAMPLES * 24000 / 44100) < 64


def test_speed_changes_duration(app):
    normal = len(speech(app).content)
    fast = len(speech(app, speed=2.0).content)
    assert abs(fast / normal - 0.5) < 0.05


def test_sse_events_carry_the_same_audio(app):
    audio = speech(app).content
    r = speech(app, stream_format="sse")
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["cache-control"] == "no-cache" and r.headers["x-accel-buffering"] == "no"  # (nginx)
    events = [json.loads(line[6:]) for line in r.text.split("\n\n") if line.startswith("data: ")]
    assert events[-1]["type"] == "speech.audio.done"
    deltas = [e for e in events[:-1] if e["type"] == "speech.audio.delta"]
    assert len(deltas) == len(events) - 1
    assert b"".join(base64.b64decode(e["audio"]) for e in deltas) == audio


def test_sse_with_stream_false_is_a_400_naming_stream_format(app):
    """It answered raw audio, no event at all, to a client that would parse events."""
    r = speech(app, stream_format="sse", stream=False)
    assert r.status_code == 400 and r.json()["error"]["param"] == "stream_format"


def test_sse_is_chosen_by_stream_format_not_accept(app):
    payload = {"input": "Hi.", "voice": "none", **FAST, "stream_format": "sse"}
    r = app.post("/v1/audio/speech", json=payload, headers={"Accept": "application/octet-stream"},
                   timeout=60)
    assert r.headers["content-type"].startswith("text/event-stream")


def test_same_seed_same_bytes_different_seed_different(app):
    a, b, c = speech(app, seed=3).content, speech(app, seed=3).content, speech(app, seed=4).content
    assert a == b and a != c


def test_every_response_reports_its_seed_and_the_seed_reproduces_it(app):
    random = speech(app, response_format="pcm", seed=None)  # no seed: a random one
    seed = int(random.headers["x-echo-seed"])
    again = speech(app, response_format="pcm", seed=seed)
    assert again.headers["x-echo-seed"] == str(seed) and again.content == random.content
    negative = speech(app, response_format="pcm", seed=-1)
    assert int(negative.headers["x-echo-seed"]) >= 0 and negative.headers["x-echo-seed"] != str(seed)
    sse = speech(app, stream_format="sse", seed=seed)
    done = [json.loads(line[6:]) for line in sse.text.split("\n\n") if line.startswith("data: ")][-1]
    assert done["type"] == "speech.audio.done" and done["seed"] == seed


def test_truncation_factor_may_be_one_per_block(app):
    one = speech(app, seed=2, truncation_factor=0.8).content
    same = speech(app, seed=2, truncation_factor=[0.8, 0.8]).content
    mixed = speech(app, seed=2, truncation_factor=[0.8, 0.5]).content
    assert one == same and mixed != one and mixed[:len(mixed) // 4] == one[:len(mixed) // 4]  # block 1 alike
    r = speech(app, truncation_factor=[0.8, 0.8, 0.8])
    assert r.status_code == 400 and r.json()["error"]["param"] == "truncation_factor"
    assert "3 entries but there are 2 blocks" in r.json()["error"]["message"]


def test_determinism_under_concurrent_requests(app):
    seeds = [11, 12, 13, 14]
    solo = {s: speech(app, seed=s).content for s in seeds}

    async def together():
        async with app.async_client(timeout=120) as client:
            async def one(seed):
                payload = {"input": "Hello there. This is a test.", "voice": "alice", **FAST, "seed": seed}
                return (await client.post(app.url + "/v1/audio/speech", json=payload)).content
            return await asyncio.gather(*(one(s) for s in seeds))

    assert app.run(together) == [solo[s] for s in seeds]


def test_extra_body_nested_and_top_level_precedence(app):
    top = speech(app, seed=7).content
    payload = {"input": "Hello there. This is a test.", "voice": "alice", "extra_body": {**FAST, "seed": 7}}
    nested = app.post("/v1/audio/speech", json=payload, timeout=60).content
    assert nested == top
    payload["seed"] = 8  # top level wins over extra_body
    assert app.post("/v1/audio/speech", json=payload, timeout=60).content == speech(app, seed=8).content


def test_voices_by_file_name_folder_object_and_none(app):
    assert speech(app, voice="alice.wav").content == speech(app, voice="alice").content
    assert speech(app, voice={"id": "alice"}).content == speech(app, voice="alice").content
    assert speech(app, voice="duo").status_code == 200
    assert speech(app, voice="none").content != speech(app, voice="alice").content


def test_base64_voice_and_data_url(app, voice_dir):
    clip = (voice_dir / "alice.wav").read_bytes()
    encoded = base64.b64encode(clip).decode()
    reference = speech(app, voice="alice").content
    assert speech(app, voice=encoded).content == reference
    assert speech(app, voice="data:audio/wav;base64," + encoded).content == reference


def test_long_text_is_chunked_and_nothing_is_lost(app):
    sentences = " ".join(f"Sentence number {i} is here." for i in range(12))
    body = {"input": sentences, "chunk_target_seconds": 3, "chunk_min_seconds": 2, "chunk_max_seconds": 4,
            "block_sizes": [4], "num_steps": [1]}
    r = speech(app, **body)
    assert r.status_code == 200
    samples = len(r.content) // 2
    # every chunk gives one 4-frame block; several chunks
    assert samples % (4 * 2048) == 0 and samples // (4 * 2048) >= 4


def test_instructions_and_model_are_accepted(app):
    assert speech(app, instructions="cheerful", model="tts-1").status_code == 200


# ---- errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("change, param", [
    ({"speed": 5}, "speed"),
    ({"sample_rate": 1000}, "sample_rate"),
    ({"response_format": "ogg"}, "response_format"),
    ({"stream_format": "websocket"}, "stream_format"),
    ({"num_steps": [2, 2, 2]}, "num_steps"),
    ({"num_steps": 0}, "num_steps"),
    ({"block_sizes": [600, 100]}, "block_sizes"),
    ({"block_sizes": [0]}, "block_sizes"),
    ({"guidance_mode": "magic"}, "guidance_mode"),
    ({"cfg_scale_text": "lots"}, "cfg_scale_text"),
    ({"cfg_min_t": 0.9, "cfg_max_t": 0.5}, "cfg_min_t"),
    ({"truncation_factor": -1}, "truncation_factor"),
    ({"zero_tail_min_frac": 2}, "zero_tail_min_frac"),
    ({"voice": "nobody"}, "voice"),
    ({"voice": "../alice"}, "voice"),
    ({"voice": "/etc/passwd"}, "voice"),
    ({"voice": "A" * 400}, "voice"),
    ({"voice": base64.b64encode(b"definitely not audio" * 40).decode()}, "voice"),
    ({"input": ""}, "input"),
    ({"input": "   "}, "input"),
    ({"input": "x" * 5000}, "input"),
    ({"input": "word " * 400, "chunking_enabled": False}, "input"),
    ({"chunk_min_seconds": 30, "chunk_max_seconds": 10}, "chunk_min_seconds"),
    ({"seed": "abc"}, "seed"),
    # hostile input within the old limits (issue 17): 5xx, misleading messages, or work amplified
    ({"seed": 2**63}, "seed"),
    ({"seed": -(2**70)}, "seed"),
    ({"cfg_scale_text": float("nan")}, "cfg_scale_text"),
    ({"speed": float("inf")}, "speed"),
    ({"block_sizes": [1] * 640, "num_steps": 1}, "block_sizes"),
    ({"block_sizes": [2, 2]}, "block_sizes"),
    ({"block_sizes": [4] * 64, "num_steps": 7}, "num_steps"),
    ({"block_sizes": [4] * 40}, "num_steps"),  # 20 steps each by default
    ({"extra_body": [1]}, "extra_body"),  # not an object: extra_body itself is named
    ({"extra_body": {"cfg_scale_text": "abc"}}, "cfg_scale_text"),  # a field inside it is named as itself
])
def test_invalid_fields_are_400_naming_the_param(app, change, param):
    r = speech(app, **change)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["message"] and error["type"] == "invalid_request_error"
    if isinstance(value := next(iter(change.values())), float) and not np.isfinite(value):
        assert "finite" in error["message"]  # not "should be <= 50"


def test_missing_fields_and_malformed_json_are_400(app):
    r = app.post("/v1/audio/speech", json={"voice": "alice"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "input"
    r = app.post("/v1/audio/speech", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]


def test_a_body_of_countless_json_values_is_413_before_it_is_parsed(app):
    """A 16 MiB body of `[[],[],...]` took 4 s of the event loop (every stream waited) and 360 MiB
    parsed; a speech request needs a few hundred values besides its input's characters."""
    hostile = b'{"input": "Hi.", "voice": "alice", "junk": [' + b"[]," * 100_000 + b"[]]}"
    r = app.post("/v1/audio/speech", content=hostile, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large", r.text
    assert "JSON values" in r.json()["error"]["message"]
    r = speech(app, instructions="x" * 1_100_000, stream=False)  # a large body of few values, as inline voices are
    assert r.status_code == 200 and r.headers["content-type"] == "audio/mpeg", r.text
    r = app.post("/v1/audio/speech", content=hostile)  # no Content-Type (FastAPI before 0.132 parsed it as JSON)
    assert r.status_code == 413, r.text


def test_a_client_that_leaves_while_its_json_body_comes_in_is_no_server_error(app, caplog):
    """Counting a body's JSON values reads it before FastAPI does: a client gone meanwhile was an
    unhandled ClientDisconnect, a 500 with a traceback."""
    arrivals = iter([{"type": "http.request", "body": b'{"input": ', "more_body": True}])
    sent = []

    async def receive():
        return next(arrivals, {"type": "http.disconnect"})

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/audio/speech", "raw_path": b"/v1/audio/speech", "query_string": b"", "root_path": "",
             "headers": [(b"host", b"x"), (b"content-type", b"application/json"), (b"content-length", b"1000")],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    asyncio.run(app.app(scope, receive, send))
    assert sent[0]["status"] == 499 and "unhandled error" not in caplog.text


def test_json_values_are_counted_against_the_input_and_what_a_request_needs():
    from speech_request import JSON_VALUES_BESIDES_INPUT, RequestError, check_json_values

    limit = JSON_VALUES_BESIDES_INPUT + 100  # with ECHO_MAX_INPUT_CHARS=100
    check_json_values("[" + "1," * (limit - 1) + "1]", 100, "the body")  # `limit` values: accepted
    with pytest.raises(RequestError) as refused:
        check_json_values(b"[" + b"1," * limit + b"1]", 100, "the body")
    assert refused.value.status == 413 and str(refused.value).startswith("the body holds")


def test_a_body_that_is_missing_or_not_sent_as_json_is_a_400_that_says_so(app):
    """`curl -d '{...}'` without `-H 'Content-Type: application/json'` sends a form's content type:
    the answer was "Input should be a valid dictionary or object to extract fields from"; an empty
    body got "Field required" with no field named."""
    body = b'{"input": "Hi.", "voice": "alice"}'
    r = app.post("/v1/audio/speech", content=body, headers={"content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    assert "Content-Type: application/json" in r.json()["error"]["message"]
    r = app.post("/v1/audio/speech", content=body)  # no Content-Type at all (`requests.post(data=text)`)
    if r.status_code != 200:  # (FastAPI before 0.132 parsed such a body as JSON)
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
        assert "Content-Type: application/json' (it came without one)" in r.json()["error"]["message"]
    r = app.post("/v1/audio/speech", content=b"", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "no body" in r.json()["error"]["message"]
    assert app.post("/v1/audio/speech", content=body, headers={"content-type": "application/json"}).status_code == 200


def test_a_parsed_body_that_fails_as_a_whole_gets_its_own_message_not_the_json_hint():
    """FastAPI before 0.132 parses a body without a Content-Type as JSON: a request refused as a whole
    (here, `stream_format: sse` with `stream: false`) got "the request body must be JSON"."""
    from fastapi.exceptions import RequestValidationError
    from starlette.requests import Request

    import api_server

    request = Request({"type": "http", "method": "POST", "path": "/v1/audio/speech", "headers": []})
    error = {"type": "value_error", "loc": ("body",), "msg": "Value error, stream_format sse needs stream",
             "input": {"input": "x", "voice": "a", "stream_format": "sse", "stream": False}, "ctx": {"error": "x"}}
    answer = asyncio.run(api_server.on_validation_error(request, RequestValidationError([error])))
    assert b"must be JSON" not in answer.body and b"stream_format sse needs stream" in answer.body, answer.body


def test_the_schema_documents_the_400_a_malformed_request_gets_and_no_422(app):
    """FastAPI documents a 422 for every route that takes input; this server answers 400 in OpenAI's
    shape, so a client generated from the schema expected a status that never came."""
    schema = app.get("/openapi.json").json()
    statuses = {(method, path): set(op["responses"]) for path, ops in schema["paths"].items()
                for method, op in ops.items()}
    assert not [key for key, codes in statuses.items() if "422" in codes]
    assert "HTTPValidationError" not in schema["components"]["schemas"]
    assert "400" in statuses[("post", "/v1/audio/speech")] and "400" in statuses[("post", "/v1/audio/voices")]
    assert app.post("/v1/audio/speech", json={"voice": "alice"}).status_code == 400  # (what it documents)


def test_uptime_checks_may_probe_with_head(app):
    for path in ("/health", "/ready", "/"):
        r = app.head(path)
        assert r.status_code == 200 and r.content == b"", path
    paths = app.get("/openapi.json").json()["paths"]  # HEAD stays out of the schema: no duplicate operation ids
    ids = [op["operationId"] for methods in paths.values() for op in methods.values()]
    assert len(ids) == len(set(ids)) and paths["/health"]["get"]["operationId"] == "health_health_get"


def test_oversized_base64_voice_is_400(app):
    huge = "A" * (14 * 1024 * 1024)
    r = speech(app, voice=huge)
    assert r.status_code == 400 and r.json()["error"]["param"] == "voice"
    assert "MiB" in r.json()["error"]["message"] or "bytes" in r.json()["error"]["message"]


def test_client_disconnect_stops_generation_and_server_stays_healthy(app):
    body = {"input": "Hello.", "voice": "alice", "block_sizes": [4] + [16] * 30, "num_steps": [1] + [4] * 30,
            "seed": 99}
    with app.stream("POST", "/v1/audio/speech", json=body, timeout=60) as r:
        next(r.iter_raw())
    deadline = time.monotonic() + 30
    while "generation cancelled" not in app.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "generation cancelled" in app.log()
    assert app.get("/health").json()["status"] == "ok"
    assert speech(app).status_code == 200


@pytest.mark.parametrize("stream_format", ["audio", "sse"])
def test_a_client_leaving_mid_stream_is_counted_as_a_departure(server, stream_format):
    """Its status said 200 and nothing else told it from a whole answer: no failure, no audio seconds."""
    name = f'echo_client_departures_total{{transport="{"http" if stream_format == "audio" else "sse"}"}}'
    before = _metric(server, name, absent=0.0)
    body = {"input": "Hello.", "voice": "none", "block_sizes": [4] + [16] * 30, "num_steps": [1] + [4] * 30,
            "stream_format": stream_format}
    with httpx.stream("POST", server.url + "/v1/audio/speech", json=body, timeout=60) as r:
        next(r.iter_raw())
    deadline = time.monotonic() + 10
    while _metric(server, name, absent=0.0) == before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _metric(server, name, absent=0.0) - before == 1
    assert speech(server).status_code == 200 and _metric(server, name) - before == 1  # a whole one is none


@pytest.mark.parametrize("transport", ["http", "websocket"])
def test_a_client_leaving_while_its_voice_is_prepared_gives_its_queue_slot_back_at_once(
        tiny_echo_dir, tiny_fish_dir, voice_dir, tmp_path_factory, transport):
    """Preparing a new voice takes seconds (here a 60 s inline clip). A client that left meanwhile
    kept its queue slot until the preparation ended: others got 429 for a request nobody waited for
    (four such clients filled a server's queue for 16 s)."""
    from websockets.sync.client import connect

    env = server_env(tiny_echo_dir, tiny_fish_dir, voice_dir, ECHO_MAX_ACTIVE="1", ECHO_MAX_QUEUE="1")
    rate = 16000
    t = np.arange(60 * rate) / rate
    data = io.BytesIO()
    sf.write(data, (0.3 * np.sin(2 * np.pi * 180 * t) * np.sin(2 * np.pi * 3 * t) ** 2).astype(np.float32), rate,
             format="FLAC")
    body = {"input": "Hello.", "voice": base64.b64encode(data.getvalue()).decode(), **FAST, "seed": 1}
    with live_server(tmp_path_factory, f"preparing-{transport}", env) as live:
        if transport == "http":
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(live.url + "/v1/audio/speech", json=body, timeout=httpx.Timeout(10, read=0.5))
        else:
            with connect(live.url.replace("http://", "ws://") + "/v1/audio/speech/stream/ws") as ws:
                ws.send(json.dumps({**body, "segment_id": 1}))
                time.sleep(0.5)
        left = time.monotonic()  # (the slot is held as preparing: echo_queue_length counts waiting ones)
        while _metric(live, "echo_preparing_requests") > 0 and time.monotonic() - left < 3:
            time.sleep(0.05)
        assert _metric(live, "echo_preparing_requests") == 0 == _metric(live, "echo_queue_length")
        assert speech(live).status_code == 200  # the one slot is free: not 429


def _metric(server, name: str, headers: dict | None = None, absent: float | None = None) -> float:
    return _metric_in(requests_to(server).get("/metrics", headers=headers).text, name, absent)


def _metric_in(text: str, name: str, absent: float | None = None) -> float:
    """A sample's value (`name` with its labels, if any); `absent` when it is not there yet (a labelled
    series appears at its first observation), else the lookup fails."""
    found = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
    if found is None and absent is not None:
        return absent
    return float(found.group(1))


def test_time_to_first_byte_is_told_apart_by_transport(app):
    """A whole file's first byte comes once the file is made: mixed with streams, it made their
    percentiles look seconds slow."""
    series = {t: f'echo_time_to_first_byte_seconds_count{{transport="{t}"}}' for t in ("http", "file", "sse")}
    before = {t: _metric(app, name, absent=0.0) for t, name in series.items()}
    assert speech(app).status_code == speech(app, stream=False).status_code == 200
    assert speech(app, stream_format="sse").status_code == 200
    assert {t: _metric(app, name) - before[t] for t, name in series.items()} == {"http": 1, "file": 1, "sse": 1}


@pytest.mark.parametrize("stream", [True, False], ids=["streaming", "whole-file"])
def test_a_client_leaving_before_its_first_audio_frees_the_generator_at_once(server, stream):
    # the live server: the client's read timeout closes a real connection before any response
    # one 640-frame block at 100 steps: seconds of work before the first audio (the tiny model, CPU)
    body = {"input": "Hello.", "voice": "none", "block_sizes": [640], "num_steps": 100, "stream": stream,
            "response_format": "pcm", "seed": 123}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/audio/speech", json=body, timeout=httpx.Timeout(10, read=0.5))
    left = time.monotonic()
    while _metric(server, "echo_active_streams") > 0 and time.monotonic() - left < 2:
        time.sleep(0.05)
    assert _metric(server, "echo_active_streams") == 0, "the abandoned job still holds a generation slot"
    assert speech(server).status_code == 200


def test_clients_cutting_mp3_streams_mid_encode_leave_the_server_running(server):
    """A client closing an mp3 stream while a block is being encoded: Starlette cancels the response
    again every turn of the loop; the codec must not be freed under its running encode (the process
    crashed with SIGSEGV on the first or second cut when it was)."""
    import random
    import socket

    body = json.dumps({"input": "Hello there. This is a long test.", "voice": "alice", "stream": True,
                       "response_format": "mp3", "block_sizes": [4] + [64] * 9, "num_steps": [1] + [2] * 9,
                       "speed": 0.25, "sample_rate": 48000, "early_stop_on_zero": False}).encode()
    cuts = random.Random(1)
    for _ in range(8):
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
            sock.sendall(b"POST /v1/audio/speech HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n" % len(body) + body)
            until = time.monotonic() + cuts.uniform(0.05, 1.0)
            while time.monotonic() < until and sock.recv(65536):
                pass
        assert server.process.poll() is None, server.log()[-3000:]
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200
    assert server.process.poll() is None


def _longest_gap(server, body: dict, during=None) -> float:
    """The longest wait between two chunks of a streamed response; `during` runs once it streams."""
    import threading

    gaps, helper = [], None
    with requests_to(server).stream("POST", "/v1/audio/speech", json=body, timeout=120) as r:
        last = None
        for chunk in r.iter_raw():
            now = time.monotonic()
            if last is None and during is not None:
                helper = threading.Thread(target=during)
                helper.start()
            elif last is not None and chunk:
                gaps.append(now - last)
            last = now
    if helper is not None:
        helper.join()
    return max(gaps)


def test_preparing_a_new_voice_does_not_stall_the_streams_being_generated(app):
    import base64
    import io

    import soundfile as sf

    seconds, rate = 150, 16000  # a long new inline voice: seconds of decoding and encoding
    clip = 0.1 * np.sin(2 * np.pi * 150 * np.arange(seconds * rate) / rate) * (1 + np.sin(np.arange(seconds * rate)))
    data = io.BytesIO()
    sf.write(data, clip.astype(np.float32), rate, format="WAV", subtype="PCM_16")
    voice = "data:audio/wav;base64," + base64.b64encode(data.getvalue()).decode()
    body = {"input": "Hello there.", "voice": "none", "block_sizes": [4] * 64, "num_steps": [1] * 64,
            "response_format": "pcm", "early_stop_on_zero": False}
    alone = _longest_gap(app, body)
    prepared = []

    def new_voice():
        prepared.append(speech(app, voice=voice, timeout=300).status_code)

    during = _longest_gap(app, body, during=new_voice)
    assert prepared == [200]
    assert during <= max(10 * alone, 1.0), f"longest gap {during:.2f} s while a voice was prepared ({alone:.2f} s alone)"


@pytest.fixture(scope="module")
def keyed_app(tiny_echo_dir, tiny_fish_dir, voice_dir):
    env = server_env(tiny_echo_dir, tiny_fish_dir, voice_dir, ECHO_API_KEY="first-key, second-key")
    with app_server(env, ready_timeout=180) as app:
        yield app


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "first-key"},
                                     {"Authorization": "Basic first-key"}])
def test_api_key_required_when_configured(keyed_app, headers):
    for path in ("/v1/voices", "/v1/models", "/ready"):
        r = keyed_app.get(path, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    r = keyed_app.post("/v1/audio/speech", json={"input": "Hi", "voice": "none"}, headers=headers)
    assert r.status_code == 401


def test_responses_sent_before_routing_are_counted_under_their_route(keyed_app):
    """The 401 answered from a request's headers (before its body is read) and middleware answers
    came under route="unmatched", mixed with 404 scans and static files."""
    def count(route: str, status: int) -> float:
        text = keyed_app.get("/metrics", headers={"Authorization": "Bearer first-key"}).text
        found = re.search(rf'^echo_requests_total{{route="{re.escape(route)}",status="{status}"}} (\S+)$', text, re.M)
        return float(found.group(1)) if found else 0.0

    before = [count(*key) for key in (("/v1/audio/speech", 401), ("unmatched", 404), ("/static", 200))]
    assert keyed_app.post("/v1/audio/speech", json={"input": "Hi", "voice": "none"}).status_code == 401
    assert keyed_app.get("/no/such/path").status_code == 404
    assert keyed_app.get("/static/app.js").status_code == 200
    after = [count(*key) for key in (("/v1/audio/speech", 401), ("unmatched", 404), ("/static", 200))]
    assert [b - a for a, b in zip(before, after)] == [1, 1, 1]


def test_key_and_readiness_checks_never_wait_for_the_thread_pool(keyed_app, monkeypatch):
    """Under load the thread pool is busy encoding audio; a request's key and readiness checks run on
    the event loop, so a refusal (or the speech route's start) never queues behind those encodes."""
    import fastapi.dependencies.utils as dependency_utils

    pooled = []
    real = dependency_utils.run_in_threadpool

    async def counted(fn, *args, **kwargs):
        pooled.append(getattr(fn, "__name__", repr(fn)))
        return await real(fn, *args, **kwargs)

    monkeypatch.setattr(dependency_utils, "run_in_threadpool", counted)
    refused = keyed_app.post("/v1/audio/speech", json={"input": "Hi", "voice": "none"},
                             headers={"Authorization": "Bearer wrong"})
    served = keyed_app.post("/v1/audio/speech", json={"input": "Hi.", "voice": "none", **FAST},
                            headers={"Authorization": "Bearer first-key"}, timeout=60)
    assert refused.status_code == 401 and served.status_code == 200 and pooled == []


def test_any_configured_key_is_accepted_and_health_is_open(keyed_app):
    assert keyed_app.get("/health").status_code == 200
    for key in ("first-key", "second-key"):
        headers = {"Authorization": f"Bearer {key}"}
        assert keyed_app.get("/v1/voices", headers=headers).status_code == 200
        payload = {"input": "Hi.", "voice": "none", **FAST}
        r = keyed_app.post("/v1/audio/speech", json=payload, headers=headers, timeout=60)
        assert r.status_code == 200 and len(r.content) == FAST_SAMPLES * 2


def test_streamed_and_non_streamed_audio_are_identical(app):
    streamed = decode(speech(app, seed=5, response_format="pcm", stream=True).content, "pcm")[2]
    whole = decode(speech(app, seed=5, response_format="wav", stream=False).content, "wav")[2]
    assert np.array_equal(np.round(streamed * 32767), np.round(whole * 32767))


def test_changed_voice_file_is_re_encoded(app, voice_dir):
    import os

    import soundfile as sf

    clip, rate = sf.read(voice_dir / "alice.wav", dtype="float32")
    path = voice_dir / "carol.wav"
    try:
        sf.write(path, clip, rate)
        before = speech(app, voice="carol").content
        assert before == speech(app, voice="alice").content
        sf.write(path, clip[::-1].copy(), rate)
        os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
        assert speech(app, voice="carol").content != before
        path.unlink()
        r = speech(app, voice="carol")
        assert r.status_code == 400 and r.json()["error"]["param"] == "voice"
    finally:
        path.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def narrow_app(tiny_echo_dir, tiny_fish_dir, voice_dir):
    env = server_env(tiny_echo_dir, tiny_fish_dir, voice_dir, ECHO_MAX_ACTIVE="1", ECHO_MAX_QUEUE="1")
    with app_server(env) as app:
        yield app


def test_full_queue_answers_429_and_health_stays_responsive(narrow_app):
    long_body = {"input": "Hello.", "voice": "alice", "block_sizes": [4] + [16] * 20, "num_steps": [1] + [4] * 20,
                 "seed": 0}

    async def scenario():
        async with narrow_app.async_client(timeout=120) as client:
            async def metric(name):
                return _metric_in((await client.get("/metrics")).text, name)

            running = [asyncio.create_task(client.post("/v1/audio/speech", json=long_body)) for _ in range(2)]
            for _ in range(300):  # until both are admitted: one active, one waiting
                await asyncio.sleep(0.1)
                if await metric("echo_active_streams") == 1 and await metric("echo_queue_length") == 1:
                    break
            rejected = await client.post("/v1/audio/speech", json=long_body)
            health = await asyncio.wait_for(client.get("/health"), 5)
            finished = await asyncio.gather(*running)
            return rejected, health, finished

    rejected, health, finished = narrow_app.run(scenario)
    assert rejected.status_code == 429 and int(rejected.headers["retry-after"]) > 0
    assert rejected.json()["error"]["type"] == "rate_limit_error"
    assert health.status_code == 200
    assert [r.status_code for r in finished] == [200, 200]
    assert finished[0].content and finished[0].content == finished[1].content  # the waiting one ran after


@pytest.mark.parametrize("content", ["garbage", "too short"])
def test_unusable_voice_files_are_400(app, voice_dir, content):
    import soundfile as sf

    path = voice_dir / "zed.wav"
    try:
        if content == "garbage":
            path.write_bytes(b"RIFF....WAVEfmt " + b"\x00" * 100)
        else:
            sf.write(path, np.zeros(2000, np.float32) + 0.1, 44100)
        r = speech(app, voice="zed")
        assert r.status_code == 400 and r.json()["error"]["param"] == "voice", r.text
        assert app.get("/health").json()["status"] == "ok"
    finally:
        path.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def static_app(tiny_echo_dir, tiny_fish_dir, voice_dir):
    """The CUDA fast path's shape discipline on CPU: static shapes, warmed up before ready."""
    env = server_env(tiny_echo_dir, tiny_fish_dir, voice_dir, ECHO_STATIC_SHAPES="1", ECHO_WARMUP="1",
                     ECHO_MAX_ACTIVE="2")
    with app_server(env) as app:
        yield app


def test_static_shapes_server_warms_every_shape_and_matches_the_exact_server(static_app, app):
    # frames 32, 128, 480, 640 x rows 1, 2, 3, 4, 6 x speaker keys of voices to ~30 s or to ~5 min
    assert "40 step shapes warmed up" in static_app.log()
    assert "voice encoder warmed up" in static_app.log()  # the first voice request compiles nothing
    bodies = [{"seed": 1}, {"seed": 2, "voice": "none", "block_sizes": [4, 12], "num_steps": [2, 3]}]

    async def together():
        async with static_app.async_client(timeout=120) as client:
            payload = {"input": "Hello there. This is a test.", "voice": "alice", "response_format": "pcm", **FAST}
            return await asyncio.gather(*(client.post("/v1/audio/speech", json={**payload, **b}) for b in bodies))

    for body, response in zip(bodies, static_app.run(together), strict=True):
        static = decode(response.content, "pcm")[2]
        exact = decode(speech(app, response_format="pcm", **body).content, "pcm")[2]
        assert static.shape == exact.shape and np.abs(static - exact).max() <= 3 / 32767
    streamed = decode(speech(static_app, seed=5, response_format="pcm", stream=True).content, "pcm")[2]
    whole = decode(speech(static_app, seed=5, response_format="wav", stream=False).content, "wav")[2]
    assert np.array_equal(np.round(streamed * 32767), np.round(whole * 32767))

"""WebSocket streaming (`/v1/audio/speech/stream/ws`): the app in process (conftest.AppServer, its sockets
with the calls of a `websockets` client), the server process for the README example run as written."""

import ast
import asyncio
import json
import re
import subprocess
import sys
import time

import numpy as np
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from conftest import ROOT, AppServer, LiveServer, app_server, server_env
from test_server import FAST, _metric

pytestmark = pytest.mark.slow
WARM_ALICE = {"ECHO_WARMUP": "1", "ECHO_WARMUP_VOICE": "alice", "ECHO_PERFORMANCE_PRESET": "low",
              "ECHO_NUM_STEPS_NONSTREAM": "1"}  # a quick warm-up that leaves alice's latents cached
LONG = {"block_sizes": [4] + [16] * 38, "num_steps": [1] + [8] * 38, "early_stop_on_zero": False}  # seconds


def socket(server, query: str = "", **kwargs):
    if isinstance(server, AppServer):
        return server.websocket("/v1/audio/speech/stream/ws" + query, **kwargs)
    return connect(server.url.replace("http://", "ws://") + "/v1/audio/speech/stream/ws" + query, **kwargs)


def segment(segment_id, **fields) -> str:
    return json.dumps({"input": "Hello there. This is a test.", "voice": "alice", "segment_id": segment_id,
                       "seed": 0, **FAST, **fields})


def messages(ws, until=lambda m: False, timeout=60) -> list:
    """Messages (dicts for JSON, bytes for audio) until `until` holds for one or the socket closes."""
    out = []
    while True:
        try:
            raw = ws.recv(timeout=timeout)
        except ConnectionClosed:
            return out
        out.append(json.loads(raw) if isinstance(raw, str) else raw)
        if until(out[-1]):
            return out


def ended(segment_id):
    return lambda m: isinstance(m, dict) and m.get("segment_id") == segment_id and m["type"] in ("end", "error")


def test_a_segment_streams_the_pcm_http_streams_between_start_and_end(app):
    with socket(app) as ws:
        ws.send(segment("a", seed=7, sample_rate=24000))
        got = messages(ws, ended("a"))
    assert got[0] == {"type": "start", "segment_id": "a", "sample_rate": 24000} and got[-1]["type"] == "end"
    audio = b"".join(m for m in got if isinstance(m, bytes))
    http = app.post("/v1/audio/speech", json={
        "input": "Hello there. This is a test.", "voice": "alice", "seed": 7, "sample_rate": 24000,
        "response_format": "pcm", **FAST}, timeout=60).content
    assert audio == http and len([m for m in got if isinstance(m, bytes)]) >= 2  # blocks under the frame limit
    assert got[-1] == {"type": "end", "segment_id": "a", "seed": 7, "voice": "alice",
                       "audio_seconds": round(len(audio) / 2 / 24000, 3), "cancelled": False}


def test_segments_are_answered_in_order_and_continue_false_closes_after_them(app):
    with socket(app) as ws:
        ws.send(segment(1))
        ws.send(json.dumps({"input": "Second.", "voice": "none", "segment_id": 2, "extra_body": {**FAST, "seed": 3}}))
        ws.send(json.dumps({"input": "", "continue": False, "segment_id": "final"}))
        got = messages(ws)  # until the server closes
        assert ws.close_code == 1000
    events = [(m["type"], m["segment_id"]) for m in got if isinstance(m, dict)]
    assert events == [("start", 1), ("end", 1), ("start", 2), ("end", 2), ("no_op", "final")]
    assert got[-1] == {"type": "no_op", "reason": "empty_input", "segment_id": "final"}
    assert [m for m in got if isinstance(m, dict) and m["type"] == "end"][1]["seed"] == 3


def test_socket_segments_count_in_the_metrics_as_http_responses_do(app):
    """An operator whose voice agents speak over the socket sees their first bytes and audio seconds
    in /metrics: each started segment is one observation; a no_op is none."""
    first_bytes_name = 'echo_time_to_first_byte_seconds_count{transport="websocket"}'
    seconds, first_bytes = _metric(app, "echo_audio_seconds_total"), _metric(app, first_bytes_name, absent=0.0)
    with socket(app) as ws:
        ws.send(segment(1))
        ws.send(segment(2))
        ws.send(json.dumps({"input": "", "continue": False, "segment_id": "final"}))
        got = messages(ws)
    ends = [m for m in got if isinstance(m, dict) and m["type"] == "end"]
    assert _metric(app, first_bytes_name) - first_bytes == 2
    assert _metric(app, "echo_audio_seconds_total") - seconds == pytest.approx(
        sum(m["audio_seconds"] for m in ends), abs=0.002)


def test_a_message_of_countless_json_values_is_refused_before_it_is_parsed_and_the_socket_stays_usable(app):
    with socket(app) as ws:
        ws.send('{"input": "Hi.", "voice": "alice", "junk": [' + "[]," * 100_000 + "[]]}")
        ws.send(segment("good"))
        got = messages(ws, ended("good"))
    errors = [m for m in got if isinstance(m, dict) and m["type"] == "error"]
    assert len(errors) == 1 and errors[0]["error"]["code"] == "request_too_large" and errors[0]["segment_id"] is None
    assert "JSON values" in errors[0]["message"] and got[-1]["type"] == "end" and not got[-1]["cancelled"]


def test_a_bad_segment_gets_the_http_error_and_the_socket_stays_usable(app):
    bad = {"cfg_min_t": 0.9, "cfg_max_t": 0.5}
    http = app.post("/v1/audio/speech", json={"input": "Hi.", "voice": "alice", **bad}).json()["error"]
    with socket(app) as ws:
        ws.send(segment("bad", **bad))
        ws.send(segment("unknown voice", voice="nobody"))
        ws.send("not json")
        ws.send(segment("good"))
        got = messages(ws, ended("good"))
    errors = {m["segment_id"]: m for m in got if isinstance(m, dict) and m["type"] == "error"}
    assert errors["bad"]["error"] == http and errors["bad"]["message"] == http["message"]
    assert errors["unknown voice"]["error"]["param"] == "voice"
    assert errors[None]["error"]["code"] == "invalid_json"  # answered at once: it never joined the queue
    assert got[-1]["type"] == "end" and not got[-1]["cancelled"]


def test_a_socket_closes_cleanly_when_its_writer_ends_as_the_handler_is_cancelled(app, monkeypatch):
    """The cancellation that stops a socket's handler (the server's, or here the test client's at
    close) reaches it as sent, even when the handler waits for a writer that ends as it is
    cancelled: anyio recognises its own cancellation by its message, which asyncio.gather drops
    (Python 3.11), and an unrecognised one tears the test client down (a CancelledError at close)."""
    import speech_socket

    async def writer_that_ends_when_cancelled(session):
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            return  # (a writer that was finishing anyway)

    monkeypatch.setattr(speech_socket, "_answer", writer_that_ends_when_cancelled)
    ws = socket(app)
    ws.session.close(1000)  # the client leaves: the handler waits for its writer
    time.sleep(0.3)
    ws.close()  # then the test client cancels the handler


def test_cancel_stops_the_running_segment_and_drops_a_queued_one(app):
    with socket(app) as ws:
        ws.send(segment("long", **LONG))
        ws.send(segment("queued", **LONG))
        assert messages(ws, lambda m: isinstance(m, bytes))[0] == {"type": "start", "segment_id": "long", "sample_rate": 44100}
        cancelled_at = time.monotonic()
        ws.send(json.dumps({"type": "cancel", "segment_id": "queued"}))
        ws.send(json.dumps({"type": "cancel", "segment_id": "long"}))
        got = messages(ws, ended("queued"))  # dropped at once
        got += messages(ws, ended("long"))  # stopped within a step
        took = time.monotonic() - cancelled_at
        ws.send(segment("after"))
        after = messages(ws, ended("after"))
    ends = {m["segment_id"]: m for m in got if isinstance(m, dict) and m["type"] == "end"}
    assert ends["long"]["cancelled"] and ends["queued"]["cancelled"] and took < 5
    assert ends["long"]["voice"] == "alice" and "reason" not in ends["long"]  # the client's cancel: no reason
    assert ("start", "queued") not in [(m["type"], m["segment_id"]) for m in got if isinstance(m, dict)]
    assert sum(len(m) for m in got if isinstance(m, bytes)) < 39 * 16 * 2048 * 2  # not the whole segment
    assert after[-1]["type"] == "end" and not after[-1]["cancelled"]


def test_a_cancel_drops_every_queued_segment_of_its_id_while_the_client_is_slow_to_read(app, monkeypatch):
    """A voice agent's reply: one id for each sentence, cancelled by that id on an interruption. The
    queued ones were dropped one by one with a send between: while that send waited (a paused
    transport), the writer started the next one, which played whole; then the socket died silently."""
    import speech_socket

    send = speech_socket.Session.send

    async def slow_dropped_end(self, message):  # a client behind on its audio: the send waits
        if message.get("type") == "end" and message.get("voice") is None:
            await asyncio.sleep(0.5)
        await send(self, message)

    monkeypatch.setattr(speech_socket.Session, "send", slow_dropped_end)
    with socket(app) as ws:
        for text in ("First sentence.", "Second one.", "Third one."):
            ws.send(segment("reply-1", input=text, **LONG))
        messages(ws, lambda m: isinstance(m, bytes))
        ws.send(json.dumps({"type": "cancel", "segment_id": "reply-1"}))
        got = []
        while len([m for m in got if isinstance(m, dict) and m["type"] == "end"]) < 3:
            got += messages(ws, ended("reply-1"), timeout=20)
        ws.send(segment("probe"))
        probe = messages(ws, ended("probe"), timeout=20)
    kinds = [m["type"] for m in got if isinstance(m, dict)]
    assert kinds == ["end", "end", "end"]  # the running one stopped, both queued dropped: none started
    dropped = [m for m in got if isinstance(m, dict) and m["voice"] is None]
    assert len(dropped) == 2 and all(m["cancelled"] and m["seed"] is None for m in dropped)
    assert probe[0]["type"] == "start" and probe[-1]["type"] == "end" and not probe[-1]["cancelled"]


def test_a_client_that_disconnects_cancels_what_it_queued(app):
    with socket(app) as ws:  # leaves while the first block (seconds of work) is being generated
        ws.send(segment("slow", voice="none", block_sizes=[640], num_steps=100))
        ws.send(segment("next", **LONG))
        messages(ws, lambda m: isinstance(m, dict) and m["type"] == "start")
        time.sleep(0.3)
    left = time.monotonic()
    while _metric(app, "echo_active_streams") > 0 and time.monotonic() - left < 2:
        time.sleep(0.05)
    assert _metric(app, "echo_active_streams") == 0


def test_a_client_leaving_mid_segment_is_counted_as_a_departure(app):
    name = 'echo_client_departures_total{transport="websocket"}'
    before = _metric(app, name, absent=0.0)
    with socket(app) as ws:
        ws.send(segment("long", **LONG))
        messages(ws, lambda m: isinstance(m, bytes))  # audio flows; then the client leaves
    deadline = time.monotonic() + 10
    while _metric(app, name, absent=0.0) == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _metric(app, name, absent=0.0) - before == 1


@pytest.fixture(scope="module")
def strict_app(tiny_echo_dir, tiny_fish_dir, voice_dir):
    env = server_env(tiny_echo_dir, tiny_fish_dir, voice_dir, ECHO_API_KEY="sock-key", ECHO_WS_MAX_QUEUE="2",
                     ECHO_MAX_BODY_BYTES="4096", ECHO_WS_MAX_FRAME_BYTES="5000")
    with app_server(env) as app:
        yield app


def test_the_socket_needs_the_key_in_a_header_or_the_query(strict_app):
    """A missing or wrong key is refused as HTTP refuses it: 401 with OpenAI's error object (the
    handshake is answered with HTTP instead of being accepted), not a bare 403."""
    http = strict_app.get("/v1/models")
    assert http.status_code == 401
    for query, headers in (("", {}), ("?api_key=wrong", {}), ("", {"Authorization": "Bearer wrong"})):
        with pytest.raises(InvalidStatus) as refused:
            socket(strict_app, query, additional_headers=headers).close()
        response = refused.value.response
        assert response.status_code == 401 and response.headers["WWW-Authenticate"] == "Bearer"
        assert response.headers["Content-Type"] == "application/json"
        error = json.loads(response.body)["error"]
        assert {k: error[k] for k in ("type", "param", "code")} == {k: http.json()["error"][k] for k in ("type", "param", "code")}
        assert "?api_key=" in error["message"]
    for query, headers in (("?api_key=sock-key", {}), ("", {"Authorization": "Bearer sock-key"})):
        with socket(strict_app, query, additional_headers=headers) as ws:
            ws.send(segment("ok"))
            assert messages(ws, ended("ok"))[-1]["type"] == "end"


def test_queue_and_message_limits_answer_with_error_messages(strict_app):
    with socket(strict_app, "?api_key=sock-key") as ws:
        ws.send(segment("one", **LONG))
        messages(ws, lambda m: isinstance(m, dict) and m["type"] == "start")  # "one" runs: the queue is empty
        for name in ("two", "three", "four"):  # ECHO_WS_MAX_QUEUE=2: the third waiting one does not fit
            ws.send(segment(name, **LONG))
        ws.send(json.dumps({"input": "x" * 5000, "voice": "none", "segment_id": "huge"}))  # > ECHO_MAX_BODY_BYTES
        got = messages(ws, lambda m: isinstance(m, dict) and m.get("segment_id") is None and m["type"] == "error")
        for name in ("one", "two", "three"):
            ws.send(json.dumps({"type": "cancel", "segment_id": name}))
        ws.send(segment("later"))
        later = messages(ws, ended("later"))
    errors = {m["error"]["code"]: m for m in got if isinstance(m, dict) and m["type"] == "error"}
    assert errors["queue_full"]["segment_id"] == "four" and "ECHO_WS_MAX_QUEUE" in errors["queue_full"]["message"]
    assert "ECHO_MAX_BODY_BYTES" in errors["request_too_large"]["message"]
    assert later[-1]["type"] == "end"


def test_a_message_over_twice_the_body_limit_closes_the_socket_1009_as_the_readme_says(tiny_echo_dir, tiny_fish_dir,
                                                                                        voice_dir, tmp_path):
    """Under twice ECHO_MAX_BODY_BYTES a message gets an error message; over it uvicorn does not read it
    at all (its whole message would be buffered first) and closes the socket."""
    env = server_env(tiny_echo_dir, tiny_fish_dir, voice_dir, ECHO_MAX_BODY_BYTES="4096")
    server = LiveServer(env, tmp_path / "server.log")
    try:
        with socket(server) as ws:
            ws.send(json.dumps({"input": "x" * 6000, "voice": "none", "segment_id": "big"}))
            refused = messages(ws, lambda m: isinstance(m, dict) and m["type"] == "error")  # (not parsed: no id)
            assert refused[-1]["error"]["code"] == "request_too_large"
            ws.send(json.dumps({"input": "x" * 9000, "voice": "none", "segment_id": "huge"}))
            assert messages(ws) == [] and ws.close_code == 1009
    finally:
        server.stop()


def test_segments_queued_on_one_socket_hold_at_most_one_body_of_memory(strict_app):
    """ECHO_WS_MAX_QUEUE bounds how many, ECHO_MAX_BODY_BYTES (4096 here) how many bytes together:
    each message may be just under the limit, a queue of them may not."""
    padding = "p" * 2500  # an ignored field, as a hostile client would send
    with socket(strict_app, "?api_key=sock-key") as ws:
        ws.send(segment("one", **LONG))
        messages(ws, lambda m: isinstance(m, dict) and m["type"] == "start")  # "one" runs: the queue is empty
        ws.send(segment("two", **LONG, padding=padding))
        ws.send(segment("three", **LONG, padding=padding))  # 2 queued is allowed, but not 5000+ bytes of them
        refused = messages(ws, lambda m: isinstance(m, dict) and m["type"] == "error")[-1]
        for name in ("one", "two"):
            ws.send(json.dumps({"type": "cancel", "segment_id": name}))
    assert refused["segment_id"] == "three" and refused["error"]["code"] == "queue_full"
    assert "ECHO_MAX_BODY_BYTES" in refused["message"]


def test_hostile_messages_get_an_error_in_strict_json_and_the_socket_stays_usable(app):
    hostile = ["[" * 5000,  # nesting deeper than the parser's recursion limit (fewer values than a request may hold)
               '{"input": "Hi.", "segment_id": ' + "1" * 5000 + "}",  # more digits than Python converts
               '{"input": "Hi.", "segment_id": NaN}', '{"input": "Hi.", "segment_id": -Infinity}',
               '{"input": "Hi.", "segment_id": 1e999}']  # a float out of range: Infinity again
    with socket(app) as ws:
        for text in hostile:
            ws.send(text)
        ws.send(b"\x00\x01 a binary frame")
        ws.send(segment("good"))
        texts = []
        while not (texts and '"end"' in texts[-1]):
            message = ws.recv(timeout=60)
            if isinstance(message, str):
                texts.append(message)
    got = [json.loads(t, parse_constant=lambda c: pytest.fail(f"{c} sent: not JSON")) for t in texts]
    errors = [m for m in got if m["type"] == "error"]
    assert len(errors) == len(hostile) + 1 and all(e["segment_id"] is None for e in errors)
    assert all(e["error"]["code"] == "invalid_json" for e in errors[:-1])
    assert "nested too deeply" in errors[0]["message"] and "binary frames are not accepted" in errors[-1]["message"]
    assert got[-1]["type"] == "end" and got[-1]["segment_id"] == "good" and not got[-1]["cancelled"]


def test_a_segment_id_that_cannot_be_echoed_safely_is_refused_and_the_socket_stays_usable(app):
    """The id is echoed in every answer and named in the log: a 15 MB one held the event loop 0.7 s a
    message while it was made loggable, and one nested just under the parser's limit parsed, then
    failed to be echoed (RecursionError: the socket closed 1011 with a traceback in the log)."""
    ids = [json.dumps(i) for i in ([[]], {"a": 1}, True, "x" * 257, "x" * 1_000_000)]
    ids += ["[" * depth + "]" * depth for depth in range(960, 1000, 3)]  # (where parsing ends depends on the stack)
    with socket(app) as ws:
        for segment_id in ids:
            ws.send(segment(None).replace('"segment_id": null', '"segment_id": ' + segment_id))
        ws.send(segment("x" * 256))
        got = messages(ws, lambda m: isinstance(m, dict) and m["type"] == "end")
    errors = [m for m in got if isinstance(m, dict) and m["type"] == "error"]
    assert len(errors) == len(ids) and all(e["segment_id"] is None for e in errors)
    assert all("segment_id must be" in e["message"] or "nested too deeply" in e["message"] for e in errors)
    assert got[-1]["segment_id"] == "x" * 256 and not got[-1]["cancelled"]


def test_a_refused_final_segment_still_closes_the_socket_once_the_queue_is_done(strict_app):
    with socket(strict_app, "?api_key=sock-key") as ws:
        ws.send(segment("one", **LONG))
        messages(ws, lambda m: isinstance(m, dict) and m["type"] == "start")
        ws.send(segment("two", **LONG))
        ws.send(segment("three", **LONG))
        ws.send(segment("last", **{"continue": False}))  # ECHO_WS_MAX_QUEUE=2: refused
        got = messages(ws, lambda m: isinstance(m, dict) and m.get("segment_id") == "last")
        for name in ("one", "two", "three"):
            ws.send(json.dumps({"type": "cancel", "segment_id": name}))
        rest = messages(ws, timeout=20)  # until the server closes the socket
        assert ws.close_code == 1000
    assert got[-1]["type"] == "error" and got[-1]["error"]["code"] == "queue_full"
    assert sorted(m["segment_id"] for m in rest if isinstance(m, dict) and m["type"] == "end") == ["one", "three", "two"]


def test_after_the_last_segment_a_cancel_still_stops_it_and_a_new_segment_is_refused(app):
    """A voice agent sends its last segment with "continue": false, then the user interrupts: the
    cancel must stop it (the socket is still read), and a segment sent after it gets an error."""
    with socket(app) as ws:
        ws.send(segment("last", **LONG, **{"continue": False}))
        got = messages(ws, lambda m: isinstance(m, dict) and m["type"] == "start")
        ws.send(segment("late"))
        ws.send(json.dumps({"type": "cancel", "segment_id": "last"}))
        got += messages(ws, timeout=20)  # until the server closes the socket
        assert ws.close_code == 1000
    events = {m["segment_id"]: m for m in got if isinstance(m, dict) and m["type"] in ("end", "error")}
    assert events["late"]["type"] == "error" and events["late"]["error"]["code"] == "socket_closing"
    assert events["last"]["type"] == "end" and events["last"]["cancelled"] is True
    assert events["last"]["audio_seconds"] < 20  # stopped: all of it is ~28 s


# ---- frames any client can read (issue 18, item 3) ----------------------------------------------

BIG_BLOCKS = {"block_sizes": [32, 64], "num_steps": [2, 2], "early_stop_on_zero": False}  # 128 KiB, 256 KiB of pcm


@pytest.mark.parametrize("live, query, key, limit, rate", [
    ("app", "", None, 32 * 1024, 44100),  # the default ECHO_WS_MAX_FRAME_BYTES
    ("strict_app", "?api_key=sock-key", "sock-key", 5000, 24000),  # a limit that is no power of two
])
def test_audio_frames_stay_under_the_limit_and_carry_the_http_pcm(request, live, query, key, limit, rate):
    """Each block (here 128 and 256 KiB) goes out in messages of at most ECHO_WS_MAX_FRAME_BYTES,
    whole 16-bit samples each, that join into exactly the pcm HTTP answers for the same request."""
    app = request.getfixturevalue(live)
    with socket(app, query) as ws:
        ws.send(segment("big", seed=11, sample_rate=rate, **BIG_BLOCKS))
        got = messages(ws, ended("big"))
    frames = [m for m in got if isinstance(m, bytes)]
    http = app.post("/v1/audio/speech", headers={"Authorization": f"Bearer {key}"} if key else {},
                      json={"input": "Hello there. This is a test.", "voice": "alice", "seed": 11, "sample_rate": rate,
                            "response_format": "pcm", **BIG_BLOCKS}, timeout=120)
    assert http.headers["x-audio-sample-rate"] == str(rate)
    assert b"".join(frames) == http.content and len(http.content) > 2 * limit
    assert max(len(f) for f in frames) <= limit and all(len(f) % 2 == 0 for f in frames)
    assert len(frames) >= len(http.content) / limit  # cut, not sent whole
    assert got[-1]["audio_seconds"] == round((32 + 64) * 2048 / 44100, 3)


def readme_example() -> str:
    """The Python block of the README's "WebSocket streaming (voice agents)" section, as written."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### WebSocket streaming (voice agents)\n", 1)[1].split("\n### ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_example_runs_as_written_with_the_websockets_defaults(server, tmp_path):
    """Issue 18: the example must run with `websockets`' default settings (max_size 1 MiB; a default
    preset block is 480 frames, ~2 MB of pcm, sent whole before frames were limited) and write the
    audio the `end` messages announce, as 44.1 kHz 16-bit mono. It runs in a process of its own,
    only its URL pointed at the test server."""
    code = readme_example()
    assert "ws://localhost:8000/" in code
    code = code.replace("ws://localhost:8000/", server.url.replace("http://", "ws://") + "/")
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    printed = [ast.literal_eval(line) for line in run.stdout.splitlines()]
    assert [(m["type"], m["segment_id"]) for m in printed] == [
        ("start", 1), ("end", 1), ("start", 2), ("end", 2), ("no_op", "final")]
    pcm = (tmp_path / "out.pcm").read_bytes()
    ends = [m for m in printed if m["type"] == "end"]
    assert all(not m["cancelled"] and m["audio_seconds"] > 0 for m in ends)
    assert len(pcm) / 2 / 44100 == pytest.approx(sum(m["audio_seconds"] for m in ends), abs=0.001)


# ---- a segment's life is always closed (issue 18, items 4 and 2) --------------------------------


def test_a_segment_refused_before_start_gets_only_its_error(app):
    """Its settings, its output and its voice are checked before `start`: a client that pairs
    `start` with `end` never waits for an `end` that will not come."""
    refused = {"unknown voice": {"voice": "nobody"}, "bad settings": {"cfg_min_t": 0.9, "cfg_max_t": 0.5},
               "bad rate": {"sample_rate": 1}, "bad inline voice": {"voice": "data:audio/wav;base64,AAAA"}}
    with socket(app) as ws:
        for name, fields in refused.items():
            ws.send(segment(name, **fields))
        ws.send(segment("good"))
        got = messages(ws, ended("good"))
    events = [(m["type"], m["segment_id"]) for m in got if isinstance(m, dict)]
    assert events == [("error", name) for name in refused] + [("start", "good"), ("end", "good")]
    errors = {m["segment_id"]: m["error"] for m in got if isinstance(m, dict) and m["type"] == "error"}
    assert errors["unknown voice"]["param"] == "voice" and "GET /v1/voices" in errors["unknown voice"]["message"]
    assert errors["bad rate"]["param"] == "sample_rate" and errors["bad inline voice"]["param"] == "voice"


@pytest.fixture(scope="module")
def timeout_app(tiny_echo_dir, tiny_fish_dir, voice_dir):
    """Jobs stop after 1 s (ECHO_REQUEST_TIMEOUT): a generation that fails after its segment started.
    The limit counts preparing a voice: alice is prepared by the warm-up, not by the first test."""
    env = server_env(tiny_echo_dir, tiny_fish_dir, voice_dir, ECHO_REQUEST_TIMEOUT="1", **WARM_ALICE)
    with app_server(env) as app:
        yield app


def test_a_segment_that_fails_after_start_gets_its_error_then_its_end(timeout_app):
    with socket(timeout_app) as ws:
        ws.send(segment("long", **LONG))
        got = messages(ws, lambda m: isinstance(m, dict) and m["type"] == "end")
        ws.send(json.dumps({"input": "", "continue": False, "segment_id": "final"}))
        rest = messages(ws)  # the socket stays usable: answered, then closed as asked
        assert ws.close_code == 1000
    events = [m for m in got if isinstance(m, dict)]
    assert [(m["type"], m["segment_id"]) for m in events] == [("start", "long"), ("error", "long"), ("end", "long")]
    assert events[1]["error"]["code"] == "timeout"  # GenerationTimeout: 504 over HTTP
    audio = b"".join(m for m in got if isinstance(m, bytes))
    assert events[2] == {"type": "end", "segment_id": "long", "seed": 0, "voice": "alice",
                         "audio_seconds": round(len(audio) / 2 / 44100, 3), "cancelled": True, "reason": "error"}
    assert rest == [{"type": "no_op", "reason": "empty_input", "segment_id": "final"}]


def test_input_that_is_empty_once_cleaned_is_a_no_op_as_over_http(app):
    """A byte-order mark and control characters are removed before chunking (as over HTTP, where such
    an input is a 400 "input is empty"): on the socket that is nothing to say, not a failed segment."""
    with socket(app) as ws:
        ws.send(json.dumps({"input": "\ufeff\x00\x01 \n", "continue": False, "segment_id": "blank"}))
        rest = messages(ws)
        assert ws.close_code == 1000
    assert rest == [{"type": "no_op", "reason": "empty_input", "segment_id": "blank"}]


def test_streams_that_fail_after_they_began_are_counted_by_transport(timeout_app):
    """An HTTP stream that fails after its first bytes was counted as a 200 and nothing else:
    echo_stream_failures_total says how many streams of each transport failed, and why."""
    from prometheus_client.parser import text_string_to_metric_families

    def failures(transport: str) -> float:
        families = text_string_to_metric_families(timeout_app.get("/metrics").text)
        return sum(sample.value for family in families if family.name == "echo_stream_failures"
                   for sample in family.samples if sample.name == "echo_stream_failures_total"
                   and sample.labels == {"transport": transport, "code": "timeout"})

    before = {transport: failures(transport) for transport in ("http", "sse", "websocket")}
    body = {"input": "Hello there. This is a test.", "voice": "alice", "seed": 0, "response_format": "pcm", **LONG}
    assert timeout_app.post("/v1/audio/speech", json=body, timeout=120).status_code == 200  # then cut short
    sse = timeout_app.post("/v1/audio/speech", json={**body, "stream_format": "sse"}, timeout=120)
    assert '"type": "error"' in sse.text or '"type":"error"' in sse.text
    with socket(timeout_app) as ws:
        ws.send(segment("long", **LONG))
        messages(ws, lambda m: isinstance(m, dict) and m["type"] == "end")
    assert {transport: failures(transport) - before[transport] for transport in before} == \
        {"http": 1, "sse": 1, "websocket": 1}


def test_a_segments_log_lines_name_its_socket_and_segment(timeout_app):
    """Many segments share one socket: the worker's line about a segment that failed says which one
    (the socket's id, then the segment's, made printable), as an HTTP request's lines carry its id."""
    with socket(timeout_app) as ws:
        ws.send(segment("slow one\n", **LONG))
        messages(ws, lambda m: isinstance(m, dict) and m["type"] == "end")
    line = next(line for line in reversed(timeout_app.log().splitlines()) if "over its time limit" in line)
    assert re.search(r"\[[0-9a-f]{32}/slow_one_\]", line), line


def test_socket_segments_are_counted_by_the_status_http_would_answer(app):
    """/metrics counts what voice agents asked of the socket: started segments as 200, refused ones
    (an unknown voice, a message that is not JSON) by the status an HTTP request would have got."""
    from prometheus_client.parser import text_string_to_metric_families

    def counts() -> dict[str, float]:
        families = text_string_to_metric_families(app.get("/metrics").text)
        return {sample.labels["status"]: sample.value for family in families
                if family.name == "echo_websocket_segments" for sample in family.samples
                if sample.name == "echo_websocket_segments_total"}

    before = counts()
    unknown = app.post("/v1/audio/speech", json={"input": "Hi.", "voice": "nobody"}).status_code
    bad_json = app.post("/v1/audio/speech", content=b"not json", headers={"content-type": "application/json"})
    with socket(app) as ws:
        ws.send(segment("ok"))
        ws.send(segment("unknown", voice="nobody"))
        ws.send("not json")
        ws.send(json.dumps({"input": "", "continue": False, "segment_id": "final"}))
        messages(ws)
    after = counts()
    change = {status: after[status] - before.get(status, 0.0) for status in after}
    expected = {"200": 1.0, str(unknown): 1.0}
    expected[str(bad_json.status_code)] = expected.get(str(bad_json.status_code), 0.0) + 1.0
    assert {status: n for status, n in change.items() if n} == expected


def test_an_input_over_the_limit_is_refused_from_its_length_not_cleaned_on_the_event_loop(app, monkeypatch):
    """The empty-input check cleaned a segment's whole input on the event loop before any limit
    applied: 14M characters held every stream for 0.25 s. Over ECHO_MAX_INPUT_CHARS it is refused
    from its length, as over HTTP, and never cleaned."""
    import speech_socket

    cleaned = []
    prepare = speech_socket.prepare_text
    monkeypatch.setattr(speech_socket, "prepare_text", lambda text: (cleaned.append(len(text)), prepare(text))[1])
    with socket(app) as ws:
        ws.send(segment("huge", input="word " * 400_000))
        got = messages(ws, ended("huge"))
    assert got[-1]["type"] == "error" and got[-1]["error"]["param"] == "input"  # over ECHO_MAX_INPUT_CHARS
    assert cleaned == []


def test_the_end_names_the_voice_used(app):
    """As X-Echo-Voice does over HTTP: an OpenAI name with no alias speaks with the library's first
    voice (alice), `none` with no reference."""
    with socket(app) as ws:
        for voice in ("alloy", "none", "bob"):
            ws.send(segment(voice, voice=voice))
        got = messages(ws, ended("bob"))
    ends = {m["segment_id"]: m for m in got if isinstance(m, dict) and m["type"] == "end"}
    http = app.post("/v1/audio/speech", json={"input": "Hi.", "voice": "alloy", **FAST}, timeout=60)
    assert {name: end["voice"] for name, end in ends.items()} == {"alloy": "alice", "none": "none", "bob": "bob"}
    assert http.headers["x-echo-voice"] == "alice"


# ---- the same rules in process, where timing is the test's: a fake socket and service -----------


class RecordingSocket:
    """What speech_socket sends, as the client would read it."""

    def __init__(self):
        self.sent: list = []

    async def send_text(self, text: str) -> None:
        self.sent.append(json.loads(text))

    async def send_bytes(self, data: bytes) -> None:
        self.sent.append(data)


class ScriptedStream:
    """A job's audio: `blocks`, then `failure` raised if there is one; records its cancel."""

    def __init__(self, blocks, failure: Exception | None = None):
        self.blocks, self.failure, self.cancelled = list(blocks), failure, False

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self.blocks:
            return self.blocks.pop(0)
        if self.failure is not None:
            raise self.failure
        raise StopAsyncIteration

    def cancel(self) -> None:
        self.cancelled = True

    def touch(self) -> None:
        pass


class GatedService:
    """A SpeechService whose `start` waits for `ready` (as preparing a new voice takes seconds)."""

    def __init__(self, stream: ScriptedStream):
        from types import SimpleNamespace

        self.settings = SimpleNamespace(send_timeout=5.0, ws_max_frame_bytes=1024, output_sample_rate=None,
                                        default_response_format=None, max_input_chars=4096)
        self.stream, self.ready = stream, asyncio.Event()

    async def start(self, options, request_id):
        from types import SimpleNamespace

        from service import Started

        await self.ready.wait()
        return Started(SimpleNamespace(seed=5), self.stream, "alice")


async def nothing(session) -> None:
    """Do nothing while the job starts."""


def answer(stream: ScriptedStream, while_starting=nothing) -> list:
    """What one segment gets from speech_socket's writer, `while_starting(session)` awaited while its
    job starts."""
    import speech_socket
    from observability import Metrics

    async def scenario():
        service = GatedService(stream)
        session = speech_socket.Session(RecordingSocket(), service, Metrics(lambda: 0, lambda: 0))
        session.current = speech_socket.Segment("s", {"input": "Hi.", "voice": "alice"})
        answering = asyncio.create_task(speech_socket._answer_one(session, session.current))
        await asyncio.sleep(0.05)
        await while_starting(session)
        service.ready.set()
        await asyncio.wait_for(answering, 10)
        return session.websocket.sent

    return asyncio.run(scenario())


def test_a_segment_cancelled_while_its_voice_is_prepared_gets_an_end_and_no_start():
    import speech_socket

    stream = ScriptedStream([np.zeros(4096, np.float32)])
    sent = answer(stream, lambda session: speech_socket._cancel_id(session, "s"))
    assert sent == [{"type": "end", "segment_id": "s", "seed": None, "voice": None, "cancelled": True,
                     "audio_seconds": 0.0}] and stream.cancelled


def test_a_generation_that_fails_midway_gets_its_error_then_its_end_and_its_frames_stay_whole():
    stream = ScriptedStream([np.full(4096, 0.1, np.float32)], failure=RuntimeError("the GPU fell off"))
    sent = answer(stream)
    audio = [m for m in sent if isinstance(m, bytes)]
    events = [m for m in sent if isinstance(m, dict)]
    assert [len(m) for m in audio] == [1024] * 8  # 4096 samples in messages of ECHO_WS_MAX_FRAME_BYTES=1024
    assert [m["type"] for m in events] == ["start", "error", "end"] and stream.cancelled
    assert events[1]["error"]["code"] == "generation_failed" and "the GPU fell off" in events[1]["message"]
    assert events[2] == {"type": "end", "segment_id": "s", "seed": 5, "voice": "alice", "audio_seconds": 0.093,
                         "cancelled": True, "reason": "error"}


# ---- chunk_mode continue over the socket (issue 22) ----------------------------------------------


CONTINUED = {"input": " ".join(["Hello there. This is a test."] * 6), "chunk_mode": "continue",
             "chunk_target_seconds": 3, "chunk_min_seconds": 2, "chunk_max_seconds": 4, "seed": 3}


def test_a_continued_answer_streams_over_the_socket_as_over_http(app):
    http = app.post("/v1/audio/speech", timeout=120,
                      json={"voice": "alice", "response_format": "pcm", **FAST, **CONTINUED})
    assert http.status_code == 200
    with socket(app) as ws:
        ws.send(segment("continued", **CONTINUED))
        got = messages(ws, ended("continued"))
    events = [m for m in got if isinstance(m, dict)]
    assert [m["type"] for m in events] == ["start", "end"] and not events[-1]["cancelled"]
    assert b"".join(m for m in got if isinstance(m, bytes)) == http.content


def test_a_continued_answer_past_its_time_limit_gets_its_error_then_its_end(timeout_app):
    with socket(timeout_app) as ws:
        ws.send(segment("long", **LONG, **{**CONTINUED, "seed": 0}))
        got = messages(ws, lambda m: isinstance(m, dict) and m["type"] == "end")
    events = [m for m in got if isinstance(m, dict)]
    assert [(m["type"], m["segment_id"]) for m in events] == [("start", "long"), ("error", "long"), ("end", "long")]
    assert events[1]["error"]["code"] == "timeout" and events[2]["cancelled"] and events[2]["reason"] == "error"


def test_a_writer_that_fails_for_a_bug_closes_with_1011_and_logs_why(app, monkeypatch):
    """Only a send after the socket closed is a client that left; any other error of the writer is
    logged with its traceback and ends the socket with 1011, not silently."""
    import speech_socket

    for bug in (RuntimeError("a bug in the writer"), KeyError("a missing key in the writer")):
        async def broken(session, segment, bug=bug):
            raise bug

        monkeypatch.setattr(speech_socket, "_answer_one", broken)
        with socket(app) as ws:
            ws.send(segment(1))
            messages(ws)
            assert ws.close_code == 1011
        assert "the socket's writer failed" in app.log() and str(bug.args[0]) in app.log()

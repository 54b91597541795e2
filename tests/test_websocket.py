"""WebSocket streaming (`/v1/audio/speech/stream/ws`), through the real server process."""

import json
import time

import httpx
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from conftest import live_server, server_env
from test_server import FAST, _metric

pytestmark = pytest.mark.slow
LONG = {"block_sizes": [4] + [16] * 38, "num_steps": [1] + [8] * 38, "early_stop_on_zero": False}  # seconds


def socket(server, query: str = "", **kwargs):
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


def test_a_segment_streams_the_pcm_http_streams_between_start_and_end(server):
    with socket(server) as ws:
        ws.send(segment("a", seed=7, sample_rate=24000))
        got = messages(ws, ended("a"))
    assert got[0] == {"type": "start", "segment_id": "a"} and got[-1]["type"] == "end"
    audio = b"".join(m for m in got if isinstance(m, bytes))
    http = httpx.post(server.url + "/v1/audio/speech", json={
        "input": "Hello there. This is a test.", "voice": "alice", "seed": 7, "sample_rate": 24000,
        "response_format": "pcm", **FAST}, timeout=60).content
    assert audio == http and len([m for m in got if isinstance(m, bytes)]) >= 2  # one frame per block
    assert got[-1] == {"type": "end", "segment_id": "a", "seed": 7, "audio_seconds": round(len(audio) / 2 / 24000, 3),
                       "cancelled": False}


def test_segments_are_answered_in_order_and_continue_false_closes_after_them(server):
    with socket(server) as ws:
        ws.send(segment(1))
        ws.send(json.dumps({"input": "Second.", "voice": "none", "segment_id": 2, "extra_body": {**FAST, "seed": 3}}))
        ws.send(json.dumps({"input": "", "continue": False, "segment_id": "final"}))
        got = messages(ws)  # until the server closes
        assert ws.close_code == 1000
    events = [(m["type"], m["segment_id"]) for m in got if isinstance(m, dict)]
    assert events == [("start", 1), ("end", 1), ("start", 2), ("end", 2), ("no_op", "final")]
    assert got[-1] == {"type": "no_op", "reason": "empty_input", "segment_id": "final"}
    assert [m for m in got if isinstance(m, dict) and m["type"] == "end"][1]["seed"] == 3


def test_a_bad_segment_gets_the_http_error_and_the_socket_stays_usable(server):
    bad = {"cfg_min_t": 0.9, "cfg_max_t": 0.5}
    http = httpx.post(server.url + "/v1/audio/speech", json={"input": "Hi.", "voice": "alice", **bad}).json()["error"]
    with socket(server) as ws:
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


def test_cancel_stops_the_running_segment_and_drops_a_queued_one(server):
    with socket(server) as ws:
        ws.send(segment("long", **LONG))
        ws.send(segment("queued", **LONG))
        assert messages(ws, lambda m: isinstance(m, bytes))[0] == {"type": "start", "segment_id": "long"}
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
    assert ("start", "queued") not in [(m["type"], m["segment_id"]) for m in got if isinstance(m, dict)]
    assert sum(len(m) for m in got if isinstance(m, bytes)) < 39 * 16 * 2048 * 2  # not the whole segment
    assert after[-1]["type"] == "end" and not after[-1]["cancelled"]


def test_a_client_that_disconnects_cancels_what_it_queued(server):
    with socket(server) as ws:  # leaves while the first block (seconds of work) is being generated
        ws.send(segment("slow", voice="none", block_sizes=[640], num_steps=100))
        ws.send(segment("next", **LONG))
        messages(ws, lambda m: isinstance(m, dict) and m["type"] == "start")
        time.sleep(0.3)
    left = time.monotonic()
    while _metric(server, "echo_active_streams") > 0 and time.monotonic() - left < 2:
        time.sleep(0.05)
    assert _metric(server, "echo_active_streams") == 0


@pytest.fixture(scope="module")
def strict_server(tiny_echo_dir, tiny_fish_dir, voice_dir, tmp_path_factory):
    env = server_env(tiny_echo_dir, tiny_fish_dir, voice_dir, ECHO_API_KEY="sock-key", ECHO_WS_MAX_QUEUE="2",
                     ECHO_MAX_BODY_BYTES="4096")
    with live_server(tmp_path_factory, "strict-ws", env) as live:
        yield live


def test_the_socket_needs_the_key_in_a_header_or_the_query(strict_server):
    for query, headers in (("", {}), ("?api_key=wrong", {}), ("", {"Authorization": "Bearer wrong"})):
        with pytest.raises(InvalidStatus):
            socket(strict_server, query, additional_headers=headers).close()
    for query, headers in (("?api_key=sock-key", {}), ("", {"Authorization": "Bearer sock-key"})):
        with socket(strict_server, query, additional_headers=headers) as ws:
            ws.send(segment("ok"))
            assert messages(ws, ended("ok"))[-1]["type"] == "end"


def test_queue_and_message_limits_answer_with_error_messages(strict_server):
    with socket(strict_server, "?api_key=sock-key") as ws:
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


def test_hostile_messages_get_an_error_in_strict_json_and_the_socket_stays_usable(server):
    hostile = ["[" * 100000,  # nesting deeper than the parser's recursion limit
               '{"input": "Hi.", "segment_id": ' + "1" * 5000 + "}",  # more digits than Python converts
               '{"input": "Hi.", "segment_id": NaN}', '{"input": "Hi.", "segment_id": -Infinity}',
               '{"input": "Hi.", "segment_id": 1e999}']  # a float out of range: Infinity again
    with socket(server) as ws:
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


def test_a_refused_final_segment_still_closes_the_socket_once_the_queue_is_done(strict_server):
    with socket(strict_server, "?api_key=sock-key") as ws:
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

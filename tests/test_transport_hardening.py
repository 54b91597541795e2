"""Hostile and stalled clients at the transport (issue 17): keys kept out of the log, bounded
headers, read and send timeouts, unhandled errors, protected docs, and the WebSocket's shutdown drain.

Live servers (`python api_server.py`) are driven over raw sockets where a well-behaved client
library would not misbehave the way an attacker does."""

import asyncio
import json
import re
import signal
import socket
import threading
import time

import httpx
import pytest
from fastapi.testclient import TestClient
from websockets.sync.client import connect

from conftest import LiveServer, free_port, live_server, server_env
from test_websocket import messages

pytestmark = pytest.mark.slow
KEY = "sekrit-key-4242"
AUTH = {"Authorization": f"Bearer {KEY}"}
READ_TIMEOUT, SEND_TIMEOUT = 1.5, 2.0
WHOLE_FILES_BYTES = 12 << 20
LONG = {"block_sizes": [4] + [20] * 30, "num_steps": [1] + [13] * 30}  # 28 s of audio, seconds of work here
# 112 s of 48 kHz audio: 10 MB, more than the kernel buffers (4 MB at most) hold for a client that reads nothing
UNREAD = {**LONG, "speed": 0.25, "sample_rate": 48000}


@pytest.fixture(scope="module")
def guarded(tiny_echo_dir, tiny_fish_dir, voice_dir, tmp_path_factory):
    env = server_env(tiny_echo_dir, tiny_fish_dir, voice_dir, ECHO_API_KEY=KEY, ECHO_READ_TIMEOUT=str(READ_TIMEOUT),
                     ECHO_SEND_TIMEOUT=str(SEND_TIMEOUT), ECHO_MAX_WHOLE_FILES_BYTES=str(WHOLE_FILES_BYTES))
    with live_server(tmp_path_factory, "guarded", env) as live:
        yield live


def raw(server, rcvbuf: int | None = None) -> socket.socket:
    sock = socket.socket()
    if rcvbuf:  # before connecting, so that the TCP window stays small
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", server.port))
    return sock


def read_all(sock: socket.socket, timeout: float = 10) -> bytes:
    """Everything the server sends until it closes the connection (a reset ends it too); fails
    when the connection is still open after `timeout` seconds."""
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    except TimeoutError:
        raise AssertionError(f"the server kept the connection open for {timeout} s; got {data[:200]!r}") from None
    return data


def rss_bytes(server) -> int:
    for line in open(f"/proc/{server.process.pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def wait_for_log(server, text: str, timeout: float, seen: int = 0) -> float:
    """Seconds until `text` appears in the server log more than `seen` times (fails after `timeout`)."""
    start = time.monotonic()
    while server.log().count(text) <= seen:
        assert time.monotonic() - start < timeout, f"{text!r} not logged within {timeout} s:\n{server.log()[-3000:]}"
        time.sleep(0.05)
    return time.monotonic() - start


# ---- item 5: API keys are not logged ------------------------------------------------------------


def test_api_keys_in_urls_never_reach_the_log(guarded):
    ws_url = guarded.url.replace("http://", "ws://") + "/v1/audio/speech/stream/ws"
    with connect(f"{ws_url}?api_key={KEY}") as ws:  # the README's method for browsers
        ws.send(json.dumps({"type": "cancel", "segment_id": "nothing"}))
    assert httpx.get(f"{guarded.url}/v1/voices?api_key={KEY}", headers=AUTH).status_code == 200
    assert httpx.get(f"{guarded.url}/v1/voices?x=1&api_key={KEY}-typo").status_code == 401
    with connect(f"{ws_url}?api%5Fkey={KEY}") as ws:  # Starlette decodes the name, and takes the key
        ws.send(json.dumps({"type": "cancel", "segment_id": "nothing"}))
    assert httpx.get(f"{guarded.url}/docs?api%5Fkey={KEY}").status_code == 200
    time.sleep(0.3)
    log = guarded.log()
    assert KEY not in log and "api_key=[redacted]" in log and "api%5Fkey=[redacted]" in log


def test_a_key_is_redacted_whatever_its_characters_and_however_its_name_is_written():
    """A key may hold ';' or "'" (printable ASCII): the redaction stopped there and logged the rest."""
    from observability import redact

    for line, secret in (("GET /docs?api%5Fkey=k1;part2 HTTP/1.1", "part2"), ("ws?%61pi-key=k'2&x=1", "k'2"),
                         ("Authorization: Bearer k3,rest", "rest"), ("url?API_KEY%3Dk4 next", "k4"),
                         ("Authorization: Bearer team key 5&\"rest", "rest"), ("%41PI_KEY=k6", "k6"),
                         # inside another parameter's value, or after a path holding '='
                         ("url=http://h/ws?api_key=k7", "k7"), ("next=/docs%3Fapi_key%3Dk8", "k8"),
                         ("GET /x=y?api_key=k9 HTTP/1.1", "k9")):
        assert secret not in redact(line) and "[redacted]" in redact(line), line
    assert redact("x=1&voice=alice") == "x=1&voice=alice" and redact("monkey=1 turnkey=2") == "monkey=1 turnkey=2"
    assert redact('"WebSocket /ws?api_key=k7" [accepted]') == '"WebSocket /ws?api_key=[redacted]" [accepted]'


def test_a_socket_is_traced_by_its_request_id_and_a_refused_handshake_is_counted_not_an_error(guarded):
    """The handshake's answer carried no X-Request-ID (the client's was ignored) and no log line named
    one; a refused handshake (no key) logged an ERROR, 'ASGI callable returned without completing
    handshake', for every scanner, and no metric counted it."""
    from websockets.exceptions import InvalidStatus

    ws_url = guarded.url.replace("http://", "ws://") + "/v1/audio/speech/stream/ws"
    seen = len(guarded.log())
    with pytest.raises(InvalidStatus) as refused:
        connect(ws_url, additional_headers={"X-Request-ID": "cli-ws-401"}).close()
    assert refused.value.response.status_code == 401
    assert refused.value.response.headers["x-request-id"] == "cli-ws-401"
    with connect(ws_url, additional_headers={**AUTH, "X-Request-ID": "cli-ws"}) as ws:
        assert ws.response.headers["x-request-id"] == "cli-ws"
        ws.send(json.dumps({"input": "Hi there.", "voice": "none", "segment_id": "s1", "block_sizes": [8],
                            "num_steps": [2]}))
        while not (isinstance(message := ws.recv(timeout=60), str) and json.loads(message)["type"] == "end"):
            pass
    time.sleep(0.3)
    log = guarded.log()[seen:]
    assert "without completing handshake" not in log and " ERROR " not in log
    assert "[cli-ws/s1]" in log  # the segment's lines: the socket's id, then the segment's
    metrics = httpx.get(guarded.url + "/metrics", headers=AUTH).text
    for status in ("401", "101"):
        assert f'echo_requests_total{{route="/v1/audio/speech/stream/ws",status="{status}"}}' in metrics


# ---- item 6: bounded headers --------------------------------------------------------------------


def test_a_multi_megabyte_header_is_refused_at_once_and_health_stays_fast(guarded):
    slowest_health = []

    def health_meanwhile(stop: threading.Event):
        while not stop.is_set():
            started = time.monotonic()
            httpx.get(guarded.url + "/health", timeout=10)
            slowest_health.append(time.monotonic() - started)

    stop = threading.Event()
    watcher = threading.Thread(target=health_meanwhile, args=(stop,))
    watcher.start()
    sock = raw(guarded)
    started = time.monotonic()
    try:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: ")
        for _ in range(64):  # 8 MiB, refused long before the end
            sock.sendall(b"a" * 131072)
        sock.sendall(b"\r\n\r\n")
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server closed the connection: refused
    answer = read_all(sock)
    took = time.monotonic() - started
    stop.set()
    watcher.join()
    assert answer == b"" or answer.startswith((b"HTTP/1.1 431", b"HTTP/1.1 400")), answer[:200]
    if answer.startswith(b"HTTP/1.1 431"):
        assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "request_header_fields_too_large"
    assert took < 5 and max(slowest_health) < 1


def test_a_header_over_the_limit_is_answered_431_in_openais_shape(guarded):
    sock = raw(guarded)
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 40_000 + b"\r\n\r\n")  # > 32 KiB
    answer = read_all(sock)
    assert answer.startswith(b"HTTP/1.1 431"), answer[:200]
    head, body = answer.split(b"\r\n\r\n", 1)
    assert json.loads(body)["error"]["code"] == "request_header_fields_too_large"
    assert re.search(rb"(?im)^x-request-id: [0-9a-f]{32}\r?$", head)  # as every response says (README)


# ---- item 7: read timeouts ----------------------------------------------------------------------


def test_slowloris_connections_are_answered_408_and_closed_after_the_read_timeout(guarded):
    socks = [raw(guarded) for _ in range(40)]
    idle = raw(guarded)  # connects and never sends a byte
    started = time.monotonic()
    for sock in socks:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Drip: ")
        sock.setblocking(False)
    answers: dict[int, bytes] = {}  # what each got before the server closed it
    closed_at: dict[int, float] = {}
    while len(closed_at) < len(socks) and time.monotonic() - started < READ_TIMEOUT + 5:
        for i, sock in enumerate(socks):
            if i in closed_at:
                continue
            try:
                answers[i] = sock.recv(65536) + read_all(sock)  # the answer, then the close
                closed_at[i] = time.monotonic() - started
            except BlockingIOError:  # nothing yet: drip one more byte of the header
                sock.send(b"a")
            except (BrokenPipeError, ConnectionResetError):
                closed_at[i] = time.monotonic() - started
        time.sleep(0.3)
    assert len(closed_at) == len(socks), f"{len(socks) - len(closed_at)} slowloris connections still open"
    assert max(closed_at.values()) < READ_TIMEOUT + 2
    assert all(a.startswith(b"HTTP/1.1 408") for a in answers.values()), answers
    assert all(re.search(rb"(?im)^x-request-id: [0-9a-f]{32}\r?$", a) for a in answers.values())
    assert json.loads(answers[0].split(b"\r\n\r\n", 1)[1])["error"]["code"] == "request_timeout"
    assert read_all(idle, timeout=1) == b""  # closed without an answer, by now
    assert httpx.get(guarded.url + "/health").status_code == 200


def test_chunked_bodies_that_never_end_get_408_and_their_memory_is_released(guarded):
    head = (b"POST /v1/audio/speech HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer " + KEY.encode() + b"\r\nTransfer-Encoding: chunked\r\n\r\n")
    piece = b"%x\r\n%s\r\n" % (1 << 20, b" " * (1 << 20))
    before = rss_bytes(guarded)
    socks = []
    for _ in range(10):  # 4 MiB each, then silence
        sock = raw(guarded)
        sock.sendall(head + piece * 4)
        socks.append(sock)
    time.sleep(0.5)
    held = rss_bytes(guarded) - before
    started = time.monotonic()
    answers = [read_all(sock, timeout=READ_TIMEOUT + 5) for sock in socks]
    took = time.monotonic() - started
    time.sleep(0.5)
    after = rss_bytes(guarded) - before
    assert all(a.startswith(b"HTTP/1.1 408") for a in answers), [a[:100] for a in answers]
    assert json.loads(answers[0].split(b"\r\n\r\n", 1)[1])["error"]["code"] == "request_timeout"
    assert took < READ_TIMEOUT + 3
    assert held < 10 * 4 * 2**20 * 2 + 2**25  # about what was sent, once (not copied quadratically)
    assert after < 2**25, f"{after / 2**20:.0f} MiB still held after the 408s"


@pytest.mark.parametrize("path, content_type", [("/v1/audio/speech", "application/json"),
                                                 ("/v1/audio/voices", "multipart/form-data; boundary=x")])
def test_without_a_key_a_body_is_refused_401_before_it_is_read(guarded, path, content_type):
    """The key was checked after FastAPI had read and parsed the body: without a key, a body that
    never finished held its connection and 16 MiB of buffer, a form's file part a temporary file,
    and a large JSON body the event loop while it was parsed."""
    for key in (b"", b"Authorization: Bearer wrong\r\n"):
        sock = raw(guarded)
        sock.sendall(b"POST " + path.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Type: " + content_type.encode()
                     + b"\r\n" + key + b"Content-Length: 15000000\r\n\r\n" + b"[" * 1000)
        answer = read_all(sock, timeout=READ_TIMEOUT + 5)
        assert answer.startswith(b"HTTP/1.1 401"), answer[:200]  # (read first, it would be a 408)
        assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["type"] == "authentication_error"
        assert b"www-authenticate: bearer" in answer.lower()


@pytest.mark.parametrize("method", ["GET", "HEAD", "OPTIONS"])
@pytest.mark.parametrize("framing", [b"Transfer-Encoding: chunked\r\n\r\n4000\r\n",
                                     b"Content-Length: 15000000\r\n\r\n"])
def test_a_body_on_a_request_that_needs_no_key_is_refused_before_it_is_read(guarded, method, framing):
    """GET /health needs no key, and its body was read into memory all the same (up to 16 MiB a
    connection, held while it trickled in): 32 such requests without a key held 509 MB."""
    sock = raw(guarded)
    sock.sendall(method.encode() + b" /health HTTP/1.1\r\nHost: x\r\n" + framing + b"[" * 1000)
    answer = read_all(sock, timeout=READ_TIMEOUT + 5)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]  # (read first, it would be a 408)
    if method != "HEAD":
        assert "carries no body" in json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["message"]
    assert httpx.get(guarded.url + "/health").status_code == 200  # (and one without a body is answered)
    sock = raw(guarded)  # an empty chunked body, as requests sends for data=BytesIO(b"")
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n0\r\n\r\n")
    assert read_all(sock).startswith(b"HTTP/1.1 200")


def test_a_body_short_of_its_content_length_gets_408(guarded):
    sock = raw(guarded)
    sock.sendall(b"POST /v1/audio/speech HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: 1000\r\n\r\n{\"input\": ")
    started = time.monotonic()
    answer = read_all(sock, timeout=READ_TIMEOUT + 5)
    assert answer.startswith(b"HTTP/1.1 408") and time.monotonic() - started < READ_TIMEOUT + 2
    assert b"x-request-id" in answer.lower()
    assert b"request body stalled for 1.5 s" in answer


def trickle(sock: socket.socket, head: bytes, body: bytes, piece: int, every: float) -> threading.Thread:
    """Sends `head`, then `body` `piece` bytes at a time, one piece every `every` seconds, in a thread
    that stops when the server closes the connection."""
    def send():
        sock.sendall(head)
        for at in range(0, len(body), piece):
            time.sleep(every)
            try:
                sock.sendall(body[at:at + piece])
            except OSError:
                return
    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread


def speech_head(length: int) -> bytes:
    """A POST /v1/audio/speech with a key, whose connection closes after its answer."""
    return (b"POST /v1/audio/speech HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nConnection: close\r\n"
            b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: %d\r\n\r\n" % length)


def test_a_body_that_trickles_in_gets_408_after_the_grace(guarded):
    """A body that never paused as long as the read timeout but came a byte at a time held its
    connection, its task and its buffer as long as the client liked (a 16 MiB body for 8 years)."""
    body = b'{"input": "Hello there."' + b" " * 100 + b"}"
    sock = raw(guarded)
    started = time.monotonic()
    trickle(sock, speech_head(len(body)), body, piece=1, every=READ_TIMEOUT / 3)  # all of it: 42 s
    answer = read_all(sock, timeout=READ_TIMEOUT + 5)
    took = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert "slower than 4096 bytes/s" in json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["message"]
    assert took < READ_TIMEOUT + 1.5


@pytest.mark.parametrize("request_line", [b"POST /nope", b"DELETE /v1/audio/speech", b"POST /v1/audio/speech"])
def test_a_body_answered_unread_must_come_within_the_read_timeout(guarded, request_line):
    """Answered before its body was read, a request kept its connection (keep-alive) as long as a
    byte of the rest came now and then: uvicorn's keep-alive timer stops at any byte. 1010 such
    connections took every file descriptor of a server with `ulimit -n 1024`, /health too."""
    length = b"99999999999" if request_line == b"POST /v1/audio/speech" else b"1000"  # 404, 405, 413
    sock = raw(guarded)
    sock.sendall(request_line + b" HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode()
                 + b"\r\nContent-Length: " + length + b"\r\n\r\n")
    sock.settimeout(5)
    answer = sock.recv(65536)
    assert answer.split(b" ")[1] in (b"404", b"405", b"413") and b"connection: close" not in answer.lower(), answer
    answered = time.monotonic()
    trickle(sock, b"", b"x" * 1000, piece=1, every=READ_TIMEOUT / 3)
    assert b"HTTP/1.1" not in read_all(sock, timeout=READ_TIMEOUT + 5)  # (the rest of the answer, then closed)
    assert time.monotonic() - answered < READ_TIMEOUT + 1.5


def test_a_connection_whose_answered_body_came_in_full_serves_on_even_as_a_websocket(guarded):
    """The rest of the body came in time: the connection is the client's again, here for a WebSocket
    that must outlive the read timeout of the request before it."""
    sock = raw(guarded)
    sock.sendall(b"POST /nope HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode()
                 + b"\r\nContent-Length: 5\r\n\r\n")
    sock.settimeout(5)
    answer = b""
    while b'"code":"not_found"' not in answer:
        answer += sock.recv(65536)
    sock.sendall(b"xxxxx" + b"GET /v1/audio/speech/stream/ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                 b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                 b"Sec-WebSocket-Version: 13\r\nAuthorization: Bearer " + KEY.encode() + b"\r\n\r\n")
    handshake = b""
    while b"\r\n\r\n" not in handshake:
        handshake += sock.recv(1)
    assert handshake.startswith(b"HTTP/1.1 101"), handshake
    time.sleep(READ_TIMEOUT + 1)
    sock.sendall(ws_frame("[]"))  # not an object: an error message back, on a socket still open
    reply = sock.recv(65536)
    assert reply[:1] == b"\x81" and b"must be a JSON object" in reply, reply
    sock.close()


def test_a_slow_body_that_keeps_a_modest_pace_is_served(guarded):
    """The rate floor is low (4096 bytes/s on average after the read timeout's grace): a body taking
    several read timeouts to arrive at 32 KiB/s is answered as usual."""
    body = json.dumps({"input": "Hi.", "voice": "alice", "response_format": "wav", "stream": False,
                       "block_sizes": [8], "num_steps": [1]}).encode()
    body = body[:-1] + b" " * 96_000 + b"}"
    sock = raw(guarded)
    started = time.monotonic()
    trickle(sock, speech_head(len(body)), body, piece=8192, every=0.25)  # 3 s: two read timeouts
    answer = read_all(sock, timeout=30)
    assert time.monotonic() - started > 2 * READ_TIMEOUT
    assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
    head, audio = answer.split(b"\r\n\r\n", 1)
    assert audio[:4] == b"RIFF" and len(audio) == int(re.search(rb"(?i)content-length: (\d+)", head)[1])


def test_whole_files_waiting_for_slow_readers_share_one_budget(guarded):
    """A whole file waits, on disk past 8 MiB, until its client has taken all of it: clients reading
    a few bytes now and then could each hold one (a 4 KB request at speed 0.25 in 48 kHz wav asks for
    283 MiB) until TMPDIR was full, and uploads failed with it. Whole files hold at most
    ECHO_MAX_WHOLE_FILES_BYTES together; a file that would pass it is 507, and a file is let go of
    when its client leaves."""
    request = {"input": "Hello there.", "voice": "alice", "response_format": "wav", "stream": False, "speed": 0.25,
               "sample_rate": 48000, "block_sizes": [4] + [64] * 6, "num_steps": [1] * 7}  # 7.5 MB
    body = json.dumps(request).encode()
    holder, reading = raw(guarded, rcvbuf=4096), threading.Event()
    holder.sendall(speech_head(len(body)) + body)
    head = holder.recv(4096)
    size = int(re.search(rb"(?i)content-length: (\d+)", head)[1])
    assert head.startswith(b"HTTP/1.1 200") and WHOLE_FILES_BYTES / 2 < size < WHOLE_FILES_BYTES

    def read_slowly():  # a few KB a second: never long enough without reading for ECHO_SEND_TIMEOUT
        while not reading.wait(0.5):
            holder.recv(4096)
    slow = threading.Thread(target=read_slowly, daemon=True)
    slow.start()
    try:
        r = httpx.post(f"{guarded.url}/v1/audio/speech", json=request, headers=AUTH, timeout=60)
        assert r.status_code == 507, r.text[:300]
        assert "stream=true" in r.json()["error"]["message"]
        assert "ECHO_MAX_WHOLE_FILES_BYTES" in guarded.log()
        assert whole_file_bytes(guarded) == size
    finally:
        reading.set()
        slow.join()
        holder.close()  # its file is let go of: the next one fits
    deadline = time.monotonic() + 10
    while (r := httpx.post(f"{guarded.url}/v1/audio/speech", json=request, headers=AUTH, timeout=60)).status_code == 507:
        assert time.monotonic() < deadline, "the departed client's file still counts"
    assert r.status_code == 200 and len(r.content) == size
    deadline = time.monotonic() + 5  # (given back once its last byte is sent: maybe after the client has it)
    while whole_file_bytes(guarded) != 0:
        assert time.monotonic() < deadline
        time.sleep(0.05)


def whole_file_bytes(server) -> float:
    metrics = httpx.get(f"{server.url}/metrics", headers=AUTH).text
    return float(re.search(r"^echo_whole_file_bytes (\S+)$", metrics, re.M)[1])


# ---- item 8 (transport): clients that stop reading ----------------------------------------------


def test_an_http_client_that_stops_reading_is_dropped_and_its_generation_cancelled(guarded):
    before, dropped_before = guarded.log().count("generation cancelled"), guarded.log().count("ECHO_SEND_TIMEOUT")
    body = json.dumps({"input": "Hello there.", "voice": "alice", "response_format": "pcm", **UNREAD}).encode()
    sock = raw(guarded, rcvbuf=4096)
    sock.sendall(b"POST /v1/audio/speech HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    wait_for_log(guarded, "ECHO_SEND_TIMEOUT", timeout=60, seen=dropped_before)  # never reads; dropped SEND_TIMEOUT after it stalled
    dropped = time.monotonic()
    while guarded.log().count("generation cancelled") == before:
        assert time.monotonic() - dropped < 3, guarded.log()[-3000:]
        time.sleep(0.05)
    assert not read_all(sock, timeout=5).endswith(b"0\r\n\r\n")  # reset: the response never completed


def ws_frame(text: str) -> bytes:
    """A masked client text frame (RFC 6455) for a raw socket."""
    payload, mask = text.encode(), b"\x01\x02\x03\x04"
    size = bytes([0x80 | len(payload)]) if len(payload) < 126 else bytes([0x80 | 126]) + len(payload).to_bytes(2, "big")
    return b"\x81" + size + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def test_a_socket_client_that_stops_reading_is_dropped_and_its_segments_cancelled(guarded):
    before, dropped_before = guarded.log().count("generation cancelled"), guarded.log().count("ECHO_SEND_TIMEOUT")
    sock = socket_handshake(guarded, rcvbuf=4096)
    segment = {"input": "Hello there.", "voice": "alice", "segment_id": "s", **UNREAD}
    sock.sendall(ws_frame(json.dumps(segment)) + ws_frame(json.dumps({**segment, "segment_id": "t"})))
    wait_for_log(guarded, "ECHO_SEND_TIMEOUT", timeout=60, seen=dropped_before)
    dropped = time.monotonic()
    while guarded.log().count("generation cancelled") == before:
        assert time.monotonic() - dropped < 3, guarded.log()[-3000:]
        time.sleep(0.05)
    sock.close()


def socket_handshake(server, rcvbuf: int | None = None) -> socket.socket:
    """A raw WebSocket, its handshake done (with the key)."""
    sock = raw(server, rcvbuf)
    sock.sendall(b"GET /v1/audio/speech/stream/ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                 b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                 b"Sec-WebSocket-Version: 13\r\nAuthorization: Bearer " + KEY.encode() + b"\r\n\r\n")
    handshake = b""
    while b"\r\n\r\n" not in handshake:
        handshake += sock.recv(1)
    assert handshake.startswith(b"HTTP/1.1 101")
    return sock


def test_a_ping_flood_from_a_client_that_reads_nothing_holds_no_memory(guarded):
    """Every ping is answered with a pong, but not while the client takes nothing: the pongs would
    pile up in the server's memory (30 MB a second before) until the send timeout drops it."""
    sock = socket_handshake(guarded, rcvbuf=4096)
    ping = b"\x89" + bytes([0x80 | 125]) + b"\0\0\0\0" + b"p" * 125  # masked (all-zero mask), 125 bytes
    before, peak, sent = rss_bytes(guarded), 0, 0
    sock.settimeout(1.0)
    started = time.monotonic()
    try:
        while time.monotonic() - started < 10:
            sock.sendall(ping * 2000)
            sent += len(ping) * 2000
            peak = max(peak, rss_bytes(guarded) - before)
    except (TimeoutError, ConnectionResetError, BrokenPipeError):  # dropped at the send timeout
        pass
    peak = max(peak, rss_bytes(guarded) - before)
    sock.close()
    assert sent > 32 * 2**20, "the flood should outgrow the bound below"
    assert peak < 32 * 2**20, f"server memory grew {peak / 2**20:.0f} MB under {sent / 2**20:.0f} MB of pings"
    assert httpx.get(guarded.url + "/health", timeout=5).status_code == 200


class _Transport:
    """What a WebSocket protocol writes, as a transport would take it."""

    def __init__(self):
        self.out, self.closed = bytearray(), False

    def write(self, data):
        self.out += data

    def close(self):
        self.closed = True

    abort = close

    def is_closing(self):
        return self.closed

    def get_write_buffer_size(self):
        return len(self.out)

    def get_extra_info(self, name, default=None):
        return default

    def pause_reading(self):
        pass

    resume_reading = pause_reading


def test_a_slow_reader_gets_the_pong_of_its_latest_ping_once_it_reads_and_a_close_reply_always():
    """While the client's send buffer is full a ping's pong waits (only the latest ping's: a flood
    holds no memory); once the client reads, it goes out, so a keepalive over a slow link is still
    answered; a close that comes with a ping still gets its reply."""
    import asyncio

    from uvicorn.server import ServerState

    from http_server import Config, DrainingWebSocketProtocol

    def frame(opcode, payload=b""):
        return bytes([0x80 | opcode, 0x80 | len(payload)]) + b"\0\0\0\0" + payload  # masked, zero mask

    async def app(scope, receive, send):
        await receive()
        await send({"type": "websocket.accept"})
        await asyncio.sleep(3600)

    async def connected() -> tuple[DrainingWebSocketProtocol, _Transport]:
        config = Config(app, read_timeout=30, send_timeout=30, ws_ping_interval=None, ws_per_message_deflate=False)
        config.load()
        protocol, transport = DrainingWebSocketProtocol(config, ServerState(), {}), _Transport()
        protocol.connection_made(transport)
        protocol.data_received(b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                               b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
        await asyncio.sleep(0.05)
        transport.out.clear()
        protocol.pause_writing()  # the client takes nothing for now
        return protocol, transport

    async def scenario():
        protocol, transport = await connected()
        protocol.data_received(frame(0x9, b"one"))
        protocol.data_received(frame(0x9, b"two"))
        held = bytes(transport.out)
        protocol.resume_writing()  # the client reads again
        answered = bytes(transport.out)
        closing, closed_transport = await connected()
        closing.data_received(frame(0x9, b"p") + frame(0x8, b"\x03\xe8bye"))
        for task in [*protocol.tasks, *closing.tasks]:
            task.cancel()
        return held, answered, bytes(closed_transport.out), closed_transport.closed

    held, answered, at_close, closed = asyncio.run(scenario())
    assert held == b"" and answered == b"\x8a\x03two"  # one pong, the latest ping's, once it reads
    assert at_close == b"\x8a\x01p\x88\x05\x03\xe8bye" and closed  # the pong, then the close reply


def test_websocket_messages_are_not_compressed(guarded):
    """A client's default offer of permessage-deflate is declined: a small compressed message could
    inflate to the message limit on the event loop, stalling every stream."""
    url = guarded.url.replace("http://", "ws://") + "/v1/audio/speech/stream/ws"
    with connect(url, additional_headers=AUTH) as ws:  # the websockets library's defaults: it offers deflate
        assert ws.response.headers.get("Sec-WebSocket-Extensions") is None


# ---- item 11: an unhandled error is a 500 with an id, counted, logged once ----------------------


def test_an_unhandled_error_is_an_openai_500_with_its_request_id_counted_and_logged_once(voice_dir, caplog):
    from api_server import create_app
    from settings import load_settings

    app = create_app(load_settings(device="cpu", voice_dirs=[voice_dir]))

    @app.get("/boom")
    def boom():
        raise RuntimeError("a bug")

    client = TestClient(app)  # no lifespan: no models needed
    response = client.get("/boom", headers={"X-Request-ID": "boom-1"})
    assert response.status_code == 500 and response.headers["x-request-id"] == "boom-1"
    assert response.json()["error"] | {"message": ""} == {"message": "", "type": "server_error", "param": None,
                                                         "code": "internal_error"}
    assert 'echo_requests_total{route="/boom",status="500"} 1.0' in client.get("/metrics").text
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert len(tracebacks) == 1 and "a bug" in str(tracebacks[0].exc_info[1])


# ---- item 13: docs follow ECHO_PUBLIC_DOCS ------------------------------------------------------


def test_docs_need_the_key_unless_public(voice_dir):
    from api_server import create_app
    from settings import load_settings

    # (ECHO_PUBLIC_DOCS, ECHO_API_KEY) -> what a caller without a key gets
    for public_docs, api_key, anonymous_status in ((None, KEY, 401), (None, None, 200), (True, KEY, 200),
                                                   (False, None, 404)):
        settings = load_settings(device="cpu", voice_dirs=[voice_dir], api_key=api_key, public_docs=public_docs)
        client = TestClient(create_app(settings))
        for path in ("/docs", "/redoc", "/openapi.json"):
            anonymous = client.get(path)
            assert anonymous.status_code == anonymous_status, (public_docs, api_key, path)
            if anonymous_status == 401:
                assert anonymous.json()["error"]["code"] == "invalid_api_key"
                assert client.get(path, headers=AUTH).status_code == 200, path
        if anonymous_status == 401:
            assert "/v1/audio/speech" in client.get("/openapi.json", headers=AUTH).json()["paths"]
            # a browser opens the page with the key in the query, and the page loads the schema with it
            page = client.get("/docs", params={"api_key": KEY})
            assert page.status_code == 200 and "/openapi.json?api_key=" in page.text
            assert client.get("/openapi.json", params={"api_key": KEY}).status_code == 200
            assert client.get("/openapi.json", params={"api_key": "wrong"}).status_code == 401


# ---- item 12: shutdown drains WebSocket sessions ------------------------------------------------

SEGMENT = {"input": "Hello there. This is a test.", "voice": "alice", "block_sizes": [4] + [16] * 20,
           "num_steps": [1] + [8] * 20}


def ws_connect(server):
    return connect(server.url.replace("http://", "ws://") + "/v1/audio/speech/stream/ws")


def until_closed(ws, timeout=60) -> list:
    """Every message (dicts for JSON, bytes for audio) until the server closes the socket."""
    return messages(ws, timeout=timeout)


def test_sigterm_lets_a_socket_finish_its_segments_then_closes_it_1001(tiny_echo_dir, tiny_fish_dir, voice_dir,
                                                                       tmp_path):
    live = LiveServer(server_env(tiny_echo_dir, tiny_fish_dir, voice_dir, ECHO_SHUTDOWN_GRACE="120"),
                      tmp_path / "server.log")
    try:
        with ws_connect(live) as ws:
            ws.send(json.dumps({**SEGMENT, "segment_id": "a"}))
            ws.send(json.dumps({**SEGMENT, "segment_id": "b"}))
            assert json.loads(ws.recv(timeout=60)) == {"type": "start", "segment_id": "a", "sample_rate": 44100}
            assert isinstance(ws.recv(timeout=60), bytes)
            live.process.send_signal(signal.SIGTERM)
            wait_for_log(live, "Shutting down", timeout=10)
            ws.send(json.dumps({**SEGMENT, "segment_id": "late"}))
            got = until_closed(ws)
            code, reason = ws.close_code, ws.close_reason
        ends = {m["segment_id"]: m for m in got if isinstance(m, dict) and m["type"] == "end"}
        errors = {m["segment_id"]: m for m in got if isinstance(m, dict) and m["type"] == "error"}
        assert not ends["a"]["cancelled"] and not ends["b"]["cancelled"]
        assert ends["a"]["audio_seconds"] == ends["b"]["audio_seconds"] == round((4 + 320) * 2048 / 44100, 3)
        assert errors["late"]["error"]["code"] == "shutting_down"
        assert (code, reason) == (1001, "server shutting down")
        assert live.process.wait(timeout=60) == 0
        assert "Traceback" not in live.log()
    finally:
        if live.process.poll() is None:
            live.stop()


def test_at_the_end_of_the_grace_sockets_get_a_cancelled_end_and_streams_one_log_line(
        tiny_echo_dir, tiny_fish_dir, voice_dir, tmp_path):
    live = LiveServer(server_env(tiny_echo_dir, tiny_fish_dir, voice_dir, ECHO_SHUTDOWN_GRACE="2"),
                      tmp_path / "server.log")
    try:
        body = {"input": "Hi.", "voice": "alice", "response_format": "pcm", **LONG}
        with httpx.stream("POST", live.url + "/v1/audio/speech", json=body, timeout=60) as http, ws_connect(live) as ws:
            chunks = http.iter_raw()
            next(chunks)
            ws.send(json.dumps({"input": "Hi.", "voice": "alice", "segment_id": "long", **LONG}))
            ws.send(json.dumps({**SEGMENT, "segment_id": "queued"}))
            assert isinstance(until_first_audio(ws), bytes)
            live.process.send_signal(signal.SIGTERM)
            got = until_closed(ws)
            code, reason = ws.close_code, ws.close_reason
            with pytest.raises(httpx.RemoteProtocolError):  # the stream was cut, not completed
                for _ in chunks:
                    pass
        ends = {m["segment_id"]: m for m in got if isinstance(m, dict) and m["type"] == "end"}
        assert ends["long"]["cancelled"] and ends["long"]["reason"] == "server_shutdown"
        assert ends["queued"] == {"type": "end", "segment_id": "queued", "seed": None, "voice": None,
                                  "cancelled": True, "audio_seconds": 0.0, "reason": "server_shutdown"}
        assert (code, reason) == (1001, "server shutting down")
        assert live.process.wait(timeout=60) == 0
        log = live.log()
        assert log.count("still running when the shutdown grace ended") == 1
        assert "Traceback" not in log and "CancelledError" not in log
    finally:
        if live.process.poll() is None:
            live.stop()


def until_first_audio(ws):
    while isinstance(message := ws.recv(timeout=60), str):
        pass
    return message


def test_a_client_that_takes_some_of_a_full_buffer_is_not_dropped_as_stalled():
    """A listener playing a large piece as it comes keeps the transport's writes paused for as long as the
    piece plays: the send timeout dropped it after ECHO_SEND_TIMEOUT although it read all along."""
    from http_server import _SendTimeout

    class Base:
        def pause_writing(self):
            pass

    class Protocol(_SendTimeout, Base):
        pass

    class Transport:
        buffered, aborted = 1_000_000, False

        def get_write_buffer_size(self):
            return self.buffered

        def get_extra_info(self, name):
            return None

        def abort(self):
            self.aborted = True

    class Loop:
        def call_later(self, delay, callback):
            self.fire = callback
            return __import__("types").SimpleNamespace(cancel=lambda: None)

    protocol = Protocol()
    protocol.transport, protocol.loop = Transport(), Loop()
    protocol.config = __import__("types").SimpleNamespace(send_timeout=30)
    protocol.pause_writing()
    for left in (800_000, 300_000, 100):  # it takes some every 30 s: the clock starts again
        protocol.transport.buffered = left
        protocol.loop.fire()
        assert not protocol.transport.aborted
    protocol.loop.fire()  # 30 s with nothing taken: dropped
    assert protocol.transport.aborted


def test_a_steady_slow_reader_keeps_its_stream_and_one_that_reads_nothing_is_dropped():
    """Through a real socket: the kernel wakes the transport only once a third of a send buffer of up
    to 4 MiB is free, so a client reading 320 KB/s took megabytes while the transport's own buffer did
    not move, and was dropped after ECHO_SEND_TIMEOUT. The kernel's send queue counts as progress now;
    a client that reads nothing is still dropped."""
    import threading

    import uvicorn

    import http_server

    done = threading.Event()

    async def endless(scope, receive, send):  # 512 KiB pieces, as a stream's slices are, until the client goes
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            return await send({"type": "lifespan.shutdown.complete"})
        gone = asyncio.ensure_future(receive())  # (the request has no body: the next message is its disconnect)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"audio/pcm")]})
        while not gone.done() and not done.is_set():
            await send({"type": "http.response.body", "body": b"\0" * 524288, "more_body": True})
        gone.cancel()

    timeout, socks = 2.0, []
    config = http_server.Config(endless, read_timeout=10, send_timeout=timeout, host="127.0.0.1", port=free_port(),
                                http=http_server.BoundedH11Protocol, h11_max_incomplete_event_size=16384,
                                log_level="warning")
    server = uvicorn.Server(config)
    threading.Thread(target=server.run, daemon=True).start()
    try:
        while not server.started:
            time.sleep(0.05)
        steady, idle = socks = [socket.create_connection(("127.0.0.1", config.port)) for _ in range(2)]
        for sock in socks:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        got, started, idle_dropped = 0, time.monotonic(), None
        while time.monotonic() - started < 4 * timeout:
            time.sleep(0.1)
            got += len(steady.recv(32768))  # 320 KB/s
            if idle_dropped is None and idle.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                idle_dropped = time.monotonic() - started
        assert steady.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0 and got > 2_000_000
        assert idle_dropped is not None and idle_dropped < 3 * timeout
    finally:
        done.set()
        for sock in socks:
            sock.close()
        server.should_exit = True

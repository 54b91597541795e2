"""Operability: request ids in logs and headers, secrets kept out of logs, Prometheus metrics, a
500 in OpenAI's shape for an unhandled error, and request-size and body-read limits.

The pieces are plain ASGI middleware and one metrics object per app (its own registry: no
process-global metric state, so several apps, e.g. in tests, never share counters).
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import re
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.responses import JSONResponse
from starlette.routing import Match

from errors import RequestError

REQUEST_ID_HEADER = "x-request-id"
REPLICA_HEADER = "x-echo-replica"
_VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
# set when RequestContext ended a response as cut (StreamCut): the server's own line about it is expected
stream_cut: contextvars.ContextVar[bool] = contextvars.ContextVar("stream_cut", default=False)
# set when a WebSocket handshake was answered with an HTTP response (a 401): uvicorn's line that the app
# "returned without completing handshake" is then expected, not an error
handshake_denied: contextvars.ContextVar[bool] = contextvars.ContextVar("handshake_denied", default=False)


class StreamCut(Exception):
    """A streamed response failed after its status was sent (its failure is logged where it was
    raised). The response ends without its body's normal end, so that clients see it incomplete and
    raise, as they would not for a short file that ends like a whole one."""


log = logging.getLogger("echo_tts.requests")


# ---- logging ------------------------------------------------------------------------------------


class RequestIdFilter(logging.Filter):
    """Adds `request_id` to every record: the one passed in `extra`, else the current request's."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = request_id.get()
        return True


# `api_key=<key>` in a URL (how browsers authenticate the WebSocket; uvicorn logs the URL of every
# request and socket), wherever it stands (inside another parameter's value too: `next=/ws?api_key=`),
# its name's characters percent-encoded or not (`api%5Fkey`: Starlette decodes it and takes the key),
# and `Bearer <key>`, in a message or a traceback. In a URL a value runs to the next space, `&` or
# double quote (a URL carries those encoded: what follows is the log line's own); after `Bearer`, to
# the end of the line (a key may hold spaces, `&`, `;` or quotes).
def _any_case_or_encoded(word: str) -> str:
    return "".join(f"(?:{re.escape(ch)}|%{ord(ch.lower()):02x}|%{ord(ch.upper()):02x})" for ch in word)


_SECRET = re.compile(rf"(?i)({_any_case_or_encoded('api')}(?:[_-]|%5f|%2d)?{_any_case_or_encoded('key')}(?:=|%3d))"
                     r"[^\s&\"]+|(bearer\s+)[^\r\n]+")


def redact(text: str) -> str:
    """`text` with the values of API keys replaced by `[redacted]`."""
    return _SECRET.sub(lambda m: f"{m.group(1) or m.group(2)}[redacted]", text)


class RedactSecrets(logging.Filter):
    """Rewrites each record's message (and its traceback) with API keys redacted, so that no log
    line, access lines included, holds a key."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = redact(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        if record.exc_info and not record.exc_text:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, request_id, message (and the exception)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": self.formatTime(record), "level": record.levelname, "logger": record.name,
                 "request_id": getattr(record, "request_id", "-"), "message": record.getMessage()}
        if record.exc_info:
            entry["exception"] = record.exc_text or self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(debug: bool, as_json: bool) -> None:
    handler = server_log_handler(logging.StreamHandler(), as_json)
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, handlers=[handler], force=True)


def server_log_handler(handler: logging.Handler, as_json: bool) -> logging.Handler:
    """`handler` writing the server's log lines: request ids, keys redacted, JSON or plain text."""
    handler.addFilter(RequestIdFilter())
    handler.addFilter(RedactSecrets())
    handler.setFormatter(JsonFormatter() if as_json else logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"))
    return handler


def bearer_token(headers) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, if there is one."""
    scheme, _, token = headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


# ---- metrics ------------------------------------------------------------------------------------


class Metrics:
    """The server's Prometheus metrics, in a registry of their own."""

    def __init__(self, queue_length: Callable[[], int], active_streams: Callable[[], int],
                 gpu: torch.device | None = None, compiles_after_warm_up: Callable[[], int] = lambda: 0,
                 vad_rerolls: Callable[[], int] = lambda: 0, parked_streams: Callable[[], int] = lambda: 0,
                 adaptive_steps: Callable[[], tuple[float, int, int]] = lambda: (1.0, 0, 0),
                 memory_plan: Callable[[], tuple[int, int] | None] = lambda: None,
                 out_of_memory: Callable[[], tuple[int, int]] = lambda: (0, 0),
                 preparing: Callable[[], int] = lambda: 0, whole_file_bytes: Callable[[], int] = lambda: 0):
        self.registry = CollectorRegistry()
        self.requests = Counter("echo_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=self.registry)
        # by transport: http (a streamed body), sse, websocket (from the segment's turn on its socket), or
        # file (stream=false: the first byte is sent once the whole file is made)
        self.ttfb = Histogram("echo_time_to_first_byte_seconds", "From request to the first audio byte, by transport",
                              ["transport"], buckets=(0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 2, 5, 10, 30),
                              registry=self.registry)
        self.rtf = Histogram("echo_real_time_factor", "Request wall time / seconds of audio returned, by transport",
                             ["transport"], buckets=(0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 5),
                             registry=self.registry)
        self.audio_seconds = Counter("echo_audio_seconds", "Seconds of audio returned (at the requests' speed)",
                                     registry=self.registry)
        self.client_departures = Counter("echo_client_departures", "Streams whose client left after they began and "
                                         "before their end, by transport", ["transport"], registry=self.registry)
        self.stream_failures = Counter(
            "echo_stream_failures", "Streams that failed after they began (an HTTP stream's status was already "
            "200; a WebSocket segment after its start), by transport and error code", ["transport", "code"],
            registry=self.registry)
        self.segments = Counter(
            "echo_websocket_segments", "WebSocket messages that asked for speech, by the status an HTTP request "
            "would have got: 200 for a segment that started, else why it was refused before its start", ["status"],
            registry=self.registry)
        Gauge("echo_queue_length", "Requests waiting for a generation slot",
              registry=self.registry).set_function(queue_length)
        Gauge("echo_preparing_requests", "Requests holding a queue slot while their voice is prepared (a voice's "
              "first use encodes it)", registry=self.registry).set_function(preparing)
        Gauge("echo_active_streams", "Requests being generated", registry=self.registry).set_function(active_streams)
        Gauge("echo_whole_file_bytes", "Bytes whole files (stream=false) hold, being written or waiting for their "
              "clients; ECHO_MAX_WHOLE_FILES_BYTES at most", registry=self.registry).set_function(whole_file_bytes)
        Gauge("echo_parked_streams", "Requests waiting for their client to take the audio generated ahead of it "
              "(ECHO_MAX_AHEAD_SECONDS), out of the batch", registry=self.registry).set_function(parked_streams)
        Gauge("echo_compiles_after_warm_up", "torch.compile graphs built after warm-up (each one froze every "
              "stream while it compiled; warm-up should have covered its shape)",
              registry=self.registry).set_function(compiles_after_warm_up)
        Gauge("echo_vad_rerolls", "Blocks sampled again because their audio held a silence over "
              "ECHO_VAD_SILENCE_THRESHOLD_MS (counts up since start)", registry=self.registry).set_function(vad_rerolls)
        # ECHO_ADAPTIVE_STEPS: adaptive_steps() is (budget, reduced blocks, steps saved)
        for index, (name, doc) in enumerate((
                ("echo_adaptive_steps_budget", "Share of their requested diffusion steps above the floor that blocks "
                 "starting now get (ECHO_ADAPTIVE_STEPS; 1: as requested, 0: ECHO_ADAPTIVE_STEPS_FLOOR)"),
                ("echo_adaptive_reduced_blocks", "Blocks generated with fewer diffusion steps than requested "
                 "(ECHO_ADAPTIVE_STEPS; counts up since start)"),
                ("echo_adaptive_steps_saved", "Diffusion steps the reduced blocks did not take (ECHO_ADAPTIVE_STEPS; "
                 "counts up since start)"))):
            Gauge(name, doc, registry=self.registry).set_function(lambda index=index: adaptive_steps()[index])
        # out_of_memory() is (units split, jobs failed): the worker's answer to a device out of memory
        for index, (name, doc) in enumerate((
                ("echo_out_of_memory_splits", "Units of work (several streams' steps, decodes, texts or prefixes) "
                 "that ran out of device memory and were computed again in halves (counts up since start)"),
                ("echo_out_of_memory_failures", "Requests that failed (503) because their own work did not fit in "
                 "device memory (counts up since start; lower ECHO_MAX_ACTIVE if it grows)"))):
            Gauge(name, doc, registry=self.registry).set_function(lambda index=index: out_of_memory()[index])
        if gpu is not None and gpu.type == "cuda":
            for name, doc, read in (
                    ("echo_gpu_memory_allocated_bytes", "CUDA memory held by tensors", torch.cuda.memory_allocated),
                    ("echo_gpu_memory_reserved_bytes", "CUDA memory reserved by the caching allocator",
                     torch.cuda.memory_reserved),
                    ("echo_gpu_memory_peak_bytes", "Most CUDA memory held by tensors at once since start",
                     torch.cuda.max_memory_allocated)):
                Gauge(name, doc, registry=self.registry).set_function(lambda read=read: read(gpu))
            # the memory plan of the static-shape path (runtime.MemoryPlan): beside the peak, what it predicted
            for index, (name, doc) in enumerate((
                    ("echo_memory_plan_need_bytes", "CUDA memory the static-shape path was planned to need at "
                     "ECHO_MAX_ACTIVE (0: no plan, as on the eager path)"),
                    ("echo_memory_plan_worst_bytes", "CUDA memory the static-shape path was planned to hold at worst "
                     "(0: no plan)"))):
                Gauge(name, doc, registry=self.registry).set_function(
                    lambda index=index: (memory_plan() or (0, 0))[index])

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class StreamTiming:
    """Time to first byte and real-time factor of one response, reported once to Metrics, under its
    `transport`: http, sse, websocket or file."""

    def __init__(self, metrics: Metrics, started: float, transport: str):
        self.metrics, self.started, self.transport, self.first_byte = metrics, started, transport, None

    def sent(self) -> None:
        if self.first_byte is None:
            self.first_byte = time.perf_counter()
            self.metrics.ttfb.labels(self.transport).observe(self.first_byte - self.started)

    def finished(self, audio_seconds: float) -> None:
        if audio_seconds > 0:
            self.metrics.audio_seconds.inc(audio_seconds)
            self.metrics.rtf.labels(self.transport).observe((time.perf_counter() - self.started) / audio_seconds)

    def failed(self, error: RequestError) -> None:
        """The stream failed after it began."""
        self.metrics.stream_failures.labels(self.transport, error.code).inc()

    def left(self) -> None:
        """The client left before the stream's end (its status said 200: only this tells)."""
        self.metrics.client_departures.labels(self.transport).inc()


# ---- ASGI middleware ------------------------------------------------------------------------------


def error_response(error: RequestError, close: bool = False) -> JSONResponse:
    """The one mapping of the domain error to HTTP: its status, OpenAI's error object and the headers
    its status brings (with `close`, `Connection: close`: nothing more is read from the connection)."""
    headers = (error.headers or {}) | ({"Connection": "close"} if close else {})
    return JSONResponse({"error": error.detail()}, status_code=error.status, headers=headers or None)


def read_timed_out(timeout: float, body: bool = False) -> JSONResponse:
    """408 for a request whose head (or `body`: see BodySizeLimit) stopped arriving; the connection
    closes after it."""
    message = (f"the request body stalled for {timeout:g} s, or arrived slower than {BODY_MIN_RATE} bytes/s after "
               f"a grace of {timeout:g} s (ECHO_READ_TIMEOUT)" if body else
               f"the request did not arrive within {timeout:g} s (ECHO_READ_TIMEOUT)")
    return error_response(RequestError(message, status=408), close=True)


class RequestContext:
    """Gives each HTTP request an id (the client's X-Request-ID when sane, else a new one), puts it
    in the logs and the response headers, and counts responses by route and status. With a
    `replica` name, every response and WebSocket handshake also says which replica answered.
    `id_header=False` leaves the X-Request-ID response header to a proxy that adds its own.

    An exception that escapes the app before its response started is logged here, once, with its
    traceback and request id, and answered as a 500 in OpenAI's shape (counted, with the id).

    A response sent before routing (a middleware's 401, 413 or 408; a static file) is counted under
    the path template of the first of `routes` its path matches, else "unmatched"."""

    def __init__(self, app, metrics: Metrics, replica: str | None = None, id_header: bool = True,
                 routes: Sequence = ()):
        self.app, self.metrics, self.id_header, self.routes = app, metrics, id_header, routes
        self.replica = [(REPLICA_HEADER.encode(), replica.encode("latin-1"))] if replica else []

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(REQUEST_ID_HEADER.encode(), b"").decode("latin-1")
        rid = given if _VALID_REQUEST_ID.match(given) else uuid.uuid4().hex
        token = request_id.set(rid)
        as_sent = {k: scope.get(k) for k in ("type", "path", "root_path", "method")}  # (routing rewrites it)
        if scope["type"] == "websocket":  # (the socket's id: in its log lines, before its segments' ids)
            try:
                return await self.app(scope, receive, self._handshake(scope, as_sent, send, rid))
            finally:
                request_id.reset(token)
        scope.setdefault("state", {})["started"] = time.perf_counter()
        started = False

        async def send_with_id(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                self._answered(message, message["status"], scope, as_sent, rid)
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception as e:
            if started and isinstance(e, StreamCut):  # never completed: the server closes the connection
                stream_cut.set(True)
                return
            if started:  # too late for an error response: the server logs it and closes the connection
                raise
            log.exception("unhandled error; answered 500")
            error = RequestError("the server failed while handling this request; its log names the cause "
                                 f"under request id {rid}", status=500, code="internal_error")
            await error_response(error)(scope, receive, send_with_id)
        finally:
            request_id.reset(token)

    def _answered(self, message: dict, status: int, scope, as_sent: dict, rid: str) -> None:
        """A response's start (or a WebSocket handshake's answer): the request id and the replica in
        its headers, and the response counted under its route and status."""
        id_header = [(REQUEST_ID_HEADER.encode(), rid.encode())] if self.id_header else []
        message["headers"] = [*message.get("headers", []), *id_header, *self.replica]
        route = scope.get("route") or self._route_of(as_sent)
        self.metrics.requests.labels(getattr(route, "path", None) or "unmatched", str(status)).inc()

    def _route_of(self, scope: dict):
        """The route whose path matches `scope`'s (as the request came, whatever its method), if any."""
        return next((route for route in self.routes if route.matches(scope)[0] != Match.NONE), None)

    def _handshake(self, scope, as_sent: dict, send, rid: str):
        """`send` for a WebSocket: its handshake's answer (the 101, or an HTTP refusal) is answered as
        an HTTP response's start is (`_answered`)."""

        async def send_handshake(message):
            status = {"websocket.accept": 101, "websocket.http.response.start": message.get("status")}.get(
                message["type"])
            if status is not None:
                self._answered(message, status, scope, as_sent, rid)
                if status != 101:
                    handshake_denied.set(True)
            await send(message)
        return send_handshake


# a body must arrive at least this fast on average, after a grace of ECHO_READ_TIMEOUT: one that trickles in a
# byte per read timeout would hold its connection, task and buffer for days (a 16 MiB body needs at most 68 min)
BODY_MIN_RATE = 4096  # bytes/s (32 kbit/s)
BODILESS = ("GET", "HEAD", "OPTIONS")  # methods whose requests carry no body here (nor need a key to be read)


@dataclass(frozen=True)
class BodyLimit:
    """The most bytes a request's body may hold, and what the 413 refusing more says (`close`: with
    Connection: close, the rest of the body is never read)."""

    max_bytes: int
    refusal: str
    close: bool = False

    def response(self) -> JSONResponse:
        return error_response(RequestError(self.refusal, status=413), close=self.close)


class BodySizeLimit:
    """Refuses request bodies over their limit (`limit_of(scope)`) with 413: at once when
    Content-Length says so, else (a chunked upload) after reading at most the limit + one piece, which
    are then replayed to the app. A body that pauses for more than `read_timeout` seconds between
    pieces, or arrives slower than BODY_MIN_RATE on average after a grace of `read_timeout`, gets 408
    and its connection closes: a stalled or trickling upload would otherwise hold its buffer and its
    task forever."""

    def __init__(self, app, limit_of: Callable[[dict], BodyLimit], read_timeout: float | None = None):
        self.app, self.limit_of, self.read_timeout = app, limit_of, read_timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.limit_of(scope)
        declared = dict(scope["headers"]).get(b"content-length")
        body = _TimedBody(scope, receive, send, self.read_timeout)
        if declared is not None:
            if declared.isdigit() and int(declared) > limit.max_bytes:
                return await limit.response()(scope, receive, send)
            return await self.app(scope, body.receive, body.send)  # the server enforces the declared length
        pieces, size, more = [], 0, True
        while more:
            message = await body.receive()
            if message["type"] != "http.request":
                return  # the client went away, or stalled and was answered 408
            pieces.append(message.get("body", b""))
            size += len(pieces[-1])
            more = message.get("more_body", False)
            if size > limit.max_bytes:
                return await limit.response()(scope, receive, send)
        whole, replayed = b"".join(pieces), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": whole, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


class _TimedBody:
    """One request's `receive` and `send` with a read timeout: while the body is incomplete, a
    receive that waits longer than `timeout`, or past the body's deadline (`timeout` after the
    headers, plus a second for every BODY_MIN_RATE bytes received), answers 408 (unless a response
    has started), tells the app that the client is gone, and drops whatever the app sends after that."""

    def __init__(self, scope, receive, send, timeout: float | None):
        self.scope, self._receive, self._send, self.timeout = scope, receive, send, timeout
        self.complete = timeout is None
        self.timed_out = self.responding = False
        self.received, self.started = 0, asyncio.get_running_loop().time()
        self.last = self.started  # when the headers or the latest piece came

    async def receive(self):
        if self.timed_out:
            return {"type": "http.disconnect"}
        if self.complete:
            return await self._receive()
        deadline = min(self.last + self.timeout, self.started + self.timeout + self.received / BODY_MIN_RATE)
        try:  # (not wait_for: on Python 3.11 it can swallow a cancellation)
            async with asyncio.timeout_at(deadline):
                message = await self._receive()
        except TimeoutError:
            self.timed_out = True
            log.info("request body stalled or too slow (ECHO_READ_TIMEOUT, %d bytes/s): answered 408", BODY_MIN_RATE)
            if not self.responding:
                await read_timed_out(self.timeout, body=True)(self.scope, self._receive, self._send)
            return {"type": "http.disconnect"}
        self.received += len(message.get("body", b""))
        self.last = asyncio.get_running_loop().time()
        self.complete = message["type"] != "http.request" or not message.get("more_body", False)
        return message

    async def send(self, message):
        if self.timed_out:
            return
        self.responding = True
        await self._send(message)

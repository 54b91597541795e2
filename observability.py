"""Operability: request ids in logs and headers, Prometheus metrics, and request-size limits.

The pieces are plain ASGI middleware and one metrics object per app (its own registry: no
process-global metric state, so several apps, e.g. in tests, never share counters).
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import time
import uuid
from collections.abc import Callable

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

REQUEST_ID_HEADER = "x-request-id"
REPLICA_HEADER = "x-echo-replica"
_VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


# ---- logging ------------------------------------------------------------------------------------


class RequestIdFilter(logging.Filter):
    """Adds `request_id` to every record: the one passed in `extra`, else the current request's."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = request_id.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, request_id, message (and the exception)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": self.formatTime(record), "level": record.levelname, "logger": record.name,
                 "request_id": getattr(record, "request_id", "-"), "message": record.getMessage()}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(debug: bool, as_json: bool) -> None:
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter() if as_json else logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"))
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, handlers=[handler], force=True)


def bearer_token(headers) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, if there is one."""
    scheme, _, token = headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


# ---- metrics ------------------------------------------------------------------------------------


class Metrics:
    """The server's Prometheus metrics, in a registry of their own."""

    def __init__(self, queue_length: Callable[[], int], active_streams: Callable[[], int],
                 gpu: torch.device | None = None, compiles_after_warm_up: Callable[[], int] = lambda: 0,
                 vad_rerolls: Callable[[], int] = lambda: 0):
        self.registry = CollectorRegistry()
        self.requests = Counter("echo_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=self.registry)
        self.ttfb = Histogram("echo_time_to_first_byte_seconds", "From request to the first audio byte",
                              buckets=(0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 2, 5, 10, 30), registry=self.registry)
        self.rtf = Histogram("echo_real_time_factor", "Request wall time / seconds of audio returned",
                             buckets=(0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 5), registry=self.registry)
        self.audio_seconds = Counter("echo_audio_seconds", "Seconds of audio generated", registry=self.registry)
        Gauge("echo_queue_length", "Requests waiting for a generation slot",
              registry=self.registry).set_function(queue_length)
        Gauge("echo_active_streams", "Requests being generated", registry=self.registry).set_function(active_streams)
        Gauge("echo_compiles_after_warm_up", "torch.compile graphs built after warm-up (each one froze every "
              "stream while it compiled; warm-up should have covered its shape)",
              registry=self.registry).set_function(compiles_after_warm_up)
        Gauge("echo_vad_rerolls", "Blocks sampled again because their audio held a silence over "
              "ECHO_VAD_SILENCE_THRESHOLD_MS (counts up since start)", registry=self.registry).set_function(vad_rerolls)
        if gpu is not None and gpu.type == "cuda":
            for name, doc, read in (
                    ("echo_gpu_memory_allocated_bytes", "CUDA memory held by tensors", torch.cuda.memory_allocated),
                    ("echo_gpu_memory_reserved_bytes", "CUDA memory reserved by the caching allocator",
                     torch.cuda.memory_reserved),
                    ("echo_gpu_memory_peak_bytes", "Most CUDA memory held by tensors at once since start",
                     torch.cuda.max_memory_allocated)):
                Gauge(name, doc, registry=self.registry).set_function(lambda read=read: read(gpu))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class StreamTiming:
    """Time to first byte and real-time factor of one response, reported once to Metrics."""

    def __init__(self, metrics: Metrics, started: float):
        self.metrics, self.started, self.first_byte = metrics, started, None

    def sent(self) -> None:
        if self.first_byte is None:
            self.first_byte = time.perf_counter()
            self.metrics.ttfb.observe(self.first_byte - self.started)

    def finished(self, audio_seconds: float) -> None:
        if audio_seconds > 0:
            self.metrics.audio_seconds.inc(audio_seconds)
            self.metrics.rtf.observe((time.perf_counter() - self.started) / audio_seconds)


# ---- ASGI middleware ------------------------------------------------------------------------------


class RequestContext:
    """Gives each HTTP request an id (the client's X-Request-ID when sane, else a new one), puts it
    in the logs and the response headers, and counts responses by route and status. With a
    `replica` name, every response and WebSocket handshake also says which replica answered.
    `id_header=False` leaves the X-Request-ID response header to a proxy that adds its own."""

    def __init__(self, app, metrics: Metrics, replica: str | None = None, id_header: bool = True):
        self.app, self.metrics, self.id_header = app, metrics, id_header
        self.replica = [(REPLICA_HEADER.encode(), replica.encode("latin-1"))] if replica else []

    async def __call__(self, scope, receive, send):
        if scope["type"] == "websocket":
            return await self.app(scope, receive, self._accept_with_replica(send))
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(REQUEST_ID_HEADER.encode(), b"").decode("latin-1")
        rid = given if _VALID_REQUEST_ID.match(given) else uuid.uuid4().hex
        token = request_id.set(rid)
        scope.setdefault("state", {})["started"] = time.perf_counter()

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                id_header = [(REQUEST_ID_HEADER.encode(), rid.encode())] if self.id_header else []
                message["headers"] = [*message.get("headers", []), *id_header, *self.replica]
                route = scope.get("route")
                path = getattr(route, "path", None) or "unmatched"
                self.metrics.requests.labels(path, str(message["status"])).inc()
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            request_id.reset(token)

    def _accept_with_replica(self, send):
        async def send_accept(message):
            if message["type"] == "websocket.accept" and self.replica:
                message["headers"] = [*message.get("headers", []), *self.replica]
            await send(message)
        return send_accept


class BodySizeLimit:
    """Refuses request bodies over `max_bytes` with 413: at once when Content-Length says so, else
    (a chunked upload) after reading at most `max_bytes` + 1 bytes, which are then replayed to the app."""

    def __init__(self, app, max_bytes: int, too_large: Callable[[int], object]):
        self.app, self.max_bytes, self.too_large = app, max_bytes, too_large

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            if declared.isdigit() and int(declared) > self.max_bytes:
                return await self.too_large(self.max_bytes)(scope, receive, send)
            return await self.app(scope, receive, send)  # the server enforces the declared length
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                return await self.too_large(self.max_bytes)(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

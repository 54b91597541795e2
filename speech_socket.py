"""Speech over a WebSocket (`/v1/audio/speech/stream/ws`), the fork's protocol for voice agents.

Client -> server, JSON text messages:
- a segment: `{"input", "voice", "segment_id", "seed", "extra_body": {...}, "continue": true}`, with
  any setting of `POST /v1/audio/speech` at the top level or in `extra_body` (same validation, same
  messages). Segments are queued and answered in order; `"continue": false` closes the socket once
  the queued segments are done (cancels still apply meanwhile; later segments get an `error`).
- `{"type": "cancel", "segment_id"}`: stops that segment within one diffusion step, or drops it
  while it is still queued.

Server -> client, per segment: `{"type": "start", "segment_id", "sample_rate"}`, binary messages of
16-bit little-endian mono PCM at that rate (the segment's `sample_rate`, else ECHO_OUTPUT_SAMPLE_RATE,
else 24 kHz for OpenAI's models and 44.1 kHz otherwise, as over HTTP) of at most ECHO_WS_MAX_FRAME_BYTES
each (whole samples; each decoded block is cut into them as soon as it is encoded, so a client's
default message limit, 1 MiB for `websockets`, always holds), then
`{"type": "end", "segment_id", "seed", "voice", "audio_seconds", "cancelled"}` (with ECHO_ADAPTIVE_STEPS
also `steps`, the diffusion steps each block took). Empty input gets
`{"type": "no_op", "reason": "empty_input", "segment_id"}`; a failed segment gets
`{"type": "error", "error": {message, type, param, code}, "message", "segment_id"}` and the socket
stays usable (so do messages that are not JSON objects, hold NaN or Infinity, or are binary frames:
an error message with `segment_id` null). A client that disconnects, or takes nothing for
ECHO_SEND_TIMEOUT, cancels everything it had queued.

A segment's life is always closed: `start` is sent only once the segment is validated and its job
started (its settings, its output rate, a queue slot, its voice resolved and prepared), so a segment
refused gets one `error` and nothing else; every `start` is followed by one `end`: after its audio,
after a cancel (`"cancelled": true`), or after the `error` of a generation that failed midway
(`"cancelled": true, "reason": "error"`). A segment cancelled before it started (queued, or while
its voice was prepared) gets an `end` with `"cancelled": true` and no `start`.

The handshake without a valid key is refused with HTTP 401 and OpenAI's error body, as the HTTP
routes answer (a server without the ASGI denial-response extension closes it with 1008 instead).

On shutdown (SIGTERM) a socket drains as HTTP streams do: new segments get an error, the queued and
running ones finish and get their `end`, then the socket closes with 1001 "server shutting down".
Segments still running when ECHO_SHUTDOWN_GRACE ends get `end` with `"cancelled": true` and
`"reason": "server_shutdown"` (queued ones too), then the same close.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from observability import Metrics, StreamTiming, bearer_token, error_response, request_id
from pipeline import Speech, open_speech
from service import SpeechService
from settings import Settings
from errors import RequestError
from speech_request import SpeechRequest, check_json_values, request_error
from text_chunking import prepare_text

log = logging.getLogger("echo_tts.socket")
PROTOCOL_KEYS = ("segment_id", "continue", "type")  # message keys that are not speech settings
MAX_SEGMENT_ID = 256  # characters of a string segment_id
GOING_AWAY, POLICY_VIOLATION, INTERNAL_ERROR, TRY_AGAIN_LATER = 1001, 1008, 1011, 1013  # close codes
SHUTTING_DOWN = "server shutting down"  # the close reason on shutdown
SHUTDOWN = "server_shutdown"  # the `reason` of an `end` cut by the end of the shutdown grace
FAILED = "error"  # the `reason` of an `end` that follows the `error` of a segment that had started
DENIAL_RESPONSE = "websocket.http.response"  # the ASGI extension that answers a handshake with HTTP
UNAUTHORIZED = "missing or invalid API key: send 'Authorization: Bearer <key>' or, from a browser, '?api_key=<key>'"


class SendTimeout(Exception):
    """The client took nothing for ECHO_SEND_TIMEOUT: it is dropped."""


@dataclass
class Segment:
    """One queued request of a socket."""

    segment_id: Any
    message: dict
    size: int = 0  # bytes of its message, counted against what one socket may hold queued
    cancelled: bool = False
    reason: str | None = None  # why it was cancelled, when the server did it
    speech: Speech | None = None  # once started


@dataclass
class Session:
    """One socket: its queue of segments and the one being generated."""

    websocket: WebSocket
    service: SpeechService
    metrics: Metrics  # the server's: a segment counts as an HTTP response does (first byte, audio seconds)
    queue: list[Segment] = field(default_factory=list)
    current: Segment | None = None
    closing: bool = False  # "continue": false was received
    draining: bool = False  # the server shuts down: no new segments, close after the queued ones
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    # in its log lines, before segment ids: the handshake's X-Request-ID (RequestContext), else a new one
    socket_id: str = field(default_factory=lambda: request_id.get() if request_id.get() != "-" else uuid.uuid4().hex)

    async def send(self, message: dict) -> None:
        """A JSON message, strictly JSON (no NaN or Infinity)."""
        await self._in_time(self.websocket.send_text(json.dumps(message, allow_nan=False)))

    async def send_audio(self, data: bytes) -> None:
        """Encoded pcm as binary messages of at most ECHO_WS_MAX_FRAME_BYTES, each sent as soon as it
        is cut: one block whole (2 MB for a 480-frame block) is over most clients' message limits."""
        for frame in frames(data, self.service.settings.ws_max_frame_bytes):
            await self._in_time(self.websocket.send_bytes(frame))

    async def refuse(self, segment_id: Any, error: RequestError) -> None:
        """A message refused before any segment started from it: its error, counted by status."""
        self.metrics.segments.labels(str(error.status)).inc()
        await self.error(segment_id, error)

    async def error(self, segment_id: Any, error: RequestError) -> None:
        await self.send({"type": "error", "error": error.detail(), "message": str(error), "segment_id": segment_id})

    async def close(self, code: int = 1000, reason: str | None = None) -> None:
        await self._in_time(self.websocket.close(code, reason))

    async def _in_time(self, sending: Awaitable[None]) -> None:
        """Send, or raise SendTimeout when the client takes nothing for ECHO_SEND_TIMEOUT (a full
        send buffer blocks the send)."""
        timeout = self.service.settings.send_timeout
        try:
            async with asyncio.timeout(timeout):  # (not wait_for: on Python 3.11 it can swallow a cancellation)
                await sending
        except TimeoutError:
            raise SendTimeout(f"the client took nothing for {timeout:g} s (ECHO_SEND_TIMEOUT)") from None

    def cancel_all(self, reason: str | None = None) -> None:
        for segment in [self.current, *self.queue]:
            if segment is not None:
                _cancel(segment, reason)


def frames(data: bytes, limit: int) -> Iterator[bytes]:
    """`data` cut into pieces of at most `limit` bytes, in order. `limit` is even (settings), so a
    16-bit sample is never split between two messages."""
    view = memoryview(data)
    for offset in range(0, len(view), limit):
        yield bytes(view[offset:offset + limit])


def authorized(websocket: WebSocket, settings: Settings) -> bool:
    """`Authorization: Bearer <key>` or, for browsers (which cannot set headers), `?api_key=<key>`."""
    token = bearer_token(websocket.headers)
    return settings.accepts_key(token if token is not None else websocket.query_params.get("api_key"))


async def refuse_key(websocket: WebSocket) -> None:
    """Answer the handshake with HTTP 401 and OpenAI's error body, as the HTTP routes answer a
    missing or wrong key. A server without the denial-response extension (uvicorn has it; another
    ASGI server may not) gets a close before accepting, which clients see as 403."""
    if DENIAL_RESPONSE not in (websocket.scope.get("extensions") or {}):
        await websocket.close(code=POLICY_VIOLATION, reason="missing or invalid API key")
        return
    error = RequestError(UNAUTHORIZED, status=401)
    await websocket.send_denial_response(error_response(error))


async def serve(websocket: WebSocket, service: SpeechService, metrics: Metrics) -> None:
    """The whole life of one socket: a reader queues what the client sends, a writer answers it in
    order; every segment it queued ends with it."""
    settings = service.settings
    if not authorized(websocket, settings):
        await refuse_key(websocket)
        return
    await websocket.accept()
    session = Session(websocket, service, metrics)
    request_id.set(session.socket_id)
    if reason := service.unready_reason():
        try:
            await session.error(None, RequestError(reason, status=503))
            await session.close(code=TRY_AGAIN_LATER)
        except (WebSocketDisconnect, RuntimeError, SendTimeout):
            pass  # the client is gone already
        return
    stop_watching = _watch_drain(session)
    reader = asyncio.create_task(_read(session))
    writer = asyncio.create_task(_answer(session))
    try:
        # the writer closed the socket (its queue answered after "continue": false, or it failed), or the
        # reader saw the client leave: either way nothing it queued is wanted any more
        await asyncio.wait({reader, writer}, return_when=asyncio.FIRST_COMPLETED)
        reader.cancel()
        if reader.done() and not writer.done():  # the client left: nothing the writer awaits is wanted (a voice
            writer.cancel()  # being prepared gives its queue slot back now)
        session.cancel_all()
        session.closing = True
        session.wake.set()
        await asyncio.wait({reader, writer})  # (not gather: a cancellation must reach us with its message)
        for task in (reader, writer):
            if not task.cancelled():
                task.exception()  # (retrieved: how the socket ended is settled above)
    finally:
        stop_watching()
        session.cancel_all()
        reader.cancel()
        writer.cancel()


def _watch_drain(session: Session) -> Callable[[], None]:
    """Follow the server's shutdown (http_server.Drain in app.state, when served by it): stop taking
    segments when it starts, cancel what is left when its grace is over. Returns the unsubscribe."""
    drain = getattr(session.websocket.app.state, "drain", None)
    if drain is None:
        return lambda: None

    def changed() -> None:
        session.draining = True
        if drain.over:
            session.cancel_all(SHUTDOWN)
        session.wake.set()

    return drain.watch(changed)


async def _read(session: Session) -> None:
    """Queue segments and apply cancels until the client leaves. After `"continue": false` it
    still reads: cancels (a voice agent interrupting the last segment) and the client's leaving count
    until the socket closes, and so do the pongs of keepalive pings; new segments are refused."""
    limit, max_queued = session.service.settings.max_body_bytes, session.service.settings.ws_max_queue
    while True:
        received = await session.websocket.receive()
        if received["type"] == "websocket.disconnect":
            return
        text = received.get("text")
        try:
            if text is None:
                raise RequestError("binary frames are not accepted: send each message as JSON text",
                                   code="invalid_message")
            if len(text.encode()) > limit:
                raise RequestError(f"the message is larger than {limit} bytes (ECHO_MAX_BODY_BYTES)", status=413)
            message = _parse(text, session.service.settings.max_input_chars)
        except RequestError as e:
            await session.refuse(None, e)
            continue
        if message.get("type") == "cancel":
            await _cancel_id(session, message.get("segment_id"))
            continue
        if session.draining:
            await session.refuse(message.get("segment_id"), RequestError(
                "the server is shutting down: it takes no new segments", status=503, code="shutting_down"))
        elif session.closing:
            await session.refuse(message.get("segment_id"), RequestError(
                'this socket closes once its queued segments are answered ("continue": false came): it takes no '
                "new segments", code="socket_closing"))
        elif len(session.queue) >= max_queued:
            await session.refuse(message.get("segment_id"), RequestError(
                f"more than {max_queued} segments are queued on this socket (ECHO_WS_MAX_QUEUE)", status=429))
        elif sum(q.size for q in session.queue) + len(text) > limit:  # memory: one body's worth per socket
            await session.refuse(message.get("segment_id"), RequestError(
                f"the segments queued on this socket would hold more than {limit} bytes (ECHO_MAX_BODY_BYTES); "
                f"wait for their audio", status=429))
        else:
            session.queue.append(Segment(message.get("segment_id"), message, len(text)))
        if message.get("continue") is False:  # even when refused: the socket closes once the queue is done
            session.closing = True
        session.wake.set()


class _NotJson(ValueError):
    """A number or constant strict JSON does not allow."""


def _no_constant(name: str) -> Any:
    raise _NotJson(f"{name} is not a JSON value")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _NotJson(f"the number {text[:20]} is out of range")
    return value


def _parse(text: str, max_input_chars: int) -> dict:
    """A message as a JSON object; anything else (invalid, NaN or Infinity, numbers out of range,
    deep nesting, more values than a request needs) is a RequestError for an error message."""
    check_json_values(text, max_input_chars, "the message")
    try:
        message = json.loads(text, parse_constant=_no_constant, parse_float=_finite_float)
    except RecursionError:
        raise RequestError("the message is nested too deeply", code="invalid_json") from None
    except _NotJson as e:
        raise RequestError(f"the message is not valid JSON: {e}", code="invalid_json") from None
    except json.JSONDecodeError:
        raise RequestError("the message is not valid JSON", code="invalid_json") from None
    except ValueError:  # an integer with more digits than Python converts
        raise RequestError("the message is not valid JSON: a number has too many digits", code="invalid_json") from None
    if not isinstance(message, dict):
        raise RequestError("a message must be a JSON object", code="invalid_json")
    segment_id = message.get("segment_id")  # echoed in every answer, and named in the log
    if not (segment_id is None or isinstance(segment_id, (int, float)) and not isinstance(segment_id, bool)
            or isinstance(segment_id, str) and len(segment_id) <= MAX_SEGMENT_ID):
        raise RequestError(f"segment_id must be a string of at most {MAX_SEGMENT_ID} characters, a number or null",
                           "segment_id")
    return message


async def _cancel_id(session: Session, segment_id: Any) -> None:
    """Stop the running segment of that id (its end follows its last audio) and drop queued ones."""
    if session.current is not None and session.current.segment_id == segment_id:
        _cancel(session.current)
    dropped = [q for q in session.queue if q.segment_id == segment_id]
    session.queue[:] = [q for q in session.queue if q.segment_id != segment_id]  # all before the first await:
    for segment in dropped:  # a send may wait (a slow client), and the writer takes the next one meanwhile
        _cancel(segment)
    for segment in dropped:
        await session.send(_dropped(segment))


def _cancel(segment: Segment, reason: str | None = None) -> None:
    if not segment.cancelled:
        segment.cancelled, segment.reason = True, reason
    if segment.speech is not None:
        segment.speech.stop()


def _dropped(segment: Segment) -> dict:
    """The end of a segment cancelled before it started."""
    return {"type": "end", "segment_id": segment.segment_id, "seed": None, "voice": None,  # (chosen at its start)
            "cancelled": True, "audio_seconds": 0.0, **({"reason": segment.reason} if segment.reason else {})}


async def _answer(session: Session) -> None:
    """Answer queued segments in order; close the socket after the last one when asked to (1000) or
    when the server shuts down (1001)."""
    try:
        while True:
            while not session.queue:
                if session.closing:
                    await session.close()
                    return
                if session.draining:
                    await session.close(GOING_AWAY, SHUTTING_DOWN)
                    return
                session.wake.clear()
                await session.wake.wait()
            session.current = session.queue.pop(0)
            # the segment's log lines (the worker's among them) carry the socket's id and the segment's
            logged_as = request_id.set(f"{session.socket_id}/{_loggable(session.current.segment_id)}")
            try:
                await _answer_one(session, session.current)
            finally:
                session.current = None
                request_id.reset(logged_as)
    except SendTimeout as e:
        log.info("%s: dropping it and its segments", e)
    except WebSocketDisconnect:  # the client left while we were writing
        return
    except Exception:  # noqa: BLE001 - Starlette's RuntimeError for a send after the socket closed, or a bug
        if not _open(session.websocket):
            log.debug("the socket closed while its writer was sending", exc_info=True)
            return
        log.exception("the socket's writer failed; closing it with 1011")
        with contextlib.suppress(Exception):
            await session.close(INTERNAL_ERROR, "internal error: see the server log")


def _open(websocket: WebSocket) -> bool:
    """Whether both ends still hold the socket open."""
    return WebSocketState.CONNECTED == websocket.client_state == websocket.application_state


async def _answer_one(session: Session, segment: Segment) -> None:
    """One segment, its life closed: refused before `start` (only an `error`), dropped before
    `start` (only an `end`), or started, and then always ended (its `error` first when it failed)."""
    if segment.cancelled:  # while it was queued (the shutdown grace ended)
        await session.send(_dropped(segment))
        return
    # empty once cleaned as HTTP cleans it (BOMs, controls, spaces). Only an input within ECHO_MAX_INPUT_CHARS is
    # cleaned here, on the event loop: a longer one (14M characters took 0.25 s) or one that is not a string is
    # refused by the request's validation below, from its length
    text = segment.message.get("input", "")
    if isinstance(text, str) and len(text) <= session.service.settings.max_input_chars and not prepare_text(text):
        await session.send({"type": "no_op", "reason": "empty_input", "segment_id": segment.segment_id})
        return
    timing = StreamTiming(session.metrics, time.perf_counter(), "websocket")  # from its turn: not the client's queue
    try:  # everything that may refuse a segment is checked here, before its `start`
        segment.speech = speech = await open_speech(session.service, _speech_request(segment.message), streaming=True)
    except RequestError as e:
        await session.refuse(segment.segment_id, e)
        return
    try:
        if segment.cancelled:  # while its voice was being prepared: it never started
            await session.send(_dropped(segment))
            return
        await session.send({"type": "start", "segment_id": segment.segment_id,
                            "sample_rate": speech.encoder.sample_rate})
        session.metrics.segments.labels("200").inc()
        failure = None
        try:
            async for data in speech.pieces():
                await session.send_audio(data)
                timing.sent()
        except (WebSocketDisconnect, SendTimeout, asyncio.CancelledError):  # the client left (or stopped reading)
            timing.left()
            raise
        except RequestError as e:  # the segment fails; the socket stays usable
            failure = e
            timing.failed(e)
            await session.error(segment.segment_id, e)
        end = _ended(segment, speech, failure)
        await session.send(end)
        if failure is None:  # as over HTTP: a failed stream reports no audio seconds
            timing.finished(speech.audio_seconds)
        log.info("segment ended: %.2f s of audio%s", end["audio_seconds"],  # (its access line, as HTTP's)
                 f", cancelled ({end.get('reason', 'by the client')})" if end["cancelled"] else "")
    finally:
        speech.close()


def _loggable(segment_id: Any) -> str:
    """A client's segment id as a log line may hold it: printable, at most 64 characters."""
    text = segment_id if isinstance(segment_id, str) else json.dumps(segment_id)
    text = "".join(c if c.isprintable() and c != " " else "_" for c in text[:65])  # (what is cut is not looked at)
    return text if len(text) <= 64 else text[:63] + "…"


def _ended(segment: Segment, speech: Speech, failure: RequestError | None) -> dict:
    """The `end` of a segment that started: its seed, the voice it spoke with (an alias's or the
    default for an OpenAI name, as X-Echo-Voice says over HTTP), its seconds of audio, and whether it
    was cut short, with the server's reason when the server cut it; with ECHO_ADAPTIVE_STEPS, the
    diffusion steps each block took (`steps`: the blocks started, also when the segment was cut)."""
    reason = segment.reason or (FAILED if failure is not None else None)
    return {"type": "end", "segment_id": segment.segment_id, "seed": speech.seed, "voice": speech.voice,
            "audio_seconds": round(speech.audio_seconds, 3), "cancelled": segment.cancelled or failure is not None,
            **({"reason": reason} if reason else {}), **speech.steps_report()}


def _speech_request(message: dict) -> SpeechRequest:
    """The segment as a speech request: the same model, validation and messages as over HTTP;
    the socket always carries streamed PCM."""
    fields = {k: v for k, v in message.items() if k not in PROTOCOL_KEYS}
    fields.update(stream=True, response_format="pcm", stream_format="audio")
    try:
        return SpeechRequest.model_validate(fields)
    except ValidationError as e:
        raise request_error(e.errors()) from None


"""Speech over a WebSocket (`/v1/audio/speech/stream/ws`), the fork's protocol for voice agents.

Client -> server, JSON text messages:
- a segment: `{"input", "voice", "segment_id", "seed", "extra_body": {...}, "continue": true}`, with
  any setting of `POST /v1/audio/speech` at the top level or in `extra_body` (same validation, same
  messages). Segments are queued and answered in order; `"continue": false` closes the socket once
  the queued segments are done.
- `{"type": "cancel", "segment_id"}`: stops that segment within one diffusion step, or drops it
  while it is still queued.

Server -> client, per segment: `{"type": "start", "segment_id"}`, binary frames of 16-bit
little-endian mono PCM (44.1 kHz or the segment's `sample_rate`), one per decoded block, then
`{"type": "end", "segment_id", "seed", "audio_seconds", "cancelled"}`. Empty input gets
`{"type": "no_op", "reason": "empty_input", "segment_id"}`; a failed segment gets
`{"type": "error", "error": {message, type, param, code}, "message", "segment_id"}` and the socket
stays usable. A client that disconnects cancels everything it had queued.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.websockets import WebSocket, WebSocketDisconnect

from audio_encoding import InvalidAudioParameter, open_encoder
from engine import JobStream
from inference import SAMPLE_RATE
from observability import bearer_token, request_id
from service import SpeechService, generation_failure
from settings import Settings
from speech_request import RequestError, SpeechRequest, request_error

PROTOCOL_KEYS = ("segment_id", "continue", "type")  # message keys that are not speech settings
POLICY_VIOLATION, TRY_AGAIN_LATER = 1008, 1013  # WebSocket close codes


@dataclass
class Segment:
    """One queued request of a socket."""

    segment_id: Any
    message: dict
    cancelled: bool = False
    stream: JobStream | None = None


@dataclass
class Session:
    """One socket: its queue of segments and the one being generated."""

    websocket: WebSocket
    service: SpeechService
    queue: list[Segment] = field(default_factory=list)
    current: Segment | None = None
    closing: bool = False  # "continue": false was received
    wake: asyncio.Event = field(default_factory=asyncio.Event)

    async def send(self, message: dict) -> None:
        await self.websocket.send_text(json.dumps(message))


def authorized(websocket: WebSocket, settings: Settings) -> bool:
    """`Authorization: Bearer <key>` or, for browsers (which cannot set headers), `?api_key=<key>`."""
    token = bearer_token(websocket.headers)
    return settings.accepts_key(token if token is not None else websocket.query_params.get("api_key"))


async def serve(websocket: WebSocket, service: SpeechService) -> None:
    """The whole life of one socket; every segment it queued ends with it."""
    settings = service.settings
    if not authorized(websocket, settings):
        await websocket.close(code=POLICY_VIOLATION, reason="missing or invalid API key")
        return
    await websocket.accept()
    request_id.set(uuid.uuid4().hex)
    if reason := service.unready_reason():
        await _error(websocket, None, RequestError(reason, status=503))
        await websocket.close(code=TRY_AGAIN_LATER)
        return
    session = Session(websocket, service)
    writer = asyncio.create_task(_answer(session))
    client_left = True
    try:
        client_left = await _read(session)
    finally:
        if client_left:  # the client is gone (or the server stops): nothing it queued is wanted
            for segment in [session.current, *session.queue]:
                if segment is not None:
                    _cancel(segment)
            session.queue.clear()
            session.closing = True
            session.wake.set()
        await asyncio.gather(writer, return_exceptions=True)


async def _read(session: Session) -> bool:
    """Queue segments and apply cancels until the client leaves (True) or asks to close once its
    segments are answered (False)."""
    limit, max_queued = session.service.settings.max_body_bytes, session.service.settings.ws_max_queue
    while True:
        try:
            text = await session.websocket.receive_text()
        except (WebSocketDisconnect, RuntimeError, KeyError):  # gone, closed, or a binary frame sent
            return True
        try:
            if len(text.encode()) > limit:
                raise RequestError(f"the message is larger than {limit} bytes (ECHO_MAX_BODY_BYTES)", status=413)
            message = _parse(text)
        except RequestError as e:
            await _error(session.websocket, None, e)
            continue
        if message.get("type") == "cancel":
            await _cancel_id(session, message.get("segment_id"))
            continue
        if len(session.queue) >= max_queued:
            await _error(session.websocket, message.get("segment_id"), RequestError(
                f"more than {max_queued} segments are queued on this socket (ECHO_WS_MAX_QUEUE)", status=429))
            continue
        session.queue.append(Segment(message.get("segment_id"), message))
        if message.get("continue") is False:
            session.closing = True
        session.wake.set()
        if session.closing:
            return False


def _parse(text: str) -> dict:
    try:
        message = json.loads(text)
    except json.JSONDecodeError:
        raise RequestError("the message is not valid JSON", code="invalid_json") from None
    if not isinstance(message, dict):
        raise RequestError("a message must be a JSON object", code="invalid_json")
    return message


async def _cancel_id(session: Session, segment_id: Any) -> None:
    """Stop the running segment of that id (its end follows its last audio) and drop queued ones."""
    if session.current is not None and session.current.segment_id == segment_id:
        _cancel(session.current)
    for segment in [q for q in session.queue if q.segment_id == segment_id]:
        session.queue.remove(segment)
        await session.send({"type": "end", "segment_id": segment_id, "cancelled": True, "audio_seconds": 0.0})


def _cancel(segment: Segment) -> None:
    segment.cancelled = True
    if segment.stream is not None:
        segment.stream.cancel()


async def _answer(session: Session) -> None:
    """Answer queued segments in order; close the socket after the last one when asked to."""
    try:
        while True:
            while not session.queue:
                if session.closing:
                    await session.websocket.close()
                    return
                session.wake.clear()
                await session.wake.wait()
            session.current = session.queue.pop(0)
            try:
                await _answer_one(session, session.current)
            finally:
                session.current = None
    except (WebSocketDisconnect, RuntimeError):  # the client left while we were writing
        return


async def _answer_one(session: Session, segment: Segment) -> None:
    if not str(segment.message.get("input", "")).strip():
        await session.send({"type": "no_op", "reason": "empty_input", "segment_id": segment.segment_id})
        return
    try:
        request = _speech_request(segment.message)
        await session.send({"type": "start", "segment_id": segment.segment_id})
        await _generate(session, segment, request)
    except RequestError as e:
        await _error(session.websocket, segment.segment_id, e)


async def _generate(session: Session, segment: Segment, request: SpeechRequest) -> None:
    """One segment's audio as binary PCM frames, then its end message."""
    service = session.service
    try:
        encoder = open_encoder("pcm", input_rate=SAMPLE_RATE,
                               output_rate=request.sample_rate or service.settings.output_sample_rate,
                               speed=request.speed, streaming=True)
    except InvalidAudioParameter as e:
        raise RequestError(str(e), e.param) from None
    samples = 0
    try:
        job = await run_in_threadpool(service.build_job, request.generation_options())
        segment.stream = service.submit(job, request_id.get())
        if segment.cancelled:  # cancelled while its voice was being prepared
            segment.stream.cancel()
        async for block in _blocks(segment.stream):
            samples += block.size
            if data := await run_in_threadpool(encoder.encode, block):
                await session.websocket.send_bytes(data)
        if data := await run_in_threadpool(encoder.finish):
            await session.websocket.send_bytes(data)
    finally:
        if segment.stream is not None:
            segment.stream.cancel()
        encoder.close()
    await session.send({"type": "end", "segment_id": segment.segment_id, "seed": job.seed,
                        "audio_seconds": round(samples / SAMPLE_RATE, 3), "cancelled": segment.cancelled})


async def _blocks(stream: JobStream):
    try:
        async for block in stream:
            yield block
    except Exception as e:  # noqa: BLE001 - the segment fails; the socket stays usable
        raise generation_failure(e) from None


def _speech_request(message: dict) -> SpeechRequest:
    """The segment as a speech request: the same model, validation and messages as over HTTP;
    the socket always carries streamed PCM."""
    fields = {k: v for k, v in message.items() if k not in PROTOCOL_KEYS}
    fields.update(stream=True, response_format="pcm", stream_format="audio")
    try:
        return SpeechRequest.model_validate(fields)
    except ValidationError as e:
        raise request_error(e.errors()) from None


async def _error(websocket: WebSocket, segment_id: Any, error: RequestError) -> None:
    try:
        await websocket.send_text(json.dumps({"type": "error", "error": error.detail(), "message": str(error),
                                              "segment_id": segment_id}))
    except (WebSocketDisconnect, RuntimeError):
        pass

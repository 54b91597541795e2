"""OpenAI-compatible HTTP API for Echo-TTS. `python api_server.py` starts it (configuration: ECHO_* env).

This module only translates HTTP: routes, the framing of the pipeline's audio pieces (a streamed
body, SSE events, a whole file; pipeline.py makes the pieces for every transport) and the one
mapping of the domain error, RequestError, to a status, OpenAI's error object and its headers. What
a request means is the request model's to say (speech_request.py), service.py starts it, generation
happens in engine.py and worker.py.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import signal
import sys
import tempfile
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import aclosing, asynccontextmanager
from pathlib import Path
from typing import Annotated
from urllib.parse import urlencode

from prometheus_client import CONTENT_TYPE_LATEST
from fastapi import APIRouter, Depends, FastAPI, File, Form, Request, UploadFile, WebSocket
from fastapi.routing import APIRoute
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Mount

from audio_encoding import CONTENT_TYPES
from inference import AE_DOWNSAMPLE_FACTOR
from observability import (BODILESS, BodyLimit, BodySizeLimit, Metrics, RequestContext, StreamCut, StreamTiming,
                           bearer_token, configure_logging, error_response)
from pipeline import FILE_IN_MEMORY, ClientGone, Speech, open_speech
from service import SpeechService
from errors import STORAGE_ERRNOS, RequestError, storage_failure
from speech_request import MODEL_ID, OPENAI_SPEECH_MODELS, SpeechRequest, check_json_values, request_error
from settings import PERFORMANCE_PRESETS, Settings, load_settings
import http_server
import runtime
import speech_socket
import weights

log = logging.getLogger("echo_tts.api")
STATIC = Path(__file__).resolve().parent / "static"  # the web playground
CLIENT_CLOSED_REQUEST = 499  # nginx's status for a request whose client went away (never seen by the client)

# ---------------------------------------------------------------------------------------------
# Errors in OpenAI's shape


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail


def _openapi_of_answered_errors(app: FastAPI) -> Callable[[], dict]:
    """app.openapi without FastAPI's 422 for every route that takes input: a malformed request is
    answered 400 in OpenAI's shape (on_validation_error), and a client generated from the schema
    would expect a 422 that never comes."""
    generate = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = generate()  # (cached by FastAPI: trimmed once)
            for operations in schema["paths"].values():
                for operation in operations.values():
                    operation.get("responses", {}).pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
        return app.openapi_schema

    return openapi


def _errors(*statuses: int) -> dict[int, dict]:
    """OpenAPI documentation of the error responses a route may give."""
    return {status: {"model": ErrorResponse} for status in statuses}


AUDIO_RESPONSE = {200: {"description": "Audio, streamed or whole; SSE events with stream_format=sse",
                        "content": {t: {} for t in (*CONTENT_TYPES.values(), "text/event-stream")}}}


async def on_request_error(request: Request, exc: RequestError) -> JSONResponse:
    return error_response(exc)


async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0]
    if first.get("type") == "json_invalid":
        return error_response(RequestError("the request body is not valid JSON", code="invalid_json"))
    if tuple(first.get("loc", ())) == ("body",):  # the body as a whole: none, or not JSON
        content_type = request.headers.get("content-type", "")
        unparsed = isinstance(first.get("input"), (bytes, bytearray))  # (not sent as JSON; a parsed body is not)
        if unparsed and "json" not in content_type.lower():  # e.g. `curl -d` without -H
            came = f"this one is {content_type[:80]!r}" if content_type else "it came without one"
            return error_response(RequestError(f"the request body must be JSON, sent with 'Content-Type: "
                                               f"application/json' ({came})", code="invalid_json"))
        if first.get("type") == "missing":
            return error_response(RequestError("the request has no body: send a JSON object (with `input` and "
                                               "`voice` for speech)", code="invalid_json"))
    return error_response(request_error(exc.errors()))


async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Starlette's own errors (no such route, method not allowed) in OpenAI's shape. A form whose file
    part could not be spooled to disk (FastAPI's 400 "error parsing the body") is the server's fault:
    507 or 500, as errors.storage_failure says."""
    if isinstance(cause := exc.__cause__, OSError) and cause.errno in STORAGE_ERRNOS:
        log.error("an upload could not be written to the temporary directory: %s", cause)
        return error_response(storage_failure(cause, "the upload", "nothing was stored"))
    response = error_response(RequestError(str(exc.detail), status=exc.status_code))
    response.headers.update(getattr(exc, "headers", None) or {})  # (405's Allow)
    return response


# ---------------------------------------------------------------------------------------------
# App


def _warn_without_temporary_directory(settings: Settings) -> None:
    """A warning at start when no temporary file can be made (a read-only file system, say): whole files
    over pipeline.FILE_IN_MEMORY and uploads over 1 MiB (Starlette's form spool) need one."""
    try:
        with tempfile.TemporaryFile():
            pass
    except OSError as e:
        uploads = " and voice uploads over 1 MiB" if settings.uploads_enabled else ""
        log.warning("no temporary file can be written (%s): whole files over %d MiB (stream=false)%s will fail "
                    "with 500; set TMPDIR to a writable directory (a tmpfs, say)", e, FILE_IN_MEMORY >> 20, uploads)


def create_app(settings: Settings | None = None, ray_replica: bool = False) -> FastAPI:
    """The app. The models load in its lifespan, in the background: /health answers meanwhile, /ready
    says when they are ready. As a Ray Serve replica (deploy/ray_serve.py), they load before the app
    takes any request, since Ray routes to a replica once its start-up ends (a failure fails it), and
    Ray's proxy sends the X-Request-ID header itself."""
    settings = settings or load_settings()
    service = SpeechService(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        _warn_without_temporary_directory(settings)
        loader = service.start_loading()
        if ray_replica:
            await asyncio.to_thread(loader.join)
            if reason := service.unready_reason():
                raise RuntimeError(reason)
        yield
        service.close()

    public_docs = settings.public_docs if settings.public_docs is not None else not settings.api_keys
    app = FastAPI(title="Echo-TTS Streaming API", version="1.0", lifespan=lifespan,
                  **({} if public_docs else {"openapi_url": None}))  # else served below, behind the key
    app.state.service = service
    app.state.drain = http_server.Drain()  # the server's shutdown, as WebSocket sessions see it (http_server)
    app.state.metrics = Metrics(queue_length=lambda: service.observe(lambda r: r.worker.waiting, 0),
                                active_streams=lambda: service.observe(lambda r: r.worker.active, 0),
                                parked_streams=lambda: service.observe(lambda r: r.worker.parked, 0),
                                preparing=lambda: service.observe(lambda r: r.worker.preparing, 0),
                                gpu=settings.torch_device,
                                compiles_after_warm_up=lambda: service.observe(lambda r: r.compiles_after_warm_up, 0),
                                vad_rerolls=lambda: service.observe(lambda r: r.engine.rerolls, 0),
                                adaptive_steps=service.adaptive_steps,
                                memory_plan=lambda: service.observe(lambda r: r.plan and (r.plan.need, r.plan.worst),
                                                                    None),
                                out_of_memory=service.out_of_memory,
                                whole_file_bytes=lambda: service.whole_files.held)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(RequestError, on_request_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    routers = [_routes(settings.public_voice_list)]
    routers += [_docs_routes(app)] if not public_docs and settings.api_keys else []
    for router in routers:  # (ECHO_PUBLIC_DOCS=0 without a key: no docs at all)
        app.include_router(router)
    app.openapi = _openapi_of_answered_errors(app)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    # what a response sent before routing is counted under (FastAPI's included routers name no path)
    endpoints = [route for router in routers for route in router.echo_endpoints]
    endpoints += [route for route in app.routes if isinstance(route, Mount)]
    app.add_middleware(BodySizeLimit, limit_of=_body_limits(settings), read_timeout=settings.read_timeout)
    app.add_middleware(KeyBeforeBody, settings=settings)  # outside BodySizeLimit: nothing read without a key
    if settings.cors_origins:  # outside BodySizeLimit: a browser can read its 413 and 408 too
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST", "DELETE"],
                           allow_headers=["*"],
                           expose_headers=["X-Audio-Sample-Rate", "X-Echo-Seed", "X-Echo-Voice", "X-Request-ID",
                                           "X-Echo-Replica", "X-Echo-Steps"])
    app.add_middleware(RequestContext, metrics=app.state.metrics,  # outermost: every response gets an id
                       replica=settings.replica_name, id_header=not ray_replica, routes=endpoints)
    return app


def _model(name: str) -> dict:
    """A model as OpenAI's model object describes one."""
    return {"id": name, "object": "model", "created": 0, "owned_by": "echo-tts"}


def _docs_routes(app: FastAPI) -> APIRouter:
    """/openapi.json, /docs and /redoc behind the API key (ECHO_PUBLIC_DOCS off). A browser cannot
    send a header when it opens a page, so these also take `?api_key=` (as the WebSocket does; the
    key is redacted from the logs), and the pages pass it on to the schema they load."""
    docs = APIRouter(dependencies=[Depends(check_docs_key)], include_in_schema=False)

    def schema_url(request: Request) -> str:
        key = request.query_params.get("api_key")
        return "/openapi.json" + (f"?{urlencode({'api_key': key})}" if key else "")

    @docs.get("/openapi.json")
    def schema() -> JSONResponse:
        return JSONResponse(app.openapi())

    @docs.get("/docs")
    def swagger(request: Request) -> Response:
        return get_swagger_ui_html(openapi_url=schema_url(request), title=f"{app.title} - Swagger UI")

    @docs.get("/redoc")
    def redoc(request: Request) -> Response:
        return get_redoc_html(openapi_url=schema_url(request), title=f"{app.title} - ReDoc")

    docs.echo_endpoints = list(docs.routes)
    return docs


def _body_limits(settings: Settings) -> Callable[[dict], BodyLimit]:
    """What a request's body may hold: ECHO_MAX_BODY_BYTES; nothing on GET, HEAD and OPTIONS (no route
    reads one, and they need no key: it would be buffered for nobody, so it is refused at its first byte)."""
    bodiless = BodyLimit(0, "a GET, HEAD or OPTIONS request carries no body here", close=True)
    body = BodyLimit(settings.max_body_bytes, f"the request body is larger than {settings.max_body_bytes} bytes "
                     "(ECHO_MAX_BODY_BYTES)")
    return lambda scope: bodiless if scope["method"] in BODILESS else body


class _CountedJsonRoute(APIRoute):
    """FastAPI's route, except that the values of a JSON body are counted before FastAPI parses it
    (speech_request.check_json_values: parsed, a body of countless tiny values held the event loop
    for seconds). A client that leaves while its body is read is answered 499, which it never sees
    (FastAPI's own read would answer 400), with no error logged."""

    def get_route_handler(self) -> Callable[[Request], Awaitable[Response]]:
        handle = super().get_route_handler()

        async def counted(request: Request) -> Response:
            if _is_json(request.headers.get("content-type", "")):  # (as FastAPI tells a body it parses)
                try:
                    body = await request.body()  # (kept by the request for FastAPI's own read)
                except ClientDisconnect:  # (or stalled: answered 408 already, observability._TimedBody)
                    return Response(status_code=CLIENT_CLOSED_REQUEST)
                check_json_values(body, request.app.state.service.settings.max_input_chars, "the request body")
            return await handle(request)

        return counted


def _is_json(content_type: str) -> bool:
    """Whether FastAPI may parse a body of this type as JSON (before 0.132 it parsed one with none)."""
    media_type = content_type.partition(";")[0].strip().lower()
    return media_type in ("", "application/json") or (media_type.startswith("application/")
                                                       and media_type.endswith("+json"))


# The dependencies are coroutines: they do no I/O, and FastAPI runs a plain function in the thread
# pool, where under load a request's key check would queue behind other responses' audio encoding.
async def get_service(request: Request) -> SpeechService:
    return request.app.state.service


async def ready_service(service: Annotated[SpeechService, Depends(get_service)]) -> SpeechService:
    if reason := service.unready_reason():
        raise RequestError(reason, status=503)
    return service


async def check_api_key(request: Request, service: Annotated[SpeechService, Depends(get_service)]) -> None:
    """With ECHO_API_KEY set, require `Authorization: Bearer <one of the keys>` (compared in constant time)."""
    _require_key(service, bearer_token(request.headers))


async def check_docs_key(request: Request, service: Annotated[SpeechService, Depends(get_service)]) -> None:
    """check_api_key, or `?api_key=` for pages a browser opens (the API docs)."""
    token = bearer_token(request.headers)
    _require_key(service, token if token is not None else request.query_params.get("api_key"))


def _require_key(service: SpeechService, token: str | None) -> None:
    if not service.settings.accepts_key(token):
        raise _missing_key()


def _missing_key() -> RequestError:
    return RequestError("missing or invalid API key: send 'Authorization: Bearer <key>'", status=401)


class KeyBeforeBody:
    """With ECHO_API_KEY set, a request that may carry a body (any method but GET, HEAD and OPTIONS)
    and no valid key is answered 401 before its body is read. The routes' key check runs after
    FastAPI has read and parsed the body: without a key, anyone could hold 16 MiB of memory per
    connection, a temporary file of a form's upload, or the event loop parsing a large JSON body."""

    def __init__(self, app, settings: Settings):
        self.app, self.settings = app, settings

    async def __call__(self, scope, receive, send):
        if (scope["type"] == "http" and scope["method"] not in BODILESS and self.settings.api_keys
                and not self.settings.accepts_key(bearer_token(Headers(scope=scope)))):
            return await error_response(_missing_key(), close=True)(scope, receive, send)  # (its body unread)
        return await self.app(scope, receive, send)


def _routes(public_lists: bool = False):
    """The routes; with `public_lists` (ECHO_PUBLIC_VOICE_LIST) the model and voice lists need no key:
    Open WebUI asks for them without one."""
    router = APIRouter()
    public = APIRouter()
    protected = APIRouter(dependencies=[Depends(check_api_key)], route_class=_CountedJsonRoute)
    lists, list_errors = (public, _errors()) if public_lists else (protected, _errors(401))

    @public.get("/", include_in_schema=False)
    def playground() -> FileResponse:
        """The web playground (static files of this repository; the key is entered on the page)."""
        return FileResponse(STATIC / "index.html")

    @public.get("/health")
    def health(service: Annotated[SpeechService, Depends(get_service)]) -> dict:
        ready = service.unready_reason() is None  # (what /ready answers 200 for)
        return {"status": "ok", "ready": ready, "auth": bool(service.settings.api_keys)}

    @protected.get("/ready", responses=_errors(401, 503))
    def ready(service: Annotated[SpeechService, Depends(ready_service)]) -> dict:
        return {"status": "ready"}

    for path, endpoint, on in (("/", playground, public), ("/health", health, public), ("/ready", ready, protected)):
        on.add_api_route(path, endpoint, methods=["HEAD"], include_in_schema=False)  # uptime checks' probes

    @protected.get("/metrics", responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}} | _errors(401),
                    response_class=Response)
    def metrics(request: Request) -> Response:
        return Response(request.app.state.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @lists.get("/v1/models", responses=list_errors)
    def models() -> dict:
        """Echo-TTS under its own name (the fork's defaults) and under OpenAI's (OpenAI's defaults)."""
        return {"object": "list", "data": [_model(name) for name in (MODEL_ID, *OPENAI_SPEECH_MODELS)]}

    @lists.get("/v1/models/{model}", responses=list_errors | _errors(404))
    def model(model: str) -> dict:
        """One of the listed models (the OpenAI SDKs' `models.retrieve`)."""
        if model not in (MODEL_ID, *OPENAI_SPEECH_MODELS):
            raise RequestError(f"no model named {model!r}: GET /v1/models lists them", "model", status=404)
        return _model(model)

    @lists.get("/v1/audio/models", responses=list_errors)
    def audio_models() -> dict:
        """Open WebUI's model suggestions. It never sends `response_format` and saves the body as .mp3,
        so only OpenAI's names, which default to mp3, are offered: `echo-tts` would stream pcm."""
        return {"models": [{"id": name, "name": f"Echo-TTS ({name})"} for name in OPENAI_SPEECH_MODELS]}

    @protected.get("/v1/audio/presets", responses=_errors(401))
    def presets(service: Annotated[SpeechService, Depends(get_service)]) -> dict:
        """The streaming presets: block sizes and diffusion steps per block, for a request's
        `block_sizes` and `num_steps`; `default` names the server's (ECHO_PERFORMANCE_PRESET)."""
        return {"default": service.settings.performance_preset,
                "presets": {name: {"block_sizes": blocks, "num_steps": steps}
                            for name, (blocks, steps) in PERFORMANCE_PRESETS.items()}}

    @lists.get("/v1/voices", responses=list_errors)
    def voices(service: Annotated[SpeechService, Depends(get_service)]) -> dict:
        names = service.voices.names()
        return {"object": "list", "data": [{"object": "voice", "id": n, "name": n} for n in names]}

    @lists.get("/v1/audio/voices", responses=list_errors)
    def audio_voices(service: Annotated[SpeechService, Depends(get_service)]) -> dict:
        return {"voices": [{"id": n, "name": n} for n in service.voices.names()]}

    @protected.post("/v1/audio/voices", responses=_errors(400, 401, 403, 408, 409, 413, 500, 503, 507))
    async def upload_voice(service: Annotated[SpeechService, Depends(ready_service)],
                           name: Annotated[str, Form()], audio_sample: Annotated[UploadFile, File()],
                           consent: Annotated[str | None, Form()] = None,
                           overwrite: Annotated[bool, Form()] = False) -> dict:
        """Add a voice (OpenAI's field names): checked, stored under ECHO_VOICE_UPLOAD_DIR and encoded
        once; answers its metadata with a quality report."""
        data = await audio_sample.read(service.settings.max_voice_bytes + 1)
        return await run_in_threadpool(service.add_voice, name, data, consent, overwrite)

    @protected.get("/v1/voices/{voice_id}", responses=_errors(401, 404))
    def voice(voice_id: str, service: Annotated[SpeechService, Depends(get_service)]) -> dict:
        return service.voices.metadata(voice_id)

    @protected.delete("/v1/audio/voices/{voice_id}", responses=_errors(401, 403, 404))
    def delete_voice(voice_id: str, service: Annotated[SpeechService, Depends(get_service)]) -> dict:
        return service.voices.delete(voice_id)

    @protected.post("/v1/audio/speech", response_class=Response,
                    responses=AUDIO_RESPONSE | _errors(400, 401, 408, 413, 429, 500, 503, 504, 507))
    async def speech(body: SpeechRequest, request: Request,
                     service: Annotated[SpeechService, Depends(ready_service)]) -> Response:
        try:
            speech = await open_speech(service, body, streaming=body.stream, client_gone=request.is_disconnected)
            transport = "file" if not body.stream else "sse" if body.stream_format == "sse" else "http"
            timing = StreamTiming(request.app.state.metrics, request.state.started, transport)
            try:
                await speech.first_audio()  # a failure before any audio is still the response's status
                headers = {"X-Audio-Sample-Rate": str(speech.encoder.sample_rate), "X-Echo-Seed": str(speech.seed),
                           "X-Echo-Voice": _header_safe(speech.voice)}
                if not body.stream:
                    return await _whole_file(speech, headers, timing)
                if body.stream_format == "sse":
                    return SpeechResponse(speech, _sse_events(speech, timing), media_type="text/event-stream",
                                          headers=headers | {"Cache-Control": "no-cache",
                                                             "X-Accel-Buffering": "no"})  # (nginx: pass each event)
                return SpeechResponse(speech, _audio_bytes(speech, timing), media_type=speech.encoder.content_type,
                                      headers=headers)
            except BaseException:  # the speech was not handed to a streaming response: let go of it here
                speech.close()
                raise
        except ClientGone:  # while its voice was prepared, or its first audio (or whole file) awaited
            log.info("client disconnected before its audio was ready")
            return Response(status_code=CLIENT_CLOSED_REQUEST)

    @router.websocket("/v1/audio/speech/stream/ws")
    async def speech_stream_socket(websocket: WebSocket) -> None:
        await speech_socket.serve(websocket, websocket.app.state.service, websocket.app.state.metrics)

    router.echo_endpoints = [*router.routes, *public.routes, *protected.routes]  # (before inclusion wraps them)
    router.include_router(public)
    router.include_router(protected)
    return router


async def _streamed(speech: Speech, timing: StreamTiming) -> AsyncIterator[bytes]:
    """The speech's pieces, each counted as sent; the seconds of audio once it ends (or the client's
    departure: the response is closed, or cancelled, before its end)."""
    try:
        async for data in speech.pieces():
            timing.sent()
            yield data
    except (GeneratorExit, asyncio.CancelledError):
        timing.left()
        raise
    timing.finished(speech.audio_seconds)


async def _audio_bytes(speech: Speech, timing: StreamTiming) -> AsyncIterator[bytes]:
    """The HTTP body of a streamed response: a failure after the first byte cuts it (StreamCut)."""
    try:
        async with aclosing(_streamed(speech, timing)) as pieces:  # (closed with this body: its departure counted)
            async for data in pieces:
                yield data
    except RequestError as e:
        timing.failed(e)
        log.warning("generation failed while streaming; the response is cut short: %s", e)
        raise StreamCut() from e


async def _sse_events(speech: Speech, timing: StreamTiming) -> AsyncIterator[bytes]:
    """stream_format=sse: a `speech.audio.delta` per piece, then `speech.audio.done` (or `error`: the
    in-band signal, and the body ends normally, as a client that reads every event expects; cutting it
    made the OpenAI SDK, which reads an SSE body whole, generate the failed request twice more)."""
    try:
        async with aclosing(_streamed(speech, timing)) as pieces:
            async for data in pieces:
                yield _sse({"type": "speech.audio.delta", "audio": base64.b64encode(data).decode()})
        yield _sse({"type": "speech.audio.done", "seed": speech.seed, "voice": speech.voice,
                    "usage": _usage(speech), **speech.steps_report()})
    except RequestError as e:
        timing.failed(e)
        log.warning("generation failed while streaming; the response ends with an error event: %s", e)
        yield _sse({"type": "error", "error": e.detail()})


def _usage(speech: Speech) -> dict:
    """OpenAI's usage object in Echo's units: input tokens are the UTF-8 bytes of the text (Echo's
    tokenizer reads bytes), output tokens the latent frames of audio generated (2048 samples each);
    plus the plain counts, input characters and seconds of audio delivered (at the request's speed)."""
    chunks = speech.started.job.chunks
    input_tokens = sum(len(text.encode()) for text in chunks)
    output_tokens = round(speech.samples / AE_DOWNSAMPLE_FACTOR)
    return {"input_tokens": input_tokens, "output_tokens": output_tokens, "total_tokens": input_tokens + output_tokens,
            "input_characters": sum(len(text) for text in chunks), "audio_seconds": round(speech.audio_seconds, 3)}


def _header_safe(value: str) -> str:
    """A value as an HTTP header may carry it (a voice name may hold any character)."""
    return value.encode("unicode_escape").decode("ascii")  # control and non-ASCII characters escaped


def _sse(event: dict) -> bytes:
    return f"data: {json.dumps(event)}\n\n".encode()


async def _whole_file(speech: Speech, headers: dict[str, str], timing: StreamTiming) -> Response:
    """stream=false: the complete file with Content-Length, every block awaited watching the client.
    The encoder writes the file into the speech's spool (pipeline.FILE_IN_MEMORY), whose pieces come
    once it is complete; each is let go once sent. A failure to read it back cuts the response."""
    pieces = speech.pieces(watched=True)
    first = await anext(pieces, b"")  # (the whole file made: its size is known)
    timing.sent()
    timing.finished(speech.audio_seconds)
    headers = headers | {"Content-Length": str(speech.file_bytes)}
    if (steps := speech.started.stream.steps_used) is not None:  # ECHO_ADAPTIVE_STEPS: the steps each block took
        headers = headers | {"X-Echo-Steps": ",".join(map(str, steps))}

    async def body() -> AsyncIterator[bytes]:
        try:
            async with aclosing(pieces):
                if first:
                    yield first
                async for data in pieces:
                    yield data
        except (GeneratorExit, asyncio.CancelledError):
            timing.left()
            raise
        except RequestError as e:
            timing.failed(e)
            log.warning("a whole file could not be read back; the response is cut short: %s", e)
            raise StreamCut() from e

    return SpeechResponse(speech, body(), media_type=speech.encoder.content_type, headers=headers)


class SpeechResponse(StreamingResponse):
    """A streamed response that closes its body and lets go of its speech however it ends: sent, cut,
    or its client gone before or while it was sent. (Starlette leaves an unfinished body to the
    garbage collector: the speech, a whole file's spool on disk, and the count of the client's
    departure waited for it.)"""

    def __init__(self, speech: Speech, content: AsyncGenerator[bytes, None], **kwargs):
        super().__init__(content, **kwargs)
        self.speech = speech

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                await self.body_iterator.aclose()
            finally:
                self.speech.close()


def download() -> int:
    """`python api_server.py download`: fetch the weight sets into the Hugging Face cache."""
    settings = load_settings(device="cpu", fish_device="cpu")  # only the repos matter here
    try:
        model_dir, fish_dir = weights.fetch(settings.model_repo, settings.fish_repo)
    except weights.WeightsUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"ECHO_MODEL_REPO {settings.model_repo}: {model_dir}\nECHO_FISH_REPO {settings.fish_repo}: {fish_dir}")
    return 0


def warm_up() -> int:
    """`python api_server.py warm-up`: load and warm up exactly as the server would, then exit, so the
    torch.compile artifacts (ECHO_COMPILE) are in ECHO_CACHE_DIR before the first start."""
    settings = load_settings().model_copy(update={"warmup": True})  # ECHO_WARMUP=0 would leave nothing to do
    configure_logging(settings.debug_logs, settings.log_json)
    service = SpeechService(settings)
    service.start_loading().join()
    try:
        if service.load_error is not None:
            print(f"error: {service.unready_reason()}", file=sys.stderr)
            return 1
        saved = runtime.compile_cache_path(settings)
        if not runtime.uses_compile(settings):
            done = "nothing to keep: ECHO_COMPILE is off, and the eager path compiles nothing"
        else:
            done = f"torch.compile artifacts in {saved}" if saved.is_file() else "torch.compile kept nothing (see the log)"
        print(f"warmed up in {service.progress.elapsed:.1f} s; {done}")
        return 0
    finally:
        service.close()


def _exit(service: SpeechService) -> None:
    """Exit 0 after the server's shutdown. A SIGTERM while the models still load or compile (docker
    stop during a start of minutes) leaves the loader thread in torch's C++ code, and the interpreter's
    exit under it aborted the process (status 134); nothing it loads is kept, so the process ends now."""
    if service.loading:
        log.info("stopped while the models were loading")
        logging.shutdown()
        os._exit(0)
    sys.exit(0)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv == ["download"]:
        sys.exit(download())
    if argv == ["warm-up"]:
        sys.exit(warm_up())
    if argv:
        sys.exit("usage: python api_server.py [download | warm-up]   (settings come from ECHO_* variables; see README)")
    settings = load_settings()
    configure_logging(settings.debug_logs, settings.log_json)
    app = create_app(settings)
    # the server handles SIGTERM (stop accepting, let streams and sockets in flight finish, run the
    # lifespan's shutdown) and then raises the signal again; answer that with a clean exit, status 0.
    signal.signal(signal.SIGTERM, lambda *_: _exit(app.state.service))
    http_server.serve(app, settings, app.state.drain)


if __name__ == "__main__":
    main()

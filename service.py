"""The speech service: readiness, and starting a request's generation.

Its parts each exist whole: the voices (`voice_catalog.VoiceCatalog`) from construction; the
loaded models, engine and worker (`runtime.Runtime`) together once loading ends, or never (a failed
load is reported by /ready). What a request means for the engine is the request model's to say
(`GenerationOptions.to_job`); this module adds the prepared voice and a queue slot.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

import numpy as np
import soundfile as sf
import torch

import inference as inf
import weights
from engine import SpeechEngine, SpeechJob, VoiceUnusable
from runtime import LoadProgress, MemoryTooSmall, Runtime, load_runtime, load_times_path, read_load_times
from settings import Settings
from errors import RequestError
from speech_request import GenerationOptions
from voice_catalog import VoiceCatalog
from worker import ClientStalled, GenerationTimeout, JobStream, QueueFull, WorkerClosed, is_out_of_memory

log = logging.getLogger(__name__)

DEBUG_WAV = Path("api_generation.wav")
T = TypeVar("T")
UPLOADS_AT_ONCE = 2  # voice uploads processed at once (decoded, checked, encoded); more are refused 429


class ByteBudget:
    """Bytes that one kind of resource may hold at once, in all (any thread): `take` what grows, `give`
    it back when let go of."""

    def __init__(self, limit: int, setting: str):
        self.limit, self.setting, self.held = limit, setting, 0
        self._lock = threading.Lock()

    def take(self, size: int) -> None:
        """Hold `size` bytes more; past the limit, a full disk's OSError (ENOSPC) naming the setting."""
        with self._lock:
            if self.held + size > self.limit:
                raise OSError(errno.ENOSPC, f"{self.setting} ({self.limit} bytes) are held already")
            self.held += size

    def give(self, size: int) -> None:
        with self._lock:
            self.held -= size


@dataclass(frozen=True)
class Started:
    """A request's generation, under way: its job, its audio, and the voice it speaks with."""

    job: SpeechJob
    stream: JobStream
    voice: str

    def steps_report(self) -> dict:
        """ECHO_ADAPTIVE_STEPS: `{"steps": [...]}`, the diffusion steps each block took, once the stream
        has ended (for SSE's `speech.audio.done` and the WebSocket's `end`); without it, nothing."""
        steps = getattr(self.stream, "steps_used", None)
        return {} if steps is None else {"steps": steps}


class SpeechService:
    """What the routes need: the settings, the voices, readiness, and starting generations."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.voices = VoiceCatalog(settings)
        self.ready = threading.Event()  # set once the runtime is loaded and warmed up
        self.load_error: BaseException | None = None
        self.progress = LoadProgress(history=read_load_times(load_times_path(settings)))  # (for /ready)
        self._runtime: Runtime | None = None
        self._closed = False  # close() came: a load that ends later lets go of what it loaded
        self._loader: threading.Thread | None = None
        self._uploads = threading.BoundedSemaphore(UPLOADS_AT_ONCE)
        # a 4 KB request can ask for a 283 MiB file, held until a client reading a byte now and then takes it
        self.whole_files = ByteBudget(settings.max_whole_files_bytes, "ECHO_MAX_WHOLE_FILES_BYTES")

    # ---- start-up and readiness ---------------------------------------------------------------

    def start_loading(self) -> threading.Thread:
        """Load models and warm up on a background thread, so /health answers meanwhile."""
        self.progress = LoadProgress(history=self.progress.history)
        thread = threading.Thread(target=self._load, name="echo-loader", daemon=True)
        thread.start()
        self._loader = thread
        return thread

    @property
    def loading(self) -> bool:
        """Whether the models are still being loaded or warmed up (the loader thread runs)."""
        return self._loader is not None and self._loader.is_alive()

    def _load(self) -> None:
        try:
            runtime = load_runtime(self.settings, self.voices,
                                   debug_sink=self._save_debug_audio if self.settings.debug_logs else None,
                                   progress=self.progress)
            if self._closed:  # shut down while loading: nothing is served, nothing is kept
                runtime.close()
                return
            self._runtime = runtime
            self.ready.set()
            log.info("ready in %.1f s", self.progress.elapsed)
        except BaseException as e:  # noqa: BLE001 - reported by /ready and the log, then the server idles
            self.load_error = e
            if isinstance(e, (weights.WeightsUnavailable, MemoryTooSmall)):  # a message that says it all
                log.error("loading the models failed: %s", e)
            else:
                log.exception("loading the models failed")

    def unready_reason(self) -> str | None:
        """Why requests cannot be served now (None when they can): what /ready answers with 503 and
        what a Ray Serve health check reports."""
        if self.load_error is not None:
            return f"the models failed to load ({self.load_error}); see the server log"
        if not self.ready.is_set() or self._runtime is None:
            return f"the models are still loading ({self.progress.describe()})"
        if not self._runtime.worker.alive:
            return "the generation thread has stopped; see the server log"
        return None

    @property
    def runtime(self) -> Runtime:
        """The loaded engine and worker; before they are ready, a RequestError (503)."""
        if (reason := self.unready_reason()) is not None:
            raise RequestError(reason, status=503)
        return self._runtime

    @property
    def engine(self) -> SpeechEngine:
        return self.runtime.engine

    def observe(self, read: Callable[[Runtime], T], otherwise: T) -> T:
        """`read(runtime)`, or `otherwise` while nothing is loaded (for metrics, which never fail)."""
        runtime = self._runtime
        return read(runtime) if runtime is not None else otherwise

    def adaptive_steps(self) -> tuple[float, int, int]:
        """(the step budget now, blocks started with fewer steps than requested, steps they did not
        take) since start: (1, 0, 0) without ECHO_ADAPTIVE_STEPS."""
        return self.observe(lambda r: (r.worker.budget, r.worker.reduced_blocks, r.worker.steps_saved), (1.0, 0, 0))

    def out_of_memory(self) -> tuple[int, int]:
        """(units of work computed again in halves for want of device memory, requests that failed
        for it) since start."""
        return self.observe(lambda r: (r.worker.memory_splits, r.worker.memory_failures), (0, 0))

    def _save_debug_audio(self, audio: np.ndarray) -> None:
        """ECHO_DEBUG_LOGS: keep the last generation exactly as generated (float samples at 44.1 kHz)."""
        sf.write(DEBUG_WAV, audio, inf.SAMPLE_RATE, subtype="FLOAT")

    def close(self) -> None:
        """Stop the worker (ending any job still running) and let go of the models and their memory."""
        self._closed = True
        runtime, self._runtime = self._runtime, None
        self.ready.clear()
        if runtime is not None:
            runtime.close()
        self.voices.clear_caches()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        log.info("shut down")

    # ---- requests -----------------------------------------------------------------------------

    def build_job(self, options: GenerationOptions) -> SpeechJob:
        """Translate one request into its job and prepare its voice (slow for a new one: call it off
        the event loop; it keeps the generation thread free). Raises RequestError (HTTP 400) naming
        the field."""
        job = options.to_job(self.settings)  # the text's errors first, before any voice is decoded
        used, speaker = self.voices.resolve(options.voice)  # once: what it speaks with is what it reports
        try:
            voice = self.engine.prepare_voice(speaker)
        except VoiceUnusable as e:
            raise RequestError(str(e), "voice") from e
        return replace(job, speaker=speaker, voice=voice, voice_name=used)

    async def start(self, options: GenerationOptions, request_id: str) -> Started:
        """A request's job, generating: its queue slot is taken first (a full queue is a RequestError
        with status 429, at once), then the job is built off the event loop (its voice may take
        seconds to prepare) and submitted in that slot; ECHO_REQUEST_TIMEOUT limits both, from the slot taken.
        Raises RequestError (400) for what build_job refuses."""
        try:
            reservation = self.runtime.worker.reserve()
        except QueueFull:
            raise RequestError("too many requests are waiting; retry shortly", status=429) from None
        limit = self.settings.request_timeout or None  # from the slot taken: the preparation counts too
        reserved = time.monotonic()
        with reservation:  # given back unless submitted, also when the caller is cancelled meanwhile
            try:
                async with asyncio.timeout(limit):  # (the preparation's thread runs on: its result is not used)
                    job = await asyncio.to_thread(self.build_job, options)
            except TimeoutError:
                raise RequestError(f"the request was not ready to generate within {limit:g} s: preparing its voice "
                                   "took longer (ECHO_REQUEST_TIMEOUT)", status=504) from None
            left = limit - (time.monotonic() - reserved) if limit else None
            stream = reservation.submit(job, request_id, max(left, 1e-3) if left is not None else None,
                                        speed=options.playback_speed)
            return Started(job, stream, job.voice_name)

    def add_voice(self, name: str, data: bytes, consent: str | None, overwrite: bool) -> dict:
        """Store an uploaded voice with its latents (slow: call it off the event loop). At most
        UPLOADS_AT_ONCE at a time, the others refused at once (429): an upload takes no queue slot, and
        each holds a thread of the pool the routes and the streams' encoding share for seconds (a 5
        minute clip: ~20 s and 0.5 GB), so 40 at once held every stream's first audio back 5 s."""
        if not self._uploads.acquire(blocking=False):
            raise RequestError(f"{UPLOADS_AT_ONCE} voice uploads are being processed; retry shortly", status=429)
        try:
            return self.voices.add(name, data, consent, overwrite, encode=self.engine.speaker_latents)
        finally:
            self._uploads.release()


def generation_failure(error: Exception, logged: bool = False) -> RequestError:
    """What a failed generation (or the encoding of its audio) tells the client, over HTTP or a
    WebSocket: an unusable voice is the request's fault (400), a client that stopped taking audio 408,
    a timeout 504, a device out of memory or a server shutting down 503 (try again), anything else 500, its
    traceback logged here unless it was already (`logged`: the worker logs what fails on its thread)."""
    if is_out_of_memory(error):  # (the worker logged it)
        return RequestError("the server ran out of memory for this request: try again later", status=503,
                            code="out_of_memory")
    if isinstance(error, VoiceUnusable):
        return RequestError(str(error), "voice")
    if isinstance(error, GenerationTimeout):
        return RequestError(f"{error} (ECHO_REQUEST_TIMEOUT)", status=504)
    if isinstance(error, WorkerClosed):
        return RequestError(f"{error}: try again", status=503)
    if isinstance(error, ClientStalled):  # nobody is listening: a line in the log, no traceback
        log.info("generation stopped: %s", error)
        return RequestError(str(error), status=408)
    if not logged:
        log.error("generation failed", exc_info=error)
    return RequestError(f"generation failed: {error}", status=500)

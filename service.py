"""The speech service: model loading and warm-up, readiness, voices, and turning requests into jobs.

The HTTP layer (api_server.py) validates and translates; this module decides what a request means
(text chunks, block shapes, sampler settings, the voice) and owns the long-lived objects.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

import inference as inf
import weights
from batched_steps import ExactSteps, StaticShapes, StaticSteps, StepRunner
from engine import (BlockShape, EarlyStop, SpeakerReference, SpeechEngine, SpeechJob, StepFloor, VadReroll,
                    VoiceUnusable, random_seed)
from model import EchoDiT
from settings import PERFORMANCE_PRESETS, Settings
from speech_request import MAX_STEPS_PER_CHUNK, GenerationOptions, RequestError
from text_chunking import (ChunkSettings, fits_in_one_generation, normalize_exclamations, prepare_text,
                           split_into_chunks)
from voices import (NO_VOICE, SpeakerCache, VoiceRegistry, VoiceSource, decode_inline_voice, inline_cache_key,
                    inline_voice_audio, is_no_voice, load_voice_audio, looks_like_inline_audio)
from voice_library import VoiceLibrary
from worker import ClientStalled, GenerationTimeout, GenerationWorker, JobStream, QueueFull, StepBudget

log = logging.getLogger(__name__)

DEBUG_WAV = Path("api_generation.wav")


OPENAI_VOICES = frozenset({"alloy", "ash", "ballad", "cedar", "coral", "echo", "fable", "marin", "nova", "onyx",
                           "sage", "shimmer", "verse"})


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
    """Everything the routes need: settings, voices, readiness and the generation worker."""

    def __init__(self, settings: Settings):
        self.settings = settings
        dirs = settings.voice_dirs + ([settings.upload_dir] if settings.upload_dir not in settings.voice_dirs else [])
        self.voices = VoiceRegistry(dirs, folder_support=settings.folder_support)
        self.library = VoiceLibrary(settings.upload_dir, self.voices, settings.max_voice_bytes,
                                    settings.max_voice_seconds)
        self.speaker_cache = SpeakerCache(settings.speaker_cache_size)
        self.speaker_kv_cache = SpeakerCache(settings.speaker_kv_cache_size)
        self.engine: SpeechEngine | None = None
        self.worker: GenerationWorker | None = None
        self.ready = threading.Event()
        self.load_error: BaseException | None = None
        self._openai_names_logged: set[str] = set()

    # ---- start-up ---------------------------------------------------------------------------

    def start_loading(self) -> threading.Thread:
        """Load models and warm up on a background thread, so /health answers meanwhile."""
        thread = threading.Thread(target=self._load_and_warm_up, name="echo-loader", daemon=True)
        thread.start()
        return thread

    def unready_reason(self) -> str | None:
        """Why requests cannot be served now (None when they can): what /ready answers with 503 and
        what a Ray Serve health check reports."""
        if self.load_error is not None:
            return f"the models failed to load ({self.load_error}); see the server log"
        if not self.ready.is_set():
            return "the models are still loading"
        if self.worker is None or not self.worker.alive:
            return "the generation thread has stopped; see the server log"
        return None

    def _load_and_warm_up(self) -> None:
        try:
            self.engine = self._load_engine()
            self.worker = GenerationWorker(self.engine, max_waiting=self.settings.max_queue,
                                           max_active=self.settings.max_active,
                                           debug_sink=self._save_debug_audio if self.settings.debug_logs else None,
                                           max_ahead_samples=int(self.settings.max_ahead_seconds * inf.SAMPLE_RATE),
                                           send_timeout=self.settings.send_timeout,
                                           step_budget=StepBudget() if self.settings.adaptive_steps else None)
            self.worker.call(self._warm_up)  # on the thread that serves: CUDA graphs are per thread
            self.ready.set()
            log.info("ready")
        except BaseException as e:  # noqa: BLE001 - reported by /ready and the log, then the server idles
            self.load_error = e
            if isinstance(e, weights.WeightsUnavailable):  # a message that says it all, no traceback
                log.error("loading the models failed: %s", e)
            else:
                log.exception("loading the models failed")
            if self.worker is not None:
                self.worker.close()

    def _load_engine(self) -> SpeechEngine:
        s = self.settings
        started = time.perf_counter()
        if s.torch_device.type == "cuda" or torch.device(s.fish_device_name).type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True  # float32 matmuls (the Fish decoder) on tensor cores
            torch.backends.cudnn.allow_tf32 = True
        compile_ae = s.compile_ae and s.fish_device_name.startswith("cuda")
        if s.compile_ae and not compile_ae:
            log.info("ECHO_COMPILE_AE ignored on %s", s.fish_device_name)
        if self.uses_compile:
            load_compile_artifacts(self.compile_cache_path)
        model_dir, fish_dir = weights.fetch(s.model_repo, s.fish_repo)
        model = inf.load_model_from_hf(str(model_dir), device=s.device, dtype=s.torch_model_dtype)
        fish = inf.load_fish_ae_from_hf(str(fish_dir), device=s.fish_device_name, dtype=s.torch_fish_dtype)
        if compile_ae:  # what the server runs of the autoencoder: voices go through encode_zq; audio comes
            fish.encode_zq = torch.compile(fish.encode_zq)  # from the streaming decoder, which stays eager
        pca = inf.load_pca_state_from_hf(str(model_dir), device=s.fish_device_name)
        log.info("models loaded in %.1f s (model %s on %s, fish %s on %s)", time.perf_counter() - started,
                 s.model_dtype, s.device, s.fish_dtype, s.fish_device_name)
        return SpeechEngine(model, fish, pca, self.speaker_cache, s.max_speaker_latent_length,
                            speaker_on_device=s.cache_speaker_on_gpu, speaker_kv_cache=self.speaker_kv_cache,
                            steps=self._step_runner(model), reroll=self._vad_reroll(), step_floor=self._step_floor())

    def _step_floor(self) -> StepFloor | None:
        """ECHO_ADAPTIVE_STEPS_FLOOR, its share of the work measured against the default preset's."""
        if not self.settings.adaptive_steps:
            return None
        return StepFloor.of(PERFORMANCE_PRESETS[self.settings.adaptive_steps_floor], PERFORMANCE_PRESETS["default"])

    def adaptive_steps(self) -> tuple[float, int, int]:
        """(the step budget now, blocks started with fewer steps than requested, steps they did not
        take) since start: (1, 0, 0) without ECHO_ADAPTIVE_STEPS."""
        worker = self.worker
        return (worker.budget, worker.reduced_blocks, worker.steps_saved) if worker is not None else (1.0, 0, 0)

    def _vad_reroll(self) -> VadReroll | None:
        s = self.settings
        if not s.vad_reroll_enabled:
            return None
        from vad import SilenceDetector  # loads the Silero model (a file of the silero-vad package)

        return VadReroll(SilenceDetector(), s.vad_silence_threshold_ms / 1000, s.vad_max_rerolls)

    def vad_rerolls(self) -> int:
        """Blocks sampled again because of a long silence, since start."""
        return self.engine.rerolls if self.engine is not None else 0

    def _step_runner(self, model: EchoDiT) -> StepRunner:
        """How diffusion steps are evaluated: exact and eager, or padded to static shapes and
        (with ECHO_COMPILE) compiled, with CUDA graphs when asked for on CUDA."""
        s = self.settings
        if not s.use_static_shapes:
            return ExactSteps(model)
        blocks = s.stream_preset[0] + [inf.MAX_SEQUENCE_LENGTH]
        shapes = StaticShapes.covering(blocks, max_rows=3 * s.max_active, patch_size=model.speaker_patch_size,
                                       max_speaker_latent_length=s.max_speaker_latent_length,
                                       latent_prefix=model.has_latent_prefix)
        cuda_graphs = s.cuda_graphs and s.compile and model.device.type == "cuda"
        if s.cuda_graphs and not cuda_graphs:
            log.info("ECHO_CUDA_GRAPHS ignored: it needs ECHO_COMPILE and a CUDA device")
        log.info("static step shapes: frames %s, rows %s%s", shapes.frame_buckets, shapes.row_buckets,
                 " (compiled" + (", CUDA graphs)" if cuda_graphs else ")") if s.compile else "")
        return StaticSteps(model, shapes, compile=s.compile, cuda_graphs=cuda_graphs)

    def _warm_up(self) -> None:
        """Every static step shape (compiling it, with ECHO_COMPILE), then one generation of each
        block shape the server uses, so no request pays for a first use."""
        if not self.settings.warmup:
            return
        started = time.perf_counter()
        self.engine.warm_up_encoder()
        log.info("voice encoder warmed up in %.1f s", time.perf_counter() - started)
        if isinstance(self.engine.steps, StaticSteps):
            self.engine.steps.warm_up()
            log.info("%d step shapes warmed up in %.1f s", len(self.engine.steps.shapes.all_shapes()),
                     time.perf_counter() - started)
        voice = self.settings.warmup_voice or "none"
        try:
            speaker = self.speaker_reference(voice)
        except RequestError as e:
            log.warning("ECHO_WARMUP_VOICE: %s; warming up without a voice", e)
            speaker = None
        for stream in (True, False):
            options = GenerationOptions(input=self.settings.warmup_text, voice=voice, stream=stream)
            job = self._job(options, (self.settings.warmup_text,), speaker)
            for _ in self.engine.generate(job):
                pass
        log.info("warm-up done in %.1f s", time.perf_counter() - started)
        if self.uses_compile:
            save_compile_artifacts(self.compile_cache_path)

    def compiles_after_warm_up(self) -> int:
        """Graphs torch.compile built while serving: each one a shape the warm-up missed."""
        steps = self.engine.steps if self.engine is not None else None
        return steps.compiles_after_warm_up if isinstance(steps, StaticSteps) else 0

    @property
    def uses_compile(self) -> bool:
        """torch.compile is used: the decoder with ECHO_COMPILE, the autoencoder with ECHO_COMPILE_AE on CUDA."""
        s = self.settings
        return s.compile or (s.compile_ae and s.fish_device_name.startswith("cuda"))

    @property
    def compile_cache_path(self) -> Path:
        return self.settings.cache_dir / f"echo_tts_compile_cache_{self.settings.cache_version}.bin"

    def _save_debug_audio(self, audio: np.ndarray) -> None:
        """ECHO_DEBUG_LOGS: keep the last generation exactly as generated (float samples at 44.1 kHz)."""
        sf.write(DEBUG_WAV, audio, inf.SAMPLE_RATE, subtype="FLOAT")

    def close(self) -> None:
        """Stop the worker (ending any job still running) and let go of the models and their memory."""
        if self.worker is not None:
            self.worker.close()
        self.worker, self.engine = None, None
        self.speaker_cache.clear()
        self.speaker_kv_cache.clear()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        log.info("shut down")

    # ---- requests -----------------------------------------------------------------------------

    def build_job(self, options: GenerationOptions) -> SpeechJob:
        """Validate and translate one request, and prepare its voice (slow for a new one: call it
        off the event loop; it keeps the generation thread free). Raises RequestError (HTTP 400)
        naming the field."""
        chunks = self.text_chunks(options)
        inline = looks_like_inline_audio(options.voice)
        used = self.voice_used(options.voice)  # resolved once: what it speaks with is what it reports
        speaker = self._reference(options.voice if inline else used)
        try:
            voice = self.engine.prepare_voice(speaker)
        except VoiceUnusable as e:
            raise RequestError(str(e), "voice") from e
        return replace(self._job(options, chunks, speaker), voice=voice, voice_name=used)

    async def start(self, options: GenerationOptions, request_id: str) -> Started:
        """A request's job, generating: its queue slot is taken first (a full queue is a RequestError
        with status 429, at once), then the job is built off the event loop (its voice may take
        seconds to prepare) and submitted in that slot, with ECHO_REQUEST_TIMEOUT as its time limit.
        Raises RequestError (400) for what build_job refuses."""
        try:
            reservation = self.worker.reserve()
        except QueueFull:
            raise RequestError("too many requests are waiting; retry shortly", status=429) from None
        with reservation:  # given back unless submitted, also when the caller is cancelled meanwhile
            job = await asyncio.to_thread(self.build_job, options)
            stream = reservation.submit(job, request_id, self.settings.request_timeout or None)
            return Started(job, stream, job.voice_name)

    def text_chunks(self, options: GenerationOptions) -> tuple[str, ...]:
        if len(options.input) > self.settings.max_input_chars:
            raise RequestError(f"input is {len(options.input)} characters; the limit is "
                               f"{self.settings.max_input_chars}", "input")
        text = prepare_text(options.input)
        if self.settings.normalize_exclamation:
            text = normalize_exclamations(text)
        if not text:
            raise RequestError("input is empty", "input")
        chunking = self.settings.chunking if options.chunking_enabled is None else options.chunking_enabled
        if not chunking:
            if not fits_in_one_generation(text, normalize=options.normalize):
                raise RequestError("input is longer than one generation (768 bytes); enable chunking "
                                   "(chunking_enabled=true) or send shorter text", "input")
            return (text,)
        try:
            chunk_settings = ChunkSettings(
                target_seconds=options.chunk_target_seconds, min_seconds=options.chunk_min_seconds,
                max_seconds=options.chunk_max_seconds,
                chars_per_second=options.chunk_chars_per_second or self.settings.chunk_chars_per_second,
                words_per_second=options.chunk_words_per_second or self.settings.chunk_words_per_second)
        except ValueError as e:
            raise RequestError(str(e), getattr(e, "param", None)) from e
        chunks = tuple(split_into_chunks(text, chunk_settings, normalize=options.normalize,
                                         continuation=self.chunk_mode(options) == "continue"))
        if len(chunks) > self.settings.max_chunks:
            raise RequestError(f"input needs {len(chunks)} chunks of speech; the limit is "
                               f"{self.settings.max_chunks} (ECHO_MAX_CHUNKS)", "input")
        return chunks

    def chunk_mode(self, options: GenerationOptions) -> str:
        """The request's chunk_mode, else ECHO_CHUNK_MODE."""
        return options.chunk_mode or self.settings.chunk_mode

    def voice_names(self) -> list[str]:
        """Every voice a request may name: the registry's and the aliases (ECHO_VOICE_ALIASES)."""
        return sorted(set(self.voices.list()) | set(self.settings.voice_aliases))

    def voice_used(self, voice: str) -> str:
        """The voice a request's `voice` speaks with (what X-Echo-Voice reports): an alias's voice; for
        an OpenAI built-in name that is no voice here, ECHO_DEFAULT_VOICE, else the library's first
        voice by name, else `none`; `inline` for inline audio; else the name as given."""
        if voice in self.settings.voice_aliases:
            return self.settings.voice_aliases[voice]
        if looks_like_inline_audio(voice):
            return "inline"
        if voice.lower() in OPENAI_VOICES and voice not in self.voices:
            used = self.settings.default_voice or next(iter(self.voices.list()), NO_VOICE)
            if voice not in self._openai_names_logged:
                self._openai_names_logged.add(voice)
                log.info("OpenAI voice %r speaks with voice %r (set ECHO_VOICE_ALIASES or ECHO_DEFAULT_VOICE "
                         "to choose)", voice, used)
            return used
        return voice

    def speaker_reference(self, voice: str) -> SpeakerReference | None:
        """The voice of a request: None for `none`, inline base64 audio, or a registry voice."""
        return self._reference(voice if looks_like_inline_audio(voice) else self.voice_used(voice))

    def _reference(self, voice: str) -> SpeakerReference | None:
        """A resolved voice (`none`, inline audio or a registry name) as a reference to clone."""
        try:
            if is_no_voice(voice):
                return None
            if looks_like_inline_audio(voice):
                return self._inline_voice(voice)
            source = self.voices.resolve(voice)
        except ValueError as e:
            raise RequestError(str(e), "voice") from e
        return self._registry_reference(source)

    def _registry_reference(self, source: VoiceSource) -> SpeakerReference:
        """A file or folder voice, its saved latents (an uploaded voice's) used when they are current."""
        max_seconds = self.settings.max_speaker_latent_length * inf.AE_DOWNSAMPLE_FACTOR / inf.SAMPLE_RATE
        return SpeakerReference(source.cache_key, lambda: load_voice_audio(source, max_seconds),
                                name=source.cache_name, load_latents=lambda: self.library.stored_latents(source))

    # ---- the voice library --------------------------------------------------------------------

    def add_voice(self, name: str, data: bytes, consent: str | None, overwrite: bool) -> dict:
        """Check an uploaded voice, encode it, then store it with its latents (slow: call it off the
        event loop), so neither a request nor a restart has to encode it. Nothing is stored unless
        all of it is usable. Raises RequestError (with its HTTP status)."""
        if not self.settings.uploads_enabled:
            raise RequestError("voice uploads are off on this server: set ECHO_VOICE_UPLOADS=1 (they are on by "
                               "default when ECHO_API_KEY is set)", status=403)
        upload = self.library.check(name, data, consent, overwrite)
        max_seconds = self.settings.max_speaker_latent_length * inf.AE_DOWNSAMPLE_FACTOR / inf.SAMPLE_RATE
        # encoded from the stored FLAC's bytes, exactly as the voice is read back from its file
        clip = SpeakerReference(f"upload:{hashlib.sha256(upload.flac).hexdigest()}",
                                lambda: inf.load_audio_bytes(upload.flac, max_duration=max_seconds))
        try:
            latent, mask = self.engine.speaker_latents(clip)
        except VoiceUnusable as e:
            raise RequestError(str(e), "audio_sample") from e
        source = self.library.store(upload, overwrite, latents=(latent, mask))
        self._forget(source.cache_name)
        return upload.metadata

    def delete_voice(self, name: str) -> dict:
        source = self.library.delete(name)
        self._forget(source.cache_name)
        return {"object": "audio.voice.deleted", "id": source.name, "deleted": True}

    def _forget(self, cache_name: str) -> None:
        """Drop a voice from every cache (its latents and its speaker keys)."""
        self.speaker_cache.discard_name(cache_name)
        self.speaker_kv_cache.discard_name(cache_name)

    def _inline_voice(self, voice: str) -> SpeakerReference:
        """A base64 / data: URL voice within ECHO_MAX_VOICE_BYTES and ECHO_MAX_VOICE_SECONDS. Its
        base64 is checked now; it is decoded only when its latents are not cached (keyed by content),
        so a clip sent with every request is decoded once."""
        data = decode_inline_voice(voice, self.settings.max_voice_bytes)
        return SpeakerReference(inline_cache_key(data),
                                lambda: inline_voice_audio(data, max_seconds=self.settings.max_voice_seconds))

    def _job(self, options: GenerationOptions, chunks: tuple[str, ...],
             speaker: SpeakerReference | None) -> SpeechJob:
        first, later = self.block_shapes(options)
        sampler = inf.SamplerSettings(
            num_steps=0, cfg_scale_text=options.cfg_scale_text, cfg_scale_speaker=options.cfg_scale_speaker,
            cfg_min_t=options.cfg_min_t, cfg_max_t=options.cfg_max_t,
            truncation_factor=_truncation(options.truncation_factor, len(first.block_sizes)),
            rescale_k=options.rescale_k, rescale_sigma=options.rescale_sigma,
            speaker_kv_scale=options.speaker_kv_scale, speaker_kv_max_layers=options.speaker_kv_max_layers,
            speaker_kv_min_t=options.speaker_kv_min_t, guidance=options.guidance_mode)
        early_stop = EarlyStop(options.early_stop_on_zero, options.zero_eps, options.zero_tail_frames,
                               options.zero_tail_min_frac)
        seed = options.seed if options.seed is not None and options.seed >= 0 else random_seed()
        return SpeechJob(chunks, speaker, seed, first, later, sampler, early_stop, options.normalize,
                         chunk_mode=self.chunk_mode(options))

    def block_shapes(self, options: GenerationOptions) -> tuple[BlockShape, BlockShape]:
        """(first chunk, later chunks). Streaming starts with the preset's small blocks; a request's
        block_sizes / num_steps override both."""
        nonstream = ([inf.MAX_SEQUENCE_LENGTH], [self.settings.num_steps_nonstream])
        stream = self.settings.stream_preset
        if options.block_sizes is None and options.num_steps is None:
            return _shape(*(stream if options.stream else nonstream)), _shape(*nonstream)
        default_blocks = stream[0] if options.stream else nonstream[0]
        blocks = options.block_sizes or default_blocks
        steps = options.num_steps
        if steps is None:
            steps = stream[1] if blocks == stream[0] else self.settings.num_steps_nonstream
        if isinstance(steps, int):
            steps = [steps] * len(blocks)
        if len(steps) != len(blocks):
            raise RequestError(f"num_steps has {len(steps)} entries but there are {len(blocks)} blocks "
                               f"({blocks})", "num_steps")
        if sum(steps) > MAX_STEPS_PER_CHUNK:
            raise RequestError(f"the blocks take {sum(steps)} diffusion steps in all; the limit is "
                               f"{MAX_STEPS_PER_CHUNK} per chunk", "num_steps")
        shape = _shape(blocks, steps)
        return shape, shape


def generation_failure(error: Exception) -> RequestError:
    """What a failed generation (or the encoding of its audio) tells the client, over HTTP or a
    WebSocket: an unusable voice is the request's fault (400), a timeout 504, anything else 500."""
    if isinstance(error, VoiceUnusable):
        return RequestError(str(error), "voice")
    if isinstance(error, GenerationTimeout):
        return RequestError(f"{error} (ECHO_REQUEST_TIMEOUT)", status=504)
    if isinstance(error, ClientStalled):  # nobody is listening: a line in the log, no traceback
        log.info("generation stopped: %s", error)
        return RequestError(str(error), status=408)
    log.error("generation failed", exc_info=error)
    return RequestError(f"generation failed: {error}", status=500)


def _truncation(factor: float | list[float] | None, blocks: int) -> float | tuple[float, ...] | None:
    """One factor, or one per block of the first chunk (later chunks' blocks take the last)."""
    if not isinstance(factor, list):
        return factor
    if len(factor) != blocks:
        raise RequestError(f"truncation_factor has {len(factor)} entries but there are {blocks} blocks",
                           "truncation_factor")
    return tuple(factor)


def _shape(blocks: list[int], steps: list[int]) -> BlockShape:
    return BlockShape(tuple(blocks), tuple(steps))


def load_compile_artifacts(path: Path) -> None:
    """Reuse the torch.compile artifacts a previous start saved (ECHO_CACHE_DIR / ECHO_CACHE_VERSION)."""
    if not path.is_file():
        return
    try:
        torch.compiler.load_cache_artifacts(path.read_bytes())
        log.info("loaded torch.compile artifacts from %s", path)
    except Exception as e:  # noqa: BLE001 - a stale cache only costs compile time
        log.warning("could not load torch.compile artifacts from %s: %s", path, e)


def save_compile_artifacts(path: Path) -> None:
    try:
        artifacts = torch.compiler.save_cache_artifacts()
        if artifacts is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(artifacts[0])
            log.info("saved torch.compile artifacts to %s", path)
    except Exception as e:  # noqa: BLE001
        log.warning("could not save torch.compile artifacts to %s: %s", path, e)

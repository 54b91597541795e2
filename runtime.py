"""The loaded server: models, the engine over them and the generation worker that runs it, built
together from the settings (`load_runtime`) and warmed up, or not at all.

Start-up: TF32 for float32 matmuls on CUDA, torch.compile's saved artefacts (ECHO_CACHE_DIR), the
weights (weights.fetch: local directories or the Hugging Face cache), the step runner (exact and
eager, or static shapes, compiled, with CUDA graphs), VAD reroll and adaptive steps, then a warm-up
on the generation thread of every step shape and block shape the server uses.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import inference as inf
import weights
from batched_steps import ExactSteps, StaticShapes, StaticSteps, StepRunner
from autoencoder import DAC
from engine import (MAX_DECODE_BATCH_FRAMES, TEXT_BUCKETS, CompiledPrefixEncoder, CompiledStreamDecoder,
                    CompiledTextEncoder, SpeechEngine, StepFloor, VadReroll, VoiceUnusable)
from model import EchoDiT
from settings import PERFORMANCE_PRESETS, Settings
from errors import RequestError
from speech_request import GenerationOptions
from voice_catalog import VoiceCatalog
from worker import GenerationWorker, StepBudget, is_out_of_memory

log = logging.getLogger(__name__)


class LoadProgress:
    """What loading is doing now, for /ready and the log: a stage, counted where it has parts
    (step shapes to compile, warm-up generations), how long the rest of it should take (at the pace
    of its parts done, else as long as the stage took at the last start: `history`), and the seconds
    since loading began. Written by the threads that load and warm up, read by any: the state is
    one tuple, replaced whole. `took` holds each stage's seconds, for the next start."""

    LOG_EVERY = 10.0  # seconds between progress lines within a counted stage

    def __init__(self, clock: Callable[[], float] = time.monotonic, history: dict[str, float] | None = None):
        self.clock = clock
        self.history = history or {}
        self.took: dict[str, float] = {}
        self.started = clock()
        self._state = ("starting", 0, 0, self.started)  # stage, parts done, parts in all (0: not counted), begun
        self._logged = self.started

    def enter(self, stage: str, total: int = 0) -> None:
        self._close_stage()
        self._state = (stage, 0, total, self.clock())
        self._logged = self.clock()
        last = f", {self.history[stage]:.0f} s at the last start" if stage in self.history else ""
        log.info("%s%s (%.0f s since start%s)", stage, f": {total} to do" if total else "", self.elapsed, last)

    def advance(self) -> None:
        stage, done, total, begun = self._state
        self._state = (stage, done + 1, total, begun)
        if self.clock() - self._logged >= self.LOG_EVERY or done + 1 == total:
            self._logged = self.clock()
            log.info("%s", self.describe())

    def finish(self) -> dict[str, float]:
        """Seconds each stage took, the last one closed now."""
        self._close_stage()
        self._state = ("ready", 0, 0, self.clock())
        return dict(self.took)

    def _close_stage(self) -> None:
        stage, _, _, begun = self._state
        if stage != "starting":
            self.took[stage] = self.clock() - begun

    @property
    def elapsed(self) -> float:
        return self.clock() - self.started

    def remaining(self, state: tuple | None = None) -> float | None:
        """Seconds the stage's remaining parts should take at the pace of its parts done so far, or
        what is left of its time at the last start (None: nothing to go by)."""
        stage, done, total, begun = state or self._state
        spent = self.clock() - begun
        if total and done:
            return spent / done * (total - done)
        if stage in self.history:
            return max(self.history[stage] - spent, 0.0)
        return None

    def describe(self) -> str:
        """e.g. 'compiling step shapes, 12 of 40, about 80 s left, 35 s since start'."""
        state = self._state  # one reading: another thread may enter the next stage meanwhile
        stage, done, total, _ = state
        left = self.remaining(state)
        return (f"{stage}{f', {done} of {total}' if total else ''}"
                f"{f', about {left:.0f} s left' if left is not None and (not total or done < total) else ''}, "
                f"{self.elapsed:.0f} s since start")


def load_times_path(settings: Settings) -> Path:
    """Where each start keeps how long its loading stages took (ECHO_CACHE_DIR, with the compile cache)."""
    return settings.cache_dir / f"echo_tts_load_times_{settings.cache_version}.json"


def read_load_times(path: Path) -> dict[str, float]:
    """The stages' seconds at the last start; none when there was none (or the file is unreadable)."""
    try:
        times = json.loads(path.read_text())
        return {str(k): float(v) for k, v in times.items()}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, AttributeError, TypeError) as e:
        log.warning("ignoring %s: %s", path, e)
        return {}


def save_load_times(path: Path, times: dict[str, float]) -> None:
    save_to_cache(path, {k: round(v, 1) for k, v in times.items()}, "the loading times")


def save_to_cache(path: Path, data: object, what: str) -> None:
    """`data` as JSON at `path` in ECHO_CACHE_DIR, replaced whole (a reader sees one start's); a cache
    that cannot be written (read-only) only costs the next start what it would have read there."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{os.getpid()}")
        partial.write_text(json.dumps(data, indent=1))
        os.replace(partial, path)
    except OSError as e:
        log.warning("could not save %s to %s: %s", what, path, e)


@dataclass(frozen=True)
class Runtime:
    """The engine and the worker that runs its jobs: they exist together, from load to close."""

    engine: SpeechEngine
    worker: GenerationWorker
    plan: MemoryPlan | None = None  # what the static-shape path was planned to hold on CUDA (None: no plan)

    @property
    def compiles_after_warm_up(self) -> int:
        """Graphs torch.compile built while serving: each one a shape the warm-up missed."""
        e = self.engine
        steps, compiled = e.steps, (e.text_encoder, e.stream_decoder, e.prefix_encoder)
        return ((steps.compiles_after_warm_up if isinstance(steps, StaticSteps) else 0)
                + sum(part.compiles_after_warm_up for part in compiled if part is not None))

    def close(self) -> None:
        """Stop the worker, ending any job still running."""
        self.worker.close()


def load_runtime(settings: Settings, voices: VoiceCatalog, debug_sink: Callable[[np.ndarray], None] | None = None,
                 progress: LoadProgress | None = None) -> Runtime:
    """Load the models, start the worker and warm up (slow: seconds to minutes), reporting each
    stage to `progress`. On failure nothing is left running."""
    progress = progress or LoadProgress()
    settings = _fast_path_or_eager(settings)
    engine, settings, plan = _load_engine(settings, voices, progress)
    worker = GenerationWorker(engine, max_waiting=settings.max_queue, max_active=settings.max_active,
                              debug_sink=debug_sink,
                              max_ahead_samples=int(settings.max_ahead_seconds * inf.SAMPLE_RATE),
                              send_timeout=settings.send_timeout,
                              step_budget=StepBudget() if settings.adaptive_steps else None)
    try:
        failed, transient = None, False
        try:
            worker.call(lambda: _warm_up(settings, voices, engine, progress))  # on the serving thread, as it serves
        except Exception as e:
            if not settings.fast_path_by_default:
                raise
            failed = f"failed to warm up: {type(e).__name__}: {e}"
            transient = is_out_of_memory(e)  # (memory someone else held: try again next time)
        if failed is not None:  # (out of the handler: the failed parts' frames go with the exception)
            if not transient:
                _remember_failure(settings, failed)  # (before the retry: a fast path that broke the GPU is skipped next)
            worker.call(torch._dynamo.reset)  # (inductor's CUDA graphs, the decoder's, live per thread: this one's)
            settings, plan = _give_way_to_eager(settings, engine, failed), None
            worker.call(lambda: _warm_up(settings, voices, engine, progress))
    except BaseException:
        worker.close()
        raise
    if settings.compiles:
        _forget_failure(settings)
    save_load_times(load_times_path(settings), progress.finish())
    return Runtime(engine, worker, plan)


def uses_compile(settings: Settings) -> bool:
    """torch.compile is used: the decoder with ECHO_COMPILE, the autoencoder with ECHO_COMPILE_AE on CUDA."""
    return settings.compiles or settings.compiles_ae


def fast_path_failure_path(settings: Settings) -> Path:
    """Where a start whose default fast path failed to warm up says why (ECHO_CACHE_DIR, one file per
    setup: replicas of other setups sharing the directory keep their own), so later starts of the
    same setup go straight to the eager path instead of failing again."""
    digest = hashlib.sha256(json.dumps(_setup(settings), sort_keys=True).encode()).hexdigest()[:16]
    return settings.cache_dir / f"echo_tts_fast_path_failed_{settings.cache_version}_{digest}.json"


def _setup(settings: Settings) -> dict:
    """What a fast-path failure is remembered for: the torch, the GPU and the settings that shape
    the compiled parts (a replica with another GPU, or another setting, tries again)."""
    try:
        gpu = torch.cuda.get_device_name(settings.torch_device)
    except Exception:  # noqa: BLE001 - no GPU to name (or none that answers): the rest still tells setups apart
        gpu = None
    return {"torch": torch.__version__, "gpu": gpu, "model": settings.model_repo, "dtype": settings.model_dtype,
            "preset": settings.performance_preset, "max_active": settings.max_active,
            "max_speaker_latent_length": settings.max_speaker_latent_length}


def _fast_path_or_eager(settings: Settings) -> Settings:
    """The settings to start with: eager when the default fast path failed to warm up at an earlier
    start of the same setup (ECHO_COMPILE=1 tries it again)."""
    if not settings.fast_path_by_default:
        return settings
    path = fast_path_failure_path(settings)
    try:
        failed = json.loads(path.read_text())
    except FileNotFoundError:
        return settings
    except (OSError, ValueError) as e:
        log.warning("ignoring %s: %s", path, e)
        return settings
    if not isinstance(failed, dict) or failed.get("setup") != _setup(settings):
        return settings
    log.warning("serving on the eager path: the compiled fast path failed at an earlier start (%s); set "
                "ECHO_COMPILE=1 to try it again, ECHO_COMPILE=0 to silence this", failed.get("why"))
    return _eager(settings)


def _eager(settings: Settings) -> Settings:
    """Nothing compiled: the voice encoder (ECHO_COMPILE_AE) fails as the rest does when inductor
    cannot build (no C compiler, a broken triton), so it is not compiled either."""
    return settings.model_copy(update={"compile": False, "cuda_graphs": False, "compile_ae": False})


def _give_way_to_eager(settings: Settings, engine: SpeechEngine | None, why: str) -> Settings:
    """The default fast path cannot start: log why and serve eager (exact batching, nothing
    compiled) rather than not at all; the engine's compiled parts and their memory are let go."""
    log.warning("the compiled fast path (the default on CUDA) %s; serving on the eager path instead. Set "
                "ECHO_COMPILE=0 to skip it, ECHO_COMPILE=1 to make this an error", why)
    if engine is not None:
        engine.steps, engine.text_encoder, engine.stream_decoder, engine.prefix_encoder = \
            ExactSteps(engine.model), None, None, None
        vars(engine.fish_ae).pop("encode_zq", None)  # (ECHO_COMPILE_AE's wrapper: the module's own method again)
        gc.collect()  # (an exception's traceback may hold them in a cycle)
        if engine.model.device.type == "cuda":
            torch.cuda.empty_cache()  # the static runner's pool and graphs
    return _eager(settings)


def _remember_failure(settings: Settings, why: str) -> None:
    save_to_cache(fast_path_failure_path(settings), {"setup": _setup(settings), "why": why}, "why the fast path failed")


def _forget_failure(settings: Settings) -> None:
    """The fast path started: an earlier failure of this setup no longer holds."""
    path = fast_path_failure_path(settings)
    try:
        path.unlink(missing_ok=True)
    except OSError as e:  # (a read-only cache: nothing was remembered there either)
        log.debug("could not remove %s: %s", path, e)


def compile_cache_path(settings: Settings) -> Path:
    return settings.cache_dir / f"echo_tts_compile_cache_{settings.cache_version}.bin"


def _load_engine(s: Settings, voices: VoiceCatalog,
                 progress: LoadProgress) -> tuple[SpeechEngine, Settings, MemoryPlan | None]:
    """The engine, the settings it runs (eager when the default fast path cannot fit) and its
    memory plan (static shapes on CUDA)."""
    started = time.perf_counter()
    if s.torch_device.type == "cuda" or torch.device(s.fish_device_name).type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # float32 matmuls (the Fish decoder) on tensor cores
        torch.backends.cudnn.allow_tf32 = True
    if s.compile_ae and not s.compiles_ae:
        log.info("ECHO_COMPILE_AE ignored on %s", s.fish_device_name)
    if uses_compile(s):
        progress.enter("loading saved torch.compile artifacts")
        load_compile_artifacts(compile_cache_path(s))
    progress.enter("fetching the weights")
    model_dir, fish_dir = weights.fetch(s.model_repo, s.fish_repo)
    progress.enter("loading the models")
    model = inf.load_model_from_hf(str(model_dir), device=s.device, dtype=s.torch_model_dtype)
    fish = inf.load_fish_ae_from_hf(str(fish_dir), device=s.fish_device_name, dtype=s.torch_fish_dtype)
    pca = inf.load_pca_state_from_hf(str(model_dir), device=s.fish_device_name)
    log.info("models loaded in %.1f s (model %s on %s, fish %s on %s)", time.perf_counter() - started,
             s.model_dtype, s.device, s.fish_dtype, s.fish_device_name)
    steps = _step_runner(s, model)
    plan = None
    if isinstance(steps, StaticSteps) and model.device.type == "cuda":
        plan = memory_plan(s, model, steps)
        try:
            check_memory(plan, model.device)
        except MemoryTooSmall as e:
            if not s.fast_path_by_default:
                raise
            s, plan = _give_way_to_eager(s, None, f"does not fit: {e}"), None
            steps = _step_runner(s, model)
    if s.compiles_ae:  # (after the fit: the eager path compiles nothing)
        fish.encode_zq = torch.compile(fish.encode_zq)  # voices go through encode_zq; audio comes from the
        # streaming decoder, compiled with ECHO_COMPILE
    return SpeechEngine(model, fish, pca, voices.latents, s.max_speaker_latent_length,
                        speaker_on_device=s.cache_speaker_on_gpu, speaker_kv_cache=voices.keys,
                        steps=steps, reroll=_vad_reroll(s), step_floor=_step_floor(s),
                        text_encoder=CompiledTextEncoder(model) if s.compiles else None,
                        stream_decoder=_stream_decoder(s, fish), prefix_encoder=_prefix_encoder(s, model)), s, plan


def _prefix_encoder(s: Settings, model: EchoDiT) -> CompiledPrefixEncoder | None:
    """With ECHO_COMPILE, the latent-prefix encoder compiled for the extensions of the streaming
    preset's blocks (a model without the blockwise modules has none)."""
    if not s.compiles or not model.has_latent_prefix:
        return None
    encoder = CompiledPrefixEncoder(model, s.stream_preset[0])
    return encoder if encoder.chain else None


def _decode_piece(s: Settings) -> int:
    """Latent frames of the compiled streaming decoder's pieces: the streaming preset's first block."""
    return min(s.stream_preset[0])


def _stream_decoder(s: Settings, fish: DAC) -> CompiledStreamDecoder | None:
    """With ECHO_COMPILE, the streaming decoder compiled in pieces of the first block's frames (with
    CUDA graphs as the steps have them)."""
    if not s.compiles:
        return None
    return CompiledStreamDecoder(frames=_decode_piece(s),
                                 cuda_graphs=s.replays_graphs and fish.device.type == "cuda")


GIB = 1 << 30
STEP_WORKSPACE = 1 * GIB  # a step pass's activations besides its joined keys, and the allocator's slack
# the batched decoder's largest activation per latent frame of a call: 6 GiB at engine.MAX_DECODE_BATCH_FRAMES (one
# call of 64 streams' 480-frame blocks, 30,720 frames, wanted a 22.5 GiB tensor on an H100)
DECODE_BYTES_PER_FRAME = 6 * GIB // MAX_DECODE_BATCH_FRAMES


class MemoryTooSmall(ValueError):
    """The static shapes at ECHO_MAX_ACTIVE do not fit the device: loading stops before warm-up."""


@dataclass(frozen=True)
class MemoryPlan:
    """What the static-shape path holds on the model's device at ECHO_MAX_ACTIVE, known before warm-up
    allocates it. StaticSteps' row pool dominates: a row of prefix, text and speaker keys/values per
    stream (its guidance rows share them) at the largest speaker bucket, allocated once
    (StaticShapes.stacked_bytes), and each stream keeps its own unpadded keys beside them
    (StaticShapes.own_bytes). A pass's peak (StaticShapes.pass_bytes: activations and joined keys of
    the largest pass, at most PASS_TOKENS tokens) is held for good by the CUDA graphs' memory pool;
    without graphs it comes and goes.

    `need` is what it takes (with graphs, their pass peak included); `worst` adds the pass peak
    without graphs, the decoder's largest call (decode_peak: with ECHO_COMPILE, one piece a
    stream) and, per stream, the scaled copy of a voice's keys that a request with speaker_kv_scale
    holds (StaticShapes.scaled_speaker_bytes). Against the one measurement (H100, 2026-11-22,
    tests/test_memory_plan.py), the runner of that day held the padded keys of every guidance row
    twice (stacked, and again in inductor's graph inputs): 16 streams peaked at 52 GiB, and 3 rows a
    stream at twice their bytes say 52.1."""

    loaded: int  # bytes the loaded models take
    per_stream: int  # one stream's rows of the key/value pool, and its own keys
    streams: int  # ECHO_MAX_ACTIVE
    pass_peak: int = 0  # the largest pass's activations and joined keys
    cuda_graphs: bool = False  # (their memory pool keeps pass_peak)
    decode_peak: int = MAX_DECODE_BATCH_FRAMES * DECODE_BYTES_PER_FRAME  # the decoder's largest call (decode_peak)
    scaled_speaker: int = 0  # per stream: a speaker_kv_scale request's scaled copy of its voice's keys, at most

    @property
    def need(self) -> int:
        return self.loaded + self.streams * self.per_stream + STEP_WORKSPACE + (self.pass_peak if self.cuda_graphs else 0)

    @property
    def worst(self) -> int:
        return (self.need + (0 if self.cuda_graphs else self.pass_peak) + self.decode_peak
                + self.streams * self.scaled_speaker)

    def streams_that_fit(self, capacity: int, worst: bool = False) -> int:
        fixed = (self.loaded + STEP_WORKSPACE + (self.pass_peak if worst or self.cuda_graphs else 0)
                 + (self.decode_peak if worst else 0))
        return max(0, int((capacity - fixed) // (self.per_stream + (self.scaled_speaker if worst else 0))))


def memory_plan(s: Settings, model: EchoDiT, steps: StaticSteps, loaded: int | None = None) -> MemoryPlan:
    """The plan of `steps` at s.max_active; `loaded`: what the device holds now (measured on CUDA)."""
    loaded = torch.cuda.memory_allocated(model.device) if loaded is None else loaded
    shapes = steps.shapes
    return MemoryPlan(loaded, shapes.stacked_bytes(model, 1) + shapes.own_bytes(model), s.max_active,
                      shapes.pass_bytes(model, shapes.row_buckets[-1]), steps.cuda_graphs, decode_peak(s),
                      shapes.scaled_speaker_bytes(model))


def decode_peak(s: Settings) -> int:
    """The decoder's largest activation: a call of MAX_DECODE_BATCH_FRAMES latent frames eager; with
    ECHO_COMPILE every block is decoded in pieces of the first block's frames (leftovers, and smaller
    blocks, are smaller still), so a call holds one piece of each stream, ECHO_MAX_ACTIVE at most."""
    frames = MAX_DECODE_BATCH_FRAMES
    if s.compiles:
        frames = min(frames, s.max_active * _decode_piece(s))
    return frames * DECODE_BYTES_PER_FRAME


def check_memory(plan: MemoryPlan, device: torch.device, capacity: int | None = None) -> None:
    """Raise MemoryTooSmall, naming the setting and what would fit, unless the plan's need fits
    `capacity` (default: the device's free memory plus what this process holds); warn when its worst
    case does not."""
    if capacity is None:
        free, _ = torch.cuda.mem_get_info(device)
        capacity = free + torch.cuda.memory_reserved(device)
    gib = lambda n: f"{n / GIB:.1f} GiB"  # noqa: E731
    detail = (f"{gib(plan.loaded)} of models, {plan.streams} streams x {gib(plan.per_stream)} of keys and values "
              "(pooled, and its own)")
    safe = plan.streams_that_fit(capacity, worst=True)
    safely = (f"ECHO_MAX_ACTIVE={safe} or lower stays within the worst case (the largest pass, the decoder's "
              f"largest batch, every stream scaling a voice of its own with speaker_kv_scale: {gib(plan.worst)} "
              "as set)")
    if plan.need > capacity:
        fit = plan.streams_that_fit(capacity)
        advice = (f"set ECHO_MAX_ACTIVE={fit} or lower; {safely}" if fit else
                  "even one stream does not fit: use the eager path, ECHO_COMPILE=0 and ECHO_STATIC_SHAPES=0")
        raise MemoryTooSmall(f"ECHO_MAX_ACTIVE={plan.streams} needs at least {gib(plan.need)} on {device} ({detail}) "
                             f"and it has {gib(capacity)}: {advice}, or lower ECHO_MAX_SPEAKER_LATENT_LENGTH")
    if plan.worst > capacity:
        log.warning("memory plan: ECHO_MAX_ACTIVE=%d needs %s to %s of the %s on %s (%s); it may run out of memory "
                    "under load: %s", plan.streams, gib(plan.need), gib(plan.worst), gib(capacity), device, detail,
                    safely)
        return
    log.info("memory plan: ECHO_MAX_ACTIVE=%d needs %s to %s of the %s on %s (%s)", plan.streams, gib(plan.need),
             gib(plan.worst), gib(capacity), device, detail)


def _step_floor(s: Settings) -> StepFloor | None:
    """ECHO_ADAPTIVE_STEPS_FLOOR, its share of the work measured against the default preset's."""
    if not s.adaptive_steps:
        return None
    return StepFloor.of(PERFORMANCE_PRESETS[s.adaptive_steps_floor], PERFORMANCE_PRESETS["default"])


def _vad_reroll(s: Settings) -> VadReroll | None:
    if not s.vad_reroll_enabled:
        return None
    from vad import SilenceDetector  # loads the Silero model (a file of the silero-vad package)

    return VadReroll(SilenceDetector(inf.SAMPLE_RATE), s.vad_silence_threshold_ms / 1000, s.vad_max_rerolls)


def _step_runner(s: Settings, model: EchoDiT) -> StepRunner:
    """How diffusion steps are evaluated: exact and eager, or padded to static shapes, (with
    ECHO_COMPILE) compiled, and with CUDA graphs when asked for on CUDA (a graph captures the eager
    step as well as the compiled one: no compile time, but none of inductor's fusion)."""
    if not s.use_static_shapes:
        return ExactSteps(model)
    blocks = s.stream_preset[0] + [inf.MAX_SEQUENCE_LENGTH]
    shapes = StaticShapes.covering(blocks, max_rows=3 * s.max_active, patch_size=model.speaker_patch_size,
                                   max_speaker_latent_length=s.max_speaker_latent_length,
                                   latent_prefix=model.has_latent_prefix)
    cuda_graphs = s.replays_graphs and model.device.type == "cuda"
    if s.cuda_graphs and not cuda_graphs:
        log.info("ECHO_CUDA_GRAPHS ignored: it needs a CUDA device")
    log.info("static step shapes: frames %s, rows %s (%s%s)", shapes.frame_buckets, shapes.row_buckets,
             "compiled" if s.compiles else "eager", ", one CUDA graph per shape" if cuda_graphs else "")
    return StaticSteps(model, shapes, compile=s.compiles, cuda_graphs=cuda_graphs)


def _warm_up(s: Settings, voices: VoiceCatalog, engine: SpeechEngine, progress: LoadProgress) -> None:
    """Every static step shape (compiling it, with ECHO_COMPILE), then one generation of each
    block shape the server uses, so no request pays for a first use."""
    if not s.warmup:
        return
    started = time.perf_counter()
    progress.enter("warming up the voice encoder")
    engine.warm_up_encoder()
    log.info("voice encoder warmed up in %.1f s", time.perf_counter() - started)
    parts_started = time.perf_counter()
    if engine.text_encoder is not None:
        progress.enter("compiling the text encoder (text lengths)", len(TEXT_BUCKETS))
        engine.text_encoder.warm_up(on_bucket=progress.advance)
    if engine.stream_decoder is not None:
        progress.enter("compiling the streaming decoder")
        engine.stream_decoder.warm_up(engine.fish_ae)
    if engine.prefix_encoder is not None:
        progress.enter("compiling the latent-prefix encoder (one generation, then several)", 2)
        engine.prefix_encoder.warm_up(on_pass=progress.advance)
    parts = [name for name, part in (("text encoder", engine.text_encoder),
                                     ("streaming decoder", engine.stream_decoder),
                                     ("latent-prefix encoder", engine.prefix_encoder)) if part is not None]
    if parts:
        log.info("%s compiled in %.1f s", ", ".join(parts), time.perf_counter() - parts_started)
    if isinstance(engine.steps, StaticSteps):
        shapes = len(engine.steps.shapes.all_shapes())
        progress.enter("compiling step shapes" if s.compiles else "warming up step shapes", shapes)
        steps_started = time.perf_counter()
        engine.steps.warm_up(on_shape=progress.advance)
        log.info("%d step shapes warmed up in %.1f s", shapes, time.perf_counter() - steps_started)
    voice = s.warmup_voice or "none"
    try:  # a voice that is missing or unusable costs the warm-up its voice, not the start (nor the fast path)
        speaker = voices.reference(voice)
        engine.prepare_voice(speaker)
    except (RequestError, VoiceUnusable) as e:
        log.warning("ECHO_WARMUP_VOICE: %s; warming up without a voice", e)
        voice, speaker = "none", None
    progress.enter("warming up generation (streamed, then whole)", 2)
    for stream in (True, False):
        job = GenerationOptions(input=s.warmup_text, voice=voice, stream=stream).to_job(s, speaker, (s.warmup_text,))
        for _ in engine.generate(job):
            pass
        progress.advance()
    log.info("warm-up done in %.1f s", time.perf_counter() - started)
    if uses_compile(s):
        progress.enter("saving torch.compile artifacts")
        save_compile_artifacts(compile_cache_path(s))


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

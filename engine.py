"""The generation engine: turns speech jobs into 44.1 kHz audio blocks, many jobs at once.

`SpeechEngine` owns the loaded models, the speaker caches and the step runner. A job is a step
generator (`job_steps`: text chunk -> blockwise sampling -> streaming decode -> float32 samples)
that yields what it needs computed: a ModelCall (one diffusion step) or a DecodeCall (one block
through its stream's decoder). `generate` runs one job alone; `GenerationWorker`
runs many on one worker thread, batching their model calls into shared forward passes and their
decodes into shared decoder calls, and hands audio back to asyncio through a queue, so GPU
work never blocks the event loop; a job that runs too far ahead of its client waits out of the batch.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import secrets
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from autoencoder import DAC, StreamingDecoder, decode_streams
from batched_steps import ExactSteps, StepRunner
from inference import (AE_DOWNSAMPLE_FACTOR, MAX_TEXT_LENGTH, SAMPLE_RATE, Conditioning, ModelCall, PCAState,
                       SamplerSettings, find_flattening_point, get_speaker_latent_and_mask, get_text_input_ids_and_mask,
                       latents_to_dac, make_generator, no_speaker, resume, run_steps)
from inference_blockwise import blockwise_steps
from model import EchoDiT, KVCache

log = logging.getLogger(__name__)

FLAT_WINDOW = 20  # frames; find_flattening_point's window
FADE_SAMPLES = 220  # 5 ms: the fade applied where one text chunk's audio meets the next
CPU_DECODE_FRAMES = 64  # on CPUs the decoder is fastest fed pieces of this size (see StreamingDecoder)
MAX_DECODE_BATCH_FRAMES = 8192  # latent frames of one batched decoder call (~6 GiB of its largest activation)


@dataclass(frozen=True)
class BlockShape:
    """How one text chunk is generated: frames per block and diffusion steps per block."""

    block_sizes: tuple[int, ...]
    num_steps: tuple[int, ...]

    def __post_init__(self):
        if len(self.block_sizes) != len(self.num_steps):
            raise ValueError("block_sizes and num_steps must have the same length")


@dataclass(frozen=True)
class EarlyStop:
    """Stop a chunk once its last `tail_frames` latent frames are (almost all) near zero, i.e. silence."""

    enabled: bool = True
    zero_eps: float = 2e-2
    tail_frames: int = 16
    min_fraction: float = 0.95

    def is_silent_tail(self, latents: Tensor) -> bool:
        """latents (frames, 80): at least `min_fraction` of the last `tail_frames` frames have |x| < eps."""
        if not self.enabled or latents.shape[0] < self.tail_frames:
            return False
        quiet = latents[-self.tail_frames:].abs().amax(dim=-1) < self.zero_eps
        return quiet.float().mean().item() >= self.min_fraction


@dataclass(frozen=True)
class SpeakerReference:
    """A voice to clone: a cache key that changes with the audio, and how to load that audio (1, samples)."""

    cache_key: str
    load_audio: Callable[[], Tensor]
    name: str | None = None  # a newer version of the same named voice evicts the older cache entry
    load_latents: Callable[[], tuple[Tensor, Tensor] | None] | None = None  # latents saved earlier, if any


@dataclass(frozen=True)
class PreparedVoice:
    """A voice ready for generation: its speaker mask (1, frames) and the speaker encoder's
    keys/values per layer, on the model device."""

    mask: Tensor
    kv: KVCache


@dataclass(frozen=True)
class SpeechJob:
    """Everything that decides the audio of one request (same job, same audio)."""

    chunks: tuple[str, ...]
    speaker: SpeakerReference | None
    seed: int
    first_shape: BlockShape
    later_shape: BlockShape
    sampler: SamplerSettings
    early_stop: EarlyStop = EarlyStop()
    normalize: bool = True
    voice: PreparedVoice | None = None  # the speaker, prepared off the generation thread (else prepared there)

    def shape_of_chunk(self, index: int) -> BlockShape:
        return self.first_shape if index == 0 else self.later_shape


class VoiceUnusable(ValueError):
    """The voice's audio cannot be used as a reference (unreadable, undecodable or too short)."""


class GenerationCancelled(Exception):
    """For `generate(on_step=...)` callers: raise it from `on_step` to abandon a generation."""


def random_seed() -> int:
    return secrets.randbits(63)


class SpeechEngine:
    """Owns EchoDiT, the Fish S1-DAC, the PCA state, the per-voice speaker latents and speaker
    key/value caches, and the step runner that evaluates diffusion steps (batched_steps.py)."""

    def __init__(self, model: EchoDiT, fish_ae: DAC, pca_state: PCAState, speaker_cache,
                 max_speaker_latent_length: int = 6400, speaker_on_device: bool = False,
                 speaker_kv_cache=None, steps: StepRunner | None = None, reroll: VadReroll | None = None):
        self.model = model
        self.fish_ae = fish_ae
        self.pca_state = pca_state
        self.speaker_cache = speaker_cache
        self.speaker_kv_cache = speaker_kv_cache  # None: computed per request
        self.max_speaker_latent_length = max_speaker_latent_length
        self.speaker_on_device = speaker_on_device
        self.steps = steps or ExactSteps(model)
        self.reroll = reroll
        self.rerolls = 0  # blocks sampled again (VAD reroll) since start

    def speaker_latents(self, speaker: SpeakerReference | None) -> tuple[Tensor, Tensor]:
        """(1, frames, 80) latents and (1, frames) mask on the model device; cached per voice."""
        device, dtype = self.model.device, self.model.dtype
        if speaker is None:
            return no_speaker(4, device, dtype)
        latent, mask = self.speaker_cache.get_or_create(speaker.cache_key, lambda: self._encode_speaker(speaker),
                                                        name=speaker.name)
        return latent.to(device=device, dtype=dtype), mask.to(device)

    def speaker_kv(self, speaker: SpeakerReference | None, latent: Tensor) -> KVCache:
        """The speaker encoder's per-layer keys/values of a voice's latents (1, frames, 80), reused
        across requests of the same voice (the latents are a function of the voice)."""
        if self.speaker_kv_cache is None:
            return self.model.get_kv_cache_speaker(latent)
        key, name, version = ("speaker-kv", None, None) if speaker is None else \
            (("speaker-kv", speaker.cache_key), speaker.name, speaker.cache_key)
        return self.speaker_kv_cache.get_or_create(key, lambda: self.model.get_kv_cache_speaker(latent), name=name,
                                                   version=version)

    @torch.inference_mode()
    def warm_up_encoder(self) -> None:
        """Encode a second of synthetic audio, so that the first request with a voice does not pay
        for the encoder's first use (with ECHO_COMPILE_AE, its compilation). Voices are encoded in
        fixed ~30 s chunks, so this one shape is the only one."""
        clip = 0.1 * torch.randn(1, SAMPLE_RATE, generator=torch.Generator().manual_seed(0))
        self._encode_audio(clip)

    @torch.inference_mode()
    def _encode_speaker(self, speaker: SpeakerReference) -> tuple[Tensor, Tensor]:
        if speaker.load_latents is not None and (stored := speaker.load_latents()) is not None:
            log.info("speaker latents of voice %s loaded, not encoded", speaker.name)
            keep_on = self.model.device if self.speaker_on_device else torch.device("cpu")
            return stored[0].to(keep_on), stored[1].to(keep_on)
        try:
            audio = speaker.load_audio()
        except ValueError as e:  # unreadable, vanished or undecodable voice audio
            raise VoiceUnusable(str(e)) from e
        return self._encode_audio(audio)

    def _encode_audio(self, audio: Tensor) -> tuple[Tensor, Tensor]:
        """(1, samples) at 44.1 kHz -> speaker latents (1, frames, 80) and mask, kept where configured."""
        audio = audio.to(device=self.fish_ae.device, dtype=self.fish_ae.dtype)
        latent, mask = get_speaker_latent_and_mask(self.fish_ae, self.pca_state, audio,
                                                   max_speaker_latent_length=self.max_speaker_latent_length)
        if latent.shape[1] == 0:
            raise VoiceUnusable("the voice reference is too short: it needs at least 0.2 s of audio")
        keep_on = self.model.device if self.speaker_on_device else torch.device("cpu")
        return latent.to(keep_on), mask.to(keep_on)

    @torch.inference_mode()
    def generate(self, job: SpeechJob, on_step: Callable[[], None] | None = None) -> Iterator[np.ndarray]:
        """Yield the job's audio as float32 blocks at 44.1 kHz, each as soon as it is decoded.

        The job alone (through the same step runner); GenerationWorker runs the same steps batched.
        `on_step` is called before every diffusion step; raising from it abandons the job.
        """
        yield from run_steps(self.model, self.job_steps(job), on_step, evaluate=lambda call: self.steps([call])[0])

    @torch.inference_mode()
    def decode(self, calls: list[DecodeCall]) -> list[Tensor]:
        """The audio of several streams' next blocks: batched into few decoder calls on a GPU."""
        return decode_streams([c.decoder for c in calls], [c.z for c in calls],
                              batch=self.fish_ae.device.type != "cpu", max_batch_frames=MAX_DECODE_BATCH_FRAMES)

    def prepare_voice(self, speaker: SpeakerReference | None) -> PreparedVoice:
        """Decode, encode and key a voice (cached per voice version; concurrent callers of one voice
        share one preparation). Slow for a new voice: call it before handing the job to the worker,
        so the streams being generated do not wait for it. Raises VoiceUnusable."""
        latent, mask = self.speaker_latents(speaker)
        return PreparedVoice(mask, self.speaker_kv(speaker, latent))

    def job_steps(self, job: SpeechJob) -> JobSteps:
        """The job as a step generator: yields ModelCall (send back the velocity), DecodeCall (send
        back its audio) and finished audio (np.ndarray, send None), in order."""
        voice = job.voice or self.prepare_voice(job.speaker)
        speaker = (voice.mask, voice.kv)
        rng = make_generator(job.seed, self.model.device)
        for index, text in enumerate(job.chunks):
            yield from self._chunk_steps(text, job.shape_of_chunk(index), job, rng, speaker,
                                         ChunkFades(fade_in=index > 0))

    def _chunk_steps(self, text: str, shape: BlockShape, job: SpeechJob, rng: torch.Generator,
                     speaker: tuple[Tensor, KVCache], fades: ChunkFades) -> JobSteps:
        """One text chunk, block by block; the audio ends at the first flat (silent) run of latents."""
        device = self.model.device
        text_ids, text_mask = get_text_input_ids_and_mask([text], max_length=MAX_TEXT_LENGTH, device=device,
                                                          normalize=job.normalize, pad_to_max=False)
        speaker_mask, kv_speaker = speaker
        conditioning = Conditioning(self.model, None, speaker_mask, text_ids, text_mask, job.sampler,
                                    kv_speaker=kv_speaker)
        decoder = self.fish_ae.streaming_decoder(max_frames=CPU_DECODE_FRAMES if self.fish_ae.device.type == "cpu"
                                                 else None)
        latents = torch.zeros((0, 80), device=device)
        sent = 0  # samples of this chunk already yielded
        steps = blockwise_steps(self.model, conditioning, rng, shape.block_sizes, shape.num_steps, job.sampler)
        item = next(steps)
        for index in range(len(shape.block_sizes)):
            block, audio, reply = yield from self._block(steps, item, decoder, job)
            latents = torch.cat([latents, block[0]])
            last = index == len(shape.block_sizes) - 1 or job.early_stop.is_silent_tail(latents)
            end_frame = find_flattening_point(latents)
            if not last and end_frame > latents.shape[0] - FLAT_WINDOW:
                sent += audio.size  # no flat window yet within the generated frames: all of it is speech
                if (out := fades.process(audio)).size:
                    yield out
                item = resume(steps, reply)
                continue
            end = end_frame * AE_DOWNSAMPLE_FACTOR - sent
            if end > 0 and (out := fades.process(audio[:end])).size:
                yield out
            break
        steps.close()
        if (tail := fades.finish()).size:
            yield tail

    def _block(self, steps: Generator, item, decoder: StreamingDecoder, job: SpeechJob):
        """Sample the next block (answering its ModelCalls) and decode it: (block (1, n, 80), its audio,
        the reply that accepts it in `steps`). With VAD reroll, a block whose audio holds too long a
        silence is sampled again from the next seeds (the decoder put back as it was), up to the limit;
        if every attempt fails, the one with the least silence is kept."""
        attempts = []  # (longest silence, block, audio, decoder state after it)
        before = decoder.snapshot() if self.reroll is not None else None
        while True:
            while isinstance(item, ModelCall):
                item = steps.send((yield item))
            block = item
            audio = (yield DecodeCall(decoder, latents_to_dac(self.pca_state, block.to(self.fish_ae.device))
                                      .to(self.fish_ae.dtype)))[0, 0].float().cpu().numpy()
            if self.reroll is None:
                return block, audio, None
            silence = yield SilenceCheck(self.reroll.detector, audio)
            attempts.append((silence, block, audio, decoder.snapshot()))
            if silence <= self.reroll.max_silence or len(attempts) > self.reroll.max_rerolls:
                break
            self.rerolls += 1
            log.info("block of %.1f s has a %.2f s silence: sampling it again with seed %d (reroll %d)",
                     audio.size / 44100, silence, job.seed + len(attempts), len(attempts))
            decoder.restore(before)
            item = steps.send(make_generator(job.seed + len(attempts), self.model.device))
        silence, block, audio, after = min(attempts, key=lambda attempt: attempt[0])
        decoder.restore(after)
        return block, audio, block


@dataclass(frozen=True)
class VadReroll:
    """ECHO_VAD_REROLL_*: sample a block again while its audio holds a silence over `max_silence` s."""

    detector: Callable[[np.ndarray], float]  # 44.1 kHz float32 audio -> its longest silence in seconds
    max_silence: float = 1.0
    max_rerolls: int = 3


@dataclass
class SilenceCheck:
    """The longest silence of a block's audio, in seconds (slow: the worker runs it off its thread)."""

    detector: Callable[[np.ndarray], float]
    audio: np.ndarray

    def run(self) -> float:
        return self.detector(self.audio)


@dataclass
class DecodeCall:
    """Decode one block of DAC latents (B, dac_dim, n) with a stream's decoder (its state advances)."""

    decoder: StreamingDecoder
    z: Tensor

    def run(self) -> Tensor:
        return self.decoder.decode(self.z)


JobSteps = Generator[ModelCall | DecodeCall | SilenceCheck | np.ndarray, Tensor | float | None, None]


class ChunkFades:
    """Short linear fades at a chunk's start (with `fade_in`) and end, so chunks join without clicks.

    The last FADE_SAMPLES of each piece are held back until it is known whether they end the chunk.
    """

    def __init__(self, fade_in: bool):
        self.fade_in = fade_in
        self.held = np.zeros(0, np.float32)

    def process(self, audio: np.ndarray) -> np.ndarray:
        audio = np.concatenate([self.held, audio])
        if self.fade_in:
            n = min(FADE_SAMPLES, audio.size)
            audio[:n] *= np.linspace(0.0, 1.0, n, endpoint=False, dtype=np.float32)
            self.fade_in = n == 0
        keep = max(audio.size - FADE_SAMPLES, 0)
        self.held = audio[keep:]
        return audio[:keep]

    def finish(self) -> np.ndarray:
        held, self.held = self.held, np.zeros(0, np.float32)
        return held * np.linspace(1.0, 0.0, held.size, dtype=np.float32)


# ---------------------------------------------------------------------------------------------
# Running jobs off the event loop


class QueueFull(Exception):
    """More jobs are waiting than the server admits."""


@dataclass
class _Ticket:
    """A submitted job as both sides see it: the worker writes `resume_at`, the JobStream `taken`
    and `taken_at` (plain attributes: each has one writer, and the reader only compares them)."""

    job: SpeechJob
    loop: asyncio.AbstractEventLoop
    output: asyncio.Queue
    request_id: str = "-"
    deadline: float | None = None  # time.monotonic() after which the job is abandoned (moved on by parking)
    cancelled: threading.Event = field(default_factory=threading.Event)
    wake: Callable[[], None] = lambda: None  # wakes the worker (from any thread)
    taken: int = 0  # samples the client has taken from its JobStream
    taken_at: float = 0.0  # time.monotonic() of its last take
    resume_at: int | None = None  # while parked: the job resumes once `taken` reaches this

    def took(self, samples: int) -> None:
        """The client took a block (event loop): wake the worker if that lets its parked job go on."""
        self.taken += samples
        self.taken_at = time.monotonic()
        if (at := self.resume_at) is not None and self.taken >= at:
            self.wake()


class _ThreadCall:
    """A function for the generation thread to run (GenerationWorker.call)."""

    def __init__(self, fn: Callable[[], object]):
        self.fn = fn
        self.finished = threading.Event()
        self.result: object = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = self.fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            self.error = e
        finally:
            self.finished.set()


class GenerationTimeout(Exception):
    """The job ran past its deadline and was stopped."""


class ClientStalled(Exception):
    """The job's client took no audio for the send timeout while the job waited for it: the job was
    stopped and the audio queued for the client dropped."""


_DONE = object()
_WAKE = object()  # put in the worker's queue: a parked job may go on (or was cancelled)


class JobStream:
    """The audio of one submitted job: an async iterator of float32 blocks; `cancel()` stops its work.

    A generation error is raised from the iteration; cancelling stops the job within one step.
    Taking a block is what lets a job that ran ahead of its client go on (GenerationWorker's
    `max_ahead_samples`).
    """

    def __init__(self, ticket: _Ticket):
        self._ticket = ticket
        self._finished = False

    def __aiter__(self) -> JobStream:
        return self

    async def __anext__(self) -> np.ndarray:
        if self._finished:
            raise StopAsyncIteration
        item = await self._ticket.output.get()
        if item is _DONE or isinstance(item, BaseException):
            self._finished = True
            if isinstance(item, BaseException):
                raise item
            raise StopAsyncIteration
        self._ticket.took(item.size)
        return item

    @property
    def taken(self) -> int:
        """Samples taken from this stream so far."""
        return self._ticket.taken

    def cancel(self) -> None:
        self._ticket.cancelled.set()
        if self._ticket.resume_at is not None:  # parked: the worker may be asleep
            self._ticket.wake()


class Reservation:
    """A queue slot held for a job that is not built yet (GenerationWorker.reserve).

    `submit` hands the job to the worker in this slot, with no second check; `release` gives the
    slot back if it was not used (idempotent). As a context manager it is released on exit unless
    submitted.
    """

    def __init__(self, worker: GenerationWorker):
        self._worker = worker
        self._lock = threading.Lock()
        self._held = True  # until submitted or released

    def submit(self, job: SpeechJob, request_id: str = "-", timeout: float | None = None) -> JobStream:
        """Queue the job in this slot (call from the event loop). A job still running `timeout`
        seconds after submission (time parked not counted) is stopped (GenerationTimeout)."""
        loop = asyncio.get_running_loop()  # before the slot is given up: off a loop, nothing changes
        with self._lock:
            if not self._held:
                raise RuntimeError("this reservation was already submitted or released")
            self._held = False
        deadline = time.monotonic() + timeout if timeout else None
        return self._worker._enqueue(_Ticket(job, loop, asyncio.Queue(), request_id, deadline))

    def release(self) -> None:
        """Give the slot back unless a job took it (any thread; again: nothing)."""
        with self._lock:
            held, self._held = self._held, False
        if held:
            self._worker._release()

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self) -> None:  # a reservation dropped unused must not take its slot with it
        self.release()


class GenerationWorker:
    """Runs jobs on one worker thread, advancing all active jobs together.

    Every iteration takes the next diffusion step of each active job and evaluates them together
    (the engine's step runner: batched_steps.py), then decodes the blocks that finished. At most
    `max_active` jobs run at once; up to `max_waiting` more wait for a slot or are parked; beyond
    that, submit() and reserve() raise QueueFull. A cancelled job is dropped before its next step.

    Back-pressure: a job whose audio is more than `max_ahead_samples` ahead of what its client has
    taken is parked before its next model step: out of the batch, its slot free for another job,
    its deadline stopped, until the client catches up. A job parked while its client takes nothing
    for `send_timeout` seconds is stopped (ClientStalled) and the audio queued for it dropped, so a
    client that never reads holds at most about `max_ahead_samples` of audio, and only that long.
    """

    def __init__(self, engine: SpeechEngine, max_waiting: int = 16, max_active: int = 8,
                 debug_sink: Callable[[np.ndarray], None] | None = None, max_ahead_samples: int | None = None,
                 send_timeout: float | None = None):
        self.engine = engine
        self.max_waiting = max_waiting
        self.max_active = max_active
        self.max_ahead_samples = max_ahead_samples  # None: a job never waits for its client
        self.send_timeout = send_timeout  # None: a parked job waits for its client as long as it takes
        self._jobs: queue.Queue[_Ticket | _ThreadCall | object | None] = queue.Queue()
        self._pending = 0
        self._active = 0
        self._parked = 0
        self._lock = threading.Lock()
        self._debug_sink = debug_sink
        self._checks: ThreadPoolExecutor | None = None  # silence checks (VAD reroll), off this thread
        self._thread = threading.Thread(target=self._run, name="echo-generation", daemon=True)
        self._thread.start()

    @property
    def pending(self) -> int:
        """Jobs (and reservations) waiting, running or parked."""
        return self._pending

    @property
    def active(self) -> int:
        """Jobs being generated."""
        return self._active

    @property
    def parked(self) -> int:
        """Jobs waiting for their client to take the audio they generated ahead of it."""
        return self._parked

    @property
    def waiting(self) -> int:
        """Jobs (and reservations) waiting for a slot."""
        return max(self._pending - self._active - self._parked, 0)

    @property
    def alive(self) -> bool:
        """Whether the generation thread still runs (it ends only when closed, or on a bug)."""
        return self._thread.is_alive()

    def submit(self, job: SpeechJob, request_id: str = "-", timeout: float | None = None) -> JobStream:
        """Queue a job (call from the event loop); raises QueueFull when too many are waiting.

        A job still running `timeout` seconds after submission (time parked not counted) is stopped
        (GenerationTimeout).
        """
        with self.reserve() as reservation:
            return reservation.submit(job, request_id, timeout)

    def reserve(self) -> Reservation:
        """Take a queue slot now for a job submitted later (any thread); raises QueueFull when too
        many are waiting. A request reserves before its slow preparation, so a full server refuses
        it at once."""
        with self._lock:
            if self._pending >= self.max_waiting + self.max_active:
                raise QueueFull()
            self._pending += 1
        return Reservation(self)

    def _enqueue(self, ticket: _Ticket) -> JobStream:
        """Hand a job whose slot is already counted in `pending` to the worker thread."""
        ticket.wake = lambda: self._jobs.put(_WAKE)
        self._jobs.put(ticket)
        return JobStream(ticket)

    def call(self, fn: Callable[[], object]) -> object:
        """Run `fn` on the generation thread while no job runs, wait for it and return its result.

        Warm-up goes through here: compiled CUDA graphs are recorded per thread, so they must be
        recorded on the thread that replays them.
        """
        done = _ThreadCall(fn)
        self._jobs.put(done)
        done.finished.wait()
        if done.error is not None:
            raise done.error
        return done.result

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=30)
        if self._checks is not None:
            self._checks.shutdown(wait=False, cancel_futures=True)

    # ---- the worker thread ------------------------------------------------------------------

    def _run(self) -> None:
        active: list[_Running] = []
        parked: list[_Running] = []  # ahead of their client: out of the batch, in the order they left it
        with torch.inference_mode():
            while self._admit(active, parked):
                self._drop_cancelled(active, parked)
                self._park(active, parked)
                self._count(active, parked)
                self._step(active)
                self._count(active, parked)
        self._active = self._parked = 0

    def _count(self, active: list[_Running], parked: list[_Running]) -> None:
        self._active, self._parked = len(active), len(parked)

    def _admit(self, active: list[_Running], parked: list[_Running]) -> bool:
        """Resume parked jobs whose client caught up, then take waiting jobs into free slots. While
        nothing runs it blocks: until a job, a wake-up or the next parked job's send timeout. False
        once closed."""
        self._resume(active, parked)
        while len(active) < self.max_active:
            try:
                ticket = self._jobs.get(block=not active, timeout=self._until_stalled(parked))
            except queue.Empty:
                break
            if ticket is _WAKE:
                self._resume(active, parked)
                if not active:
                    break  # (or a parked job was cancelled) back to the checks, then to sleep again
                continue
            if isinstance(ticket, _ThreadCall):
                ticket.run()
                continue
            if ticket is not None and ticket.cancelled.is_set():  # its client left while it waited
                _notify(ticket, _DONE)
                self._release()
                continue
            if ticket is None:
                for running in active + parked:
                    running.ticket.cancelled.set()
                self._drop_cancelled(active, parked)
                return False
            running = _Running(ticket, self.engine.job_steps(ticket.job), self._debug_sink is not None)
            if self._advance(running, None):
                active.append(running)
            else:
                self._release()
        return True

    def _park(self, active: list[_Running], parked: list[_Running]) -> None:
        """Before their next model step, jobs more than `max_ahead_samples` ahead of what their client
        has taken leave the batch (their slot free for another job) until it catches up."""
        if self.max_ahead_samples is None:
            return
        now = time.monotonic()
        for running in [r for r in active if isinstance(r.pending, ModelCall)]:
            ticket = running.ticket
            ticket.resume_at = running.samples - self.max_ahead_samples
            if ticket.taken >= ticket.resume_at:  # read after resume_at is set: a later take wakes us
                ticket.resume_at = None
                continue
            running.parked_at = now
            active.remove(running)
            parked.append(running)
            log.debug("generation parked %.2f s of audio ahead of its client",
                      (running.samples - ticket.taken) / SAMPLE_RATE, extra={"request_id": ticket.request_id})

    def _resume(self, active: list[_Running], parked: list[_Running]) -> None:
        """Parked jobs whose client has caught up go back into free slots, before new jobs; the time
        they were parked moves their deadline on (a slow listener is no slow generation)."""
        now = time.monotonic()
        for running in [r for r in parked if r.ticket.taken >= r.ticket.resume_at][:self.max_active - len(active)]:
            ticket = running.ticket
            ticket.resume_at = None
            if ticket.deadline is not None:
                ticket.deadline += now - running.parked_at
            parked.remove(running)
            active.append(running)

    def _until_stalled(self, parked: list[_Running]) -> float | None:
        """Seconds until the first parked job's client has taken nothing for the send timeout (None: never)."""
        if self.send_timeout is None or not parked:
            return None
        return max(min(r.idle_since() for r in parked) + self.send_timeout - time.monotonic(), 0.0)

    def _drop_cancelled(self, active: list[_Running], parked: list[_Running]) -> None:
        """Stop jobs whose client left or whose time is up, before their next step, and parked jobs
        whose client left or took nothing for the send timeout (the audio queued for it dropped)."""
        now = time.monotonic()
        for running in list(active):
            ticket = running.ticket
            if ticket.cancelled.is_set():
                log.info("generation cancelled after %.2f s of audio", running.samples / 44100,
                         extra={"request_id": ticket.request_id})
                self._stop(active, running, _DONE)
            elif ticket.deadline is not None and now > ticket.deadline:
                log.warning("generation stopped: over its time limit after %.2f s of audio",
                            running.samples / 44100, extra={"request_id": ticket.request_id})
                self._stop(active, running, GenerationTimeout("generation took longer than the server's time limit"))
        for running in list(parked):
            ticket = running.ticket
            if ticket.cancelled.is_set():
                log.info("generation cancelled after %.2f s of audio (parked)", running.samples / 44100,
                         extra={"request_id": ticket.request_id})
                self._stop(parked, running, _DONE)
            elif self.send_timeout is not None and now - running.idle_since() > self.send_timeout:
                log.warning("generation stopped after %.2f s of audio: its client took none for %g s",
                            running.samples / 44100, self.send_timeout, extra={"request_id": ticket.request_id})
                _drop_queued(ticket)
                self._stop(parked, running, ClientStalled(f"the client took no audio for {self.send_timeout:g} s"))

    def _step(self, active: list[_Running]) -> None:
        """One batched diffusion step for every job waiting on the model, then all pending decodes
        (streams at the same point decoded together where that pays)."""
        self._run_together(active, ModelCall, self.engine.steps)
        self._run_together(active, DecodeCall, self.engine.decode)
        self._check_silences(active)

    def _check_silences(self, active: list[_Running]) -> None:
        """Silence checks (VAD reroll) run on a thread of their own: a job waits for its result while
        the others go on; with nothing else to do, the worker waits a moment for one."""
        waiting = [r for r in active if isinstance(r.pending, SilenceCheck)]
        if not waiting:
            return
        if self._checks is None:
            self._checks = ThreadPoolExecutor(max_workers=1, thread_name_prefix="echo-vad")
        for running in waiting:
            if running.check is None:
                running.check = self._checks.submit(running.pending.run)
        if not any(isinstance(r.pending, (ModelCall, DecodeCall)) for r in active):
            wait([r.check for r in waiting], timeout=0.05, return_when=FIRST_COMPLETED)
        for running in waiting:
            if running.check.done():
                check, running.check = running.check, None
                try:
                    silence = check.result()
                except Exception as e:  # noqa: BLE001 - the request fails; the others carry on
                    log.exception("silence check failed", extra={"request_id": running.ticket.request_id})
                    self._stop(active, running, e)
                    continue
                self._continue(active, running, silence)

    def _run_together(self, active: list[_Running], kind: type, compute: Callable[[list], list]) -> None:
        """Compute the pending calls of one kind in one go and hand each job its reply; if the
        shared computation fails, only the jobs that were part of it fail."""
        members = [r for r in active if isinstance(r.pending, kind)]
        if not members:
            return
        try:
            replies = compute([r.pending for r in members])
        except Exception as e:  # noqa: BLE001
            log.exception("%s for %d jobs failed", kind.__name__, len(members))
            for running in members:
                self._stop(active, running, e)
            return
        for running, reply in zip(members, replies):
            self._continue(active, running, reply)

    def _continue(self, active: list[_Running], running: _Running, reply) -> None:
        if not self._advance(running, reply):
            active.remove(running)
            self._release()

    def _advance(self, running: _Running, reply) -> bool:
        """Feed the reply in and run the job until it needs the model or a decode. False when it ended."""
        try:
            item = running.steps.send(reply) if running.started else next(running.steps)
            running.started = True
            while isinstance(item, np.ndarray):  # finished audio goes straight to the client
                running.deliver(item)
                item = running.steps.send(None)
        except StopIteration:
            running.finish(self._debug_sink)
            return False
        except Exception as e:  # noqa: BLE001 - the request fails; the others carry on
            log.exception("generation failed", extra={"request_id": running.ticket.request_id})
            running.send(e)
            return False
        running.pending = item
        return True

    def _stop(self, jobs: list[_Running], running: _Running, last: Exception | object) -> None:
        """End a job before its next step: its step generator closed (its tensors freed), `last`
        (an error or _DONE) to its client, its slot free."""
        running.steps.close()
        running.send(last)
        jobs.remove(running)
        self._release()

    def _release(self) -> None:
        with self._lock:
            self._pending -= 1


def _notify(ticket: _Ticket, item) -> None:
    """Hand a block, the end (_DONE) or an error to the ticket's JobStream on its event loop."""
    try:
        ticket.loop.call_soon_threadsafe(ticket.output.put_nowait, item)
    except RuntimeError:  # the event loop is gone (shutdown): nobody is listening any more
        ticket.cancelled.set()


def _drop_queued(ticket: _Ticket) -> None:
    """Let go of the audio queued for the ticket's JobStream and not taken (on its event loop)."""

    def drop() -> None:
        while not ticket.output.empty():
            ticket.output.get_nowait()

    try:
        ticket.loop.call_soon_threadsafe(drop)
    except RuntimeError:  # the event loop is gone: so is the queue's last user
        pass


class _Running:
    """A job on the worker thread: its step generator and what it is waiting for."""

    def __init__(self, ticket: _Ticket, steps: JobSteps, keep_audio: bool):
        self.ticket = ticket
        self.steps = steps
        self.started = False
        self.pending: ModelCall | DecodeCall | SilenceCheck | None = None
        self.check: Future | None = None  # the pending SilenceCheck's result, once submitted
        self.samples = 0  # delivered to the client
        self.started_at = time.perf_counter()
        self.parked_at = 0.0  # time.monotonic() when it last left the batch for its client
        self.kept: list[np.ndarray] | None = [] if keep_audio else None

    def idle_since(self) -> float:
        """Since when a parked job's client has taken nothing (time.monotonic())."""
        return max(self.parked_at, self.ticket.taken_at)

    def send(self, item) -> None:
        _notify(self.ticket, item)

    def deliver(self, audio: np.ndarray) -> None:
        self.samples += audio.size
        if self.kept is not None:
            self.kept.append(audio)
        self.send(audio)

    def finish(self, debug_sink: Callable[[np.ndarray], None] | None) -> None:
        log.debug("generated %.2f s of audio in %.2f s", self.samples / 44100, time.perf_counter() - self.started_at,
                  extra={"request_id": self.ticket.request_id})
        if debug_sink is not None and self.kept:
            debug_sink(np.concatenate(self.kept))  # before the response ends, so it is there when it has
        self.send(_DONE)

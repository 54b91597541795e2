"""The generation engine: turns a speech job into 44.1 kHz audio blocks, and runs jobs off the event loop.

`SpeechEngine` owns the loaded models and the speaker cache; `generate` is a plain synchronous
generator (text chunk -> blockwise sampling -> streaming decode -> float32 samples).
`GenerationWorker` runs jobs on one worker thread, so GPU work never blocks the event loop, and
hands their blocks back to asyncio through a queue.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from autoencoder import DAC
from inference import (AE_DOWNSAMPLE_FACTOR, MAX_TEXT_LENGTH, PCAState, SamplerSettings, find_flattening_point,
                       get_speaker_latent_and_mask, get_text_input_ids_and_mask, latents_to_dac, make_generator,
                       no_speaker)
from inference_blockwise import iter_blockwise
from model import EchoDiT

log = logging.getLogger(__name__)

FLAT_WINDOW = 20  # frames; find_flattening_point's window
FADE_SAMPLES = 220  # 5 ms: the fade applied where one text chunk's audio meets the next


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

    def shape_of_chunk(self, index: int) -> BlockShape:
        return self.first_shape if index == 0 else self.later_shape


class GenerationCancelled(Exception):
    """Raised inside a generation whose client has gone away."""


def random_seed() -> int:
    return secrets.randbits(63)


class SpeechEngine:
    """Owns EchoDiT, the Fish S1-DAC, the PCA state and the per-voice speaker latents."""

    def __init__(self, model: EchoDiT, fish_ae: DAC, pca_state: PCAState, speaker_cache,
                 max_speaker_latent_length: int = 6400, speaker_on_device: bool = False):
        self.model = model
        self.fish_ae = fish_ae
        self.pca_state = pca_state
        self.speaker_cache = speaker_cache
        self.max_speaker_latent_length = max_speaker_latent_length
        self.speaker_on_device = speaker_on_device

    def speaker_latents(self, speaker: SpeakerReference | None) -> tuple[Tensor, Tensor]:
        """(1, frames, 80) latents and (1, frames) mask on the model device; cached per voice."""
        device, dtype = self.model.device, self.model.dtype
        if speaker is None:
            return no_speaker(4, device, dtype)
        latent, mask = self.speaker_cache.get_or_create(speaker.cache_key, lambda: self._encode_speaker(speaker),
                                                        name=speaker.name)
        return latent.to(device=device, dtype=dtype), mask.to(device)

    @torch.inference_mode()
    def _encode_speaker(self, speaker: SpeakerReference) -> tuple[Tensor, Tensor]:
        audio = speaker.load_audio().to(device=self.fish_ae.device, dtype=self.fish_ae.dtype)
        latent, mask = get_speaker_latent_and_mask(self.fish_ae, self.pca_state, audio,
                                                   max_speaker_latent_length=self.max_speaker_latent_length)
        if latent.shape[1] == 0:
            raise ValueError("the voice reference is shorter than one latent patch (~0.2 s)")
        keep_on = self.model.device if self.speaker_on_device else torch.device("cpu")
        return latent.to(keep_on), mask.to(keep_on)

    @torch.inference_mode()
    def generate(self, job: SpeechJob, on_step: Callable[[], None] | None = None) -> Iterator[np.ndarray]:
        """Yield the job's audio as float32 blocks at 44.1 kHz, each as soon as it is decoded."""
        speaker_latent, speaker_mask = self.speaker_latents(job.speaker)
        rng = make_generator(job.seed, self.model.device)
        for index, text in enumerate(job.chunks):
            chunk = self._generate_chunk(text, job.shape_of_chunk(index), job, rng, speaker_latent, speaker_mask,
                                         on_step)
            yield from _with_fades(chunk, fade_in=index > 0)

    def _generate_chunk(self, text: str, shape: BlockShape, job: SpeechJob, rng: torch.Generator,
                        speaker_latent: Tensor, speaker_mask: Tensor,
                        on_step: Callable[[], None] | None) -> Iterator[np.ndarray]:
        """One text chunk, block by block; the audio ends at the first flat (silent) run of latents."""
        device = self.model.device
        text_ids, text_mask = get_text_input_ids_and_mask([text], max_length=MAX_TEXT_LENGTH, device=device,
                                                          normalize=job.normalize, pad_to_max=False)
        decoder = self.fish_ae.streaming_decoder()
        latents = torch.zeros((0, 80), device=device)
        sent = 0  # samples of this chunk already yielded
        blocks = iter_blockwise(self.model, speaker_latent, speaker_mask, text_ids, text_mask, job.seed,
                                shape.block_sizes, list(shape.num_steps), job.sampler, rng=rng, on_step=on_step)
        for index, block in enumerate(blocks):
            latents = torch.cat([latents, block[0]])
            audio = self._decode(decoder, block)
            last = index == len(shape.block_sizes) - 1 or job.early_stop.is_silent_tail(latents)
            end_frame = find_flattening_point(latents)
            if not last and end_frame > latents.shape[0] - FLAT_WINDOW:
                sent += audio.size  # no flat window yet within the generated frames: all of it is speech
                yield audio
                continue
            end = end_frame * AE_DOWNSAMPLE_FACTOR - sent
            if end > 0:
                yield audio[:end]
            return

    def _decode(self, decoder, block: Tensor) -> np.ndarray:
        z = latents_to_dac(self.pca_state, block.to(self.fish_ae.device)).to(self.fish_ae.dtype)
        return decoder.decode(z)[0, 0].float().cpu().numpy()


def _with_fades(blocks: Iterator[np.ndarray], fade_in: bool) -> Iterator[np.ndarray]:
    """Short linear fades at a chunk's start (when `fade_in`) and end, so chunks join without clicks.

    The last FADE_SAMPLES of each block are held back until it is known whether they end the chunk.
    """
    held = np.zeros(0, np.float32)
    first = True
    for block in blocks:
        audio = np.concatenate([held, block])
        if first and fade_in:
            n = min(FADE_SAMPLES, audio.size)
            audio[:n] *= np.linspace(0.0, 1.0, n, endpoint=False, dtype=np.float32)
        first = False
        audio, held = audio[:-FADE_SAMPLES] if audio.size > FADE_SAMPLES else audio[:0], audio[-FADE_SAMPLES:]
        if audio.size:
            yield audio
    if held.size:
        yield held * np.linspace(1.0, 0.0, held.size, dtype=np.float32)


# ---------------------------------------------------------------------------------------------
# Running jobs off the event loop


class QueueFull(Exception):
    """More jobs are waiting than the server admits."""


@dataclass
class _Ticket:
    job: SpeechJob
    loop: asyncio.AbstractEventLoop
    output: asyncio.Queue
    cancelled: threading.Event = field(default_factory=threading.Event)


_DONE = object()


class JobStream:
    """The audio of one submitted job: an async iterator of float32 blocks; `cancel()` stops its work.

    A generation error is raised from the iteration; cancelling stops the job within one step.
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
        return item

    def cancel(self) -> None:
        self._ticket.cancelled.set()


class GenerationWorker:
    """Runs jobs one at a time on a dedicated thread; at most `max_waiting` jobs wait for it."""

    def __init__(self, engine: SpeechEngine, max_waiting: int = 16, debug_sink: Callable[[np.ndarray], None] | None = None):
        self.engine = engine
        self.max_waiting = max_waiting
        self._jobs: queue.Queue[_Ticket | None] = queue.Queue()
        self._pending = 0
        self._lock = threading.Lock()
        self._debug_sink = debug_sink
        self._thread = threading.Thread(target=self._run, name="echo-generation", daemon=True)
        self._thread.start()

    @property
    def pending(self) -> int:
        """Jobs waiting or running."""
        return self._pending

    def submit(self, job: SpeechJob) -> JobStream:
        """Queue a job (call from the event loop); raises QueueFull when too many are waiting."""
        with self._lock:
            if self._pending >= self.max_waiting + 1:
                raise QueueFull()
            self._pending += 1
        ticket = _Ticket(job, asyncio.get_running_loop(), asyncio.Queue())
        self._jobs.put(ticket)
        return JobStream(ticket)

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while (ticket := self._jobs.get()) is not None:
            try:
                self._run_one(ticket)
            finally:
                with self._lock:
                    self._pending -= 1

    def _run_one(self, ticket: _Ticket) -> None:
        def send(item) -> None:
            try:
                ticket.loop.call_soon_threadsafe(ticket.output.put_nowait, item)
            except RuntimeError:  # the event loop is gone (shutdown): nobody is listening any more
                ticket.cancelled.set()

        def check_cancelled() -> None:
            if ticket.cancelled.is_set():
                raise GenerationCancelled()

        started, samples, pieces = time.perf_counter(), 0, []
        try:
            check_cancelled()
            for block in self.engine.generate(ticket.job, on_step=check_cancelled):
                samples += block.size
                if self._debug_sink is not None:
                    pieces.append(block)
                send(block)
            send(_DONE)
        except GenerationCancelled:
            log.info("generation cancelled after %.2f s of audio", samples / 44100)
            send(_DONE)
        except Exception as e:  # the request fails; the worker carries on with the next job
            log.exception("generation failed")
            send(e)
        else:
            elapsed = time.perf_counter() - started
            log.debug("generated %.2f s of audio in %.2f s", samples / 44100, elapsed)
            if self._debug_sink is not None and pieces:
                self._debug_sink(np.concatenate(pieces))

"""The generation engine: turns speech jobs into 44.1 kHz audio blocks, many jobs at once.

`SpeechEngine` holds the loaded models and the step runner, and fills the voice catalog's speaker
caches (voice_catalog.VoiceCatalog empties them). A job is a step
generator (`job_steps`: text chunk -> blockwise sampling -> streaming decode -> float32 samples)
that yields what it needs computed: a TextCall (a text chunk's keys/values), a ModelCall (one
diffusion step), a PrefixCall (a finished block into the latent prefix), a DecodeCall (one block
through its stream's decoder) or a SilenceCheck (VAD reroll), and finished audio. `generate` runs
one job alone; worker.py's `GenerationWorker` runs many on one thread, scheduled by deadline.
"""

from __future__ import annotations

import logging
import math
import secrets
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from torch import Tensor

from autoencoder import DAC, StreamingDecoder, StreamState, decode_streams
from batched_steps import CompiledPart, ExactSteps, StepRunner
from inference import (AE_DOWNSAMPLE_FACTOR, MAX_SEQUENCE_LENGTH, MAX_TEXT_LENGTH, SAMPLE_RATE, Conditioning,
                       ModelCall, PCAState, SamplerSettings, flattening_frame, get_speaker_latent_and_mask,
                       get_text_input_ids_and_mask, latents_to_dac, make_generator, no_speaker, normalize_text, resume,
                       run_steps)
from inference_blockwise import PrefixCall, blockwise_steps
from model import EchoDiT, KVCache, LatentPrefix, extend_prefixes, grouped
from text_chunking import ChunkMode

log = logging.getLogger(__name__)

FLAT_WINDOW = 20  # frames; flattening_frame's window
FADE_SAMPLES = 220  # 5 ms: the fade applied where one text chunk's audio meets the next
CPU_DECODE_FRAMES = 64  # on CPUs the decoder is fastest fed pieces of this size (see StreamingDecoder)
MAX_DECODE_BATCH_FRAMES = 8192  # latent frames of one batched decoder call (~6 GiB of its largest activation)
# continue mode: at most the last 320 frames of chunk k-1 are continued, so chunk k keeps half the window
CONTINUATION_FRAMES = MAX_SEQUENCE_LENGTH // 2
# a text chunk's tokens are padded to one of these lengths before the text encoder (masked), so the
# chunks that start together run as one encoder call per length; ascending, the last MAX_TEXT_LENGTH
TEXT_BUCKETS = (64, 128, 256, 512, MAX_TEXT_LENGTH)


@dataclass(frozen=True)
class BlockShape:
    """How one text chunk is generated: frames per block and diffusion steps per block."""

    block_sizes: tuple[int, ...]
    num_steps: tuple[int, ...]

    def __post_init__(self):
        if len(self.block_sizes) != len(self.num_steps):
            raise ValueError("block_sizes and num_steps must have the same length")

    def cut_to(self, frames: int) -> BlockShape:
        """The same blocks, up to `frames` frames in all (the last one kept shortened to fit)."""
        sizes, steps = [], []
        for size, count in zip(self.block_sizes, self.num_steps):
            room = frames - sum(sizes)
            if room <= 0:
                break
            sizes.append(min(size, room))
            steps.append(count)
        return BlockShape(tuple(sizes), tuple(steps))


# ECHO_ADAPTIVE_STEPS: (a block's floor, its requested steps) -> the steps it takes, asked as it starts
StepChoice = Callable[[int, int], int]


@dataclass(frozen=True)
class StepFloor:
    """ECHO_ADAPTIVE_STEPS_FLOOR: the fewest diffusion steps a block may be given under load, from a
    preset. A chunk laid out in the preset's blocks gets at least the preset's steps per block; any
    other layout (the non-streamed 640-frame block, a request's own block_sizes, a chunk cut short)
    at least `share` of each block's requested steps, rounded up, where `share` is the preset's
    diffusion work (frames x steps over its blocks) relative to the reference (full-quality) preset's.
    Never more than the block asked for."""

    block_sizes: tuple[int, ...]
    num_steps: tuple[int, ...]
    share: float  # 0 < share <= 1

    @classmethod
    def of(cls, preset: tuple[list[int], list[int]], reference: tuple[list[int], list[int]]) -> StepFloor:
        """The floor of a preset (block sizes, steps), its share measured against `reference`'s work."""
        work = [sum(size * steps for size, steps in zip(*p)) for p in (preset, reference)]
        return cls(tuple(preset[0]), tuple(preset[1]), min(work[0] / work[1], 1.0))

    def floors(self, shape: BlockShape) -> tuple[int, ...]:
        """The floor of each block of a chunk generated in `shape`."""
        if shape.block_sizes == self.block_sizes:
            return tuple(min(n, floor) for n, floor in zip(shape.num_steps, self.num_steps))
        return tuple(min(n, math.ceil(n * self.share)) for n in shape.num_steps)


@dataclass(frozen=True)
class EarlyStop:
    """Stop a chunk once its last `tail_frames` latent frames are (almost all) near zero, i.e. silence."""

    enabled: bool = True
    zero_eps: float = 2e-2
    tail_frames: int = 16
    min_fraction: float = 0.95

    def is_silent_tail(self, latents: Tensor) -> bool:
        """latents (frames, 80): at least `min_fraction` of the last `tail_frames` frames have |x| < eps."""
        return bool(self.silent_tail(latents))

    def silent_tail(self, latents: Tensor) -> Tensor:
        """is_silent_tail as a 0-d bool tensor on the latents' device: no host sync."""
        if not self.enabled or latents.shape[0] < self.tail_frames:
            return torch.zeros((), dtype=torch.bool, device=latents.device)
        quiet = latents[-self.tail_frames:].abs().amax(dim=-1) < self.zero_eps
        return quiet.float().mean().double() >= self.min_fraction  # as .item() >= min_fraction compared it


@dataclass(frozen=True)
class SpeakerReference:
    """A voice to clone: a cache key that changes with the audio, and how to load that audio (1, samples)."""

    cache_key: str
    load_audio: Callable[[], Tensor]
    name: str | None = None  # a newer version of the same named voice evicts the older cache entry
    load_latents: Callable[[], tuple[Tensor, Tensor] | None] | None = None  # latents saved earlier, if any
    save_latents: Callable[[Tensor, Tensor], None] | None = None  # keeps latents encoded because none were saved


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
    chunk_mode: ChunkMode = "independent"  # continue: chunk k continues chunk k-1's latents, one decoder for all
    voice_name: str = ""  # the voice it speaks with, as the client is told (X-Echo-Voice)

    def shape_of_chunk(self, index: int) -> BlockShape:
        return self.first_shape if index == 0 else self.later_shape


class VoiceUnusable(ValueError):
    """The voice's audio cannot be used as a reference (unreadable, undecodable or too short)."""


class GenerationCancelled(Exception):
    """For `generate(on_step=...)` callers: raise it from `on_step` to abandon a generation."""


def random_seed() -> int:
    return secrets.randbits(63)


class SpeechEngine:
    """EchoDiT, the Fish S1-DAC, the PCA state and the step runner that evaluates diffusion steps
    (batched_steps.py); it fills the per-voice speaker latent and key/value caches it is given."""

    def __init__(self, model: EchoDiT, fish_ae: DAC, pca_state: PCAState, speaker_cache,
                 max_speaker_latent_length: int = 6400, speaker_on_device: bool = False,
                 speaker_kv_cache=None, steps: StepRunner | None = None, reroll: VadReroll | None = None,
                 step_floor: StepFloor | None = None, text_encoder: CompiledTextEncoder | None = None,
                 stream_decoder: CompiledStreamDecoder | None = None,
                 prefix_encoder: CompiledPrefixEncoder | None = None):
        self.model = model
        self.text_encoder = text_encoder  # None: the text encoder runs eager
        self.stream_decoder = stream_decoder  # None: the streaming decoder runs eager
        self.prefix_encoder = prefix_encoder  # None: finished blocks go into their latent prefixes eager
        self.fish_ae = fish_ae
        self.pca_state = pca_state
        self.speaker_cache = speaker_cache
        self.speaker_kv_cache = speaker_kv_cache  # None: computed per request
        self.max_speaker_latent_length = max_speaker_latent_length
        self.speaker_on_device = speaker_on_device
        self.steps = steps or ExactSteps(model)
        self.reroll = reroll
        self.step_floor = step_floor  # None: a block's floor is its requested steps (nothing to adapt)
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
        latent, mask = self._encode_audio(audio)
        if speaker.save_latents is not None:
            speaker.save_latents(latent, mask)
        return latent, mask

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

    def release_idle(self) -> None:
        """Nothing is being generated: the step runner lets go of what it kept for the next step
        (ExactSteps: laid-out keys/values, which hold finished generations' conditioning). A runner
        without `forget` (a test's or benchmark's wrapper) keeps nothing."""
        forget = getattr(self.steps, "forget", None)
        if forget is not None:
            forget()

    def prepare_voice(self, speaker: SpeakerReference | None) -> PreparedVoice:
        """Decode, encode and key a voice (cached per voice version; concurrent callers of one voice
        share one preparation). Slow for a new voice: call it before handing the job to the worker,
        so the streams being generated do not wait for it. Raises VoiceUnusable."""
        latent, mask = self.speaker_latents(speaker)
        return PreparedVoice(mask, self.speaker_kv(speaker, latent))

    def job_steps(self, job: SpeechJob, choose: StepChoice | None = None) -> JobSteps:
        """The job as a step generator: yields TextCall (send back the text's keys/values), ModelCall
        (send back the velocity), PrefixCall (send back None), DecodeCall (send back its audio),
        SilenceCheck (send back the longest silence) and finished audio (np.ndarray, send None), in
        order.

        `choose(floor, requested)` (ECHO_ADAPTIVE_STEPS) is asked as each block starts for the steps
        it takes, kept between the block's floor (`step_floor`) and its requested steps; None: every
        block takes its requested steps."""
        voice = job.voice or self.prepare_voice(job.speaker)
        speaker = (voice.mask, voice.kv)
        rng = make_generator(job.seed, self.model.device)
        if job.chunk_mode == "continue":
            yield from self._continued_steps(job, rng, speaker, choose)
            return
        for index, text in enumerate(job.chunks):
            yield from self._chunk_steps(text, job.shape_of_chunk(index), job, rng, speaker,
                                         ChunkFades(fade_in=index > 0), choose)

    def _adapting(self, shape: BlockShape, choose: StepChoice | None) -> dict:
        """blockwise_steps' step_policy for a chunk in `shape`, as keyword arguments: `choose(floor,
        requested)` kept within [floor, requested]; none without `choose` (the sampler's call as before)."""
        if choose is None:
            return {}
        floors = self.step_floor.floors(shape) if self.step_floor is not None else shape.num_steps
        return {"step_policy": lambda index, requested: min(max(choose(floors[index], requested), floors[index]),
                                                            requested)}

    def _chunk_steps(self, text: str, shape: BlockShape, job: SpeechJob, rng: torch.Generator,
                     speaker: tuple[Tensor, KVCache], fades: ChunkFades, choose: StepChoice | None = None) -> JobSteps:
        """One text chunk, block by block; the audio ends at the first flat (silent) run of latents."""
        conditioning = yield from self._conditioning(text, job, speaker)
        decoder = self._decoder()
        latents = torch.zeros((0, 80), device=self.model.device)
        sent = 0  # samples of this chunk already yielded
        steps = blockwise_steps(self.model, conditioning, rng, shape.block_sizes, shape.num_steps, job.sampler,
                                **self._adapting(shape, choose))
        item = next(steps)
        for index in range(len(shape.block_sizes)):
            last = index == len(shape.block_sizes) - 1
            ends = partial(_chunk_ends, latents, early_stop=job.early_stop)
            heard = partial(_speech_samples, latents.shape[0], last=last)
            block, audio, reply, (end_frame, silent) = yield from self._block(steps, item, decoder, job, ends, heard)
            _, ended = speech_frames(latents.shape[0], block.shape[1], int(end_frame), bool(silent), last)
            latents = torch.cat([latents, block[0]])
            if not ended:  # no flat window yet within the generated frames: all of it is speech
                sent += audio.size
                if (out := fades.process(audio)).size:
                    yield out
                item = resume(steps, reply)
                continue
            end = int(end_frame) * AE_DOWNSAMPLE_FACTOR - sent
            if end > 0 and (out := fades.process(audio[:end])).size:
                yield out
            break
        steps.close()
        if (tail := fades.finish()).size:
            yield tail

    def _continued_steps(self, job: SpeechJob, rng: torch.Generator, speaker: tuple[Tensor, KVCache],
                         choose: StepChoice | None = None) -> JobSteps:
        """`continue` mode: chunk k is sampled as the continuation of chunk k-1's latents (up to its end
        of speech, at most CONTINUATION_FRAMES), prompted with chunk k-1's text followed by chunk k's;
        one decoder carries on across chunks, so the answer is one latent sequence decoded once."""
        decoder = self._decoder()
        previous, prefix = None, None  # chunk k-1's text and its latents (frames, 80)
        for index, text in enumerate(job.chunks):
            # chunk k-1 as it was read alone (its speaker tag, when normalisation gives it one), then chunk k:
            # a tag chunk k carries made normalisation leave the joined prompt's front untagged
            prompt = text if previous is None else f"{normalize_text(previous) if job.normalize else previous} {text}"
            shape = job.shape_of_chunk(index).cut_to(MAX_SEQUENCE_LENGTH - (0 if prefix is None else len(prefix)))
            latents = yield from self._continued_chunk(prompt, shape, job, rng, speaker, decoder, prefix, choose,
                                                       more=index < len(job.chunks) - 1)
            previous, prefix = (text, latents[-CONTINUATION_FRAMES:]) if len(latents) else (None, None)

    def _continued_chunk(self, text: str, shape: BlockShape, job: SpeechJob, rng: torch.Generator,
                         speaker: tuple[Tensor, KVCache], decoder: StreamingDecoder, prefix: Tensor | None,
                         choose: StepChoice | None = None, more: bool = False):
        """One chunk of `continue` mode, sampled after `prefix` (frames, 80), if any. Each block is
        sent up to the chunk's end of speech only, as it is (no fades): decoded whole, with where its
        speech ends, in one host sync; the decoder is causal, so the audio of the speech frames is
        the start of that. When `more` chunks follow, the block where the speech ends (usually the
        chunk's last) is then decoded again up to there from the decoder's state before it, after its
        audio is sent: the decoder goes on with the next chunk and must not have seen the frames
        after the speech. Returns the chunk's latents (frames, 80): exactly the frames sent."""
        conditioning = yield from self._conditioning(text, job, speaker)
        steps = blockwise_steps(self.model, conditioning, rng, shape.block_sizes, shape.num_steps, job.sampler,
                                continuation_latent=None if prefix is None else prefix[None],
                                **self._adapting(shape, choose))
        latents = torch.zeros((0, 80), device=self.model.device)
        item = next(steps)
        for index in range(len(shape.block_sizes)):
            last = index == len(shape.block_sizes) - 1
            ends = partial(_chunk_ends, latents, early_stop=job.early_stop)
            heard = partial(_speech_samples, latents.shape[0], last=last)
            before = decoder.snapshot()
            block, audio, reply, (end_frame, silent) = yield from self._block(steps, item, decoder, job, ends, heard)
            frames, ended = speech_frames(latents.shape[0], block.shape[1], int(end_frame), bool(silent), last)
            latents = torch.cat([latents, block[0, :frames]])
            if (audio := audio[:frames * AE_DOWNSAMPLE_FACTOR]).size:
                yield audio
            if frames < block.shape[1] and more:  # the decoder's state as if it had seen the speech only
                decoder.restore(before)
                yield from self._decoded(decoder, block[:, :frames])
            if ended:
                break
            item = resume(steps, reply)
        steps.close()
        return latents

    def _conditioning(self, text: str, job: SpeechJob, speaker: tuple[Tensor, KVCache]):
        """The text's keys/values (a TextCall: batched with the other chunks that start together)
        and the prepared speaker, as the sampler's conditioning."""
        call = TextCall.of(self.model, text, job.normalize)
        kv_text = yield call
        speaker_mask, kv_speaker = speaker
        return Conditioning(self.model, None, speaker_mask, None, call.mask[:, :call.tokens], job.sampler,
                            kv_speaker=kv_speaker, kv_text=kv_text)

    @torch.inference_mode()
    def encode_texts(self, calls: list[TextCall]) -> list[KVCache]:
        """The keys/values of several text chunks: one text-encoder call per bucket length."""
        return encode_texts(self.model, calls, self.text_encoder)

    @torch.inference_mode()
    def extend_prefixes(self, calls: list[PrefixCall]) -> list[None]:
        """Several generations' finished blocks into their latent prefixes: one encoder call for
        the prefixes that line up (same frames so far and block length)."""
        extend_prefixes([c.prefix for c in calls], [c.latents for c in calls], self.prefix_encoder)
        return [None] * len(calls)

    def _decoder(self) -> StreamingDecoder:
        cpu = self.fish_ae.device.type == "cpu"
        return self.fish_ae.streaming_decoder(max_frames=CPU_DECODE_FRAMES if cpu else None,
                                              compiled=self.stream_decoder)

    def _decoded(self, decoder: StreamingDecoder, block: Tensor, probe: Tensor | None = None):
        """block (1, n, 80) latents -> (its audio (n * 2048,) float32, through the stream's decoder;
        `probe`'s values (k,) float32, or None): both reach the host in one transfer, the block's
        one host sync."""
        if block.shape[1] == 0:
            return np.zeros(0, np.float32), None if probe is None else probe.float().cpu().numpy()
        z = latents_to_dac(self.pca_state, block.to(self.fish_ae.device)).to(self.fish_ae.dtype)
        audio = (yield DecodeCall(decoder, z))[0, 0].float()
        if probe is None:
            return audio.cpu().numpy(), None
        both = torch.cat([audio, probe.float().to(audio.device)]).cpu().numpy()
        return both[:audio.shape[0]], both[audio.shape[0]:]

    def _block(self, steps: Generator, item, decoder: StreamingDecoder, job: SpeechJob,
               probe: Callable[[Tensor], Tensor] | None = None,
               heard: Callable[[Tensor, np.ndarray], int] | None = None):
        """Sample the next block (answering its ModelCalls) and decode it: (block (1, n, 80), its
        audio, the reply that accepts it in `steps`, the values (k,) of `probe(block)` on the host, or
        None), the audio and the values in one host transfer. `heard(block, values)`: how many of the
        audio's samples the listener gets (the rest is after the end of speech), the part a silence
        check listens to. With VAD reroll, a block whose audio holds too long a silence is sampled again from
        the next seeds (the decoder put back as it was), up to the limit; if every attempt fails, the
        one with the least silence is kept."""
        attempts = []  # (longest silence, block, audio, probe values, decoder state after it)
        before = decoder.snapshot() if self.reroll is not None else None
        while True:
            while isinstance(item, (ModelCall, PrefixCall)):
                item = steps.send((yield item))
            block = item
            audio, values = yield from self._decoded(decoder, block, None if probe is None else probe(block))
            if self.reroll is None:
                return block, audio, None, values
            kept = audio if heard is None else audio[:heard(block, values)]
            silence = (yield SilenceCheck(self.reroll.detector, kept)) if kept.size else 0.0
            attempts.append((silence, block, audio, values, decoder.snapshot()))
            if silence <= self.reroll.max_silence or len(attempts) > self.reroll.max_rerolls:
                break
            self.rerolls += 1
            log.info("block of %.1f s has a %.2f s silence: sampling it again with seed %d (reroll %d)",
                     audio.size / SAMPLE_RATE, silence, job.seed + len(attempts), len(attempts))
            decoder.restore(before)
            item = steps.send(make_generator(job.seed + len(attempts), self.model.device))
        silence, block, audio, values, after = min(attempts, key=lambda attempt: attempt[0])
        decoder.restore(after)
        return block, audio, block, values


def _chunk_ends(latents: Tensor, block: Tensor, early_stop: EarlyStop) -> Tensor:
    """A chunk's latents so far (frames, 80) and its next block (1, n, 80) -> [the flattening frame
    of both together, whether they end in a silent tail (1.0) or not], on the device (no sync)."""
    joined = torch.cat([latents, block[0]])
    return torch.stack([flattening_frame(joined).float(), early_stop.silent_tail(joined).float()])


def _speech_samples(before: int, block: Tensor, ends: np.ndarray, last: bool) -> int:
    """Samples of a block's audio that are speech, from _chunk_ends' values on the host."""
    return speech_frames(before, block.shape[1], int(ends[0]), bool(ends[1]), last)[0] * AE_DOWNSAMPLE_FACTOR


def speech_frames(before: int, frames: int, end: int, silent: bool, last: bool) -> tuple[int, bool]:
    """A chunk's block of `frames` frames after `before` frames, where _chunk_ends put the flattening
    frame (`end`) and whether they end in a silent tail: how many of the block's frames are speech,
    and whether the chunk ends with it (its last block, a silent tail, or a flat run within the
    frames generated)."""
    if not (last or silent) and end > before + frames - FLAT_WINDOW:
        return frames, False
    return max(end - before, 0), True


class CompiledTextEncoder:
    """The text encoder and its keys/values (EchoDiT.get_kv_cache_text) through torch.compile, over
    the TEXT_BUCKETS lengths the text chunks are padded to: one graph per bucket for a single chunk
    and one for several (the batch dimension dynamic), all built by `warm_up`. Compiled results are
    close to eager, not equal bit for bit (as the compiled decoder blocks)."""

    def __init__(self, model: EchoDiT, backend: str | Callable = "inductor"):
        self.model = model
        self._encode = torch.compile(model.get_kv_cache_text, backend=backend, dynamic=False)
        self._compiled = CompiledPart("text-encoder", 2 * len(TEXT_BUCKETS) + 2)

    @property
    def compiles_after_warm_up(self) -> int:
        return self._compiled.compiles_after_warm_up

    def __call__(self, ids: Tensor, mask: Tensor) -> KVCache:
        if ids.shape[0] > 1:
            torch._dynamo.maybe_mark_dynamic(ids, 0)
            torch._dynamo.maybe_mark_dynamic(mask, 0)
        with self._compiled.call(ids.shape):
            return self._encode(ids, mask)

    @torch.inference_mode()
    def warm_up(self, on_bucket: Callable[[], None] = lambda: None) -> None:
        """Every graph the server uses: each bucket, for one chunk and for two (dynamic: any number)."""
        for length in TEXT_BUCKETS:
            for batch in (1, 2):
                self(torch.zeros(batch, length, dtype=torch.int32, device=self.model.device),  # as TextCall.of pads
                     torch.ones(batch, length, dtype=torch.bool, device=self.model.device))
            on_bucket()
        self._compiled.warmed_up = True


class CompiledPrefixEncoder:
    """A finished block's whole patches into its generation's latent prefix (EchoDiT.extend_patches:
    the latent encoder, then every layer's prefix keys/values) through torch.compile, for the
    extensions a generation in `block_sizes` (the streaming preset's) makes: one graph per extension
    for a single generation and one for several stacked (the batch dimension dynamic), all built by
    `warm_up`. An extension of the same sizes reached another way (a request's own blocks, a
    continuation, a prefix with a partial patch) runs the same graph, its inputs first brought to
    the layout the graph was built for (a view, or a copy); any other runs eager. So nothing
    compiles while serving, for prefixes as the engine makes them: one generation each, made and
    extended in inference mode, as the warm-up's were (dynamo also guards on those, and on which
    inputs are the same tensor). Eager, an extension is ~2,900 small ops on the generation thread
    between two blocks of a stream. Compiled results are close to eager, not equal bit for bit (as
    the compiled decoder blocks)."""

    def __init__(self, model: EchoDiT, block_sizes: Sequence[int], backend: str | Callable = "inductor"):
        self.model = model
        self.chain = self.extensions(block_sizes, model.speaker_patch_size)  # (distinct: `before` grows)
        self._encode = torch.compile(model.extend_patches, backend=backend, dynamic=False)
        self._compiled = CompiledPart("prefix-encoder", 2 * len(self.chain) + 2)

    @staticmethod
    def extensions(block_sizes: Sequence[int], patch: int) -> list[tuple[int, int]]:
        """(new frames, frames before) of each extension a generation in these blocks makes: each
        block but the last, after the ones before it, while they are whole patches (a partial
        patch's prefix runs eager)."""
        out, before = [], 0
        for frames in block_sizes[:-1]:
            if frames % patch:
                break
            out.append((frames, before))
            before += frames
        return out

    @property
    def compiles_after_warm_up(self) -> int:
        return self._compiled.compiles_after_warm_up

    def __call__(self, frames: Tensor, encoder_kv: KVCache, complete: KVCache) -> tuple[KVCache, KVCache]:
        """EchoDiT.extend_patches: compiled for planned sizes (whole frames to encode, frames in the
        complete patches before them), else eager. The graphs guard on strides, those of size-1
        dimensions too: a slice after a partial patch, or caches an eager extension joined, are
        brought to the dense layout the warm-up's inputs had (`dense`), so they run the planned graph."""
        before = complete[0][0].shape[1] * self.model.speaker_patch_size
        if (frames.shape[1], before) not in self.chain:
            return self.model.extend_patches(frames, encoder_kv, complete)
        frames = dense(frames)
        encoder_kv, complete = ([(dense(k), dense(v)) for k, v in cache] for cache in (encoder_kv, complete))
        if frames.shape[0] > 1:
            for tensor in (frames, *(t for pair in (*encoder_kv, *complete) for t in pair)):
                torch._dynamo.maybe_mark_dynamic(tensor, 0)
        with self._compiled.call(frames.shape):
            return self._encode(frames, encoder_kv, complete)

    @torch.inference_mode()
    def warm_up(self, on_pass: Callable[[], None] = lambda: None) -> None:
        """Every graph the server uses: a generation's extensions in order, alone, then for two
        generations finishing their blocks together (dynamic: any number), through extend_prefixes as
        the worker calls it (so the inputs are as serving gives them); `on_pass()` after each."""
        m = self.model
        for count in (1, 2):
            prefixes = [LatentPrefix(m, 1) for _ in range(count)]
            for frames, _ in self.chain:
                block = torch.zeros(1, frames, m.latent_size, device=m.device, dtype=m.dtype)
                extend_prefixes(prefixes, [block] * count, self)
            on_pass()
        self._compiled.warmed_up = True


def dense(tensor: Tensor) -> Tensor:
    """The tensor with the strides a new tensor of its shape has, size-1 dimensions included (which
    `contiguous()` ignores), what a compiled graph guards on: itself, a view when only those differ,
    else a copy."""
    strides, step = [], 1
    for size in reversed(tensor.shape):
        strides.append(step)
        step *= max(size, 1)
    strides = tuple(reversed(strides))
    if tensor.stride() == strides:
        return tensor
    if tensor.is_contiguous():  # (the same elements at the same places: a view)
        return tensor.as_strided(tensor.shape, strides)
    return tensor.clone(memory_format=torch.contiguous_format)


class CompiledStreamDecoder:
    """The streaming Fish decoder through torch.compile (ECHO_COMPILE): blocks are decoded in pieces
    of exactly `frames` latent frames, each one call of a compiled graph over the stream's state,
    whose shapes are fixed from frame 0 (autoencoder.StreamState) and whose RoPE position is a tensor
    read from a table sized at warm-up, so every piece of every stream runs one of two graphs: one
    for a single stream, one for several streams decoded together (the batch dimension dynamic),
    both built by `warm_up`. Leftover frames (a block that is not a whole number of pieces) run eager.
    With `cuda_graphs`, a single stream's graph replays as a CUDA graph ("reduce-overhead": the
    latency of a lone stream's first audio is where launches cost most); its audio and new state
    are copied out of the graph's memory before its next replay. Batches of several stay plain
    compiled code: a CUDA graph would be recorded for every batch size met. Compiled audio is close
    to eager, not equal bit for bit."""

    ROPE_ROWS = 1 << 16  # frames a stream may reach (~50 min) before its RoPE table grows (a recompile)

    def __init__(self, frames: int = 32, backend: str | Callable = "inductor", cuda_graphs: bool = False):
        self.frames = frames
        self.cuda_graphs = cuda_graphs
        self._one = torch.compile(_decode_one, backend=backend, dynamic=False,
                                  mode="reduce-overhead" if cuda_graphs else None)
        self._many = torch.compile(_decode_several, backend=backend, dynamic=False)
        self._compiled = CompiledPart("decoder", 2)

    @property
    def compiles_after_warm_up(self) -> int:
        return self._compiled.compiles_after_warm_up

    def __call__(self, dac: DAC, piece: Tensor, decoder: StreamingDecoder) -> Tensor:
        """piece (B, latent_dim, frames) through decoder's state (replaced) -> audio (B, 1, frames * 2048)."""
        state = decoder.state
        piece = piece.clone(memory_format=torch.contiguous_format)  # a slice's strides vary with the block
        single = piece.shape[0] == 1
        if not single:
            for tensor in (piece, *state.context.values(), *state.position.values(),
                           *(t for pair in state.kv.values() for t in pair)):
                torch._dynamo.maybe_mark_dynamic(tensor, 0)
        graphs_replayed = single and self.cuda_graphs
        if graphs_replayed:
            torch.compiler.cudagraph_mark_step_begin()
        with self._compiled.call(piece.shape):
            audio = (self._one if single else self._many)(dac, piece, state)
        if graphs_replayed:
            decoder.state, audio = state.cloned(), audio.clone()
        return audio

    @torch.inference_mode()
    def warm_up(self, dac: DAC) -> None:
        """Both graphs (one stream, two), the single stream's recorded as a CUDA graph too when asked
        (inductor runs a new shape eagerly, records it on the second call and replays from the third),
        and the RoPE table of ROPE_ROWS frames they read."""
        dac.quantizer.post_module.rope_rows(self.ROPE_ROWS)
        for batch in (1, 2):
            decoder = dac.streaming_decoder(batch, compiled=self)
            for _ in range(3 if self.cuda_graphs else 1):
                decoder.decode(torch.zeros(batch, dac.latent_dim, self.frames, device=dac.device, dtype=dac.dtype))
        self._compiled.warmed_up = True


def _decode_one(dac: DAC, piece: Tensor, state: StreamState) -> Tensor:
    return dac._decode(piece, state)


def _decode_several(dac: DAC, piece: Tensor, state: StreamState) -> Tensor:  # (its own code: its own graphs)
    return dac._decode(piece, state)


@dataclass(frozen=True)
class VadReroll:
    """ECHO_VAD_REROLL_ENABLED (ECHO_VAD_SILENCE_THRESHOLD_MS, ECHO_VAD_MAX_REROLLS): sample a block again while its audio holds a silence over `max_silence` s."""

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
class TextCall:
    """Encode one text chunk: its token ids and mask (1, L), padded to a TEXT_BUCKETS length L, and
    its own token count. Send back its per-layer text keys/values (1, tokens, H, D)."""

    model: EchoDiT
    ids: Tensor
    mask: Tensor
    tokens: int

    @classmethod
    def of(cls, model: EchoDiT, text: str, normalize: bool) -> TextCall:
        ids, mask = get_text_input_ids_and_mask([text], max_length=MAX_TEXT_LENGTH, normalize=normalize,
                                                pad_to_max=False)
        tokens = ids.shape[1]
        length = next(b for b in TEXT_BUCKETS if b >= tokens)
        pad = (0, length - tokens)
        return cls(model, torch.nn.functional.pad(ids, pad).to(model.device),
                   torch.nn.functional.pad(mask, pad).to(model.device), tokens)

    def run(self) -> KVCache:
        return encode_texts(self.model, [self])[0]


def encode_texts(model: EchoDiT, calls: list[TextCall],
                 encoder: Callable[[Tensor, Tensor], KVCache] | None = None) -> list[KVCache]:
    """Each call's text keys/values, the calls of one bucket length stacked into one text-encoder
    call (`encoder`, else the model's eager one). Rows do not interact (padded tokens are masked),
    so eager, each result equals the call's own `run()`: tests/test_engine_batching.py pins that bit
    for bit."""
    encode = encoder or model.get_kv_cache_text
    out: list[KVCache | None] = [None] * len(calls)
    for members in grouped(call.ids.shape[1] for call in calls).values():
        kv = encode(torch.cat([calls[i].ids for i in members]), torch.cat([calls[i].mask for i in members]))
        for row, i in enumerate(members):  # copied out: a job keeps only its own tokens alive
            n = calls[i].tokens
            out[i] = [(k[row:row + 1, :n].clone(), v[row:row + 1, :n].clone()) for k, v in kv]
    return out


@dataclass
class DecodeCall:
    """Decode one block of DAC latents (B, dac_dim, n) with a stream's decoder (its state advances)."""

    decoder: StreamingDecoder
    z: Tensor

    def run(self) -> Tensor:
        return self.decoder.decode(self.z)


JobSteps = Generator[TextCall | ModelCall | PrefixCall | DecodeCall | SilenceCheck | np.ndarray,
                     KVCache | Tensor | float | None, None]


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

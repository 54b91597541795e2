"""The Echo-TTS Python API: loading, audio and text preparation, samplers and the full pipeline.

Names and arguments follow the upstream README so existing scripts keep working:

    model = load_model_from_hf(delete_blockwise_modules=True)
    fish_ae = load_fish_ae_from_hf()
    pca_state = load_pca_state_from_hf()
    audio, text = sample_pipeline(model, fish_ae, pca_state, partial(sample_euler_cfg_independent_guidances,
                                  num_steps=40, ...), "[S1] Hello.", load_audio("voice.wav").cuda(), rng_seed=0)

Latents are (B, frames, 80) in the PCA space of the Fish S1-DAC; one frame is 2048 samples at 44.1 kHz.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import threading
import warnings
import weakref
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass
from typing import BinaryIO

import av
import numpy as np
import safetensors.torch as st
from safetensors import SafetensorError
import torch
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
from torch import Tensor

from autoencoder import DEFAULT_CONFIG as FISH_DAC_CONFIG
from autoencoder import DAC, build_ae
from checkpoint import CheckpointError, verify_state_dict
from model import EchoDiT, KVCache, is_blockwise_parameter

log = logging.getLogger(__name__)

SAMPLE_RATE = 44_100
AE_DOWNSAMPLE_FACTOR = 2048  # audio samples per latent frame
LATENT_SIZE = 80
MAX_TEXT_LENGTH = 768  # bytes (BOS included) the model was trained on
MAX_SPEAKER_LATENT_LENGTH = 6400  # longest speaker reference seen in training (~5 minutes)
MAX_SEQUENCE_LENGTH = 640  # longest generation seen in training (~30 s)

ECHO_DIT_CONFIG: dict[str, int | float] = dict(
    latent_size=80, model_size=2048, num_layers=24, num_heads=16, intermediate_size=5888, norm_eps=1e-5,
    text_vocab_size=256, text_model_size=1280, text_num_layers=14, text_num_heads=10, text_intermediate_size=3328,
    speaker_patch_size=4, speaker_model_size=1280, speaker_num_layers=14, speaker_num_heads=10,
    speaker_intermediate_size=3328, timestep_embed_size=512, adaln_rank=256,
)


# ---------------------------------------------------------------------------------------------
# Loading


def _resolve_file(repo_id: str, filename: str, token: str | None) -> str:
    """Path of `filename` in a local directory or a Hugging Face Hub repo (downloaded into its cache)."""
    if os.path.isdir(repo_id):
        path = os.path.join(repo_id, filename)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} not found (local model directory {repo_id!r})")
        return path
    return hf_hub_download(repo_id, filename, token=token)


def _config_overrides(repo_id: str, defaults: dict, token: str | None) -> dict:
    """Keys of the repo's optional config.json that override `defaults`; unknown keys are warned about."""
    try:
        path = _resolve_file(repo_id, "config.json", token)
    except (FileNotFoundError, EntryNotFoundError, LocalEntryNotFoundError):
        return {}
    try:
        with open(path) as f:
            config = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e}); fix or remove it (the published hyperparameters "
                              "apply without it)") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object of hyperparameters")
    unknown = sorted(set(config) - set(defaults))
    if unknown:
        warnings.warn(f"{path}: ignoring unknown config keys {unknown}", stacklevel=3)
    return {k: v for k, v in config.items() if k in defaults}


def _load_tensors(path: str, dtype: torch.dtype | None) -> dict[str, Tensor]:
    """All tensors of a safetensors file on the CPU, floating ones cast to `dtype` one at a time
    (so a bfloat16 file loaded as float32 never needs both copies in memory at once)."""
    state = {}
    with _named_on_failure(path), st.safe_open(path, framework="pt", device="cpu") as f:
        for name in f.keys():
            tensor = f.get_tensor(name)
            state[name] = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
    return state


@contextlib.contextmanager
def _named_on_failure(path: str) -> Iterator[None]:
    """A file safetensors cannot read (an interrupted copy or download) is a CheckpointError naming it."""
    try:
        yield
    except SafetensorError as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e}); it may be truncated: copy or "
                              "download it again") from None


def load_model_from_hf(repo_id: str = "jordand/echo-tts-base", device: str = "cuda",
                       dtype: torch.dtype | None = torch.bfloat16, compile: bool = False, token: str | None = None,
                       delete_blockwise_modules: bool = False, fuse_projections: bool = True) -> EchoDiT:
    """Load EchoDiT from a Hub repo id or a local directory (weights, optional config.json).

    Every tensor of the file must match the architecture; a mismatch raises CheckpointError naming it.
    `delete_blockwise_modules` drops the latent-prefix modules (saves ~0.4 B parameters; blockwise
    sampling is then unavailable). `fuse_projections` stacks the projections that read one input
    into one product each (EchoDiT.fuse_projections); the file is read as published either way.
    """
    config = {**ECHO_DIT_CONFIG, **_config_overrides(repo_id, ECHO_DIT_CONFIG, token)}
    path = _resolve_file(repo_id, "pytorch_model.safetensors", token)
    with torch.device("meta"):
        model = EchoDiT(**config, latent_prefix=not delete_blockwise_modules)
    state = _load_tensors(path, dtype)
    if delete_blockwise_modules:
        state = {k: v for k, v in state.items() if not is_blockwise_parameter(k)}
    verify_state_dict({k: v.shape for k, v in model.state_dict().items()}, state, source=path)
    model.load_state_dict({k: v.to(device) for k, v in state.items()}, strict=True, assign=True)
    del state  # (on the CPU the file's tensors are the parameters: not kept twice while they are stacked)
    model = model.eval().requires_grad_(False)
    if fuse_projections:
        model.fuse_projections()
    if compile:
        model = compile_model(model)
    return model


def compile_model(model: EchoDiT) -> EchoDiT:
    """torch.compile the decoder (`velocity`, which `forward` and the samplers call) and the cache
    builders in place; the module keeps its type."""
    model.velocity = torch.compile(model.velocity)
    model.get_kv_cache_text = torch.compile(model.get_kv_cache_text)
    model.get_kv_cache_speaker = torch.compile(model.get_kv_cache_speaker)
    if model.has_latent_prefix:
        model.get_kv_cache_latent = torch.compile(model.get_kv_cache_latent)
    return model


def load_fish_ae_from_hf(repo_id: str = "jordand/fish-s1-dac-min", device: str = "cuda",
                         dtype: torch.dtype | None = torch.float32, compile: bool = False,
                         token: str | None = None) -> DAC:
    """Load the Fish S1-DAC; config.json keys (if present) override the published hyperparameters."""
    overrides = _config_overrides(repo_id, FISH_DAC_CONFIG, token)
    path = _resolve_file(repo_id, "pytorch_model.safetensors", token)
    with torch.device("meta"):
        fish_ae = build_ae(**overrides)
    fish_ae.load_checkpoint(_load_tensors(path, None), source=path)
    fish_ae = fish_ae.to(device=device, dtype=dtype).eval().requires_grad_(False)
    if compile:
        fish_ae = compile_fish_ae(fish_ae)
    return fish_ae


def compile_fish_ae(fish_ae: DAC) -> DAC:
    """torch.compile the DAC's encode and decode in place."""
    fish_ae.encode_zq = torch.compile(fish_ae.encode_zq)
    fish_ae.decode_zq = torch.compile(fish_ae.decode_zq)
    return fish_ae


@dataclass
class PCAState:
    """Maps DAC latents (1024-d) to the model's 80-d latent space: z = (x - mean) @ C.T * scale."""

    pca_components: Tensor  # (80, dac_dim)
    pca_mean: Tensor  # (dac_dim,)
    latent_scale: float


def load_pca_state_from_hf(repo_id: str = "jordand/echo-tts-base", device: str = "cuda",
                           filename: str = "pca_state.safetensors", token: str | None = None) -> PCAState:
    path = _resolve_file(repo_id, filename, token)
    tensors = _load_tensors(path, None)
    missing = {"pca_components", "pca_mean", "latent_scale"} - set(tensors)
    if missing:
        raise ValueError(f"{path}: missing tensors {sorted(missing)}")
    return PCAState(
        pca_components=tensors["pca_components"].float().to(device),
        pca_mean=tensors["pca_mean"].float().to(device),
        latent_scale=float(tensors["latent_scale"].reshape(-1)[0]),
    )


# ---------------------------------------------------------------------------------------------
# Audio


class AudioDecodeError(ValueError):
    """Audio that could not be decoded, or was refused before decoding. The message names a file by
    its base name only: it may reach a client, and must not map the server's disk."""


class AudioTooLong(AudioDecodeError):
    """A clip longer than the caller accepts (decode_audio's `refuse_over`)."""


# The containers audio is read from. FFmpeg can probe many more, among them concat scripts,
# playlists and image sequences, which open further files or URLs named inside the data: a client's
# 53-byte "audio" could make the server read any file. Only these demuxers are tried, and no
# protocol is allowed for anything the data names (the data itself is read through Python).
AUDIO_CONTAINERS = ("wav", "w64", "flac", "mp3", "ogg", "mov", "matroska", "aac", "aiff", "caf", "au", "wv")
MAX_SOURCE_RATE = 192_000  # Hz; higher rates are refused before decoding
MIN_SOURCE_RATE = 4_000  # Hz (old formats go down to 5,512); lower is refused: at 1 Hz each sample would become 44,100
MAX_FRAME_SECONDS = 30  # a decoded frame holding more is refused before it is resampled (real ones hold < 2 s)
MAX_SOURCE_CHANNELS = 8
DECODE_BUDGET_PER_SECOND = 96_000  # raw samples (all channels) decoded per second of max_duration: 48 kHz stereo
_SAFE_CONTAINER_OPTIONS = {"format_whitelist": ",".join(AUDIO_CONTAINERS), "protocol_whitelist": "none"}


@dataclass(frozen=True)
class DecodedAudio:
    """A decoded clip: (1, samples) float32 mono at 44.1 kHz, and what its source declared."""

    audio: Tensor
    source_rate: int
    source_channels: int


def load_audio(path: str | os.PathLike | BinaryIO, max_duration: float | None = 300, normalize: bool = True) -> Tensor:
    """Decode audio to a (1, samples) float32 tensor: mono, 44.1 kHz, peak 1.0 (as recorded with
    `normalize=False`). See `decode_audio` for the formats and limits."""
    return decode_audio(path, max_duration, normalize).audio


def decode_audio(path: str | os.PathLike | BinaryIO, max_duration: float | None = 300,
                 normalize: bool = True, refuse_over: float | None = None) -> DecodedAudio:
    """Decode a clip in one of AUDIO_CONTAINERS (a path or a binary file object such as io.BytesIO
    of an upload); multi-channel audio is down-mixed, audio beyond `max_duration` seconds dropped.

    Built for untrusted bytes: other containers are refused, a source outside MIN_SOURCE_RATE to
    MAX_SOURCE_RATE or over MAX_SOURCE_CHANNELS is refused from its header (and from any frame that
    says so), a frame over MAX_FRAME_SECONDS is refused, decoding stops (refused) once it has produced
    more raw samples than `max_duration` seconds of 48 kHz stereo, and a clip with a NaN or
    infinite sample is refused. Every refusal is an AudioDecodeError. With `refuse_over`, a clip
    longer than that many seconds is refused (AudioTooLong) instead of cut: from its declared
    duration before decoding, else once decoding passes it.
    """
    if refuse_over is not None:
        max_duration = refuse_over + 1
    is_path = isinstance(path, (str, os.PathLike))
    name = os.path.basename(os.fspath(path)) if is_path else "the audio"
    limit = None if not max_duration or max_duration <= 0 else int(max_duration * SAMPLE_RATE)
    budget = None if limit is None else int(max_duration * DECODE_BUDGET_PER_SECOND)
    pieces: list[np.ndarray] = []
    total = decoded = 0
    try:
        with open(path, "rb") if is_path else contextlib.nullcontext(path) as file, \
                av.open(file, mode="r", container_options=_SAFE_CONTAINER_OPTIONS) as container:
            if not container.streams.audio:
                raise AudioDecodeError(f"cannot decode {name}: it has no audio stream")
            stream = container.streams.audio[0]
            rate, channels = stream.rate or 0, stream.channels or 0
            _check_source(name, channels, rate or None)  # (a header may not say its rate: its frames do)
            if refuse_over is not None and _declared_seconds(container, stream) > max_duration:
                raise AudioTooLong(f"{name} is longer than {refuse_over:g} s")
            resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
            for frame in _with_flush(container.decode(stream)):
                if frame is not None:
                    frame_rate, frame_channels = frame.sample_rate or 0, max(frame.layout.nb_channels, 1)
                    _check_source(name, frame_channels, frame_rate)  # (a frame may differ from the header)
                    if frame.samples > MAX_FRAME_SECONDS * frame_rate:  # resampled at once: bounded before
                        raise AudioDecodeError(f"cannot decode {name}: a frame holds more than {MAX_FRAME_SECONDS} s")
                    decoded += frame.samples * frame_channels
                    if budget is not None and decoded > budget:
                        raise AudioDecodeError(
                            f"cannot decode {name}: it holds more samples than {max_duration:g} s of 48 kHz "
                            f"stereo audio")
                for out in resampler.resample(frame):
                    pieces.append(out.to_ndarray().reshape(-1))
                    total += pieces[-1].size
                if limit is not None and total >= limit:
                    break
    except AudioDecodeError:
        raise
    except av.FFmpegError as e:  # its str() would name the file: only FFmpeg's reason is shown
        raise AudioDecodeError(f"cannot decode {name}: not audio in a supported format ({e.strerror})") from e
    except (OSError, ValueError, EOFError) as e:
        raise AudioDecodeError(f"cannot decode {name}: {type(e).__name__}") from e
    audio = np.concatenate(pieces) if pieces else np.zeros(0, np.float32)
    if limit is not None:
        audio = audio[:limit]
    if audio.size == 0:
        raise AudioDecodeError(f"cannot decode {name}: it contains no samples")
    if refuse_over is not None and audio.size > refuse_over * SAMPLE_RATE:
        raise AudioTooLong(f"{name} is longer than {refuse_over:g} s")
    if not np.isfinite(audio).all():
        raise AudioDecodeError(f"cannot use {name}: it contains samples that are not numbers (NaN or infinity)")
    tensor = torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32))[None]
    peak = tensor.abs().max()
    return DecodedAudio(tensor / peak if normalize and peak > 0 else tensor, rate, channels)


def _check_source(name: str, channels: int, rate: int | None) -> None:
    """Refuse a source (its header, or a frame) outside the channel and rate bounds; None: rate unknown."""
    if channels > MAX_SOURCE_CHANNELS or rate is not None and not MIN_SOURCE_RATE <= rate <= MAX_SOURCE_RATE:
        raise AudioDecodeError(f"cannot decode {name}: {channels} channels at {rate} Hz; at most "
                               f"{MAX_SOURCE_CHANNELS} channels at {MIN_SOURCE_RATE}-{MAX_SOURCE_RATE} Hz are accepted")


def _declared_seconds(container: av.container.InputContainer, stream: av.AudioStream) -> float:
    """The duration a clip's header declares (0 when it declares none): what decoding would cost."""
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    return container.duration / av.time_base if container.duration is not None else 0.0


def _with_flush(frames):
    """Decoded frames followed by None, which flushes av.AudioResampler."""
    yield from frames
    yield None


def load_audio_bytes(data: bytes, max_duration: float | None = 300, normalize: bool = True,
                     refuse_over: float | None = None) -> Tensor:
    """load_audio for an in-memory encoded clip."""
    return decode_audio(io.BytesIO(data), max_duration, normalize, refuse_over).audio


# ---------------------------------------------------------------------------------------------
# Text


def normalize_text(text: str) -> str:
    """Echo's training-time text normalisation, plus the `[S1] ` speaker tag when none is present."""
    for old, new in (("…", "..."), ("’", "'"), ("”", '"'), ("\n", " "), (":", ","), (";", ","), ("—", ", ")):
        text = text.replace(old, new)
    if not text.startswith(("[", "(")) and "S1" not in text and "S2" not in text:
        text = "[S1] " + text
    return text


def tokenizer_encode(text: str, append_bos: bool = True, normalize: bool = True,
                     return_normalized_text: bool = False) -> Tensor | tuple[Tensor, str]:
    """UTF-8 bytes as token ids, BOS (0) first."""
    if normalize:
        text = normalize_text(text)
    ids = ([0] if append_bos else []) + list(text.encode("utf-8"))
    tokens = torch.tensor(ids, dtype=torch.long)
    return (tokens, text) if return_normalized_text else tokens


def get_text_input_ids_and_mask(text_arr: Sequence[str], max_length: int | None, device: str | torch.device | None = None,
                                normalize: bool = True, return_normalized_text: bool = False,
                                pad_to_max: bool = True) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, list[str]]:
    """Token ids (B, L) int32 and mask (B, L) for a batch of texts, truncated to `max_length`.

    L is `max_length` when `pad_to_max`, else the longest (truncated) text.
    """
    encoded = [tokenizer_encode(t, normalize=normalize, return_normalized_text=True) for t in text_arr]
    longest = max(len(ids) for ids, _ in encoded)
    if max_length is not None and longest > max_length:
        log.warning("text truncated from %d to %d tokens", longest, max_length)
    length = max_length if (pad_to_max and max_length is not None) else min(longest, max_length or longest)
    tokens = torch.zeros((len(encoded), length), dtype=torch.int32)
    mask = torch.zeros((len(encoded), length), dtype=torch.bool)
    for row, (ids, _) in enumerate(encoded):
        n = min(len(ids), length)
        tokens[row, :n] = ids[:n]
        mask[row, :n] = True
    if device is not None:
        tokens, mask = tokens.to(device), mask.to(device)
    if return_normalized_text:
        return tokens, mask, [text for _, text in encoded]
    return tokens, mask


# ---------------------------------------------------------------------------------------------
# Autoencoder in the model's latent space


@torch.inference_mode()
def ae_encode(fish_ae: DAC, pca_state: PCAState, audio: Tensor) -> Tensor:
    """(B, 1, samples) -> latents (B, samples / 2048, 80)."""
    assert audio.ndim == 3 and audio.shape[1] == 1, "audio must be (batch, 1, samples)"
    z = fish_ae.encode_zq(audio).float()  # (B, dac_dim, frames)
    return (z.transpose(1, 2) - pca_state.pca_mean) @ pca_state.pca_components.T * pca_state.latent_scale


def latents_to_dac(pca_state: PCAState, z: Tensor) -> Tensor:
    """Model latents (B, frames, 80) -> DAC latents (B, dac_dim, frames), float32."""
    return ((z.float() / pca_state.latent_scale) @ pca_state.pca_components + pca_state.pca_mean).transpose(1, 2)


@torch.inference_mode()
def ae_decode(fish_ae: DAC, pca_state: PCAState, z_q: Tensor) -> Tensor:
    """Latents (B, frames, 80) -> audio (B, 1, frames * 2048), float32."""
    return fish_ae.decode_zq(latents_to_dac(pca_state, z_q).to(fish_ae.dtype)).float()


@torch.inference_mode()
def get_speaker_latent_and_mask(fish_ae: DAC, pca_state: PCAState, audio: Tensor,
                                max_speaker_latent_length: int = MAX_SPEAKER_LATENT_LENGTH,
                                audio_chunk_size: int = 640 * AE_DOWNSAMPLE_FACTOR, pad_to_max: bool = False,
                                divis_by_patch_size: int | None = 4) -> tuple[Tensor, Tensor]:
    """Speaker latents (1, N, 80) and mask (1, N) of a (1, samples) reference clip.

    The clip is cut at `max_speaker_latent_length` frames and encoded in zero-padded chunks of
    `audio_chunk_size` samples (~30 s, as in training); the mask marks frames of real audio.
    """
    assert audio.ndim == 2 and audio.shape[0] == 1, "audio must be (1, samples)"
    audio = audio[:, :max_speaker_latent_length * AE_DOWNSAMPLE_FACTOR]
    chunks = []
    for start in range(0, audio.shape[1], audio_chunk_size):
        chunk = audio[:, start:start + audio_chunk_size]
        chunk = torch.nn.functional.pad(chunk, (0, audio_chunk_size - chunk.shape[1]))
        chunks.append(ae_encode(fish_ae, pca_state, chunk[None]))
    latent = torch.cat(chunks, dim=1)
    real_frames = audio.shape[1] // AE_DOWNSAMPLE_FACTOR
    mask = (torch.arange(latent.shape[1], device=latent.device) < real_frames)[None]
    if pad_to_max and latent.shape[1] < max_speaker_latent_length:
        extra = max_speaker_latent_length - latent.shape[1]
        latent = torch.nn.functional.pad(latent, (0, 0, 0, extra))
        mask = torch.nn.functional.pad(mask, (0, extra))
    elif not pad_to_max:
        latent, mask = latent[:, :real_frames], mask[:, :real_frames]
    if divis_by_patch_size is not None:
        keep = latent.shape[1] // divis_by_patch_size * divis_by_patch_size
        latent, mask = latent[:, :keep], mask[:, :keep]
    return latent, mask


# ---------------------------------------------------------------------------------------------
# End of speech


def find_flattening_point(data: Tensor, target_value: float = 0.0, window_size: int = 20,
                          std_threshold: float = 0.05) -> int:
    """First frame where the latents (frames, 80) settle to a flat run near `target_value` (silence).

    A window of `window_size` frames (zero-padded past the end) is flat when its standard
    deviation is below `std_threshold` and its mean within 0.1 of the target. Returns len(data)
    when no window is flat.
    """
    return int(flattening_frame(data, target_value, window_size, std_threshold))


def flattening_frame(data: Tensor, target_value: float = 0.0, window_size: int = 20,
                     std_threshold: float = 0.05) -> Tensor:
    """find_flattening_point as a 0-d tensor on the latents' device: no host sync."""
    if len(data) == 0:
        return torch.zeros((), dtype=torch.long, device=data.device)
    padded = torch.cat([data.float(), data.new_zeros(window_size, *data.shape[1:]).float()])
    windows = padded.unfold(0, window_size, 1)[: len(data)]  # (frames, 80, window)
    windows = windows.reshape(windows.shape[0], -1)
    flat = (windows.std(dim=1) < std_threshold) & ((windows.mean(dim=1) - target_value).abs() < 0.1)
    return torch.where(flat.any(), flat.int().argmax(), len(data))  # argmax: the first flat frame


def crop_audio_to_flattening_point(audio: Tensor, latent: Tensor) -> Tensor:
    """Cut audio (..., samples) at the flattening point of its latents (frames, 80)."""
    return audio[..., :find_flattening_point(latent) * AE_DOWNSAMPLE_FACTOR]


# ---------------------------------------------------------------------------------------------
# Sampling: rectified-flow Euler steps with classifier-free guidance

GUIDANCE_MODES = ("independent", "joint", "alternating", "apg")

# A CFG branch is (use text, use speaker): the conditional branch and the three unconditional ones.
COND, NO_TEXT, NO_SPEAKER, NO_CONDITION = (True, True), (False, True), (True, False), (False, False)
Branch = tuple[bool, bool]


def time_schedule(num_steps: int) -> list[float]:
    """t from 0.999 down to 0 in `num_steps` equal steps (0.999 so the rescale applies on step one)."""
    return (torch.linspace(1.0, 0.0, num_steps + 1) * 0.999).tolist()


def guidance_branches(mode: str, guided_step: int) -> tuple[Branch, ...]:
    """Branches evaluated on a guided step; the first is always the conditional one."""
    if mode in ("independent", "apg"):
        return COND, NO_TEXT, NO_SPEAKER
    if mode == "joint":
        return COND, NO_CONDITION
    if mode == "alternating":  # one unconditional branch per step: text-dropped, then speaker-dropped
        return (COND, NO_TEXT) if guided_step % 2 == 0 else (COND, NO_SPEAKER)
    raise ValueError(f"unknown guidance mode {mode!r}; expected one of {GUIDANCE_MODES}")


def combine_guidance(mode: str, velocities: Sequence[Tensor], branches: Sequence[Branch],
                     cfg_scale_text: float, cfg_scale_speaker: float) -> Tensor:
    """Guided velocity from the branch velocities (same order as `branches`)."""
    v_cond = velocities[0]
    if mode == "joint":
        return v_cond + (cfg_scale_text + cfg_scale_speaker) * (v_cond - velocities[1])
    guided = v_cond
    for branch, v_uncond in zip(branches[1:], velocities[1:]):
        scale = cfg_scale_text if branch == NO_TEXT else cfg_scale_speaker
        update = _apg_update(v_cond, v_uncond) if mode == "apg" else v_cond - v_uncond
        guided = guided + scale * update
    return guided


def _apg_update(v_cond: Tensor, v_uncond: Tensor) -> Tensor:
    """Adaptive projected guidance update: the guidance difference split along and across v_cond.

    The reference recombines the two parts with eta = 1 (and no norm threshold), which gives back
    the plain difference up to rounding; it is computed the same way here to match it.
    """
    diff = v_cond - v_uncond
    dims = tuple(range(1, diff.ndim))
    unit = v_cond / v_cond.norm(p=2, dim=dims, keepdim=True).clamp_min(1e-12)
    parallel = (diff * unit).sum(dim=dims, keepdim=True) * unit
    return (diff - parallel) + parallel


def temporal_score_rescale(v: Tensor, x_t: Tensor, t: float, rescale_k: float, rescale_sigma: float) -> Tensor:
    """Temporal score rescaling (arXiv 2510.01184) of the velocity at time t < 1."""
    if t >= 1:
        return v
    snr = (1 - t) ** 2 / t ** 2
    ratio = (snr * rescale_sigma ** 2 + 1) / (snr * rescale_sigma ** 2 / rescale_k + 1)
    return (ratio * ((1 - t) * v + x_t) - x_t) / (1 - t)


_SCALED: dict[tuple, tuple[list[weakref.ref], list[weakref.ref]]] = {}  # see scale_speaker_kv
_SCALED_LOCK = threading.Lock()


def scale_speaker_kv(kv: KVCache, scale: float | None, max_layers: int | None) -> KVCache:
    """A copy of the speaker cache with the first `max_layers` layers (all when None) scaled.

    Shared while any holder keeps it: the generations of one voice with the same scaling (streams at
    once, or a stream's text chunks) get the same tensors, so they hold them once, and the
    static-shape runner's pool writes them once (caches are never written in place, so the copy
    stays right). Only weak references are kept here."""
    if scale is None:
        return kv
    tensors = [t for pair in kv for t in pair]
    key = (tuple(id(t) for t in tensors), scale, max_layers)
    alive = lambda refs: [ref() for ref in refs]  # noqa: E731
    with _SCALED_LOCK:
        for dead in [k for k, (sources, copy) in _SCALED.items() if any(t is None for t in alive(sources + copy))]:
            del _SCALED[dead]
        if key in _SCALED:
            sources, copy = _SCALED[key]
            if all(a is b for a, b in zip(alive(sources), tensors)):
                scaled = alive(copy)
                return [(scaled[i], scaled[i + 1]) for i in range(0, len(scaled), 2)]
        n = len(kv) if max_layers is None else min(max_layers, len(kv))
        scaled = [(k * scale, v * scale) if i < n else (k, v) for i, (k, v) in enumerate(kv)]
        _SCALED[key] = ([weakref.ref(t) for t in tensors], [weakref.ref(t) for pair in scaled for t in pair])
        return scaled


def repeat_kv(kv: KVCache, times: int) -> KVCache:
    """The cache's rows `times` times over (one copy per CFG branch). A one-row cache (a single
    generation's) is repeated as a view: the branches share its keys/values instead of copying them."""
    if times == 1:
        return kv
    if kv[0][0].shape[0] == 1:
        return [(k.expand(times, -1, -1, -1), v.expand(times, -1, -1, -1)) for k, v in kv]
    return [(k.repeat(times, 1, 1, 1), v.repeat(times, 1, 1, 1)) for k, v in kv]


@dataclass(frozen=True)
class SamplerSettings:
    """Everything but the inputs and the seed that decides what a sampler produces."""

    num_steps: int
    cfg_scale_text: float
    cfg_scale_speaker: float
    cfg_min_t: float
    cfg_max_t: float
    truncation_factor: float | tuple[float, ...] | None = None  # one for all blocks, or one per block
    rescale_k: float | None = None
    rescale_sigma: float | None = None
    speaker_kv_scale: float | None = None
    speaker_kv_max_layers: int | None = None
    speaker_kv_min_t: float | None = None
    guidance: str = "independent"

    def truncation(self, block: int = 0) -> float | None:
        """The initial-noise scale of block `block` (blocks past a per-block list take its last)."""
        factor = self.truncation_factor
        if factor is None or isinstance(factor, (int, float)):
            return factor
        return factor[min(block, len(factor) - 1)]


class Conditioning:
    """Text and speaker key/value caches of one generation, with their CFG batches built on demand.

    Caches are computed once; the batched copies for each set of CFG branches and each speaker-KV
    scaling state are made once and reused by every step.
    """

    def __init__(self, model: EchoDiT, speaker_latent: Tensor | None, speaker_mask: Tensor, text_input_ids: Tensor,
                 text_mask: Tensor, settings: SamplerSettings, kv_speaker: KVCache | None = None,
                 kv_text: KVCache | None = None):
        """`kv_speaker`, when given, is get_kv_cache_speaker(speaker_latent) computed earlier (then
        speaker_latent may be None); `kv_text`, when given, the text's keys/values computed earlier
        (then text_input_ids may be None), matching `text_mask`."""
        self.model = model
        self.text_mask = text_mask
        self.speaker_mask = speaker_mask
        self.kv_text = kv_text if kv_text is not None else model.get_kv_cache_text(text_input_ids, text_mask)
        plain = kv_speaker if kv_speaker is not None else model.get_kv_cache_speaker(speaker_latent.to(model.dtype))
        self.kv_speaker = {False: plain,
                           True: scale_speaker_kv(plain, settings.speaker_kv_scale, settings.speaker_kv_max_layers)}
        self._batched: dict = {}

    def batch(self, branches: Sequence[Branch], scaled: bool) -> tuple[Tensor, Tensor, KVCache, KVCache]:
        """text mask, speaker mask, text KV, speaker KV for the given branches stacked along the batch."""
        key = (tuple(branches), scaled)
        if key not in self._batched:
            n = len(branches)
            text_masks = [self.text_mask if use_text else torch.zeros_like(self.text_mask) for use_text, _ in branches]
            speaker_masks = [self.speaker_mask if use_sp else torch.zeros_like(self.speaker_mask) for _, use_sp in branches]
            kv_text = self._batched.get(("text", n)) or repeat_kv(self.kv_text, n)
            kv_speaker = self._batched.get(("speaker", n, scaled)) or repeat_kv(self.kv_speaker[scaled], n)
            self._batched[("text", n)] = kv_text
            self._batched[("speaker", n, scaled)] = kv_speaker
            self._batched[key] = (torch.cat(text_masks), torch.cat(speaker_masks), kv_text, kv_speaker)
        return self._batched[key]


@dataclass
class ModelCall:
    """The model input of one diffusion step of one generation; its rows are the CFG branches.

    Samplers are generators that yield these and receive the velocity back, so a scheduler can
    evaluate the steps of many generations in one batched forward (see worker.py, batched_steps.py).
    """

    x: Tensor  # (n, S, 80) in the model dtype
    t: Tensor  # (n,)
    start_pos: int
    text_mask: Tensor  # (n, T)
    speaker_mask: Tensor  # (n, 4P), per latent frame
    kv_text: KVCache
    kv_speaker: KVCache
    kv_latent: KVCache | None = None  # every prefix patch is visible
    time: float | None = None  # t's value on the host (every row's), for the model's table by time

    def run(self, model: EchoDiT) -> Tensor:
        """Velocity (n, S, 80) float32."""
        positions = torch.arange(self.start_pos, self.start_pos + self.x.shape[1], device=self.x.device)
        return model.velocity(self.x, self.t, positions, self.key_mask(model), self.kv_text, self.kv_speaker,
                              self.kv_latent, modulation=timed_modulations(model, [self]))

    def key_mask(self, model: EchoDiT) -> Tensor:
        """(n, S + Q + T + P): every frame and prefix patch, the text and speaker patches as masked."""
        masks = [torch.ones(self.x.shape[:2], dtype=torch.bool, device=self.x.device)]
        if self.kv_latent is not None:
            masks.append(torch.ones(self.x.shape[0], self.kv_latent[0][0].shape[1], dtype=torch.bool,
                                    device=self.x.device))
        masks += [self.text_mask, self.speaker_mask[:, ::model.speaker_patch_size]]
        return torch.cat(masks, dim=1)


def timed_modulations(model: EchoDiT, calls: Sequence[ModelCall], out: Tensor | None = None) -> Tensor | None:
    """The AdaLN modulations of the calls' rows, in order, from the model's table by time (None when
    a call does not say its time: the model then computes them from t); written into `out` if given."""
    if any(c.time is None for c in calls):
        return None
    return model.timed_modulations([c.time for c in calls], [c.x.shape[0] for c in calls], out)


Steps = Generator[ModelCall, Tensor, Tensor]


def denoise_steps(conditioning: Conditioning, x_t: Tensor, settings: SamplerSettings, num_steps: int | None = None,
                  start_pos: int = 0, kv_latent: KVCache | None = None) -> Steps:
    """Integrate noise x_t (B, S, 80) float32 from t = 0.999 to 0 with guided Euler steps.

    A generator: yields each step's ModelCall, expects the velocity sent back, returns the latents.
    """
    dtype = conditioning.model.dtype
    num_steps = settings.num_steps if num_steps is None else num_steps
    batch = x_t.shape[0]
    schedule = time_schedule(num_steps)
    speaker_scaled = settings.speaker_kv_scale is not None
    guided_steps = 0
    kv_latent_batches: dict[int, KVCache] = {}
    for t, t_next in zip(schedule[:-1], schedule[1:]):
        guided = settings.cfg_min_t <= t <= settings.cfg_max_t
        branches = guidance_branches(settings.guidance, guided_steps) if guided else (COND,)
        guided_steps += guided
        text_mask, speaker_mask, kv_text, kv_speaker = conditioning.batch(branches, speaker_scaled)
        n = len(branches)
        if kv_latent is not None and n not in kv_latent_batches:
            kv_latent_batches[n] = repeat_kv(kv_latent, n)
        v = yield ModelCall(
            x=x_t.repeat(n, 1, 1).to(dtype),
            t=torch.full((batch * n,), t, dtype=torch.float32, device=x_t.device).to(dtype),
            start_pos=start_pos, text_mask=text_mask, speaker_mask=speaker_mask, kv_text=kv_text,
            kv_speaker=kv_speaker, kv_latent=None if kv_latent is None else kv_latent_batches[n], time=t)
        v = combine_guidance(settings.guidance, v.chunk(n), branches, settings.cfg_scale_text,
                             settings.cfg_scale_speaker) if guided else v
        if settings.rescale_k is not None and settings.rescale_sigma is not None:
            v = temporal_score_rescale(v, x_t, t, settings.rescale_k, settings.rescale_sigma)
        if speaker_scaled and settings.speaker_kv_min_t is not None and t_next < settings.speaker_kv_min_t <= t:
            speaker_scaled = False
        x_t = x_t + v * (t_next - t)
    return x_t


def drive(model: EchoDiT, steps: Steps, on_step: Callable[[], None] | None = None) -> Tensor:
    """Run a sampler generator to the end with direct model calls; returns its result.

    `on_step` is called before every step; raising from it abandons the generation (cancellation).
    """
    try:
        call = next(steps)
        while True:
            if on_step is not None:
                on_step()
            call = steps.send(call.run(model))
    except StopIteration as finished:
        return finished.value


def run_steps(model: EchoDiT, steps: Generator, on_step: Callable[[], None] | None = None,
              evaluate: Callable[[ModelCall], Tensor] | None = None) -> Iterator:
    """Drive a step generator with direct calls, yielding its outputs.

    A ModelCall is answered with the model's velocity (`evaluate(call)`, by default
    `call.run(model)`; after `on_step`, which may raise to abandon the generation); any other
    call (an object with `run()`) with its result; anything else the generator yields is an
    output, passed on (and answered with None).
    """
    item = next(steps, None)
    while item is not None:
        if isinstance(item, ModelCall):
            if on_step is not None:
                on_step()
            reply = item.run(model) if evaluate is None else evaluate(item)
        elif hasattr(item, "run"):
            reply = item.run()
        else:
            yield item
            reply = None
        item = resume(steps, reply)


def resume(steps: Generator, value):
    """Send `value` into a step generator; None once it has finished."""
    try:
        return steps.send(value)
    except StopIteration:
        return None


def denoise(conditioning: Conditioning, x_t: Tensor, settings: SamplerSettings, num_steps: int | None = None,
            on_step: Callable[[], None] | None = None) -> Tensor:
    """denoise_steps run with direct model calls."""
    return drive(conditioning.model, denoise_steps(conditioning, x_t, settings, num_steps), on_step)


def initial_noise(rng: torch.Generator, batch: int, length: int, truncation_factor: float | None,
                  device: torch.device) -> Tensor:
    """Gaussian noise (batch, length, 80), drawn in float32 from the request's own generator."""
    x = torch.randn((batch, length, LATENT_SIZE), device=device, dtype=torch.float32, generator=rng)
    return x * truncation_factor if truncation_factor is not None else x


def make_generator(seed: int, device: torch.device | str) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def _sample(model: EchoDiT, speaker_latent: Tensor, speaker_mask: Tensor, text_input_ids: Tensor, text_mask: Tensor,
            rng_seed: int, settings: SamplerSettings, sequence_length: int | None) -> Tensor:
    conditioning = Conditioning(model, speaker_latent, speaker_mask, text_input_ids, text_mask, settings)
    rng = make_generator(rng_seed, model.device)
    x_t = initial_noise(rng, text_input_ids.shape[0], sequence_length or MAX_SEQUENCE_LENGTH,
                        settings.truncation(), model.device)
    return denoise(conditioning, x_t, settings)


def _sampler(guidance: str, doc: str) -> Callable[..., Tensor]:
    @torch.inference_mode()
    def sampler(model: EchoDiT, speaker_latent: Tensor, speaker_mask: Tensor, text_input_ids: Tensor,
                text_mask: Tensor, rng_seed: int, num_steps: int, cfg_scale_text: float, cfg_scale_speaker: float,
                cfg_min_t: float, cfg_max_t: float, truncation_factor: float | None = None,
                rescale_k: float | None = None, rescale_sigma: float | None = None,
                speaker_kv_scale: float | None = None, speaker_kv_max_layers: int | None = None,
                speaker_kv_min_t: float | None = None, sequence_length: int | None = None) -> Tensor:
        settings = SamplerSettings(num_steps, cfg_scale_text, cfg_scale_speaker, cfg_min_t, cfg_max_t,
                                   truncation_factor, rescale_k, rescale_sigma, speaker_kv_scale,
                                   speaker_kv_max_layers, speaker_kv_min_t, guidance)
        return _sample(model, speaker_latent, speaker_mask, text_input_ids, text_mask, rng_seed, settings,
                       sequence_length)

    sampler.__doc__ = doc + "\n\nReturns latents (B, sequence_length, 80) float32; sequence_length defaults to 640."
    return sampler


sample_euler_cfg_independent_guidances = _sampler(
    "independent", "Euler sampling with separate text and speaker guidance: 3 model rows per guided step.")
sample_euler_cfg_joint_unconditional = _sampler(
    "joint", "Euler sampling with one joint unconditional branch scaled by cfg_text + cfg_speaker: 2 rows.")
sample_euler_cfg_apg_independent = _sampler(
    "apg", "Euler sampling with adaptive projected guidance on the text and speaker differences: 3 rows.")
sample_euler_cfg_alternating = _sampler(
    "alternating", "Euler sampling that alternates the text- and speaker-dropped branch per guided step: 2 rows.")

SampleFn = Callable[[EchoDiT, Tensor, Tensor, Tensor, Tensor, int], Tensor]


# ---------------------------------------------------------------------------------------------
# Pipeline


def no_speaker(length: int, device: torch.device | str, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Speaker latent and all-false mask for generation without a voice reference."""
    return (torch.zeros((1, length, LATENT_SIZE), device=device, dtype=dtype),
            torch.zeros((1, length), device=device, dtype=torch.bool))


@torch.inference_mode()
def sample_pipeline(model: EchoDiT, fish_ae: DAC, pca_state: PCAState, sample_fn: SampleFn, text_prompt: str,
                    speaker_audio: Tensor | None, rng_seed: int, pad_to_max_speaker_latent_length: int | None = None,
                    pad_to_max_text_length: int | None = None, normalize_text: bool = True) -> tuple[Tensor, str]:
    """Text (+ optional (1, samples) voice clip) -> audio (1, 1, samples) cropped at its end, normalised text."""
    device, dtype = model.device, model.dtype
    text_input_ids, text_mask, normalized = get_text_input_ids_and_mask(
        [text_prompt], max_length=min(pad_to_max_text_length or MAX_TEXT_LENGTH, MAX_TEXT_LENGTH), device=device,
        normalize=normalize_text, return_normalized_text=True, pad_to_max=pad_to_max_text_length is not None)
    if speaker_audio is None:
        speaker_latent, speaker_mask = no_speaker(pad_to_max_speaker_latent_length or 4, device, dtype)
    else:
        speaker_latent, speaker_mask = get_speaker_latent_and_mask(
            fish_ae, pca_state, speaker_audio.to(device=fish_ae.device, dtype=fish_ae.dtype),
            max_speaker_latent_length=pad_to_max_speaker_latent_length or MAX_SPEAKER_LATENT_LENGTH,
            pad_to_max=pad_to_max_speaker_latent_length is not None)
        speaker_latent, speaker_mask = speaker_latent.to(device), speaker_mask.to(device)
    latent = sample_fn(model, speaker_latent, speaker_mask, text_input_ids, text_mask, rng_seed)
    audio = ae_decode(fish_ae, pca_state, latent.to(fish_ae.device))
    return crop_audio_to_flattening_point(audio, latent[0]), normalized[0]

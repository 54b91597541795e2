"""Fish S1-DAC: the audio autoencoder whose quantised latents Echo-TTS generates.

One latent frame (``latent_dim`` channels) stands for ``frame_length`` = 2048 samples at 44.1 kHz:

    encode_zq:  audio (B, 1, T) -> causal conv encoder (hop 512) -> 2x (conv k2 s2 + ConvNeXt)
                -> pre_module (window transformer) -> semantic VQ + residual VQ
                -> sum of the chosen codebook rows through each out_proj: z_q (B, D, T / 2048)
    decode_zq:  z_q -> post_module (window transformer) -> 2x (transposed conv k2 s2 + ConvNeXt)
                -> causal conv decoder (upsample 512) -> tanh: audio (B, 1, 2048 * frames)

Every operation on the decode path is causal, so ``StreamingDecoder`` decodes consecutive latent
blocks exactly (to float rounding) by carrying, per stream, the left context of each convolution,
the post-module's key/value window and its RoPE position, all of fixed shapes from the first block
on (``StreamState.start``), so that ``engine.CompiledStreamDecoder`` can run every piece of a block
through the same graph.

Parameter names equal those of the published ``fish-s1-dac-min`` checkpoint, except that weights
stored weight-normalised (g, v) in the file are held folded into a plain ``weight`` here; use
``DAC.load_checkpoint`` (not ``load_state_dict``) to load a published-format file:

    with torch.device("meta"):          # optional: skips random init of ~390 M parameters
        ae = build_ae(**config_overrides)
    ae.load_checkpoint(safetensors.torch.load_file(path), source=str(path))
    ae = ae.to(device, dtype).eval()
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from typing import Protocol
from dataclasses import dataclass, field, fields, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from checkpoint import verify_state_dict

__all__ = [
    "DAC", "DACConfig", "DEFAULT_CONFIG", "StreamingDecoder", "StreamState", "TransformerConfig",
    "build_ae", "rope_table",
]

ENCODER_TRANSFORMER_WINDOW = 512
ENCODER_TRANSFORMER_POSITIONS = 16384  # rows of the stored encoder RoPE table
QUANTIZER_TRANSFORMER_POSITIONS = 4096  # rows of the stored pre/post-module RoPE tables
ROPE_BASE = 10000.0
NORM_EPS = 1e-5


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TransformerConfig:
    """The quantizer's pre/post window transformers (published values as defaults)."""

    n_layer: int = 8
    n_head: int = 16
    dim: int = 1024
    intermediate_size: int = 3072
    head_dim: int = 64
    window_size: int = 128


@dataclass(frozen=True)
class DACConfig:
    """Hyperparameters of the published Fish S1-DAC; keys match ``tiny_fish_dac_config.json``."""

    sample_rate: int = 44100
    encoder_dim: int = 64
    encoder_rates: tuple[int, ...] = (2, 4, 8, 8)
    latent_dim: int = 1024
    decoder_dim: int = 1536
    decoder_rates: tuple[int, ...] = (8, 8, 4, 2)
    n_codebooks: int = 9
    codebook_size: int = 1024
    codebook_dim: int = 8
    semantic_codebook_size: int = 4096
    causal: bool = True
    encoder_transformer_layers: tuple[int, ...] = (0, 0, 0, 4)
    # Listed in the published config, but the reference never runs a decoder transformer and
    # the checkpoint holds no weights for one: accepted for compatibility, otherwise unused.
    decoder_transformer_layers: tuple[int, ...] = (4, 0, 0, 0)
    downsample_factor: tuple[int, ...] = (2, 2)
    quantizer_transformer: TransformerConfig = field(default_factory=TransformerConfig)

    @classmethod
    def from_overrides(cls, **overrides) -> DACConfig:
        """Published defaults with ``overrides`` applied; unknown keys raise ``TypeError``."""
        known = {f.name for f in fields(cls)}
        for key in overrides:
            if key not in known:
                raise TypeError(f"unknown Fish S1-DAC config key {key!r}")
        values = {}
        for key, value in overrides.items():
            if key == "quantizer_transformer":
                if isinstance(value, Mapping):
                    sub_known = {f.name for f in fields(TransformerConfig)}
                    for sub in value:
                        if sub not in sub_known:
                            raise TypeError(f"unknown Fish S1-DAC config key 'quantizer_transformer.{sub}'")
                    value = replace(TransformerConfig(), **value)
                elif not isinstance(value, TransformerConfig):
                    raise TypeError("quantizer_transformer must be a mapping")
            elif isinstance(value, list):
                value = tuple(value)
            values[key] = value
        config = cls(**values)
        config.validate()
        return config

    def validate(self) -> None:
        if not self.causal:
            raise ValueError("only the causal Fish S1-DAC (causal=True) is supported")
        if len(self.encoder_transformer_layers) != len(self.encoder_rates):
            raise ValueError("encoder_transformer_layers needs one entry per encoder rate")
        if self.quantizer_transformer.dim != self.latent_dim:
            raise ValueError("quantizer_transformer.dim must equal latent_dim")

    @property
    def hop_length(self) -> int:
        """Audio samples per encoder frame (512)."""
        return math.prod(self.encoder_rates)

    @property
    def frame_length(self) -> int:
        """Audio samples per latent frame (2048)."""
        return self.hop_length * math.prod(self.downsample_factor)


def _as_json(config: DACConfig) -> dict:
    """The config as ``config.json`` spells it (lists, a nested dict)."""
    out = {}
    for f in fields(config):
        value = getattr(config, f.name)
        if isinstance(value, TransformerConfig):
            value = {g.name: getattr(value, g.name) for g in fields(value)}
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out


# The published hyperparameters, keyed as in config.json (every key ``build_ae`` accepts).
# Treat as read-only; ``build_ae(**DEFAULT_CONFIG)`` equals ``build_ae()``.
DEFAULT_CONFIG: dict = _as_json(DACConfig())


# --------------------------------------------------------------------------------------------
# Streaming state
# --------------------------------------------------------------------------------------------


@dataclass
class StreamState:
    """What a causal decode carries from one block of frames to the next (for a batch of streams).

    Keys are the modules that own each piece of state, each of a fixed shape from the start:
      context:  left input context of a causal (transposed) convolution, (B, C_in, p); zeros at
                the start of a stream, as the one-shot decode pads
      kv:       keys and values of the ``window - 1`` frames before the block of an attention
                layer, each (B, H, window - 1, head_dim), RoPE already applied; the slots of
                frames before frame 0 hold zeros and are masked
      position: (B,) int64, the absolute frame index of the next frame a window transformer sees
    Decoding replaces these tensors, never writes into them (snapshots rely on it). They are
    inference tensors, made and replaced under torch.inference_mode (a compiled decoder guards on
    the kind of its inputs).
    """

    context: dict[nn.Module, Tensor] = field(default_factory=dict)
    kv: dict[nn.Module, tuple[Tensor, Tensor]] = field(default_factory=dict)
    position: dict[nn.Module, Tensor] = field(default_factory=dict)

    @classmethod
    @torch.inference_mode()
    def start(cls, dac: DAC, batch: int) -> StreamState:
        """The state before frame 0 of `batch` streams, for every module of dac's decode path."""
        state, device, dtype = cls(), dac.device, dac.dtype
        for module in dac.decode_path_modules():
            if isinstance(module, CausalConv1d) and module.streamed_context:
                state.context[module] = torch.zeros(batch, module.conv.in_channels, module.streamed_context,
                                                    device=device, dtype=dtype)
            elif isinstance(module, CausalConvTranspose1d) and module.context:
                state.context[module] = torch.zeros(batch, module.conv.in_channels, module.context,
                                                    device=device, dtype=dtype)
            elif isinstance(module, WindowTransformer):
                state.position[module] = torch.zeros(batch, dtype=torch.long, device=device)
                for layer in module.layers:
                    attention = layer.attention
                    shape = (batch, attention.n_head, module.window - 1, attention.head_dim)
                    state.kv[attention] = (torch.zeros(shape, device=device, dtype=dtype),  # two tensors, as
                                           torch.zeros(shape, device=device, dtype=dtype))  # every later block's
        return state

    def copy(self) -> StreamState:
        """The same tensors in new dicts."""
        return StreamState(dict(self.context), dict(self.kv), dict(self.position))

    def cloned(self) -> StreamState:
        """New tensors (a CUDA graph's outputs are overwritten by its next replay)."""
        return StreamState({m: t.clone() for m, t in self.context.items()},
                           {m: (k.clone(), v.clone()) for m, (k, v) in self.kv.items()},
                           {m: t.clone() for m, t in self.position.items()})


def _kept(x: Tensor, frames: int, dim: int = -1) -> Tensor:
    """The last `frames` frames of x along `dim`, as a new contiguous tensor: a view would keep the
    whole block's activations alive, and every block's state gets the same strides (a compiled
    decoder guards on them)."""
    return x.narrow(dim, x.shape[dim] - frames, frames).clone(memory_format=torch.contiguous_format)


# --------------------------------------------------------------------------------------------
# Convolutions
# --------------------------------------------------------------------------------------------

_PARAMETRIZED = ("parametrizations.weight.original0", "parametrizations.weight.original1")
_LEGACY = ("weight_g", "weight_v")


def _stored_weight_normed(conv: nn.Module, legacy: bool = False) -> nn.Module:
    """Mark ``conv`` as stored weight-normalised: the checkpoint holds (g, v), not ``weight``."""
    conv.weight_norm_names = _LEGACY if legacy else _PARAMETRIZED
    return conv


class CausalConv1d(nn.Module):
    """Conv1d that sees only the past: pads ``(k-1)*d + 1 - stride`` zeros on the left and enough
    on the right that the output has ceil(T / stride) frames."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int, stride: int = 1, dilation: int = 1,
                 groups: int = 1, weight_norm: bool = True):
        super().__init__()
        self.conv = nn.Conv1d(c_in, c_out, kernel_size, stride=stride, dilation=dilation, groups=groups)
        if weight_norm:
            _stored_weight_normed(self.conv)
        self.stride = stride
        self.left_pad = (kernel_size - 1) * dilation + 1 - stride
        self.streamed_context = self.left_pad if stride == 1 else 0  # input frames a stream carries

    def forward(self, x: Tensor, state: StreamState | None = None) -> Tensor:
        # x: (B, C_in, T) -> (B, C_out, ceil(T / stride))
        if state is None:
            right_pad = -x.shape[-1] % self.stride
            return self.conv(F.pad(x, (self.left_pad, right_pad)))
        if self.stride != 1:
            raise NotImplementedError("streaming is implemented for stride-1 convolutions only")
        if self.left_pad == 0:
            return self.conv(x)
        x = torch.cat([state.context[self], x], dim=-1)  # (B, C_in, p + T); zeros before frame 0
        state.context[self] = _kept(x, self.left_pad)
        return self.conv(x)


class CausalConvTranspose1d(nn.Module):
    """ConvTranspose1d with ``k - stride`` output samples trimmed on the right.

    Output sample t then depends on inputs floor(t / stride) - j for j < k / stride only (for the
    k = 2 * stride used here: the current and the previous input frame), so it is causal and the
    trimmed tail is exactly the part that would depend on the next, not yet seen, input frame.
    """

    def __init__(self, c_in: int, c_out: int, kernel_size: int, stride: int, weight_norm: bool = True):
        super().__init__()
        self.conv = nn.ConvTranspose1d(c_in, c_out, kernel_size, stride=stride)
        if weight_norm:
            _stored_weight_normed(self.conv)
        self.stride = stride
        self.trim = kernel_size - stride
        # input frames of left context a block needs (exact when trim is a multiple of stride)
        self.context = -(-self.trim // stride)

    def forward(self, x: Tensor, state: StreamState | None = None) -> Tensor:
        # x: (B, C_in, T) -> (B, C_out, T * stride)
        n_out = x.shape[-1] * self.stride
        if state is None or self.context == 0:
            return self.conv(x)[..., :n_out]
        if self.trim % self.stride != 0:
            raise NotImplementedError("streaming needs kernel_size - stride divisible by stride")
        x = torch.cat([state.context[self], x], dim=-1)  # (B, C_in, c + T); a zero frame adds only the bias
        state.context[self] = _kept(x, self.context)
        start = self.context * self.stride  # outputs of the context frames were emitted before
        return self.conv(x)[..., start:start + n_out]


# --------------------------------------------------------------------------------------------
# DAC building blocks
# --------------------------------------------------------------------------------------------


class Snake1d(nn.Module):
    """x + sin^2(alpha x) / (alpha + 1e-9), one alpha per channel."""

    def __init__(self, channels: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(1, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        # x: (B, C, T); the reciprocal-then-multiply order follows the reference
        return x + (self.alpha + 1e-9).reciprocal() * torch.sin(self.alpha * x).pow(2)


class ResidualUnit(nn.Module):
    """x + conv1x1(snake(conv7_dilated(snake(x))))."""

    def __init__(self, dim: int, dilation: int):
        super().__init__()
        self.block = nn.ModuleList([
            Snake1d(dim),
            CausalConv1d(dim, dim, kernel_size=7, dilation=dilation),
            Snake1d(dim),
            CausalConv1d(dim, dim, kernel_size=1),
        ])

    def forward(self, x: Tensor, state: StreamState | None = None) -> Tensor:
        snake1, conv7, snake2, conv1 = self.block
        return x + conv1(snake2(conv7(snake1(x), state)), state)


class EncoderBlock(nn.Module):
    """Three residual units at dim/2, snake, strided conv to dim, optional window transformer."""

    def __init__(self, dim: int, stride: int, n_transformer_layers: int):
        super().__init__()
        half = dim // 2
        layers: list[nn.Module] = [ResidualUnit(half, d) for d in (1, 3, 9)]
        layers += [Snake1d(half), CausalConv1d(half, dim, kernel_size=2 * stride, stride=stride)]
        if n_transformer_layers > 0:
            layers.append(WindowTransformer(
                TransformerConfig(n_layer=n_transformer_layers, n_head=dim // 64, dim=dim,
                                  intermediate_size=3 * dim, head_dim=64,
                                  window_size=ENCODER_TRANSFORMER_WINDOW),
                max_positions=ENCODER_TRANSFORMER_POSITIONS,
            ))
        self.block = nn.ModuleList(layers)

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.block:
            x = layer(x)
        return x


class Encoder(nn.Module):
    def __init__(self, config: DACConfig):
        super().__init__()
        dim = config.encoder_dim
        layers: list[nn.Module] = [CausalConv1d(1, dim, kernel_size=7)]
        for stride, n_layers in zip(config.encoder_rates, config.encoder_transformer_layers):
            dim *= 2
            layers.append(EncoderBlock(dim, stride, n_layers))
        layers += [Snake1d(dim), CausalConv1d(dim, config.latent_dim, kernel_size=3)]
        self.block = nn.ModuleList(layers)

    def forward(self, x: Tensor) -> Tensor:
        # x: (B, 1, T) -> (B, latent_dim, T / hop_length)
        for layer in self.block:
            x = layer(x)
        return x


class DecoderBlock(nn.Module):
    """Snake, causal transposed conv (k = 2 * stride) to the output width, three residual units."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.block = nn.ModuleList([
            Snake1d(c_in),
            CausalConvTranspose1d(c_in, c_out, kernel_size=2 * stride, stride=stride),
            ResidualUnit(c_out, 1),
            ResidualUnit(c_out, 3),
            ResidualUnit(c_out, 9),
        ])

    def forward(self, x: Tensor, state: StreamState | None = None) -> Tensor:
        snake, upsample, *units = self.block
        x = upsample(snake(x), state)
        for unit in units:
            x = unit(x, state)
        return x


class Decoder(nn.Module):
    def __init__(self, config: DACConfig):
        super().__init__()
        channels = config.decoder_dim
        layers: list[nn.Module] = [CausalConv1d(config.latent_dim, channels, kernel_size=7)]
        for i, stride in enumerate(config.decoder_rates):
            layers.append(DecoderBlock(channels // 2**i, channels // 2 ** (i + 1), stride))
        out_dim = channels // 2 ** len(config.decoder_rates)
        layers += [Snake1d(out_dim), CausalConv1d(out_dim, 1, kernel_size=7)]
        self.model = nn.ModuleList(layers)

    def forward(self, x: Tensor, state: StreamState | None = None) -> Tensor:
        # x: (B, latent_dim, T) -> (B, 1, T * prod(rates))
        conv_in, *blocks, snake, conv_out = self.model
        x = conv_in(x, state)
        for block in blocks:
            x = block(x, state)
        return torch.tanh(conv_out(snake(x), state))


class ConvNeXtBlock(nn.Module):
    """x + gamma * pwconv2(gelu(pwconv1(layernorm(causal_depthwise_conv7(x)))))."""

    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = CausalConv1d(dim, dim, kernel_size=7, groups=dim, weight_norm=False)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), 1e-6))

    def forward(self, x: Tensor, state: StreamState | None = None) -> Tensor:
        # x: (B, C, T)
        h = self.dwconv(x, state).transpose(1, 2)  # (B, T, C)
        h = self.pwconv2(F.gelu(self.pwconv1(self.norm(h))))
        return x + (self.gamma * h).transpose(1, 2)


# --------------------------------------------------------------------------------------------
# Window-limited causal transformer (pre/post module, encoder stage)
# --------------------------------------------------------------------------------------------


def rope_table(end: int, head_dim: int, start: int = 0) -> Tensor:
    """RoPE (cos, sin) of interleaved pairs for positions [start, end): (end - start, head_dim/2, 2).

    Rounded through BF16 like the tables stored in the published checkpoint, returned in float32.
    """
    inv_freq = 1.0 / (ROPE_BASE ** (torch.arange(0, head_dim, 2).float() / head_dim))
    angles = torch.outer(torch.arange(start, end).float(), inv_freq)
    # via torch.polar, as the reference builds it: bit-identical to the stored tables
    rotations = torch.polar(torch.ones_like(angles), angles)
    return torch.stack([rotations.real, rotations.imag], dim=-1).to(torch.bfloat16).float()


def apply_rope(x: Tensor, freqs: Tensor) -> Tensor:
    # x: (B, T, H, D), freqs: (T, D/2, 2) or per row (B, T, D/2, 2) -> (B, T, H, D); rotated in float32
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)
    freqs = freqs if freqs.dim() == 4 else freqs[None]
    cos = freqs[:, :, None, :, 0]
    sin = freqs[:, :, None, :, 1]
    x0, x1 = pairs[..., 0], pairs[..., 1]
    out = torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], dim=-1)
    return out.flatten(3).type_as(x)


def window_mask(n_query: int, n_key: int, window: int, device: torch.device) -> Tensor:
    """(n_query, n_key) bool: the queries are the last n_query of the n_key frames; query i sees
    keys i - window + 1 .. i."""
    q = torch.arange(n_key - n_query, n_key, device=device)[:, None]
    k = torch.arange(n_key, device=device)[None, :]
    return (k <= q) & (k > q - window)


def streamed_window_mask(n_query: int, window: int, position: Tensor) -> Tensor:
    """(B, 1, n_query, window - 1 + n_query) bool for a block whose first frame is `position` (B,):
    the keys are the window - 1 frames before the block, then its own; query i sees keys
    i .. i + window - 1 (window_mask's frames), except slots before frame 0, which do not exist."""
    past = window - 1
    k = torch.arange(past + n_query, device=position.device)
    band = (k[None, :] >= k[:n_query, None]) & (k[None, :] <= k[:n_query, None] + past)  # (n_query, K)
    exists = k[None, :] >= (past - position)[:, None]  # (B, K)
    return (band[None] & exists[:, None])[:, None]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = NORM_EPS):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(torch.mean(xf * xf, dim=-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


class LayerScale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), 1e-2))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class Attention(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.n_head, self.head_dim = config.n_head, config.head_dim
        inner = config.n_head * config.head_dim
        self.wqkv = nn.Linear(config.dim, 3 * inner, bias=False)
        self.wo = nn.Linear(inner, config.dim, bias=False)

    def forward(self, x: Tensor, freqs: Tensor, mask: Tensor, state: StreamState | None = None) -> Tensor:
        # x: (B, T, dim), freqs: (T, head_dim/2, 2) or (B, T, head_dim/2, 2); mask: window_mask's
        # (T, T), or streamed_window_mask's (B, 1, T, window - 1 + T) with `state`
        B, T, _ = x.shape
        q, k, v = self.wqkv(x).view(B, T, 3, self.n_head, self.head_dim).unbind(2)
        q = apply_rope(q, freqs).transpose(1, 2)  # (B, H, T, D)
        k = apply_rope(k, freqs).transpose(1, 2)
        v = v.transpose(1, 2)
        if state is not None:
            past_k, past_v = state.kv[self]  # (B, H, window - 1, D)
            k = torch.cat([past_k, k], dim=2)  # (B, H, window - 1 + T, D)
            v = torch.cat([past_v, v], dim=2)
            keep = past_k.shape[2]
            state.kv[self] = (_kept(k, keep, dim=2), _kept(v, keep, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, T, D)
        return self.wo(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.w1 = nn.Linear(config.dim, config.intermediate_size, bias=False)
        self.w3 = nn.Linear(config.dim, config.intermediate_size, bias=False)
        self.w2 = nn.Linear(config.intermediate_size, config.dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.attention = Attention(config)
        self.feed_forward = FeedForward(config)
        self.ffn_norm = RMSNorm(config.dim)
        self.attention_norm = RMSNorm(config.dim)
        self.attention_layer_scale = LayerScale(config.dim)
        self.ffn_layer_scale = LayerScale(config.dim)

    def forward(self, x: Tensor, freqs: Tensor, mask: Tensor, state: StreamState | None = None) -> Tensor:
        h = x + self.attention_layer_scale(self.attention(self.attention_norm(x), freqs, mask, state))
        return h + self.ffn_layer_scale(self.feed_forward(self.ffn_norm(h)))


class WindowTransformer(nn.Module):
    """Pre-norm causal transformer in which frame i attends to frames i - window + 1 .. i, with
    RoPE at absolute positions from 0. Channels-first in and out: (B, dim, T)."""

    def __init__(self, config: TransformerConfig, max_positions: int):
        super().__init__()
        self.window = config.window_size
        self.head_dim = config.head_dim
        self.max_positions = max_positions
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.dim)
        # Replaced by the checkpoint's BF16 table on load (held in float32).
        self.register_buffer("freqs_cis", rope_table(max_positions, config.head_dim))
        self._streamed_table: Tensor | None = None  # rope_rows' table, on freqs_cis's device
        self._streamed_source: Tensor | None = None  # the freqs_cis it was made from

    def rope(self, start: int, length: int) -> Tensor:
        """Rows [start, start + length) of the RoPE table: (length, head_dim/2, 2).

        Past the stored table (the reference would fail there) rows come from the same formula.
        """
        end = start + length
        table = self.freqs_cis
        if end > table.shape[0]:
            extra = rope_table(end, self.head_dim, start=table.shape[0])
            table = torch.cat([table, extra.to(table.device, table.dtype)])
        return table[start:end]

    def rope_rows(self, end: int) -> None:
        """Make the table streaming reads by position (`_streamed_table`) hold rows [0, end) (done on
        the host before a block: positions are tensors there). Rows past the stored table come from
        the same formula, as in `rope`."""
        table = self._streamed_table
        if table is None or table.shape[0] < end or self._streamed_source is not self.freqs_cis:
            rows = max(end, self.max_positions, 2 * (0 if table is None else table.shape[0]))
            self._streamed_table, self._streamed_source = self.rope(0, rows), self.freqs_cis

    def forward(self, x: Tensor, state: StreamState | None = None) -> Tensor:
        # x: (B, dim, T) -> (B, dim, T)
        length = x.shape[-1]
        if state is None:
            freqs, mask = self.rope(0, length), window_mask(length, length, self.window, x.device)
        else:
            position = state.position[self]  # (B,)
            freqs = self._streamed_table[position[:, None] + torch.arange(length, device=x.device)]
            mask = streamed_window_mask(length, self.window, position)
            state.position[self] = position + length
        x = x.transpose(1, 2)
        for layer in self.layers:
            x = layer(x, freqs, mask, state)
        return self.norm(x).transpose(1, 2)


# --------------------------------------------------------------------------------------------
# Quantizer
# --------------------------------------------------------------------------------------------


class VectorQuantize(nn.Module):
    """Factorised VQ: project to codebook_dim, pick the nearest L2-normalised code."""

    def __init__(self, dim: int, codebook_size: int, codebook_dim: int):
        super().__init__()
        self.codebook_size = codebook_size
        self.in_proj = _stored_weight_normed(nn.Conv1d(dim, codebook_dim, 1), legacy=True)
        self.out_proj = _stored_weight_normed(nn.Conv1d(codebook_dim, dim, 1), legacy=True)
        self.codebook = nn.Embedding(codebook_size, codebook_dim)

    def quantize(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """z: (B, dim, T) -> (codes (B, T), quantised z (B, dim, T)) as the residual stack sees it."""
        z_e = self.in_proj(z)  # (B, d, T)
        B, d, T = z_e.shape
        enc = F.normalize(z_e.transpose(1, 2).reshape(B * T, d))
        book = F.normalize(self.codebook.weight)
        # squared distance written out as the reference does, so near-ties break the same way
        dist = enc.pow(2).sum(1, keepdim=True) - 2 * enc @ book.t() + book.pow(2).sum(1, keepdim=True).t()
        codes = (-dist).max(1).indices.view(B, T)
        rows = self.decode_code(codes)
        # The reference passes z_e + (rows - z_e) (a straight-through estimator) to out_proj;
        # that is rows up to rounding, and the rounding feeds the next residual's code choice.
        return codes, self.out_proj(z_e + (rows - z_e))

    def decode_code(self, codes: Tensor) -> Tensor:
        # codes: (B, T) -> raw codebook rows (B, d, T)
        return F.embedding(codes, self.codebook.weight).transpose(1, 2)


class ResidualVectorQuantize(nn.Module):
    def __init__(self, dim: int, n_codebooks: int, codebook_size: int, codebook_dim: int):
        super().__init__()
        self.codebook_size = codebook_size
        self.quantizers = nn.ModuleList(
            VectorQuantize(dim, codebook_size, codebook_dim) for _ in range(n_codebooks)
        )

    def encode(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """z: (B, dim, T) -> (codes (B, n_codebooks, T), sum of quantised parts (B, dim, T))."""
        residual, total, codes = z, torch.zeros_like(z), []
        for quantizer in self.quantizers:
            codes_i, z_q_i = quantizer.quantize(residual)
            total = total + z_q_i
            residual = residual - z_q_i
            codes.append(codes_i)
        return torch.stack(codes, dim=1), total

    def from_codes(self, codes: Tensor) -> Tensor:
        """codes: (B, n, T) -> sum over codebooks of out_proj(codebook row): (B, dim, T)."""
        z_q = 0.0
        for i in range(codes.shape[1]):
            quantizer = self.quantizers[i]
            z_q = z_q + quantizer.out_proj(quantizer.decode_code(codes[:, i]))
        return z_q


class DownsampleResidualVectorQuantize(nn.Module):
    def __init__(self, config: DACConfig):
        super().__init__()
        dim = config.latent_dim
        self.semantic_quantizer = ResidualVectorQuantize(
            dim, 1, config.semantic_codebook_size, config.codebook_dim)
        self.quantizer = ResidualVectorQuantize(
            dim, config.n_codebooks, config.codebook_size, config.codebook_dim)
        # [conv k=f stride=f, ConvNeXt] per factor; upsampling mirrors it (these are not weight-normed)
        self.downsample = nn.ModuleList(
            nn.ModuleList([CausalConv1d(dim, dim, f, stride=f, weight_norm=False), ConvNeXtBlock(dim)])
            for f in config.downsample_factor
        )
        self.upsample = nn.ModuleList(
            nn.ModuleList([
                CausalConvTranspose1d(dim, dim, f, stride=f, weight_norm=False), ConvNeXtBlock(dim)])
            for f in reversed(config.downsample_factor)
        )
        self.pre_module = WindowTransformer(config.quantizer_transformer, QUANTIZER_TRANSFORMER_POSITIONS)
        self.post_module = WindowTransformer(config.quantizer_transformer, QUANTIZER_TRANSFORMER_POSITIONS)

    def encode(self, z: Tensor) -> Tensor:
        """Encoder output (B, dim, T) -> codes (B, 1 + n_codebooks, T / prod(downsample_factor))."""
        for conv, block in self.downsample:
            z = block(conv(z))
        z = self.pre_module(z)
        semantic_codes, semantic_z = self.semantic_quantizer.encode(z)
        residual_codes, _ = self.quantizer.encode(z - semantic_z)
        return torch.cat([semantic_codes, residual_codes], dim=1)

    def from_codes(self, codes: Tensor) -> Tensor:
        """codes (B, 1 + n_codebooks, T) -> z_q (B, dim, T); out-of-range codes are clamped."""
        semantic = codes[:, :1].clamp(max=self.semantic_quantizer.codebook_size - 1)
        residual = codes[:, 1:].clamp(max=self.quantizer.codebook_size - 1)
        return self.semantic_quantizer.from_codes(semantic) + self.quantizer.from_codes(residual)

    def decode(self, z_q: Tensor, state: StreamState | None = None) -> Tensor:
        """z_q (B, dim, T) -> decoder input (B, dim, T * prod(downsample_factor))."""
        z = self.post_module(z_q, state)
        for conv, block in self.upsample:
            z = block(conv(z, state), state)
        return z


# --------------------------------------------------------------------------------------------
# Top level
# --------------------------------------------------------------------------------------------


def _fold_weight_norm(g: Tensor, v: Tensor) -> Tensor:
    """weight = g * v / ||v||, the norm taken over every dim but 0 (also for transposed convs,
    whose g is (C_in, 1, 1))."""
    g, v = g.float(), v.float()
    norm = torch.linalg.vector_norm(v, dim=tuple(range(1, v.dim())), keepdim=True)
    return v * (g / norm)


class DAC(nn.Module):
    """The Fish S1-DAC autoencoder (inference only)."""

    def __init__(self, config: DACConfig):
        super().__init__()
        self.config = config
        self.sample_rate = config.sample_rate
        self.latent_dim = config.latent_dim
        self.frame_length = config.frame_length  # audio samples per latent frame
        self.encoder = Encoder(config)
        self.quantizer = DownsampleResidualVectorQuantize(config)
        self.decoder = Decoder(config)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    # ---- encode ----------------------------------------------------------------------------

    @torch.no_grad()
    def encode_codes(self, audio: Tensor) -> Tensor:
        """audio (B, 1, T) or (B, T) -> codes (B, 1 + n_codebooks, ceil(T / frame_length)).

        The audio is zero-padded on the right to a whole number of latent frames.
        """
        if audio.dim() == 2:
            audio = audio.unsqueeze(1)
        audio = F.pad(audio, (0, -audio.shape[-1] % self.frame_length))
        return self.quantizer.encode(self.encoder(audio))

    @torch.no_grad()
    def codes_to_zq(self, codes: Tensor) -> Tensor:
        """codes (B, 1 + n_codebooks, T) -> z_q (B, latent_dim, T)."""
        return self.quantizer.from_codes(codes)

    @torch.no_grad()
    def encode_zq(self, audio: Tensor) -> Tensor:
        """audio (B, 1, T) -> z_q (B, latent_dim, ceil(T / 2048)): the summed codebook vectors,
        before the post-module; this is what Echo's PCA and decode_zq work on."""
        return self.codes_to_zq(self.encode_codes(audio))

    # ---- decode ----------------------------------------------------------------------------

    def _decode(self, z_q: Tensor, state: StreamState | None = None) -> Tensor:
        # z_q: (B, latent_dim, T) -> audio (B, 1, T * frame_length)
        return self.decoder(self.quantizer.decode(z_q, state), state)

    @torch.no_grad()
    def decode_zq(self, z_q: Tensor) -> Tensor:
        """z_q (B, latent_dim, T) -> audio (B, 1, T * 2048) in [-1, 1]."""
        return self._decode(z_q)

    def streaming_decoder(self, batch_size: int = 1, max_frames: int | None = None,
                          compiled: PieceDecoder | None = None) -> StreamingDecoder:
        """A decoder for one batch of streams fed consecutive latent blocks; see StreamingDecoder."""
        return StreamingDecoder(self, batch_size, max_frames, compiled)

    def decode_path_modules(self) -> list[nn.Module]:
        """Every module a streamed decode runs through (the state's owners)."""
        return [*self.quantizer.post_module.modules(), *self.quantizer.upsample.modules(), *self.decoder.modules()]

    # ---- checkpoint ------------------------------------------------------------------------

    def _weight_normed(self) -> dict[str, tuple[str, str]]:
        """Module name -> (g, v) suffixes, for modules whose file form is weight-normalised."""
        return {
            name: module.weight_norm_names
            for name, module in self.named_modules()
            if hasattr(module, "weight_norm_names")
        }

    def checkpoint_shapes(self, optional_present: Collection[str] = ()) -> dict[str, tuple[int, ...]]:
        """Names and shapes of the published file's tensors for this configuration.

        The ``causal_mask`` buffers (unused: the window mask is computed) are optional; the ones
        named in ``optional_present`` are expected with their (positions, positions) shape.
        """
        weight_normed = self._weight_normed()
        expected: dict[str, tuple[int, ...]] = {}
        for name, tensor in self.state_dict(keep_vars=True).items():
            module_name, _, leaf = name.rpartition(".")
            if leaf == "weight" and module_name in weight_normed:
                g_name, v_name = weight_normed[module_name]
                shape = tuple(tensor.shape)
                expected[f"{module_name}.{g_name}"] = (shape[0],) + (1,) * (len(shape) - 1)
                expected[f"{module_name}.{v_name}"] = shape
            else:
                expected[name] = tuple(tensor.shape)
        for name, module in self.named_modules():
            mask_name = f"{name}.causal_mask"
            if isinstance(module, WindowTransformer) and mask_name in optional_present:
                expected[mask_name] = (module.max_positions, module.max_positions)
        return expected

    def load_checkpoint(self, state: Mapping[str, Tensor], source: str = "Fish S1-DAC checkpoint") -> None:
        """Load a state dict exactly as stored in the published ``pytorch_model.safetensors``.

        Names and shapes are checked strictly (``checkpoint.CheckpointError`` names every missing,
        unexpected or mis-shaped tensor); weight norm is folded into plain weights; everything is
        held in float32 on the device of ``state``. Works for a model built on the ``meta``
        device (tensors are assigned, not copied) as well as one built on CPU. Move the module
        with ``.to(device, dtype)`` afterwards.
        """
        optional = {k for k in state if k.endswith(".causal_mask")}
        verify_state_dict(self.checkpoint_shapes(optional), state, source)
        weight_normed = self._weight_normed()
        folded: dict[str, Tensor] = {}
        for name in self.state_dict(keep_vars=True):
            module_name, _, leaf = name.rpartition(".")
            if leaf == "weight" and module_name in weight_normed:
                g_name, v_name = weight_normed[module_name]
                g, v = state[f"{module_name}.{g_name}"], state[f"{module_name}.{v_name}"]
                folded[name] = _fold_weight_norm(g, v)
            else:
                folded[name] = state[name].float()  # includes the BF16 RoPE tables
        self.load_state_dict(folded, strict=True, assign=True)


class PieceDecoder(Protocol):
    """Decodes one piece of exactly `frames` latent frames through a streaming decoder's state."""

    frames: int

    def __call__(self, dac: DAC, piece: Tensor, decoder: StreamingDecoder) -> Tensor: ...


class StreamingDecoder:
    """Exact block-by-block ``decode_zq`` for a batch of streams.

    ``decode(z_q_block)`` takes the next (B, latent_dim, n) frames, any n >= 0, and returns their
    (B, 1, n * 2048) samples; concatenated, the outputs equal one ``decode_zq`` of all frames up to
    float rounding. Work per call is proportional to n: the state is the left context of every
    causal convolution, each post-module layer's last ``window - 1`` keys/values and the RoPE
    position. Positions continue past the published 4096-frame RoPE table (computed rows).
    ``frames`` counts the latent frames decoded so far; ``reset()`` starts a new stream.

    ``max_frames`` splits longer blocks into pieces of at most that many frames (the result is the
    same, the state carries across them). On CPUs this is several times faster for long blocks:
    the convolutions at audio rate then work on tensors that fit in cache (measured: 640 frames of
    the small reference DAC in 64-frame pieces took a quarter of the time of one call).
    ``compiled`` (ECHO_COMPILE: engine.CompiledStreamDecoder) decodes a block in pieces of its fixed
    length through its graphs instead; what is left over (fewer frames than a piece) runs eager.
    """

    def __init__(self, dac: DAC, batch_size: int = 1, max_frames: int | None = None,
                 compiled: PieceDecoder | None = None, state: StreamState | None = None, frames: int = 0):
        self.dac = dac
        self.batch_size = batch_size
        self.max_frames = max_frames
        self.compiled = compiled
        if state is None:
            self.reset()
        else:  # streams merged mid-way (decode_streams)
            self.state, self.frames = state, frames

    def reset(self) -> None:
        """Start a new stream (the next block is frame 0)."""
        self.state = StreamState.start(self.dac, self.batch_size)
        self.frames = 0

    @torch.inference_mode()
    def decode(self, z_q_block: Tensor) -> Tensor:
        # z_q_block: (B, latent_dim, n) -> (B, 1, n * frame_length)
        if z_q_block.dim() != 3 or z_q_block.shape[0] != self.batch_size:
            raise ValueError(f"expected a (batch={self.batch_size}, latent_dim, frames) block, "
                             f"got {tuple(z_q_block.shape)}")
        n = z_q_block.shape[-1]
        if n == 0:
            return z_q_block.new_zeros(self.batch_size, 1, 0)
        self.dac.quantizer.post_module.rope_rows(self.frames + n)
        if self.compiled is not None:
            size = self.compiled.frames
            pieces = [self.compiled(self.dac, z_q_block[..., i:i + size], self) for i in range(0, n - size + 1, size)]
            whole = len(pieces) * size
            rest = z_q_block[..., whole:].split(self.max_frames or n, dim=-1) if whole < n else ()
            audio = torch.cat(pieces + [self.dac._decode(piece, self.state) for piece in rest], dim=-1)
        else:
            audio = torch.cat([self.dac._decode(piece, self.state)
                               for piece in z_q_block.split(self.max_frames or n, dim=-1)], dim=-1)
        self.frames += n
        return audio

    def snapshot(self) -> tuple[StreamState, int]:
        """The stream's state as it is now (decoding replaces its tensors, never changes them)."""
        return self.state.copy(), self.frames

    def restore(self, snapshot: tuple[StreamState, int]) -> None:
        """Put the stream back to a snapshot: the next block continues from there."""
        state, self.frames = snapshot
        self.state = state.copy()

    def kv_window_lengths(self) -> list[int]:
        """Frames of keys/values held per attention layer (at most window - 1)."""
        return [k.shape[2] for k, _ in self.state.kv.values()]


@torch.inference_mode()
def decode_streams(decoders: Sequence[StreamingDecoder], blocks: Sequence[Tensor], batch: bool = True,
                   max_batch_frames: int | None = None) -> list[Tensor]:
    """The next block of each of several independent streams, decoded together where possible.

    Streams that have decoded the same number of frames and get blocks of the same length hold
    state of identical shapes (and RoPE positions), so their states are stacked along the batch,
    decoded in one call and split back. Each result equals that stream's own ``decode``. With
    ``batch=False`` every stream is decoded on its own (faster on CPUs, where the decoder is
    compute bound and larger tensors only cost cache misses). ``max_batch_frames`` caps the latent
    frames of one call (streams x block length): the decoder's activations at the audio rate grow
    with it (64 streams' 480-frame blocks in one call wanted a 22.5 GiB tensor on an H100).
    All or nothing: if a call fails (out of device memory), every stream's decoder is left as it was.
    """
    before = [decoder.snapshot() for decoder in decoders]
    try:
        return _decode_streams(decoders, blocks, batch, max_batch_frames)
    except BaseException:
        for decoder, snapshot in zip(decoders, before):
            decoder.restore(snapshot)
        raise


def _decode_streams(decoders: Sequence[StreamingDecoder], blocks: Sequence[Tensor], batch: bool,
                    max_batch_frames: int | None) -> list[Tensor]:
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (decoder, block) in enumerate(zip(decoders, blocks)):  # (same frames: same RoPE rows to make)
        groups.setdefault((decoder.frames, block.shape[-1]) if batch else (i,), []).append(i)
    out: list[Tensor | None] = [None] * len(decoders)
    for members in _capped(groups, blocks, max_batch_frames):
        if len(members) == 1:
            out[members[0]] = decoders[members[0]].decode(blocks[members[0]])
            continue
        parts = [decoders[i] for i in members]
        sizes = [d.batch_size for d in parts]
        merged = StreamingDecoder(parts[0].dac, sum(sizes), parts[0].max_frames, parts[0].compiled, StreamState(
            context={m: torch.cat([d.state.context[m] for d in parts]) for m in parts[0].state.context},
            kv={m: tuple(torch.cat([d.state.kv[m][j] for d in parts]) for j in (0, 1)) for m in parts[0].state.kv},
            position={m: torch.cat([d.state.position[m] for d in parts]) for m in parts[0].state.position},
        ), parts[0].frames)
        audio = merged.decode(torch.cat([blocks[i] for i in members]))
        for index, (i, decoder) in enumerate(zip(members, parts)):
            decoder.state = StreamState(
                context={m: t.split(sizes)[index].clone() for m, t in merged.state.context.items()},
                kv={m: tuple(t.split(sizes)[index].clone() for t in kv) for m, kv in merged.state.kv.items()},
                position={m: t.split(sizes)[index].clone() for m, t in merged.state.position.items()},
            )
            decoder.frames = merged.frames
        for i, part in zip(members, audio.split(sizes)):
            out[i] = part
    return out


def _capped(groups: dict[tuple[int, ...], list[int]], blocks: Sequence[Tensor],
            max_batch_frames: int | None) -> list[list[int]]:
    """Each group split into runs whose blocks add up to at most `max_batch_frames` frames."""
    if max_batch_frames is None:
        return list(groups.values())
    runs = []
    for members in groups.values():
        size = max(1, max_batch_frames // max(1, blocks[members[0]].shape[-1]))
        runs += [members[i:i + size] for i in range(0, len(members), size)]
    return runs


def build_ae(**overrides) -> DAC:
    """The published Fish S1-DAC; ``overrides`` use the keys of ``tiny_fish_dac_config.json``
    (``quantizer_transformer`` may be partial). Unknown keys raise ``TypeError``.

    Parameters are randomly initialised; build under ``torch.device("meta")`` to skip that, then
    call ``DAC.load_checkpoint``.
    """
    return DAC(DACConfig.from_overrides(**overrides))

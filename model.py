"""EchoDiT: the Echo-TTS diffusion transformer.

Parameter names equal the published checkpoint's (`jordand/echo-tts-base`). Shapes in comments use
B batch, S latent frames of the block being generated, T text tokens, P speaker patches, Q prefix
patches, H heads, D head size. Latent frames are grouped in patches of `speaker_patch_size` (4)
for the speaker and latent-prefix encoders.

The conditioning (text, speaker, latent prefix) is turned into per-layer key/value caches once per
generation; each diffusion step then runs only the decoder blocks over the noisy latents.
"""

from __future__ import annotations

import math
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

KVCache = list[tuple[Tensor, Tensor]]  # one (keys, values) pair per decoder block, each (B, N, H, D)
# EchoDiT.extend_patches' signature: (whole-patch frames, encoder keys/values, DiT keys/values) -> both extended
PatchEncoding = Callable[[Tensor, KVCache, KVCache], tuple[KVCache, KVCache]]


def cat_kv(first: KVCache, second: KVCache) -> KVCache:
    """Per layer, the keys/values of `first` followed by those of `second` (along the sequence)."""
    return [(torch.cat([k1, k2], dim=1), torch.cat([v1, v2], dim=1)) for (k1, v1), (k2, v2) in zip(first, second)]


@dataclass(frozen=True)
class RowGroup:
    """The rows of one generation inside a batched forward pass, with one layer's keys and values.

    A batch holds generations of one frame count S but of different prefix, text and speaker
    lengths. Linear layers do not mind; attention over padded keys would sum in another order and
    round differently, so each group attends over exactly its own keys, in the order [self, prefix,
    text, speaker], and gets bit-for-bit what the generation computes alone. The keys/values live
    in a buffer (rows, S + Q + T + P, H, D) whose prefix, text and speaker part is written when the
    group is laid out (batched_steps.py); each forward pass writes only the S self keys in front.
    """

    rows: slice
    mask: Tensor  # (rows, 1, 1, S + Q + T + P): True = may attend
    keys: Tensor  # (rows, H, S + Q + T + P, D): the buffer, transposed for SDPA
    values: Tensor  # (rows, H, S + Q + T + P, D)
    self_keys: Tensor  # (rows, S, H, D): the buffer's first S positions
    self_values: Tensor  # (rows, S, H, D)

    @classmethod
    def over(cls, rows: slice, key_mask: Tensor, keys: Tensor, values: Tensor, frames: int) -> RowGroup:
        """A group attending over buffers keys, values (rows, S + Q + T + P, H, D) under key_mask."""
        return cls(rows, row_mask(key_mask), keys.transpose(1, 2), values.transpose(1, 2), keys[:, :frames],
                   values[:, :frames])


# ---------------------------------------------------------------------------------------------
# Rotary position embedding on interleaved pairs, computed in float32.


def rope_angles(positions: Tensor, head_dim: int, theta: float = 10000.0) -> tuple[Tensor, Tensor]:
    """cos and sin of the rotation angles, each (..., head_dim // 2), for integer positions (...)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device)[: head_dim // 2] / head_dim))
    angles = positions.to(torch.float32)[..., None] * inv_freq
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate consecutive pairs of x (B, N, H, D) by angles cos/sin of shape (N, D/2) or (B, N, D/2)."""
    if cos.ndim == 2:
        cos, sin = cos[None], sin[None]
    cos, sin = cos[:, :, None], sin[:, :, None]  # (B|1, N, 1, D/2)
    pairs = x.float().unflatten(-1, (-1, 2))
    a, b = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1)
    return rotated.flatten(-2).type_as(x)


def apply_rope_half_heads(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """RoPE on the first half of the heads only (EchoDiT's joint attention), x (B, N, H, D)."""
    rotated, plain = x.chunk(2, dim=-2)
    return torch.cat([apply_rope(rotated, cos, sin), plain], dim=-2)


# ---------------------------------------------------------------------------------------------
# Building blocks


class RMSNorm(nn.Module):
    """RMSNorm over the last dimension, computed in float32; weight may be (dim,) or (heads, dim)."""

    def __init__(self, shape: int | tuple[int, ...], eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(shape))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return (x32 * self.weight).to(x.dtype)


def timestep_embedding(t: Tensor, size: int) -> Tensor:
    """Sinusoidal embedding (B,) -> (B, size): [cos(t f), sin(t f)], f_i = 1000 * 10000^(-i/half)."""
    half = size // 2
    freqs = 1000 * torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[..., None] * freqs
    return torch.cat([args.cos(), args.sin()], dim=-1).to(t.dtype)


COND_ROWS = 64
MODULATION_TABLE_SIZE = 256  # times EchoDiT.timed_modulations keeps (0.6 MB each at full size in bf16)


def in_fixed_row_blocks(fn, rows: Tensor) -> Tensor:
    """fn over `rows` (B, ...) evaluated in zero-padded blocks of exactly COND_ROWS rows.

    Matrix multiplications with only a handful of rows (the timestep-conditioning path has one
    row per batch row, not per token) pick their kernel by row count, and different kernels
    round differently. Fixing the row count makes each row's result independent of how many
    other requests share the batch, so a request gives the same bits alone or batched.
    Compiled graphs skip this: they promise closeness, not bits, and the number of blocks would
    make every multiple of COND_ROWS rows a graph of its own.
    """
    if torch.compiler.is_compiling():
        return fn(rows)
    batch = rows.shape[0]
    padded = F.pad(rows, (0, 0) * (rows.ndim - 1) + (0, -batch % COND_ROWS))
    return torch.cat([fn(block) for block in padded.split(COND_ROWS)])[:batch]


class LowRankAdaLN(nn.Module):
    """Timestep-conditioned RMSNorm: each of shift/scale/gate gets a low-rank residual correction."""

    def __init__(self, model_size: int, rank: int, eps: float):
        super().__init__()
        self.eps = eps
        self.shift_down = nn.Linear(model_size, rank, bias=False)
        self.scale_down = nn.Linear(model_size, rank, bias=False)
        self.gate_down = nn.Linear(model_size, rank, bias=False)
        self.shift_up = nn.Linear(rank, model_size)
        self.scale_up = nn.Linear(rank, model_size)
        self.gate_up = nn.Linear(rank, model_size)

    def forward(self, x: Tensor, modulation: Tensor) -> tuple[Tensor, Tensor]:
        """x (B, S, C), modulation(cond) (B, 1, 3C) -> (normalised and modulated x, tanh gate (B, 1, C))."""
        shift, scale_plus_one, tanh_gate = modulation.chunk(3, dim=-1)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return (x32 * scale_plus_one + shift).to(x.dtype), tanh_gate

    def modulation(self, cond: Tensor) -> Tensor:
        """cond (B, 1, 3C) -> [shift, 1 + scale, tanh(gate)] (B, 1, 3C), each corrected: all of what
        the block applies that depends on t alone (so a table by time holds it whole)."""
        shift, scale, gate = cond.chunk(3, dim=-1)
        return torch.cat([self.shift_up(self.shift_down(F.silu(shift))) + shift,
                          self.scale_up(self.scale_down(F.silu(scale))) + scale + 1,
                          torch.tanh(self.gate_up(self.gate_down(F.silu(gate))) + gate)], dim=-1)


class Projections(nn.Module):
    """A module whose linear projections of one input can run as one matrix product.

    `FUSED` names groups of bias-free nn.Linear children that read the same input (q, k, v and gate
    of an attention; w1 and w3 of a SwiGLU). `fuse()` stacks each group's weights into one
    non-persistent buffer and makes every member's weight a view of its rows: the parameters keep
    the published checkpoint's names and shapes, nothing is stored twice, and `project(group, x)`
    is one kernel instead of one per member. Each output column is the same dot product either way
    (bit for bit on the CPU: tests/test_model.py; a GPU library may pick another kernel for the
    wider product, so there the results are close, not equal).
    """

    FUSED: dict[str, tuple[str, ...]] = {}

    def __init__(self):
        super().__init__()
        self.fused_groups: tuple[str, ...] = ()
        self.register_load_state_dict_post_hook(Projections._restack)

    def project(self, group: str, x: Tensor) -> tuple[Tensor, ...]:
        """Each member of `group` applied to x (..., C_in), in order."""
        linears = [getattr(self, name) for name in self.FUSED[group]]
        if group not in self.fused_groups:
            return tuple(linear(x) for linear in linears)
        return F.linear(x, getattr(self, group)).split([linear.out_features for linear in linears], dim=-1)

    def fuse(self) -> None:
        for group, names in self.FUSED.items():
            if group in self.fused_groups or not all(hasattr(self, name) for name in names):  # (the latent-
                continue  # prefix ones may be deleted)
            linears = [getattr(self, name) for name in names]
            assert all(linear.bias is None for linear in linears), f"{group}: only bias-free projections fuse"
            weight = torch.cat([linear.weight.detach() for linear in linears])
            self.register_buffer(group, weight, persistent=False)
            row = 0
            for linear in linears:
                linear.weight = nn.Parameter(weight[row:row + linear.out_features], requires_grad=False)
                row += linear.out_features
            self.fused_groups += (group,)

    def unfuse(self) -> None:
        """Back to one weight per projection (each still a view until converted; `fuse` again after)."""
        for group in self.fused_groups:
            del self._buffers[group]
        self.fused_groups = ()

    def _apply(self, fn, recurse=True):  # .to(), .half(), ...: converted weight by weight, then stacked again
        fused = bool(self.fused_groups)
        self.unfuse()
        out = super()._apply(fn, recurse)
        if fused:
            self.fuse()
        return out

    @staticmethod
    def _restack(module: Projections, incompatible_keys) -> None:
        """After loading (this module and its projections): weights assigned anew (assign=True) are no
        longer in the stack, so it is built again from them; weights written in place already are."""
        for group in module.fused_groups:
            stack = module._buffers[group].untyped_storage().data_ptr()
            if any(getattr(module, name).weight.untyped_storage().data_ptr() != stack for name in module.FUSED[group]):
                module.unfuse()
                module.fuse()
                return


class MLP(Projections):
    """SwiGLU feed-forward."""

    FUSED = {"w13": ("w1", "w3")}

    def __init__(self, model_size: int, intermediate_size: int):
        super().__init__()
        self.w1 = nn.Linear(model_size, intermediate_size, bias=False)
        self.w3 = nn.Linear(model_size, intermediate_size, bias=False)
        self.w2 = nn.Linear(intermediate_size, model_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        up, gate = self.project("w13", x)
        return self.w2(F.silu(up) * gate)


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, causal: bool = False) -> Tensor:
    """SDPA on (B, N, H, D) tensors; `mask` (True = may attend) broadcasts to (B, H, N, K). Returns (B, N, H*D)."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=mask, is_causal=causal)
    return out.transpose(1, 2).flatten(2)


def row_mask(key_mask: Tensor) -> Tensor:
    """Per-row key mask (B, K) -> attention mask (B, 1, 1, K)."""
    return key_mask[:, None, None, :]


class SelfAttention(Projections):
    """Gated multi-head self-attention with per-head q/k RMSNorm and full RoPE (encoders)."""

    FUSED = {"qkvg": ("wq", "wk", "wv", "gate")}

    def __init__(self, model_size: int, num_heads: int, is_causal: bool, norm_eps: float):
        super().__init__()
        assert model_size % num_heads == 0
        self.num_heads = num_heads
        self.is_causal = is_causal
        self.wq = nn.Linear(model_size, model_size, bias=False)
        self.wk = nn.Linear(model_size, model_size, bias=False)
        self.wv = nn.Linear(model_size, model_size, bias=False)
        self.wo = nn.Linear(model_size, model_size, bias=False)
        self.gate = nn.Linear(model_size, model_size, bias=False)
        self.q_norm = RMSNorm((num_heads, model_size // num_heads), norm_eps)
        self.k_norm = RMSNorm((num_heads, model_size // num_heads), norm_eps)

    def forward(self, x: Tensor, key_mask: Tensor | None, cos: Tensor, sin: Tensor,
                past: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """x (B, N, C) -> (output (B, N, C), this layer's keys/values (B, N, H, D)).

        With `past` (keys/values of earlier positions, causal encoders only), x continues them:
        query j sees every past key and the new keys up to j.
        """
        q, k, v, gate = self.project("qkvg", x)
        q = apply_rope(self.q_norm(q.unflatten(-1, (self.num_heads, -1))), cos, sin)
        k = apply_rope(self.k_norm(k.unflatten(-1, (self.num_heads, -1))), cos, sin)
        v = v.unflatten(-1, (self.num_heads, -1))
        if key_mask is not None:
            # A row with no visible key would give NaN; its output is never used, so let it see all.
            key_mask = key_mask | ~key_mask.any(dim=-1, keepdim=True)
        if past is None or past[0].shape[1] == 0:
            out = attend(q, k, v, None if key_mask is None else row_mask(key_mask), causal=self.is_causal)
        else:
            assert self.is_causal and key_mask is None, "continuation is only defined for causal encoders"
            n, m = x.shape[1], past[0].shape[1]
            visible = torch.ones(n, m + n, dtype=torch.bool, device=x.device).tril(diagonal=m)
            out = attend(q, torch.cat([past[0], k], dim=1), torch.cat([past[1], v], dim=1), visible)
        return self.wo(out * torch.sigmoid(gate)), (k, v)


class EncoderBlock(nn.Module):
    def __init__(self, model_size: int, num_heads: int, intermediate_size: int, is_causal: bool, norm_eps: float):
        super().__init__()
        self.attention = SelfAttention(model_size, num_heads, is_causal, norm_eps)
        self.mlp = MLP(model_size, intermediate_size)
        self.attention_norm = RMSNorm(model_size, norm_eps)
        self.mlp_norm = RMSNorm(model_size, norm_eps)

    def forward(self, x: Tensor, key_mask: Tensor | None, cos: Tensor, sin: Tensor,
                past: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        attn, kv = self.attention(self.attention_norm(x), key_mask, cos, sin, past)
        x = x + attn
        return x + self.mlp(self.mlp_norm(x)), kv


class TextEncoder(nn.Module):
    """Byte embedding and bidirectional transformer; (B, T) ids -> (B, T, text_model_size)."""

    def __init__(self, vocab_size: int, model_size: int, num_layers: int, num_heads: int,
                 intermediate_size: int, norm_eps: float):
        super().__init__()
        self.head_dim = model_size // num_heads
        self.text_embedding = nn.Embedding(vocab_size, model_size)
        self.blocks = nn.ModuleList(
            EncoderBlock(model_size, num_heads, intermediate_size, False, norm_eps) for _ in range(num_layers))

    def forward(self, input_ids: Tensor, mask: Tensor | None = None) -> Tensor:
        x = self.text_embedding(input_ids)
        cos, sin = rope_angles(torch.arange(input_ids.shape[1], device=x.device), self.head_dim)
        for block in self.blocks:
            x, _ = block(x, mask, cos, sin)
        return x


class PatchEncoder(nn.Module):
    """Causal transformer over patches of latent frames: (B, 4P, 80) -> (B, P, model_size).

    Used twice: for the speaker reference and for the already generated latent prefix.
    """

    def __init__(self, latent_size: int, patch_size: int, model_size: int, num_layers: int, num_heads: int,
                 intermediate_size: int, norm_eps: float):
        super().__init__()
        self.patch_size = patch_size
        self.head_dim = model_size // num_heads
        self.in_proj = nn.Linear(latent_size * patch_size, model_size)
        self.blocks = nn.ModuleList(
            EncoderBlock(model_size, num_heads, intermediate_size, True, norm_eps) for _ in range(num_layers))

    def forward(self, latent: Tensor) -> Tensor:
        return self.extend(latent, [])[0]

    def extend(self, latent: Tensor, past: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
        """Encode patches that continue `past` (per-layer keys/values of the patches before them).

        latent (B, 4N, 80) -> states of the N new patches (B, N, model_size) and the keys/values of
        the new patches per layer. Being causal, the result equals encoding everything at once.
        """
        x = latent.unflatten(-2, (-1, self.patch_size)).flatten(-2)  # (B, N, 4*80), frames row-major
        x = self.in_proj(x) / 6.0
        offset = past[0][0].shape[1] if past else 0
        cos, sin = rope_angles(torch.arange(offset, offset + x.shape[1], device=x.device), self.head_dim)
        new_kv = []
        for i, block in enumerate(self.blocks):
            x, kv = block(x, None, cos, sin, past[i] if past else None)
            new_kv.append(kv)
        return x, new_kv


class JointAttention(Projections):
    """Decoder attention: queries from the noisy latents, keys/values from [self, prefix, text, speaker]."""

    FUSED = {"qkvg": ("wq", "wk", "wv", "gate"), "kv_text": ("wk_text", "wv_text"),
             "kv_speaker": ("wk_speaker", "wv_speaker"), "kv_latent": ("wk_latent", "wv_latent")}

    def __init__(self, model_size: int, num_heads: int, text_model_size: int, speaker_model_size: int,
                 speaker_patch_size: int, norm_eps: float, latent_prefix: bool = True):
        super().__init__()
        assert model_size % num_heads == 0
        self.num_heads = num_heads
        self.head_dim = model_size // num_heads
        self.speaker_patch_size = speaker_patch_size
        self.wq = nn.Linear(model_size, model_size, bias=False)
        self.wk = nn.Linear(model_size, model_size, bias=False)
        self.wv = nn.Linear(model_size, model_size, bias=False)
        self.wk_text = nn.Linear(text_model_size, model_size, bias=False)
        self.wv_text = nn.Linear(text_model_size, model_size, bias=False)
        self.wk_speaker = nn.Linear(speaker_model_size, model_size, bias=False)
        self.wv_speaker = nn.Linear(speaker_model_size, model_size, bias=False)
        if latent_prefix:
            self.wk_latent = nn.Linear(speaker_model_size, model_size, bias=False)
            self.wv_latent = nn.Linear(speaker_model_size, model_size, bias=False)
        self.q_norm = RMSNorm((num_heads, self.head_dim), norm_eps)
        self.k_norm = RMSNorm((num_heads, self.head_dim), norm_eps)
        self.gate = nn.Linear(model_size, model_size, bias=False)
        self.wo = nn.Linear(model_size, model_size, bias=False)

    def _heads(self, x: Tensor) -> Tensor:
        return x.unflatten(-1, (self.num_heads, self.head_dim))

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, key_mask: Tensor | None,
                kv_text: tuple[Tensor, Tensor] | None, kv_speaker: tuple[Tensor, Tensor] | None,
                kv_latent: tuple[Tensor, Tensor] | None, groups: Sequence[RowGroup] | None = None,
                rows: Tensor | None = None) -> Tensor:
        """x (B, S, C); key_mask (B, S + Q + T + P) in the key order [self, prefix, text, speaker].

        With `groups` (this layer's groups, covering the rows in order), each group attends over
        exactly its own keys, as it would alone (see RowGroup); key_mask and the kv arguments are
        then unused. With `rows` (K, B), the kv arguments are pools of rows (N, L, H, D) and row b of
        x reads row rows[k, b] of the k-th pool in the key order (prefix if given, text, speaker),
        gathered as the keys are joined (compiled, one kernel as without a pool; eager, one more copy).
        """
        q, k_self, v_self, gate = self.project("qkvg", x)
        q = apply_rope_half_heads(self.q_norm(self._heads(q)), cos, sin)
        k_self = apply_rope_half_heads(self.k_norm(self._heads(k_self)), cos, sin)
        v_self = self._heads(v_self)
        if groups is None:
            cached = ([kv_latent] if kv_latent is not None else []) + [kv_text, kv_speaker]
            if rows is not None:
                cached = [(k[r], v[r]) for (k, v), r in zip(cached, rows)]
            segments = [(k_self, v_self)] + cached
            keys, values = (torch.cat([segment[j] for segment in segments], dim=1) for j in (0, 1))
            out = attend(q, keys, values, row_mask(key_mask))
        else:
            out = self._attend_groups(groups, q, k_self, v_self)
        return self.wo(out * torch.sigmoid(gate))

    @staticmethod
    def _attend_groups(groups: Sequence[RowGroup], q: Tensor, k_self: Tensor, v_self: Tensor) -> Tensor:
        """attend() for each group's rows of q (B, S, H, D) over its own keys, this pass's self keys
        written in front of them: (B, S, H*D). What a generation adds is one attention kernel call:
        the self keys of all groups are written by one foreach copy, and q is split and the outputs
        joined once for the whole batch (the same values and strides as slicing per group, so each
        group's result stays bit for bit its solo result)."""
        sizes = [g.rows.stop - g.rows.start for g in groups]
        torch._foreach_copy_([g.self_keys for g in groups] + [g.self_values for g in groups],
                             [*k_self.split(sizes), *v_self.split(sizes)])
        out = [F.scaled_dot_product_attention(qg, g.keys, g.values, attn_mask=g.mask)
               for g, qg in zip(groups, q.transpose(1, 2).split(sizes))]
        return torch.cat(out).transpose(1, 2).flatten(2)

    def text_kv(self, text_state: Tensor) -> tuple[Tensor, Tensor]:
        """(B, T, text_model_size) -> keys, values (B, T, H, D)."""
        k, v = self.project("kv_text", text_state)
        return self.k_norm(self._heads(k)), self._heads(v).contiguous()  # (a cache must not hold the k half)

    def speaker_kv(self, speaker_state: Tensor) -> tuple[Tensor, Tensor]:
        """(B, P, speaker_model_size) -> keys, values (B, P, H, D)."""
        k, v = self.project("kv_speaker", speaker_state)
        return self.k_norm(self._heads(k)), self._heads(v).contiguous()

    def latent_kv(self, latent_state: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        """(B, Q, speaker_model_size) -> keys (half-head RoPE at frame 4*i), values (B, Q, H, D)."""
        k, v = self.project("kv_latent", latent_state)
        return apply_rope_half_heads(self.k_norm(self._heads(k)), cos, sin), self._heads(v).contiguous()


class DecoderBlock(nn.Module):
    def __init__(self, model_size: int, num_heads: int, intermediate_size: int, norm_eps: float,
                 text_model_size: int, speaker_model_size: int, speaker_patch_size: int, adaln_rank: int,
                 latent_prefix: bool = True):
        super().__init__()
        self.attention = JointAttention(model_size, num_heads, text_model_size, speaker_model_size,
                                        speaker_patch_size, norm_eps, latent_prefix)
        self.mlp = MLP(model_size, intermediate_size)
        self.attention_adaln = LowRankAdaLN(model_size, adaln_rank, norm_eps)
        self.mlp_adaln = LowRankAdaLN(model_size, adaln_rank, norm_eps)

    def forward(self, x: Tensor, modulation: Tensor, cos: Tensor, sin: Tensor, key_mask: Tensor | None,
                kv_text: tuple[Tensor, Tensor] | None, kv_speaker: tuple[Tensor, Tensor] | None,
                kv_latent: tuple[Tensor, Tensor] | None, groups: Sequence[RowGroup] | None = None,
                rows: Tensor | None = None) -> Tensor:
        """modulation (2, B, 1, 3C): this block's AdaLN modulations (attention, MLP); EchoDiT.modulations."""
        h, gate = self.attention_adaln(x, modulation[0])
        x = x + gate * self.attention(h, cos, sin, key_mask, kv_text, kv_speaker, kv_latent, groups, rows)
        h, gate = self.mlp_adaln(x, modulation[1])
        return x + gate * self.mlp(h)

    def modulations(self, cond: Tensor) -> Tensor:
        """cond (B, 1, 3C) -> (2, B, 1, 3C), each row's bits independent of the batch (COND_ROWS)."""
        return torch.stack([in_fixed_row_blocks(self.attention_adaln.modulation, cond),
                            in_fixed_row_blocks(self.mlp_adaln.modulation, cond)])


# ---------------------------------------------------------------------------------------------


def layer_of(per_layer: Sequence | None, i: int):
    """Layer i's entry of a per-layer list (a cache, groups), or None."""
    return None if per_layer is None else per_layer[i]


def call_block(block: DecoderBlock, *args) -> Tensor:
    """block(*args): what EchoDiT.velocity runs per decoder block unless told otherwise."""
    return block(*args)


BLOCKWISE_PREFIXES = ("latent_encoder.", "latent_norm.")
BLOCKWISE_INFIXES = (".wk_latent.", ".wv_latent.")


def is_blockwise_parameter(name: str) -> bool:
    """True for the latent-prefix (blockwise generation) parameters, which inference can do without."""
    return name.startswith(BLOCKWISE_PREFIXES) or any(part in name for part in BLOCKWISE_INFIXES)


class EchoDiT(nn.Module):
    """The Echo-TTS velocity model. Constructor keys equal the published config's."""

    def __init__(self, latent_size: int, model_size: int, num_layers: int, num_heads: int, intermediate_size: int,
                 norm_eps: float, text_vocab_size: int, text_model_size: int, text_num_layers: int,
                 text_num_heads: int, text_intermediate_size: int, speaker_patch_size: int, speaker_model_size: int,
                 speaker_num_layers: int, speaker_num_heads: int, speaker_intermediate_size: int,
                 timestep_embed_size: int, adaln_rank: int, latent_prefix: bool = True):
        super().__init__()
        self._modulation_table: OrderedDict[tuple, Tensor] = OrderedDict()  # timed_modulations' entries
        self._modulation_lock = threading.Lock()
        self.latent_size = latent_size
        self.speaker_patch_size = speaker_patch_size
        self.timestep_embed_size = timestep_embed_size
        self.head_dim = model_size // num_heads
        self.has_latent_prefix = latent_prefix

        self.text_encoder = TextEncoder(text_vocab_size, text_model_size, text_num_layers, text_num_heads,
                                        text_intermediate_size, norm_eps)
        patch_args = (latent_size, speaker_patch_size, speaker_model_size, speaker_num_layers, speaker_num_heads,
                      speaker_intermediate_size, norm_eps)
        self.speaker_encoder = PatchEncoder(*patch_args)
        self.text_norm = RMSNorm(text_model_size, norm_eps)
        self.speaker_norm = RMSNorm(speaker_model_size, norm_eps)
        if latent_prefix:
            self.latent_encoder = PatchEncoder(*patch_args)
            self.latent_norm = RMSNorm(speaker_model_size, norm_eps)

        self.cond_module = nn.Sequential(
            nn.Linear(timestep_embed_size, model_size, bias=False), nn.SiLU(),
            nn.Linear(model_size, model_size, bias=False), nn.SiLU(),
            nn.Linear(model_size, 3 * model_size, bias=False),
        )
        self.in_proj = nn.Linear(latent_size, model_size)
        self.blocks = nn.ModuleList(
            DecoderBlock(model_size, num_heads, intermediate_size, norm_eps, text_model_size, speaker_model_size,
                         speaker_patch_size, adaln_rank, latent_prefix)
            for _ in range(num_layers))
        self.out_norm = RMSNorm(model_size, norm_eps)
        self.out_proj = nn.Linear(model_size, latent_size)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def forward(self, x: Tensor, t: Tensor, text_mask: Tensor, speaker_mask: Tensor, kv_cache_text: KVCache,
                kv_cache_speaker: KVCache, start_pos: int | None = None,
                kv_cache_latent: KVCache | None = None) -> Tensor:
        """Velocity for noisy latents x (B, S, 80) at times t (B,); returns float32 (B, S, 80).

        text_mask (B, T); speaker_mask (B, 4P) per latent frame (subsampled here to patches);
        start_pos is the frame index of x[:, 0] (blockwise generation); a prefix patch i is visible
        only when 4*i < start_pos.
        """
        start_pos = start_pos or 0
        batch, length = x.shape[:2]
        masks = [torch.ones(batch, length, dtype=torch.bool, device=x.device)]
        if kv_cache_latent is not None:
            num_patches = kv_cache_latent[0][0].shape[1]
            patch_starts = torch.arange(num_patches, device=x.device) * self.speaker_patch_size
            masks.append((patch_starts < start_pos).expand(batch, num_patches))
        masks += [text_mask, speaker_mask[..., ::self.speaker_patch_size]]
        positions = torch.arange(start_pos, start_pos + length, device=x.device)
        return self.velocity(x, t, positions, torch.cat(masks, dim=1), kv_cache_text, kv_cache_speaker,
                             kv_cache_latent)

    def velocity(self, x: Tensor, t: Tensor | None, positions: Tensor, key_mask: Tensor | None,
                 kv_text: KVCache | None, kv_speaker: KVCache | None, kv_latent: KVCache | None = None,
                 groups: Sequence[Sequence[RowGroup]] | None = None,
                 run_block: Callable[..., Tensor] | None = None, modulation: Tensor | None = None,
                 rows: Tensor | None = None) -> Tensor:
        """The decoder proper. positions (S,) or (B, S) are the frame indices of x's rows; key_mask
        (B, S + Q + T + P) marks visible keys in the order [self, prefix, text, speaker patches].
        Padded rows of x (masked as self keys) may hold anything; their outputs are meaningless.
        `groups` (one list per layer) makes attention per generation, over keys the groups hold
        (for batches of several; see RowGroup); key_mask and the caches are then None.
        `run_block(block, h, modulation, cos, sin, key_mask, kv_text, kv_speaker, kv_latent, groups, rows)`
        runs each decoder block (a compiled one: the blocks are alike, so one graph serves all 24).
        `modulation` (L, 2, B, 1, 3C), when given, is `modulations(t)` computed earlier (from the
        table: `timed_modulations`); t is then not read. `rows` (K, B): the caches are row pools and
        row b of x reads row rows[k, b] of the k-th (JointAttention)."""
        run_block = run_block or call_block
        cos, sin = rope_angles(positions, self.head_dim)
        per_block = (self.modulations(t) if modulation is None else modulation).unbind(0)  # one op, not one per block
        h = self.in_proj(x)
        for i, block in enumerate(self.blocks):
            h = run_block(block, h, per_block[i], cos, sin, key_mask, layer_of(kv_text, i),
                          layer_of(kv_speaker, i), layer_of(kv_latent, i), layer_of(groups, i), rows)
        return self.out_proj(self.out_norm(h)).float()

    def modulations(self, t: Tensor) -> Tensor:
        """Every block's AdaLN modulations at times t (B,): (L, 2, B, 1, 3C). They depend on t alone."""
        cond = in_fixed_row_blocks(self.cond_module, timestep_embedding(t, self.timestep_embed_size))[:, None]
        return torch.stack([block.modulations(cond) for block in self.blocks])

    def timed_modulations(self, times: Sequence[float], rows: Sequence[int], out: Tensor | None = None) -> Tensor:
        """`modulations` for `rows[i]` rows at time `times[i]` each, (L, 2, sum(rows), 1, 3C), from a
        table of each time's modulations (bit for bit what `modulations` gives that row, COND_ROWS
        making rows independent): a step pass costs one op per generation and one to join them,
        instead of ~16 per block. The times are the samplers' host values: no host sync. `out`: a
        tensor of that shape to write them into (a static input of a step graph)."""
        parts = [self._timed(time).expand(-1, -1, n, -1, -1) for time, n in zip(times, rows)]
        return torch.cat(parts, dim=2) if out is None else torch.cat(parts, dim=2, out=out)

    def _timed(self, time: float) -> Tensor:
        """(L, 2, 1, 1, 3C) at `time`, as a sampler's t tensor holds it (float32, then the model dtype)."""
        key = (time, self.dtype, self.device)
        with self._modulation_lock:  # the worker's thread, and any caller of the public API
            entry = self._modulation_table.get(key)
            if entry is not None:
                self._modulation_table.move_to_end(key)
                return entry
        with torch.no_grad():
            t = torch.tensor([time], dtype=torch.float32, device=self.device).to(self.dtype)
            entry = self.modulations(t)
        with self._modulation_lock:
            self._modulation_table[key] = entry
            while len(self._modulation_table) > MODULATION_TABLE_SIZE:
                self._modulation_table.popitem(last=False)
        return entry

    def _apply(self, fn, recurse=True):  # .to(), .half(), ...: the table's entries are stale
        self._forget_modulations()
        return super()._apply(fn, recurse)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        self._forget_modulations()  # new weights, new modulations
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def fuse_projections(self) -> EchoDiT:
        """Every attention's q, k, v and gate, every SwiGLU's w1 and w3 and every decoder block's
        text, speaker and latent-prefix key/value pairs as one matrix product each (Projections):
        per diffusion step 24 x 4 fewer kernels, with the same parameters. Kept through .to() and
        load_state_dict, also of a submodule (Projections)."""
        for module in self._projections():
            module.fuse()
        return self

    @property
    def projections_fused(self) -> bool:
        return any(module.fused_groups for module in self._projections())

    def _projections(self) -> list[Projections]:
        return [module for module in self.modules() if isinstance(module, Projections)]

    def _forget_modulations(self) -> None:
        with self._modulation_lock:
            self._modulation_table.clear()

    def get_kv_cache_text(self, text_input_ids: Tensor, text_mask: Tensor | None) -> KVCache:
        state = self.text_norm(self.text_encoder(text_input_ids, text_mask))
        return [block.attention.text_kv(state) for block in self.blocks]

    def get_kv_cache_speaker(self, speaker_latent: Tensor) -> KVCache:
        """speaker_latent (B, 4P, 80) -> per-layer (B, P, H, D) keys and values."""
        state = self.speaker_norm(self.speaker_encoder(speaker_latent))
        return [block.attention.speaker_kv(state) for block in self.blocks]

    def get_kv_cache_latent(self, prefix_latent: Tensor) -> KVCache:
        """prefix_latent (B, 4Q, 80) -> per-layer (B, Q, H, D) keys and values of the latent prefix."""
        self._require_latent_prefix()
        return self.latent_prefix_kv(self.latent_encoder(prefix_latent), first_patch=0)

    def extend_patches(self, frames: Tensor, encoder_kv: KVCache, complete: KVCache) -> tuple[KVCache, KVCache]:
        """Whole patches of latent frames (B, 4N, 80) after a prefix's complete patches: the latent
        encoder's per-layer keys/values (`encoder_kv`, [] for none yet) and the DiT's (`complete`,
        per layer (B, Q, H, D)), each extended by the N new patches. What LatentPrefix.extend runs
        for a block; engine.CompiledPrefixEncoder runs it as one compiled graph."""
        encoded, kv = self.latent_encoder.extend(frames, encoder_kv)
        first = complete[0][0].shape[1]
        return (cat_kv(encoder_kv, kv) if encoder_kv else kv), cat_kv(complete, self.latent_prefix_kv(encoded, first))

    def latent_prefix_kv(self, encoded: Tensor, first_patch: int) -> KVCache:
        """Per-layer keys/values of latent-encoder output (B, N, C) for patches first_patch..+N."""
        state = self.latent_norm(encoded)
        patch = torch.arange(first_patch, first_patch + state.shape[1], device=state.device)
        cos, sin = rope_angles(patch * self.speaker_patch_size, self.head_dim)
        return [block.attention.latent_kv(state, cos, sin) for block in self.blocks]

    def _require_latent_prefix(self) -> None:
        if not self.has_latent_prefix:
            raise RuntimeError("this EchoDiT was loaded without its blockwise (latent-prefix) modules")


class LatentPrefix:
    """The latent-prefix keys/values of a growing prefix, encoded incrementally.

    The latent encoder is causal, so each `extend` encodes only the new frames (continuing the
    encoder's per-layer key/value cache) and gives exactly what encoding the whole prefix again
    would. A trailing partial patch (frames not filling a patch of 4) is zero-padded, as the
    reference's zero-filled buffer does, and re-encoded once the frames that complete it arrive.
    """

    def __init__(self, model: EchoDiT, batch: int, device: torch.device | str | None = None):
        model._require_latent_prefix()
        self.model = model
        self.patch = model.speaker_patch_size
        device = device or model.device
        self._encoder_kv: list[tuple[Tensor, Tensor]] = []  # complete patches, per encoder layer
        heads, head_dim = model.blocks[0].attention.num_heads, model.head_dim
        empty = torch.zeros(batch, 0, heads, head_dim, device=device, dtype=model.dtype)
        self._complete: KVCache = [(empty, empty) for _ in model.blocks]  # complete patches, per DiT layer
        self._tail = torch.zeros(batch, 0, model.latent_size, device=device, dtype=model.dtype)
        self.kv: KVCache = self._complete  # what the decoder attends to: complete patches + the partial one
        self.frames = 0

    @property
    def num_patches(self) -> int:
        return self.kv[0][0].shape[1]

    def snapshot(self) -> tuple:
        """The prefix as it is now (extending replaces its tensors and lists, never writes into them)."""
        return self.frames, self._encoder_kv, self._complete, self._tail, self.kv

    def restore(self, snapshot: tuple) -> None:
        """Back to a snapshot of this prefix."""
        self.frames, self._encoder_kv, self._complete, self._tail, self.kv = snapshot

    def extend(self, latents: Tensor, encode: PatchEncoding | None = None) -> None:
        """Append frames (B, n, 80) to the prefix; `encode` encodes its whole patches (by default
        EchoDiT.extend_patches; a compiled one)."""
        frames = torch.cat([self._tail, latents.to(self._tail.dtype)], dim=1)
        self.frames += latents.shape[1]
        whole = frames.shape[1] // self.patch * self.patch
        if whole:
            encode = encode or self.model.extend_patches
            self._encoder_kv, self._complete = encode(frames[:, :whole], self._encoder_kv, self._complete)
        self._tail = frames[:, whole:]
        self.kv = self._complete
        if self._tail.shape[1]:
            padded = torch.nn.functional.pad(self._tail, (0, 0, 0, self.patch - self._tail.shape[1]))
            encoded, _ = self.model.latent_encoder.extend(padded, self._encoder_kv)
            self.kv = cat_kv(self._complete, self.model.latent_prefix_kv(encoded, self._complete[0][0].shape[1]))

    @classmethod
    def stacked(cls, parts: Sequence[LatentPrefix]) -> LatentPrefix:
        """One prefix holding `parts` (all at the same frame count) stacked along the batch."""
        merged = object.__new__(cls)
        first = parts[0]
        merged.model, merged.patch, merged.frames = first.model, first.patch, first.frames
        merged._encoder_kv = _cat_rows([p._encoder_kv for p in parts]) if first._encoder_kv else []
        merged._complete = _cat_rows([p._complete for p in parts])
        merged._tail = torch.cat([p._tail for p in parts])
        merged.kv = merged._complete  # what it attends to; `extend` sets it anew from the complete patches
        return merged

    def split_into(self, parts: Sequence[LatentPrefix]) -> None:
        """Hand each of `parts` (as stacked) its rows of this prefix."""
        sizes = [p._tail.shape[0] for p in parts]
        encoder_kv, complete, kv = (_split_rows(c, sizes) for c in (self._encoder_kv, self._complete, self.kv))
        for i, (part, tail) in enumerate(zip(parts, self._tail.split(sizes))):
            part._encoder_kv, part._complete, part.kv = encoder_kv[i], complete[i], kv[i]
            part._tail, part.frames = tail, self.frames


def grouped(keys: Iterable[Hashable]) -> dict[Hashable, list[int]]:
    """The indices of equal keys, grouped in order of first appearance (which calls of a batch can
    run as one: same frame count, same text bucket, prefixes that line up)."""
    groups: dict[Hashable, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    return groups


def extend_prefixes(prefixes: Sequence[LatentPrefix], latents: Sequence[Tensor],
                    encode: PatchEncoding | None = None) -> None:
    """`prefixes[i].extend(latents[i], encode)` for every i, the prefixes at the same frame count that
    get the same number of whole patches stacked into one encoder call (generations that started
    together finish their blocks together). Rows do not interact, so each prefix ends as its own
    extend leaves it: on a CPU bit for bit with the eager encoder, which stacks there only where that
    is measured to hold (_stacks_exactly; elsewhere the prefixes run alone); close on a GPU, and with
    a compiled encoder (its graphs for one row and for several are close, not equal).
    All or nothing: if one fails (out of device memory), every prefix is left as it was."""
    groups = grouped((id(prefix.model), prefix.frames, new.shape[1]) if _whole_patches(prefix, new) else i
                     for i, (prefix, new) in enumerate(zip(prefixes, latents)))
    before = [prefix.snapshot() for prefix in prefixes]
    try:
        for members in groups.values():
            first = prefixes[members[0]]
            patches = (first._tail.shape[1] + latents[members[0]].shape[1]) // first.patch
            if len(members) == 1 or (encode is None and not _stacks_exactly(
                    first.model, patches, first._complete[0][0].shape[1] > 0, len(members))):
                for i in members:
                    prefixes[i].extend(latents[i], encode)
                continue
            parts = [prefixes[i] for i in members]
            merged = LatentPrefix.stacked(parts)
            merged.extend(torch.cat([latents[i].to(merged._tail.dtype) for i in members]), encode)
            merged.split_into(parts)
    except BaseException:
        for prefix, snapshot in zip(prefixes, before):
            prefix.restore(snapshot)
        raise


def _whole_patches(prefix: LatentPrefix, new: Tensor) -> bool:
    """Whether extending `prefix` by `new` (1, n, 80) leaves no partial patch (its tail and the new
    frames fill whole patches), so that it can be stacked with others."""
    return new.shape[0] == 1 and (prefix._tail.shape[1] + new.shape[1]) % prefix.patch == 0


_STACKS_EXACTLY: weakref.WeakKeyDictionary[EchoDiT, dict[tuple, bool]] = weakref.WeakKeyDictionary()


def _stacks_exactly(model: EchoDiT, patches: int, past: bool, rows: int) -> bool:
    """Whether `rows` extensions by `patches` whole patches (after complete patches, if `past`),
    stacked, give each the bits it gets alone. On a CPU that is measured the first time (random
    frames, stacked and alone, at the model's dtype), since its BLAS library chooses a matrix
    product's kernel by its rows and the kernels round differently: MKL on one CPU computes products
    of 1-3, 5-7 and 9-11 rows with another kernel, on another those of under 16 rows with a 320-wide
    input (the latent encoder's). Elsewhere True: a GPU's libraries promise no bits across batch
    sizes for any product (the step runner's batched steps are close there, not equal, too)."""
    if model.device.type != "cpu":
        return True
    measured = _STACKS_EXACTLY.setdefault(model, {})
    key = (patches, past, rows, model.dtype)
    if key not in measured:
        measured[key] = _measure_stacking(model, patches, past, rows)
    return measured[key]


@torch.inference_mode()
def _measure_stacking(model: EchoDiT, patches: int, past: bool, rows: int) -> bool:
    """Rows stacked against the first and last row alone (a kernel is chosen by the shapes, not the
    values): an extension by `patches` patches, from none or after as many (attention then takes
    its masked path; one past length stands for all, as the products' rows are the new patches')."""
    gen = torch.Generator().manual_seed(patches)
    frames = torch.randn((1 + past) * rows, patches * model.speaker_patch_size, model.latent_size, generator=gen)
    frames = frames.to(model.dtype).split(rows)
    encoder_kv, complete = [], LatentPrefix(model, rows)._complete
    if past:
        encoder_kv, complete = model.extend_patches(frames[1], encoder_kv, complete)
    stacked = model.extend_patches(frames[0], encoder_kv, complete)
    for row in sorted({0, rows - 1}):
        pick = slice(row, row + 1)
        alone = model.extend_patches(frames[0][pick], [(k[pick], v[pick]) for k, v in encoder_kv],
                                     [(k[pick], v[pick]) for k, v in complete])
        for cache, reference in zip(alone, stacked):
            if not all(torch.equal(t, t0[pick]) for pair, pair0 in zip(cache, reference) for t, t0 in zip(pair, pair0)):
                return False
    return True


def _cat_rows(caches: Sequence[KVCache]) -> KVCache:
    """Per layer, the caches' keys/values stacked along the batch."""
    return [tuple(torch.cat([cache[layer][j] for cache in caches]) for j in (0, 1)) for layer in range(len(caches[0]))]


def _split_rows(cache: KVCache, sizes: list[int]) -> list[KVCache]:
    """A stacked cache back into its parts' rows (views)."""
    pieces = [(k.split(sizes), v.split(sizes)) for k, v in cache]
    return [[(k[i], v[i]) for k, v in pieces] for i in range(len(sizes))]

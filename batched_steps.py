"""Evaluating the diffusion steps of several generations in one forward pass.

A step runner takes the ModelCalls that the active generations wait on and returns their
velocities, in order. Two runners share that interface:

- `ExactSteps` (the default on every device): one forward pass per frame count, nothing padded; attention runs
  per generation over exactly its own keys (model.RowGroup), so each result is bit for bit what
  the generation computes alone. A generation's prefix, text and speaker keys/values are laid out
  for its attention once, behind a slot each pass writes its self keys into, and reused while the
  generation stays in one block and CFG phase (its guidance rows share the conditioning's
  keys/values: inference.repeat_kv makes views, not copies). Shapes change with every batch,
  which suits eager execution only.
- `StaticSteps` (ECHO_COMPILE, or ECHO_STATIC_SHAPES=1): every input is padded to a small fixed set of shapes, so
  torch.compile builds one graph per block size and speaker bucket (plus a single-row one), and a
  whole step pass can be captured as one CUDA graph per shape: frames round up to a block-size
  bucket, rows to a row bucket, speaker keys to ~30 s of voice or to the longest voice, prefix
  and text keys to their maxima. Padded keys are masked, so results equal the exact path up to
  float rounding. Every input lives at a fixed address: the keys/values in a row pool that holds
  a generation's text and speaker keys once and its prefix once per block (its CFG rows and phases
  share them, and so do the streams of one voice), each frame bucket's row indices and masks
  rewritten only when its members change, the latents and AdaLN rows written per step. A graph's
  replay therefore copies nothing into its inputs.
"""

from __future__ import annotations

import logging
import math
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from functools import partial

import torch
from torch import Tensor

from inference import (LATENT_SIZE, MAX_SEQUENCE_LENGTH, MAX_SPEAKER_LATENT_LENGTH, MAX_TEXT_LENGTH, ModelCall,
                       repeat_kv, timed_modulations)
from model import EchoDiT, KVCache, RowGroup, call_block, grouped

log = logging.getLogger(__name__)

StepRunner = Callable[[Sequence[ModelCall]], list[Tensor]]


def batched_velocity(model: EchoDiT, calls: Sequence[ModelCall]) -> list[Tensor]:
    """The calls' velocities through ExactSteps, keeping nothing for later steps."""
    return ExactSteps(model)(calls)


def with_self_slot(frames: int, parts: Sequence[Tensor]) -> Tensor:
    """(n, frames + L_1 + ..., H, D): room for `frames` self keys, then `parts` (n, L_i, H, D) in order."""
    slot = parts[0].new_empty(parts[0].shape[0], frames, *parts[0].shape[2:])
    return torch.cat([slot, *parts], dim=1)


@dataclass(eq=False)
class _Layout:
    """One generation's part of a forward pass, kept while its step's inputs are the same objects
    (a generation keeps them through a block's guided, then its unguided, steps)."""

    sources: tuple  # the call's kv_text, kv_speaker, kv_latent, text_mask, speaker_mask: kept alive, so ids stay theirs
    kv: KVCache  # per layer (n, S + Q + T + P, H, D): self slot, prefix, text, speaker
    groups: list[RowGroup]  # per layer, over kv, at rows 0..n (a pass moves them to its rows)
    used: int = 0  # the runner's call count when it was last used

    @staticmethod
    def key(call: ModelCall) -> tuple:
        sources = (call.kv_text, call.kv_speaker, call.kv_latent, call.text_mask, call.speaker_mask)
        return (*map(id, sources), *call.x.shape[:2], call.start_pos)

    @classmethod
    def of(cls, model: EchoDiT, call: ModelCall) -> _Layout:
        frames = call.x.shape[1]
        caches = ([call.kv_latent] if call.kv_latent is not None else []) + [call.kv_text, call.kv_speaker]
        kv = [tuple(with_self_slot(frames, [cache[layer][j] for cache in caches]) for j in (0, 1))
              for layer in range(len(model.blocks))]
        key_mask, rows = call.key_mask(model), slice(0, call.x.shape[0])
        return cls((call.kv_text, call.kv_speaker, call.kv_latent, call.text_mask, call.speaker_mask), kv,
                   [RowGroup.over(rows, key_mask, keys, values, frames) for keys, values in kv])


@dataclass(eq=False)
class _Pass:
    """A forward pass over generations of one frame count: their positions and per-layer groups."""

    members: tuple[_Layout, ...]
    positions: Tensor  # (R, S)
    groups: list[list[RowGroup]]  # per layer, one group per member
    used: int = 0

    @classmethod
    def of(cls, members: tuple[_Layout, ...], calls: Sequence[ModelCall]) -> _Pass:
        frames = calls[0].x.shape[1]
        arange = torch.arange(frames, device=calls[0].x.device)
        positions = torch.cat([(c.start_pos + arange).expand(c.x.shape[0], frames) for c in calls])
        slices = row_slices(calls)
        groups = [[replace(m.groups[layer], rows=rows) for m, rows in zip(members, slices)]
                  for layer in range(len(members[0].groups))]
        return cls(members, positions, groups)


def row_slices(calls: Sequence[ModelCall]) -> list[slice]:
    """Where each call's rows sit when the calls are stacked along the batch."""
    slices, start = [], 0
    for call in calls:
        slices.append(slice(start, start + call.x.shape[0]))
        start += call.x.shape[0]
    return slices


def zero_kv(model: EchoDiT, rows: int, length: int, like: Tensor) -> KVCache:
    """A key/value cache of zeros, (rows, length, H, D) per layer, on `like`'s device and dtype."""
    zeros = like.new_zeros(rows, length, model.blocks[0].attention.num_heads, model.head_dim)
    return [(zeros, zeros)] * len(model.blocks)


def latent_kv_or_empty(model: EchoDiT, call: ModelCall) -> KVCache:
    """The call's latent-prefix cache; an empty one for a step without a latent prefix."""
    return call.kv_latent if call.kv_latent is not None else zero_kv(model, call.x.shape[0], 0, call.x)


class ExactSteps:
    """The exact runner (see the module docstring).

    One forward pass per frame count, so nothing is padded. Each generation's keys/values are laid
    out once (its prefix, text and speaker parts copied behind a slot for its self keys, _Layout)
    and reused by every step while the call's conditioning objects stay the same; a layout or pass
    unused for `keep_for` calls is let go, which also frees finished generations' keys.
    """

    def __init__(self, model: EchoDiT, keep_for: int = 8):
        self.model = model
        self.keep_for = keep_for
        self._layouts: dict[tuple, _Layout] = {}
        self._passes: dict[int, _Pass] = {}  # frames -> the last pass at that frame count
        self._calls = 0
        self.layouts_built = 0  # generations laid out so far (a new one per block and CFG phase)

    @property
    def layouts_kept(self) -> int:
        """Generations whose laid-out keys/values are kept for their next step."""
        return len(self._layouts)

    def __call__(self, calls: Sequence[ModelCall]) -> list[Tensor]:
        self._calls += 1
        out: list[Tensor | None] = [None] * len(calls)
        for frames, indices in grouped(c.x.shape[1] for c in calls).items():
            for i, v in zip(indices, self._forward([calls[i] for i in indices], frames)):
                out[i] = v
        self._forget_stale()
        return out

    def _forward(self, calls: Sequence[ModelCall], frames: int) -> list[Tensor]:
        """One pass over calls of `frames` frames each: velocities (n_i, S, 80) float32."""
        members: list[_Layout] = []
        for call in calls:  # a pass writes all self keys before it attends: each member needs its own buffer
            layout = self._layout(call)
            members.append(layout if all(layout is not m for m in members) else _Layout.of(self.model, call))
        p = self._pass(tuple(members), calls, frames)
        modulation = timed_modulations(self.model, calls)
        v = self.model.velocity(x=torch.cat([c.x for c in calls]),
                                t=torch.cat([c.t for c in calls]) if modulation is None else None,
                                positions=p.positions, key_mask=None, kv_text=None, kv_speaker=None,
                                groups=p.groups, modulation=modulation)
        return list(v.split([c.x.shape[0] for c in calls]))

    def _layout(self, call: ModelCall) -> _Layout:
        key = _Layout.key(call)
        layout = self._layouts.get(key)
        if layout is None:
            layout = self._layouts[key] = _Layout.of(self.model, call)
            self.layouts_built += 1
        layout.used = self._calls
        return layout

    def _pass(self, members: tuple[_Layout, ...], calls: Sequence[ModelCall], frames: int) -> _Pass:
        p = self._passes.get(frames)
        if p is None or len(p.members) != len(members) or any(a is not b for a, b in zip(p.members, members)):
            p = self._passes[frames] = _Pass.of(members, calls)
        p.used = self._calls
        return p

    def forget(self) -> None:
        """Let every layout and pass go (the worker has nothing to step): their generations' keys with them."""
        self._layouts, self._passes = {}, {}

    def _forget_stale(self) -> None:
        oldest = self._calls - self.keep_for
        self._passes = {k: p for k, p in self._passes.items() if p.used > oldest}
        self._layouts = {k: m for k, m in self._layouts.items() if m.used > oldest}


# ---------------------------------------------------------------------------------------------
# Static shapes


def row_buckets(max_rows: int) -> tuple[int, ...]:
    """Row counts a batch is padded to: 1, 2, 3, 4, 6, 8, 12, 16, ... below max_rows, then max_rows.

    Consecutive buckets differ by at most 1.5x, so padding wastes at most a third of a batch.
    """
    sizes = {b for k in range(max_rows.bit_length()) for b in (2 ** k, 3 * 2 ** k) if b < max_rows}
    return tuple(sorted(sizes)) + (max_rows,)


def _bucket(buckets: Sequence[int], n: int) -> int | None:
    return next((b for b in buckets if b >= n), None)


SHORT_VOICE_PATCHES = MAX_SEQUENCE_LENGTH // 4  # speaker patches of a voice up to ~30 s (640 latent frames)
PASS_TOKENS = 16384  # rows x frames of a static pass at most: beyond ~8k tokens an H100 pass is compute-bound


@dataclass(frozen=True)
class StaticShapes:
    """The fixed shapes of StaticSteps' forward passes."""

    frame_buckets: tuple[int, ...]  # ascending; a step's frames round up to one of these
    row_buckets: tuple[int, ...]  # ascending; a batch's rows round up to one of these
    prefix_patches: int  # Q: latent-prefix keys
    text_tokens: int  # T: text keys
    speaker_buckets: tuple[int, ...]  # ascending; P: a batch's speaker keys round up to one of these
    max_tokens: int | None = None  # rows x frames of one pass at most (3 rows always): more run as several passes
    pool_size: int | None = None  # rows of each kind of conditioning pooled (None: a third of the most rows)

    @classmethod
    def covering(cls, block_sizes: Iterable[int], max_rows: int, patch_size: int = 4,
                 max_speaker_latent_length: int = MAX_SPEAKER_LATENT_LENGTH,
                 latent_prefix: bool = True, max_tokens: int | None = PASS_TOKENS) -> StaticShapes:
        """Shapes for the given block sizes (the 640-frame whole generation is always one), up to
        `max_rows` rows (3 CFG rows per generation at most) and `max_tokens` tokens per forward pass,
        and speaker keys of voices up to ~30 s or up to the longest voice: typical voices then pad to
        160 speaker keys, not 1600, which takes the padded key/value caches from 2528 to 1088 keys a row."""
        frames = tuple(sorted(set(block_sizes) | {MAX_SEQUENCE_LENGTH}))
        speakers = math.ceil(max_speaker_latent_length / patch_size)
        return cls(frames, row_buckets(max_rows), MAX_SEQUENCE_LENGTH // patch_size if latent_prefix else 0,
                   MAX_TEXT_LENGTH, tuple(sorted({min(SHORT_VOICE_PATCHES, speakers), speakers})), max_tokens)

    def rows_at(self, frames: int) -> int:
        """The most rows of a pass of this frame bucket: `max_tokens` of them (but a guided generation's 3)."""
        if self.max_tokens is None:
            return self.row_buckets[-1]
        return min(self.row_buckets[-1], max(3, self.max_tokens // frames))

    def row_buckets_at(self, frames: int) -> tuple[int, ...]:
        cap = self.rows_at(frames)
        return tuple(b for b in self.row_buckets if b < cap) + (cap,)

    @property
    def pool_rows(self) -> int:
        """Rows of each kind the pool holds: one per generation (a third of the most rows, 3 CFG rows
        to a generation) unless set."""
        return self.pool_size or math.ceil(self.row_buckets[-1] / 3)

    @property
    def speaker_patches(self) -> int:
        """The most speaker keys a step may have."""
        return self.speaker_buckets[-1]

    def key_length(self, speaker_patches: int) -> int:
        """Keys after the block's own frames: prefix, text and speaker."""
        return self.prefix_patches + self.text_tokens + speaker_patches

    def fits(self, call: ModelCall) -> bool:
        """Whether the call's step can run at these shapes (else it takes the exact path)."""
        prefix = 0 if call.kv_latent is None else call.kv_latent[0][0].shape[1]
        return (call.x.shape[1] <= self.frame_buckets[-1]
                and call.x.shape[0] <= self.rows_at(self.frames_for(call.x.shape[1]))
                and prefix <= self.prefix_patches and call.text_mask.shape[1] <= self.text_tokens
                and call.kv_speaker[0][0].shape[1] <= self.speaker_patches)

    def frames_for(self, frames: int) -> int:
        return _bucket(self.frame_buckets, frames)

    def rows_for(self, rows: int, frames: int) -> int:
        return _bucket(self.row_buckets_at(frames), rows)

    def speakers_for(self, patches: int) -> int:
        return _bucket(self.speaker_buckets, patches)

    def all_shapes(self) -> list[tuple[int, int, int]]:
        """Every (frames, rows, speaker keys) a forward pass can have."""
        return [(f, r, p) for f in self.frame_buckets for r in self.row_buckets_at(f) for p in self.speaker_buckets]

    def stacked_bytes(self, model: EchoDiT, rows: int) -> int:
        """Bytes of the padded prefix, text and speaker keys and values StaticSteps pools for `rows`
        rows of each kind at the largest speaker bucket: every layer's (rows, Q + T + P, H, D) keys and
        values. A generation takes one row of each kind (its CFG rows share it)."""
        return rows * _cache_bytes(model, self.key_length(self.speaker_patches))

    def own_bytes(self, model: EchoDiT) -> int:
        """A generation's own prefix, text and speaker keys and values at most (one row: its guidance
        rows are views), which it keeps while it runs beside their copy in the pool (the speaker's as
        if every stream had a voice of its own; a request's speaker_kv_scale adds scaled_speaker_bytes)."""
        return _cache_bytes(model, self.key_length(self.speaker_patches))

    def scaled_speaker_bytes(self, model: EchoDiT) -> int:
        """The scaled copy of its voice's keys and values that a request with speaker_kv_scale holds
        beside the voice's own (inference.scale_speaker_kv), at most: every layer, the longest voice."""
        return _cache_bytes(model, self.speaker_patches)

    def pass_bytes(self, model: EchoDiT, rows: int) -> int:
        """What the largest pass holds at its peak when at most `rows` rows run (the pool's rows, or
        ECHO_MAX_ACTIVE's): per token a layer's activations (~12 of C and 3 of the MLP's width live
        at once), per row its keys and values gathered from the pool and joined behind its self keys,
        (rows, S + Q + T + P, H, D) each (compiled, the gather and the join are one kernel; eager, two).
        With CUDA graphs, the graphs' memory pool keeps it."""
        mlp = model.blocks[0].mlp.w2.in_features
        itemsize = torch.empty((), dtype=model.dtype).element_size()
        per_token = (12 * model.blocks[0].attention.num_heads * model.head_dim + 3 * mlp) * itemsize
        keys = self.key_length(self.speaker_patches)
        return max(r * (f * per_token + 2 * 2 * (f + keys) * _token_bytes(model))
                   for f in self.frame_buckets for r in [min(rows, self.rows_at(f))])


def _cache_bytes(model: EchoDiT, keys: int) -> int:
    """One row's keys and values of every layer, `keys` of them: (L, 2, keys, H, D)."""
    return len(model.blocks) * 2 * keys * _token_bytes(model)


def _token_bytes(model: EchoDiT) -> int:
    """One key (or value) of every head: H * D elements."""
    return model.blocks[0].attention.num_heads * model.head_dim * torch.empty((), dtype=model.dtype).element_size()


@dataclass(eq=False)
class _Entry:
    """One row of conditioning (one kind: prefix, text or speaker) in its pool: the pool row it was
    written to, weak references to the tensors seen holding it (it is stale once all are gone), and
    when it was last used. A released entry's row may hold another's keys."""

    row: int
    refs: dict[int, weakref.ref]  # id -> a tensor seen holding it (a cache's first layer's keys)
    used: int = 0
    released: bool = False

    @property
    def stale(self) -> bool:
        return all(ref() is None for ref in self.refs.values())

    def hold(self, tensor: Tensor) -> None:
        """Count `tensor` among its holders (forgetting those gone)."""
        self.refs = {i: ref for i, ref in self.refs.items() if ref() is not None}
        self.refs[id(tensor)] = weakref.ref(tensor)


@dataclass(eq=False)
class _Member:
    """A call's conditioning in the pool: per kind (the pool's order: prefix, text, speaker) its
    entries and each call row's pool row. Valid while the call's tensors live and no entry of it
    has been released."""

    sources: tuple  # weakref.ref of kv_latent[0][0] (or None), kv_text[0][0], kv_speaker[0][0]
    rows: tuple[tuple[int, ...], ...]  # per kind, per call row: its pool row
    entries: tuple[_Entry, ...]

    @staticmethod
    def named_by(call: ModelCall) -> tuple:
        latent = call.kv_latent[0][0] if call.kv_latent is not None else None
        return latent, call.kv_text[0][0], call.kv_speaker[0][0]  # (the masks matter to a lane, not to the pool)

    @property
    def valid(self) -> bool:
        return (all(ref is None or ref() is not None for ref in self.sources)
                and not any(e.released for e in self.entries))


class _Kind:
    """One kind's pool, (L, 2, N, length, H, D), and the entries written into it, by where their
    data lies (a row of the first layer's keys: its storage and offset there, and its length)."""

    def __init__(self, pool: Tensor):
        self.pool = pool
        self.free = list(range(pool.shape[2]))
        self.entries: dict[tuple[int, int, int], _Entry] = {}

    def release(self, key: tuple[int, int, int]) -> None:
        entry = self.entries.pop(key)
        entry.released = True
        self.free.append(entry.row)


class _Pool:
    """The prefix, text and speaker keys/values of the generations the static passes run, written
    once into persistent pools, (L, 2, N, Q | T | P, H, D) per kind, N the most generations at once.

    Each distinct row of conditioning has one entry, whoever holds it: a generation's CFG rows are
    views of its one row (inference.repeat_kv), its guided and unguided calls hold the same text and
    speaker keys, and streams of one voice hold the same speaker keys (the engine caches them per
    voice); so a generation takes one row of each kind, written once (its prefix once per block). An
    entry keeps its row until the tensors seen holding it are gone (the generation moved on) or,
    when rows run short, until it is the longest unused; a pass reads each of its rows' keys where
    they lie (EchoDiT.velocity's `rows`), so no step copies keys into a pass's inputs. The worker
    runs one frame bucket at a time: the others' entries stay. A row past its entry's own keys is
    zeroed and masked. A call that finds no room takes the exact path.

    Entries are named by where their data lies, which is sound while it lives: the caches are never
    written in place (each block's prefix, a scaled speaker cache are new tensors)."""

    def __init__(self, model: EchoDiT, shapes: StaticShapes, like: Tensor):
        attention, self.size = model.blocks[0].attention, shapes.pool_rows
        new = lambda length: _Kind(like.new_zeros(len(model.blocks), 2, self.size, length,  # noqa: E731
                                                  attention.num_heads, model.head_dim))
        self.kinds = ([new(shapes.prefix_patches)] if shapes.prefix_patches else []) + \
            [new(shapes.text_tokens), new(shapes.speaker_patches)]
        self.members: dict[tuple, _Member] = {}
        self.writes = 0  # entries written so far
        self._calls = 0
        self._caches: dict[int, tuple] = {}

    @property
    def pools(self) -> list[Tensor]:
        return [kind.pool for kind in self.kinds]

    @property
    def nbytes(self) -> int:
        return sum(p.untyped_storage().nbytes() for p in self.pools)

    def caches(self, speakers: int) -> tuple[KVCache, KVCache, KVCache | None]:
        """Per layer (N, length, H, D) views of the pools: text, speaker (its first `speakers` keys), prefix."""
        if speakers not in self._caches:
            layers = lambda pool: [(k, v) for k, v in pool.unbind(0)]  # noqa: E731
            *latent, text, speaker = self.pools
            self._caches[speakers] = (layers(text), layers(speaker[:, :, :, :speakers]),
                                      layers(latent[0]) if latent else None)
        return self._caches[speakers]

    def place(self, model: EchoDiT, calls: Sequence[ModelCall]) -> list[_Member | None]:
        """Each call's member (None: no room), writing the rows of conditioning seen for the first time.
        Every entry some call holds already is marked used first, so that no call's new rows evict
        what a later call in the list reads."""
        self._calls += 1
        for key in [k for k, m in self.members.items() if not m.valid]:
            del self.members[key]
        for kind in self.kinds:
            for key in [k for k, e in kind.entries.items() if e.stale]:
                kind.release(key)
        keys = [tuple(id(t) for t in _Member.named_by(c)) + (c.x.shape[0],) for c in calls]
        found = []  # per call: its member, or per kind its cache and the names of the cache's rows
        for call, key in zip(calls, keys):
            member = self.members.get(key)  # (a valid member's ids are its live tensors')
            if member is not None:
                found.append(member)
                held = member.entries
            else:
                caches = self._caches_of(model, call)
                named = [(kind, cache, self._names(cache)) for kind, cache in zip(self.kinds, caches)]
                found.append(named)
                held = [kind.entries[name] for kind, _, names in named for name in names if name in kind.entries]
            for entry in held:
                entry.used = self._calls
        out = []
        for call, key, member in zip(calls, keys, found):
            if not isinstance(member, _Member):
                member = self._member(call, member)
                if member is not None:
                    self.members[key] = member
            out.append(member)
        return out

    def _caches_of(self, model: EchoDiT, call: ModelCall) -> list[KVCache]:
        """The call's caches, one per kind of the pool."""
        return ([latent_kv_or_empty(model, call)] if len(self.kinds) == 3 else []) + [call.kv_text, call.kv_speaker]

    @staticmethod
    def _names(cache: KVCache) -> list[tuple[int, int, int]]:
        """What names each row of the cache's data: where its first layer's keys lie (their storage,
        offset there and length); none for a cache without keys."""
        first = cache[0][0]  # (n, length, H, D)
        if first.shape[1] == 0:  # (no keys: every row is masked; any row of finite numbers will do)
            return []
        storage = first.untyped_storage()._cdata  # (the storage itself: also on the meta device, for counts)
        return [(storage, first.storage_offset() + i * first.stride(0), first.shape[1]) for i in range(first.shape[0])]

    def _member(self, call: ModelCall, named: list[tuple[_Kind, KVCache, list]]) -> _Member | None:
        """The call's entries, found or written (`named`: per kind, the call's cache and its rows'
        names); None when a kind has no room for them."""
        plans = []
        for kind, cache, names in named:
            fresh = {name: i for i, name in reversed(list(enumerate(names))) if name not in kind.entries}
            plans.append((kind, cache, names, fresh))
        taken = []
        for kind, _, _, fresh in plans:
            room = self._rows(kind, len(fresh))
            if room is None:
                for earlier, rows in taken:
                    earlier.free += rows
                return None
            taken.append((kind, room))
        rows, entries, written = [], [], 0
        try:
            for (kind, cache, names, fresh), (_, room) in zip(plans, taken):
                if fresh:
                    self._write(kind, cache, [(i, row) for i, row in zip(fresh.values(), room)])
                for name, row in zip(fresh, room):
                    kind.entries[name] = _Entry(row, {}, used=self._calls)
                written += 1
                held = [kind.entries[name] for name in names]
                for entry in held:
                    entry.hold(cache[0][0])
                rows.append(tuple(e.row for e in held) if held else (0,) * call.x.shape[0])
                entries += dict.fromkeys(held)  # (distinct, in order)
        except BaseException:  # (a failed write: its rows and the later kinds' go back)
            for kind, room in taken[written:]:
                kind.free += room
            raise
        sources = tuple(None if t is None else weakref.ref(t) for t in _Member.named_by(call))
        return _Member(sources, tuple(rows), tuple(entries))

    def _rows(self, kind: _Kind, n: int) -> list[int] | None:
        """n free rows of `kind`, letting its longest-unused entries not used by this call go if
        there are too few."""
        if len(kind.free) < n:
            idle = sorted((e.used, key) for key, e in kind.entries.items() if e.used < self._calls)
            while len(kind.free) < n and idle:
                kind.release(idle.pop(0)[1])
        if len(kind.free) < n:
            return None
        kind.free.sort()
        rows, kind.free = kind.free[:n], kind.free[n:]
        return rows

    def _write(self, kind: _Kind, cache: KVCache, written: list[tuple[int, int]]) -> None:
        """Rows of `cache` into the kind's pool: (call row, pool row) pairs. A few ops, whatever the layers."""
        self.writes += len(written)
        pool = kind.pool
        rows = [i for i, _ in written]
        if rows == list(range(cache[0][0].shape[0])):  # (every row: no views to take; an unguided step's)
            tensors = [t for pair in cache for t in pair]
        else:  # (a view of each: a guided step's rows share one)
            pick = slice(rows[0], rows[0] + 1) if len(rows) == 1 else to_device(rows, pool.device)
            tensors = [t[pick] for pair in cache for t in pair]
        block = torch.stack(tensors).unflatten(0, (pool.shape[0], 2))
        index = to_device([row for _, row in written], pool.device)
        pool[:, :, :, :block.shape[3]].index_copy_(2, index, block)  # (L, 2, n, length, H, D)
        if block.shape[3] < pool.shape[3]:  # (what a former entry left there: masked, but zeroed)
            pool[:, :, :, block.shape[3]:].index_fill_(2, index, 0)


def to_device(values: list, device: torch.device) -> Tensor:
    """Host integers as a long tensor on `device`, without waiting for the device: through pinned
    memory on CUDA (the caching host allocator keeps the buffer until the copy has run)."""
    host = torch.tensor(values, dtype=torch.long)
    if device.type != "cuda":
        return host.to(device)
    try:
        pinned = host.pin_memory()
    except RuntimeError:  # (no pinned memory to be had: a plain copy)
        return host.to(device)
    return pinned.to(device, non_blocking=True)


@dataclass(eq=False)
class _Lane:
    """One frame bucket's pass inputs that change only with its members: each row's pool row, frame
    positions and key mask, in storage allocated once, so every pass of the bucket reads them at the
    same addresses (what a CUDA graph replays)."""

    storage: tuple[Tensor, Tensor, Tensor]  # flat: pool rows (kinds * N), positions (N * S), key mask (N * (S + K))
    members: _LaneMembers | None = None  # what the inputs were written for
    inputs: tuple[Tensor, Tensor, Tensor] | None = None  # rows (kinds, R), positions (R, S), key mask (R, S + K)


@dataclass(frozen=True)
class _LaneMembers:
    """The calls a lane's inputs were written for: their pool members, sizes and masks (weakly)."""

    members: tuple[_Member, ...]
    sizes: tuple[tuple[int, int, int], ...]  # per call: rows, frames, start position
    masks: tuple  # weakref.ref of each call's text and speaker masks

    @classmethod
    def of(cls, members: Sequence[_Member], calls: Sequence[ModelCall]) -> _LaneMembers:
        return cls(tuple(members), _sizes(calls), tuple(weakref.ref(m) for c in calls for m in (c.text_mask,
                                                                                               c.speaker_mask)))

    def same(self, members: Sequence[_Member], calls: Sequence[ModelCall]) -> bool:
        """The same member objects, in order, at the same sizes, with the same mask tensors."""
        return (len(members) == len(self.members) and all(a is b for a, b in zip(members, self.members))
                and self.sizes == _sizes(calls)
                and all(ref() is m for ref, m in zip(self.masks, (m for c in calls for m in (c.text_mask,
                                                                                               c.speaker_mask)))))


def _sizes(calls: Sequence[ModelCall]) -> tuple[tuple[int, int, int], ...]:
    return tuple((*c.x.shape[:2], c.start_pos) for c in calls)


@dataclass(frozen=True)
class _Graph:
    """A CUDA graph of one whole step pass, and the output its replays write."""

    graph: object  # torch.cuda.CUDAGraph
    out: Tensor


@contextmanager
def current_stream_kept() -> Iterator[None]:
    """The thread's current CUDA stream is the same after the block, also when it raises:
    torch.cuda.graph's exit ends the capture before it restores the stream, so a capture that CUDA
    refuses would leave the thread on the capture's side stream (and what ran there next, unordered
    with the other threads' work on the default stream)."""
    stream = torch.cuda.current_stream()
    try:
        yield
    finally:
        torch.cuda.set_stream(stream)


def _view(flat: Tensor, *shape: int) -> Tensor:
    """The first elements of `flat`, as a contiguous tensor of `shape` (its address is flat's)."""
    return flat[:math.prod(shape)].view(shape)


class StaticSteps:
    """The static-shape runner (see the module docstring).

    Everything a pass reads lives at addresses fixed for the runner's life: the keys/values in a
    row pool (_Pool), each frame bucket's row indices, positions and key mask (_Lane), and one
    buffer each for the latents and the AdaLN rows, written per step. `compile` compiles the
    decoder blocks (CompiledBlocks; `backend`, inductor by default); `cuda_graphs` captures one CUDA
    graph per pass shape, the whole step (24 blocks and all), whose replay copies nothing.
    `warm_up` runs every shape, so no request waits for a compile or a capture.
    """

    def __init__(self, model: EchoDiT, shapes: StaticShapes, compile: bool = False, cuda_graphs: bool = False,
                 backend: str | Callable = "inductor"):
        self.model = model
        self.shapes = shapes
        self.cuda_graphs = cuda_graphs
        self._velocity = model.velocity
        self._compiled: CompiledPart | None = None
        if compile:
            shapes_compiled = len(shapes.frame_buckets) * len(shapes.speaker_buckets)  # each for one row and several
            self._compiled = CompiledPart("step", 2 * shapes_compiled + 2)
            self._velocity = partial(model.velocity, run_block=CompiledBlocks(backend))
        self._pool: _Pool | None = None
        self._lanes: dict[int, _Lane] = {}
        self._step_inputs: tuple[Tensor, Tensor] | None = None  # flat: latents (N * S_max * 80), AdaLN rows
        self._graphs: dict[tuple[int, int, int], _Graph] = {}
        self._graph_memory = None
        self.last_inputs: tuple = ()  # (what the last pass read: for the benchmarks' counts)
        self._warmed_up = False

    @property
    def compiles_after_warm_up(self) -> int:
        return self._compiled.compiles_after_warm_up if self._compiled else 0

    @property
    def graphs(self) -> int:
        """CUDA graphs captured (one per pass shape warm-up ran)."""
        return len(self._graphs)

    def __call__(self, calls: Sequence[ModelCall]) -> list[Tensor]:
        out: list[Tensor | None] = [None] * len(calls)
        fitting = [i for i, c in enumerate(calls) if self.shapes.fits(c)]
        placed = self._place([calls[i] for i in fitting])
        pooled: dict[int, _Member] = {i: member for i, member in zip(fitting, placed) if member is not None}
        by_frames: dict[int, list[int]] = {}
        for i in pooled:
            by_frames.setdefault(self.shapes.frames_for(calls[i].x.shape[1]), []).append(i)
        for frames, indices in sorted(by_frames.items()):
            for pack in self._packs(indices, calls, self.shapes.rows_at(frames)):
                for i, v in zip(pack, self._forward([calls[i] for i in pack], [pooled[i] for i in pack], frames)):
                    out[i] = v
        odd = [i for i, v in enumerate(out) if v is None]
        if odd:
            log.debug("%d steps outside the static shapes (or the pool) run on the exact path", len(odd))
            for i, v in zip(odd, batched_velocity(self.model, [calls[i] for i in odd])):
                out[i] = v
        return out

    @staticmethod
    def _packs(indices: list[int], calls: Sequence[ModelCall], rows: int) -> list[list[int]]:
        """The calls in runs of at most `rows` rows (the bucket's pass size), in order."""
        packs, n = [[]], 0
        for i in indices:
            if n + calls[i].x.shape[0] > rows:
                packs.append([])
                n = 0
            packs[-1].append(i)
            n += calls[i].x.shape[0]
        return packs

    @property
    def stacked_bytes(self) -> int:
        """Bytes of the pooled prefix, text and speaker keys/values (allocated at the first step)."""
        return self._pool.nbytes if self._pool is not None else 0

    def _place(self, calls: Sequence[ModelCall]) -> list[_Member | None]:
        if self._pool is None:
            if not calls:
                return []
            self._pool_for(calls[0])
        return self._pool.place(self.model, calls)

    @torch.inference_mode(False)  # (the runner's buffers outlive any one call: written in and out of inference mode)
    def _pool_for(self, like: ModelCall) -> _Pool:
        if self._pool is None:
            self._pool = _Pool(self.model, self.shapes, like.kv_text[0][0])
            s = self.shapes
            tokens = max(s.rows_at(f) * f for f in s.frame_buckets)
            rows = max(s.rows_at(f) for f in s.frame_buckets)
            self._step_inputs = (like.x.new_zeros(tokens * LATENT_SIZE),
                                 self._pool.pools[0].new_zeros(len(self.model.blocks) * 2 * rows
                                                               * self._modulation_size))
        return self._pool

    @property
    def _modulation_size(self) -> int:
        attention = self.model.blocks[0].attention
        return 3 * attention.num_heads * attention.head_dim  # (2, B, 1, 3C) per block

    def _forward(self, calls: Sequence[ModelCall], members: list[_Member], frames: int) -> list[Tensor]:
        n = sum(c.x.shape[0] for c in calls)
        padded_rows = self.shapes.rows_for(n, frames)
        speakers = self.shapes.speakers_for(max(c.kv_speaker[0][0].shape[1] for c in calls))
        rows, positions, key_mask = self._lane_inputs(calls, members, frames, padded_rows, speakers)
        flat_x, flat_modulation = self._step_inputs
        x = _view(flat_x, padded_rows, frames, LATENT_SIZE)
        if all(c.x.shape[1] == frames for c in calls):
            torch.cat([c.x for c in calls], out=x[:n])
        else:  # the frames past a short block's end zeroed: masked as keys, but a stale NaN there (another
            for c, rows_of in zip(calls, row_slices(calls)):  # request's divergence) times weight 0 is NaN
                x[rows_of, :c.x.shape[1]] = c.x
                if c.x.shape[1] < frames:
                    x[rows_of, c.x.shape[1]:] = 0
        modulation = _view(flat_modulation, len(self.model.blocks), 2, padded_rows, 1, self._modulation_size)
        if timed_modulations(self.model, calls, out=modulation[:, :, :n]) is None:  # a call without its time
            modulation[:, :, :n] = self.model.modulations(torch.cat([c.t for c in calls]))
        args = self.last_inputs = (x, modulation, positions, key_mask, self._pool.caches(speakers), rows)
        v = self._run((frames, padded_rows, speakers), args)
        parts = v[:n].split([c.x.shape[0] for c in calls])
        return [p if c.x.shape[1] == frames else p[:, :c.x.shape[1]] for c, p in zip(calls, parts)]

    def _body(self, x: Tensor, modulation: Tensor, positions: Tensor, key_mask: Tensor, caches: tuple,
              rows: Tensor) -> Tensor:
        """One step pass: what a CUDA graph captures."""
        return self._velocity(x, None, positions, key_mask, *caches, modulation=modulation, rows=rows)

    def _run(self, shape: tuple[int, int, int], args: tuple) -> Tensor:
        with self._compiled.call(args[0].shape) if self._compiled else nullcontext():
            if not self.cuda_graphs:
                return self._body(*args)
            graph = self._graphs.get(shape)
            if graph is None:
                if self._warmed_up:
                    log.warning("capturing a CUDA graph while serving, for a step of shape %s: warm-up missed it",
                                shape)
                graph = self._graphs[shape] = self._capture(args)
            graph.graph.replay()
            return graph.out.clone()  # (the next replay of any graph may overwrite it)

    def _capture(self, args: tuple) -> _Graph:
        """A CUDA graph of _body(*args), after running it twice on a side stream (compiling it, and
        letting kernels set up their workspaces outside the capture). All graphs share one memory
        pool: they never run at the same time."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._body(*args)
        torch.cuda.current_stream().wait_stream(stream)
        if self._graph_memory is None:
            self._graph_memory = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with current_stream_kept():
            with torch.cuda.graph(graph, pool=self._graph_memory, capture_error_mode="thread_local"):  # (other threads)
                out = self._body(*args)
        return _Graph(graph, out)

    def _lane_inputs(self, calls: Sequence[ModelCall], members: list[_Member], frames: int, padded_rows: int,
                     speakers: int) -> tuple[Tensor, Tensor, Tensor]:
        """The bucket's pool rows, positions and key mask: rewritten only when its members change."""
        lane = self._lanes.get(frames)
        if lane is None:
            s, size, device = self.shapes, self.shapes.rows_at(frames), calls[0].x.device
            with torch.inference_mode(False):  # (as the pool)
                lane = self._lanes[frames] = _Lane((
                    torch.zeros(len(self._pool.kinds) * size, dtype=torch.long, device=device),
                    torch.zeros(size * frames, dtype=torch.long, device=device),
                    torch.zeros(size * (frames + s.key_length(s.speaker_patches)), dtype=torch.bool, device=device)))
        if lane.members is not None and lane.members.same(members, calls):
            return lane.inputs
        lane.members = None  # (until rewritten whole)
        s = self.shapes
        flat_rows, flat_positions, flat_mask = lane.storage
        kinds = len(self._pool.kinds)
        rows, positions = _view(flat_rows, kinds, padded_rows), _view(flat_positions, padded_rows, frames)
        key_mask = _view(flat_mask, padded_rows, frames + s.key_length(speakers))
        q0, t0 = frames + s.prefix_patches, frames + s.prefix_patches + s.text_tokens
        every = [[r for member in members for r in member.rows[k]] for k in range(kinds)]
        rows.copy_(to_device([of_kind + of_kind[:1] * (padded_rows - len(of_kind)) for of_kind in every], rows.device))
        positions.copy_(torch.arange(frames, device=positions.device).expand(padded_rows, frames))
        key_mask.zero_()
        key_mask[:, 0] = True  # padding rows see one key (no row may see none: that gives NaN)
        for c, rows_of in zip(calls, row_slices(calls)):
            positions[rows_of] += c.start_pos
            key_mask[rows_of, :c.x.shape[1]] = True
            if c.kv_latent is not None:  # every patch of the prefix precedes the block
                key_mask[rows_of, frames:frames + c.kv_latent[0][0].shape[1]] = True
            key_mask[rows_of, q0:q0 + c.text_mask.shape[1]] = c.text_mask
            speaker = c.speaker_mask[:, ::self.model.speaker_patch_size]
            key_mask[rows_of, t0:t0 + speaker.shape[1]] = speaker
        lane.members, lane.inputs = _LaneMembers.of(members, calls), (rows, positions, key_mask)
        return lane.inputs

    @torch.inference_mode()
    def warm_up(self, on_shape: Callable[[], None] = lambda: None) -> None:
        """Every shape, so compilation (and with CUDA graphs, capture) happens now; `on_shape()` after
        each shape. Call it on the thread that will serve: dynamo's settings are per thread."""
        for frames, rows, speakers in self.shapes.all_shapes():
            self([self._zero_call(frames, rows, speakers)])
            on_shape()
        self([])  # (frees the warm-up's pool rows)
        self._warmed_up = True
        if self._compiled:
            self._compiled.warmed_up = True

    def _zero_call(self, frames: int, rows: int, speakers: int) -> ModelCall:
        """A step of exactly this shape (zeros; new tensors, as a new generation's would be, its rows
        sharing one row of conditioning, as a generation's CFG rows do)."""
        m, s = self.model, self.shapes
        x = torch.zeros(rows, frames, LATENT_SIZE, device=m.device, dtype=m.dtype)
        return ModelCall(x=x, t=x.new_full((rows,), 0.5), start_pos=0, time=0.5,
                         text_mask=torch.ones(rows, s.text_tokens, dtype=torch.bool, device=m.device),
                         speaker_mask=torch.ones(rows, speakers * m.speaker_patch_size, dtype=torch.bool,
                                                 device=m.device),
                         kv_text=repeat_kv(zero_kv(m, 1, s.text_tokens, x), rows),
                         kv_speaker=repeat_kv(zero_kv(m, 1, speakers, x), rows),
                         kv_latent=repeat_kv(zero_kv(m, 1, s.prefix_patches, x), rows) if s.prefix_patches else None)


class CompiledBlocks:
    """Runs EchoDiT's decoder blocks through one torch.compile'd function (regional compilation).

    The 24 blocks share their code, so one graph per shape serves them all: compiling takes a
    block's time, not the whole decoder's. Graphs are specialised on every dimension except the
    row count, which is dynamic from two rows on: one graph per (frame bucket, speaker bucket) for
    a single row and one for more. The prologue and epilogue around the blocks (timestep and input
    projections, RoPE angles, output norm) are a few small kernels and stay eager.
    """

    def __init__(self, backend: str | Callable = "inductor"):
        self._block = torch.compile(call_block, backend=backend, dynamic=False)

    def __call__(self, block, h: Tensor, *args) -> Tensor:
        if h.shape[0] > 1:
            torch._dynamo.maybe_mark_dynamic(args[0], 1)  # modulation (2, B, 1, 3C)
            for tensor in (h, *args[1:4]):  # cos, sin, key_mask (the pools are fixed)
                torch._dynamo.maybe_mark_dynamic(tensor, 0)
            if args[-1] is not None:
                torch._dynamo.maybe_mark_dynamic(args[-1], 1)  # pool rows (kinds, B)
        return self._block(block, h, *args)


class CompiledPart:
    """What every compiled part of the server (steps, text encoder, prefix encoder, streaming decoder)
    does around a call: let dynamo keep the part's planned graphs per function on the calling thread
    (its settings are per thread in torch 2.13, and past the limit it would run the remaining shapes
    eager, silently), and count the graphs built once `warmed_up`, each a shape the warm-up missed
    (logged, and in /metrics)."""

    def __init__(self, what: str, graphs: int):
        self.what, self.graphs = what, graphs
        self.warmed_up = False
        self.compiles_after_warm_up = 0

    @contextmanager
    def call(self, shape: Sequence[int]) -> Iterator[None]:
        config = torch._dynamo.config
        name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # (torch < 2.7)
        if getattr(config, name) < self.graphs:  # (set only when lower: a setting invalidates dynamo's config hash)
            setattr(config, name, self.graphs)
        before = compiled_graphs()
        yield
        if self.warmed_up and (new := compiled_graphs() - before):
            self.compiles_after_warm_up += new
            log.warning("compiled %d new %s graph(s) while serving, for an input of shape %s: warm-up missed it",
                        new, self.what, tuple(shape))


def compiled_graphs() -> int:
    """Graphs torch.compile has built in this process so far."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]

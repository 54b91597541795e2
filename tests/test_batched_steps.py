"""The step runners, checked on CPU. The exact runner: bit for bit what each generation computes
alone, one pass per frame count (nothing padded), keys/values laid out once and reused while a
generation's conditioning stays the same, guidance rows sharing the conditioning's keys/values.
The static-shape runner (the CUDA fast path): same velocities and audio as the exact path, a
bounded set of shapes that warm-up covers (so compiled graphs never recompile while serving), and
compile artifacts that a later process reloads."""

import asyncio
import dataclasses
import json
import os
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
import torch

import batched_steps as bwd
import engine as eng
import inference as inf
import worker as wk
from batched_steps import (SHORT_VOICE_PATCHES, ExactSteps, StaticShapes, StaticSteps, batched_velocity,
                           row_buckets)
from conftest import ROOT
from inference_blockwise import PrefixCall
from model import EchoDiT, LatentPrefix, extend_prefixes
from test_engine import SETTINGS, _collect, first_step, load_clip, mixed_jobs, speaker_of
from voices import SpeakerCache

BLOCKS = (4, 6, 8, 12, 16)  # every block size mixed_jobs uses


def static_steps(model, max_rows=12, **kwargs) -> StaticSteps:
    return StaticSteps(model, StaticShapes.covering(BLOCKS, max_rows=max_rows), **kwargs)


def first_calls(engine, jobs, skip_blocks=0):
    """Each job's first diffusion step, after `skip_blocks` blocks (so the prefix is not empty)."""
    calls = []
    for job in jobs:
        steps = engine.job_steps(job)
        item = first_step(steps)
        try:
            for _ in range(skip_blocks):
                while isinstance(item, eng.ModelCall):
                    item = steps.send(item.run(engine.model))
                item = steps.send(torch.zeros(1, 1, item.z.shape[-1] * 2048))  # a DecodeCall's audio
                while not isinstance(item, eng.ModelCall):  # its audio, then its block into the prefix
                    item = steps.send(item.run() if isinstance(item, PrefixCall) else None)
        except StopIteration:  # a one-block job
            continue
        calls.append(item)
    return calls


def test_row_buckets_grow_by_at_most_half():
    assert row_buckets(24) == (1, 2, 3, 4, 6, 8, 12, 16, 24)
    assert row_buckets(9) == (1, 2, 3, 4, 6, 8, 9)
    assert row_buckets(1) == (1,)


def test_shapes_round_up_to_buckets():
    shapes = StaticShapes.covering((32, 128, 480), max_rows=24, max_speaker_latent_length=6400)
    assert shapes.frame_buckets == (32, 128, 480, 640)
    assert (shapes.frames_for(100), shapes.frames_for(32), shapes.rows_for(5, 32), shapes.rows_for(24, 32)) == \
        (128, 32, 6, 24)
    assert (shapes.prefix_patches, shapes.text_tokens, shapes.speaker_buckets) == (160, 768, (160, 1600))
    assert (shapes.speakers_for(54), shapes.speakers_for(161), shapes.speaker_patches) == (160, 1600, 1600)
    assert len(shapes.all_shapes()) == 4 * 9 * 2
    busy = StaticShapes.covering((32, 128, 480), max_rows=192)  # 64 streams: a pass holds 16384 tokens at most
    assert [busy.rows_at(f) for f in busy.frame_buckets] == [192, 128, 34, 25]
    assert busy.row_buckets_at(480)[-3:] == (24, 32, 34) and busy.rows_for(40, 128) == 48
    short = StaticShapes.covering((32,), max_rows=3, max_speaker_latent_length=400)  # voices up to ~18 s
    assert short.speaker_buckets == (100,) and short.key_length(100) == 160 + 768 + 100


@pytest.fixture()
def engine(tiny_model, tiny_fish, tiny_pca):
    return eng.SpeechEngine(tiny_model, tiny_fish, tiny_pca, SpeakerCache(4))


@pytest.mark.parametrize("skip_blocks", [0, 1])
def test_static_forward_equals_exact_forward(engine, tiny_model, skip_blocks):
    calls = first_calls(engine, mixed_jobs(load_clip()), skip_blocks)
    assert len({c.x.shape[1] for c in calls}) > 1 and len({c.x.shape[0] for c in calls}) > 1
    exact = batched_velocity(tiny_model, calls)
    padded = static_steps(tiny_model)(calls)
    for e, p in zip(exact, padded, strict=True):
        assert p.shape == e.shape
        torch.testing.assert_close(p, e, rtol=1e-5, atol=1e-5)


def test_a_diverged_generation_leaves_nothing_in_the_step_buffer_that_a_shorter_block_reads(engine, tiny_model):
    """A block shorter than its frame bucket is written into the shared step input: the frames past
    its end kept what an earlier step left there. They are masked as keys, yet their values are
    weighted by 0, and 0 x NaN is NaN: one request whose latents went non-finite (float16 with
    extreme guidance) made every later request of shorter blocks in its rows all NaN."""
    import dataclasses

    calls = first_calls(engine, mixed_jobs(load_clip()))
    short = next(c for c in calls if c.x.shape[1] < 16)  # padded to the one 16-frame bucket
    full = next(c for c in calls if c.x.shape[1] == 16)
    steps = StaticSteps(tiny_model, StaticShapes.covering((16,), max_rows=12))
    with torch.inference_mode():
        before = steps([short])[0]
        steps([dataclasses.replace(full, x=torch.full_like(full.x, float("nan")))])  # a diverged generation
        after = steps([short])[0]
    assert torch.isfinite(before).all() and torch.equal(after, before)


def test_a_voice_longer_than_30_s_pads_its_batch_to_the_long_speaker_bucket(engine, tiny_model):
    clip = load_clip()
    long_clip = clip.repeat(1, -(-35 * 44100 // clip.shape[1]))[:, :35 * 44100]  # 35 s: 753 frames, 189 patches
    jobs = mixed_jobs(clip)[:2] + [eng.SpeechJob(("[S1] A long voice.",), speaker_of(long_clip, "long"), 5,
                                                 eng.BlockShape((8,), (2,)), eng.BlockShape((8,), (2,)), SETTINGS)]
    calls = first_calls(engine, jobs)
    steps = static_steps(tiny_model)
    assert max(c.kv_speaker[0][0].shape[1] for c in calls) > SHORT_VOICE_PATCHES
    for e, p in zip(batched_velocity(tiny_model, calls), steps(calls), strict=True):
        torch.testing.assert_close(p, e, rtol=1e-5, atol=1e-5)
    widths = {frames: lane.inputs[2].shape[1] - frames for frames, lane in steps._lanes.items()}  # key masks
    assert widths == {4: 160 + 768 + SHORT_VOICE_PATCHES, 8: 160 + 768 + 1600}  # only the long voice's batch


def next_step(call: eng.ModelCall, seed: int) -> eng.ModelCall:
    """The call's generation one step on: new latents, the same conditioning objects."""
    x = torch.randn(call.x.shape, generator=torch.Generator().manual_seed(seed)).to(call.x.device, call.x.dtype)
    return dataclasses.replace(call, x=x)


@pytest.mark.parametrize("skip_blocks", [0, 1])
def test_exact_steps_equal_solo_steps_bit_for_bit(engine, tiny_model, skip_blocks):
    calls = first_calls(engine, mixed_jobs(load_clip()), skip_blocks)
    assert len({c.x.shape[1] for c in calls}) > 1 and len({c.text_mask.shape[1] for c in calls}) > 1
    steps = ExactSteps(tiny_model)
    for seed in range(3):  # later steps reuse the keys laid out by the first, self keys rewritten
        calls = [next_step(c, seed * 10 + i) for i, c in enumerate(calls)] if seed else calls
        for call, v in zip(calls, steps(calls), strict=True):
            assert torch.equal(v, call.run(tiny_model))


def test_a_generation_adds_only_its_attention_kernel_to_a_batched_step(engine, tiny_model):
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.count += 1
            return func(*args, **(kwargs or {}))

    call = first_calls(engine, mixed_jobs(load_clip()))[0]
    same_frames = [dataclasses.replace(call, kv_text=list(call.kv_text)) for _ in range(3)]  # 3 generations

    def ops(calls) -> int:
        steps = ExactSteps(tiny_model)
        steps(calls)  # laid out; the next step reuses the layout
        with Ops() as counted:
            steps(calls)
        return counted.count

    layer = tiny_model.blocks[0].attention
    q = torch.zeros(call.x.shape[0], layer.num_heads, call.x.shape[1], tiny_model.head_dim)
    keys, mask = torch.zeros(call.x.shape[0], layer.num_heads, 50, tiny_model.head_dim), torch.ones(1, 1, 1, 50).bool()
    with Ops() as one_kernel:
        torch.nn.functional.scaled_dot_product_attention(q, keys, keys, attn_mask=mask)
    added = (ops(same_frames) - ops(same_frames[:1])) / 2
    assert added == one_kernel.count * len(tiny_model.blocks) + 1  # + its row of the AdaLN table (an expand)


def test_the_same_call_twice_in_one_step_gets_its_velocity_twice(engine, tiny_model):
    call = first_calls(engine, mixed_jobs(load_clip()))[0]
    twice = ExactSteps(tiny_model)([call, call])
    assert torch.equal(twice[0], call.run(tiny_model)) and torch.equal(twice[1], twice[0])


def test_exact_steps_pad_nothing(engine, tiny_model):
    calls = first_calls(engine, mixed_jobs(load_clip()))
    passes = []
    hook = tiny_model.in_proj.register_forward_pre_hook(lambda module, args: passes.append(tuple(args[0].shape[:2])))
    try:
        ExactSteps(tiny_model)(calls)
    finally:
        hook.remove()
    rows_per_frames = {}
    for c in calls:
        rows_per_frames[c.x.shape[1]] = rows_per_frames.get(c.x.shape[1], 0) + c.x.shape[0]
    assert len(rows_per_frames) > 1
    assert sorted(passes) == sorted((rows, frames) for frames, rows in rows_per_frames.items())


def test_an_idle_worker_keeps_no_finished_generations_keys(engine):
    """ExactSteps let layouts go only as later steps ran: once the server went idle, the last batch's
    layouts kept every finished (or cancelled) job's text, speaker and prefix keys/values, about
    660 MiB per job at full size, until traffic came back, and the next burst started above them."""
    worker = wk.GenerationWorker(engine, max_waiting=8, max_active=8)

    async def run():
        streams = [worker.submit(job) for job in mixed_jobs(load_clip())]
        return [[block async for block in stream] for stream in streams]

    try:
        asyncio.run(run())
        assert engine.steps.layouts_built > 0
        assert worker.call(lambda: engine.steps.layouts_kept) == 0  # (run once the worker has nothing to do)
    finally:
        worker.close()


def test_exact_steps_keep_keys_until_membership_changes(engine, tiny_model):
    calls = first_calls(engine, mixed_jobs(load_clip()))
    steps = ExactSteps(tiny_model, keep_for=2)
    steps(calls)
    assert steps.layouts_built == steps.layouts_kept == len(calls)
    calls = [next_step(c, i) for i, c in enumerate(calls)]
    steps(calls)
    assert steps.layouts_built == len(calls)  # a new step of the same generations: nothing laid out again
    changed = dataclasses.replace(calls[0], kv_text=list(calls[0].kv_text))  # e.g. a generation's next CFG phase
    for call, v in zip([changed, *calls[1:]], steps([changed, *calls[1:]]), strict=True):
        assert torch.equal(v, call.run(tiny_model))
    assert steps.layouts_built == len(calls) + 1  # only the changed generation is laid out again
    steps(calls[1:2])
    steps(calls[1:2])
    assert steps.layouts_kept == 1  # the others went unused for keep_for calls: their keys are let go


def test_guidance_rows_share_the_conditionings_keys_and_values(tiny_model):
    ids, mask = inf.get_text_input_ids_and_mask(["[S1] Hello."], max_length=None)
    speaker, speaker_mask = inf.no_speaker(8, "cpu", torch.float32)
    conditioning = inf.Conditioning(tiny_model, speaker, speaker_mask, ids, mask,
                                    inf.SamplerSettings(2, 3.0, 8.0, 0.5, 1.0))
    _, _, kv_text, kv_speaker = conditioning.batch((inf.COND, inf.NO_TEXT, inf.NO_SPEAKER), False)
    for batched, alone in ((kv_text, conditioning.kv_text), (kv_speaker, conditioning.kv_speaker[False])):
        for (k, v), (k1, v1) in zip(batched, alone, strict=True):
            assert k.shape[0] == 3 and torch.equal(k[2], k1[0]) and torch.equal(v[1], v1[0])
            assert k.untyped_storage().data_ptr() == k1.untyped_storage().data_ptr() and k.stride(0) == 0


def distinct(calls, kind):
    """How many distinct rows of conditioning of `kind` the calls hold (by where the data lies)."""
    return len({(getattr(c, kind)[0][0][i].data_ptr(), getattr(c, kind)[0][0].shape[1])
                for c in calls if getattr(c, kind) is not None for i in range(c.x.shape[0])})


def test_keys_are_written_into_the_pool_once_and_their_rows_freed_when_the_generation_moves_on(engine, tiny_model):
    """As the worker runs them, one frame bucket at a time: a generation's keys go into the pool at
    its first step, one row of each kind (its CFG rows share it), and the other buckets' steps leave
    them there; keys whose tensors are gone (their generation moved on) give their rows back."""
    calls = first_calls(engine, mixed_jobs(load_clip()), skip_blocks=1)
    steps = static_steps(tiny_model, max_rows=24)
    buckets = {steps.shapes.frames_for(c.x.shape[1]) for c in calls}
    assert len(buckets) > 1 and any(c.x.shape[0] == 3 for c in calls)
    for seed in range(3):
        calls = [next_step(c, seed) for c in calls]
        for bucket in sorted(buckets):
            mine = [c for c in calls if steps.shapes.frames_for(c.x.shape[1]) == bucket]
            for e, p in zip(batched_velocity(tiny_model, mine), steps(mine), strict=True):
                torch.testing.assert_close(p, e, rtol=1e-5, atol=1e-5)
    pool = steps._pool
    held = [distinct(calls, kind) for kind in ("kv_latent", "kv_text", "kv_speaker")]
    assert held[0] == held[1] == len(calls)  # one row each, whatever the CFG rows
    assert [len(k.entries) for k in pool.kinds] == held and pool.writes == sum(held)
    assert [len(k.free) for k in pool.kinds] == [pool.size - n for n in held]
    moved_on = dataclasses.replace(calls[0], kv_text=[(k[:1].clone().expand(k.shape), v[:1].clone().expand(v.shape))
                                                      for k, v in calls[0].kv_text])  # (as inference.repeat_kv)
    calls[0] = mine = None  # the last references to the generation's old text keys
    steps([moved_on])
    assert pool.writes == sum(held) + 1  # its new text keys alone
    assert [len(k.free) for k in pool.kinds] == [pool.size - n for n in held]  # its old row back, one taken


def test_a_generations_guided_and_unguided_steps_and_one_voices_streams_share_their_rows(tiny_model, tiny_fish,
                                                                                         tiny_pca):
    """Per generation: its text keys written once, its prefix once per block, whatever the CFG phase;
    streams of one voice hold one row of its speaker keys (the server's engine keeps them per voice)."""
    engine = eng.SpeechEngine(tiny_model, tiny_fish, tiny_pca, SpeakerCache(4), speaker_kv_cache=SpeakerCache(2))
    voice = speaker_of(load_clip(), "a")
    shape = eng.BlockShape((8, 8), (4, 4))
    jobs = [eng.SpeechJob((text,), voice, seed, shape, shape, SETTINGS)
            for seed, text in enumerate(("[S1] One voice.", "[S1] Two streams of it."))]
    steps = static_steps(tiny_model, max_rows=6)
    gens, written, rows = [engine.job_steps(job) for job in jobs], [], set()
    items = [first_step(g) for g in gens]
    while any(item is not None for item in items):
        calls = [item for item in items if isinstance(item, eng.ModelCall)]
        velocities = dict(zip(map(id, calls), steps(calls))) if calls else {}
        for p, e in zip(velocities.values(), batched_velocity(tiny_model, calls) if calls else [], strict=True):
            torch.testing.assert_close(p, e, rtol=1e-5, atol=1e-5)
        rows |= {c.x.shape[0] for c in calls}
        written.append(steps._pool.writes)
        for i, (g, item) in enumerate(zip(gens, items)):
            if item is None:
                continue
            try:
                if isinstance(item, eng.ModelCall):
                    items[i] = g.send(velocities[id(item)])
                else:
                    items[i] = g.send(item.run() if isinstance(item, PrefixCall) else
                                      torch.zeros(1, 1, item.z.shape[-1] * 2048) if isinstance(item, eng.DecodeCall)
                                      else None)
            except StopIteration:
                items[i] = None
    assert rows == {1, 3}  # guided and unguided steps in both blocks
    # first block: both texts and the voice once; second block: both prefixes once
    assert sorted(set(written)) == [3, 5]


def test_a_full_pool_lets_the_longest_unused_conditioning_go(engine, tiny_model):
    one, two = first_calls(engine, mixed_jobs(load_clip()))[:2]
    steps = static_steps(tiny_model, max_rows=3)  # room for one generation at a time
    for call in (one, two, one):
        torch.testing.assert_close(steps([call])[0], batched_velocity(tiny_model, [call])[0], rtol=1e-5, atol=1e-5)
    assert steps._pool.writes == 3 * 2  # its text and speaker keys, each time
    assert [len(kind.entries) for kind in steps._pool.kinds] == [0, 1, 1]  # (no prefix in a first block)


def random_kv(model, length: int, g: torch.Generator) -> list:
    """A one-row key/value cache of random numbers, (1, length, H, D) per layer."""
    shape = (1, length, model.blocks[0].attention.num_heads, model.head_dim)
    return [(torch.randn(shape, generator=g), torch.randn(shape, generator=g)) for _ in model.blocks]


def conditioned_call(model, frames: int, rows: int, text, speaker, prefix=None, g=None, time=0.5) -> eng.ModelCall:
    """A step of a generation with these one-row caches, its `rows` CFG rows views of them (as
    inference.repeat_kv makes them); the second row drops the text, the third the voice."""
    text_mask = torch.ones(rows, text[0][0].shape[1], dtype=torch.bool)
    speaker_mask = torch.ones(rows, speaker[0][0].shape[1] * model.speaker_patch_size, dtype=torch.bool)
    text_mask[1:2] = False
    speaker_mask[2:3] = False
    return eng.ModelCall(x=torch.randn(rows, frames, inf.LATENT_SIZE, generator=g), t=torch.full((rows,), time),
                         start_pos=0, text_mask=text_mask, speaker_mask=speaker_mask, time=time,
                         kv_text=inf.repeat_kv(text, rows), kv_speaker=inf.repeat_kv(speaker, rows),
                         kv_latent=None if prefix is None else inf.repeat_kv(prefix, rows))


def test_no_call_reads_rows_that_an_earlier_call_of_the_same_step_took(tiny_model):
    """Rows of two generations: B's are the longest unused when C arrives in the same step as B, so
    C's new rows must come from elsewhere (here: A's), not from under B."""
    g = torch.Generator().manual_seed(0)
    shapes = dataclasses.replace(StaticShapes.covering((4,), max_rows=6, max_speaker_latent_length=64), pool_size=2)
    steps = StaticSteps(tiny_model, shapes)
    a, b, c = (conditioned_call(tiny_model, 4, 3, random_kv(tiny_model, 10, g), random_kv(tiny_model, 8, g), g=g)
               for _ in range(3))
    with torch.inference_mode():
        steps([b])
        steps([a])
        for p, e in zip(steps([c, b]), batched_velocity(tiny_model, [c, b]), strict=True):
            torch.testing.assert_close(p, e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("failing", [1, 2], ids=["first-kind", "after-a-kind-was-written"])
def test_a_failed_write_gives_its_rows_back(tiny_model, monkeypatch, failing):
    """A write that fails (out of memory, say) leaves the pool whole: once the call's tensors are
    gone, every row is free again, each once."""
    g = torch.Generator().manual_seed(0)
    shapes = dataclasses.replace(StaticShapes.covering((4,), max_rows=6, max_speaker_latent_length=64), pool_size=2)
    steps = StaticSteps(tiny_model, shapes)
    real, writes = bwd._Pool._write, []

    def fails(pool, kind, cache, written):
        writes.append(kind)
        if len(writes) == failing:
            raise torch.OutOfMemoryError("simulated")
        return real(pool, kind, cache, written)

    monkeypatch.setattr(bwd._Pool, "_write", fails)
    call = conditioned_call(tiny_model, 4, 3, random_kv(tiny_model, 10, g), random_kv(tiny_model, 8, g),
                            random_kv(tiny_model, 5, g), g=g)
    with torch.inference_mode(), pytest.raises(torch.OutOfMemoryError):
        steps([call])
    call = None
    with torch.inference_mode():
        steps([])
    assert [sorted(kind.free) for kind in steps._pool.kinds] == [[0, 1]] * 3


@pytest.mark.parametrize("seed, graphs", [(seed, False) for seed in range(6)] + [(seed, True) for seed in range(6, 9)])
def test_static_steps_equal_the_exact_path_whatever_generations_share_and_the_pool_lets_go(tiny_model, seed, graphs,
                                                                                           monkeypatch):
    """Random generations (voices shared, speaker keys scaled for some steps, prefixes renewed,
    generations replaced), random subsets and orders of them a step, pools of 1-3 generations (so
    rows are let go and taken back) and passes of a few rows (several packs a bucket); with graphs,
    every pass a replay of what warm-up captured."""
    import random

    rnd, g = random.Random(seed), torch.Generator().manual_seed(seed)
    shapes = dataclasses.replace(
        StaticShapes.covering((4, 8), max_rows=rnd.choice([6, 9]), max_speaker_latent_length=64,
                              max_tokens=rnd.choice([None, 24])), pool_size=rnd.choice([1, 2, 3]))
    steps = StaticSteps(tiny_model, shapes, cuda_graphs=graphs)
    if graphs:
        monkeypatch.setattr(steps, "_capture", lambda args: ReplayedOnTheCpu.capture(steps, args))
        with torch.inference_mode():
            steps.warm_up()
    voices = [random_kv(tiny_model, rnd.randint(1, 16), g) for _ in range(3)]

    def generation() -> dict:
        voice = rnd.choice(voices)
        return dict(text=random_kv(tiny_model, rnd.randint(1, 12), g), voice=voice, frames=rnd.choice([3, 4, 8]),
                    scaled=inf.scale_speaker_kv(voice, 1.3, None), prefix=random_kv(tiny_model, rnd.randint(1, 6), g)
                    if rnd.random() < 0.7 else None, views={})

    def step(gen: dict) -> eng.ModelCall:
        rows, voice = rnd.choice([1, 3]), rnd.choice(["voice", "scaled"])
        views = gen["views"]  # (a generation keeps its CFG views, as inference.Conditioning does)
        caches = [views.setdefault((name, rows), gen[name] if gen[name] is None else inf.repeat_kv(gen[name], rows))
                  for name in ("text", voice, "prefix")]
        call = conditioned_call(tiny_model, gen["frames"], rows, gen["text"], gen[voice], gen["prefix"], g=g)
        return dataclasses.replace(call, kv_text=caches[0], kv_speaker=caches[1], kv_latent=caches[2])

    gens = [generation() for _ in range(rnd.randint(2, 5))]
    for _ in range(12):
        for i, gen in enumerate(gens):
            if rnd.random() < 0.1:
                gens[i] = generation()
            elif rnd.random() < 0.1 and gen["prefix"] is not None:
                gen["prefix"], gen["views"] = random_kv(tiny_model, rnd.randint(1, 6), g), {}
        calls = [step(gen) for gen in rnd.sample(gens, rnd.randint(1, len(gens)))]
        with torch.inference_mode():
            for p, e in zip(steps(calls), batched_velocity(tiny_model, calls), strict=True):
                torch.testing.assert_close(p, e, rtol=1e-4, atol=1e-4)
    assert steps.graphs == (len(shapes.all_shapes()) if graphs else 0)  # (none captured while serving)


@pytest.mark.parametrize("graphs", [False, True], ids=["static", "graph-replays"])
def test_a_bucket_with_more_tokens_than_a_pass_holds_runs_as_several_passes(engine, tiny_model, graphs,
                                                                           monkeypatch):
    """Several passes of one bucket share its lane's storage (and, replayed, its graphs): each pass
    reads what it wrote, not what the other pass left."""
    calls = first_calls(engine, mixed_jobs(load_clip()))
    calls += [next_step(c, 1) for c in calls]  # (each generation twice: the same keys, other latents)
    shapes = StaticShapes.covering(BLOCKS, max_rows=24, max_tokens=3 * 16)  # 3 rows of 16 frames a pass
    steps = StaticSteps(tiny_model, shapes, cuda_graphs=graphs)
    if graphs:
        monkeypatch.setattr(steps, "_capture", lambda args: ReplayedOnTheCpu.capture(steps, args))
        steps.warm_up()
    assert any(sum(c.x.shape[0] for c in calls if shapes.frames_for(c.x.shape[1]) == f) > shapes.rows_at(f)
               for f in shapes.frame_buckets)
    passes = []
    pack = steps._forward
    steps._forward = lambda calls, members, frames: passes.append((sum(c.x.shape[0] for c in calls), frames)) or \
        pack(calls, members, frames)
    for seed in range(2):
        now = [next_step(c, 10 + seed) for c in calls]
        for e, p in zip(batched_velocity(tiny_model, now), steps(now), strict=True):
            torch.testing.assert_close(p, e, rtol=1e-5, atol=1e-5)
    assert all(rows * frames <= 3 * 16 or rows <= 3 for rows, frames in passes)
    assert len(passes) > 2 * len({shapes.frames_for(c.x.shape[1]) for c in calls})  # (some buckets split)


def test_calls_outside_the_static_shapes_or_the_pool_take_the_exact_path(engine, tiny_model):
    """Voices longer than the shapes' speaker keys, and more generations than the pool has (1 here)."""
    calls = first_calls(engine, mixed_jobs(load_clip()))
    assert sum(c.x.shape[0] for c in calls) > 3
    exact = batched_velocity(tiny_model, calls)
    for steps in (StaticSteps(tiny_model, StaticShapes.covering((4,), max_rows=12, max_speaker_latent_length=8)),
                  static_steps(tiny_model, max_rows=3)):
        for e, p in zip(exact, steps(calls), strict=True):
            torch.testing.assert_close(p, e, rtol=1e-5, atol=1e-5)
        assert len(steps._pool.members) < len(calls)


class ReplayedOnTheCpu:
    """A CUDA graph as the CPU can have one: capture keeps the step body and the very tensors it was
    given; a replay runs the body again on those tensors and writes into the captured output. As
    on a GPU, a replay sees only what was written into the captured inputs' memory: a runner that
    handed a later step new tensors would get the captured step's answer back."""

    def __init__(self, body, args):
        self.body, self.args = body, args
        self.replays = 0

    def replay(self):
        self.replays += 1
        with torch.inference_mode():  # (a real replay writes its output whatever the mode)
            self.out.copy_(self.body(*self.args))

    @classmethod
    def capture(cls, steps: StaticSteps, args) -> bwd._Graph:
        graph = cls(steps._body, args)
        graph.out = steps._body(*args)
        return bwd._Graph(graph, graph.out)


@pytest.mark.parametrize("graphs", [False, True], ids=["static", "graph-replays"])
def test_batched_static_jobs_give_the_audio_of_solo_exact_jobs(engine, tiny_model, tiny_fish, tiny_pca, graphs,
                                                              monkeypatch):
    jobs = mixed_jobs(load_clip())
    solo = [np.concatenate(list(engine.generate(job))) for job in jobs]
    steps = static_steps(tiny_model, cuda_graphs=graphs)
    if graphs:
        monkeypatch.setattr(steps, "_capture", lambda args: ReplayedOnTheCpu.capture(steps, args))
        steps.warm_up()
        assert steps.graphs == len(steps.shapes.all_shapes())
    static = eng.SpeechEngine(tiny_model, tiny_fish, tiny_pca, SpeakerCache(4), steps=steps)
    worker = wk.GenerationWorker(static, max_waiting=8, max_active=4)
    try:
        together = asyncio.run(_collect(worker, jobs))
    finally:
        worker.close()
    for alone, batched in zip(solo, together, strict=True):
        assert alone.shape == batched.shape
        assert np.abs(alone - batched).max() <= 1e-4
    if graphs:  # the serving passes were replays of the warm-up's graphs, none captured since
        assert steps.graphs == len(steps.shapes.all_shapes())
        assert sum(g.graph.replays for g in steps._graphs.values()) > len(steps._graphs)


class CountingBackend:
    """A torch.compile backend that runs graphs eagerly and counts how many were compiled."""

    def __init__(self):
        self.graphs = []

    def __call__(self, graph_module, example_inputs):
        self.graphs.append([tuple(t.shape) for t in example_inputs if isinstance(t, torch.Tensor)][:1])
        return graph_module.forward


def on_another_thread(fn) -> None:
    """fn() on a thread of its own, as the server warms up on its generation thread (not the one that
    built the compiled parts: dynamo's settings are per thread)."""
    errors = []
    thread = threading.Thread(target=lambda: _record_error(fn, errors))
    thread.start()
    thread.join()
    if errors:
        raise errors[0]


def _record_error(fn, errors: list) -> None:
    try:
        fn()
    except BaseException as e:  # noqa: BLE001 - raised again on the calling thread
        errors.append(e)


@pytest.mark.slow
@pytest.mark.parametrize("max_rows", [12, 66], ids=["4-active", "22-active"])
def test_warm_up_compiles_every_shape_and_serving_compiles_nothing(tiny_model, tiny_fish, tiny_pca, max_rows):
    """More graphs than dynamo's default limit of 8 per function, all built on the warming thread."""
    torch._dynamo.reset()
    backend = CountingBackend()
    steps = static_steps(tiny_model, max_rows=max_rows, compile=True, backend=backend)
    on_another_thread(steps.warm_up)
    # per (frame bucket, speaker bucket): one graph for a single row, one for several (rows dynamic)
    graphs = 2 * len(steps.shapes.frame_buckets) * len(steps.shapes.speaker_buckets)
    assert len(backend.graphs) == graphs
    engine = eng.SpeechEngine(tiny_model, tiny_fish, tiny_pca, SpeakerCache(4), steps=steps)
    worker = wk.GenerationWorker(engine, max_waiting=8, max_active=4)
    try:
        asyncio.run(_collect(worker, mixed_jobs(load_clip())))
    finally:
        worker.close()
    assert len(backend.graphs) == graphs and steps.compiles_after_warm_up == 0
    torch._dynamo.reset()


def test_speaker_keys_and_values_are_computed_once_per_voice(tiny_model, tiny_fish, tiny_pca, monkeypatch):
    clip = load_clip()
    voice = eng.SpeakerReference("voice-a", lambda: clip, name="a")
    settings = mixed_jobs(clip)[0].sampler
    job = eng.SpeechJob(("[S1] Hi.", "[S1] Again."), voice, 7, eng.BlockShape((8,), (2,)),
                        eng.BlockShape((8,), (2,)), settings)
    uncached = eng.SpeechEngine(tiny_model, tiny_fish, tiny_pca, SpeakerCache(4))
    expected = np.concatenate(list(uncached.generate(job)))

    encoded = []
    original = type(tiny_model).get_kv_cache_speaker

    def counting(self, latent):
        encoded.append(latent.shape)
        return original(self, latent)

    monkeypatch.setattr(type(tiny_model), "get_kv_cache_speaker", counting)
    cached = eng.SpeechEngine(tiny_model, tiny_fish, tiny_pca, SpeakerCache(4), speaker_kv_cache=SpeakerCache(2))
    first = np.concatenate(list(cached.generate(job)))
    second = np.concatenate(list(cached.generate(job)))
    assert len(encoded) == 1  # two requests of two chunks each: one speaker encoding
    assert np.array_equal(first, expected) and np.array_equal(second, expected)
    other = eng.SpeakerReference("voice-a-v2", lambda: clip[:, :44100], name="a")
    list(cached.generate(eng.SpeechJob(("[S1] Hi.",), other, 7, job.first_shape, job.later_shape, settings)))
    assert len(encoded) == 2 and ("speaker-kv", "voice-a") not in cached.speaker_kv_cache  # a new version replaces


ARTIFACTS_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    from torch._dynamo.utils import counters
    sys.path.insert(0, {root!r})
    from batched_steps import StaticShapes, StaticSteps
    from inference import load_model_from_hf
    from runtime import load_compile_artifacts, save_compile_artifacts
    from pathlib import Path

    artifacts = Path(sys.argv[1])
    load_compile_artifacts(artifacts)
    model = load_model_from_hf({model!r}, device={device!r}, dtype=torch.float32)
    steps = StaticSteps(model, StaticShapes.covering((8,), max_rows=1, max_speaker_latent_length=16), compile=True)
    steps.warm_up()
    save_compile_artifacts(artifacts)
    print(json.dumps(dict(counters["inductor"])))
""")


@pytest.mark.slow
def test_compile_artifacts_are_reloaded_by_the_next_process(tiny_echo_dir, tmp_path):
    assert_compile_artifacts_reload(tiny_echo_dir, tmp_path, "cpu")


def assert_compile_artifacts_reload(tiny_echo_dir, tmp_path, device: str) -> None:
    """ECHO_CACHE_DIR: what one start compiled, the next loads instead of compiling again."""
    script = tmp_path / "compile_once.py"
    script.write_text(ARTIFACTS_SCRIPT.format(root=str(ROOT), model=str(tiny_echo_dir), device=device))
    artifacts = tmp_path / "cache" / "artifacts.bin"

    def start(run: int) -> dict:
        # a fresh inductor cache directory per process: only the saved artifacts can carry over
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / f"inductor{run}")}
        out = subprocess.run([sys.executable, str(script), str(artifacts)], env=env, capture_output=True,
                             text=True, timeout=600, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    first = start(1)
    assert artifacts.is_file() and first.get("fxgraph_cache_miss", 0) >= 1
    second = start(2)
    assert second.get("fxgraph_cache_hit", 0) >= 1 and second.get("fxgraph_cache_miss", 0) == 0


@pytest.mark.slow
def test_the_compiled_text_encoder_is_built_at_warm_up_and_never_while_serving(tiny_model):
    """ECHO_COMPILE: one graph per text bucket for one chunk and one for several, all at warm-up;
    chunks of any length and any number admitted together then compile nothing, and give the
    eager encoder's keys/values."""
    torch._dynamo.reset()
    backend = CountingBackend()
    encoder = eng.CompiledTextEncoder(tiny_model, backend=backend)
    on_another_thread(encoder.warm_up)  # 10 graphs: over dynamo's default limit of 8 on that thread
    assert len(backend.graphs) == 2 * len(eng.TEXT_BUCKETS)
    texts = ["Hi.", "A somewhat longer sentence, to land in another bucket. " * 3, "Two.", "Three words here."]
    for together in (texts[:1], texts, texts[1:3]):
        calls = [eng.TextCall.of(tiny_model, text, normalize=True) for text in together]
        with torch.inference_mode():
            compiled, eager = eng.encode_texts(tiny_model, calls, encoder), eng.encode_texts(tiny_model, calls)
        for mine, theirs in zip(compiled, eager, strict=True):
            for (k, v), (k0, v0) in zip(mine, theirs, strict=True):
                torch.testing.assert_close(k, k0, rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(v, v0, rtol=1e-5, atol=1e-5)
    assert len(backend.graphs) == 2 * len(eng.TEXT_BUCKETS) and encoder.compiles_after_warm_up == 0
    torch._dynamo.reset()


def extended(prefixes: list[LatentPrefix], block: torch.Tensor, encode=None) -> list[LatentPrefix]:
    """The prefixes extended by the rows of block (n, frames, 80) together (engine.extend_prefixes
    stacks those that line up), as the worker runs it."""
    with torch.inference_mode():
        extend_prefixes(prefixes, list(block.split(1)), encode)
    return prefixes


def new_prefixes(model: EchoDiT, n: int) -> list[LatentPrefix]:
    with torch.inference_mode():  # (as the worker runs: its tensors are inference tensors)
        return [LatentPrefix(model, 1) for _ in range(n)]


def assert_prefixes_close(mine: list[LatentPrefix], theirs: list[LatentPrefix], tolerance: float) -> None:
    for a, b in zip(mine, theirs, strict=True):
        assert a.frames == b.frames
        for cache, reference in ((a.kv, b.kv), (a._encoder_kv, b._encoder_kv)):
            for (k, v), (k0, v0) in zip(cache, reference, strict=True):
                torch.testing.assert_close(k, k0, rtol=tolerance, atol=tolerance)
                torch.testing.assert_close(v, v0, rtol=tolerance, atol=tolerance)


# the graph's rows stacked against the eager extension, which stacks only where this CPU's BLAS keeps each row's
# bits (model._stacks_exactly): within rounding
STACKED_BOUND = 1e-5


def test_the_compiled_prefix_encoder_is_built_at_warm_up_and_never_while_serving(tiny_model):
    """ECHO_COMPILE: one graph per extension of the streaming blocks (each block but the last, after
    the ones before it), for one generation and one for several stacked, all at warm-up. Then
    generations extend their prefixes alone, three together, and one of those alone again (its
    caches views into the stacked ones), compiling nothing and getting the eager keys/values. An
    extension of other sizes runs eager; the planned sizes reached with other layouts (after a
    partial patch, after eager extensions) run the planned graphs."""
    torch._dynamo.reset()
    backend = CountingBackend()
    encoder = eng.CompiledPrefixEncoder(tiny_model, [16, 32, 48], backend=backend)
    assert encoder.chain == [(16, 0), (32, 16)]
    assert eng.CompiledPrefixEncoder.extensions([16, 6, 32, 48], 4) == [(16, 0)]  # (then partial patches: eager)
    on_another_thread(encoder.warm_up)
    assert len(backend.graphs) == 2 * len(encoder.chain)
    gen = torch.Generator().manual_seed(0)
    first, second = torch.randn(3, 16, 80, generator=gen), torch.randn(3, 32, 80, generator=gen)
    for rows in (1, 3):
        mine = extended(extended(new_prefixes(tiny_model, rows), first, encoder), second, encoder)
        theirs = extended(extended(new_prefixes(tiny_model, rows), first), second)
        assert_prefixes_close(mine, theirs, STACKED_BOUND)
    mine = extended(new_prefixes(tiny_model, 3), first, encoder)[2:]
    theirs = extended(new_prefixes(tiny_model, 3), first)[2:]
    assert_prefixes_close(extended(mine, second[2:], encoder), extended(theirs, second[2:]), STACKED_BOUND)
    other = extended(new_prefixes(tiny_model, 1), torch.randn(1, 24, 80, generator=gen), encoder)
    assert other[0].frames == 24
    # the planned sizes reached another way run the planned graphs: a request's own blocks leaving a
    # partial patch (17 then 31 frames), a continuation of 18 frames then a block, eager extensions first
    for blocks in ([17, 31], [18, 32], [8, 8, 32]):
        mine, theirs = new_prefixes(tiny_model, 1), new_prefixes(tiny_model, 1)
        for part in [torch.randn(1, n, 80, generator=gen) for n in blocks]:
            extended(mine, part, encoder)
            extended(theirs, part)
        assert_prefixes_close(mine, theirs, STACKED_BOUND)
    assert len(backend.graphs) == 2 * len(encoder.chain) and encoder.compiles_after_warm_up == 0
    torch._dynamo.reset()


def test_the_server_compiles_the_prefix_encoder_for_its_streaming_preset_with_echo_compile(tiny_model):
    """runtime builds the encoder for the preset's extensions when it compiles, and none otherwise
    (eager, or a preset whose first block leaves a partial patch)."""
    from runtime import _prefix_encoder
    from settings import load_settings

    assert _prefix_encoder(load_settings(compile=True), tiny_model).chain == [(32, 0), (128, 32)]  # 32, 128, 480
    low = _prefix_encoder(load_settings(compile=True, performance_preset="low"), tiny_model)  # 32, 64, 272, 272
    assert low.chain == [(32, 0), (64, 32), (272, 96)]
    assert _prefix_encoder(load_settings(compile=True, performance_preset="equal"), tiny_model) is None  # 213: partial
    assert _prefix_encoder(load_settings(compile=False), tiny_model) is None


@pytest.mark.slow
def test_the_compiled_prefix_encoder_matches_eager_on_inductor(tiny_model):
    """Inductor's CPU code for the latent-prefix extensions against eager, float32: within 1e-4."""
    torch._dynamo.reset()
    encoder = eng.CompiledPrefixEncoder(tiny_model, [16, 32, 48])
    on_another_thread(encoder.warm_up)
    gen = torch.Generator().manual_seed(1)
    first, second = torch.randn(2, 16, 80, generator=gen), torch.randn(2, 32, 80, generator=gen)
    mine = extended(extended(new_prefixes(tiny_model, 2), first, encoder), second, encoder)
    assert_prefixes_close(mine, extended(extended(new_prefixes(tiny_model, 2), first), second), 1e-4)
    assert encoder.compiles_after_warm_up == 0
    torch._dynamo.reset()


MID_SIZE = {"latent_size": 80, "model_size": 256, "num_layers": 4, "num_heads": 4, "intermediate_size": 704,
            "norm_eps": 1e-5, "text_vocab_size": 256, "text_model_size": 128, "text_num_layers": 2,
            "text_num_heads": 2, "text_intermediate_size": 352, "speaker_patch_size": 4, "speaker_model_size": 128,
            "speaker_num_layers": 2, "speaker_num_heads": 2, "speaker_intermediate_size": 352,
            "timestep_embed_size": 64, "adaln_rank": 32}  # 4x the tiny model's width, head size 64 as published


@pytest.mark.slow
def test_compiled_static_steps_match_the_exact_steps_on_inductor_for_a_mid_size_model():
    """Issue 20 item 6: inductor's CPU code for the decoder blocks (ECHO_COMPILE) against the exact
    eager runner, on a synthetic mid-size configuration with its projections fused, guided rows of
    two generations with prefixes: within 1e-4 in float32 (measured 2026-12-06; ~1 min to compile)."""
    from exact_batching import make_calls

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = EchoDiT(**MID_SIZE).eval().requires_grad_(False).fuse_projections()
    shapes = StaticShapes.covering((16,), max_rows=6, max_speaker_latent_length=64)
    compiled = StaticSteps(model, shapes, compile=True)
    calls = make_calls(model, [(16, 3, 4, 20, 10), (16, 3, 8, 33, 16)], torch.float32, "cpu")
    with torch.inference_mode():
        exact = ExactSteps(model)(calls)
        for _ in range(2):  # compiled, then the same graph again
            for mine, theirs in zip(compiled(calls), exact, strict=True):
                torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-4)
    torch._dynamo.reset()

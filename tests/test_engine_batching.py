"""Batched admission: the text chunks of jobs that start together are encoded in one text-encoder
call per length bucket, each result bit for bit what the chunk gets encoded alone; padding a
chunk to its bucket moves its keys by float rounding only (bound stated and pinned here). The
blocks of jobs that finish together go into their latent prefixes in one encoder call, each
prefix bit for bit what its own extension gives."""

import asyncio
import threading

import numpy as np
import pytest
import torch

import engine as eng
import inference as inf
import worker as wk
from model import LatentPrefix, extend_prefixes
from test_engine import SETTINGS
from voices import SpeakerCache

TEXTS = ["[S1] Hello there.", "[S1] Hi.", "[S1] A much longer sentence to read, with more words in it than the first.",
         "[S2] " + "word " * 40]
# padded tokens are masked, so only rounding moves the keys: largest difference over the keys' largest magnitude
PADDING_BOUND = {torch.float32: 1e-6, torch.bfloat16: 1e-2}


@pytest.fixture()
def engine(tiny_model, tiny_fish, tiny_pca):
    return eng.SpeechEngine(tiny_model, tiny_fish, tiny_pca, SpeakerCache(4))


def equal_kv(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for (ka, va), (kb, vb) in zip(a, b) for x, y in ((ka, kb), (va, vb)))


def test_text_chunks_encoded_together_equal_each_encoded_alone(tiny_model):
    calls = [eng.TextCall.of(tiny_model, text, True) for text in TEXTS]
    assert len({c.ids.shape[1] for c in calls}) == 3  # two chunks share a bucket, the others have their own
    with torch.inference_mode():
        together = eng.encode_texts(tiny_model, calls)
        for call, kv in zip(calls, together):
            assert kv[0][0].shape[:2] == (1, call.tokens)  # a job keeps its own tokens only
            assert equal_kv(kv, call.run())


def test_a_chunk_is_padded_to_the_smallest_bucket_that_holds_it(tiny_model):
    call = eng.TextCall.of(tiny_model, TEXTS[0], True)
    assert call.ids.shape == call.mask.shape == (1, eng.TEXT_BUCKETS[0])
    assert int(call.mask.sum()) == call.tokens and call.mask[0, :call.tokens].all()
    longest = eng.TextCall.of(tiny_model, "x" * 5000, True)
    assert longest.ids.shape[1] == longest.tokens == inf.MAX_TEXT_LENGTH == eng.TEXT_BUCKETS[-1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bucket_padding_moves_text_keys_by_rounding_only(tiny_echo_dir, dtype):
    model = inf.load_model_from_hf(str(tiny_echo_dir), device="cpu", dtype=dtype)
    with torch.inference_mode():
        for text in TEXTS:
            ids, mask = inf.get_text_input_ids_and_mask([text], max_length=inf.MAX_TEXT_LENGTH, pad_to_max=False)
            unpadded = model.get_kv_cache_text(ids, mask)
            padded = eng.TextCall.of(model, text, True).run()
            for (ka, va), (kb, vb) in zip(padded, unpadded):
                for a, b in ((ka, kb), (va, vb)):
                    assert a.shape == b.shape
                    assert (a.float() - b.float()).abs().max() <= PADDING_BOUND[dtype] * b.float().abs().max()


def test_prefixes_that_line_up_extend_in_one_call_like_each_alone(tiny_model, monkeypatch):
    import model
    gen = torch.Generator().manual_seed(0)
    # 8, 32 and 12 patches: 32 stack exactly on every CPU met so far, 8 and 12 on some (model._stacks_exactly)
    blocks = [[torch.randn(1, n, 80, generator=gen) for n in (32, 128, 48)] for _ in range(3)]
    alone = [LatentPrefix(tiny_model, 1) for _ in blocks]
    together = [LatentPrefix(tiny_model, 1) for _ in blocks]
    odd = LatentPrefix(tiny_model, 1)  # at another frame count: extended on its own, in the same call
    stacked, real = [], model.LatentPrefix.stacked.__func__
    monkeypatch.setattr(model.LatentPrefix, "stacked",
                        classmethod(lambda cls, parts: (stacked.append(len(parts)), real(cls, parts))[1]))
    with torch.inference_mode():
        odd.extend(blocks[0][0])
        for index in range(3):
            for prefix, own in zip(alone, blocks):
                prefix.extend(own[index])
            extend_prefixes(together + [odd], [own[index] for own in blocks] + [blocks[0][index]])
            for a, b in zip(alone, together):
                assert a.frames == b.frames and equal_kv(a.kv, b.kv)
    assert odd.frames == 32 + 32 + 128 + 48
    assert 3 in stacked  # (the 32 patches at least)


def test_prefixes_stack_only_where_stacking_is_measured_exact_on_this_device(tiny_model, monkeypatch):
    """BLAS kernels are chosen by a product's rows and round differently, by CPU: whether a stack of
    extensions gives each its own result is measured once per (patches, rows) on the model's device,
    and those that would not run alone, as do extensions that leave a partial patch."""
    import model
    stacked = []
    real = model.LatentPrefix.stacked.__func__
    monkeypatch.setattr(model.LatentPrefix, "stacked",
                        classmethod(lambda cls, parts: (stacked.append(len(parts)), real(cls, parts))[1]))
    gen = torch.Generator().manual_seed(1)

    def extend_three(frames: int) -> None:
        prefixes = [LatentPrefix(tiny_model, 1) for _ in range(3)]
        with torch.inference_mode():
            extend_prefixes(prefixes, [torch.randn(1, frames, 80, generator=gen) for _ in prefixes])
        assert all(p.frames == frames for p in prefixes)

    for verdict in (False, True):
        model._STACKS_EXACTLY.pop(tiny_model, None)
        monkeypatch.setattr(model, "_measure_stacking", lambda m, patches, past, rows, verdict=verdict: verdict)
        stacked.clear()
        for frames in (8, 6, 40, 128):  # 2 patches, a partial patch, 10 and 32 patches
            extend_three(frames)
        assert stacked == ([3, 3, 3] if verdict else [])  # (never the partial patch)
        assert model._STACKS_EXACTLY[tiny_model] == {(patches, False, 3, torch.float32): verdict
                                                     for patches in (2, 10, 32)}
    model._STACKS_EXACTLY.pop(tiny_model, None)
    monkeypatch.undo()
    with torch.inference_mode():
        for patches, past in ((2, False), (8, False), (32, False), (8, True), (32, True)):
            rows = 3
            measured = model._stacks_exactly(tiny_model, patches, past, rows)
            # the measurement is what stacking does: stacked rows equal to their own extension, or not
            one = [LatentPrefix(tiny_model, 1) for _ in range(rows)]
            if past:
                for prefix, row in zip(one, torch.randn(rows, 4 * patches, 80, generator=gen).split(1)):
                    prefix.extend(row)
            both = [LatentPrefix(tiny_model, 1) for _ in range(rows)]
            for prefix, twin in zip(both, one):
                prefix.restore(twin.snapshot())  # the same past
            frames = torch.randn(rows, 4 * patches, 80, generator=gen)
            for prefix, row in zip(one, frames.split(1)):
                prefix.extend(row)
            merged = LatentPrefix.stacked(both)
            merged.extend(frames)
            merged.split_into(both)
            assert measured == all(equal_kv(a.kv, b.kv) for a, b in zip(one, both)), (patches, past)


def test_jobs_started_together_encode_their_text_and_extend_their_prefixes_in_one_call(engine):
    shape = eng.BlockShape((32, 32), (2, 2))
    jobs = [eng.SpeechJob((text,), None, seed, shape, shape, SETTINGS) for seed, text in enumerate(TEXTS[:3])]
    solo = [np.concatenate(list(engine.generate(job))) for job in jobs]
    encoded, extended = [], []
    encode_texts, extend = engine.encode_texts, engine.extend_prefixes
    engine.encode_texts = lambda calls: (encoded.append(len(calls)), encode_texts(calls))[1]
    engine.extend_prefixes = lambda calls: (extended.append(len(calls)), extend(calls))[1]
    worker = wk.GenerationWorker(engine, max_waiting=8, max_active=8)
    gate = threading.Event()
    holder = threading.Thread(target=worker.call, args=(gate.wait,))  # the worker thread waits: jobs queue up
    holder.start()

    async def run():
        streams = [worker.submit(job) for job in jobs]
        gate.set()
        return [np.concatenate([block async for block in stream]) for stream in streams]

    try:
        together = asyncio.run(run())
    finally:
        holder.join()
        worker.close()
    assert encoded == [3]  # one call (two buckets inside it) for the three jobs, not three
    assert extended == [3]  # their first blocks into their prefixes: one call
    for alone, batched in zip(solo, together):
        assert np.array_equal(alone, batched)

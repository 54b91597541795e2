"""A device out of memory costs time, not audio: every unit of the worker's work is all or nothing
(texts and steps change no job's state; decodes and prefix extensions put theirs back when they
fail), so a unit that runs out of memory is computed again in halves, and only a job whose own work
does not fit fails (its client gets 503: tests/test_hardening.py); the size that fitted then caps
that kind of unit for a while. The failures are injected: a CPU has no device memory to run out of."""

import asyncio
import threading
import weakref

import numpy as np
import pytest
import torch

import engine as eng
import worker as wk
from autoencoder import decode_streams
from model import LatentPrefix, extend_prefixes
from test_engine import SETTINGS
from test_engine_batching import TEXTS, equal_kv
from voices import SpeakerCache

SHAPE = eng.BlockShape((32, 32), (2, 2))


def out_of_memory() -> torch.OutOfMemoryError:
    return torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def cublas_out_of_memory() -> RuntimeError:  # (what cuBLAS running out of workspace raises)
    return RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`")


def test_what_counts_as_running_out_of_memory():
    assert wk.is_out_of_memory(out_of_memory()) and wk.is_out_of_memory(cublas_out_of_memory())
    assert wk.is_out_of_memory(RuntimeError("[enforce fail at alloc_cpu.cpp:117] . DefaultCPUAllocator: can't "
                                            "allocate memory: you tried to allocate 8589934592 bytes."))
    assert wk.is_out_of_memory(RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be asynchronously "
                                            "reported"))  # (the CUDA runtime's, e.g. instantiating a graph)
    try:  # a compiler's error wrapping one (inductor's BackendCompilerFailed, Triton loading a kernel)
        try:
            raise out_of_memory()
        except torch.OutOfMemoryError as e:
            raise RuntimeError("backend='inductor' raised: see above") from e
    except RuntimeError as wrapped:
        assert wk.is_out_of_memory(wrapped)
    for compiled in ("Triton Error [CUDA]: out of memory", "CUDA driver error: out of memory"):  # compiled parts
        assert wk.is_out_of_memory(RuntimeError(compiled))
    assert not wk.is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not wk.is_out_of_memory(RuntimeError("backend='inductor' raised", ValueError("a shape")))
    assert not wk.is_out_of_memory(ValueError("CUBLAS_STATUS_ALLOC_FAILED"))
    try:  # an answer chosen on purpose after one ran out ("from None"): that answer's error is what counts
        try:
            raise out_of_memory()
        except torch.OutOfMemoryError:
            raise RuntimeError("the voice is too long for this server") from None
    except RuntimeError as answer:
        assert not wk.is_out_of_memory(answer)


@pytest.fixture()
def engine(tiny_model, tiny_fish, tiny_pca):
    return eng.SpeechEngine(tiny_model, tiny_fish, tiny_pca, SpeakerCache(4))


def jobs() -> list[eng.SpeechJob]:
    return [eng.SpeechJob((text,), None, seed, SHAPE, SHAPE, SETTINGS) for seed, text in enumerate(TEXTS[:3])]


def run_together(engine: eng.SpeechEngine, jobs: list[eng.SpeechJob]) -> tuple[list, wk.GenerationWorker]:
    """The jobs submitted at once (the worker thread held until all are queued): per job its audio,
    or the error its stream raised."""
    worker = wk.GenerationWorker(engine, max_waiting=8, max_active=8)
    gate = threading.Event()
    holder = threading.Thread(target=worker.call, args=(gate.wait,))
    holder.start()

    async def collect(stream):
        try:
            return np.concatenate([block async for block in stream])
        except Exception as e:  # noqa: BLE001 - what the client would get
            return e

    async def run():
        streams = [worker.submit(job) for job in jobs]
        gate.set()
        return await asyncio.gather(*(collect(stream) for stream in streams))

    try:
        return asyncio.run(run()), worker
    finally:
        holder.join()
        worker.close()


def fit_one_at_a_time(engine: eng.SpeechEngine, tried: dict[str, list[int]], held: list[int],
                      error=out_of_memory) -> None:
    """Every unit of several jobs runs out of memory (texts, steps, prefix extensions, decodes) after
    allocating its activations; `held` gets, at each later attempt, how many of those still live."""
    failed = []  # weak references to each failed attempt's activations

    for name in ("encode_texts", "steps", "extend_prefixes", "decode"):
        real = getattr(engine, name)

        def unit(calls, real=real, name=name):
            tried.setdefault(name, []).append(len(calls))
            held.append(sum(ref() is not None for ref in failed))
            if len(calls) > 1:
                activations = torch.empty(1 << 16)
                failed.append(weakref.ref(activations))
                raise error()
            return real(calls)

        setattr(engine, name, unit)


@pytest.mark.parametrize("error", [out_of_memory, cublas_out_of_memory], ids=["allocator", "cublas"])
def test_units_that_run_out_of_memory_together_run_in_halves_and_every_job_sounds_as_alone(engine, error):
    alone = [np.concatenate(list(engine.generate(job))) for job in jobs()]
    tried: dict[str, list[int]] = {}
    held: list[int] = []
    fit_one_at_a_time(engine, tried, held, error)
    together, worker = run_together(engine, jobs())
    for solo, batched in zip(alone, together):
        assert isinstance(batched, np.ndarray) and np.array_equal(solo, batched)
    for name in ("encode_texts", "steps", "extend_prefixes", "decode"):
        assert 3 in tried[name] and 1 in tried[name], name  # tried together first, then in halves
    assert worker.memory_splits == 4 and worker.memory_failures == 0  # (3 -> 1 + 2, then parts of 1: each kind)
    assert held and not any(held)  # a failed attempt's memory is let go before its halves run
    for name in ("encode_texts", "steps", "extend_prefixes", "decode"):  # then the size that fitted is the cap
        assert sum(n > 1 for n in tried[name]) == 1, name


def test_a_capped_kind_tries_more_jobs_again_once_parts_fit_and_computes_each_job_once(engine, monkeypatch):
    """Steps of more than two jobs never fit; the cap doubles after six parts that fit, also
    while a unit's parts run: each job's step is still computed once, as alone."""
    monkeypatch.setattr(wk, "MEMORY_CAP_RELAX_UNITS", 6)  # (a unit of 8 in parts of 2 raises it on its 2nd part)
    eight = [eng.SpeechJob((TEXTS[i % 3],), None, i, SHAPE, SHAPE, SETTINGS) for i in range(8)]
    alone = [np.concatenate(list(engine.generate(job))) for job in eight]
    computed, sizes = [], []
    steps = engine.steps

    def two_at_most(calls):
        sizes.append(len(calls))
        if len(calls) > 2:
            raise out_of_memory()
        computed.extend(calls)  # (kept alive: their ids stay distinct)
        return steps(calls)

    engine.steps = two_at_most
    together, worker = run_together(engine, eight)
    for solo, batched in zip(alone, together):
        assert isinstance(batched, np.ndarray) and np.array_equal(solo, batched)
    assert len({id(call) for call in computed}) == len(computed)  # no step computed twice
    assert sum(n > 2 for n in sizes) > 1  # tried with more jobs again after parts fitted, split again


def test_a_job_whose_own_step_does_not_fit_fails_and_the_others_sound_as_alone(engine, tiny_model):
    alone = [np.concatenate(list(engine.generate(job))) for job in jobs()]
    too_long = eng.TextCall.of(tiny_model, TEXTS[2], True).tokens  # the third job's text keys
    steps = engine.steps

    def without_room_for_the_third(calls):
        if any(c.text_mask.shape[1] == too_long for c in calls):
            raise out_of_memory()
        return steps(calls)

    engine.steps = without_room_for_the_third
    together, worker = run_together(engine, jobs())
    assert isinstance(together[2], torch.OutOfMemoryError)
    for solo, batched in zip(alone[:2], together[:2]):
        assert isinstance(batched, np.ndarray) and np.array_equal(solo, batched)
    assert worker.memory_failures == 1 and worker.memory_splits >= 1


def decoders_and_blocks(fish, n: int):
    gen = torch.Generator().manual_seed(3)
    decoders = [fish.streaming_decoder() for _ in range(n)]
    first = [torch.randn(1, fish.latent_dim, 8, generator=gen) for _ in range(n)]
    second = [torch.randn(1, fish.latent_dim, 8, generator=gen) for _ in range(n)]
    return decoders, first, second


@pytest.mark.parametrize("batch", [False, True], ids=["one-by-one", "batched"])
def test_a_decode_that_fails_part_way_leaves_every_stream_as_it_was(tiny_fish, monkeypatch, batch):
    """The third stream's decode (or, batched, the second group's) runs out of memory after the first
    ones have decoded: all are put back, so decoding again continues each stream exactly."""
    with torch.inference_mode():
        expected_decoders, first, second = decoders_and_blocks(tiny_fish, 3)
        decode_streams(expected_decoders, first, batch=batch)
        expected = decode_streams(expected_decoders, second, batch=batch, max_batch_frames=16)

        decoders, _, _ = decoders_and_blocks(tiny_fish, 3)
        decode_streams(decoders, first, batch=batch)
        before = [(d.frames, dict(d.state.kv)) for d in decoders]
        real, calls = type(decoders[0]).decode, []

        def third_fails(self, block):
            calls.append(self.batch_size)
            if len(calls) == (2 if batch else 3):
                raise out_of_memory()
            return real(self, block)

        monkeypatch.setattr(type(decoders[0]), "decode", third_fails)
        with pytest.raises(torch.OutOfMemoryError):
            decode_streams(decoders, second, batch=batch, max_batch_frames=16)  # batched: 2 streams, then 1
        assert calls == ([2, 1] if batch else [1, 1, 1])
        monkeypatch.setattr(type(decoders[0]), "decode", real)
        for decoder, (frames, kv) in zip(decoders, before):
            assert decoder.frames == frames == 8
            assert all(decoder.state.kv[m] is kv[m] for m in kv)
        again = decode_streams(decoders, second, batch=batch, max_batch_frames=16)
    for a, b in zip(expected, again):
        assert torch.equal(a, b)


def test_a_prefix_extension_that_fails_part_way_leaves_every_prefix_as_it_was(tiny_model):
    gen = torch.Generator().manual_seed(4)
    blocks = [torch.randn(1, 32, 80, generator=gen) for _ in range(3)]
    with torch.inference_mode():
        expected = [LatentPrefix(tiny_model, 1) for _ in blocks]
        extend_prefixes(expected, blocks)
        prefixes = [LatentPrefix(tiny_model, 1) for _ in blocks]
        calls = []

        def second_fails(frames, encoder_kv, complete):
            calls.append(frames.shape[0])
            if len(calls) == 2:
                raise out_of_memory()
            return tiny_model.extend_patches(frames, encoder_kv, complete)

        odd = [LatentPrefix(tiny_model, 1), LatentPrefix(tiny_model, 1)]  # 8 frames further: a group of their own
        for prefix in odd:
            prefix.extend(blocks[0][:, :8])
        before = [p.snapshot() for p in prefixes + odd]
        with pytest.raises(torch.OutOfMemoryError):
            extend_prefixes(prefixes + odd, blocks + [blocks[0], blocks[1]], second_fails)
        assert calls == [3, 2]  # the three that line up extended, then the two 8 frames further failed
        for prefix, snapshot in zip(prefixes + odd, before):
            assert prefix.frames == snapshot[0] and all(a is b for a, b in zip(prefix.snapshot(), snapshot))
        extend_prefixes(prefixes + odd, blocks + [blocks[0], blocks[1]])
    for a, b in zip(expected, prefixes):
        assert a.frames == b.frames == 32 and equal_kv(a.kv, b.kv)
    assert all(p.frames == 40 for p in odd)

"""Back-pressure (issue 17, item 8): a job runs at most `max_ahead_samples` ahead of what its client
has taken, waits out of the batch meanwhile (parked), and is dropped when its client takes nothing
for the send timeout. And queue slots reserved before a job is built (item 9)."""

import asyncio
import time

import numpy as np
import pytest

import engine as eng
import inference as inf
from test_engine import SETTINGS
from voices import SpeakerCache

BLOCK = 8 * inf.AE_DOWNSAMPLE_FACTOR  # samples of one 8-frame block


@pytest.fixture()
def engine(tiny_model, tiny_fish, tiny_pca):
    return eng.SpeechEngine(tiny_model, tiny_fish, tiny_pca, SpeakerCache(4))


def long_job(seed: int = 1, blocks: int = 20) -> eng.SpeechJob:
    """`blocks` 8-frame blocks of one step each, all kept: blocks x BLOCK samples."""
    shape = eng.BlockShape((8,) * blocks, (1,) * blocks)
    return eng.SpeechJob(("[S1] Hello.",), None, seed, shape, shape, SETTINGS, eng.EarlyStop(enabled=False))


async def until(condition, timeout: float = 30.0) -> None:
    """Wait on the event loop until condition() holds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        await asyncio.sleep(0.01)


def run(worker: eng.GenerationWorker, scenario):
    """Run the async scenario against the worker (at most a minute), then close the worker."""
    try:
        return asyncio.run(asyncio.wait_for(scenario(), 60))
    finally:
        worker.close()


def count_delivered(monkeypatch) -> dict[str, int]:
    """Samples each job has handed to its stream so far, by request id."""
    counts: dict[str, int] = {}
    notify = eng._notify

    def counting(ticket, item):
        if isinstance(item, np.ndarray):
            counts[ticket.request_id] = counts.get(ticket.request_id, 0) + item.size
        notify(ticket, item)

    monkeypatch.setattr(eng, "_notify", counting)
    return counts


def test_a_job_runs_no_further_ahead_of_its_client_than_the_limit(engine, monkeypatch):
    delivered = count_delivered(monkeypatch)
    worker = eng.GenerationWorker(engine, max_active=2, max_ahead_samples=2 * BLOCK)

    async def scenario():
        stream = worker.submit(long_job(), "slow")
        first = await anext(stream)
        await until(lambda: worker.parked == 1)
        await asyncio.sleep(0.5)  # parked: nothing more is generated for it
        assert worker.parked == 1 and worker.active == 0 and worker.pending == 1
        return first.size, delivered["slow"]

    taken, sent = run(worker, scenario)
    # one block past the limit at most (plus the fade held back at a block's end); without the
    # limit the job ran to its end: 20 blocks for a client that took one
    assert taken + 2 * BLOCK < sent <= taken + 3 * BLOCK + eng.FADE_SAMPLES


def test_a_parked_job_gives_its_slot_to_another_job(engine):
    worker = eng.GenerationWorker(engine, max_waiting=1, max_active=1, max_ahead_samples=2 * BLOCK)

    async def scenario():
        slow = worker.submit(long_job(seed=1))
        first = await anext(slow)
        await until(lambda: worker.parked == 1)
        other = [b async for b in worker.submit(long_job(seed=2, blocks=6))]  # in the only slot
        parked_meanwhile = worker.parked
        rest = [b async for b in slow]  # its client reads again: it resumes and ends
        return sum(b.size for b in other), parked_meanwhile, first.size + sum(b.size for b in rest)

    other, parked_meanwhile, whole = run(worker, scenario)
    assert other == 6 * BLOCK and parked_meanwhile == 1
    assert whole == 20 * BLOCK and worker.pending == 0


def test_a_parked_job_resumes_with_the_same_audio_as_an_unparked_one(engine):
    alone = np.concatenate(list(engine.generate(long_job(seed=5, blocks=12))))
    worker = eng.GenerationWorker(engine, max_active=1, max_ahead_samples=BLOCK)

    async def scenario():
        stream = worker.submit(long_job(seed=5, blocks=12))
        blocks, pauses = [], 0
        async for block in stream:
            blocks.append(block)
            if len(blocks) % 3 == 1 and len(blocks) < 10:  # a listener that pauses now and then
                await until(lambda: worker.parked == 1)
                pauses += 1
        return np.concatenate(blocks), pauses

    parked, pauses = run(worker, scenario)
    assert pauses == 3
    assert np.array_equal(parked, alone)  # bit for bit: parking only delays the job's steps


def test_a_client_that_takes_nothing_is_dropped_after_the_send_timeout(engine, monkeypatch):
    generators = []
    job_steps = engine.job_steps
    monkeypatch.setattr(engine, "job_steps", lambda job: generators.append(job_steps(job)) or generators[-1])
    worker = eng.GenerationWorker(engine, max_active=1, max_ahead_samples=BLOCK, send_timeout=0.5)

    async def scenario():
        stream = worker.submit(long_job())
        await anext(stream)
        await until(lambda: worker.parked == 1)
        parked_at = time.monotonic()
        await until(lambda: worker.pending == 0)
        waited = time.monotonic() - parked_at
        await asyncio.sleep(0.05)  # the worker's hand-over to this loop runs
        with pytest.raises(eng.ClientStalled, match="the client took no audio for 0.5 s"):
            await anext(stream)  # at once: the audio queued for it was dropped
        return waited

    waited = run(worker, scenario)
    assert waited >= 0.45 and worker.parked == 0
    assert generators[0].gi_frame is None  # its step generator closed: its tensors let go


def test_time_parked_does_not_count_toward_the_request_deadline(engine):
    worker = eng.GenerationWorker(engine, max_active=1, max_ahead_samples=BLOCK)

    async def scenario():
        stream = worker.submit(long_job(blocks=6), timeout=3.0)
        blocks = [await anext(stream)]
        await until(lambda: worker.parked == 1)
        await asyncio.sleep(3.5)  # a slow listener: parked past the deadline
        blocks += [b async for b in stream]  # no GenerationTimeout
        return sum(b.size for b in blocks)

    assert run(worker, scenario) == 6 * BLOCK


# ---- slots reserved before the job is built ---------------------------------------------------------


def test_with_the_queue_full_reserve_refuses_at_once_and_a_released_slot_is_free_again(engine):
    worker = eng.GenerationWorker(engine, max_waiting=1, max_active=1)
    try:
        first, second = worker.reserve(), worker.reserve()
        assert worker.pending == 2 and worker.waiting == 2 and worker.active == 0
        started = time.monotonic()
        with pytest.raises(eng.QueueFull):
            worker.reserve()
        assert time.monotonic() - started < 0.1
        first.release()
        first.release()  # once is enough
        assert worker.pending == 1 and worker.waiting == 1
        with worker.reserve():
            assert worker.pending == 2
        assert worker.pending == 1  # released on leaving the block
        second.release()
        assert worker.pending == 0
    finally:
        worker.close()


def test_a_reserved_slot_takes_its_job_without_a_second_check(engine):
    worker = eng.GenerationWorker(engine, max_waiting=0, max_active=1)

    async def scenario():
        with worker.reserve() as reservation:
            with pytest.raises(eng.QueueFull):
                worker.submit(long_job(blocks=2))  # the only slot is reserved
            stream = reservation.submit(long_job(blocks=2))  # into its own slot
        assert worker.pending == 1  # submitted: leaving the block did not release it
        with pytest.raises(RuntimeError, match="already submitted"):
            reservation.submit(long_job(blocks=2))
        return sum(b.size for b in [b async for b in stream])

    assert run(worker, scenario) == 2 * BLOCK
    assert worker.pending == 0

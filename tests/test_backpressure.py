"""Back-pressure (issue 17, item 8): a job runs at most `max_ahead_samples` ahead of what its client
has taken, waits out of the batch meanwhile (parked), and is dropped when its client takes nothing
for the send timeout. And queue slots reserved before a job is built (item 9)."""

import asyncio
import json
import re
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

import engine as eng
import worker as wk
import inference as inf
from conftest import live_server, server_env
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


def run(worker: wk.GenerationWorker, scenario):
    """Run the async scenario against the worker (at most a minute), then close the worker."""
    try:
        return asyncio.run(asyncio.wait_for(scenario(), 60))
    finally:
        worker.close()


def count_delivered(monkeypatch) -> dict[str, int]:
    """Samples each job has handed to its stream so far, by request id."""
    counts: dict[str, int] = {}
    notify = wk._notify

    def counting(ticket, item):
        if isinstance(item, np.ndarray):
            counts[ticket.request_id] = counts.get(ticket.request_id, 0) + item.size
        notify(ticket, item)

    monkeypatch.setattr(wk, "_notify", counting)
    return counts


def test_a_job_runs_no_further_ahead_of_its_client_than_the_limit(engine, monkeypatch):
    delivered = count_delivered(monkeypatch)
    worker = wk.GenerationWorker(engine, max_active=2, max_ahead_samples=2 * BLOCK)

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
    worker = wk.GenerationWorker(engine, max_waiting=1, max_active=1, max_ahead_samples=2 * BLOCK)

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
    worker = wk.GenerationWorker(engine, max_active=1, max_ahead_samples=BLOCK)

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
    worker = wk.GenerationWorker(engine, max_active=1, max_ahead_samples=BLOCK, send_timeout=0.5)

    async def scenario():
        stream = worker.submit(long_job())
        await anext(stream)
        await until(lambda: worker.parked == 1)
        parked_at = time.monotonic()
        await until(lambda: worker.pending == 0)
        waited = time.monotonic() - parked_at
        await asyncio.sleep(0.05)  # the worker's hand-over to this loop runs
        with pytest.raises(wk.ClientStalled, match="the client took no audio for 0.5 s"):
            await anext(stream)  # at once: the audio queued for it was dropped
        return waited

    waited = run(worker, scenario)
    assert waited >= 0.45 and worker.parked == 0
    assert generators[0].gi_frame is None  # its step generator closed: its tensors let go


def test_a_send_timeout_longer_than_a_thread_may_wait_parks_and_the_worker_goes_on(engine):
    """ECHO_SEND_TIMEOUT=1e10 (finite, over threading.TIMEOUT_MAX): the worker's wait for the parked
    stream's timeout overflowed, and the generation thread died for every later request."""
    worker = wk.GenerationWorker(engine, max_active=1, max_ahead_samples=BLOCK, send_timeout=1e10)

    async def scenario():
        stalled = worker.submit(long_job())
        await anext(stalled)
        await until(lambda: worker.parked == 1)
        other = [block async for block in worker.submit(long_job(blocks=2))]
        stalled.cancel()
        return sum(block.size for block in other), worker.alive

    assert run(worker, scenario) == (2 * BLOCK, True)


def test_time_parked_does_not_count_toward_the_request_deadline(engine):
    worker = wk.GenerationWorker(engine, max_active=1, max_ahead_samples=BLOCK)

    async def scenario():
        stream = worker.submit(long_job(blocks=6), timeout=3.0)
        blocks = [await anext(stream)]
        await until(lambda: worker.parked == 1)
        await asyncio.sleep(3.5)  # a slow listener: parked past the deadline
        blocks += [b async for b in stream]  # no GenerationTimeout
        return sum(b.size for b in blocks)

    assert run(worker, scenario) == 6 * BLOCK


def slowed(engine, monkeypatch, seconds: float = 0.02) -> None:
    """Every diffusion step takes at least `seconds` (the worker's loop keeps turning meanwhile)."""
    steps = engine.steps
    monkeypatch.setattr(engine, "steps", lambda calls: (time.sleep(seconds), steps(calls))[1])


def test_a_client_that_caught_up_waits_for_a_slot_and_is_not_dropped_as_stalled(engine, monkeypatch):
    """Its parked job has no slot (another stream, whose client keeps up, holds the only one, and
    here never yields it): that is the server's wait, not the client's stall, so the send timeout
    does not end it."""
    slowed(engine, monkeypatch)
    monkeypatch.setattr(wk, "SWAP_MARGIN", float("inf"))
    worker = wk.GenerationWorker(engine, max_active=1, max_ahead_samples=BLOCK, send_timeout=0.3)

    async def scenario():
        early = worker.submit(long_job(seed=1, blocks=10), "early")
        blocks = [await anext(early)]
        await until(lambda: worker.parked == 1)
        busy = worker.submit(long_job(seed=2, blocks=200), "busy")  # takes the slot; read as it comes
        reader = asyncio.create_task(_drain(busy))
        await until(lambda: worker.active == 1)
        while early._ticket.output.qsize():  # the early client takes all it was given, and waits
            blocks.append(await anext(early))
        await asyncio.sleep(1.0)  # over three send timeouts
        still_waiting = (worker.parked, worker.active, reader.done())
        busy.cancel()  # its slot frees: the early job goes on
        blocks += [b async for b in early]
        await reader
        return still_waiting, sum(b.size for b in blocks)

    still_waiting, samples = run(worker, scenario)
    assert still_waiting == (1, 1, False)  # parked all along, while the busy stream ran
    assert samples == 10 * BLOCK and worker.pending == 0


def test_a_client_that_caught_up_takes_the_slot_of_a_stream_with_audio_to_spare(engine, monkeypatch):
    """Every slot is busy with a stream far ahead of its deadline (its client reads as fast as it
    can): the parked job whose client caught up takes that slot, and finishes while the other waits,
    instead of staying silent until the other stream ends."""
    slowed(engine, monkeypatch)
    worker = wk.GenerationWorker(engine, max_active=1, max_ahead_samples=BLOCK, send_timeout=0.3)

    async def scenario():
        early = worker.submit(long_job(seed=1, blocks=10), "early")
        blocks = [await anext(early)]
        await until(lambda: worker.parked == 1)
        busy = worker.submit(long_job(seed=2, blocks=200), "busy")
        reader = asyncio.create_task(_drain(busy))
        await until(lambda: worker.active == 1)
        blocks += [b async for b in early]  # its client reads on: it gets its slot back, and ends
        busy_running = not reader.done()
        return busy_running, sum(b.size for b in blocks), await reader

    busy_running, samples, busy_samples = run(worker, scenario)
    assert busy_running and samples == 10 * BLOCK and busy_samples == 200 * BLOCK
    assert worker.pending == 0


async def _drain(stream) -> int:
    return sum([b.size async for b in stream])


def parked_job(engine, monkeypatch, now: list[float], parked_at: float):
    """A worker without its thread on a scripted clock, and a job that first played at 90 s, has
    delivered 10 s of audio and was parked at `parked_at`: (worker, ticket, running)."""
    monkeypatch.setattr(wk, "clock", lambda: now[0])
    worker = wk.GenerationWorker(engine, max_active=1, thread=False)
    ticket = wk._Ticket(job=None, loop=None, output=None)
    running = wk._Running(ticket, None, keep_audio=False)
    running.first_audio_at, running.samples, running.parked_at = 90.0, 10 * inf.SAMPLE_RATE, parked_at
    return worker, ticket, running


def test_a_client_that_waited_for_a_slot_keeps_its_place(engine, monkeypatch):
    """On resuming, a parked job's playback deadline moves on by the time its client was behind (its
    listener paused), not by the time it then waited for a slot: it does not lose priority for that."""
    now = [100.0]
    worker, ticket, running = parked_job(engine, monkeypatch, now, parked_at=95.0)
    ticket.resume_at = 0
    ticket.took(1)  # at 100.0: caught up, 5 s after it was parked
    now[0] = 130.0  # resumed 30 s later, when a slot freed
    active, parked = [], [running]
    worker._resume(active, parked)
    assert active == [running] and parked == [] and ticket.resume_at is None
    assert running.first_audio_at == 95.0  # moved on by the 5 s its client was behind
    assert running.deadline(wk.FIRST_AUDIO_BUDGET) == 105.0  # overdue: the most urgent when the scheduler looks


def test_a_late_catch_up_time_from_an_earlier_parking_is_ignored(engine, monkeypatch):
    """The client's thread read an old `resume_at` and wrote its time after the job had resumed and
    parked again: that time belongs to the old parking and must not move the new one's deadline."""
    worker, ticket, running = parked_job(engine, monkeypatch, [130.0], parked_at=120.0)
    ticket.resume_at, ticket.taken = 2000, 2000  # parked at 120, its client there by now
    ticket.caught_up = (1000, 101.0)  # the late write, for the parking before
    assert ticket.caught_up_at() is None
    worker._resume(active := [], [running])
    # behind 120 -> 130: moved on 10 s, less the 45 ms a listener takes to play the 2000 samples it had to take
    assert active == [running] and running.first_audio_at == pytest.approx(100.0 - 2000 / inf.SAMPLE_RATE)


@pytest.mark.parametrize("speed", [1.0, 2.0])
def test_a_listener_playing_on_in_real_time_keeps_its_deadline_through_every_parking(engine, monkeypatch, speed):
    """A player never pauses, yet it needs the time its audio plays to take what it must before its job
    goes on: each parking moved the deadline on by that whole time, about a block per cycle, until the
    scheduler believed minutes of audio were buffered where there were seconds and served it last."""
    now = [95.0]
    worker, ticket, running = parked_job(engine, monkeypatch, now, parked_at=95.0)
    ticket.speed = speed
    ahead = 4 * inf.SAMPLE_RATE  # (what the job runs ahead of its client before it parks)
    for cycle in range(10):
        parked, active = [running], []
        ticket.resume_at = running.samples - ahead
        running.taken_when_parked = ticket.taken
        running.parked_at = now[0]
        needed = ticket.resume_at - ticket.taken
        now[0] += needed / inf.SAMPLE_RATE / speed  # (it plays what it must take, in real time at its speed)
        ticket.took(needed)
        worker._resume(active, parked)
        assert active == [running] and running.first_audio_at == pytest.approx(90.0), cycle
        running.samples += 2 * inf.SAMPLE_RATE  # (the next block, then it parks again)
    assert running.deadline(wk.FIRST_AUDIO_BUDGET) == pytest.approx(90.0 + running.samples / inf.SAMPLE_RATE / speed)


def test_a_parked_job_whose_client_is_sent_pieces_is_not_stalled(engine, monkeypatch):
    """The worker heard from a client only when it took a block: one playing a 30 s block as it comes was
    stopped as stalled. Each piece the transport sends now starts the stall clock again."""
    now = [100.0]
    worker, ticket, running = parked_job(engine, monkeypatch, now, parked_at=100.0)
    worker.send_timeout, ticket.resume_at = 30.0, running.samples  # (behind: it waits for its client)
    now[0] = 125.0
    wk.JobStream(ticket).touch()  # a piece of its block sent at 125 s
    now[0] = 140.0
    assert worker._ending(running, now[0], parked=True) is None
    now[0] = 156.0  # 31 s after the last piece
    assert isinstance(worker._ending(running, now[0], parked=True)[2], wk.ClientStalled)


def test_a_request_waiting_for_a_slot_ends_at_its_time_limit_not_when_a_slot_frees(engine):
    """ECHO_REQUEST_TIMEOUT counts the wait for a slot, but the worker sees a waiting job only when a
    slot frees: a 0.5 s limit ended after the 5 s the slot stayed busy."""
    go = __import__("threading").Event()
    steps = engine.steps
    engine.steps = lambda calls: (go.wait(30), steps(calls))[1]  # the running job holds the only slot
    worker = wk.GenerationWorker(engine, max_waiting=2, max_active=1)

    async def scenario():
        running = worker.submit(long_job(seed=1, blocks=2), "running")
        await until(lambda: worker.active == 1)
        queued = worker.submit(long_job(seed=2, blocks=2), "queued", timeout=0.2)
        with pytest.raises(wk.GenerationTimeout, match="waited for a slot"):
            await asyncio.wait_for(anext(queued), 20)  # (before the fix: until `go`, then a timeout)
        state = (worker.pending, worker.waiting)
        go.set()
        return state, sum(b.size for b in [b async for b in running])

    (pending, waiting), samples = run(worker, scenario)
    assert (pending, waiting) == (1, 0) and samples == 2 * BLOCK and worker.pending == 0


def test_close_ends_running_and_queued_jobs_when_every_slot_is_busy(engine):
    """close() put its stop signal behind the queued jobs, read only when a slot frees: the running job
    went on to its end and the queued one was then generated in full. Both now end with WorkerClosed
    (a 503), not as if their audio were complete."""
    steps = engine.steps
    engine.steps = lambda calls: (time.sleep(0.05), steps(calls))[1]
    worker = wk.GenerationWorker(engine, max_waiting=2, max_active=1)

    async def scenario():
        running = worker.submit(long_job(seed=1, blocks=40), "running")
        await until(lambda: worker.active == 1)
        queued = worker.submit(long_job(seed=2, blocks=40), "queued")
        await asyncio.to_thread(worker.close)
        samples = []
        for stream in (running, queued):
            samples.append(0)
            with pytest.raises(wk.WorkerClosed):
                async for block in stream:
                    samples[-1] += block.size
        return samples

    running, queued = asyncio.run(asyncio.wait_for(scenario(), 60))
    assert running < 40 * BLOCK and queued == 0 and not worker.alive and worker.pending == 0


def test_a_cancelled_jobs_silence_check_not_started_yet_is_dropped(tiny_model, tiny_fish, tiny_pca):
    """Silence checks run one at a time on their own thread; those of jobs that had ended still ran,
    one after the other, before a live stream's check (and so its next block)."""
    import threading

    checked, release = [], threading.Event()

    def detector(audio):
        checked.append(audio.size)
        release.wait(30)
        return 0.0

    engine = eng.SpeechEngine(tiny_model, tiny_fish, tiny_pca, SpeakerCache(4),
                              reroll=eng.VadReroll(detector, 1.0, 2))
    worker = wk.GenerationWorker(engine, max_active=4)

    async def scenario():
        gone = [worker.submit(long_job(seed=s, blocks=2), f"gone {s}") for s in range(3)]
        await until(lambda: len(checked) == 1 and worker.active == 3)  # one check runs, two wait their turn
        await asyncio.sleep(0.2)
        for stream in gone:
            stream.cancel()
        await until(lambda: worker.pending == 0)
        release.set()
        await asyncio.sleep(0.3)
        return len(checked)

    assert run(worker, scenario) == 1


def test_a_job_cancelled_while_it_waits_for_a_slot_ends_and_frees_the_slot_at_once(engine):
    go = __import__("threading").Event()
    steps = engine.steps
    engine.steps = lambda calls: (go.wait(30), steps(calls))[1]  # the running job holds the worker
    worker = wk.GenerationWorker(engine, max_waiting=2, max_active=1)

    async def scenario():
        running = worker.submit(long_job(seed=1, blocks=3), "running")
        await until(lambda: worker.active == 1)
        waiting = [worker.submit(long_job(seed=s), f"waiting {s}") for s in (2, 3)]
        with pytest.raises(wk.QueueFull):
            worker.reserve()
        for stream in waiting:
            stream.cancel()
            assert [b async for b in stream] == []  # ended now, not when the slot frees
        worker.reserve().release()  # their slots are free again
        state = (worker.pending, worker.active, worker.waiting)
        go.set()
        return state, sum(b.size for b in [b async for b in running])

    state, samples = run(worker, scenario)
    assert state == (1, 1, 0) and samples == 3 * BLOCK and worker.pending == 0


def test_a_failing_debug_sink_fails_nothing(engine, caplog):
    def sink(audio):
        raise PermissionError("api_generation.wav: permission denied")

    worker = wk.GenerationWorker(engine, max_active=1, debug_sink=sink)

    async def scenario():
        first = [b async for b in worker.submit(long_job(seed=1, blocks=2))]
        second = [b async for b in worker.submit(long_job(seed=2, blocks=2))]
        return sum(b.size for b in first), sum(b.size for b in second), worker.alive

    assert run(worker, scenario) == (2 * BLOCK, 2 * BLOCK, True)
    assert "saving the generated audio for debugging failed" in caplog.text


def test_an_unexpected_error_in_the_worker_fails_its_jobs_and_the_worker_goes_on(engine, monkeypatch):
    worker = wk.GenerationWorker(engine, max_active=2)
    check = worker._check_silences
    failures = [RuntimeError("a bug in the scheduler")]

    def broken(active):
        if failures and active:
            raise failures.pop()
        check(active)

    monkeypatch.setattr(worker, "_check_silences", broken)

    async def scenario():
        with pytest.raises(RuntimeError, match="a bug in the scheduler"):
            [b async for b in worker.submit(long_job(seed=1, blocks=2))]
        await until(lambda: worker.pending == 0)
        assert (worker.active, worker.parked) == (0, 0)  # the gauges say so too
        return sum(b.size for b in [b async for b in worker.submit(long_job(seed=2, blocks=2))]), worker.alive

    assert run(worker, scenario) == (2 * BLOCK, True)
    assert worker.pending == 0


# ---- slots reserved before the job is built ---------------------------------------------------------


def test_a_request_preparing_its_voice_is_not_counted_as_waiting_for_a_slot(engine):
    """echo_queue_length counted requests encoding a voice's first use while every slot was free: an
    autoscaler reading it saw saturation."""
    worker = wk.GenerationWorker(engine, max_waiting=2, max_active=1)

    async def scenario():
        reservation = worker.reserve()  # the request holds its slot while its voice is prepared
        during = (worker.preparing, worker.waiting)
        stream = reservation.submit(long_job(blocks=2))
        after = worker.preparing
        blocks = [block async for block in stream]
        return during, after, len(blocks)

    during, after, blocks = run(worker, scenario)
    assert (during, after) == ((1, 0), 0) and blocks > 0


def test_with_the_queue_full_reserve_refuses_at_once_and_a_released_slot_is_free_again(engine):
    worker = wk.GenerationWorker(engine, max_waiting=1, max_active=1)
    try:
        first, second = worker.reserve(), worker.reserve()
        # (held while their requests prepare: not waiting for a slot, which echo_queue_length reports)
        assert worker.pending == 2 and worker.preparing == 2 and worker.waiting == 0 and worker.active == 0
        started = time.monotonic()
        with pytest.raises(wk.QueueFull):
            worker.reserve()
        assert time.monotonic() - started < 0.1
        first.release()
        first.release()  # once is enough
        assert worker.pending == 1 and worker.preparing == 1
        with worker.reserve():
            assert worker.pending == 2
        assert worker.pending == 1  # released on leaving the block
        second.release()
        assert worker.pending == 0 and worker.preparing == 0
    finally:
        worker.close()


def test_a_reserved_slot_takes_its_job_without_a_second_check(engine):
    worker = wk.GenerationWorker(engine, max_waiting=0, max_active=1)

    async def scenario():
        with worker.reserve() as reservation:
            with pytest.raises(wk.QueueFull):
                worker.submit(long_job(blocks=2))  # the only slot is reserved
            stream = reservation.submit(long_job(blocks=2))  # into its own slot
        assert worker.pending == 1  # submitted: leaving the block did not release it
        with pytest.raises(RuntimeError, match="already submitted"):
            reservation.submit(long_job(blocks=2))
        return sum(b.size for b in [b async for b in stream])

    assert run(worker, scenario) == 2 * BLOCK
    assert worker.pending == 0


# ---- a live server and clients that never read ------------------------------------------------------

LONG = {"voice": "none", "stream": True, "response_format": "pcm", "early_stop_on_zero": False,
        "block_sizes": [4] + [20] * 30, "num_steps": 1}  # 28 s of audio per text chunk, cheaply
NEVER_READ = "[S1] " + "Nobody reads this long stream of speech. " * 50  # ~5 chunks: 140 s, 12 MB as PCM


def rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)[1]) / 1024


def streams(server) -> tuple[float, float, float]:
    """echo_active_streams, echo_queue_length and echo_parked_streams (a parked job is in the last only)."""
    text = httpx.get(server.url + "/metrics", timeout=10).text
    return tuple(float(re.search(rf"^{name} (\S+)$", text, re.M)[1])
                 for name in ("echo_active_streams", "echo_queue_length", "echo_parked_streams"))


@pytest.mark.slow
def test_clients_that_never_read_hold_bounded_memory_and_are_dropped(tiny_echo_dir, tiny_fish_dir, voice_dir,
                                                                     tmp_path_factory):
    """Six raw-socket clients ask for long streams and never read: their jobs park (they leave the
    active gauge, none ended), the server's memory stays flat, and the send timeout ends them.

    The kernel's socket buffers take ~36 s of PCM per connection; beyond that the audio waited in
    the server. Growth (VmRSS) over a server warmed up by six streams read to the end, measured on
    2 CPU cores with ECHO_SEND_TIMEOUT=30: without the limit (ECHO_MAX_AHEAD_SECONDS=1000) +83 MB
    50 s in, growing until the connections were given up at 51 s; with 1 s ahead, +2.9 MB, all six
    parked from 18 s on. (The warm-up's freed memory is reused before RSS grows: the growth
    without the limit understates what waited.) What the server allocates to run six streams at
    once depends on how the scheduler interleaves them and on the CPU (+20 to +77 MB within 3 s of
    their start, 2026-12-06; +77 to +108 MB alone and once +170 MB in a full run on another CPU,
    2026-12-07, before and after that day's changes alike); from the moment all six are parked it
    stays flat, which with their parking is what shows the limit works (the bound on the whole
    growth only catches a gross leak)."""
    env = server_env(tiny_echo_dir, tiny_fish_dir, voice_dir, ECHO_MAX_AHEAD_SECONDS="1", ECHO_SEND_TIMEOUT="10")
    with live_server(tmp_path_factory, "never-read", env) as live:
        warm = {**LONG, "input": "[S1] Warm up."}  # the batch's own memory, before measuring
        with ThreadPoolExecutor(6) as pool:
            answers = pool.map(lambda _: httpx.post(live.url + "/v1/audio/speech", json=warm, timeout=120), range(6))
            assert [r.status_code for r in answers] == [200] * 6
        base = peak = rss_mb(live.process.pid)
        body = json.dumps({**LONG, "input": NEVER_READ}).encode()
        request = (b"POST /v1/audio/speech HTTP/1.1\r\nHost: echo\r\nContent-Type: application/json\r\n"
                   b"Content-Length: %d\r\n\r\n" % len(body)) + body
        stopped = re.compile(r"generation (stopped|cancelled)\b.* after")

        def ended() -> int:  # jobs stopped or cancelled (logged before they leave the active gauge)
            return sum(bool(stopped.search(line)) for line in live.log().splitlines())

        clients, ran, parked, at_parking, while_parked = [], False, False, 0.0, 0.0
        try:
            for _ in range(6):
                client = socket.socket()
                client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                client.connect(("127.0.0.1", live.port))
                client.sendall(request)
                clients.append(client)
            deadline = time.monotonic() + 150
            while ended() < 6:
                assert time.monotonic() < deadline, "the stalled streams were not stopped"
                peak = max(peak, rss_mb(live.process.pid))
                active, waiting, parked_now = streams(live)
                ran = ran or active == 6
                if not parked and ran and active == waiting == ended() == 0 and parked_now == 6:
                    parked, at_parking = True, rss_mb(live.process.pid)
                if parked:
                    while_parked = max(while_parked, rss_mb(live.process.pid))
                time.sleep(0.25)
        finally:
            for client in clients:
                client.close()
    assert parked, "the jobs ran on for clients that read nothing"
    assert while_parked - at_parking < 4, f"the server grew by {while_parked - at_parking:.1f} MB while parked"
    assert peak - base < 300, f"the server grew by {peak - base:.0f} MB for clients that read nothing"


def test_a_stalled_client_is_reported_as_a_408_in_one_log_line(caplog):
    from service import generation_failure

    with caplog.at_level("INFO"):
        error = generation_failure(wk.ClientStalled("the client took no audio for 30 s"))
    assert (error.status, error.code) == (408, "request_timeout")
    assert [r.exc_info for r in caplog.records] == [None]  # no traceback

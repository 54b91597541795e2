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


# ---- slots reserved before the job is built ---------------------------------------------------------


def test_with_the_queue_full_reserve_refuses_at_once_and_a_released_slot_is_free_again(engine):
    worker = wk.GenerationWorker(engine, max_waiting=1, max_active=1)
    try:
        first, second = worker.reserve(), worker.reserve()
        assert worker.pending == 2 and worker.waiting == 2 and worker.active == 0
        started = time.monotonic()
        with pytest.raises(wk.QueueFull):
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

"""The worker's schedule: earliest playback deadline first, units of one block size (worker.next_unit),
checked with scripted clocks: no wall-clock assertion."""

import torch

import worker as wk
from engine import DecodeCall
from inference import SAMPLE_RATE, ModelCall

BUDGET = 0.5  # s: a new stream's first-audio budget


def job(frames: int | None = None, arrived: float = 0.0, playing_since: float | None = None,
        seconds: float = 0.0, speed: float = 1.0) -> wk._Running:
    """A job on the worker thread waiting on a `frames`-frame diffusion step (None: on a decode),
    which arrived at `arrived` and, once playing (at `speed`), has delivered `seconds` of audio."""
    ticket = wk._Ticket(job=None, loop=None, output=None, arrived=arrived, speed=speed)
    running = wk._Running(ticket, steps=None, keep_audio=False)
    running.first_audio_at, running.samples = playing_since, int(seconds * SAMPLE_RATE)
    running.pending = (DecodeCall(None, torch.zeros(1)) if frames is None else
                       ModelCall(torch.zeros(2, frames, 80), torch.ones(2), 0, None, None, None, None))
    return running


def unit(*jobs: wk._Running) -> list[wk._Running]:
    return wk.next_unit(list(jobs), lambda call: call.x.shape[1], BUDGET)


def test_a_new_streams_first_block_goes_before_streams_with_audio_buffered():
    playing = job(480, playing_since=0.0, seconds=12.0)  # audio until t=12
    new = job(32, arrived=3.0)  # first audio due by t=3.5
    assert unit(playing, new) == [new]


def test_a_stream_about_to_run_dry_goes_before_a_new_one():
    running_dry = job(128, playing_since=0.0, seconds=1.2)  # audio until t=1.2
    new = job(32, arrived=1.0)  # due by t=1.5
    assert unit(new, running_dry) == [running_dry]
    decoding = job(None, playing_since=0.0, seconds=1.1)  # its next block waits on the decoder
    assert unit(new, running_dry, decoding) == [decoding]


def test_steps_of_one_block_size_run_together_and_other_sizes_apart():
    a, b = job(32, arrived=0.0), job(32, arrived=5.0)  # b is in no hurry, but batching it is free
    c = job(480, playing_since=0.0, seconds=2.0)
    assert unit(a, b, c) == [a, b]
    assert unit(c, b) == [c]  # c runs dry at t=2, before b's first audio is due (5.5)
    assert unit(job(480, playing_since=0.0, seconds=9.0), b) == [b]


def test_a_listener_at_a_higher_speed_runs_dry_sooner_and_goes_first():
    """`speed` only reached the encoder: at speed 4 the listener runs out four times sooner than the
    scheduler assumed, so under load that stream underran first."""
    normal = job(128, playing_since=0.0, seconds=4.0)  # audio until t=4
    fast = job(128 * 2, playing_since=0.0, seconds=8.0, speed=4.0)  # 8 s of audio played in 2 s
    assert fast.deadline(BUDGET) == 2.0 and unit(normal, fast) == [fast]


def test_a_request_gives_the_worker_its_speed(app, monkeypatch):
    from speech_request import GenerationOptions

    assert GenerationOptions(input="Hi.", voice="v").playback_speed == 1.0
    speeds, submit = [], wk.Reservation.submit
    monkeypatch.setattr(wk.Reservation, "submit",
                        lambda self, *a, speed=1.0, **k: (speeds.append(speed), submit(self, *a, speed=speed, **k))[1])
    payload = {"input": "Hi.", "voice": "alice", "speed": 2.5, "response_format": "pcm", "block_sizes": [8],
               "num_steps": 1}
    assert app.post("/v1/audio/speech", json=payload, timeout=60).status_code == 200 and speeds == [2.5]


def test_equal_deadlines_prefer_the_larger_unit():
    a, b, c = job(32, arrived=1.0), job(32, arrived=1.0), job(128, arrived=1.0)
    assert unit(c, a, b) == [a, b]


def test_nothing_to_run_is_an_empty_unit():
    assert unit() == []


def test_no_stream_starves_under_a_scripted_load():
    """Six streams of 8-step blocks arriving over time on a worker whose units cost 40 ms each:
    every stream is served within a bounded number of units, and all finish."""
    clock, cost, steps_per_block, block_seconds = 0.0, 0.04, 8, 1.5
    jobs = [job(32, arrived=0.1 * i) for i in range(6)]
    left = {id(j): (4, steps_per_block) for j in jobs}  # blocks left, steps left in the current block
    waited = {id(j): 0 for j in jobs}
    longest_wait = 0
    while left:
        ready = [j for j in jobs if id(j) in left and j.arrived <= clock]
        if not ready:
            clock += cost
            continue
        chosen = unit(*ready)
        clock += cost
        for j in ready:
            waited[id(j)] = 0 if j in chosen else waited[id(j)] + 1
            longest_wait = max(longest_wait, waited[id(j)])
        for j in chosen:
            blocks, steps = left[id(j)]
            if steps > 1:
                left[id(j)] = (blocks, steps - 1)
                continue
            if j.first_audio_at is None:
                j.first_audio_at = clock
            j.samples += int(block_seconds * SAMPLE_RATE)
            if blocks == 1:
                del left[id(j)]
            else:
                left[id(j)] = (blocks - 1, steps_per_block)
    assert longest_wait <= 3 * len(jobs)


def test_a_job_cancelled_just_before_it_would_park_is_not_parked():
    """Its cancel sent no wake-up (it was not parked yet): parked, it would sleep until the send
    timeout; kept in the batch, it is dropped at the next check."""
    worker = wk.GenerationWorker(engine=None, max_ahead_samples=SAMPLE_RATE)
    try:
        running = job(32, playing_since=0.0, seconds=5.0)  # 5 s ahead of a client that took nothing
        running.ticket.cancelled.set()
        active, parked = [running], []
        worker._park(active, parked)
        assert (active, parked) == ([running], []) and running.ticket.resume_at is None
        ahead = job(32, playing_since=0.0, seconds=5.0)  # the same without the cancel parks
        worker._park(active := [ahead], parked)
        assert (active, parked) == ([], [ahead])
    finally:
        worker.close()


def test_a_worker_serves_an_engine_that_has_nothing_to_release_when_idle():
    """The idle worker asks its engine to let go of what finished jobs left (release_idle); an
    engine without that (a test's or a benchmark's) killed the generation thread, and every later
    request waited forever."""
    import threading
    from types import SimpleNamespace

    worker = wk.GenerationWorker(SimpleNamespace(), max_waiting=1, max_active=1)
    answer = []
    caller = threading.Thread(target=lambda: answer.append(worker.call(lambda: 42)), daemon=True)
    caller.start()
    caller.join(10)
    worker.close()
    assert answer == [42]

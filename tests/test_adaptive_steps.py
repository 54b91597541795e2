"""Adaptive steps (ECHO_ADAPTIVE_STEPS, issue 19 item 4): under a predicted underrun, blocks that start
take fewer diffusion steps, never below the floor preset's, and the steps are restored as load falls;
what each block took is reported by every transport and counted in /metrics. The scheduler's side is
checked with scripted clocks: no wall-clock assertion."""

import base64
import json
import time

import numpy as np
import pytest
import torch

import engine as eng
import inference as inf
import worker as wk
from settings import PERFORMANCE_PRESETS, load_settings
from voices import SpeakerCache

SETTINGS = inf.SamplerSettings(num_steps=0, cfg_scale_text=3.0, cfg_scale_speaker=8.0, cfg_min_t=0.5, cfg_max_t=1.0)
LOW_MID = eng.StepFloor.of(PERFORMANCE_PRESETS["low_mid"], PERFORMANCE_PRESETS["default"])
BUDGET = 0.5  # s: a new stream's first-audio budget


def running(frames: int = 128, steps_left: int = 0, playing_since: float | None = 0.0, seconds: float = 0.0,
            arrived: float = 0.0) -> wk._Running:
    """A job on the worker thread waiting on a `frames`-frame diffusion step with `steps_left` steps
    left in its block, playing since `playing_since` with `seconds` of audio delivered."""
    job = wk._Running(wk._Ticket(job=None, loop=None, output=None, arrived=arrived), steps=None, keep_audio=False)
    job.first_audio_at, job.samples, job.steps_left = playing_since, int(seconds * inf.SAMPLE_RATE), steps_left
    job.pending = inf.ModelCall(torch.zeros(2, frames, 80), torch.ones(2), 0, None, None, None, None)
    return job


def load(jobs, now, unit_seconds):
    return wk.predicted_load(jobs, now, unit_seconds, lambda call: call.x.shape[1], BUDGET)


# ---- the prediction and the budget: scripted clocks ----------------------------------------------


def test_the_predicted_load_weighs_the_work_before_each_streams_next_audio_against_its_buffer():
    a = running(128, steps_left=10, seconds=1.0)  # runs dry at t=1
    b = running(128, steps_left=5, seconds=2.0)  # batched with a: its steps cost nothing more
    c = running(480, steps_left=20, seconds=1.5)  # another frame group: waits for a's steps (EDF)
    # at 50 ms a unit, c's audio needs (10 + 20 + 1) units = 1.55 s but has 1.5 s left: an underrun
    assert load([a, b, c], now=0.0, unit_seconds=0.05) == pytest.approx(1.55 / 1.5)
    assert load([a, b, c], now=0.0, unit_seconds=0.04) == pytest.approx(1.24 / 1.5)  # fits
    assert load([a, b], now=0.0, unit_seconds=0.05) == pytest.approx(0.55)
    assert load([running(seconds=1.0)], now=2.0, unit_seconds=0.05) == float("inf")  # already run dry
    assert load([], now=0.0, unit_seconds=0.05) == 0.0


def test_the_budget_steps_down_under_an_underrun_and_up_after_low_load_without_flapping():
    budget = wk.StepBudget(levels=4, hold=0.5, restore_load=0.5)
    seen = []
    for t in np.arange(0.0, 1.6, 0.1):  # an underrun predicted throughout: one level per hold
        budget.update(2.0, t)
        seen.append(budget.value)
    assert seen[0] == 0.75 and seen[-1] == 0.0 and sorted(seen, reverse=True) == seen
    for t in np.arange(1.6, 4.0, 0.1):  # between the thresholds: held where it is
        budget.update(0.8, t)
    assert budget.value == 0.0
    budget.update(0.2, 4.0)
    budget.update(0.9, 4.25)  # not low for a whole hold: no move up
    budget.update(0.2, 4.5)
    assert budget.value == 0.0
    for t, expected in ((4.75, 0.25), (5.0, 0.25), (5.25, 0.5), (5.75, 0.75), (6.25, 1.0), (9.0, 1.0)):
        budget.update(0.2, t)
        assert budget.value == expected, t
    budget.update(0.0, 100.0)
    assert budget.value == 1.0
    idle = wk.StepBudget(levels=4, hold=0.5)
    idle.update(5.0, 0.0)
    idle.update(5.0, 0.5)
    idle.update(0.0, 60.0)  # a minute of no load (an idle worker predicts nothing): all the way back
    assert idle.value == 1.0


class ScriptedEngine:
    """An engine whose diffusion steps each cost `cost` seconds of the scripted clock."""

    def __init__(self, clock: list[float], cost: float):
        self.clock, self.cost, self.steps = clock, cost, None

    def step_calls(self, calls):
        self.clock[0] += self.cost
        return [None] * len(calls)


def endless_steps(frames: int):
    while True:
        yield inf.ModelCall(torch.zeros(2, frames, 80), torch.ones(2), 0, None, None, None, None)


def test_the_worker_lowers_the_budget_under_load_and_restores_it_as_load_falls(monkeypatch):
    """A stream 30 steps from its next block with 1 s of audio left, on a worker whose units cost
    0.1 s of the scripted clock: an underrun is predicted, the budget falls to its floor one level per
    hold; once the listener has plenty buffered it comes back."""
    now = [0.0]
    monkeypatch.setattr(wk, "clock", lambda: now[0])
    fake = ScriptedEngine(now, cost=0.1)
    monkeypatch.setattr(wk, "COMPUTE", {inf.ModelCall: "step_calls"})
    worker = wk.GenerationWorker(engine=fake, step_budget=wk.StepBudget(levels=4, hold=0.5))
    try:
        job = running(128, steps_left=30, seconds=1.0)
        job.steps = endless_steps(128)
        worker._advance(job, None)
        active, seen = [job], []
        for _ in range(25):
            worker._step(active)
            seen.append((round(now[0], 1), worker.budget))
        assert worker.unit_seconds == pytest.approx(0.1)
        assert seen[0][1] == 1.0  # nothing measured yet: nothing predicted
        assert [b for _, b in seen[:12]] == sorted((b for _, b in seen[:12]), reverse=True)
        assert worker.budget == 0.0 and min(b for _, b in seen) == 0.0
        job.samples = 120 * inf.SAMPLE_RATE  # the load falls: two minutes buffered
        restored = []
        for _ in range(30):
            worker._step(active)
            restored.append(worker.budget)
        assert restored == sorted(restored) and restored[-1] == 1.0 and restored[0] < 1.0
    finally:
        worker.close()


# ---- the floor, and which blocks change: the engine with the tiny models --------------------------


def test_the_floor_is_the_presets_steps_on_its_layout_and_its_share_of_the_work_elsewhere():
    default = eng.BlockShape((32, 128, 480), (8, 15, 20))
    assert LOW_MID.floors(default) == (8, 10, 15)
    assert LOW_MID.share == pytest.approx((32 * 8 + 128 * 10 + 480 * 15) / (32 * 8 + 128 * 15 + 480 * 20))
    assert LOW_MID.floors(eng.BlockShape((640,), (20,))) == (15,)  # ceil(20 x 0.742)
    assert LOW_MID.floors(eng.BlockShape((8, 8), (4, 2))) == (3, 2)
    assert LOW_MID.floors(eng.BlockShape((32, 128, 480), (4, 4, 4))) == (4, 4, 4)  # never above the request


@pytest.fixture()
def engine(tiny_model, tiny_fish, tiny_pca):
    return eng.SpeechEngine(tiny_model, tiny_fish, tiny_pca, SpeakerCache(4), step_floor=LOW_MID)


def job(blocks=(8, 8, 8), steps=(4, 4, 4)):
    shape = eng.BlockShape(blocks, steps)
    return eng.SpeechJob(("[S1] Hello there, this is a test.",), None, 0, shape, shape, SETTINGS,
                         eng.EarlyStop(enabled=False))


def generate(engine, speech_job, choose=None, on_step=None):
    """The job's audio, driven as SpeechEngine.generate drives it, with `choose` asked per block."""
    steps = engine.job_steps(speech_job) if choose is None else engine.job_steps(speech_job, choose)
    out = inf.run_steps(engine.model, steps, on_step, evaluate=lambda call: engine.steps([call])[0])
    return np.concatenate(list(out))


def test_a_block_never_takes_fewer_steps_than_its_floor_nor_more_than_it_asked(engine):
    used = []
    generate(engine, job(), choose=lambda floor, requested: used.append((floor, requested)) or 0)
    assert used and all(f == 3 and r == 4 for f, r in used)  # asked with the floor, ceil(4 x 0.742)
    counts = []

    def count_steps():
        counts[-1] += 1

    def greedy(floor, requested):
        counts.append(0)
        return 100

    generate(engine, job(), choose=greedy, on_step=count_steps)
    assert counts and set(counts) == {4}
    counts.clear()

    def starved(floor, requested):
        counts.append(0)
        return 0

    generate(engine, job(), choose=starved, on_step=count_steps)
    assert counts and set(counts) == {3}


def test_only_blocks_that_start_after_the_budget_falls_take_fewer_steps(engine):
    budget = wk.StepBudget(levels=4)
    taken, counts = [], []

    def choose(floor, requested):
        taken.append(budget.steps(floor, requested))
        counts.append(0)
        return taken[-1]

    def step():
        counts[-1] += 1
        if sum(counts) == 2:  # in the middle of the first block the budget falls to the floor
            budget.level = 0

    generate(engine, job(steps=(6, 6, 6)), choose=choose, on_step=step)
    assert len(taken) == 3
    assert taken == counts == [6, 5, 5]  # the first block keeps its schedule; ceil(6 x 0.742) = 5


def test_adaptive_steps_at_full_budget_and_off_give_the_same_audio_bit_for_bit(engine):
    off = generate(engine, job())
    full = wk.StepBudget()
    on = generate(engine, job(), choose=full.steps)
    assert np.array_equal(off, on)
    assert load_settings(device="cpu").adaptive_steps is False  # off unless asked for


def test_an_unknown_floor_preset_stops_start_up_naming_the_variable():
    from settings import ConfigError

    with pytest.raises(ConfigError, match="ECHO_ADAPTIVE_STEPS_FLOOR: .*low_mid"):
        load_settings(device="cpu", adaptive_steps=True, adaptive_steps_floor="tiny")
    assert load_settings(device="cpu", adaptive_steps_floor="Low-Mid").adaptive_steps_floor == "low_mid"


# ---- what each transport reports, in process ------------------------------------------------------

FAST = {"input": "Hello there. This is a test.", "voice": "none", "seed": 1, "block_sizes": [8, 8],
        "num_steps": [4, 4]}  # floor: ceil(4 x 0.742) = 3 steps per block


@pytest.fixture(scope="module")
def adaptive_app(tiny_echo_dir, tiny_fish_dir, tmp_path_factory):
    """An app with ECHO_ADAPTIVE_STEPS=1, its budget held at the floor: the worker's clock stands
    still, so the budget cannot move back up."""
    from fastapi.testclient import TestClient

    from api_server import create_app

    settings = load_settings(model_repo=str(tiny_echo_dir), fish_repo=str(tiny_fish_dir), device="cpu",
                             model_dtype="float32", voice_dirs=[tmp_path_factory.mktemp("voices")], warmup=False,
                             adaptive_steps=True)
    real_clock = wk.clock
    with TestClient(create_app(settings)) as client:
        deadline = time.monotonic() + 120
        while client.get("/ready").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.1)  # the models load on a thread of their own
        wk.clock = lambda: 1000.0
        budget = client.app.state.service.runtime.worker.step_budget
        budget.level, budget.moved_at = 0, 1000.0
        try:
            yield client
        finally:
            wk.clock = real_clock


def test_a_whole_file_reports_the_steps_of_each_block_in_x_echo_steps(adaptive_app):
    answer = adaptive_app.post("/v1/audio/speech", json={**FAST, "stream": False, "response_format": "pcm"})
    assert answer.status_code == 200 and answer.content
    assert answer.headers["x-echo-steps"] == "3,3"


def test_sse_reports_the_steps_in_its_done_event(adaptive_app):
    answer = adaptive_app.post("/v1/audio/speech", json={**FAST, "stream": True, "stream_format": "sse"})
    events = [json.loads(line[6:]) for line in answer.text.splitlines() if line.startswith("data: ")]
    assert events[-1]["type"] == "speech.audio.done" and events[-1]["steps"] == [3, 3]
    assert b"".join(base64.b64decode(e["audio"]) for e in events[:-1])


def test_the_websocket_end_reports_the_steps(adaptive_app):
    with adaptive_app.websocket_connect("/v1/audio/speech/stream/ws") as ws:
        ws.send_text(json.dumps({**FAST, "segment_id": "a", "continue": False}))
        while (message := ws.receive())["type"] != "websocket.close":
            if message.get("text") and (end := json.loads(message["text"]))["type"] == "end":
                break
    assert end["segment_id"] == "a" and not end["cancelled"] and end["steps"] == [3, 3]


def test_metrics_expose_the_budget_and_the_blocks_generated_with_fewer_steps(adaptive_app):
    adaptive_app.post("/v1/audio/speech", json={**FAST, "stream": False, "response_format": "pcm"})
    text = adaptive_app.get("/metrics").text
    values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
              if line.startswith("echo_adaptive_")}
    assert values["echo_adaptive_steps_budget"] == 0.0
    assert values["echo_adaptive_reduced_blocks"] >= 2 and values["echo_adaptive_steps_saved"] >= 2


def test_an_idle_worker_reports_the_budget_its_next_block_gets(engine, monkeypatch):
    """The budget moves before each unit; an idle worker runs none. Its gauge must not stay at the
    floor it reached under load: after the hold with nothing running, the next block gets all its steps."""
    now = [101.5]
    monkeypatch.setattr(wk, "clock", lambda: now[0])
    budget = wk.StepBudget(levels=4, hold=0.5)
    for moment in (100.0, 100.5, 101.0, 101.5):
        budget.update(2.0, moment)  # under load: down to the floor
    worker = wk.GenerationWorker(engine, step_budget=budget, thread=False)
    assert budget.value == 0.0 and worker.budget == 0.0  # just now: still the floor
    now[0] = 110.0
    assert worker.budget == 1.0 and budget.level == 0  # reported, not moved (the worker's thread moves it)

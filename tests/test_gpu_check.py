"""The GPU kit's whole flow, run on the tiny models on CPU so that it never rots between GPU sessions;
its time budget (stages skipped with a reason, reports written after every stage) and its Poisson
load stage on scripted servers."""

import asyncio
import json
import signal
import subprocess
import sys
import tarfile
import time

import httpx
import pytest

import gpu_check
from conftest import ROOT


@pytest.mark.slow
def test_gpu_kit_runs_its_whole_flow_on_the_tiny_models(tmp_path):
    out, results = tmp_path / "report.md", tmp_path / "results.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--tiny", "--levels", "1,2",
                    "--repeat", "1", "--out", str(out), "--json", str(results), "--logs", str(tmp_path / "logs"),
                    "--logs-tar", str(tmp_path / "logs.tar.gz"), "--breakdown", "eager", "--rates", "0.5",
                    "--poisson-seconds", "3"],
                   check=True, timeout=900, capture_output=True)
    report = json.loads(results.read_text())
    assert report["tiny"] is True and report["device"] == "cpu"
    assert set(report["configs"]) == {"eager", "static"}
    for name, config in report["configs"].items():
        assert "error" not in config, (name, config["error"])
        assert [level["clients"] for level in config["levels"]] == [1, 2]
        assert config["nonstream_audio_seconds"] > 29 and config["compiles_after_warm_up"] == 0
        assert config["exit_code"] == 0 and config["log_errors"] == []
        assert config["planned_need_gib"] is None and config["planned_worst_gib"] is None  # (no memory plan off CUDA)
        assert config["out_of_memory_splits"] == config["out_of_memory_failures"] == 0
        [curve] = config["poisson"]  # one rate: requests of the benchmark text arriving at 0.5/s for 3 s
        assert curve["rate"] == 0.5 and curve["requests"] == len(gpu_check.arrivals(0.5, 3)) > 0
        assert curve["finished"] + curve["refused_429"] + curve["cut"] == curve["requests"] and curve["failed"] == 0
        assert curve["ttfb_p95_ms"] >= curve["ttfb_p50_ms"] > 0 and curve["gaps_per_stream"] >= 0
        assert curve["peak_in_flight"] >= 1 and curve["peak_active"] >= 1
    for key in ("ttfb_p50_ms", "ttfb_p95_ms", "nonstream_30s_30steps_s", "realtime_streams"):
        assert report[key] > 0, key
    assert report["tests"]["skipped"] > 0 and report["tests"].get("failed", 0) == 0  # no CUDA here
    assert "| eager | " in out.read_text() and (tmp_path / "logs" / "server-eager.log").is_file()
    stages = report["configs"]["eager"]["first_block"]
    assert stages["diffusion step"]["calls"] == 8 and stages["decode"]["calls"] == 1  # the default first block
    assert stages["mp3_first_bytes_ms"] > 0 and stages["mp3_whole_block_ms"] > 0
    assert "first_block" not in report["configs"]["static"] and "| eager | " in out.read_text().split("First audio")[1]
    assert "| static | 0.5 | " in out.read_text().split("Poisson arrivals")[1]
    order = [stage["stage"] for stage in report["stages"]]  # the most important first
    assert order[:2] == ["environment and weights", "eager: start"] and order[-1] == "CUDA tests"
    assert order.index("eager: 2 streams") < order.index("eager: poisson 0.5/s") < order.index("static: start")
    assert order.index("static: stop") < order.index("eager: first-block breakdown")
    assert all(stage["status"] == "done" for stage in report["stages"]), report["stages"]
    with tarfile.open(tmp_path / "logs.tar.gz") as tar:  # (a device call brings back 8 files: the logs in one)
        assert {"server-eager.log", "server-static.log", "cuda-tests.log"} <= set(tar.getnames())


def test_a_spent_budget_skips_every_stage_and_says_why(tmp_path):
    results = tmp_path / "results.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--tiny", "--budget", "0",
                           "--json", str(results), "--out", str(tmp_path / "report.md")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(results.read_text())
    stages = {stage["stage"]: stage for stage in report["stages"]}
    assert stages["environment and weights"]["status"] == "done"  # always: everything else needs it
    for name in ("eager: start", "static: start", "CUDA tests"):
        assert stages[name]["status"] == "skipped" and "of --budget 0 s left" in stages[name]["reason"], name
    assert report["configs"]["eager"]["skipped"] == stages["eager: start"]["reason"]
    assert "Stages not done" in (tmp_path / "report.md").read_text()


def test_a_failure_before_any_configuration_is_a_failed_stage_in_both_reports(tmp_path):
    """No CUDA device (or wheels that do not install, or weights that cannot be written) ended the run
    with both reports empty: the reason went only to stderr."""
    results, out = tmp_path / "results.json", tmp_path / "report.md"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--json", str(results),
                           "--out", str(out), "--logs-tar", str(tmp_path / "logs.tar.gz")],
                          capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "CUDA_VISIBLE_DEVICES": ""})  # (no CUDA, also on a GPU)
    assert done.returncode != 0
    [stage] = json.loads(results.read_text())["stages"]
    assert stage["stage"] == "run" and stage["status"] == "failed" and "no CUDA device" in stage["reason"]
    assert "no CUDA device" in out.read_text() and tarfile.is_tarfile(tmp_path / "logs.tar.gz")


def test_a_server_whose_models_fail_to_load_ends_the_wait_at_once_with_the_reason(tmp_path, tiny_fish_dir,
                                                                                   voice_dir):
    """It idles with /ready at 503, so the kit waited out its whole budget (and lost the other
    configurations) to record a blank reason."""
    from conftest import server_env
    from live_server import LiveServer, ServerFailed

    env = server_env(tmp_path / "no-such-model", tiny_fish_dir, voice_dir)
    with pytest.raises(ServerFailed) as failed:
        LiveServer(env, tmp_path / "server.log", ready_timeout=120)
    first = str(failed.value).splitlines()[0]
    assert "loading the models failed" in first and "ECHO_MODEL_REPO" in first


@pytest.mark.slow
def test_a_run_ended_by_sigterm_keeps_what_it_measured_and_stops_its_server(tmp_path):
    results = tmp_path / "results.json"
    process = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--tiny", "--configs",
                                "eager", "--levels", "1", "--json", str(results), "--logs", str(tmp_path / "logs")],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while "eager: warm-up stream" not in (results.read_text() if results.is_file() else ""):
            assert process.poll() is None and time.monotonic() < deadline, "no warm-up stream recorded"
            time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=120) == 128 + signal.SIGTERM
    finally:
        process.kill()
    report = json.loads(results.read_text())
    assert report["interrupted"].startswith("signal 15")
    assert report["stages"][-1]["stage"] == "eager: stop" and report["configs"]["eager"]["ready_s"] > 0
    assert "exit_code" in report["configs"]["eager"]  # the server was stopped on the way out


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def scripted_run(tmp_path, monkeypatch, budget: float, rates: str = "1,2") -> tuple[gpu_check.Run, Clock]:
    """A Run on a scripted clock whose server and requests cost what the script says (no real time)."""
    clock = Clock()
    args = gpu_check.parse_args(["--tiny", "--budget", str(budget), "--levels", "1,2,4", "--rates", rates,
                                 "--poisson-seconds", "10", "--repeat", "1", "--json", str(tmp_path / "r.json"),
                                 "--out", str(tmp_path / "r.md")])
    args.logs = tmp_path
    run = gpu_check.Run(args, {"device": "cpu", "tiny": True, "date": "today", "commit": "x", "levels": args.levels,
                               "configs": {}}, clock=clock)

    class Server:
        url = "http://scripted"

        def __init__(self, env, log, ready_timeout):
            clock.now += 10

        def stop(self, timeout):
            return 0

        def log(self):
            return ""

    async def level(url, clients, voice):
        clock.now += 2 * clients
        return {"clients": clients, "ttfb_p50_ms": 1.0, "ttfb_p95_ms": 1.0, "rtf_p50": 0.5, "rtf_max": 0.5,
                "audio_s_per_wall_s": 15.0, "gaps_per_stream": 0, "wall_s": 2.0 * clients}

    def non_streaming(url, voice, steps, repeat):
        clock.now += 0.5
        return {"seconds": 0.5, "audio_seconds": 30.0}

    async def poisson(url, rate, seconds, drain, voice):
        written = json.loads(args.json.read_text())  # what came before is on disk already
        assert written["stages"][-1]["stage"] in ("eager: non-streaming", "eager: poisson 1/s")
        assert written["configs"]["eager"]["levels"][-1]["clients"] == 4
        clock.now += seconds + 5
        return {"rate": rate, "requests": 10, "finished": 10, "refused_429": 0, "cut": 0, "cut_before_audio": 0,
                "ttfb_p50_ms": 1.0, "ttfb_p95_ms": 2.0, "gaps_per_stream": 0, "gap_s_per_stream": 0,
                "peak_in_flight": 3, "peak_active": 3, "peak_queued": 0, "offered_audio_s_per_s": 30.0}

    for name, fake in (("LiveServer", Server), ("level", level), ("non_streaming", non_streaming),
                       ("poisson", poisson), ("metric", lambda url, name: None)):
        monkeypatch.setattr(gpu_check, name, fake)
    return run, clock


def test_stages_that_do_not_fit_the_budget_are_skipped_with_the_reason(tmp_path, monkeypatch):
    run, clock = scripted_run(tmp_path, monkeypatch, budget=95)
    gpu_check.run_config(run, "eager", {}, [1, 2, 4], [], [1.0, 2.0], "bench", reserve=0)
    # start 10 s, warm-up 2, levels 2 + 4 + 8, non-streaming 1: 27 s; a rate needs 10 s + 10 s of drain + 10 s
    # to settle + 35 s for the server's stop, and takes 15 here: the first fits (68 s left), the second does
    # not (53 s left)
    stages = [(stage["stage"], stage["status"]) for stage in run.report["stages"]]
    assert stages == [("eager: start", "done"), ("eager: warm-up stream", "done"), ("eager: 1 streams", "done"),
                      ("eager: 2 streams", "done"), ("eager: 4 streams", "done"), ("eager: non-streaming", "done"),
                      ("eager: poisson 1/s", "done"), ("eager: poisson 2/s", "skipped"), ("eager: stop", "done")]
    assert run.report["stages"][-2]["reason"] == "needs ~65 s; 53 s of --budget 95 s left"
    written = json.loads((tmp_path / "r.json").read_text())
    assert [row["rate"] for row in written["configs"]["eager"]["poisson"]] == [1.0]
    assert written["stages"] == run.report["stages"]
    assert "eager: poisson 2/s: skipped (needs ~65 s" in (tmp_path / "r.md").read_text()


def test_the_poisson_curve_keeps_time_for_later_configurations_burst_levels(tmp_path, monkeypatch):
    run, clock = scripted_run(tmp_path, monkeypatch, budget=100, rates="1")
    gpu_check.run_config(run, "eager", {}, [1, 2, 4], [], [1.0], "bench", reserve=70)
    skipped = run.report["stages"][-2]
    assert skipped["stage"] == "eager: poisson 1/s" and skipped["status"] == "skipped"
    assert skipped["reason"].endswith("besides 70 s kept for later configurations")
    clock.now = 95
    gpu_check.run_config(run, "static", {}, [1], [2], [1.0], "bench", reserve=0)
    assert run.report["configs"]["static"]["skipped"].startswith("needs ~15 s; 5 s of --budget 100 s left")
    assert "| static | skipped: needs ~15 s" in (tmp_path / "r.md").read_text()


def test_poisson_counts_refusals_cuts_and_underruns_per_stream():
    """A scripted server: every fourth request is refused (429), request 0 never finishes (cut after the
    drain, its first audio still counted), request 1 pauses long enough for a gap, the rest stream at once."""
    active = {"now": 0}

    async def pcm(seed: int):
        active["now"] += 1
        try:
            yield b"\0\0" * 441  # 10 ms of audio at 44.1 kHz
            if seed == 0:
                await asyncio.sleep(3600)
            if seed == 1:
                await asyncio.sleep(0.2)  # well past the 10 ms the listener had
            yield b"\0\0" * 441
        finally:
            active["now"] -= 1

    async def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/metrics":
            return httpx.Response(200, text=f"echo_active_streams {active['now']}\necho_queue_length 0\n")
        seed = json.loads(request.content)["seed"]
        if seed % 4 == 3:
            return httpx.Response(429, json={"error": "full"})
        return httpx.Response(200, headers={"x-audio-sample-rate": "44100"}, content=pcm(seed))

    requests = len(gpu_check.arrivals(40, 0.3))
    curve = asyncio.run(gpu_check.poisson("http://scripted", 40, 0.3, drain=1.0, voice="none",
                                          transport=httpx.MockTransport(handle)))
    refused = sum(1 for i in range(requests) if i % 4 == 3)
    assert requests >= 6 and curve["requests"] == requests
    assert curve["refused_429"] == refused and curve["failed"] == 0
    assert curve["cut"] == 1 and curve["cut_before_audio"] == 0  # request 0: cut, but its first audio counted
    assert curve["finished"] == requests - refused - 1
    assert curve["streams_with_gaps"] == 1 and curve["gaps_per_stream"] == round(1 / curve["finished"], 2)
    assert curve["ttfb_p50_ms"] is not None and curve["peak_in_flight"] >= 1 and curve["peak_queued"] == 0
    assert curve["offered_audio_s_per_s"] == round(40 * 0.02, 1)


def test_poisson_arrivals_are_seeded_and_scale_with_the_rate():
    slow, fast = gpu_check.arrivals(1, 60), gpu_check.arrivals(2, 30)
    assert slow == gpu_check.arrivals(1, 60) and len(slow) == len(fast) and 30 <= len(slow) <= 100
    assert fast == pytest.approx([t / 2 for t in slow])
    assert all(b > a for a, b in zip(slow, slow[1:]))


def test_the_first_audio_breakdown_accounts_for_every_stage(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "ttfb_breakdown.py"), "--tiny", "--repeat", "1",
                           "--json", str(tmp_path / "stages.json")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    stages = json.loads((tmp_path / "stages.json").read_text())["stages"]
    assert stages["diffusion step"]["calls"] == 8 and stages["decode"]["calls"] == 1  # the default first block
    assert stages["text encoder"]["calls"] == 1
    assert stages["job"]["calls"] == 1 + 8 + 1 + 1  # before the first call, and after each answer
    parts = sum(row["ms"] for stage, row in stages.items() if stage != "total")
    assert 0.5 * stages["total"]["ms"] <= parts <= stages["total"]["ms"]
    assert "diffusion step" in done.stdout and "total" in done.stdout
    result = json.loads((tmp_path / "stages.json").read_text())
    assert 0 < result["step_host_ms"] <= stages["diffusion step"]["ms"]  # (a step's host part: within the steps)
    assert 0 < result["unsynchronised_ms"]
    assert 0 < result["mp3_first_bytes_ms"] and 0 < result["mp3_whole_block_ms"]  # (what mp3 adds, after the total)


def test_gpu_kit_rejects_unknown_configurations():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--configs", "turbo"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "unknown configs ['turbo']" in done.stderr


def test_every_locked_package_is_carried_to_the_gpu_machine_or_said_to_be_there_or_not_needed():
    """The lent GPU machines reach no package index: the kit's server starts only if what it imports
    travels as wheels (benchmarks/wheelhouse.sh) or is on the machine's image. Twice a dependency
    added after the wheelhouse was written (websockets for the HTTP server, python-multipart for voice
    uploads) would have stopped the first GPU run at its server's start: a new one must be placed."""
    lists = subprocess.run(["bash", str(ROOT / "benchmarks" / "wheelhouse.sh"), "--lists"], capture_output=True,
                           text=True, check=True).stdout.splitlines()
    carried, there, not_needed = (set(line.lower().split()) for line in lists)
    locked = {line.split("==")[0].lower() for line in (ROOT / "requirements.lock").read_text().splitlines()
              if "==" in line and not line.startswith((" ", "#"))}
    assert not carried & there and not carried & not_needed and not there & not_needed
    assert locked - (carried | there | not_needed) == set(), "place these in benchmarks/wheelhouse.sh"
    assert (carried | there | not_needed) - locked == set(), "no longer locked: drop them from the lists"


def test_a_burst_level_reports_the_streams_that_failed_and_measures_the_others():
    """One failed stream (a 503 under load, a stream the server cut) raised out of the whole level,
    and the configuration's non-streaming and Poisson stages were lost with it."""
    async def pcm(seed: int):
        yield b"\0\0" * 441
        if seed == 2:
            raise httpx.RemoteProtocolError("peer closed connection without sending complete message body")
        yield b"\0\0" * 441

    async def handle(request: httpx.Request) -> httpx.Response:
        seed = json.loads(request.content)["seed"]
        if seed == 1:
            return httpx.Response(503, json={"error": "out of memory"})
        return httpx.Response(200, headers={"x-audio-sample-rate": "44100"}, content=pcm(seed))

    entry = asyncio.run(gpu_check.level("http://scripted", 4, "none", transport=httpx.MockTransport(handle)))
    assert entry["clients"] == 4 and entry["failed"] == 2
    assert entry["failures"] == ["HTTP 503", "RemoteProtocolError: peer closed connection without sending complete "
                                             "message body"]
    assert entry["audio_s_per_stream"] == 0.02 and entry["ttfb_p50_ms"] is not None
    with pytest.raises(RuntimeError, match="all 2 streams failed"):
        asyncio.run(gpu_check.level("http://scripted", 2, "none", transport=httpx.MockTransport(
            lambda request: httpx.Response(503, json={}))))


def test_no_breakdown_for_a_configuration_whose_server_did_not_start(tmp_path, monkeypatch):
    """A configuration that failed to start (a first GPU's likely compile failure) had its breakdown
    run anyway: the same failing start again, up to 150 s of the budget the CUDA tests needed."""
    run, clock = scripted_run(tmp_path, monkeypatch, budget=1000)
    run.args.breakdown = ["compile+graphs"]
    run.report["configs"]["compile+graphs"] = {"error": "start-up failed: warm-up raised"}
    monkeypatch.setattr(gpu_check, "run_breakdown", lambda *a: pytest.fail("the breakdown ran"))
    gpu_check.breakdowns(run, lambda name: {})
    assert run.report["stages"][-1]["stage"] == "compile+graphs: first-block breakdown"
    assert run.report["stages"][-1]["status"] == "skipped"

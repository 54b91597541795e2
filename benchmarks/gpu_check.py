"""The GPU kit: prove the CUDA path and measure it, in one command that fits one 10-minute device call.

On a CUDA machine (full-size synthetic weights, bf16, the default streaming preset):

    timeout 560 python3 benchmarks/gpu_check.py --wheels .whl --json r.json --out r.md --logs-tar logs.tar.gz

`--budget` (default 540 s, counted from the start: wheels and weights included) bounds the whole run.
Stages run most important first; one that would not fit in what is left is skipped and recorded as
skipped with the reason (`stages` in the JSON, "Stages not done" in the report), and both reports are
written after every stage, so a run cut short (SIGTERM from `timeout` too) keeps what it measured:

1. the environment (torch, CUDA, GPU name and memory), the carried wheels (`--wheels`, see
   benchmarks/wheelhouse.sh; `pip --no-index`) and the full-size synthetic checkpoints
   (benchmarks/synthetic.py) in `--weights`;
2. for each server configuration (`--configs`, in that order; default compile+graphs (the default on CUDA), eager, static+graphs),
   one `api_server.py` through the real HTTP stack:
   a. burst levels (`--levels`, default 1,4,16,24; static-shape configurations stop at
      `--static-max-active`): that many streams started at once; time to first audio byte p50/p95,
      real-time factors and underruns (playback gaps) per stream;
   b. 30 s non-streaming generation at 20 and 30 steps;
   c. the Poisson load curve: requests of the benchmark text (29.7 s of audio each) arriving as a
      seeded Poisson process at each rate (`--rates`, requests/s) for `--poisson-seconds`, streamed
      as PCM: TTFB p50/p95, underruns and gap seconds per stream, the streams in flight at peak (and
      the server's own peak of active and queued ones) and requests refused (429). Rates that would
      not fit are skipped, keeping time for the later configurations' burst levels;
   then peak GPU memory (beside the memory plan's need and worst case, on the static-shape path)
   and compiles after warm-up;
3. for the configurations in `--breakdown` (default: those run, on CUDA), one stream's first block
   timed stage by stage in process (benchmarks/ttfb_breakdown.py: request code, diffusion steps,
   decoder);
4. the CUDA tests (`pytest -m cuda`; they skip without CUDA) with whatever time is left (a run cut
   short reports the tests it got through; give them a call of their own with `--configs none`).

The JSON holds `device`, `tiny`, `stages`, `ttfb_p50_ms`, `ttfb_p95_ms`, `nonstream_30s_30steps_s`,
`realtime_streams` (each from the best configuration, named in `best`) and `configs` (one entry per
configuration: `levels`, `poisson`, ...). With `--merge`, configurations already in the JSON file are
kept (a matrix measured over several device calls).

`--tiny` runs the same flow on the small reference models on the CPU in a few minutes (CI runs it,
so the kit never rots).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_server import one_stream, repo_env, tiny_repos  # noqa: E402
from live_server import ROOT, LiveServer, ServerFailed, wav_bytes  # noqa: E402
from stats import percentile  # noqa: E402
from synthetic import write_synthetic_repos  # noqa: E402

# Server configurations of the matrix: ECHO_* settings on top of the device's defaults.
CONFIGS: dict[str, dict[str, str]] = {
    "eager": {"ECHO_COMPILE": "0"},  # exact eager batching, compiled autoencoder (the default before 2026-12-06)
    "static": {"ECHO_COMPILE": "0", "ECHO_STATIC_SHAPES": "1"},  # padded to static shapes, eager (what graphs run)
    "compile": {"ECHO_COMPILE": "1", "ECHO_CUDA_GRAPHS": "0"},
    "compile+graphs": {"ECHO_COMPILE": "1", "ECHO_CUDA_GRAPHS": "1"},  # the default on CUDA
    "static+graphs": {"ECHO_COMPILE": "0", "ECHO_STATIC_SHAPES": "1", "ECHO_CUDA_GRAPHS": "1"},  # eager steps captured
}


def compiled(name: str) -> bool:
    return CONFIGS[name].get("ECHO_COMPILE") == "1"


# Poisson arrival rates (requests/s) of the benchmark text (29.7 s of audio on the random synthetic model):
# the H100's eager default served ~38 audio-s/s at any load (~1.3 requests/s), compiled with CUDA graphs ~61
EAGER_RATES = [0.5, 1.0, 2.0]
COMPILED_RATES = [0.5, 1.0, 2.0, 3.0]
TINY_RATES = [0.5]
NONSTREAM_TEXT = ("[S1] " + "This benchmark paragraph stands in for about thirty seconds of ordinary speech, "
                  "read at an even pace by one speaker. " * 4).strip()
SETTLE_S = 10.0  # after a Poisson rate: time for the server to go idle before the next
STOP_S = 35.0  # a server's stop, streams still in flight (ECHO_SHUTDOWN_GRACE's 30 s, and the cut)
VOICE_SECONDS = 10.0


# ---- environment and set-up ------------------------------------------------------------------------


def install_wheels(wheels: Path, target: Path) -> None:
    """Install the carried wheels offline into `target` and put it on this process's and its children's path."""
    files = sorted(str(p) for p in wheels.glob("*.whl"))
    if not files:
        raise SystemExit(f"--wheels {wheels}: no wheels there (run benchmarks/wheelhouse.sh)")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--no-cache-dir", "--upgrade", "--target", str(target), *files], check=True)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(target), os.environ.get("PYTHONPATH")]))
    sys.path.insert(0, str(target))


def environment() -> dict:
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "cuda_available": torch.cuda.is_available(), "cpus": os.cpu_count()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2 ** 30, 1),
                   multiprocessors=props.multi_processor_count, capability=f"{props.major}.{props.minor}")
    return env


def write_voice(path: Path, seconds: float = VOICE_SECONDS, rate: int = 44100) -> None:
    """A speech-like reference clip: a gliding harmonic tone, amplitude-modulated at syllable rate."""
    t = np.arange(int(seconds * rate)) / rate
    f0 = 140 + 30 * np.sin(2 * np.pi * 0.3 * t)
    phase = 2 * np.pi * np.cumsum(f0) / rate
    voiced = sum(np.sin(k * phase) / k for k in range(1, 8))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 4 * t) ** 2
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(wav_bytes(0.25 * voiced * envelope / np.abs(voiced).max(), rate))


def run_cuda_tests(weights: Path | None, timeout: float, log: Path, select: str | None) -> dict:
    """`pytest -m cuda` (`-k select`): pass/fail counts and the summary (the tests skip without CUDA).

    pytest runs in a session of its own, so a timeout ends it and every server it started."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if weights is not None:
        env["ECHO_SYNTHETIC_DIR"] = str(weights)
    command = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", "-rfEsP",
               *(["-k", select] if select else []), str(ROOT / "tests" / "test_cuda.py")]
    started = time.monotonic()
    with log.open("w") as out:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            code = _wait_for_pytest(process, log, timeout)
        except BaseException:  # interrupted: end pytest and every server it started
            os.killpg(process.pid, signal.SIGKILL)
            raise
        if code is None:
            out.write(f"\n(timed out after {timeout:.0f} s)\n")
    output = log.read_text(errors="replace")
    progress = "".join(re.findall(r"^([.FEsx]+)(?:\s+\[\s*\d+%\])?$", output, re.M))
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", output)}
    if not counts:  # cut short: count the progress characters
        counts = {"passed": progress.count("."), "failed": progress.count("F") + progress.count("E"),
                  "skipped": progress.count("s")}
    return {"exit_code": code, "seconds": round(time.monotonic() - started, 1), **counts,
            "summary": output.strip().splitlines()[-1] if output.strip() else "",
            "errors": re.findall(r"^E\s+(.*)$", output, re.M)[:10],
            "printed": re.findall(r"^full-size forward.*$", output, re.M)}


def _wait_for_pytest(process: subprocess.Popen, log: Path, timeout: float, grace: float = 20) -> int | None:
    """pytest's exit status; None if it ran past `timeout`. Its process group is ended either way, also
    when it lingers after printing its final line (seen on a GPU machine: workers kept it alive): then
    after `grace`, but never past `timeout`, which is the caller's budget."""
    deadline, finished = time.monotonic() + timeout, None
    while (code := process.poll()) is None and time.monotonic() < (finished or deadline):
        time.sleep(1)
        if finished is None and re.search(r"^\S.*\b(passed|failed|errors?|skipped)\b.* in [\d.]+s",
                                          log.read_text(errors="replace"), re.M):
            finished = min(time.monotonic() + grace, deadline)
    if code is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        return 1 if finished else None
    return code


# ---- the time budget -----------------------------------------------------------------------------------


class Run:
    """One run of the kit: its report as it grows, its time budget (`--budget`, counted from the start
    of the process's main()) and the record of every stage (`report["stages"]`: done, failed or skipped
    and why). Both reports are written after every stage, so a run cut short keeps what it measured."""

    def __init__(self, args: argparse.Namespace, report: dict, clock=time.monotonic):
        self.args, self.report, self.clock = args, report, clock
        self.started = clock()
        report.setdefault("stages", [])
        report["budget_s"] = args.budget

    def left(self) -> float:
        return self.args.budget - (self.clock() - self.started)

    def fits(self, stage: str, need: float, reserve: float = 0.0) -> bool:
        """Whether ~`need` seconds are left besides `reserve` (kept for more important stages later);
        a stage that does not fit is recorded as skipped, with the reason."""
        left = self.left() - reserve
        if left >= need:
            return True
        self.record(stage, "skipped", reason=f"needs ~{need:.0f} s; {max(left, 0):.0f} s of --budget "
                                             f"{self.args.budget:g} s left" +
                                             (f" besides {reserve:.0f} s kept for later configurations" if reserve else ""))
        return False

    def record(self, stage: str, status: str, seconds: float | None = None, reason: str | None = None) -> None:
        entry = {"stage": stage, "status": status, "at_s": round(self.clock() - self.started, 1)}
        if seconds is not None:
            entry["seconds"] = round(seconds, 1)
        if reason:
            entry["reason"] = reason
        self.report["stages"].append(entry)
        print(json.dumps(entry), flush=True)
        self.save()

    def save(self) -> None:
        """Write the JSON and markdown reports as they stand."""
        self.report.update(best_of(self.report.get("configs", {})))
        self.report["seconds"] = round(self.clock() - self.started, 1)
        if self.args.json:
            self.args.json.parent.mkdir(parents=True, exist_ok=True)
            self.args.json.write_text(json.dumps(self.report, indent=2) + "\n")
        if self.args.out:
            self.args.out.parent.mkdir(parents=True, exist_ok=True)
            try:
                text = markdown(self.report)
            except Exception as e:  # noqa: BLE001 - the JSON holds it all; a report bug must not stop measuring
                text = f"(the markdown report failed: {type(e).__name__}: {e}; see the JSON)\n"
            self.args.out.write_text(text)


def start_estimate(name: str, tiny: bool) -> float:
    """Seconds a configuration's server takes to get ready, plus its first requests (H100, 2026-11-22:
    eager 27 s, compiled 94 s)."""
    if tiny:
        return 15
    return 130 if compiled(name) else 50


def burst_estimate(name: str, tiny: bool) -> float:
    """Seconds a configuration's server start and burst levels take: what earlier stages keep for it."""
    return start_estimate(name, tiny) + (10 if tiny else 40)


# ---- measuring one server configuration -------------------------------------------------------------


async def level(url: str, clients: int, voice: str, transport: httpx.AsyncBaseTransport | None = None) -> dict:
    """`clients` streaming requests at once: TTFB, real-time factor and underrun (playback gap) figures
    of the streams that finished; those that failed (a 429 or 503, a stream the server cut) are
    counted with their reasons. Raises only when none finished."""
    async with httpx.AsyncClient(base_url=url, timeout=None, transport=transport) as client:
        start = time.perf_counter()
        outcomes = await asyncio.gather(*(one_stream(client, seed, voice) for seed in range(clients)),
                                        return_exceptions=True)
        wall = time.perf_counter() - start
    results = [r for r in outcomes if not isinstance(r, BaseException)]
    failures = [_failure(r) for r in outcomes if isinstance(r, BaseException)]
    if not results:
        raise RuntimeError(f"all {clients} streams failed: {failures[:3]}")
    ttfb = [r.ttfb * 1000 for r in results]
    rtf = [r.wall / r.audio for r in results]
    return {"clients": clients, "ttfb_p50_ms": round(percentile(ttfb, .5), 1), "ttfb_p95_ms": round(percentile(ttfb, .95), 1),
            "rtf_p50": round(statistics.median(rtf), 3), "rtf_max": round(max(rtf), 3),
            "audio_s_per_wall_s": round(sum(r.audio for r in results) / wall, 2),
            "audio_s_per_stream": round(statistics.median(r.audio for r in results), 2),
            "gaps_per_stream": round(sum(r.gaps for r in results) / len(results), 2),
            "gap_s_per_stream": round(sum(r.gap_seconds for r in results) / len(results), 3), "wall_s": round(wall, 2),
            "failed": len(failures), "failures": sorted(set(failures))[:5]}


def _failure(error: BaseException) -> str:
    """What a stream that did not finish met, in a few words."""
    if isinstance(error, httpx.HTTPStatusError):
        return f"HTTP {error.response.status_code}"
    return f"{type(error).__name__}: {str(error)[:120]}"


def arrivals(rate: float, seconds: float, seed: int = 0) -> list[float]:
    """Arrival times (s) of a Poisson process of `rate` requests per second over `seconds`. Seeded: every
    configuration gets the same arrivals, and a higher rate the same ones sooner."""
    rng = np.random.default_rng(seed)
    times, t = [], rng.exponential(1 / rate)
    while t < seconds:
        times.append(t)
        t += rng.exponential(1 / rate)
    return times


async def poisson(url: str, rate: float, seconds: float, drain: float, voice: str, seed: int = 0,
                  transport: httpx.AsyncBaseTransport | None = None) -> dict:
    """Requests of the benchmark text arriving as a Poisson process of `rate` per second for `seconds`,
    each streamed as PCM and played back (on paper) from its first byte (`bench_server.one_stream`); then
    up to `drain` s for the streams still running, and those left are cut. TTFB counts every stream that
    got audio (cut ones too); underruns count the finished streams; 429s are the requests refused."""
    schedule = arrivals(rate, seconds, seed)
    first: dict[int, float] = {}
    finished, failed, refused = [], [], 0
    in_flight = peak = 0
    server = {"echo_active_streams": 0.0, "echo_queue_length": 0.0}  # the server's own view, sampled

    async def request(client: httpx.AsyncClient, i: int) -> None:
        nonlocal in_flight, peak, refused
        in_flight += 1
        peak = max(peak, in_flight)
        try:
            finished.append(await one_stream(client, i, voice,
                                             on_first_audio=lambda s: first.__setitem__(i, s * 1000)))
        except httpx.HTTPStatusError as e:
            if e.response.status_code == 429:
                refused += 1
            else:
                failed.append(_failure(e))
        except httpx.HTTPError as e:  # (a stream the server cut after its first audio, among them)
            failed.append(_failure(e))
        finally:
            in_flight -= 1

    async def watch(client: httpx.AsyncClient) -> None:
        while True:
            with contextlib.suppress(httpx.HTTPError):
                text = (await client.get("/metrics")).text
                for name in server:
                    server[name] = max(server[name], _metric_value(text, name) or 0.0)
            await asyncio.sleep(0.25)

    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=url, timeout=None, limits=limits, transport=transport) as client:
        loop = asyncio.get_running_loop()
        watcher = asyncio.create_task(watch(client))
        start, tasks = loop.time(), {}
        for i, at in enumerate(schedule):
            await asyncio.sleep(max(0.0, start + at - loop.time()))
            tasks[asyncio.create_task(request(client, i))] = i
        window_end = loop.time()
        pending = set()
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=max(drain, 0.0))
        drained = loop.time() - window_end
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        await _settle(client, timeout=SETTLE_S)  # the next rate starts on an idle server
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
    ttfb = list(first.values())
    stat = lambda values, q: round(percentile(values, q), 1) if values else None  # noqa: E731
    audio = [r.audio for r in finished]
    return {"rate": rate, "seconds": seconds, "requests": len(schedule), "finished": len(finished),
            "refused_429": refused, "failed": len(failed), "cut": len(pending),
            "cut_before_audio": sum(1 for task in pending if tasks[task] not in first),
            "ttfb_p50_ms": stat(ttfb, .5), "ttfb_p95_ms": stat(ttfb, .95), "ttfb_max_ms": stat(ttfb, 1),
            "gaps_per_stream": round(sum(r.gaps for r in finished) / len(finished), 2) if finished else None,
            "gap_s_per_stream": round(sum(r.gap_seconds for r in finished) / len(finished), 3) if finished else None,
            "streams_with_gaps": sum(1 for r in finished if r.gaps),
            "peak_in_flight": peak, "peak_active": int(server["echo_active_streams"]),
            "peak_queued": int(server["echo_queue_length"]),
            "offered_audio_s_per_s": round(rate * statistics.median(audio), 1) if audio else None,
            "drain_s": round(drained, 1), "errors": failed[:5]}


async def _settle(client: httpx.AsyncClient, timeout: float) -> None:
    """Wait (at most `timeout` s) until the server has no stream generating or waiting."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            text = (await client.get("/metrics")).text
            if not any(_metric_value(text, name) for name in ("echo_active_streams", "echo_queue_length",
                                                             "echo_preparing_requests")):
                return
        await asyncio.sleep(0.2)


def non_streaming(url: str, voice: str, steps: int, repeat: int) -> dict:
    """One 640-frame (~30 s) block at `steps` steps, not streamed: median wall time of `repeat` runs."""
    body = {"input": NONSTREAM_TEXT, "voice": voice, "stream": False, "response_format": "pcm",
            "block_sizes": [640], "num_steps": steps, "seed": 1}
    times, seconds = [], 0.0
    for _ in range(repeat):
        start = time.perf_counter()
        response = httpx.post(url + "/v1/audio/speech", json=body, timeout=None)
        response.raise_for_status()
        times.append(time.perf_counter() - start)
        seconds = len(response.content) / 2 / int(response.headers["x-audio-sample-rate"])
    return {"seconds": round(statistics.median(times), 3), "audio_seconds": round(seconds, 2)}


def _metric_value(text: str, name: str) -> float | None:
    found = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
    return float(found.group(1)) if found else None


def metric(url: str, name: str) -> float | None:
    return _metric_value(httpx.get(url + "/metrics", timeout=10).text, name)


def _gib(value: float | None) -> float | None:
    return None if value is None else round(value / 2 ** 30, 2)


def run_config(run: Run, name: str, env: dict[str, str], levels: list[int], skipped_levels: list[int],
               rates: list[float], voice: str, reserve: float) -> None:
    """One configuration on one server, into `run.report["configs"][name]` stage by stage: start-up, a
    warm-up stream, the burst levels, non-streaming 30 s, then the Poisson curve (whatever of it fits
    besides `reserve`, the time later configurations' burst levels need)."""
    args, tag = run.args, name
    result = run.report["configs"][name] = {"env": CONFIGS[name]}
    if not run.fits(f"{tag}: start", start_estimate(name, args.tiny)):
        result["skipped"] = run.report["stages"][-1]["reason"]
        run.save()
        return
    started = time.monotonic()
    try:
        server = LiveServer({**env, **CONFIGS[name]}, args.logs / f"server-{name.replace('+', '-')}.log",
                            ready_timeout=max(1.0, min(args.config_timeout, run.left())))
    except ServerFailed as e:
        result["error"] = f"start-up failed: {str(e)[-3000:]}"
        run.record(f"{tag}: start", "failed", time.monotonic() - started, str(e).splitlines()[0])
        return
    result["ready_s"] = round(time.monotonic() - started, 1)
    run.record(f"{tag}: start", "done", time.monotonic() - started)
    try:
        _measure(run, tag, server.url, result, levels, skipped_levels, rates, voice, reserve)
    except Exception as e:  # noqa: BLE001 - recorded; the other configurations still run
        result["error"] = f"{type(e).__name__}: {e}"
        run.record(f"{tag}: measuring", "failed", reason=result["error"][:300])
    finally:
        with contextlib.suppress(httpx.HTTPError):
            result["peak_gpu_memory_gib"] = _gib(metric(server.url, "echo_gpu_memory_peak_bytes"))
            for key in ("need", "worst"):  # the static-shape path's memory plan (runtime.MemoryPlan), to check it
                result[f"planned_{key}_gib"] = _gib(metric(server.url, f"echo_memory_plan_{key}_bytes") or None)
            for key in ("splits", "failures"):  # units that ran out of memory: split in halves, or requests failed
                result[f"out_of_memory_{key}"] = metric(server.url, f"echo_out_of_memory_{key}")
        result["exit_code"] = server.stop(timeout=60)
        result["log_errors"] = [line for line in server.log().splitlines() if " ERROR " in line][:20]
        result["seconds"] = round(time.monotonic() - started, 1)
        run.record(f"{tag}: stop", "done")


def _measure(run: Run, tag: str, url: str, result: dict, levels: list[int], skipped_levels: list[int],
             rates: list[float], voice: str, reserve: float) -> None:
    args = run.args
    t0 = time.monotonic()
    warm = asyncio.run(asyncio.wait_for(level(url, 1, voice), max(1.0, run.left())))  # the voice's latents, one-off costs
    one_stream_s = warm["wall_s"]
    run.record(f"{tag}: warm-up stream", "done", time.monotonic() - t0)
    result["levels"] = []
    for n in skipped_levels:
        run.record(f"{tag}: {n} streams", "skipped", reason=f"above --static-max-active {args.static_max_active} "
                                                              "(ECHO_MAX_ACTIVE of static-shape configurations)")
    previous = None
    for n in levels:
        need = one_stream_s if previous is None else previous["wall_s"] * n / previous["clients"]
        if not run.fits(f"{tag}: {n} streams", need):
            continue
        t0 = time.monotonic()
        try:
            entry = asyncio.run(asyncio.wait_for(level(url, n, voice), max(1.0, run.left())))
        except TimeoutError:
            run.record(f"{tag}: {n} streams", "failed", time.monotonic() - t0, "ran out of the time budget")
            break
        result["levels"].append(entry)
        previous = entry
        if n == 1:
            result["ttfb_p50_ms"], result["ttfb_p95_ms"] = entry["ttfb_p50_ms"], entry["ttfb_p95_ms"]
        result["realtime_streams"] = max([e["clients"] for e in result["levels"]
                                          if e["rtf_max"] < 1 and not e.get("failed")], default=0)
        run.record(f"{tag}: {n} streams", "done", time.monotonic() - t0)
    if run.fits(f"{tag}: non-streaming", 2 * args.repeat * one_stream_s + 2):
        t0 = time.monotonic()
        for steps in (20, 30):
            done = non_streaming(url, voice, steps, args.repeat)
            result[f"nonstream_30s_{steps}steps_s"] = done["seconds"]
            result["nonstream_audio_seconds"] = done["audio_seconds"]
        run.record(f"{tag}: non-streaming", "done", time.monotonic() - t0)
    result["compiles_after_warm_up"] = metric(url, "echo_compiles_after_warm_up")
    result["peak_gpu_memory_gib"] = _gib(metric(url, "echo_gpu_memory_peak_bytes"))
    result["poisson"] = []
    drain_need = min(args.poisson_drain, max(10.0, 2 * one_stream_s))  # the last arrivals' streams, at least
    wrap_up = SETTLE_S + STOP_S  # to cut the streams left and settle, and then perhaps the server's stop
    for rate in rates:
        if not run.fits(f"{tag}: poisson {rate:g}/s", args.poisson_seconds + drain_need + wrap_up, reserve):
            continue
        t0 = time.monotonic()
        # the streams left after the window get what remains, less the wrap-up
        drain = min(args.poisson_drain, run.left() - reserve - args.poisson_seconds - wrap_up)
        entry = asyncio.run(poisson(url, rate, args.poisson_seconds, drain, voice))
        result["poisson"].append(entry)
        run.record(f"{tag}: poisson {rate:g}/s", "done", time.monotonic() - t0)
    result["compiles_after_warm_up"] = metric(url, "echo_compiles_after_warm_up")


def run_breakdown(name: str, env: dict[str, str], timeout: float, logs: Path) -> dict:
    """ttfb_breakdown.py under a configuration's settings: where one stream's first audio waits."""
    out = logs / f"first-block-{name.replace('+', '-')}.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "ttfb_breakdown.py"), "--voice", "bench", "--json", str(out)]
    try:
        with open(out.with_suffix(".log"), "wb") as log:
            done = subprocess.run(command, env={**os.environ, **env, **CONFIGS[name]}, stdout=log,
                                  stderr=subprocess.STDOUT, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if done.returncode != 0 or not out.is_file():
        return {"error": f"exit status {done.returncode}; see {out.with_suffix('.log').name}"}
    result = json.loads(out.read_text())
    figures = ("step_host_ms", "unsynchronised_ms", "mp3_first_bytes_ms", "mp3_whole_block_ms")
    return {**result["stages"], **{key: result[key] for key in figures}}


# ---- the report ----------------------------------------------------------------------------------------


def breakdowns(run: Run, env_of: Callable[[str], dict[str, str]]) -> None:
    """The first-block breakdown of each --breakdown configuration that fits the budget; not of one
    whose server did not start (the breakdown would fail the same way, at the cost of its start)."""
    args = run.args
    for name in args.breakdown:
        stage = f"{name}: first-block breakdown"
        if run.report["configs"].get(name, {}).get("error", "").startswith("start-up failed"):
            run.record(stage, "skipped", reason=f"{name}'s server did not start (its error is in its table row)")
            continue
        if not run.fits(stage, 20 if args.tiny else start_estimate(name, False) + 20):
            continue
        t0 = time.monotonic()
        stages = run_breakdown(name, env_of(name), min(args.config_timeout, run.left()), args.logs)
        run.report["configs"].setdefault(name, {"env": CONFIGS[name]})["first_block"] = stages
        run.record(stage, "failed" if "error" in stages else "done", time.monotonic() - t0, stages.get("error"))


def best_of(configs: dict[str, dict]) -> dict:
    """The headline numbers, each from the configuration that does best on it."""
    ok = {name: c for name, c in configs.items() if "error" not in c}
    picks = {}
    for key, better in (("ttfb_p50_ms", min), ("nonstream_30s_30steps_s", min), ("realtime_streams", max)):
        candidates = {name: c[key] for name, c in ok.items() if c.get(key) is not None}
        if candidates:
            picks[key] = better(candidates, key=candidates.get)
    headline = {key: configs[name][key] for key, name in picks.items()}
    if "ttfb_p50_ms" in picks:
        headline["ttfb_p95_ms"] = configs[picks["ttfb_p50_ms"]]["ttfb_p95_ms"]
    return {**headline, "best": picks}


def markdown(report: dict) -> str:
    env = report.get("environment") or {}
    lines = [f"# GPU check: {report['device']}, {report['date']}", "",
             f"commit {report['commit']}; torch {env.get('torch')} (CUDA {env.get('cuda')}), Python {env.get('python')}; "
             f"weights: {'tiny reference models, float32' if report['tiny'] else 'full-size synthetic, bf16'}; "
             f"voice: {VOICE_SECONDS:g} s clip; burst levels {report['levels']}; budget {report.get('budget_s')} s, "
             f"{report.get('seconds')} s used.", ""]
    lines += ["Burst levels (all streams start at once):", "",
              "| config | ready s | clients | TTFB p50 | TTFB p95 | RTF p50 | RTF max | audio s / wall s | "
              "underruns / stream |", "|---|---|---|---|---|---|---|---|---|"]
    for name, c in report["configs"].items():
        if "skipped" in c:
            lines.append(f"| {name} | skipped: {c['skipped']} | | | | | | | |")
            continue
        if "error" in c and "levels" not in c:
            lines.append(f"| {name} | failed: {c['error'].splitlines()[0][:120]} | | | | | | | |")
            continue
        for entry in c.get("levels", []):
            failed = f" ({entry['failed']} failed: {', '.join(entry['failures'])})" if entry.get("failed") else ""
            lines.append(f"| {name} | {c.get('ready_s', '')} | {entry['clients']}{failed} | "
                         f"{entry['ttfb_p50_ms']:.0f} ms | "
                         f"{entry['ttfb_p95_ms']:.0f} ms | {entry['rtf_p50']:.2f} | {entry['rtf_max']:.2f} | "
                         f"{entry['audio_s_per_wall_s']:.1f} | {entry.get('gaps_per_stream', '')} |")
    lines += ["", "| config | 30 s non-streaming, 20 steps | 30 steps | real-time streams | peak GPU memory | "
                  "planned: need - worst | out of memory: splits, failures | compiles after warm-up |",
              "|---|---|---|---|---|---|---|---|"]
    for name, c in report["configs"].items():
        if "levels" in c:
            lines.append(f"| {name} | {c.get('nonstream_30s_20steps_s')} s | {c.get('nonstream_30s_30steps_s')} s | "
                         f"{c.get('realtime_streams')} | {c.get('peak_gpu_memory_gib')} GiB | "
                         f"{c.get('planned_need_gib')} - {c.get('planned_worst_gib')} GiB | "
                         f"{c.get('out_of_memory_splits')}, {c.get('out_of_memory_failures')} | "
                         f"{c.get('compiles_after_warm_up')} |")
        if c.get("error"):
            lines.append(f"| {name} | error: {c['error'].splitlines()[-1][:200]} | | | | | | |")
    curves = {name: c["poisson"] for name, c in report["configs"].items() if c.get("poisson")}
    if curves:
        lines += ["", f"Poisson arrivals: {report.get('poisson_seconds')} s at each rate, each request the benchmark "
                      "text streamed as PCM and played back from its first byte; TTFB over every stream that got "
                      "audio, underruns over the finished ones:", "",
                  "| config | requests / s | offered audio s / s | requests | TTFB p50 | TTFB p95 | underruns / stream | "
                  "gap s / stream | peak in flight | peak active / queued (server) | refused (429) | cut |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        ms = lambda value: "" if value is None else f"{value:.0f} ms"  # noqa: E731
        for name, rows in curves.items():
            for r in rows:
                lines.append(f"| {name} | {r['rate']:g} | {r['offered_audio_s_per_s']} | {r['requests']} | "
                             f"{ms(r['ttfb_p50_ms'])} | {ms(r['ttfb_p95_ms'])} | {r['gaps_per_stream']} | "
                             f"{r['gap_s_per_stream']} | {r['peak_in_flight']} | {r['peak_active']} / {r['peak_queued']} | "
                             f"{r['refused_429']} | {r['cut']} ({r['cut_before_audio']} before audio) |")
    breakdowns = {name: c["first_block"] for name, c in report["configs"].items() if "first_block" in c}
    if breakdowns:
        lines += ["", "First audio of one stream, in process (ms, median; `ttfb_breakdown.py`):", "",
                  "| config | job | diffusion steps | a step's host part | decode | total | total, unsynchronised "
                  "| then mp3's first bytes (sliced / whole block) |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, stages in breakdowns.items():
            if "error" in stages:
                lines.append(f"| {name} | failed: {stages['error']} | | | | | | |")
                continue
            cell = lambda stage: (f"{stages[stage]['ms']:.1f} ({stages[stage]['calls']})" if stage in stages else "")
            lines.append(f"| {name} | {cell('job')} | {cell('diffusion step')} | {stages.get('step_host_ms')} | "
                         f"{cell('decode')} | {stages['total']['ms']:.1f} | {stages.get('unsynchronised_ms')} | "
                         f"{stages.get('mp3_first_bytes_ms')} / {stages.get('mp3_whole_block_ms')} |")
    lines += ["", f"Best: TTFB p50 {report.get('ttfb_p50_ms')} ms / p95 {report.get('ttfb_p95_ms')} ms, "
                  f"30 s non-streaming at 30 steps {report.get('nonstream_30s_30steps_s')} s, "
                  f"{report.get('realtime_streams')} real-time streams ({report.get('best')})."]
    tests = report.get("tests")
    if tests:
        lines += ["", f"CUDA tests: {tests.get('summary', '')} ({tests['seconds']} s)"]
    left_out = [s for s in report.get("stages", []) if s["status"] != "done"]
    if left_out:
        lines += ["", "Stages not done:", ""] + [f"- {s['stage']}: {s['status']} ({s.get('reason', '')})"
                                                  for s in left_out]
    if report.get("interrupted"):
        lines += ["", f"Interrupted: {report['interrupted']} (the tables hold what was measured before)."]
    return "\n".join(lines) + "\n"


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# ---- main ----------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="the small reference models on the CPU")
    parser.add_argument("--wheels", type=Path, help="install these wheels offline first (benchmarks/wheelhouse.sh)")
    parser.add_argument("--weights", type=Path, default=Path("/tmp/echo-synthetic"), help="synthetic weights dir")
    parser.add_argument("--configs", help=f"comma-separated, from {', '.join(CONFIGS)}, in the order to run them, or "
                                          "none (default: compile+graphs,eager,static+graphs on CUDA; eager,static with --tiny)")
    parser.add_argument("--levels", help="burst levels: streams started at once (default 1,4,16,24; 1,2,4 with --tiny)")
    parser.add_argument("--rates", help="Poisson arrival rates, requests per second, lowest first (default "
                                        f"{','.join(map(format, EAGER_RATES))} for eager and static, "
                                        f"{','.join(map(format, COMPILED_RATES))} compiled; "
                                        f"{','.join(map(format, TINY_RATES))} with --tiny)")
    parser.add_argument("--poisson-seconds", type=float, help="arrivals at each rate for this long (default 20; 3 with "
                                                              "--tiny)")
    parser.add_argument("--poisson-drain", type=float, default=60, help="seconds the streams still running after a "
                                                                        "rate's arrivals may take; then they are cut")
    parser.add_argument("--repeat", type=int, default=3, help="non-streaming runs per step count")
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--tests", help="only the CUDA tests matching this pytest -k expression")
    parser.add_argument("--static-max-active", type=int, default=16,
                        help="ECHO_MAX_ACTIVE of static-shape configurations (their padded caches grow with it); "
                             "levels above it are not run there")
    parser.add_argument("--test-timeout", type=float, default=420)
    parser.add_argument("--config-timeout", type=float, default=900, help="seconds for one server to get ready")
    parser.add_argument("--budget", type=float, default=540,
                        help="seconds for the whole run, from the start (wheels and weights included); a stage that "
                             "would not fit in what is left is skipped and recorded as such (default 540: one "
                             "10-minute device call)")
    parser.add_argument("--out", type=Path, help="markdown report")
    parser.add_argument("--json", type=Path, help="JSON results")
    parser.add_argument("--merge", action="store_true", help="keep the configurations already in --json")
    parser.add_argument("--logs", type=Path, help="keep server and test logs here")
    parser.add_argument("--logs-tar", type=Path, help="and write them all to this .tar.gz at the end (a device "
                                                      "call brings back at most 8 files)")
    parser.add_argument("--breakdown", help="comma-separated configs whose first block is also timed stage by stage, "
                                            "in process (ttfb_breakdown.py), after every configuration's server "
                                            "stage (default: the configs run, on CUDA; none with --tiny)")
    args = parser.parse_args(argv)
    configs = args.configs or ("eager,static" if args.tiny else "compile+graphs,eager,static+graphs")
    args.configs = [] if configs == "none" else configs.split(",")
    breakdown = args.breakdown if args.breakdown is not None else ("" if args.tiny else ",".join(args.configs))
    args.breakdown = [name for name in breakdown.split(",") if name]
    unknown = (set(args.configs) | set(args.breakdown)) - set(CONFIGS)
    if unknown:
        parser.error(f"unknown configs {sorted(unknown)}; known: {', '.join(CONFIGS)}")
    args.levels = [int(n) for n in (args.levels or ("1,2,4" if args.tiny else "1,4,16,24")).split(",")]
    args.rates = sorted(float(r) for r in args.rates.split(",")) if args.rates else None
    if args.poisson_seconds is None:
        args.poisson_seconds = 3.0 if args.tiny else 20.0
    return args


def rates_for(args: argparse.Namespace, name: str) -> list[float]:
    if args.rates is not None:
        return args.rates
    if args.tiny:
        return TINY_RATES
    return COMPILED_RATES if compiled(name) else EAGER_RATES


class Interrupted(SystemExit):
    """SIGTERM (`timeout`, the device call's end): the stages in flight stop their servers on the way out."""


def _interrupt(signum: int, frame) -> None:
    raise Interrupted(128 + signum)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    report: dict = {"device": "cpu" if args.tiny else "unknown", "tiny": args.tiny, "date": dt.date.today().isoformat(),
                    "commit": commit(), "environment": {}, "levels": args.levels, "poisson_seconds": args.poisson_seconds,
                    "configs": {}}
    if args.merge and args.json and args.json.is_file():
        report["configs"] = json.loads(args.json.read_text()).get("configs", {})
    run = Run(args, report)
    work = Path(tempfile.mkdtemp(prefix="echo-gpu-check-"))
    args.logs = args.logs or work
    args.logs.mkdir(parents=True, exist_ok=True)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        _stages(run, work)
    except Interrupted as e:
        report["interrupted"] = f"signal {e.code - 128} after {run.clock() - run.started:.0f} s"
        raise
    except BaseException as e:  # (set-up: the wheels, no CUDA, the weights) the reports say why, not only stderr
        why = e.code if isinstance(e, SystemExit) and isinstance(e.code, str) else f"{type(e).__name__}: {e}"
        run.record("run", "failed", reason=str(why)[-2000:])
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
        run.save()
        if args.logs_tar:
            archive_logs(args.logs, args.logs_tar)
        if args.logs == work:
            shutil.rmtree(work, ignore_errors=True)
    print(markdown(report), flush=True)
    return report


def archive_logs(logs: Path, archive: Path) -> None:
    """Every log as one .tar.gz: a device call brings back at most 8 files, and the logs alone may be
    12 (a server per configuration, two per breakdown, the tests)."""
    archive.parent.mkdir(parents=True, exist_ok=True)
    partial = archive.with_name(archive.name + ".partial")
    with tarfile.open(partial, "w:gz") as tar:
        for path in sorted(p for p in logs.rglob("*") if p.is_file()):
            tar.add(path, arcname=str(path.relative_to(logs)))
    partial.replace(archive)


def _stages(run: Run, work: Path) -> None:
    """Every stage, the most important first: the environment and weights; each configuration's server
    (burst levels, non-streaming, the Poisson curve); the first-block breakdowns; the CUDA tests."""
    args, report = run.args, run.report
    t0 = time.monotonic()
    if args.wheels:
        install_wheels(args.wheels, Path(tempfile.gettempdir()) / "echo-site")
    env = environment()
    report["environment"], report["device"] = env, env.get("gpu", "cpu")
    print(json.dumps(env), flush=True)
    if not args.tiny and not env["cuda_available"]:
        raise SystemExit("no CUDA device: run with --tiny for the CPU flow")
    write_voice(work / "voices" / "bench.wav")
    if args.tiny:
        echo, fish = tiny_repos(work)
    else:
        t1 = time.monotonic()
        repos = write_synthetic_repos(args.weights)
        echo, fish = repos["echo-tts-base"], repos["fish-s1-dac-min"]
        report["weights_s"] = round(time.monotonic() - t1, 1)
    base_env = {**repo_env(str(echo), str(fish), "cpu" if args.tiny else "cuda"),
                "ECHO_VOICE_DIRS": str(work / "voices"), "ECHO_MAX_ACTIVE": str(max(args.levels)),
                "ECHO_MAX_QUEUE": str(max(args.levels)), "ECHO_CACHE_DIR": str(work / "compile-cache")}
    run.record("environment and weights", "done", time.monotonic() - t0)

    def config_env(name: str) -> tuple[dict[str, str], list[int], list[int]]:
        if compiled(name) or CONFIGS[name].get("ECHO_STATIC_SHAPES") == "1":
            cap = args.static_max_active
            return ({**base_env, "ECHO_MAX_ACTIVE": str(min(cap, max(args.levels)))},
                    [n for n in args.levels if n <= cap], [n for n in args.levels if n > cap])
        return base_env, args.levels, []

    for i, name in enumerate(args.configs):
        env, levels, above_cap = config_env(name)
        reserve = sum(burst_estimate(later, args.tiny) for later in args.configs[i + 1:])
        print(f"config {name}: measuring ({run.left():.0f} s of budget left)", flush=True)
        run_config(run, name, env, levels, above_cap, rates_for(args, name), "bench", reserve)
    breakdowns(run, lambda name: config_env(name)[0])
    if args.skip_tests:
        run.record("CUDA tests", "skipped", reason="--skip-tests")
    elif run.fits("CUDA tests", 60):
        report["tests"] = run_cuda_tests(None if args.tiny else args.weights, min(args.test_timeout, run.left()),
                                         args.logs / "cuda-tests.log", args.tests)
        run.record("CUDA tests", "done" if report["tests"]["exit_code"] == 0 else "failed",
                   report["tests"]["seconds"], report["tests"]["summary"])


if __name__ == "__main__":
    main()

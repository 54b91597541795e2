"""The GPU kit: prove the CUDA path and measure it, in one command.

On a CUDA machine (full-size synthetic weights, bf16, the default streaming preset):

    python benchmarks/gpu_check.py --wheels .whl --out report.md --json results.json

1. prints the environment (torch, CUDA, GPU name and memory);
2. installs the carried wheels (`--wheels`, see benchmarks/wheelhouse.sh) with `pip --no-index`;
3. writes the full-size synthetic checkpoints (benchmarks/synthetic.py) to `--weights`;
4. runs the CUDA tests (`pytest -m cuda`; they skip without CUDA);
5. for each server configuration (`--configs`): starts `api_server.py` through the real HTTP stack
   and measures time to first audio byte at each concurrency level (`--levels`), the real-time
   factor of every stream, 30 s non-streaming generation at 20 and 30 steps and peak GPU memory;
6. for the configurations named by `--breakdown`, times one stream's first block stage by stage
   in process (benchmarks/ttfb_breakdown.py: request code, diffusion steps, decoder);
7. writes a markdown report (`--out`) and JSON (`--json`): `device`, `tiny`, `ttfb_p50_ms`,
   `ttfb_p95_ms`, `nonstream_30s_30steps_s`, `realtime_streams` (each from the best configuration,
   named in `best`) and `configs` (one entry per configuration). With `--merge`, configurations
   already in the JSON file are kept (a matrix measured over several device calls).

`--tiny` runs the same flow on the small reference models on the CPU in a few minutes (CI runs it,
so the kit never rots). Every stage has a time limit; a stage that fails is recorded, and the
others still run.
"""

from __future__ import annotations

import argparse
import asyncio
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
import tempfile
import time
import wave
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_server import one_stream, percentile, tiny_repos  # noqa: E402
from live_server import ROOT, LiveServer, ServerFailed  # noqa: E402
from synthetic import write_synthetic_repos  # noqa: E402

# Server configurations of the matrix: ECHO_* settings on top of the device's defaults.
CONFIGS: dict[str, dict[str, str]] = {
    "eager": {},  # the default: exact eager batching, compiled autoencoder
    "static": {"ECHO_STATIC_SHAPES": "1"},  # padded to static shapes, eager (what compiled graphs run)
    "compile": {"ECHO_COMPILE": "1"},
    "compile+graphs": {"ECHO_COMPILE": "1", "ECHO_CUDA_GRAPHS": "1"},
}
NONSTREAM_TEXT = ("[S1] " + "This benchmark paragraph stands in for about thirty seconds of ordinary speech, "
                  "read at an even pace by one speaker. " * 4).strip()
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
    pcm = (0.25 * voiced * envelope / np.abs(voiced).max() * 32767).astype("<i2")
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())


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
        code = _wait_for_pytest(process, log, timeout)
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
    when it lingers after printing its final line (seen on a GPU machine: workers kept it alive)."""
    deadline, finished = time.monotonic() + timeout, None
    while (code := process.poll()) is None and time.monotonic() < (finished or deadline):
        time.sleep(1)
        if finished is None and re.search(r"^\S.*\b(passed|failed|errors?|skipped)\b.* in [\d.]+s",
                                          log.read_text(errors="replace"), re.M):
            finished = time.monotonic() + grace
    if code is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        return 1 if finished else None
    return code


# ---- measuring one server configuration -------------------------------------------------------------


async def level(url: str, clients: int, voice: str) -> dict:
    """`clients` streaming requests at once: TTFB and real-time factor percentiles."""
    async with httpx.AsyncClient(base_url=url, timeout=None) as client:
        start = time.perf_counter()
        results = await asyncio.gather(*(one_stream(client, seed, voice) for seed in range(clients)))
        wall = time.perf_counter() - start
    ttfb = [r.ttfb * 1000 for r in results]
    rtf = [r.wall / r.audio for r in results]
    return {"clients": clients, "ttfb_p50_ms": round(percentile(ttfb, .5), 1), "ttfb_p95_ms": round(percentile(ttfb, .95), 1),
            "rtf_p50": round(statistics.median(rtf), 3), "rtf_max": round(max(rtf), 3),
            "audio_s_per_wall_s": round(sum(r.audio for r in results) / wall, 2),
            "audio_s_per_stream": round(statistics.median(r.audio for r in results), 2),
            "gaps_per_stream": round(sum(r.gaps for r in results) / clients, 2),
            "gap_s_per_stream": round(sum(r.gap_seconds for r in results) / clients, 3)}


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


def metric(url: str, name: str) -> float | None:
    text = httpx.get(url + "/metrics", timeout=10).text
    found = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
    return float(found.group(1)) if found else None


def measure(url: str, levels: list[int], voice: str, repeat: int) -> dict:
    asyncio.run(level(url, 1, voice))  # the voice's latents and the first request's one-off costs
    result: dict = {"levels": [asyncio.run(level(url, n, voice)) for n in levels]}
    for steps in (20, 30):
        run = non_streaming(url, voice, steps, repeat)
        result[f"nonstream_30s_{steps}steps_s"] = run["seconds"]
        result["nonstream_audio_seconds"] = run["audio_seconds"]
    realtime = [entry["clients"] for entry in result["levels"] if entry["rtf_max"] < 1]
    result["realtime_streams"] = max(realtime, default=0)
    one = next((entry for entry in result["levels"] if entry["clients"] == 1), None)
    if one is not None:
        result["ttfb_p50_ms"], result["ttfb_p95_ms"] = one["ttfb_p50_ms"], one["ttfb_p95_ms"]
    result["peak_gpu_memory_gib"] = _gib(metric(url, "echo_gpu_memory_peak_bytes"))
    result["compiles_after_warm_up"] = metric(url, "echo_compiles_after_warm_up")
    return result


def _gib(value: float | None) -> float | None:
    return None if value is None else round(value / 2 ** 30, 2)


def run_config(name: str, base_env: dict[str, str], levels: list[int], voice: str, repeat: int, timeout: float,
               logs: Path) -> dict:
    env = {**base_env, **CONFIGS[name]}
    started = time.monotonic()
    log = logs / f"server-{name.replace('+', '-')}.log"
    try:
        server = LiveServer(env, log, ready_timeout=timeout)
    except ServerFailed as e:
        return {"env": CONFIGS[name], "error": f"start-up failed: {str(e)[-3000:]}"}
    result = {"env": CONFIGS[name], "ready_s": round(time.monotonic() - started, 1)}
    try:
        result.update(measure(server.url, levels, voice, repeat))
    except Exception as e:  # noqa: BLE001 - recorded; the other configurations still run
        result["error"] = f"{type(e).__name__}: {e}"
    finally:
        result["exit_code"] = server.stop(timeout=60)
        result["log_errors"] = [line for line in server.log().splitlines() if " ERROR " in line][:20]
    result["seconds"] = round(time.monotonic() - started, 1)
    return result


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
    return json.loads(out.read_text())["stages"]


# ---- the report ----------------------------------------------------------------------------------------


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
    env = report["environment"]
    lines = [f"# GPU check: {report['device']}, {report['date']}", "",
             f"commit {report['commit']}; torch {env['torch']} (CUDA {env['cuda']}), Python {env['python']}; "
             f"weights: {'tiny reference models, float32' if report['tiny'] else 'full-size synthetic, bf16'}; "
             f"voice: {VOICE_SECONDS:g} s clip; levels {report['levels']}.", ""]
    tests = report.get("tests")
    if tests:
        lines += [f"CUDA tests: {tests.get('summary', '')} ({tests['seconds']} s)", ""]
    lines += ["| config | ready s | clients | TTFB p50 | TTFB p95 | RTF p50 | RTF max | audio s / wall s |",
              "|---|---|---|---|---|---|---|---|"]
    for name, c in report["configs"].items():
        if "error" in c and "levels" not in c:
            lines.append(f"| {name} | failed: {c['error'].splitlines()[0][:120]} | | | | | | |")
            continue
        for entry in c.get("levels", []):
            lines.append(f"| {name} | {c.get('ready_s', '')} | {entry['clients']} | {entry['ttfb_p50_ms']:.0f} ms | "
                         f"{entry['ttfb_p95_ms']:.0f} ms | {entry['rtf_p50']:.2f} | {entry['rtf_max']:.2f} | "
                         f"{entry['audio_s_per_wall_s']:.1f} |")
    lines += ["", "| config | 30 s non-streaming, 20 steps | 30 steps | real-time streams | peak GPU memory | "
                  "compiles after warm-up |", "|---|---|---|---|---|---|"]
    for name, c in report["configs"].items():
        if "levels" in c:
            lines.append(f"| {name} | {c.get('nonstream_30s_20steps_s')} s | {c.get('nonstream_30s_30steps_s')} s | "
                         f"{c.get('realtime_streams')} | {c.get('peak_gpu_memory_gib')} GiB | "
                         f"{c.get('compiles_after_warm_up')} |")
        if c.get("error"):
            lines.append(f"| {name} | error: {c['error'].splitlines()[-1][:200]} | | | | |")
    breakdowns = {name: c["first_block"] for name, c in report["configs"].items() if "first_block" in c}
    if breakdowns:
        lines += ["", "First audio of one stream, in process (ms, median; `ttfb_breakdown.py`):", "",
                  "| config | job | diffusion steps | decode | total |", "|---|---|---|---|---|"]
        for name, stages in breakdowns.items():
            if "error" in stages:
                lines.append(f"| {name} | failed: {stages['error']} | | | |")
                continue
            cell = lambda stage: (f"{stages[stage]['ms']:.1f} ({stages[stage]['calls']})" if stage in stages else "")
            lines.append(f"| {name} | {cell('job')} | {cell('diffusion step')} | {cell('decode')} | "
                         f"{stages['total']['ms']:.1f} |")
    lines += ["", f"Best: TTFB p50 {report.get('ttfb_p50_ms')} ms / p95 {report.get('ttfb_p95_ms')} ms, "
                  f"30 s non-streaming at 30 steps {report.get('nonstream_30s_30steps_s')} s, "
                  f"{report.get('realtime_streams')} real-time streams ({report.get('best')})."]
    return "\n".join(lines) + "\n"


def save(report: dict, args: argparse.Namespace, started: float) -> None:
    """Write the JSON and markdown reports as they stand."""
    report.update(best_of(report["configs"]))
    report["seconds"] = round(time.monotonic() - started, 1)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(markdown(report))


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
    parser.add_argument("--configs", help=f"comma-separated, from {', '.join(CONFIGS)} (default: all on CUDA; "
                                          "eager,static with --tiny)")
    parser.add_argument("--levels", help="concurrent streams (default 1,4,16,64; 1,2,4 with --tiny)")
    parser.add_argument("--repeat", type=int, default=3, help="non-streaming runs per step count")
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--tests", help="only the CUDA tests matching this pytest -k expression")
    parser.add_argument("--static-max-active", type=int, default=16,
                        help="ECHO_MAX_ACTIVE of static-shape configurations (their padded caches grow with it); "
                             "levels above it are not run there")
    parser.add_argument("--test-timeout", type=float, default=420)
    parser.add_argument("--config-timeout", type=float, default=900, help="seconds for one server to get ready")
    parser.add_argument("--budget", type=float, default=1200, help="seconds for the whole run; later configs "
                                                                   "are skipped once it is spent")
    parser.add_argument("--out", type=Path, help="markdown report")
    parser.add_argument("--json", type=Path, help="JSON results")
    parser.add_argument("--merge", action="store_true", help="keep the configurations already in --json")
    parser.add_argument("--logs", type=Path, help="keep server and test logs here")
    parser.add_argument("--breakdown", default="", help="comma-separated configs whose first block is also timed "
                                                        "stage by stage, in process (ttfb_breakdown.py)")
    args = parser.parse_args(argv)
    args.configs = (args.configs or ("eager,static" if args.tiny else "eager,compile,compile+graphs,static")).split(",")
    args.breakdown = [name for name in args.breakdown.split(",") if name]
    unknown = (set(args.configs) | set(args.breakdown)) - set(CONFIGS)
    if unknown:
        parser.error(f"unknown configs {sorted(unknown)}; known: {', '.join(CONFIGS)}")
    args.levels = [int(n) for n in (args.levels or ("1,2,4" if args.tiny else "1,4,16,64")).split(",")]
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    started = time.monotonic()
    if args.wheels:
        install_wheels(args.wheels, Path(tempfile.gettempdir()) / "echo-site")
    env = environment()
    print(json.dumps(env), flush=True)
    if not args.tiny and not env["cuda_available"]:
        raise SystemExit("no CUDA device: run with --tiny for the CPU flow")
    work = Path(tempfile.mkdtemp(prefix="echo-gpu-check-"))
    logs = args.logs or work
    logs.mkdir(parents=True, exist_ok=True)
    write_voice(work / "voices" / "bench.wav")
    report: dict = {"device": env.get("gpu", "cpu"), "tiny": args.tiny, "date": dt.date.today().isoformat(),
                    "commit": commit(), "environment": env, "levels": args.levels}
    if args.tiny:
        echo, fish = tiny_repos(work)
        base_env = {"ECHO_DEVICE": "cpu", "ECHO_MODEL_DTYPE": "float32"}
    else:
        t0 = time.monotonic()
        repos = write_synthetic_repos(args.weights)
        echo, fish = repos["echo-tts-base"], repos["fish-s1-dac-min"]
        report["weights_s"] = round(time.monotonic() - t0, 1)
        print(f"synthetic weights ready in {report['weights_s']} s", flush=True)
        base_env = {"ECHO_DEVICE": "cuda"}
    base_env.update({"ECHO_MODEL_REPO": str(echo), "ECHO_FISH_REPO": str(fish), "ECHO_VOICE_DIRS": str(work / "voices"),
                     "ECHO_MAX_ACTIVE": str(max(args.levels)), "ECHO_MAX_QUEUE": str(max(args.levels)),
                     "ECHO_CACHE_DIR": str(work / "compile-cache"), "HF_HUB_OFFLINE": "1"})
    if not args.skip_tests:
        report["tests"] = run_cuda_tests(None if args.tiny else args.weights, args.test_timeout, logs / "cuda-tests.log",
                                         args.tests)
        print(f"CUDA tests: {report['tests']['summary']}", flush=True)
    configs = {}
    if args.merge and args.json and args.json.is_file():
        configs = json.loads(args.json.read_text()).get("configs", {})
    report["configs"] = configs
    save(report, args, started)
    for name in args.configs:
        left = args.budget - (time.monotonic() - started)
        if left < 60:
            configs[name] = {"env": CONFIGS[name], "error": "skipped: the time budget (--budget) was spent"}
            continue
        print(f"config {name}: measuring ({left:.0f} s of budget left)", flush=True)
        env, levels = base_env, args.levels
        if CONFIGS[name].get("ECHO_COMPILE") or CONFIGS[name].get("ECHO_STATIC_SHAPES"):
            cap = args.static_max_active
            env = {**base_env, "ECHO_MAX_ACTIVE": str(min(cap, max(levels)))}
            levels = [n for n in levels if n <= cap]
        configs[name] = run_config(name, env, levels, "bench", args.repeat, min(args.config_timeout, left), logs)
        left = args.budget - (time.monotonic() - started)
        if name in args.breakdown and left >= 60:
            configs[name]["first_block"] = run_breakdown(name, env, min(args.config_timeout, left), logs)
        print(json.dumps({name: configs[name]}), flush=True)
        save(report, args, started)  # after every configuration: a run cut short keeps what it measured
    print(markdown(report), flush=True)
    if args.logs is None:
        shutil.rmtree(work, ignore_errors=True)
    return report


if __name__ == "__main__":
    main()

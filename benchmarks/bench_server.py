"""Server-level speed: time to first audio, real-time factor and throughput under concurrency.

Starts `api_server.py` (or uses --url) and, for 1, 2, 4, 8 and 16 concurrent streaming clients,
reports time to first audio byte (p50, p95), the real-time factor of each stream (wall time of
the request / seconds of audio it returned: below 1 is faster than real time) and the aggregate
audio-seconds produced per wall-second; then one non-streaming 30 s generation.

    python benchmarks/bench_server.py --tiny                      # CPU, the small reference models
    python benchmarks/bench_server.py --model-repo /tmp/echo-synthetic/echo-tts-base \\
        --fish-repo /tmp/echo-synthetic/fish-s1-dac-min --device cuda   # GPU, full-size synthetic weights

The server inherits the environment. On CUDA it compiles with CUDA graphs unless told otherwise:
prefix `ECHO_COMPILE=0` to measure the eager path, `ECHO_COMPILE=0 ECHO_STATIC_SHAPES=1` static
shapes eager (add `ECHO_CUDA_GRAPHS=1` to replay them as graphs). benchmarks/gpu_check.py runs the
whole matrix.

Also measures, in-process, the streaming decoder's cost for the third block of the default preset
(480 new frames) against re-decoding the whole 640-frame prefix, as servers without decoder state do.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

from live_server import ROOT, LiveServer
from stats import percentile

REFERENCE = ROOT / "tests" / "reference"
GAP_TOLERANCE = 0.01  # s: a later arrival than this is a gap the listener hears
TEXT = ("Echo is a diffusion text to speech model. This sentence is here so that the benchmark asks for a "
        "realistic amount of speech, about as much as a short paragraph read aloud.")


def tiny_repos(out: Path) -> tuple[Path, Path]:
    """The reference's tiny EchoDiT and Fish S1-DAC laid out as local model directories."""
    from safetensors.torch import load_file, save_file

    echo, fish = out / "echo", out / "fish"
    echo.mkdir(parents=True, exist_ok=True)
    fish.mkdir(parents=True, exist_ok=True)
    shutil.copy(REFERENCE / "tiny_echo_dit.safetensors", echo / "pytorch_model.safetensors")
    shutil.copy(REFERENCE / "tiny_echo_dit_config.json", echo / "config.json")
    cases = load_file(REFERENCE / "tiny_fish_dac_cases.safetensors")
    save_file({k: cases[k].contiguous() for k in ("pca_components", "pca_mean", "latent_scale")},
              echo / "pca_state.safetensors")
    shutil.copy(REFERENCE / "tiny_fish_dac.safetensors", fish / "pytorch_model.safetensors")
    shutil.copy(REFERENCE / "tiny_fish_dac_config.json", fish / "config.json")
    return echo, fish


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tiny", action="store_true", help="serve the reference's tiny models on the CPU")
    parser.add_argument("--model-repo")
    parser.add_argument("--fish-repo")
    parser.add_argument("--device", default="cpu")


def model_env(args: argparse.Namespace, work: Path) -> dict[str, str]:
    """The server's model settings from --tiny (the tiny models, written into `work` and set as the
    repos in `args`) or --model-repo, --fish-repo and --device."""
    if args.tiny:
        echo, fish = tiny_repos(work)
        args.model_repo, args.fish_repo = str(echo), str(fish)
    return repo_env(args.model_repo, args.fish_repo, args.device)


def repo_env(model_repo: str, fish_repo: str, device: str = "cpu") -> dict[str, str]:
    """The server's model settings: these model directories on `device` (float32 on the CPU), offline."""
    env = {"ECHO_MODEL_REPO": model_repo, "ECHO_FISH_REPO": fish_repo, "ECHO_DEVICE": device, "HF_HUB_OFFLINE": "1"}
    if device == "cpu":
        env["ECHO_MODEL_DTYPE"] = "float32"
    return env


@dataclass
class StreamResult:
    ttfb: float  # s from the request to the first audio byte
    wall: float  # s from the request to the last byte
    audio: float  # s of audio received
    gaps: int  # playback gaps a listener starting at the first byte would hear (underruns)
    gap_seconds: float  # their total length


async def one_stream(client: httpx.AsyncClient, seed: int, voice: str = "none", text: str = TEXT,
                     on_first_audio: Callable[[float], None] | None = None) -> StreamResult:
    """One streaming PCM request, played back (on paper) from its first byte in real time.

    `on_first_audio` is called with the time to first byte as soon as it arrives (a caller that cuts
    the stream short still knows it)."""
    start = time.perf_counter()
    first, size, rate = None, 0, 44100
    playable_until, gaps, gap_seconds = 0.0, 0, 0.0  # when the audio received so far runs out
    body = {"input": text, "voice": voice, "seed": seed, "response_format": "pcm"}
    async with client.stream("POST", "/v1/audio/speech", json=body) as response:
        response.raise_for_status()
        rate = int(response.headers["x-audio-sample-rate"])
        async for chunk in response.aiter_raw():
            if not chunk:
                continue
            now = time.perf_counter()
            if first is None:
                first, playable_until = now - start, now
                if on_first_audio is not None:
                    on_first_audio(first)
            elif now > playable_until + GAP_TOLERANCE:  # the listener ran out before this arrived
                gaps, gap_seconds = gaps + 1, gap_seconds + now - playable_until
            playable_until = max(playable_until, now) + len(chunk) / 2 / rate
            size += len(chunk)
    return StreamResult(first, time.perf_counter() - start, size / 2 / rate, gaps, gap_seconds)


async def concurrency_table(url: str, levels: list[int]) -> None:
    print(f"{'clients':>7} {'TTFB p50':>9} {'TTFB p95':>9} {'RTF p50':>8} {'RTF max':>8} {'audio s/wall s':>15} "
          f"{'gaps/stream':>12} {'gap s/stream':>13}")
    async with httpx.AsyncClient(base_url=url, timeout=None) as client:
        await one_stream(client, 0)  # warm caches
        for n in levels:
            start = time.perf_counter()
            results = await asyncio.gather(*(one_stream(client, seed) for seed in range(n)))
            wall = time.perf_counter() - start
            ttfb = [r.ttfb for r in results]
            rtf = [r.wall / r.audio for r in results]
            audio = sum(r.audio for r in results)
            print(f"{n:>7} {percentile(ttfb, .5) * 1000:>8.0f}ms {percentile(ttfb, .95) * 1000:>7.0f}ms "
                  f"{statistics.median(rtf):>8.2f} {max(rtf):>8.2f} {audio / wall:>15.2f} "
                  f"{sum(r.gaps for r in results) / n:>12.1f} {sum(r.gap_seconds for r in results) / n:>13.2f}")


def non_streaming(url: str) -> None:
    body = {"input": TEXT, "voice": "none", "stream": False, "response_format": "wav"}
    start = time.perf_counter()
    response = httpx.post(url + "/v1/audio/speech", json=body, timeout=None)
    response.raise_for_status()
    seconds = (len(response.content) - 44) / 2 / 44100
    print(f"non-streaming: {seconds:.1f} s of audio in {time.perf_counter() - start:.2f} s")


def decode_costs(fish_repo: str, device: str) -> None:
    """Third block of [32, 128, 480]: streaming decode of 480 frames vs re-decoding all 640."""
    import torch

    sys.path.insert(0, str(ROOT))
    from inference import load_fish_ae_from_hf

    fish = load_fish_ae_from_hf(fish_repo, device=device, dtype=torch.float32)
    z = torch.randn(1, fish.latent_dim, 640, device=device)

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    def timed(fn) -> float:
        fn()
        sync()
        start = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - start

    def third_block_time() -> float:
        decoder = fish.streaming_decoder()
        decoder.decode(z[..., :160])  # blocks 1 and 2 (32 + 128 frames)
        sync()
        start = time.perf_counter()
        decoder.decode(z[..., 160:])
        sync()
        return time.perf_counter() - start

    third_block_time()
    inc = min(third_block_time() for _ in range(2))
    full = timed(lambda: fish.decode_zq(z))
    print(f"third block decode: incremental {inc * 1000:.0f} ms, re-decode of 640 frames {full * 1000:.0f} ms, "
          f"ratio {inc / full:.2f}")


def batching_gain(model_repo: str, fish_repo: str, device: str, clients: int = 8) -> None:
    """One diffusion step of `clients` requests: one batched forward vs one forward per request."""
    import torch

    sys.path.insert(0, str(ROOT))
    import inference as inf
    from batched_steps import StaticShapes, StaticSteps, batched_velocity
    from engine import BlockShape, SpeechEngine, SpeechJob
    from voices import SpeakerCache

    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    model = inf.load_model_from_hf(model_repo, device=device, dtype=dtype)
    fish = inf.load_fish_ae_from_hf(fish_repo, device=device, dtype=torch.float32)
    engine = SpeechEngine(model, fish, inf.load_pca_state_from_hf(model_repo, device=device), SpeakerCache(4))
    settings = inf.SamplerSettings(0, 3.0, 8.0, 0.5, 1.0)
    shape = BlockShape((32, 128, 480), (8, 15, 20))
    calls = []
    for seed in range(clients):
        steps = engine.job_steps(SpeechJob((TEXT,), None, seed, shape, shape, settings))
        text = next(steps)  # its text chunk first (a TextCall), then its first diffusion step
        calls.append(steps.send(text.run()))

    def timed(fn) -> float:
        fn()
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            fn()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - start)
        return best

    static = StaticSteps(model, StaticShapes.covering(shape.block_sizes, max_rows=3 * clients))
    with torch.inference_mode():
        one_by_one = timed(lambda: [c.run(model) for c in calls])
        together = timed(lambda: batched_velocity(model, calls))
        padded = timed(lambda: static(calls))  # uncompiled; the batch's stacked caches are reused after the first
    print(f"first-block step of {clients} requests: one at a time {one_by_one * 1000:.1f} ms, "
          f"batched {together * 1000:.1f} ms, speed-up {one_by_one / together:.2f}x; "
          f"static shapes (eager) {padded * 1000:.1f} ms, {padded / together:.2f}x the exact batch")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="an already running server")
    add_model_arguments(parser)
    parser.add_argument("--levels", default="1,2,4,8,16")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="echo-bench-"))
    env = model_env(args, work)
    server = None
    url = args.url
    if url is None:
        env |= {"ECHO_MAX_ACTIVE": "16", "ECHO_MAX_QUEUE": "16"}
        server = LiveServer(env, work / "server.log", ready_timeout=1800)
        url = server.url
    try:
        asyncio.run(concurrency_table(url, [int(n) for n in args.levels.split(",")]))
        non_streaming(url)
    finally:
        if server is not None:
            server.stop()
    if args.fish_repo:
        decode_costs(args.fish_repo, args.device)
        batching_gain(args.model_repo, args.fish_repo, args.device)


if __name__ == "__main__":
    main()

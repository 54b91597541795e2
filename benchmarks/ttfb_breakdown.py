"""Where the time to first audio goes: one request's first block, stage by stage, in process.

Loads the models as the server does (SpeechService: the same ECHO_* settings, warm-up and step
runner) and, on the generation thread (where compiled CUDA graphs were recorded), runs one
request's steps by hand until its first audio, with the device synchronised around each stage:

- job: the request's own code between model calls (text tokens, conditioning, text keys, the
  sampler's arithmetic, moving the block to the decoder);
- diffusion step: each forward pass of EchoDiT (all CFG rows of one step);
- decode: the streaming Fish S1-DAC decoder;
- silence check: VAD reroll's, when it is on.

The HTTP time to first byte (gpu_check.py, bench_server.py) minus this total is the serving
overhead. Synchronising costs a little; the stages add up to the total. Two more figures say
whether the host or the device sets the pace: the host's part of each diffusion step (until the
call returns, before the device is synchronised: what queueing the step's work costs the host) and
the first block run again without the per-stage synchronisations (`unsynchronised_ms`). A step
whose host part is well below its time leaves the host free to run ahead; capturing more of the
block in one graph would then save little. Last, what mp3 (OpenAI's default format) adds before the
first bytes: the encoder's time until it returns bytes for the first block, fed slices as the
pipeline does (`mp3_first_bytes_ms`), against the whole block in one call (`mp3_whole_block_ms`).

    python benchmarks/ttfb_breakdown.py --tiny
    ECHO_COMPILE=1 ECHO_CUDA_GRAPHS=1 python benchmarks/ttfb_breakdown.py --model-repo DIR --fish-repo DIR \\
        --device cuda --voice-dir DIR --voice bench
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from bench_server import add_model_arguments, model_env
from live_server import ROOT

sys.path.insert(0, str(ROOT))
from engine import DecodeCall, SilenceCheck, SpeechEngine, SpeechJob, TextCall  # noqa: E402
from inference import ModelCall  # noqa: E402
from inference_blockwise import PrefixCall  # noqa: E402
from pipeline import request_encoder, slices  # noqa: E402
from service import SpeechService  # noqa: E402
from settings import load_settings  # noqa: E402
from speech_request import SpeechRequest  # noqa: E402
from worker import COMPUTE  # noqa: E402

TEXT = "[S1] The first words of a reply should reach the listener before they notice any wait at all."
STAGES = {TextCall: "text encoder", ModelCall: "diffusion step", PrefixCall: "prefix extension", DecodeCall: "decode", SilenceCheck: "silence check"}


def first_block(engine: SpeechEngine, job: SpeechJob, synchronised: bool = True,
                host: list[float] | None = None, audio: list[np.ndarray] | None = None) -> dict[str, list[float]]:
    """Seconds of each stage until the job's first audio (and "total"), the device synchronised
    around each (else left to run ahead: then only "total" means what it says; the first audio is
    on the host, so the device has finished). `host` collects each diffusion step's host part:
    seconds until its call returned, before the device was synchronised; `audio` the first audio."""
    sync = (lambda: synchronize(engine.model.device)) if synchronised else (lambda: None)
    times: dict[str, list[float]] = defaultdict(list)

    def timed(stage: str, fn: Callable):
        sync()
        start = time.perf_counter()
        out = fn()
        if host is not None and stage == "diffusion step":
            host.append(time.perf_counter() - start)
        sync()
        times[stage].append(time.perf_counter() - start)
        return out

    started = time.perf_counter()
    steps = engine.job_steps(job)
    item = timed("job", lambda: next(steps))
    while not isinstance(item, np.ndarray):
        reply = timed(STAGES[type(item)], lambda: answer_of(engine, item))
        item = timed("job", lambda: steps.send(reply))
    steps.close()
    if audio is not None:
        audio.append(item)
    times["total"].append(time.perf_counter() - started)
    return dict(times)


def answer_of(engine: SpeechEngine, item):
    """What the worker sends back for one call (a unit of one: worker.COMPUTE); a silence check runs."""
    return item.run() if isinstance(item, SilenceCheck) else getattr(engine, COMPUTE[type(item)])([item])[0]


def first_bytes(open_encoder: Callable, block: np.ndarray, sliced: bool) -> float:
    """Seconds from opening an encoder until it returns bytes for `block` (fed in the pipeline's
    slices, or whole)."""
    start = time.perf_counter()
    encoder = open_encoder()
    try:
        for part in slices(block) if sliced else (block,):
            if encoder.encode(part):
                return time.perf_counter() - start
        return time.perf_counter() - start  # (bytes only at the end: never for a block this long)
    finally:
        encoder.close()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def summary(runs: list[dict[str, list[float]]]) -> dict[str, dict]:
    """Per stage: calls per request, and the median over runs of its milliseconds per request."""
    return {stage: {"calls": len(runs[0][stage]),
                    "ms": round(statistics.median(sum(run[stage]) for run in runs) * 1000, 2)}
            for stage in runs[0]}


def table(rows: dict[str, dict]) -> str:
    total = rows["total"]["ms"]
    lines = [f"{'stage':<15} {'calls':>5} {'ms':>9} {'share':>6}"]
    for stage, row in rows.items():
        lines.append(f"{stage:<15} {row['calls']:>5} {row['ms']:>9.2f} {row['ms'] / total:>6.0%}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--voice", default="none", help="a voice of ECHO_VOICE_DIRS (default: no voice)")
    parser.add_argument("--voice-dir", help="sets ECHO_VOICE_DIRS")
    parser.add_argument("--repeat", type=int, default=5, help="timed requests after one untimed")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.tiny or args.model_repo:  # else the ECHO_* environment says where the models are
        os.environ.update(model_env(args, Path(tempfile.mkdtemp(prefix="echo-ttfb-"))))
    if args.voice_dir:
        os.environ["ECHO_VOICE_DIRS"] = args.voice_dir
    service = SpeechService(load_settings())
    service.start_loading().join()
    if reason := service.unready_reason():
        raise SystemExit(reason)
    try:
        job = service.build_job(SpeechRequest(input=TEXT, voice=args.voice, seed=0).generation_options())
        host: list[float] = []
        audio: list[np.ndarray] = []
        runs = [service.runtime.worker.call(lambda: first_block(service.engine, job, host=host, audio=audio))
                for _ in range(args.repeat + 1)][1:]
        free = [service.runtime.worker.call(lambda: first_block(service.engine, job, synchronised=False))["total"][0]
                for _ in range(args.repeat)]
        mp3 = SpeechRequest(input=TEXT, voice=args.voice, response_format="mp3")
        open_mp3 = lambda: request_encoder(mp3, service.settings, streaming=True)  # noqa: E731
        mp3_ms = {sliced: round(statistics.median(first_bytes(open_mp3, audio[-1], sliced)
                                                  for _ in range(args.repeat + 1)) * 1000, 2)
                  for sliced in (True, False)}
    finally:
        service.close()
    rows = summary(runs)
    per_step = host[len(host) // (args.repeat + 1):]  # (the untimed first run's steps left out)
    step_host_ms = round(statistics.median(per_step) * 1000, 3) if per_step else None
    unsynchronised_ms = round(statistics.median(free) * 1000, 2) if free else None
    print(table(rows))
    print(f"host part of a diffusion step: {step_host_ms} ms (median); first block unsynchronised: "
          f"{unsynchronised_ms} ms (median)")
    print(f"mp3's first bytes after the first audio: {mp3_ms[True]} ms in slices, {mp3_ms[False]} ms the block whole "
          f"({audio[-1].size} samples; median)")
    settings = {k: v for k, v in os.environ.items() if k.startswith("ECHO_") and k != "ECHO_API_KEY"}
    result = {"device": str(service.settings.torch_device), "settings": settings, "voice": args.voice,
              "repeat": args.repeat, "stages": rows, "step_host_ms": step_host_ms,
              "unsynchronised_ms": unsynchronised_ms, "mp3_first_bytes_ms": mp3_ms[True],
              "mp3_whole_block_ms": mp3_ms[False]}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()

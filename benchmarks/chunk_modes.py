"""What `chunk_mode: continue` costs against `independent` (issue 22): one long answer generated
both ways by the same service, in one run.

For each mode: the chunks the text was cut into, the wall time and seconds of audio (throughput,
audio s / wall s), the time to the first audio of the answer, and the longest wait between two
pieces of audio (a later chunk's first block after the previous chunk's last is the usual
longest: what a listener hears as a pause when generation is slower than playback). In `continue` mode every chunk is generated with the previous chunk's
latents as a prefix: each step attends to them, and the prefix is encoded once per chunk.

    python benchmarks/chunk_modes.py --tiny            # CPU, the small reference models
    python benchmarks/chunk_modes.py --model-repo DIR --fish-repo DIR --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench_server import add_model_arguments, model_env

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TEXT = " ".join(
    f"This is sentence number {i} of a long answer, read in one voice from beginning to end." for i in range(24))


def measure(service, mode: str, stream: bool, seed: int = 1) -> dict:
    """One answer in `mode`: chunks, wall time, audio, first audio, and the waits between chunks."""
    from speech_request import GenerationOptions

    options = GenerationOptions(input=TEXT, voice="none", seed=seed, stream=stream, chunk_mode=mode)
    job = service.build_job(options)
    engine = service.engine
    ends = []  # when each piece of audio was delivered
    started = time.perf_counter()
    audio, first = 0, None
    for block in engine.generate(job):
        now = time.perf_counter()
        first = first or now - started
        audio += block.size
        ends.append(now)
    wall = time.perf_counter() - started
    gaps = [b - a for a, b in zip(ends, ends[1:])]
    return {"mode": mode, "stream": stream, "chunks": len(job.chunks), "wall_s": wall, "audio_s": audio / 44100,
            "first_audio_ms": first * 1000, "longest_wait_between_blocks_s": max(gaps, default=0.0),
            "median_wait_s": statistics.median(gaps) if gaps else 0.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    env = model_env(args, Path(tempfile.mkdtemp(prefix="echo-chunks-")))

    import service as svc
    from settings import load_settings

    settings = load_settings(model_repo=env["ECHO_MODEL_REPO"], fish_repo=env["ECHO_FISH_REPO"], device=args.device,
                             model_dtype=env.get("ECHO_MODEL_DTYPE", "bfloat16"), warmup=False,
                             voice_dirs=[tempfile.mkdtemp()])
    service = svc.SpeechService(settings)
    service.start_loading().join()
    measure(service, "independent", True)  # warm caches
    print(f"{'mode':>12} {'stream':>6} {'chunks':>6} {'audio s':>8} {'wall s':>7} {'audio s/wall s':>15} "
          f"{'first audio':>12} {'longest wait':>13}")
    for _ in range(args.rounds):
        for stream in (True, False):
            for mode in ("independent", "continue"):
                r = measure(service, mode, stream)
                print(f"{r['mode']:>12} {str(r['stream']):>6} {r['chunks']:>6} {r['audio_s']:>8.1f} {r['wall_s']:>7.2f} "
                      f"{r['audio_s'] / r['wall_s']:>15.2f} {r['first_audio_ms']:>10.0f}ms "
                      f"{r['longest_wait_between_blocks_s']:>12.2f}s")
    service.close()


if __name__ == "__main__":
    main()

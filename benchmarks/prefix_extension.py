"""The latent-prefix extension between two blocks of a stream, eager against ECHO_COMPILE's compiled
prefix encoder (engine.CompiledPrefixEncoder): milliseconds per call, one stream and several whose
blocks finish together, for each extension of the default streaming preset.

    python benchmarks/prefix_extension.py                           # CPU: full depth at 1/8 width
    python benchmarks/prefix_extension.py --device cuda --full      # a GPU: the full-size bf16 model

At 1/8 width the model keeps every layer, so each call runs the full-size op count while its
arithmetic is small: on a CPU that is the host-bound regime a GPU's small kernels are in.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import inference as inf  # noqa: E402
from engine import CompiledPrefixEncoder  # noqa: E402
from model import EchoDiT, LatentPrefix, extend_prefixes  # noqa: E402
from settings import PERFORMANCE_PRESETS  # noqa: E402

NARROW = ("model_size", "intermediate_size", "text_model_size", "text_intermediate_size", "speaker_model_size",
          "speaker_intermediate_size", "timestep_embed_size", "adaln_rank")


def build(device: str, full: bool) -> EchoDiT:
    config = dict(inf.ECHO_DIT_CONFIG)
    if not full:
        config.update({k: config[k] // 8 for k in NARROW})
    dtype = torch.bfloat16 if full else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        return EchoDiT(**config).to(dtype).eval().requires_grad_(False).fuse_projections()


@torch.inference_mode()
def per_call_ms(model: EchoDiT, streams: int, chain: list[tuple[int, int]], encode, repeat: int) -> dict[int, float]:
    """Median ms of each extension of the chain, for `streams` generations extended together."""
    times: dict[int, list[float]] = {frames: [] for frames, _ in chain}
    for _ in range(repeat):
        prefixes = [LatentPrefix(model, 1) for _ in range(streams)]
        for frames, _ in chain:
            block = torch.randn(1, frames, model.latent_size, device=model.device, dtype=model.dtype)
            if model.device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            extend_prefixes(prefixes, [block] * streams, encode)
            if model.device.type == "cuda":
                torch.cuda.synchronize()
            times[frames].append(1000 * (time.perf_counter() - start))
    return {frames: statistics.median(t) for frames, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--full", action="store_true", help="the full-size model in bfloat16 (a GPU)")
    parser.add_argument("--streams", default="1,4", help="generations extended together")
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    model = build(args.device, args.full)
    blocks = list(PERFORMANCE_PRESETS["default"][0])
    compiled = CompiledPrefixEncoder(model, blocks)
    started = time.perf_counter()
    compiled.warm_up()
    print(f"{'full size' if args.full else 'full depth, 1/8 width'}, {args.device}, blocks {blocks}: "
          f"compiled in {time.perf_counter() - started:.0f} s")
    print("| streams | extension (frames after frames) | eager ms | compiled ms | ratio |\n|---|---|---|---|---|")
    for streams in (int(n) for n in args.streams.split(",")):
        eager = per_call_ms(model, streams, compiled.chain, None, args.repeat)
        fast = per_call_ms(model, streams, compiled.chain, compiled, args.repeat)
        for frames, before in compiled.chain:
            print(f"| {streams} | {frames} after {before} | {eager[frames]:.2f} | {fast[frames]:.2f} | "
                  f"{eager[frames] / fast[frames]:.2f} |")
    assert compiled.compiles_after_warm_up == 0


if __name__ == "__main__":
    main()

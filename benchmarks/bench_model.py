"""Model-level speed: 30 s non-streaming generation, the first streaming block, and the Fish decode.

Runs on real-size synthetic weights (random weights cost the same as trained ones):

    python benchmarks/bench_model.py --device cuda --dtype bfloat16            # everything, end to end
    python benchmarks/bench_model.py --device cpu --dtype float32 --estimate   # CPU: time single steps,
                                                                               # extrapolate the totals

`--estimate` times one guided (3-row) and one unguided (1-row) diffusion step for each shape and
adds them up the way the sampler would; a full 640-frame run takes tens of minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import inference as inf  # noqa: E402
import inference_blockwise as blk  # noqa: E402
from synthetic import write_synthetic_repos  # noqa: E402

SPEAKER_FRAMES = 212  # a 10 s reference
TEXT = "[S1] " + "This benchmark sentence stands in for about thirty seconds of ordinary speech. " * 5
CFG = dict(cfg_scale_text=3.0, cfg_scale_speaker=8.0, cfg_min_t=0.5, cfg_max_t=1.0)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeat: int) -> float:
    """Median wall time of `fn` over `repeat` runs after one warm-up run."""
    fn()
    sync(device)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def guided_steps(num_steps: int) -> int:
    return sum(CFG["cfg_min_t"] <= t <= CFG["cfg_max_t"] for t in inf.time_schedule(num_steps)[:-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    parser.add_argument("--weights", type=Path, default=Path("/tmp/echo-synthetic"),
                        help="where the synthetic repos are (written there when missing)")
    parser.add_argument("--estimate", action="store_true", help="time single steps and extrapolate")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    repos = write_synthetic_repos(args.weights)
    model = inf.load_model_from_hf(str(repos["echo-tts-base"]), device=args.device, dtype=dtype, compile=args.compile)
    fish = inf.load_fish_ae_from_hf(str(repos["fish-s1-dac-min"]), device=args.device, dtype=torch.float32)
    pca = inf.load_pca_state_from_hf(str(repos["echo-tts-base"]), device=args.device)

    gen = torch.Generator().manual_seed(0)
    speaker = torch.randn(1, SPEAKER_FRAMES, 80, generator=gen).to(device)
    speaker_mask = torch.ones(1, SPEAKER_FRAMES, dtype=torch.bool, device=device)
    ids, mask = inf.get_text_input_ids_and_mask([TEXT], max_length=inf.MAX_TEXT_LENGTH, device=device,
                                                pad_to_max=False)
    print(f"device={device} dtype={dtype} text={ids.shape[1]} bytes speaker={SPEAKER_FRAMES} frames")
    rows = []

    with torch.inference_mode():
        if args.estimate:
            settings = inf.SamplerSettings(num_steps=1, **CFG)
            cond = inf.Conditioning(model, speaker, speaker_mask, ids, mask, settings)
            t_cond = timed(lambda: inf.Conditioning(model, speaker, speaker_mask, ids, mask, settings), device, 1)

            def step(length: int, rows_per_step: int, prefix: int | None) -> float:
                branches = (inf.COND, inf.NO_TEXT, inf.NO_SPEAKER)[:rows_per_step]
                text_mask, sp_mask, kv_t, kv_s = cond.batch(branches, False)
                kv_latent = None
                if prefix is not None:
                    latent = torch.zeros(rows_per_step, prefix, 80, device=device, dtype=dtype)
                    kv_latent = model.get_kv_cache_latent(latent)
                x = torch.randn(rows_per_step, length, 80, device=device).to(dtype)
                t = torch.full((rows_per_step,), 0.9, device=device).to(dtype)
                return timed(lambda: model(x, t, text_mask, sp_mask, kv_t, kv_s, start_pos=0 if prefix else None,
                                           kv_cache_latent=kv_latent), device, args.repeat)

            full_g, full_u = step(640, 3, None), step(640, 1, None)
            for n in (20, 30):
                g = guided_steps(n)
                rows.append((f"30 s non-streaming, {n} steps (estimated)", t_cond + g * full_g + (n - g) * full_u))
            first_g, first_u = step(32, 3, 640), step(32, 1, 640)
            g = guided_steps(8)
            rows.append(("first streaming block (32 frames, 8 steps, estimated)",
                         t_cond + g * first_g + (8 - g) * first_u))
            rows.append(("one guided step, 640 frames (3 rows)", full_g))
            rows.append(("one guided step, 32 frames (3 rows, 640-frame prefix)", first_g))
        else:
            for n in (20, 30):
                fn = lambda n=n: inf.sample_euler_cfg_independent_guidances(  # noqa: E731
                    model, speaker, speaker_mask, ids, mask, 0, num_steps=n, **CFG, sequence_length=640)
                rows.append((f"30 s non-streaming, {n} steps", timed(fn, device, args.repeat)))

            def first_block() -> None:
                settings = inf.SamplerSettings(num_steps=8, **CFG)
                next(blk.iter_blockwise(model, speaker, speaker_mask, ids, mask, 0, [32, 128, 480], [8, 15, 20],
                                        settings))
            rows.append(("first streaming block (32 frames, 8 steps)", timed(first_block, device, args.repeat)))

        z = torch.randn(1, 640, 80, generator=gen).to(device)
        rows.append(("Fish decode of 640 latents (30 s)", timed(lambda: inf.ae_decode(fish, pca, z), device,
                                                               max(1, args.repeat if not args.estimate else 1))))

    width = max(len(name) for name, _ in rows)
    for name, seconds in rows:
        print(f"{name:<{width}}  {seconds * 1000:10.1f} ms")


if __name__ == "__main__":
    main()

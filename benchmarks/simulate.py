"""A performance model that works without a GPU (issue 19, item 6): proxy metrics and a scheduler
simulation driven by a cost model, calibrated against the measured 2026-11-22 H100 table.

    python benchmarks/simulate.py --calibrate                 # measured vs simulated, side by side
    python benchmarks/simulate.py --burst 1,4,16,24,64        # predictions (deadline policy)
    python benchmarks/simulate.py --poisson 0.5,1,2,3,4 --duration 120 --seed 0
    python benchmarks/simulate.py --proxy                     # proxy metrics per stage (meta device)
    python benchmarks/simulate.py --burst 16 --policy lockstep --config graphs --json out.json

Proxy metrics (`--proxy`): the full-size models on the meta device (no memory, no time), counted
with benchmarks/exact_batching.py's TorchDispatchMode (plus convolution FLOPs and the bytes every
op reads and writes): eager aten ops, bytes copied, bytes touched and FLOPs of each stage of a
stream (admission = text encoder + the text keys/values of one job; one diffusion step per frame
count; prefix extension = the latent-prefix keys/values of a finished block; decode = one block
through the streaming Fish decoder), host syncs per block (the tiny model through the real
`engine.job_steps`, Tensor.item/.tolist/.cpu/.numpy/__bool__ counted), and the useful-FLOP
fraction of a mix of block sizes before (padded runner, a10f983) and after (ExactSteps).

The simulation drives the real `worker.GenerationWorker` (its `_admit`, `_park`, `_step`,
`_advance`, `next_unit`) in virtual time: `worker.clock` is replaced by the simulation's clock,
no thread is started, and a fake engine yields the real step protocol (`inference.ModelCall`
with x of the right shape, `engine.DecodeCall`, numpy audio blocks) while its `steps`/`decode`
advance the clock by the cost model. A call costs

    max(bytes / bandwidth, FLOPs / achieved FLOP/s) + eager ops x per-op overhead (+ graph replays
    x per-replay overhead with CUDA graphs)

(`--compiled-stages`: the text encoder, prefix encoder and streaming decoder, compiled since, priced
by the kernel launches counted with `--count-compiled` instead of eager ops), and with static
shapes (graphs) each new batch the static runner of 2026-11-22 built when a pack's
members changed (another job, block or CFG phase) costs its meta-counted eager ops and bytes
(restack_work). That runner, the one measured, is what the static cost model stands for; today's
(a row pool written once per generation, one graph per step) is not calibrated until a GPU runs it.

with bandwidth and peak FLOP/s from the H100 SXM data sheet, and the achieved FLOP fraction, the
per-op and per-replay overheads and a fixed per-request overhead (HTTP) fitted ONCE to the
single-stream measurements (TTFB at 1 stream, 30 s non-streaming at 20 and 30 steps). The
multi-stream rows of the table are then predictions of the `lockstep` policy (what ran on
2026-11-22: commit 8ca4239's worker, every iteration all waiting jobs admitted, one padded step
for all active jobs, then all decodes); `deadline` is today's worker.py as it is.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
for _path in (str(ROOT), str(ROOT / "benchmarks")):
    if _path not in sys.path:
        sys.path.insert(0, _path)
if __name__ == "__main__" and "--count-tree" in sys.argv:  # child: count another tree's runner (before imports)
    sys.path.insert(0, sys.argv[sys.argv.index("--count-tree") + 1])

import engine as eng  # noqa: E402
import worker as wk  # noqa: E402
from batched_steps import PASS_TOKENS, StaticShapes, StaticSteps, row_buckets  # noqa: E402
from inference import SAMPLE_RATE, ModelCall  # noqa: E402
from inference_blockwise import PrefixCall  # noqa: E402
# the GPU kit's arrivals: a simulated load curve replays the requests the measured one sends
from gpu_check import arrivals as poisson_arrivals  # noqa: E402
from stats import percentile  # noqa: E402

FRAME_SAMPLES = 2048
PADDED_RUNNER = "a10f983"  # the last commit with the padded ExactSteps (the 2026-11-22 eager runs)

# ---- what was measured: RESULTS.md, "GPU: NVIDIA H100 80GB HBM3, 2026-11-22" -----------------------
MEASURED = {
    "eager": {"ttfb_p50_ms": {1: 460, 4: 1085, 16: 2973, 24: 4489}, "ttfb_p95_ms": {1: 460, 4: 1087, 16: 2986, 24: 4528},
              "nonstream_s": {20: 1.84, 30: 2.19}},
    "graphs": {"ttfb_p50_ms": {1: 140, 4: 449, 16: 1506}, "ttfb_p95_ms": {1: 140, 4: 454, 16: 1522},
               "nonstream_s": {20: 0.50, 30: 0.62}},
}
# how those runs were configured (RESULTS.md): ECHO_MAX_ACTIVE, the decode cap, static shapes
STREAM_SECONDS = 29.72  # every stream of those runs: 640 frames
SATURATED_THROUGHPUT = 38.4  # audio s / wall s, eager, 64 streams (the same table): fits the per-job overhead
RUN_SETUP = {"eager": dict(max_active=64, decode_cap=2048), "graphs": dict(max_active=16, decode_cap=None)}

# ---- the hardware: H100 SXM data sheet --------------------------------------------------------------
H100 = dict(bandwidth=3.35e12, bf16=989e12, tf32=494e12)
BANDWIDTH_FRACTION = 0.8  # of the data sheet's HBM3 bandwidth a streaming kernel achieves (not fitted)

# ---- the workload of the 2026-11-22 runs ------------------------------------------------------------
STREAM_BLOCKS = ((32, 8), (128, 15), (480, 20))  # default streaming preset: (frames, steps) per block
TEXT_TOKENS = 177  # bench_server.TEXT with "[S1] ", in bytes, + BOS
NONSTREAM_TOKENS = 473  # gpu_check.NONSTREAM_TEXT + BOS
VOICE_PATCHES = 54  # a 10 s voice: 215 latent frames in patches of 4
CFG = (0.5, 1.0)  # cfg_min_t, cfg_max_t


def guided_steps(steps: int, cfg: tuple[float, float] = CFG) -> list[bool]:
    """Which of a block's steps run guided (3 rows): t in [cfg_min_t, cfg_max_t] (inference.time_schedule)."""
    ts = [0.999 * (1 - k / steps) for k in range(steps)]
    return [cfg[0] <= t <= cfg[1] for t in ts]


# =====================================================================================================
# Proxy metrics: counting on the meta device (exact_batching's Counter, plus convolutions and bytes)
# =====================================================================================================

# per generation in a step: (frames, rows, prefix patches, text tokens, speaker patches), as exact_batching
FIT_MIXES = [
    [(32, 3, 0, TEXT_TOKENS, VOICE_PATCHES)], [(32, 3, 0, TEXT_TOKENS, VOICE_PATCHES)] * 2,
    [(32, 1, 0, 60, 53)] * 3, [(128, 3, 8, TEXT_TOKENS, VOICE_PATCHES)], [(128, 1, 8, 120, 80)] * 2,
    [(480, 3, 40, 200, 80)], [(480, 1, 40, TEXT_TOKENS, VOICE_PATCHES)] * 2,
    [(640, 3, 0, NONSTREAM_TOKENS, VOICE_PATCHES)], [(640, 1, 0, NONSTREAM_TOKENS, VOICE_PATCHES)]]


def meter_class():
    import exact_batching as eb

    aten = torch.ops.aten

    class Meter(eb.Counter):
        """exact_batching.Counter plus convolution FLOPs and the bytes every (non-view) op reads and writes."""

        def __init__(self):
            super().__init__()
            self.touched = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = super().__torch_dispatch__(func, types, args, kwargs)
            if func is aten.convolution.default:
                weight, transposed = args[1], args[6]
                k = math.prod(weight.shape[2:])
                self.flops += 2 * (args[0].numel() * weight.shape[1] if transposed else out.numel() * weight.shape[1]) * k
            if not getattr(func, "is_view", False):
                tensors = [a for a in list(args) + list((kwargs or {}).values()) if isinstance(a, torch.Tensor)]
                tensors += [a for a in args if isinstance(a, (list, tuple)) for a in a if isinstance(a, torch.Tensor)]
                outs = out if isinstance(out, (list, tuple)) else [out]
                self.touched += sum(eb.nbytes(t) for t in tensors + [o for o in outs if isinstance(o, torch.Tensor)])
            return out

    return Meter


def measured(fn) -> dict:
    with meter_class()() as m:
        fn()
    return dict(ops=m.ops, flops=m.flops, copied=m.copied, touched=m.touched)


def full_model():
    import inference as inf
    from model import EchoDiT

    with torch.device("meta"):  # as the server loads it: projections fused (load_model_from_hf)
        return EchoDiT(**inf.ECHO_DIT_CONFIG).to(torch.bfloat16).eval().fuse_projections()


def step_features(mix: Sequence[tuple], frames: int | None = None, keys_pad: int | None = None) -> dict:
    """What a pass's cost is linear in: generations, token rows, row-keys and row-token-keys."""
    frames = frames or max(g[0] for g in mix)
    keys = [keys_pad if keys_pad else frames + p + t + s for _, _, p, t, s in mix]
    return dict(gens=len(mix), tokens=sum(r * frames for _, r, *_ in mix),
                rowkeys=sum(r * k for (_, r, *_), k in zip(mix, keys)),
                attn=sum(r * frames * k for (_, r, *_), k in zip(mix, keys)))


def count_runner(kind: str, mixes: Sequence[Sequence[tuple]]) -> list[dict]:
    """Ops, FLOPs and bytes of the steady-state step (its second call) of each mix, one runner call
    per mix, on the meta device: kind 'exact' (ExactSteps of the tree imported), 'padded' (the same
    name in an older tree: run with --count-tree) or 'static' (StaticSteps at the 2026-11-22 shapes)."""
    import batched_steps as bs
    import exact_batching as eb

    model = full_model()
    out = []
    for mix in mixes:
        calls = eb.make_calls(model, mix, torch.bfloat16, "meta")
        with torch.no_grad():
            if kind == "static":
                shapes = StaticShapes((32, 128, 480, 640), row_buckets(48), 160, 768, (1600,))
                steps = StaticSteps(model, shapes)
                first = measured(lambda: steps(calls))  # new members: pool rows and the bucket's masks written
                row = measured(lambda: steps(calls))  # the same members: only the step's own inputs written
                row["restack_ops"] = first["ops"] - row["ops"]
                row["restack_touched"] = first["touched"] - row["touched"]
                velocities = steps._body(*steps.last_inputs)
                steps._body = lambda *args: velocities  # what a CUDA graph's replay stands for
                row["outside_ops"] = measured(lambda: steps(calls))["ops"]
                row["input_writes"] = input_writes(steps, calls)
            else:
                steps = bs.ExactSteps(model) if hasattr(bs, "ExactSteps") else bs.batched_velocity
                steps(calls)
                row = measured(lambda: steps(calls))
        out.append(row)
    return out


def input_writes(steps, calls) -> dict[str, int]:
    """Bytes a step pass of StaticSteps writes into what its step graphs read, by buffer, once its
    members are placed (counted on the meta device, outside the pass itself): 'keys' (the row pool),
    'lanes' (each frame bucket's row indices, positions and key mask), 'step' (the latents and AdaLN
    rows, the step's own inputs) and 'other'. Issue 20 item 1 asks for no keys: with one graph per
    decoder block, the runner measured on 2026-11-22 copied each layer's padded prefix, text and
    speaker keys/values into the replayed graph's inputs, 1.49 GB a step pass for one generation."""
    from torch.utils._python_dispatch import TorchDispatchMode

    steps(calls)
    pool = steps._pool
    owners = {t.untyped_storage()._cdata: "keys" for t in pool.pools}
    owners |= {t.untyped_storage()._cdata: "lanes" for lane in steps._lanes.values() for t in lane.storage}
    owners |= {t.untyped_storage()._cdata: "step" for t in steps._step_inputs}
    written = dict.fromkeys(("keys", "lanes", "step", "other"), 0)

    class Writes(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            values = dict(zip((a.name for a in func._schema.arguments), args)) | kwargs
            for arg in func._schema.arguments:
                if arg.alias_info is not None and arg.alias_info.is_write:
                    value = values.get(arg.name)
                    for t in value if isinstance(value, (list, tuple)) else [value]:
                        if isinstance(t, torch.Tensor):
                            written[owners.get(t.untyped_storage()._cdata, "other")] += t.numel() * t.element_size()
            return func(*args, **kwargs)

    with Writes():
        steps(calls)
    return written


def count_tree(tree: str) -> list[dict]:
    """count_runner('padded') in a child process that imports model.py etc. from `tree`."""
    out = subprocess.run([sys.executable, __file__, "--count-tree", tree], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def fit_linear(rows: list[dict], features: list[dict], target: str, names: Sequence[str]) -> dict:
    a = np.array([[f[n] if n != "one" else 1.0 for n in names] for f in features], dtype=float)
    b = np.array([r[target] for r in rows], dtype=float)
    coef, *_ = np.linalg.lstsq(a, b, rcond=None)
    worst = float(np.max(np.abs(a @ coef - b) / np.maximum(b, 1)))
    return dict(zip(names, map(float, coef))) | {"max_rel_error": worst}


def fit_step_costs(kind: str, counts: list[dict] | None = None) -> dict:
    """The linear step-cost model of a runner, fitted to meta counts of FIT_MIXES (checked: max_rel_error)."""
    if counts is None:
        counts = count_tree(str(padded_tree())) if kind == "padded" else count_runner(kind, FIT_MIXES)
    pad = 2528 if kind == "static" else None
    feats = []
    for mix in FIT_MIXES:
        f = step_features(mix, keys_pad=pad and max(g[0] for g in mix) + pad)
        f["single"] = float(len(mix) == 1)
        feats.append(f)
    fit = {t: fit_linear(counts, feats, t, ("one", "tokens", "attn")) for t in ("flops",)}
    fit |= {t: fit_linear(counts, feats, t, ("one", "tokens", "rowkeys", "attn")) for t in ("touched", "copied")}
    fit["ops"] = fit_linear(counts, feats, "ops", ("one", "gens", "single"))
    if kind == "static":
        fit["outside_ops"] = fit_linear(counts, feats, "outside_ops", ("one", "gens"))
        restack = [restack_features(mix) for mix in FIT_MIXES]
        fit["restack_ops"] = fit_linear(counts, restack, "restack_ops", ("one", "gens", "single"))
        fit["restack_touched"] = fit_linear(counts, restack, "restack_touched", ("one", "padded_rows", "tokens", "gens"))
    return fit


def restack_features(mix: Sequence[tuple], max_rows: int = 48) -> dict:
    """What a new static batch (the 2026-11-22 StaticSteps._new_batch: positions, key mask, every member's text,
    speaker and prefix keys/values copied per layer into zeroed (R, 768 / 1600 / 160, H, D) stacks)
    costs is linear in: its generations and its padded rows (and padded rows x frame bucket)."""
    rows = sum(g[1] for g in mix)
    padded = next(b for b in row_buckets(max_rows) if b >= rows)
    return dict(gens=len(mix), single=float(len(mix) == 1), padded_rows=padded,
                tokens=padded * _frame_bucket(max(g[0] for g in mix)))


_TREES: dict[str, Path] = {}


def padded_tree() -> Path:
    if PADDED_RUNNER not in _TREES:
        tmp = Path(tempfile.mkdtemp(prefix="padded-runner-"))
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", PADDED_RUNNER, "model.py", "inference.py",
                                  "batched_steps.py", "autoencoder.py", "checkpoint.py"], capture_output=True,
                                 check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive, check=True)
        _TREES[PADDED_RUNNER] = tmp
    return _TREES[PADDED_RUNNER]


def count_admission(tokens: int) -> dict:
    """One job's admission: the text encoder and the text keys/values (model.get_kv_cache_text, as
    inference.Conditioning calls it) and its CFG batches (engine.SpeechEngine._conditioning); the
    speaker's keys/values are cached per voice (a 10 s voice, prepared before the job)."""
    import inference as inf
    from batched_steps import zero_kv

    model = full_model()
    ids = torch.zeros(1, tokens, dtype=torch.int32, device="meta")
    mask = torch.ones(1, tokens, dtype=torch.bool, device="meta")
    speaker_kv = zero_kv(model, 1, VOICE_PATCHES, torch.empty(0, dtype=torch.bfloat16, device="meta"))
    speaker_mask = torch.ones(1, 4 * VOICE_PATCHES, dtype=torch.bool, device="meta")
    settings = inf.SamplerSettings(0, 3.0, 8.0, *CFG)

    def admit():
        cond = inf.Conditioning(model, None, speaker_mask, ids, mask, settings, kv_speaker=speaker_kv)
        cond.batch((inf.COND, inf.NO_TEXT, inf.NO_SPEAKER), False)
        cond.batch((inf.COND,), False)

    with torch.no_grad():
        return measured(admit)


def count_prefix_extension() -> dict[int, dict]:
    """The latent-prefix keys/values of each finished block but the last (model.LatentPrefix.extend)."""
    from model import LatentPrefix

    model = full_model()
    prefix = LatentPrefix(model, 1, "meta")
    out = {}
    with torch.no_grad():
        for frames, _ in STREAM_BLOCKS[:-1]:
            block = torch.empty(1, frames, 80, device="meta")
            out[frames] = measured(lambda: prefix.extend(block))
    return out


def count_decode(streams: int = 2) -> dict[int, dict]:
    """One block of each of `streams` streams through the streaming Fish decoder (float32), batched as
    engine.decode batches them on a GPU (autoencoder.decode_streams), after the blocks before it,
    plus each stream's latents_to_dac; per block size: {'1': one stream, 'n': all of them}."""
    import inference as inf
    from autoencoder import build_ae, decode_streams

    with torch.device("meta"):
        dac = build_ae().eval()
        pca = inf.PCAState(torch.empty(80, 1024), torch.empty(1024), 1.0)
    out = {}
    with torch.no_grad():
        for n in (1, streams):
            decoders = [dac.streaming_decoder() for _ in range(n)]
            for frames, _ in STREAM_BLOCKS:
                latents = [torch.empty(1, frames, 80, device="meta") for _ in range(n)]
                m = measured(lambda: decode_streams(decoders, [inf.latents_to_dac(pca, z) for z in latents], batch=True))
                out.setdefault(frames, {})[str(n)] = m
    return out


def compiled_launches(codes: Sequence[str]) -> int:
    """Kernel launches per call of the graphs inductor generated (`run_and_get_code`'s sources, one
    per graph): in each wrapper's `call`, its generated kernels (C++ `cpp_fused_*` on the CPU, Triton
    `triton_*.run` on a GPU), extern kernels (matrix products) and aten fallbacks (attention)."""
    launches = 0
    for code in codes:
        body = code[code.index("def call("):] if "def call(" in code else code
        body = body.split("\ndef benchmark_compiled_module")[0]
        kernels = len(re.findall(r"^\s+cpp_fused_\w+\(", body, re.M)) + len(re.findall(r"triton_\w+\.run\(", body))
        launches += (kernels + len(re.findall(r"extern_kernels\.\w+\(", body))
                     + len(re.findall(r"torch\.ops\.\w+\.\w+(?:\.\w+)?\(", body)))
    return launches


def count_compiled_launches() -> dict:
    """What the ECHO_COMPILE stages outside the step graphs launch per call, counted on inductor's CPU
    code (a proxy for its GPU code, whose Triton backend fuses alike but not identically) of
    full-depth models at 1/8 width (launches do not depend on width): the latent-prefix extension
    of each streaming block but the last (engine.CompiledPrefixEncoder), the text encoder at the
    bucket of TEXT_TOKENS (engine.CompiledTextEncoder) and one 32-frame piece of the streaming Fish
    decoder, for one stream and for several (engine.CompiledStreamDecoder). ~5 min on 2 cores."""
    import engine as eng
    import inference as inf
    from autoencoder import build_ae
    from model import EchoDiT, LatentPrefix
    from torch._inductor.utils import run_and_get_code

    def launched(fn, *args) -> int:
        torch._dynamo.reset()
        return compiled_launches(run_and_get_code(fn, *args)[1])

    narrow = {k: v // 8 if k in ("model_size", "intermediate_size", "text_model_size", "text_intermediate_size",
                                 "speaker_model_size", "speaker_intermediate_size", "timestep_embed_size",
                                 "adaln_rank") else v for k, v in inf.ECHO_DIT_CONFIG.items()}
    torch.manual_seed(0)
    model = EchoDiT(**narrow).eval().requires_grad_(False).fuse_projections()
    out: dict = {"prefix": {}}
    with torch.inference_mode():
        prefix = LatentPrefix(model, 1)
        for frames, _ in STREAM_BLOCKS[:-1]:
            block = torch.zeros(1, frames, 80)
            out["prefix"][frames] = launched(torch.compile(model.extend_patches, dynamic=False), block,
                                             prefix._encoder_kv, prefix._complete)
            prefix.extend(block)
        bucket = next(b for b in eng.TEXT_BUCKETS if b >= TEXT_TOKENS)
        out["admission"] = launched(torch.compile(model.get_kv_cache_text, dynamic=False),
                                    torch.zeros(1, bucket, dtype=torch.int32), torch.ones(1, bucket, dtype=torch.bool))
        dac = build_ae(decoder_dim=192, latent_dim=128, quantizer_transformer=dict(dim=128, intermediate_size=384,
                                                                                   head_dim=8)).eval()
        dac.requires_grad_(False).quantizer.post_module.rope_rows(1024)
        out["decode_piece"] = {}
        for streams in (1, 2):
            torch._dynamo.reset()
            decoder = dac.streaming_decoder(streams, compiled=eng.CompiledStreamDecoder(DECODE_PIECE))
            piece = torch.zeros(streams, 128, DECODE_PIECE)
            out["decode_piece"][streams] = compiled_launches(run_and_get_code(lambda: decoder.decode(piece))[1])
    torch._dynamo.reset()
    return out


def fit_decode(counts: dict[int, dict], streams: int = 2) -> dict[int, dict]:
    """Per block size: cost of a batched decode call = base + per stream (ops, flops, touched)."""
    fit = {}
    for frames, c in counts.items():
        one, many = c["1"], c[str(streams)]
        fit[frames] = {k: dict(one=one[k] - (many[k] - one[k]) / (streams - 1), per_stream=(many[k] - one[k]) / (streams - 1))
                       for k in ("ops", "flops", "touched", "copied")}
    return fit


def tiny_engine():
    import json as _json

    import inference as inf
    from autoencoder import build_ae
    from model import EchoDiT
    from voices import SpeakerCache

    ref = ROOT / "tests" / "reference"
    model = EchoDiT(**_json.loads((ref / "tiny_echo_dit_config.json").read_text())).eval()
    dac = build_ae(**_json.loads((ref / "tiny_fish_dac_config.json").read_text())).eval()
    latent_dim = _json.loads((ref / "tiny_fish_dac_config.json").read_text()).get("latent_dim", 1024)
    torch.manual_seed(0)
    pca = inf.PCAState(torch.randn(80, latent_dim) * 0.01, torch.zeros(latent_dim), 1.0)
    return eng.SpeechEngine(model, dac, pca, SpeakerCache(4))


def count_host_syncs() -> dict:
    """Host syncs per block of one stream (the tiny model through the real engine.job_steps and its
    step runner): Tensor.item, .tolist, .cpu, .numpy and bool() of a tensor, counted by patching them;
    and the eager ops the job's own code (sampler, prefix, decode glue) runs per diffusion step."""
    import exact_batching as eb
    import inference as inf

    engine = tiny_engine()
    shape = eng.BlockShape(tuple(f for f, _ in STREAM_BLOCKS), tuple(s for _, s in STREAM_BLOCKS))
    job = eng.SpeechJob(("[S1] " + "Echo is a diffusion text to speech model. " * 3,), None, 0, shape, shape,
                        inf.SamplerSettings(0, 3.0, 8.0, *CFG), eng.EarlyStop(enabled=False))
    counts = {"item": 0, "tolist": 0, "cpu": 0, "numpy": 0, "__bool__": 0}
    originals = {name: getattr(torch.Tensor, name) for name in counts}

    def counting(name):
        def patched(self, *a, **k):
            counts[name] += 1
            return originals[name](self, *a, **k)
        return patched

    per_block, job_ops, steps_taken = [], 0, 0
    for name in counts:
        setattr(torch.Tensor, name, counting(name))
    try:
        with torch.inference_mode():
            gen = engine.job_steps(job)
            reply, started = None, False
            while True:
                with eb.Counter() as c:
                    try:
                        item = gen.send(reply) if started else next(gen)
                    except StopIteration:
                        break
                started = True
                job_ops += c.ops
                if isinstance(item, ModelCall):
                    steps_taken += 1
                    reply = engine.steps([item])[0]
                elif isinstance(item, eng.DecodeCall):
                    reply = engine.decode([item])[0]
                elif type(item).__name__ == "TextCall":  # a newer engine's batched admission
                    reply = engine.encode_texts([item])[0]
                else:
                    per_block.append(sum(counts.values()))
                    reply = None
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)
    blocks = [b - a for a, b in zip([0] + per_block, per_block)]
    return dict(by_kind=counts, per_block=blocks, job_ops_per_step=job_ops / max(steps_taken, 1))



# Fitted once from the meta counts above (`--proxy` recounts them; tests/test_simulation.py checks a
# few against a fresh count). Linear in a pass's generations, token rows (rows x frames) and
# row-token-keys (attention); "touched" is the bytes every eager op reads and writes.
PROXY_FIT = {
    # refit 2026-12-06 (fourth session) with the AdaLN table by time (model.timed_modulations): the
    # padded 64-row conditioning products are gone from every step (was 4951 + 552 ops / generation,
    # 2.16e10 FLOPs and 1.34e9 bytes touched per pass; before that 4759 + 768)
    "exact": {"flops": {"one": 0.0, "tokens": 2.74373e9, "attn": 196608.0},
              "touched": {"one": 5.23658e8, "tokens": 1.98691e7, "rowkeys": 5.21426e6, "attn": 13768.2},
              # 3271, then 3248 with one unbind for the 24 blocks, 3152 with 1 + scale and tanh(gate) in the
              # table, 2816 with the projections fused (q|k|v|gate, w1|w3: model.Projections; 2026-12-06)
              "ops": {"one": 2816.0, "gens": 553.0, "single": -38.4}},
    "padded": {"flops": {"one": 2.1609e10, "tokens": 2.74373e9, "attn": 196608.0},
               "touched": {"one": 1.3820e9, "tokens": 1.97330e7, "rowkeys": 6.09528e6, "attn": 12910.1},
               "ops": {"one": 4904.0, "gens": 1208.0, "single": -525.4}},
    # the static runner as measured on 2026-11-22 (the calibration's): with today's AdaLN table a fresh
    # count gives 3824 + 6 ops / generation (outside the blocks 52.8 + 7.3) and no conditioning FLOPs
    "static": {"flops": {"one": 2.1609e10, "tokens": 2.74373e9, "attn": 196608.0},
               "touched": {"one": 4.4636e7, "tokens": 4.97479e7, "rowkeys": 3.58828e6, "attn": 5795.1},
               "ops": {"one": 5502.0, "gens": 5.0, "single": -16.4}, "outside_ops": {"one": 50.8, "gens": 6.3},
               # a new batch (members or CFG phase changed): the first call's counts less the reused batch's
               "restack_ops": {"one": 152.0, "gens": 455.0, "single": -149.0},
               "restack_touched": {"one": 1.33837e8, "padded_rows": 6.71352e8, "tokens": 3.04724e5,
                                   "gens": -1.57377e8}},
    # one job's admission at TEXT_TOKENS and NONSTREAM_TOKENS text tokens
    "admission": {TEXT_TOKENS: {"ops": 2557, "flops": 1.50724e11, "touched": 2.96503e9},
                  NONSTREAM_TOKENS: {"ops": 2557, "flops": 4.12818e11, "touched": 7.26398e9}},
    # the latent prefix of a finished block of this many frames
    "prefix": {32: {"ops": 2940, "flops": 6.72203e9, "touched": 9.43242e8},
               128: {"ops": 2996, "flops": 2.69615e10, "touched": 1.27734e9}},
    # a batched decode call: ops = one + streams x per_stream; FLOPs and bytes per stream's block
    "decode": {32: {"one_ops": 1077, "ops": 200, "flops": 2.16537e11, "touched": 7.63317e9},
               128: {"one_ops": 1053, "ops": 220, "flops": 8.66540e11, "touched": 2.94847e10},
               480: {"one_ops": 1053, "ops": 220, "flops": 3.25642e12, "touched": 1.11293e11}},
    "weight_bytes": 3.83714e9,  # the decoder's weights (blocks, projections, conditioning) in bf16
    "job_ops_per_step": 37.4,  # eager ops of a job's own code per diffusion step (sampler; tiny model, engine.job_steps)
}
# ECHO_COMPILE's stages outside the step graphs: kernel launches per call (count_compiled_launches: inductor's
# CPU code of full-depth models at 1/8 width, 2026-12-06), against the eager ops above (prefix 2,940 and 2,996,
# admission 2,557, a 32-frame decode 1,077 + 200 a stream); the single stream's decoder pieces replay a CUDA graph
COMPILED_LAUNCHES = {"prefix": {32: 190, 128: 191}, "admission": 166, "decode_piece": {1: 165, 2: 165}}
COMPILED_STAGES = frozenset({"admission", "prefix", "decode"})
# eager ops around a compiled decoder piece (engine.CompiledStreamDecoder): its input's clone; replayed as a CUDA
# graph (a lone stream), also the stream's 37 state tensors and its audio cloned out of the graph's memory
DECODE_PIECE_HOST_OPS = {"compiled": 1, "replayed": 39}
DECODE_PIECE = 32  # frames of a compiled decoder piece (the default preset's first block: runtime._stream_decoder)
GRAPH_REPLAYS_PER_PASS = 24  # CompiledBlocks: one graph (replay) per decoder block
# StaticSteps since 2026-12-06 ('pooled'): one graph per pass; outside it (count_runner('static')["outside_ops"],
# counted 2026-12-06: 11, 14, 26 at 1, 4, 16 generations); a bucket's masks and row indices rebuilt when its members
# change; a new row of conditioning (a generation's text and speaker keys once, its prefix once per block; its CFG
# rows and phases share them) stacked and copied into its kind's pool: 56 eager ops when a guided step brings it
# (a view of each layer's keys taken), 8 when an unguided one does (counted on the meta device, 2026-12-06)
POOLED_OUTSIDE_OPS = {"one": 10.0, "gens": 1.0}
POOLED_LANE_OPS = {"one": 10.0, "gens": 8.0}
POOLED_WRITE_OPS = 56.0
POOLED_SPEAKER_BUCKETS = (160, 1600)  # voices up to ~30 s, then up to 5 min
POOLED_TEXT_KEYS = 768  # a pass's text keys (every text padded to MAX_TEXT_LENGTH)
KV_BYTES_PER_ROWKEY = 24 * 2 * 2048 * 2  # layers x (key, value) x H*D x bf16
ACTIVATION_BYTES_PER_TOKEN = 24 * 8 * 2048 * 2  # a fused layer reads/writes ~8 activations of H*D per token
GAP_TOLERANCE = 0.01  # s, as bench_server: an arrival later than this after the audio ran out is a gap


# =====================================================================================================
# The cost model
# =====================================================================================================


@dataclass(frozen=True)
class Constants:
    """What the cost model does not count: the achieved fractions of the data sheet and overheads."""

    eta_eager: float  # achieved fraction of peak FLOP/s, eager kernels (bf16 steps; TF32 for the decoder)
    eta_compiled: float  # the same for the compiled decoder blocks
    op_overhead: float  # s per eager op (launch, dispatcher, Python)
    replay_overhead: float  # s per CUDA-graph replay
    request_overhead: float  # s per request outside the worker (HTTP, tokenising), eager config: added to TTFB
    request_overhead_graphs: float = 0.0  # the same with compile + CUDA graphs (fitted separately: see calibrate)
    gen_overhead: float = 0.0  # s per job per runner call: Python per generation the op count does not see
    bandwidth_fraction: float = BANDWIDTH_FRACTION

    def overhead(self, config: str) -> float:
        return self.request_overhead_graphs if config == "graphs" else self.request_overhead


def _lin(fit: dict, feats: dict) -> float:
    return sum(coef * (1.0 if name == "one" else feats.get(name, 0.0)) for name, coef in fit.items()
               if name != "max_rel_error")


@dataclass(frozen=True)
class Work:
    """One call's counts: eager ops, graph replays, FLOPs (and at which peak), bytes."""

    ops: float
    flops: float
    bytes: float
    replays: float = 0.0
    compiled: bool = False
    tf32: bool = False

    def seconds(self, k: Constants) -> float:
        peak = H100["tf32"] if self.tf32 else H100["bf16"]
        rate = peak * (k.eta_compiled if self.compiled else k.eta_eager)
        return (max(self.bytes / (H100["bandwidth"] * k.bandwidth_fraction), self.flops / rate)
                + self.ops * k.op_overhead + self.replays * k.replay_overhead)


def step_work(runner: str, gens: Sequence[tuple[int, int, int, int, int]], max_rows: int = 48) -> list[Work]:
    """The passes one runner call makes for these generations (frames, rows, prefix patches, text
    tokens, speaker patches): 'exact' one pass per frame count; 'padded' one pass padded to the
    longest frames and keys (a10f983); 'static' one pass per frame bucket and pack of at most
    max_rows rows, rows padded to a row bucket, keys to the 2026-11-22 static shapes (S + 2528), a
    graph replay per block; 'pooled' (StaticSteps since 2026-12-06) the same passes with speaker keys
    bucketed (S + 928 + 160 for voices up to ~30 s) and one graph replay per pass."""
    fit = PROXY_FIT["static" if runner == "pooled" else runner]
    job_ops = PROXY_FIT["job_ops_per_step"] * len(gens)
    if runner == "padded":
        groups = [list(gens)]
    else:
        by: dict[int, list] = {}
        for g in gens:
            by.setdefault(_frame_bucket(g[0]) if runner in ("static", "pooled") else g[0], []).append(g)
        groups = list(by.values())
    out = []
    for group in groups:
        if runner == "exact":
            out.append(_pass_work(fit, group, max(g[0] for g in group), None, job_ops * len(group) / len(gens)))
        elif runner == "padded":
            pads = [max(g[i] for g in group) for i in (2, 3, 4)]
            frames = max(g[0] for g in group)
            out.append(_pass_work(fit, [(frames, g[1], *pads) for g in group], frames, None, job_ops))
        else:
            frames = _frame_bucket(group[0][0])
            cap = max_rows if runner == "static" else min(max_rows, max(3, PASS_TOKENS // frames))  # (StaticShapes.rows_at)
            packs, rows = [[]], 0
            for g in group:
                if rows + g[1] > cap:
                    packs.append([])
                    rows = 0
                packs[-1].append(g)
                rows += g[1]
            buckets = row_buckets(max_rows) if runner == "static" else tuple(b for b in row_buckets(max_rows) if b < cap) + (cap,)
            for pack in packs:
                padded_rows = next(b for b in buckets if b >= sum(g[1] for g in pack))
                keys, outside, replays = 2528, fit["outside_ops"], GRAPH_REPLAYS_PER_PASS
                if runner == "pooled":
                    keys, outside, replays = 160 + POOLED_TEXT_KEYS + _speaker_bucket(pack), POOLED_OUTSIDE_OPS, 1
                feats = step_features([(frames, padded_rows, 0, 0, 0)], frames, keys_pad=frames + keys)
                ops = _lin(outside, dict(gens=len(pack))) + job_ops * len(pack) / len(gens)
                out.append(Work(ops=ops, replays=replays, flops=_lin(fit["flops"], feats),
                                bytes=PROXY_FIT["weight_bytes"] + feats["rowkeys"] * KV_BYTES_PER_ROWKEY
                                + feats["tokens"] * ACTIVATION_BYTES_PER_TOKEN, compiled=True))
    return out


def restack_work(pack: Sequence[tuple], max_rows: int) -> Work:
    """A static batch built anew (the 2026-11-22 StaticSteps._batch found other members at its (frame bucket, pack)):
    eager ops and bytes counted on the meta device (`count_runner('static')`: first call less second)."""
    fit, feats = PROXY_FIT["static"], restack_features(pack, max_rows)
    return Work(ops=_lin(fit["restack_ops"], feats), flops=0.0, bytes=_lin(fit["restack_touched"], feats))


def _speaker_bucket(pack: Sequence[tuple]) -> int:
    return next(b for b in POOLED_SPEAKER_BUCKETS if b >= max(g[4] for g in pack))


def pool_write_work(own: int, width: int) -> Work:
    """A new row of conditioning into its kind's pool in StaticSteps: its `own` keys stacked and
    copied in (read and written twice), the rest of the row up to the pool's `width` zeroed."""
    return Work(ops=POOLED_WRITE_OPS, flops=0.0, bytes=(4 * own + width - own) * KV_BYTES_PER_ROWKEY)


def lane_work(pack: Sequence[tuple]) -> Work:
    """A frame bucket's row indices, positions and key mask rebuilt for new members."""
    return Work(ops=_lin(POOLED_LANE_OPS, dict(gens=len(pack))), flops=0.0, bytes=0.0)


def _pass_work(fit: dict, group: Sequence[tuple], frames: int, keys_pad: int | None, job_ops: float) -> Work:
    feats = step_features(group, frames, keys_pad)
    feats["single"] = float(len(group) == 1)
    return Work(ops=_lin(fit["ops"], feats) + job_ops, flops=_lin(fit["flops"], feats),
                bytes=_lin(fit["touched"], feats))


STATIC_FRAMES = (32, 128, 480, 640)


def _frame_bucket(frames: int) -> int:
    return next(b for b in STATIC_FRAMES if b >= frames)


def admission_work(tokens: int, compiled: bool = False) -> Work:
    """Text encoder + text keys/values of one job, linear in tokens: eager ops, or with `compiled`
    (ECHO_COMPILE's text encoder) its kernel launches; FLOPs and bytes as eager (fusion only saves bytes)."""
    a, b = PROXY_FIT["admission"][TEXT_TOKENS], PROXY_FIT["admission"][NONSTREAM_TOKENS]
    w = (tokens - TEXT_TOKENS) / (NONSTREAM_TOKENS - TEXT_TOKENS)
    return Work(ops=COMPILED_LAUNCHES["admission"] if compiled else a["ops"],
                flops=a["flops"] + w * (b["flops"] - a["flops"]),
                bytes=a["touched"] + w * (b["touched"] - a["touched"]))


def prefix_work(frames: int, compiled: bool = False) -> Work:
    """The latent-prefix keys/values of a finished block, scaled by frames from the counts: eager ops,
    or with `compiled` (ECHO_COMPILE's prefix encoder) its kernel launches."""
    key = 32 if frames <= 32 else 128
    base, scale = PROXY_FIT["prefix"][key], frames / key
    ops = COMPILED_LAUNCHES["prefix"][frames] if compiled else base["ops"]  # (counted for the preset's blocks only)
    return Work(ops=ops, flops=base["flops"] * scale, bytes=base["touched"] * scale)


def decode_work(frames: int, streams: int, compiled: bool = False, graphs: bool = False) -> Work:
    """One batched call of the streaming Fish decoder (float32/TF32) for `streams` blocks of `frames`:
    eager ops, or with `compiled` (ECHO_COMPILE's decoder) the launches of its 32-frame pieces (with
    `graphs`, a lone stream's piece is one CUDA-graph replay); leftover frames as eager."""
    key = min(PROXY_FIT["decode"], key=lambda f: abs(f - frames))
    d = PROXY_FIT["decode"][key]
    scale = streams * frames / key
    ops, replays = d["one_ops"] + streams * d["ops"], 0
    if compiled:
        pieces, leftover = divmod(frames, DECODE_PIECE)
        if graphs and streams == 1:
            ops, replays = pieces * DECODE_PIECE_HOST_OPS["replayed"], pieces
        else:
            ops = pieces * (COMPILED_LAUNCHES["decode_piece"][min(streams, 2)] + DECODE_PIECE_HOST_OPS["compiled"])
        ops += (d["one_ops"] + streams * d["ops"]) if leftover else 0
    return Work(ops=ops, replays=replays, flops=d["flops"] * scale, bytes=d["touched"] * scale, tf32=True)



# =====================================================================================================
# The simulation: the real worker, a fake engine, a virtual clock
# =====================================================================================================


@dataclass(frozen=True)
class SimJob:
    """A request: its text tokens and its blocks (frames, diffusion steps)."""

    tokens: int = TEXT_TOKENS
    blocks: tuple[tuple[int, int], ...] = STREAM_BLOCKS
    speaker_patches: int = VOICE_PATCHES


class _Loop:
    """Stands in for the event loop the worker hands audio to (worker._notify): at once, in virtual time."""

    def call_soon_threadsafe(self, fn, *args):
        fn(*args)


@dataclass
class Listener:
    """A stream's client: when each block arrived (virtual time) and how many samples it held."""

    arrived: float
    deliveries: list[tuple[float, int]] = field(default_factory=list)
    done: bool = False
    error: BaseException | None = None
    refused: bool = False

    def put_nowait(self, item) -> None:  # the JobStream's queue
        if isinstance(item, np.ndarray):
            self.deliveries.append((wk.clock(), item.size))
        elif isinstance(item, BaseException):
            self.error, self.done = item, True
        else:
            self.done = True

    def empty(self) -> bool:
        return True

    def ttfb(self, overhead: float) -> float | None:
        return self.deliveries[0][0] - self.arrived + overhead if self.deliveries else None

    def gaps(self) -> tuple[int, float]:
        """Underruns: played back from its first audio in real time, each block that arrives after the
        audio before it ran out (by more than GAP_TOLERANCE) is a gap; playback resumes with it."""
        if not self.deliveries:
            return 0, 0.0
        count, seconds, (start, samples) = 0, 0.0, self.deliveries[0]
        end = start + samples / SAMPLE_RATE
        for at, samples in self.deliveries[1:]:
            if at > end + GAP_TOLERANCE:
                count, seconds, end = count + 1, seconds + at - end, at
            end += samples / SAMPLE_RATE
        return count, seconds


class SimDecoder:
    """A stream's decoder as decode batching sees it: the frames it has decoded so far."""

    def __init__(self):
        self.frames = 0


class Simulation:
    """One run: the real GenerationWorker in virtual time, a fake engine costed by the model."""

    def __init__(self, constants: Constants, config: str = "eager", policy: str = "deadline", max_active: int = 64,
                 max_waiting: int = 1024, decode_cap: int | None = 8192, runner: str | None = None,
                 batched_admission: bool | None = None, compiled_stages: Iterable[str] = ()):
        self.k = constants
        # which of ECHO_COMPILE's admission (text encoder), prefix (encoder) and decode (streaming decoder)
        # stages, built after 2026-11-22, are priced by their kernel launches (COMPILED_LAUNCHES), not eager ops
        self.compiled_stages = frozenset(compiled_stages)
        if not self.compiled_stages <= COMPILED_STAGES:
            raise ValueError(f"compiled stages {sorted(self.compiled_stages - COMPILED_STAGES)}: expected some of "
                             f"{sorted(COMPILED_STAGES)}")
        self.config, self.policy = config, policy
        # today's engine batches admission and prefix extension; the 2026-11-22 (lockstep) one did not
        self.batched_admission = policy == "deadline" if batched_admission is None else batched_admission
        self.now = 0.0
        self.busy = 0.0  # seconds of work done
        self.runner = runner or ("static" if config == "graphs" else "padded" if policy == "lockstep" else "exact")
        self.max_rows = 3 * max_active
        self.decode_cap = decode_cap
        self.engine = SimEngine(self)
        cls = LockstepWorker if policy == "lockstep" else wk.GenerationWorker
        # no thread: the simulation runs its iterations (GenerationWorker._run)
        self.worker = cls(self.engine, max_waiting=max_waiting, max_active=max_active, thread=False)
        self.listeners: list[Listener] = []
        self.units: list[tuple[float, str, int]] = []  # (start, kind, members)

    def spend(self, work: Work | Iterable[Work]) -> None:
        seconds = sum(w.seconds(self.k) for w in ([work] if isinstance(work, Work) else work))
        self.now += seconds
        self.busy += seconds

    def spend_seconds(self, seconds: float) -> None:
        self.now += seconds
        self.busy += seconds

    def clock(self) -> float:
        return self.now

    def submit(self, job: SimJob, at: float) -> Listener:
        listener = Listener(at)
        self.listeners.append(listener)
        try:
            reservation = self.worker.reserve()
        except wk.QueueFull:
            listener.refused = listener.done = True
            return listener
        with reservation._lock:
            reservation._held = False  # submitted (Reservation.submit wants a running asyncio loop)
        ticket = wk._Ticket(job, _Loop(), listener)
        ticket.arrived = at
        self.worker._enqueue(ticket)
        return listener

    def run(self, arrivals: Sequence[tuple[float, SimJob]]) -> list[Listener]:
        """Submit each job at its time and run the worker's iterations (as GenerationWorker._run does)
        until every job has ended; returns the listeners in arrival order."""
        arrivals = sorted(arrivals, key=lambda a: a[0])
        saved, wk.clock = wk.clock, self.clock
        w, active, parked, i = self.worker, [], [], 0
        try:
            while True:
                while i < len(arrivals) and arrivals[i][0] <= self.now:
                    self.submit(arrivals[i][1], arrivals[i][0])
                    i += 1
                if not active and not parked and w._jobs.empty():
                    if i == len(arrivals):
                        break
                    self.now = arrivals[i][0]  # idle until the next request
                    continue
                w._admit(active, parked)
                w.iterate(active, parked)
        finally:
            wk.clock = saved
        failed = [x.error for x in self.listeners if x.error is not None]
        if failed:
            raise RuntimeError(f"{len(failed)} simulated jobs failed") from failed[0]
        return self.listeners


class LockstepWorker(wk.GenerationWorker):
    """The worker as it was measured on 2026-11-22 (commit 8ca4239, engine.GenerationWorker._step):
    every iteration one step for every job waiting on the model (one runner call), then all pending
    decodes; admission between iterations as today."""

    def _step(self, active):
        for kind, compute in ((ModelCall, self.engine.steps), (eng.DecodeCall, self.engine.decode)):
            members = [r for r in active if isinstance(r.pending, kind)]
            if members:
                self._run_together(active, members, compute)


class SimSteps:
    """The engine's step runner: costs the runner call and answers with nothing (the fake job ignores it)."""

    def __init__(self, sim: Simulation):
        self.sim = sim

    def __call__(self, calls: Sequence[ModelCall]) -> list[None]:
        sim = self.sim
        sim.units.append((sim.now, f"step {calls[0].x.shape[1]}", len(calls)))
        sim.spend(step_work(sim.runner, [c.gen for c in calls], sim.max_rows))
        sim.spend_seconds(len(calls) * sim.k.gen_overhead)
        return [None] * len(calls)


class SimStaticSteps(StaticSteps, SimSteps):
    """With static shapes the worker groups steps by frame bucket (GenerationWorker._group_of). As
    the StaticSteps of 2026-11-22 did, it keeps the last batch of each (frame bucket, pack) and pays for a new one
    (restack_work) when the members differ: another job, another block or CFG phase of one."""

    def __init__(self, sim: Simulation):
        SimSteps.__init__(self, sim)
        self.shapes = StaticShapes(STATIC_FRAMES, row_buckets(sim.max_rows), 160, 768, (1600,))
        self._members: dict[tuple[int, int], tuple] = {}
        self._pooled: set = set()  # ('pooled') rows of conditioning in the pool

    def __call__(self, calls: Sequence[ModelCall]) -> list[None]:
        sim, used = self.sim, set()
        by: dict[int, list[ModelCall]] = {}
        for c in calls:
            by.setdefault(_frame_bucket(c.x.shape[1]), []).append(c)
        for frames, group in sorted(by.items()):
            cap = sim.max_rows if sim.runner == "static" else min(sim.max_rows, max(3, PASS_TOKENS // frames))
            packs, rows = [[]], 0  # StaticSteps._packs
            for c in group:
                if rows + c.x.shape[0] > cap:
                    packs.append([])
                    rows = 0
                packs[-1].append(c)
                rows += c.x.shape[0]
            for index, pack in enumerate(packs):
                used.add((frames, index))
                members = tuple(c.member for c in pack)
                if self._members.get((frames, index)) != members:
                    self._members[(frames, index)] = members
                    if sim.runner == "pooled":
                        new = {row: size for c in pack for row, *size in c.pool_rows if row not in self._pooled}
                        sim.spend([pool_write_work(own, width) for own, width in new.values()])
                        self._pooled |= new.keys()
                        sim.spend(lane_work([c.gen for c in pack]))
                    else:
                        sim.spend(restack_work([c.gen for c in pack], sim.max_rows))
        for stale in self._members.keys() - used:
            del self._members[stale]
        return SimSteps.__call__(self, calls)


class SimEngine:
    """engine.SpeechEngine's protocol (job_steps, steps, decode) at the cost model's prices."""

    def __init__(self, sim: Simulation):
        self.sim = sim
        self.steps = SimStaticSteps(sim) if sim.runner in ("static", "pooled") else SimSteps(sim)
        self._audio: dict[int, np.ndarray] = {}

    def job_steps(self, job: SimJob):
        """Admission (text encoder), then per block its diffusion steps (3 rows while guided), its
        decode, its audio; between blocks the latent prefix of the block before. With
        `sim.batched_admission` (today's engine) admission and prefix extension are an
        engine.TextCall and an inference_blockwise.PrefixCall the worker runs as units, batched
        across jobs; without (the 2026-11-22 engine) each job runs them alone, inline."""
        sim = self.sim
        if sim.batched_admission:
            bucket = next(b for b in eng.TEXT_BUCKETS if b >= job.tokens)
            yield eng.TextCall(None, torch.empty(1, bucket, dtype=torch.int32, device="meta"),
                               torch.empty(1, bucket, dtype=torch.bool, device="meta"), job.tokens)
        else:
            sim.spend(admission_work(job.tokens, "admission" in sim.compiled_stages))
        decoder, done, me = SimDecoder(), 0, object()  # (me: this generation, whatever job object it runs)
        phases: dict[tuple[int, int], object] = {}  # (block, rows) -> the conditioning its calls carry
        for index, (frames, steps) in enumerate(job.blocks):
            if index and sim.batched_admission:
                yield PrefixCall(done, torch.empty(1, job.blocks[index - 1][0], 80, device="meta"))
            elif index:
                sim.spend(prefix_work(job.blocks[index - 1][0], "prefix" in sim.compiled_stages))
            for guided in guided_steps(steps):
                rows = 3 if guided else 1
                call = ModelCall(x=torch.empty(rows, frames, 80, device="meta"), t=torch.empty(rows, device="meta"),
                                 start_pos=done, text_mask=torch.empty(rows, job.tokens, dtype=torch.bool, device="meta"),
                                 speaker_mask=torch.empty(rows, 4 * job.speaker_patches, dtype=torch.bool, device="meta"),
                                 kv_text=[], kv_speaker=[])
                call.gen = (frames, rows, math.ceil(done / 4), job.tokens, job.speaker_patches)
                call.member = (phases.setdefault((index, rows), object()), rows, done)
                call.pool_rows = [(("text", me), job.tokens, 768), (("speaker", me), job.speaker_patches,
                                                                    POOLED_SPEAKER_BUCKETS[-1])]
                if done:  # (the first block has no prefix)
                    call.pool_rows.append((("prefix", me, index), math.ceil(done / 4), 160))
                yield call
            yield eng.DecodeCall(decoder, torch.empty(1, 1024, frames, device="meta"))
            if frames not in self._audio:
                self._audio[frames] = np.zeros(frames * FRAME_SAMPLES, np.float32)
            yield self._audio[frames]
            done += frames

    def encode_texts(self, calls: Sequence[eng.TextCall]) -> list[None]:
        """Batched admission (engine.encode_texts): one text-encoder call per bucket length. A batched
        call's FLOPs grow with its rows; its eager ops and its bytes (the encoder's weights dominate)
        are paid once."""
        sim = self.sim
        sim.units.append((sim.now, "text", len(calls)))
        groups: dict[int, list[eng.TextCall]] = {}
        for c in calls:
            groups.setdefault(c.ids.shape[1], []).append(c)
        for bucket, members in groups.items():
            one = admission_work(bucket, "admission" in sim.compiled_stages)
            sim.spend(Work(ops=one.ops, flops=one.flops * len(members), bytes=one.bytes))
        return [None] * len(calls)

    def extend_prefixes(self, calls: Sequence[PrefixCall]) -> list[None]:
        """Batched prefix extension (model.extend_prefixes): the prefixes at the same frame count
        that get blocks of the same length in one encoder call; FLOPs per row, ops and bytes once."""
        sim = self.sim
        sim.units.append((sim.now, "prefix", len(calls)))
        groups: dict[tuple[int, int], int] = {}
        for c in calls:  # here `prefix` is the frames generated so far
            key = (c.prefix, c.latents.shape[1])
            groups[key] = groups.get(key, 0) + 1
        for (_, frames), rows in groups.items():
            one = prefix_work(frames, "prefix" in sim.compiled_stages)
            sim.spend(Work(ops=one.ops, flops=one.flops * rows, bytes=one.bytes))
        return [None] * len(calls)

    def decode(self, calls: Sequence[eng.DecodeCall]) -> list[None]:
        """Batched as autoencoder.decode_streams: streams at the same position with blocks of the same
        length in one call, at most `decode_cap` frames a call."""
        sim = self.sim
        groups: dict[tuple[int, int], list] = {}
        for c in calls:
            groups.setdefault((c.decoder.frames, c.z.shape[-1]), []).append(c)
        sim.units.append((sim.now, "decode", len(calls)))
        for (_, frames), members in groups.items():
            size = max(1, sim.decode_cap // frames) if sim.decode_cap else len(members)
            for start in range(0, len(members), size):
                sim.spend(decode_work(frames, len(members[start:start + size]), "decode" in sim.compiled_stages,
                                      sim.config == "graphs"))
        for c in calls:
            c.decoder.frames += c.z.shape[-1]
        return [None] * len(calls)


# ---- scenarios --------------------------------------------------------------------------------------


def summarise(listeners: Sequence[Listener], overhead: float) -> dict:
    served = [x for x in listeners if x.deliveries]
    ttfb = [x.ttfb(overhead) for x in served]
    gaps = [x.gaps() for x in served]
    return dict(streams=len(listeners), refused=sum(x.refused for x in listeners),
                ttfb_p50_ms=1e3 * percentile(ttfb, .5, "linear"), ttfb_p95_ms=1e3 * percentile(ttfb, .95, "linear"),
                underruns_per_stream=float(np.mean([g[0] for g in gaps])) if gaps else 0.0,
                gap_s_per_stream=float(np.mean([g[1] for g in gaps])) if gaps else 0.0,
                streams_with_underruns=sum(g[0] > 0 for g in gaps))


def burst(constants: Constants, n: int, config: str = "eager", policy: str = "deadline", job: SimJob = SimJob(),
          **options) -> dict:
    """n streams submitted at once."""
    sim = Simulation(constants, config, policy, **options)
    listeners = sim.run([(0.0, job)] * n)
    audio = sum(s for x in listeners for _, s in x.deliveries) / SAMPLE_RATE
    return summarise(listeners, constants.overhead(config)) | dict(clients=n, wall_s=sim.now,
                                                                   audio_s_per_wall_s=audio / max(sim.now, 1e-9))


def nonstream(constants: Constants, steps: int, config: str = "eager", **options) -> float:
    """Seconds to the end of one 640-frame, `steps`-step generation (30 s non-streaming), request overhead included."""
    sim = Simulation(constants, config, "lockstep", **options)
    listener = sim.run([(0.0, SimJob(NONSTREAM_TOKENS, ((640, steps),)))])[0]
    return listener.deliveries[-1][0] - listener.arrived + constants.overhead(config)


def poisson(constants: Constants, rate: float, duration: float = 120.0, seed: int = 0, config: str = "eager",
            policy: str = "deadline", **options) -> dict:
    """30 s utterances arriving as a Poisson process for `duration` seconds (then drained)."""
    sim = Simulation(constants, config, policy, **options)
    times = poisson_arrivals(rate, duration, seed)
    listeners = sim.run([(t, SimJob()) for t in times])
    audio = sum(s for x in listeners for _, s in x.deliveries) / SAMPLE_RATE
    return summarise(listeners, constants.overhead(config)) | dict(
        rate=rate, mean_concurrent=audio / max(sim.now, 1e-9), utilisation=sim.busy / max(sim.now, 1e-9))


def realtime_streams(constants: Constants, config: str = "eager", policy: str = "deadline", limit: int = 256,
                     **options) -> int:
    """The largest burst (streams at once) with no underruns (assumed monotonic: doubling, then bisection)."""
    ok = lambda n: burst(constants, n, config, policy, **options)["underruns_per_stream"] == 0  # noqa: E731
    if not ok(1):
        return 0
    lo, hi = 1, 2
    while hi <= limit and ok(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo



# =====================================================================================================
# Calibration: constants fitted to the single-stream measurements, then the table checked
# =====================================================================================================


def fit_targets_simulated(k: Constants, config: str) -> dict:
    """The fit's targets as the simulation gives them (lockstep, the runs' set-up): TTFB at 1 stream,
    30 s non-streaming at 20 and 30 steps, and (eager) the wall time of 64 streams at once."""
    setup = RUN_SETUP[config]
    out = {"ttfb_1": burst(k, 1, config, "lockstep", **setup)["ttfb_p50_ms"] / 1e3,
           "nonstream_20": nonstream(k, 20, config, **setup), "nonstream_30": nonstream(k, 30, config, **setup)}
    if config == "eager":
        out["wall_64"] = burst(k, 64, config, "lockstep", **setup)["wall_s"]
    return out


def fit_targets_measured(config: str) -> dict:
    m = MEASURED[config]
    out = {"ttfb_1": m["ttfb_p50_ms"][1] / 1e3, "nonstream_20": m["nonstream_s"][20], "nonstream_30": m["nonstream_s"][30]}
    if config == "eager":
        out["wall_64"] = 64 * STREAM_SECONDS / SATURATED_THROUGHPUT
    return out


def _linear_fit(make: Callable[..., Constants], config: str, n: int) -> tuple[list[float], float]:
    """Least squares (relative, non-negative by clipping) for n constants the targets are linear in,
    the others given: each target is base + sum_i x_i d_i, read off n + 1 simulations."""
    targets = fit_targets_measured(config)
    base = fit_targets_simulated(make(*[0.0] * n), config)
    cols = []
    for i in range(n):
        unit = [0.0] * n
        unit[i] = 1e-3
        sim = fit_targets_simulated(make(*unit), config)
        cols.append([(sim[t] - base[t]) / 1e-3 / targets[t] for t in targets])
    a = np.array(cols).T
    b = np.array([(targets[t] - base[t]) / targets[t] for t in targets])
    x, *_ = np.linalg.lstsq(a, b, rcond=None)
    x = np.clip(x, 0.0, None)
    return [float(v) for v in x], float(np.sqrt(np.mean((a @ x - b) ** 2)))


def calibrate() -> Constants:
    """Fit the constants, each once, to numbers the calibration table does not check:
    1. eager: achieved FLOP fraction (grid search), per-op overhead, request overhead and per-job
       overhead of a runner call (least squares) to the eager single-stream numbers (TTFB at 1
       stream, 30 s non-streaming at 20 and 30 steps) and the saturated eager throughput (64 streams
       at once: wall time from audio seconds per wall second, a row outside the checked 1/4/16/24);
    2. compile + CUDA graphs: its FLOP fraction, per-replay overhead and request overhead to its
       single-stream numbers, with the eager per-op and per-job overheads (same machine, same CPU)."""
    best = None
    for eta in np.arange(0.05, 0.96, 0.01):
        (op, req, gen), err = _linear_fit(lambda x, y, z, eta=eta: Constants(eta, 0.5, x, 0.0, y, 0.0, z), "eager", 3)
        if best is None or err < best[0]:
            best = (err, round(float(eta), 2), op, req, gen)
    _, eta_e, op, req, gen = best
    best = None
    for eta in np.arange(0.05, 0.96, 0.01):
        (replay, req_g), err = _linear_fit(lambda x, y, eta=eta: Constants(eta_e, eta, op, x, req, y, gen), "graphs", 2)
        if best is None or err < best[0]:
            best = (err, round(float(eta), 2), replay, req_g)
    return Constants(eta_e, best[1], op, best[2], req, best[3], gen)


# the result of calibrate() (`--calibrate --refit` recomputes it; tests/test_simulation.py checks it is the fit)
CONSTANTS = Constants(eta_eager=0.21, eta_compiled=0.31, op_overhead=1.12654e-05, replay_overhead=1.65201e-05,
                      request_overhead=0.0, request_overhead_graphs=0.0559332, gen_overhead=0.0)


def calibration_table(k: Constants) -> list[dict]:
    rows = []
    for config, m in MEASURED.items():
        setup = RUN_SETUP[config]
        for n, p50 in m["ttfb_p50_ms"].items():
            r = burst(k, n, config, "lockstep", **setup)
            rows.append(dict(config=config, what=f"TTFB p50, {n} streams", measured=p50, simulated=r["ttfb_p50_ms"],
                             fitted=n == 1))
            rows.append(dict(config=config, what=f"TTFB p95, {n} streams", measured=m["ttfb_p95_ms"][n],
                             simulated=r["ttfb_p95_ms"], fitted=n == 1))
        for steps, seconds in m["nonstream_s"].items():
            rows.append(dict(config=config, what=f"30 s non-streaming, {steps} steps (ms)", measured=1e3 * seconds,
                             simulated=1e3 * nonstream(k, steps, config, **setup), fitted=True))
    for r in rows:
        r["error"] = r["simulated"] / r["measured"] - 1
    return rows



# =====================================================================================================
# Command line
# =====================================================================================================


def proxy_metrics() -> dict:
    """Every stage's counts, full size on the meta device (and host syncs with the tiny model)."""
    import exact_batching as eb

    out = {"step": {}}
    for kind in ("exact", "padded", "static"):
        counts = count_tree(str(padded_tree())) if kind == "padded" else count_runner(kind, FIT_MIXES)
        out["step"][kind] = dict(counts=counts, fit=fit_step_costs(kind, counts))
    out["admission"] = {t: count_admission(t) for t in (TEXT_TOKENS, NONSTREAM_TOKENS)}
    out["prefix_extension"] = count_prefix_extension()
    out["decode"] = count_decode()
    out["host_syncs"] = count_host_syncs()
    with torch.no_grad():
        after = {name: eb.meta_metrics(mix, split) for name, (mix, split) in eb.MIXES.items()}
    out["useful_flops_after"] = {name: m["useful"] for name, m in after.items()}
    return out


def print_proxy(p: dict) -> None:
    print("stage (full size, meta device) | eager ops | GFLOP | GB touched | GB copied")
    print("---|---|---|---|---")
    for kind in ("padded", "exact", "static"):
        for mix, c in zip(FIT_MIXES, p["step"][kind]["counts"]):
            f, r = mix[0][0], len(mix)
            print(f"step, {kind} runner, {r} x ({f} frames, {mix[0][1]} rows) | {c['ops']:,} | {c['flops'] / 1e9:,.0f} | "
                  f"{c['touched'] / 1e9:.1f} | {c['copied'] / 1e9:.2f}")
    for t, c in p["admission"].items():
        print(f"admission, {t} text tokens | {c['ops']:,} | {c['flops'] / 1e9:,.0f} | {c['touched'] / 1e9:.1f} | "
              f"{c['copied'] / 1e9:.2f}")
    for f, c in p["prefix_extension"].items():
        print(f"prefix extension after a {f}-frame block | {c['ops']:,} | {c['flops'] / 1e9:,.1f} | "
              f"{c['touched'] / 1e9:.2f} | {c['copied'] / 1e9:.3f}")
    for f, by in p["decode"].items():
        for n, c in by.items():
            print(f"decode, {n} stream(s) x {f} frames (float32) | {c['ops']:,} | {c['flops'] / 1e9:,.0f} | "
                  f"{c['touched'] / 1e9:.1f} | {c['copied'] / 1e9:.2f}")
    print(f"host syncs per block (tiny model, engine.job_steps): {p['host_syncs']}")
    print(f"useful-FLOP fraction after (ExactSteps): {p['useful_flops_after']}")


def fmt_table(rows: list[dict], keys: Sequence[str]) -> str:
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        cells = []
        for k in keys:
            v = r.get(k)
            cells.append(f"{v:.0f}" if isinstance(v, float) and abs(v) >= 10 else f"{v:.2f}" if isinstance(v, float)
                         else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    global POOLED_TEXT_KEYS
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calibrate", action="store_true", help="measured vs simulated (lockstep), side by side")
    parser.add_argument("--refit", action="store_true", help="fit the constants again (else CONSTANTS)")
    parser.add_argument("--burst", help="streams at once, e.g. 1,4,16,24,64")
    parser.add_argument("--poisson", help="arrival rates (requests/s) of 30 s utterances, e.g. 0.5,1,2,3,4")
    parser.add_argument("--duration", type=float, default=120.0, help="seconds of Poisson arrivals")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--policy", choices=("deadline", "lockstep"), default="deadline")
    parser.add_argument("--config", choices=("eager", "graphs"), default="eager")
    parser.add_argument("--max-active", type=int, default=64)
    parser.add_argument("--runner", choices=("exact", "padded", "static", "pooled"),
                        help="the step runner costed (default: static with graphs, else exact; lockstep: padded)")
    parser.add_argument("--realtime", action="store_true", help="also search the largest burst without underruns")
    parser.add_argument("--pooled-text-keys", type=int, default=768,
                        help="what if a pooled pass had this many text keys (text in length buckets)")
    parser.add_argument("--compiled-stages", default="",
                        help="price these of admission,prefix,decode as ECHO_COMPILE runs them (kernel launches)")
    parser.add_argument("--count-compiled", action="store_true",
                        help="count those stages' kernel launches (inductor's CPU code; ~5 min)")
    parser.add_argument("--proxy", action="store_true", help="proxy metrics per stage (meta device; ~1 min)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    POOLED_TEXT_KEYS = args.pooled_text_keys
    k = calibrate() if args.refit else CONSTANTS
    result: dict = {"constants": k.__dict__}
    if args.refit:
        print(f"fitted: {k}")
    if args.count_compiled:
        result["compiled_launches"] = count_compiled_launches()
        print(f"kernel launches per call of the compiled stages: {result['compiled_launches']}")
    if args.proxy:
        result["proxy"] = proxy_metrics()
        print_proxy(result["proxy"])
    if args.calibrate:
        rows = calibration_table(k)
        result["calibration"] = rows
        print(f"\ncalibration (lockstep, as run on 2026-11-22), constants {k}")
        print(fmt_table([dict(r, error=f"{100 * r['error']:+.0f} %", fitted="fit" if r["fitted"] else "predicted")
                         for r in rows], ("config", "what", "measured", "simulated", "error", "fitted")))
    options = dict(max_active=args.max_active, runner=args.runner,
                   compiled_stages=[stage for stage in args.compiled_stages.split(",") if stage])
    if args.burst:
        rows = [burst(k, int(n), args.config, args.policy, **options) for n in args.burst.split(",")]
        result["burst"] = rows
        print(f"\nbursts (predicted; {args.policy}, {args.config}, max_active {args.max_active})")
        print(fmt_table(rows, ("clients", "ttfb_p50_ms", "ttfb_p95_ms", "underruns_per_stream", "gap_s_per_stream",
                               "audio_s_per_wall_s")))
    if args.poisson:
        rows = [poisson(k, float(r), args.duration, args.seed, args.config, args.policy, **options)
                for r in args.poisson.split(",")]
        result["poisson"] = rows
        print(f"\nPoisson arrivals of 30 s utterances for {args.duration:g} s, seed {args.seed} (predicted; "
              f"{args.policy}, {args.config}, max_active {args.max_active})")
        print(fmt_table(rows, ("rate", "streams", "mean_concurrent", "ttfb_p50_ms", "ttfb_p95_ms",
                               "underruns_per_stream", "streams_with_underruns", "utilisation")))
    if args.realtime:
        result["realtime_streams"] = realtime_streams(k, args.config, args.policy, **options)
        print(f"\nreal-time streams (largest burst without underruns, predicted): {result['realtime_streams']}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, default=float))


def _child_main() -> None:
    """--count-tree TREE: count_runner('padded') with model.py etc. imported from TREE (see the top)."""
    print(json.dumps(count_runner("padded", FIT_MIXES)))


if __name__ == "__main__":
    if "--count-tree" in sys.argv:
        _child_main()
    else:
        main()

"""The exact step runner (batched_steps.ExactSteps) before and after 'exact batching without waste'.

    python benchmarks/exact_batching.py                  # before = --before commit, after = this tree
    python benchmarks/exact_batching.py --before HEAD~1 --steps 30

Each side runs in a child process that imports model.py, inference.py and batched_steps.py from
its own tree (the "before" tree is `git archive`d from --before), so one run compares both on the
same machine. Per mix of generations it reports, for one diffusion step of all of them:

- eager aten ops (a TorchDispatchMode counts every op that reaches the dispatcher, views included;
  under no_grad, so composite ops such as linear are seen as the kernels they run),
- bytes copied (outputs of cat, copy_, pad, repeat, clone, index_put, zero fills),
- useful-FLOP fraction: the FLOPs of each call run alone (`ModelCall.run`, its timestep rows
  unpadded) over the FLOPs the batched step executes (mm/addmm/bmm 2MNK, attention 4 B H Lq Lk D),
- conditioning bytes held: the distinct storage behind the calls' text/speaker/prefix keys/values,
  and the keys/values the runner keeps between steps,

for the full-size model (bf16) on the meta device (no memory, no time), and the wall time of a
step with the tiny reference model (float32, CPU): the first step of a membership and the median
of later ones; and, for the attention alone, the per-generation SDPA loop against FlexAttention and
jagged nested-tensor SDPA (eager, CPU). Mixes: one guided 32-, 128- and 480-frame block each, and 8 generations mixed
(guided and not, frames 32/128/480, each with its own prefix, text and speaker lengths).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
BEFORE = "a10f983"  # the last commit with the padded runner
SOURCES = ("model.py", "inference.py", "batched_steps.py", "autoencoder.py", "checkpoint.py")
TINY_CONFIG = ROOT / "tests" / "reference" / "tiny_echo_dit_config.json"

# (frames, rows, prefix patches, text tokens, speaker patches) per generation: rows 3 while guided
THREE_BLOCKS = [(32, 3, 0, 60, 53), (128, 3, 8, 120, 53), (480, 3, 40, 200, 80)]
EIGHT_MIXED = [(32, 3, 0, 60, 53), (32, 1, 0, 90, 53), (128, 3, 8, 120, 80), (128, 1, 8, 40, 53),
               (128, 3, 8, 150, 0), (480, 3, 40, 200, 53), (480, 1, 40, 110, 80), (32, 3, 0, 75, 53)]
# name -> (generations, whether the runner gets one call per frame count, as worker.py's scheduler calls it)
MIXES = {"32+128+480 guided, one call": (THREE_BLOCKS, False), "8 mixed, one call": (EIGHT_MIXED, False),
         "8 mixed, one call per frame count": (EIGHT_MIXED, True)}


def stepper(steps, calls, split: bool):
    """One diffusion step of all calls: one runner call, or one per frame count."""
    if not split:
        return lambda: steps(calls)
    groups = {}
    for c in calls:
        groups.setdefault(c.x.shape[1], []).append(c)
    return lambda: [steps(group) for group in groups.values()]

aten = torch.ops.aten
COPIES = {aten.cat.default, aten.stack.default, aten.copy_.default, aten.constant_pad_nd.default,
          aten.repeat.default, aten.clone.default, aten.index_put_.default, aten.index_put.default,
          aten.slice_scatter.default, aten.pad.default, aten.new_zeros.default, aten.zeros.default, aten.fill_.Scalar,
          aten.zero_.default}


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def matmul_flops(func, args, out) -> int:
    """FLOPs of a matrix product or attention call; 0 for anything else."""
    if func is aten.linear.default:  # seen only where composite ops reach the mode
        return 2 * args[0].numel() * args[1].shape[0]
    if func in (aten.mm.default, aten.addmm.default):
        a, b = (args[0], args[1]) if func is aten.mm.default else (args[1], args[2])
        return 2 * a.shape[0] * a.shape[1] * b.shape[1]
    if func in (aten.bmm.default, aten.baddbmm.default):
        a, b = (args[0], args[1]) if func is aten.bmm.default else (args[1], args[2])
        return 2 * a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]
    if "scaled_dot_product" in func.__name__:
        q, k = args[0], args[1]  # (B, H, Lq, D), (B, H, Lk, D)
        return 4 * q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] * q.shape[3]
    return 0


class Counter(TorchDispatchMode):
    """Counts aten ops, bytes written by copies and matmul/attention FLOPs."""

    def __init__(self):
        super().__init__()
        self.ops = self.copied = self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops += 1
        if func in COPIES:
            self.copied += nbytes(args[0] if func in (aten.copy_.default, aten.fill_.Scalar, aten.zero_.default)
                                  else out)
        elif func is aten.split_with_sizes_copy.default:
            self.copied += sum(nbytes(t) for t in out)
        self.flops += matmul_flops(func, args, out)
        return out


def counted(fn) -> Counter:
    with Counter() as counter:
        fn()
    return counter


def make_calls(model, mix, dtype, device, seed=0):
    """ModelCalls as the samplers make them: per generation, one-row caches repeated per CFG row
    by the tree's inference.repeat_kv, masks with the text (row 2) or speaker (row 3) dropped."""
    import inference as inf

    gen = torch.Generator().manual_seed(seed)
    heads, head_dim = model.blocks[0].attention.num_heads, model.head_dim

    def cache(length):
        kv = torch.randn(1, length, heads, head_dim, generator=gen) if device == "cpu" else None
        make = (lambda: kv.to(dtype)) if kv is not None else (
            lambda: torch.empty(1, length, heads, head_dim, dtype=dtype, device=device))
        return [(make(), make()) for _ in model.blocks]

    calls = []
    for frames, rows, prefix, text, speaker in mix:
        text_mask = torch.ones(rows, text, dtype=torch.bool, device=device)
        speaker_mask = torch.ones(rows, 4 * speaker, dtype=torch.bool, device=device)
        if rows == 3:
            text_mask[1] = False
            speaker_mask[2] = False
        x = (torch.randn(rows, frames, 80, generator=gen) if device == "cpu"
             else torch.empty(rows, frames, 80, device=device)).to(dtype)
        calls.append(inf.ModelCall(
            x=x, t=torch.full((rows,), 0.7, dtype=dtype, device=device), start_pos=4 * prefix,
            text_mask=text_mask, speaker_mask=speaker_mask, kv_text=inf.repeat_kv(cache(text), rows),
            kv_speaker=inf.repeat_kv(cache(speaker), rows),
            kv_latent=inf.repeat_kv(cache(prefix), rows),
            **({"time": 0.7} if "time" in inf.ModelCall.__dataclass_fields__ else {})))  # trees before the AdaLN table lack it
    return calls


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors`."""
    storages = {t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def cache_tensors(calls):
    return [t for c in calls for cache in (c.kv_text, c.kv_speaker, c.kv_latent) if cache is not None
            for pair in cache for t in pair]


def runner_tensors(steps):
    """The keys/values a runner keeps between steps (none for the padded runner)."""
    layouts = getattr(steps, "_layouts", {})
    return [t for layout in layouts.values() for pair in layout.kv for t in pair]


def solo_flops(model, calls) -> int:
    """FLOPs of each call run alone, its timestep-conditioning rows not padded to model.COND_ROWS
    (the padding that keeps those small products exact is counted as executed, not useful)."""
    import model as m

    rows, m.COND_ROWS = m.COND_ROWS, 1
    try:
        return sum(counted(lambda c=c: c.run(model)).flops for c in calls)
    finally:
        m.COND_ROWS = rows


def meta_metrics(mix, split: bool) -> dict:
    """Ops, bytes and FLOPs of one step of the full-size model (bf16, meta device)."""
    import batched_steps as bs
    import inference as inf
    from model import EchoDiT

    with torch.device("meta"):
        model = EchoDiT(**inf.ECHO_DIT_CONFIG).to(torch.bfloat16).eval()
    calls = make_calls(model, mix, torch.bfloat16, "meta")
    steps = bs.ExactSteps(model)
    step = stepper(steps, calls, split)
    with torch.no_grad():  # not inference_mode: the mode would see composite ops, not aten kernels
        first = counted(step)
        later = counted(step)
        solo = solo_flops(model, calls)
    return dict(first_ops=first.ops, ops=later.ops, first_copied=first.copied, copied=later.copied,
                flops=later.flops, exact_flops=solo, useful=solo / later.flops,
                conditioning_bytes=storage_bytes(cache_tensors(calls)),
                kept_bytes=storage_bytes(runner_tensors(steps)))


def tiny_metrics(mix, split: bool, repeat: int) -> dict:
    """Wall time of a step with the tiny reference model on the CPU, and its op count."""
    import batched_steps as bs
    from model import EchoDiT

    torch.manual_seed(0)
    model = EchoDiT(**json.loads(TINY_CONFIG.read_text())).eval()
    calls = make_calls(model, mix, torch.float32, "cpu")
    with torch.inference_mode():  # as the engine runs it
        firsts, laters = [], []
        for _ in range(repeat):
            step = stepper(bs.ExactSteps(model), calls, split)
            start = time.perf_counter()
            step()
            firsts.append(time.perf_counter() - start)
            for _ in range(3):
                start = time.perf_counter()
                step()
                laters.append(time.perf_counter() - start)
    with torch.no_grad():  # a fresh runner: inference tensors cannot be written outside inference_mode
        step = stepper(bs.ExactSteps(model), calls, split)
        step()
        ops = counted(step).ops
    return dict(first_ms=1e3 * statistics.median(firsts), step_ms=1e3 * statistics.median(laters), ops=ops)


def attention_kernels(repeat: int) -> dict:
    """One layer's attention of THREE_BLOCKS at the tiny model's heads (4 x 16), float32, without
    masks: a loop of SDPA calls per generation (what the runner does) against one call of
    FlexAttention (eager; a block mask keeps each row to its own keys) and of SDPA on jagged
    nested tensors. ms per call (median) and the largest difference from the loop."""
    import torch.nn.functional as F
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    gen, heads, dim = torch.Generator().manual_seed(0), 4, 16
    shapes = [(rows, frames, frames + prefix + text + speaker) for frames, rows, prefix, text, speaker in THREE_BLOCKS]
    q, k, v = ([torch.randn(rows, heads, (s if i == 0 else keys), dim, generator=gen) for rows, s, keys in shapes]
               for i in range(3))
    loop = lambda: [F.scaled_dot_product_attention(*qkv) for qkv in zip(q, k, v)]  # noqa: E731
    reference = torch.cat([o.transpose(1, 2).flatten(0, 1) for o in loop()])  # (tokens, H, D)

    def packed(ts):  # (1, H, all rows' tokens, D)
        return torch.cat([t.transpose(1, 2).flatten(0, 1) for t in ts]).transpose(0, 1)[None]

    def owner(ts):  # the row each token belongs to
        return torch.cat([torch.arange(t.shape[0]).repeat_interleave(t.shape[2]) + 10 * i for i, t in enumerate(ts)])

    q_row, k_row = owner(q), owner(k)
    mask = create_block_mask(lambda b, h, i, j: q_row[i] == k_row[j], 1, 1, len(q_row), len(k_row), device="cpu")
    flex = lambda: flex_attention(packed(q), packed(k), packed(v), block_mask=mask)  # noqa: E731

    def jagged(ts):
        rows = [t[r].transpose(0, 1) for t in ts for r in range(t.shape[0])]
        return torch.nested.nested_tensor(rows, layout=torch.jagged).transpose(1, 2)

    nq, nk, nv = jagged(q), jagged(k), jagged(v)
    nested = lambda: F.scaled_dot_product_attention(nq, nk, nv)  # noqa: E731
    outputs = dict(loop=lambda: torch.cat([o.transpose(1, 2).flatten(0, 1) for o in loop()]),
                   flex=lambda: flex()[0].transpose(0, 1),
                   nested=lambda: torch.cat(list(nested().transpose(1, 2).unbind())))
    result = {}
    for name, fn in outputs.items():
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - start)
        result[name] = dict(ms=1e3 * statistics.median(times), max_diff=(out - reference).abs().max().item(),
                            exact=torch.equal(out, reference))
    return result


def measure(repeat: int) -> dict:
    return {name: dict(meta=meta_metrics(mix, split), tiny=tiny_metrics(mix, split, repeat))
            for name, (mix, split) in MIXES.items()}


def run_side(tree: Path, repeat: int, kernels: bool = False) -> dict:
    out = subprocess.run([sys.executable, __file__, "--measure", str(tree), "--steps", str(repeat)]
                         + (["--kernels"] if kernels else []),
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def report(before: dict, after: dict) -> str:
    rows = [("eager ops per step, full size (meta)", "meta", "ops", "{:,.0f}"),
            ("eager ops, first step of a membership", "meta", "first_ops", "{:,.0f}"),
            ("bytes copied per step, full size bf16", "meta", "copied", "{:,.0f}"),
            ("bytes copied, first step of a membership", "meta", "first_copied", "{:,.0f}"),
            ("executed GFLOP per step", "meta", "flops", "{:,.0f}"),
            ("useful-FLOP fraction", "meta", "useful", "{:.3f}"),
            ("conditioning K/V held (bytes)", "meta", "conditioning_bytes", "{:,.0f}"),
            ("K/V kept by the runner between steps (bytes)", "meta", "kept_bytes", "{:,.0f}"),
            ("eager ops per step, tiny model", "tiny", "ops", "{:,.0f}"),
            ("tiny model: later step (ms, median)", "tiny", "step_ms", "{:.2f}"),
            ("tiny model: first step of a membership (ms)", "tiny", "first_ms", "{:.2f}")]
    lines = []
    for mix in MIXES:
        lines += [f"\n{mix}\n", "| metric | before | after | after / before |", "|---|---|---|---|"]
        for label, side, key, fmt in rows:
            b, a = before[mix][side][key], after[mix][side][key]
            if key == "flops":
                b, a = b / 1e9, a / 1e9
            ratio = f"{a / b:.3f}" if b else "-"
            lines.append(f"| {label} | {fmt.format(b)} | {fmt.format(a)} | {ratio} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", default=BEFORE, help="git revision of the 'before' runner")
    parser.add_argument("--steps", type=int, default=5, help="timed repetitions (tiny model)")
    parser.add_argument("--json", type=Path, help="write both sides' numbers here")
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)  # child: measure this tree
    parser.add_argument("--kernels", action="store_true", help=argparse.SUPPRESS)  # child: time attention kernels too
    args = parser.parse_args()
    if args.measure:
        sys.path.insert(0, str(args.measure))
        result = measure(args.steps)
        if args.kernels:
            result["kernels"] = attention_kernels(args.steps)
        print(json.dumps(result))
        return
    with tempfile.TemporaryDirectory() as tmp:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.before, *SOURCES], capture_output=True,
                                 check=True).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        before = run_side(Path(tmp), args.steps)
    after = run_side(ROOT, args.steps, kernels=True)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; before = {args.before}, after = working tree")
    print(report(before, after))
    print("\nattention of 32+128+480 guided, one layer, tiny heads, float32:")
    for name, r in after["kernels"].items():
        print(f"  {name:7s} {r['ms']:9.2f} ms  max |diff| from the loop {r['max_diff']:.2e}  exact: {r['exact']}")
    if args.json:
        args.json.write_text(json.dumps(dict(before=before, after=after), indent=1))


if __name__ == "__main__":
    main()

"""Scale-out on Ray Serve: aggregate audio seconds per wall second with 1 and 2 replicas, on this machine.

Starts `python deploy/ray_serve.py` (a local Ray instance) with ECHO_RAY_REPLICAS=1, then 2, and
`python api_server.py` alone for reference, and drives each with concurrent streaming requests.

    python benchmarks/ray_scaling.py --tiny                       # CPU, the small reference models
    python benchmarks/ray_scaling.py --model-repo DIR --fish-repo DIR --device cuda --gpus-per-replica 1

On the CPU each replica reserves ECHO_RAY_CPUS_PER_REPLICA cores (Ray sets its torch thread count to
that); the lone server uses every core.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import httpx

from bench_server import add_model_arguments, model_env, one_stream
from live_server import ROOT, LiveServer


async def throughput(url: str, clients: int, rounds: int) -> dict:
    """Audio seconds per wall second of `rounds` rounds of `clients` concurrent streams (after one
    warm-up round), and the replicas that answered."""
    async with httpx.AsyncClient(base_url=url, timeout=None) as client:
        await asyncio.gather(*(one_stream(client, seed) for seed in range(clients)))
        audio, started = 0.0, time.perf_counter()
        for round_ in range(rounds):
            results = await asyncio.gather(*(one_stream(client, 1000 * round_ + seed) for seed in range(clients)))
            audio += sum(r.audio for r in results)
        wall = time.perf_counter() - started
        replicas = {(await client.get("/health")).headers.get("x-echo-replica") for _ in range(4 * clients)}
    return {"clients": clients, "audio_s_per_s": round(audio / wall, 3), "wall_s": round(wall, 2),
            "replicas_seen": len(replicas - {None})}


def measure(name: str, env: dict, script: Path, work: Path, clients: list[int], rounds: int) -> list[dict]:
    server = LiveServer(env, work / f"{name}.log", ready_timeout=1800, script=script)
    try:
        rows = [{"setup": name, **asyncio.run(throughput(server.url, n, rounds))} for n in clients]
    finally:
        server.stop(timeout=120)
    for row in rows:
        print(f"{row['setup']:>12} {row['clients']:>7} {row['audio_s_per_s']:>14.2f} {row['replicas_seen']:>8}",
              flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--gpus-per-replica", default="0")
    parser.add_argument("--clients", default="4,8")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="echo-ray-bench-"))
    env = model_env(args, work) | {
        "ECHO_MAX_ACTIVE": "8", "ECHO_MAX_QUEUE": "16", "ECHO_WARMUP": "0", "RAY_USAGE_STATS_ENABLED": "0",
        "ECHO_RAY_DASHBOARD": "0", "ECHO_RAY_GPUS_PER_REPLICA": args.gpus_per_replica}
    clients = [int(n) for n in args.clients.split(",")]
    ray = ROOT / "deploy" / "ray_serve.py"
    print(f"{platform.node()}: {os.cpu_count()} cores, device {args.device}")
    print(f"{'setup':>12} {'clients':>7} {'audio s/wall s':>14} {'replicas':>8}")
    rows = measure("api_server", env, ROOT / "api_server.py", work, clients, args.rounds)
    for replicas in (1, 2):
        rows += measure(f"ray x{replicas}", {**env, "ECHO_RAY_REPLICAS": str(replicas)}, ray, work, clients,
                        args.rounds)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()

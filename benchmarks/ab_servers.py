"""Before and after on one machine in one run: the same streaming clients (bench_server's table:
TTFB, real-time factor, aggregate audio, playback gaps) against the server of two checkouts,
started alternately.

    git worktree add /tmp/before <commit>
    python benchmarks/ab_servers.py --tiny --before /tmp/before --levels 1,8 --rounds 2
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from pathlib import Path

from bench_server import add_model_arguments, concurrency_table, model_env
from live_server import ROOT, LiveServer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--before", required=True, help="a checkout of the code to compare with (git worktree)")
    parser.add_argument("--levels", default="1,8")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="echo-ab-"))
    env = model_env(args, work) | {"ECHO_MAX_ACTIVE": "16", "ECHO_MAX_QUEUE": "16"}
    levels = [int(n) for n in args.levels.split(",")]
    for round_ in range(args.rounds):
        for name, root in (("before", Path(args.before).resolve()), ("after", ROOT)):
            server = LiveServer(env, work / f"{name}-{round_}.log", ready_timeout=1800, cwd=root,
                                script=root / "api_server.py")
            try:
                print(f"== {name}, round {round_ + 1} ({root})", flush=True)
                asyncio.run(concurrency_table(server.url, levels))
            finally:
                server.stop()


if __name__ == "__main__":
    main()

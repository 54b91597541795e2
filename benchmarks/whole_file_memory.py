"""What a whole-file response (stream=false) costs the server in memory.

Starts a server (the reference's tiny models on the CPU, with --tiny) and sends `--clients`
stream=false requests at once: a long text at a slow `speed` in 48 kHz WAV, the largest file a short
request can ask for. Meanwhile it reads the server's resident memory (/proc/<pid>/status VmRSS) every
20 ms, and prints the files' size, the server's memory before, and its peak above that while the
files were made and sent. (The decoder's passing memory is there however the files are held, and the
allocator reuses it: a file's own cost shows with several clients.)

    python benchmarks/whole_file_memory.py --tiny                       # 4 x 4096 characters at speed 0.25
    python benchmarks/whole_file_memory.py --tiny --clients 1 --chars 1000 --speed 1
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

import httpx

from bench_server import add_model_arguments, model_env
from live_server import LiveServer

SENTENCE = "The quick brown fox jumps over the lazy dog, and then it runs far away into the woods. "


def resident_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--chars", type=int, default=4096, help="input characters")
    parser.add_argument("--speed", type=float, default=0.25)
    parser.add_argument("--clients", type=int, default=4, help="requests at once")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="echo-whole-file-"))
    server = LiveServer(model_env(args, work), work / "server.log", ready_timeout=1800)
    try:
        pid = server.process.pid
        before, peak, done = resident_bytes(pid), 0, threading.Event()

        def sample() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, resident_bytes(pid))
                time.sleep(0.02)

        sampler = threading.Thread(target=sample)
        sampler.start()
        text = (SENTENCE * (args.chars // len(SENTENCE) + 1))[:args.chars]
        sizes = [0] * args.clients

        def fetch(client: int) -> None:
            body = {"input": text, "voice": "none", "seed": client, "stream": False, "response_format": "wav",
                    "sample_rate": 48000, "speed": args.speed}
            with httpx.stream("POST", server.url + "/v1/audio/speech", json=body, timeout=3600) as response:
                response.raise_for_status()
                for chunk in response.iter_raw():
                    sizes[client] += len(chunk)

        started = time.perf_counter()
        clients = [threading.Thread(target=fetch, args=(n,)) for n in range(args.clients)]
        for thread in clients:
            thread.start()
        for thread in clients:
            thread.join()
        seconds = time.perf_counter() - started
        done.set()
        sampler.join()
        if not all(sizes):
            raise SystemExit(f"a request failed: sizes {sizes}; log {server.log_path}")
        print(f"{args.clients} x {args.chars} characters at speed {args.speed:g}, 48 kHz WAV: files of "
              f"{sum(sizes) / 2**20:.0f} MiB in all in {seconds:.0f} s; server memory {before / 2**20:.0f} MiB "
              f"before, peak +{(peak - before) / 2**20:.0f} MiB")
    finally:
        server.stop()


if __name__ == "__main__":
    main()

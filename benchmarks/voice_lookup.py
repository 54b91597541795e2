"""What finding a voice costs each request: `VoiceRegistry.resolve` (every speech request) and
`VoiceCatalog.names` (GET /v1/voices) over voice directories of 100 to 2,000 file voices and 20
folder voices, on the CPU, in-process.

    python benchmarks/voice_lookup.py                    # this checkout
    python benchmarks/voice_lookup.py --src /tmp/before  # another checkout (e.g. a git worktree), to compare

Each figure is the median of 20 calls after one unmeasured call (the listing is not cached: each
call lists the directories again, as the server does, so added and removed voices are seen at once).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path


def median_ms(call, repeats: int = 20) -> float:
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def voice_directory(root: Path, files: int, folders: int = 20) -> Path:
    directory = root / f"voices-{files}"
    directory.mkdir()
    for i in range(files):
        (directory / f"voice_{i:05d}.wav").write_bytes(b"RIFF")  # listed by name: never decoded here
    for i in range(folders):
        (directory / f"folder_{i}").mkdir()
        for name in ("a.wav", "b.flac"):
            (directory / f"folder_{i}" / name).write_bytes(b"RIFF")
    return directory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", type=Path, default=Path(__file__).resolve().parents[1], help="the checkout to time")
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 2000])
    args = parser.parse_args()
    sys.path.insert(0, str(args.src))
    from settings import load_settings
    from voice_catalog import VoiceCatalog

    print(f"{args.src}: resolve (per speech request) and names (GET /v1/voices), median ms")
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            directory = voice_directory(Path(tmp), size)
            voices = VoiceCatalog(load_settings(device="cpu", voice_dirs=[directory], upload_dir=Path(tmp) / "up",
                                                voice_aliases={"alloy": "voice_00001", "nova": "folder_3"}))
            resolve = median_ms(lambda: voices.registry.resolve(f"voice_{size // 2:05d}"))
            names = median_ms(voices.names)
            print(f"{size:>6} file voices: resolve {resolve:7.2f} ms   names {names:7.2f} ms")


if __name__ == "__main__":
    main()

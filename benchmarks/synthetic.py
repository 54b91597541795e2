"""Full-size stand-ins for the published checkpoints, written with the reference recipe.

`tests/reference/synth_checkpoint.py` writes one file with the published names, shapes and
dtypes; this lays them out as the two local "Hub repos" the loaders read:

    python benchmarks/synthetic.py OUT_DIR   ->  OUT_DIR/echo-tts-base/{pytorch_model,pca_state}.safetensors
                                                 OUT_DIR/fish-s1-dac-min/pytorch_model.safetensors
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REFERENCE = Path(__file__).resolve().parents[1] / "tests" / "reference"
FILES = {
    ("echo-tts-base", "pytorch_model.safetensors"): "echo_dit_manifest.json",
    ("echo-tts-base", "pca_state.safetensors"): "pca_state_manifest.json",
    ("fish-s1-dac-min", "pytorch_model.safetensors"): "fish_s1_dac_manifest.json",
}


def write_synthetic_repos(out_dir: Path, reference: Path = REFERENCE, only: str | None = None) -> dict[str, Path]:
    """Write the synthetic repos (skipping files already there); returns {repo name: directory}.

    Each file is written by the reference script in its own process, all at once, so their memory
    (several GB for the EchoDiT file) is returned as soon as each is done.
    """
    repos, writers = {}, []
    for (repo, filename), manifest in FILES.items():
        if only is not None and repo != only:
            continue
        target = out_dir / repo / filename
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            partial = target.with_suffix(".partial")
            writers.append((subprocess.Popen([sys.executable, str(reference / "synth_checkpoint.py"),
                                              str(reference / manifest), str(partial)], stdout=subprocess.DEVNULL),
                            partial, target))
        repos[repo] = target.parent
    for process, partial, target in writers:
        if process.wait() != 0:
            raise RuntimeError(f"writing {target} failed (exit status {process.returncode})")
        partial.rename(target)
    return repos


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    for name, path in write_synthetic_repos(Path(sys.argv[1])).items():
        print(f"{name}: {path}")

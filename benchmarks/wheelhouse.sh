#!/usr/bin/env bash
# Wheels for a GPU machine that cannot reach a package index.
#
# The lent GPU machines have Python 3.12 with a CUDA build of torch and many packages (DEVICE_HAS
# below: those of requirements.lock they hold), but not the server's web and audio packages. This
# downloads exactly those (CARRIED: no dependencies resolved, each at its version in
# requirements.lock, the one CI tests) for CPython 3.12 on x86-64 Linux into .whl/ (git-ignored),
# which the device tool carries. benchmarks/gpu_check.py installs them with `pip install --no-index`.
# Every package of requirements.lock is in one of the three lists (tests/test_gpu_check.py checks):
# a new dependency must be carried, or said to be there or not needed.
#
#   bash benchmarks/wheelhouse.sh            # -> .whl/*.whl (about 40 MB)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-.whl}
CARRIED=(
  fastapi starlette annotated-doc opentelemetry-api pydantic pydantic-core pydantic-settings python-dotenv
  annotated-types typing-inspection typing-extensions python-multipart
  uvicorn websockets av soxr soundfile cffi pycparser
)
# on the device's image (the device tool's KINDS.md lists its packages)
DEVICE_HAS=(
  anyio click colorama filelock fsspec h11 hf-xet huggingface-hub idna jinja2 markupsafe mpmath networkx
  numpy packaging prometheus-client pyyaml safetensors setuptools sympy tqdm uvloop
)
# not used by the server the GPU kit starts: uvicorn[standard]'s parsers and reloader (the server
# parses with h11 and never reloads), VAD reroll (off in the kit), and the HTTP client of this
# lock's huggingface_hub (the device's own huggingface_hub brings its own)
NOT_NEEDED=(httptools watchfiles silero-vad httpx2 httpcore2 httpx2-jsfetch truststore)
if [[ ${1:-} == --lists ]]; then  # (for the test: the three lists, one per line)
  echo "${CARRIED[*]}"; echo "${DEVICE_HAS[*]}"; echo "${NOT_NEEDED[*]}"
  exit 0
fi
# each one's pin in requirements.lock, for the device's Python (a line's marker, if any, must hold there)
mapfile -t PINS < <(python3 - "${CARRIED[@]}" <<'PY'
import re, sys
from pip._vendor.packaging.markers import Marker
device = {"python_full_version": "3.12.3", "python_version": "3.12", "sys_platform": "linux",
          "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython"}
pins = {}
for line in open("requirements.lock"):
    m = re.match(r"([A-Za-z0-9_.-]+)==([^ ;]+)\s*(?:;(.*))?$", line.strip())
    if m and (m[3] is None or Marker(m[3]).evaluate(device)):
        pins[m[1].lower()] = f"{m[1]}=={m[2]}"
missing = [name for name in sys.argv[1:] if name.lower() not in pins]
if missing:
    sys.exit(f"not in requirements.lock for Python 3.12: {missing}")
print("\n".join(pins[name.lower()] for name in sys.argv[1:]))
PY
)
[[ ${#PINS[@]} -eq ${#CARRIED[@]} ]] || exit 1
PLATFORMS=()
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_17 manylinux2014 manylinux1 manylinux_2_34 manylinux_2_31; do
  PLATFORMS+=(--platform "${tag}_x86_64")
done
mkdir -p "$OUT"
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${PLATFORMS[@]}" -d "$OUT" "${PINS[@]}"
ls "$OUT"
du -sh "$OUT"

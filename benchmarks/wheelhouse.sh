#!/usr/bin/env bash
# Wheels for a GPU machine that cannot reach a package index.
#
# The lent GPU machines have Python 3.12 with a CUDA build of torch, numpy, safetensors,
# huggingface_hub, httpx, anyio, h11, click, prometheus-client and pytest, but not the server's web
# and audio packages. This downloads exactly those (no dependencies resolved: each is named, at the
# version CI tests) for CPython 3.12 on x86-64 Linux into .whl/ (git-ignored), which the device tool
# carries. benchmarks/gpu_check.py installs them with `pip install --no-index`.
#
#   bash benchmarks/wheelhouse.sh            # -> .whl/*.whl (about 45 MB)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-.whl}
PACKAGES=(
  fastapi==0.165.0 starlette==1.10.0 annotated-doc==0.0.7 opentelemetry-api==1.45.2
  pydantic==2.13.4 pydantic-core==2.46.4 pydantic-settings==2.14.1 python-dotenv==1.2.2
  annotated-types==0.7.0 typing-inspection==0.4.2 typing-extensions==4.16.0
  uvicorn==0.54.0 av==18.1.0 soxr==1.1.0 soundfile==0.14.0 cffi==2.0.0 pycparser==3.0
)
PLATFORMS=()
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_17 manylinux2014 manylinux1 manylinux_2_34 manylinux_2_31; do
  PLATFORMS+=(--platform "${tag}_x86_64")
done
mkdir -p "$OUT"
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${PLATFORMS[@]}" -d "$OUT" "${PACKAGES[@]}"
ls "$OUT"
du -sh "$OUT"

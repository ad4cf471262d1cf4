#!/usr/bin/env bash
# One call on a fresh GPU machine measures everything (benchmarks/gpu_check.py says what):
#   bash benchmarks/gpu_check.sh OUT                # on the GPU machine: OUT/summary.json + PNGs + logs
#   bash benchmarks/gpu_check.sh --device cpu OUT   # the same steps, small, here (about 6 minutes)
# On the device tool's H200 image (python 3.12 with torch, transformers, safetensors, ...), the
# packages it lacks travel as wheels in .whl/ (fill it once here: bash benchmarks/gpu_wheels.sh;
# about 10 MiB), and the call names .whl in `carry`:
#   run(command="bash benchmarks/gpu_check.sh $OUT", carry=[".whl"], timeout_s=540)
set -u
DEVICE=cuda
if [ "${1:-}" = "--device" ]; then DEVICE=$2; shift 2; fi
OUT_DIR=${1:-${OUT:-gpu-check-out}}
cd "$(dirname "$0")/.."
PY=python3
if [ "$DEVICE" = cpu ] && [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
export PYTHONPATH=$PWD
if [ "$DEVICE" = cuda ] && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PWD:/tmp/site
fi
if [ "$DEVICE" = cuda ]; then nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true; fi
exec $PY benchmarks/gpu_check.py --device "$DEVICE" --out "$OUT_DIR"

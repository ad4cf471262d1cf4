#!/usr/bin/env bash
# One call on a fresh GPU machine measures everything (benchmarks/gpu_check.py says what):
#   bash benchmarks/gpu_check.sh OUT                # on the GPU machine: OUT/summary.json + PNGs + logs
#   bash benchmarks/gpu_check.sh --device cpu OUT   # the same steps, small, here (.venv's python)
# The device tool's image (python 3.12, torch 2.11, transformers 5.17: KINDS.md) lacks pydantic,
# mistral-common and the rest: they travel as wheels in .whl/ (fill it here once:
# bash benchmarks/gpu_wheels.sh) and are installed as the box installs them, --no-index --no-deps.
# Rehearse here first (bash benchmarks/gpu_rehearsal.sh: the box's environment on this CPU), then:
#   run(command="bash benchmarks/gpu_check.sh $OUT", carry=[".whl"], timeout_s=540)
# GPU_CHECK_PYTHON names the python to use (the rehearsal's copy of the box's).
set -u
DEVICE=cuda
if [ "${1:-}" = "--device" ]; then DEVICE=$2; shift 2; fi
OUT_DIR=${1:-${OUT:-gpu-check-out}}
[ $# -gt 0 ] && shift
cd "$(dirname "$0")/.."
mkdir -p "$OUT_DIR"
PY=${GPU_CHECK_PYTHON:-python3}
if [ "$DEVICE" = cpu ] && [ -z "${GPU_CHECK_PYTHON:-}" ] && [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
export PYTHONPATH=$PWD
if [ "$PY" != .venv/bin/python ]; then
  # the box's python: raymix's own dependencies come from the carried wheels, and nowhere else
  if ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "gpu_check: no wheels in .whl/: fill it here with bash benchmarks/gpu_wheels.sh and name .whl in carry" \
      | tee "$OUT_DIR/error.txt"
    exit 2
  fi
  SITE=${GPU_CHECK_SITE:-/tmp/site}
  if ! $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
      >"$OUT_DIR/wheels.log" 2>&1; then
    echo "gpu_check: installing .whl/ failed: $(tail -1 "$OUT_DIR/wheels.log")" | tee "$OUT_DIR/error.txt"
    exit 2
  fi
  export PYTHONPATH=$PWD:$SITE
  echo "gpu_check: $(ls .whl/*.whl | wc -l) wheels ($(du -sh .whl | cut -f1)) installed in $SITE"
fi
if [ "$DEVICE" = cuda ]; then nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true; fi
exec $PY benchmarks/gpu_check.py --device "$DEVICE" --out "$OUT_DIR" "$@"

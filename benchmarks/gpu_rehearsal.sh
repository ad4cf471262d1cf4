#!/usr/bin/env bash
# The GPU call's dress rehearsal, on this CPU machine: the device image's python environment
# rebuilt as closely as the registries allow (python 3.12 and benchmarks/gpu_image.txt: torch
# 2.11.0, PyPI's CUDA build, which runs on a CPU; transformers 5.17.0; numpy 2.5.2; ...), nothing
# of raymix's own dependencies in it, the carried .whl/ installed --no-index --no-deps into a
# fresh target as the box does, then benchmarks/gpu_check.sh --device cpu under the box's call
# limit. Run it before every submission that changes moe/, benchmarks/gpu_* or the dependencies.
#   bash benchmarks/gpu_rehearsal.sh [OUT]          # about 5 minutes once the venv exists
#   bash benchmarks/gpu_rehearsal.sh --tests [OUT]  # also the moe/ test files on torch 2.11
# The venv (about 5 GB, built once: about 2 minutes) lives under .cache/ (ignored by git).
set -u
TESTS=0
if [ "${1:-}" = "--tests" ]; then TESTS=1; shift; fi
cd "$(dirname "$0")/.."
OUT_DIR=${1:-.cache/gpu-rehearsal-out}
LIMIT=${GPU_CALL_LIMIT:-540}  # the device call's timeout_s
VENV=.cache/gpu-rehearsal
PY312=${PYTHON312:-$(command -v python3.12 || ls -d ~/.pyenv/versions/3.12*/bin/python3.12 2>/dev/null | tail -1)}
start=$(date +%s)
if [ ! -x "$VENV/bin/python" ] || [ benchmarks/gpu_image.txt -nt "$VENV/.installed" ]; then
  [ -x "$PY312" ] || { echo "gpu_rehearsal: needs a python 3.12 (set PYTHON312)"; exit 2; }
  rm -rf "$VENV" && "$PY312" -m venv "$VENV"
  echo "gpu_rehearsal: building the image's environment in $VENV ..."
  "$VENV/bin/pip" install -q -r benchmarks/gpu_image.txt || exit 2
  touch "$VENV/.installed"
fi
[ -d .whl ] || bash benchmarks/gpu_wheels.sh || exit 2
echo "gpu_rehearsal: $("$VENV/bin/python" -c 'import sys, torch, transformers; print(f"python {sys.version.split()[0]}, torch {torch.__version__}, transformers {transformers.__version__}")'); .whl $(du -sh .whl | cut -f1) in $(ls .whl/*.whl | wc -l) wheels"
SITE=$(mktemp -d /tmp/rehearsal-site.XXXX)
rm -rf "$OUT_DIR"
s=$(date +%s)
GPU_CHECK_PYTHON=$PWD/$VENV/bin/python GPU_CHECK_SITE=$SITE RAYMIX_CACHE=$SITE/cache \
  timeout "$LIMIT" bash benchmarks/gpu_check.sh --device cpu "$OUT_DIR"
rc=$?
echo "gpu_rehearsal: gpu_check.sh exited $rc after $(( $(date +%s) - s ))s (the box's limit: ${LIMIT}s); $OUT_DIR/summary.json"
if [ "$TESTS" = 1 ] && [ $rc = 0 ]; then
  # moe/'s tests (no Ray, no HTTP) on the image's torch and transformers
  PYTHONPATH=$PWD:$SITE RAYMIX_CACHE=$SITE/cache "$VENV/bin/python" -m pytest -q -p no:cacheprovider -n 2 \
    tests/test_reference.py tests/test_families.py tests/test_fp8.py tests/test_experts.py tests/test_kv_cache.py \
    tests/test_sampling.py tests/test_cuda_graph.py tests/test_flex_decode.py tests/test_prefix_cache.py \
    tests/test_mistral.py tests/test_tokenizer.py tests/test_gpu_readiness.py 2>&1 | tail -15
  rc=${PIPESTATUS[0]}
fi
rm -rf "$SITE"
echo "gpu_rehearsal: done in $(( $(date +%s) - start ))s, rc $rc"
exit $rc

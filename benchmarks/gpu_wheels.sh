#!/usr/bin/env bash
# Fill .whl/ (ignored by git) with the wheels the GPU image lacks for benchmarks/gpu_check.sh:
# its python is 3.12 with torch, transformers, safetensors, numpy, sentencepiece, tiktoken,
# psutil, pyyaml and pytest (the device tool's KINDS.md; benchmarks/gpu_image.txt); raymix's moe/
# and the tests it runs also need these, at the versions CI tests (not llguidance: structured
# output is not among the GPU checks). pycountry: mistral-common's import of
# pydantic-extra-types' language codes fails without it; typing-extensions: pydantic needs a
# newer one than an image may have. Run here (a machine that reaches PyPI); the device call then
# names .whl in `carry` (about 10 MiB, under the 64 MiB a call may take);
# benchmarks/gpu_rehearsal.sh proves the set complete before a GPU is spent on it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
mkdir -p .whl
WHEELS=(
  mistral-common==1.13.1 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0
  typing-inspection==0.4.5 pydantic-extra-types==2.11.1 jsonschema==4.26.0
  jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1
  pydantic-settings==2.16.3 python-dotenv==1.2.4
  compressed-tensors==0.20.1 loguru==0.7.3
  pycountry==26.2.16 typing-extensions==4.16.0
)
rm -f .whl/*.whl  # exactly this set: two versions of one package stop the box's install
for w in "${WHEELS[@]}"; do
  $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "$w"
done
du -sh .whl

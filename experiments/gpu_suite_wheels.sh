#!/usr/bin/env bash
# Fill .whl/ (git-ignored) with every wheel experiments/gpu_suite.py may need on the bare GPU machine
# (python 3.12, torch/lightning/tiktoken/torchmetrics/tensorboard preinstalled, no network).
# Run it here, where the package registry is reachable; then carry .whl with the device call.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
cp ../shared/wheels/*.whl .whl/ 2>/dev/null || echo "no ../shared/wheels: hydra-core, omegaconf, antlr4 are downloaded instead"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 -d .whl \
  safetensors torchdata "torchao==0.18.0" "hydra-core==1.3.8" "omegaconf==2.3.1" \
  fastapi starlette uvicorn h11 click pydantic pydantic-core annotated-types typing-inspection anyio sniffio idna \
  annotated-doc opentelemetry-api importlib-metadata zipp
ls -1 .whl

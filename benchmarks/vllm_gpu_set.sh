#!/usr/bin/env bash
# Builds, on a machine with network, the set that lets the GPU machine (no network, Python 3.12,
# torch 2.11.0+cu130, torchvision 0.26.0, torchaudio 2.11.0, transformers 5.17, triton 3.6) run
# vLLM 0.26.0: benchmarks/gpu_run.sh SERVE_SEND=1 / SERVE=1 consume it.
#   bash benchmarks/vllm_gpu_set.sh            # -> .qbcache/vllm-set/vllm-set.part-NN (+ MANIFEST)
# 1. vLLM's wheel unpacked as a site-packages layout (vllm/ + vllm-0.26.0.dist-info/) without the
#    FlashAttention-2 library (305 MB; Hopper runs FA3) and without deep_gemm's builds for other
#    Pythons: vllm-0.26.0-site.tar.xz. FA3 (153 MB) stays: vllm.vllm_flash_attn refuses to import
#    without one of the two, and the Llama model imports it (seen on an H100, vLLM 0.26.0).
# 2. the wheels of its dependencies at the versions its metadata resolves to for Python 3.12 /
#    manylinux x86_64, less what the GPU machine has (what torch==2.11.0, torchvision==0.26.0,
#    torchaudio==2.11.0, transformers==5.17.0, triton==3.6.0 resolve to) and less LEAVE below, which
#    vLLM 0.26 imports only inside functions or for features a dense Llama does not use.
# 3. one tar of both, split into chunks of CHUNK_MB (default 50) MiB.
# The wheel itself is reused from VLLM_WHEEL (default: /tmp/vllm-wheel-vk, where it was downloaded).
set -euo pipefail
V=${VLLM_VERSION:-0.26.0}
WHEEL=${VLLM_WHEEL:-$(ls /tmp/vllm-wheel-vk/vllm-$V-*.whl 2>/dev/null | head -1)}
[ -f "$WHEEL" ] || { echo "no vLLM $V wheel: set VLLM_WHEEL (pip download vllm==$V --no-deps -d DIR)" >&2; exit 1; }
REPO=$(pwd)
DEST=$REPO/.qbcache/vllm-set
WORK=${WORK:-/tmp/vllm-set-build}
CHUNK_MB=${CHUNK_MB:-50}  # MiB; with the ~8 MB working tree a call stays under 64 MiB with room for it to grow
PY=${PYVER:-3.12}
# Left out (the first GPU step checks that vLLM starts without each of them):
LEAVE=${LEAVE:-"torch torchvision torchaudio triton transformers opencv-python-headless tilelang pynvvideocodec z3-solver \
llvmlite numba tokenspeed-triton nvidia-cutlass-dsl-libs-base nvidia-cutlass-dsl-libs-cu12 nvidia-cutlass-dsl-libs-cu13 nvidia-nvvm nvidia-cuda-nvcc \
nvidia-cuda-nvcc-cu13 nvidia-nvcc"}
# The GPU machine's Python 3.12.3 is Ubuntu 24.04's: glibc 2.39, so manylinux_2_17 .. 2_39 wheels install.
PLAT=(--platform manylinux2014_x86_64 --platform linux_x86_64 --platform any)
for g in $(seq 17 39); do PLAT+=(--platform "manylinux_2_${g}_x86_64"); done
PIPX=(python3 -m pip)
# An earlier run's tar.xz of the unpacked wheel is kept (it takes minutes to compress).
mkdir -p "$WORK" && find "$WORK" -mindepth 1 -maxdepth 1 ! -name "vllm-$V-site.tar.xz" -exec rm -rf {} +
mkdir -p "$WORK/site" "$WORK/wheels" "$DEST"
rm -f "$DEST"/vllm-set.part-* "$DEST"/MANIFEST

echo "== 1. unpacking $WHEEL"
if [ -s "$WORK/vllm-$V-site.tar.xz" ] && [ "$WORK/vllm-$V-site.tar.xz" -nt "$WHEEL" ]; then
  echo "  reusing $WORK/vllm-$V-site.tar.xz"
else
python3 - "$WHEEL" "$WORK/site" "$PY" <<'EOF'
import sys, zipfile
whl, out, py = sys.argv[1], sys.argv[2], sys.argv[3].replace(".", "")
skip = ("vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so",)
kept = dropped = 0
with zipfile.ZipFile(whl) as z:
    for info in z.infolist():
        n = info.filename
        other_py = n.startswith("vllm/third_party/deep_gemm/_C.cpython-") and f"cpython-{py}-" not in n
        if n in skip or other_py:
            dropped += info.file_size
            print("  left out", n, info.file_size)
            continue
        z.extract(info, out)
        mode = info.external_attr >> 16
        if mode:
            import os
            os.chmod(f"{out}/{n}", mode & 0o777)
        kept += info.file_size
print(f"  kept {kept/1e6:.0f} MB, left out {dropped/1e6:.0f} MB")
EOF
tar -C "$WORK/site" -cf - . | xz -T2 -6 > "$WORK/vllm-$V-site.tar.xz.tmp" && mv "$WORK/vllm-$V-site.tar.xz.tmp" "$WORK/vllm-$V-site.tar.xz"
fi
ls -l "$WORK/vllm-$V-site.tar.xz"

echo "== 2. resolving dependencies for Python $PY"
# What the GPU machine has is stood in for by empty wheels of the same versions (a local version
# label ranks them above the index's), so the resolver neither downloads nor resolves the CUDA
# stack torch pulls in; PRESENT names what else it has (its pip list, .library/device/KINDS.md, and
# torch's own dependencies). SERVE=1 checks vLLM's requirements against what is installed there.
python3 - "$WORK/stubs" <<'PYEOF'
import sys, zipfile, pathlib
out = pathlib.Path(sys.argv[1]); out.mkdir(parents=True, exist_ok=True)
for name, ver in [("torch", "2.11.0"), ("torchvision", "0.26.0"), ("torchaudio", "2.11.0"),
                  ("transformers", "5.17.0"), ("triton", "3.6.0")]:
    v = ver + "+gpumachine"
    di = f"{name}-{v}.dist-info"
    with zipfile.ZipFile(out / f"{name}-{v}-py3-none-any.whl", "w") as z:
        z.writestr(f"{di}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {v}\n")
        z.writestr(f"{di}/WHEEL", "Wheel-Version: 1.0\nGenerator: stub\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{di}/RECORD", "")
PYEOF
"${PIPX[@]}" install -q --dry-run --ignore-installed --report "$WORK/full.json" --only-binary=:all: --python-version "$PY" \
  "${PLAT[@]}" --target "$WORK/x" --find-links "$WORK/stubs" "$WHEEL" torch==2.11.0+gpumachine \
  torchvision==0.26.0+gpumachine torchaudio==2.11.0+gpumachine transformers==5.17.0+gpumachine triton==3.6.0+gpumachine
python3 - "$WORK" "$LEAVE" <<'EOF' > "$WORK/wanted.txt"
import json, re, sys
work, leave = sys.argv[1], set(sys.argv[2].split())
norm = lambda s: re.sub(r"[-_.]+", "-", s).lower()
PRESENT = """accelerate huggingface-hub numpy safetensors sentencepiece tiktoken tokenizers jinja2 markupsafe networkx
sympy mpmath filelock fsspec typing-extensions packaging pyyaml regex
tqdm setuptools hf-xet"""
def items(p):
    return {norm(i["metadata"]["name"]): (i["metadata"]["version"], i["download_info"]["url"])
            for i in json.load(open(p))["install"]}
full = items(f"{work}/full.json")
present = set(PRESENT.split())
log = open(f"{work}/resolve.log", "w")
for n, (v, url) in sorted(full.items()):
    if n == "vllm":
        continue
    torch_cuda = n.startswith("nvidia-cu") and not n.startswith(("nvidia-cutlass", "nvidia-cudnn-frontend"))
    why = "on the GPU machine" if n in present or torch_cuda or "+gpumachine" in v \
        else "left out" if n in leave or n.startswith("nvidia-cutlass-dsl-libs") else ""
    print(f"{n}=={v} {why or 'carried'}", file=log)
    if not why:
        print(url)
EOF
grep -c . "$WORK/wanted.txt" | sed 's/^/  wheels to carry: /'
grep -E ' left out$' "$WORK/resolve.log" | sed 's/^/  /' || true
cd "$WORK/wheels" && xargs -n 8 -P 2 curl -sSfL --remote-name-all < "$WORK/wanted.txt" && cd "$WORK"
du -sh "$WORK/wheels"
cp "$WORK/resolve.log" "$WORK/wheels/RESOLVE.txt"
printf '%s\n' $LEAVE > "$WORK/wheels/LEFT_OUT.txt"

echo "== 3. chunks of $CHUNK_MB MB"
tar -C "$WORK" -cf "$WORK/vllm-set.tar" "vllm-$V-site.tar.xz" wheels
split -b "${CHUNK_MB}M" -d -a 2 "$WORK/vllm-set.tar" "$DEST/vllm-set.part-"
(cd "$DEST" && sha256sum "$WORK/vllm-set.tar" | sed "s#$WORK/##" > MANIFEST && ls -l vllm-set.part-* >> MANIFEST)
ls -l "$DEST"; cp "$DEST/MANIFEST" "$REPO/benchmarks/vllm-set.MANIFEST"
echo "chunks: $(ls "$DEST"/vllm-set.part-* | wc -l) (one SERVE_SEND=1 call each but the last, which the SERVE=1 call carries)"

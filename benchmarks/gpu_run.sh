#!/usr/bin/env bash
# The GPU check-and-time script: run from the repo root on a CUDA machine with no network.
# 1. installs carried wheels (.whl/), 2. lays the package out as installed, 3. runs the
# GPU tests, 4. runs the kernel benchmark. Everything lands in $OUT (default runs/gpu).
#   SHAPES=llama3-8b BATCH=1,16 bash benchmarks/gpu_run.sh
#   TESTS=0 BENCH=0 COMPARE=1 bash benchmarks/gpu_run.sh      # compare every backend on a Llama-shaped model
#   BENCH=0 PLAN=1 TEST_FILES="tests/test_serve_profile.py" bash benchmarks/gpu_run.sh   # metrics, plan, serving runtime
#   TESTS=0 BENCH=0 GRAPH=1 bash benchmarks/gpu_run.sh      # graph vs eager timing, its fidelity, host cost
#   TESTS=0 BENCH=0 PROBES=1 bash benchmarks/gpu_run.sh     # the probes' cost per M and the machine check, graph mode
#   TESTS=0 BENCH=0 EVENTS=1 bash benchmarks/gpu_run.sh     # bench's events outside the replay vs inside the graph
#   TESTS=0 BENCH=0 WS_LAUNCH=1 bash benchmarks/gpu_run.sh  # host cost of a ws layer call: Gluon's launch, fast, bound
#   EXL_BUILD=1 TEST_FILES=tests/test_engine_kernels.py BENCH=0 bash benchmarks/gpu_run.sh   # build exllamav2, test engines
#   TESTS=0 BENCH=0 ENGINES=1 bash benchmarks/gpu_run.sh    # GPTQ/AWQ weights x engine kernels: compare, then bench
#   PRECOMPILE=1 PRE_MODES=i2f,magic,inplace VARIANTS=1 TESTS=0 BENCH=0 bash benchmarks/gpu_run.sh   # kernel A/B
#   WS_CHECK=1 TESTS=1 TEST_FILES=tests/test_int4_wgmma.py BENCH=0 bash benchmarks/gpu_run.sh   # the Gluon tiles' numerics
#   TESTS=0 BENCH=0 VLLM_KERNELS=1 bash benchmarks/gpu_run.sh   # vLLM's machete/marlin/exllama: tests, bench, compare
#   SERVE_SEND=1 bash benchmarks/gpu_run.sh                   # one chunk of the vLLM or demo set to /tmp/vllm-set (one call each)
#   TESTS=0 BENCH=0 SERVE=1 SERVE_UNTIL=5b bash benchmarks/gpu_run.sh   # install vLLM 0.26.0, convert, tune the demo's shapes
#   TESTS=0 BENCH=0 SERVE=1 SERVE_ORDER=off bash benchmarks/gpu_run.sh  # the first (cold, compiling) server
#   TESTS=0 BENCH=0 SERVE=1 SERVE_ORDER=off+on+off SERVE_ROUNDS=24 QB_SERVE_SINGLE_ROUNDS=8 bash benchmarks/gpu_run.sh  # held together, taking turns, an A/A control; serve-stats, compare
#   TESTS=0 BENCH=0 SERVE=1 SERVE_ORDER= SERVE_MARLIN=1 bash benchmarks/gpu_run.sh   # vLLM's gptq_marlin, same weights
# PRECOMPILE=1 compiles every tuning candidate in parallel first (benchmarks/precompile_triton.py).
# exllamav2's extension, built by an earlier call (EXL_BUILD=1 returns it as exllamav2_ext.so.xz),
# is carried as .qbcache/exllamav2_ext.so.xz and imported as a prebuilt module: no 3-minute build.
set -uo pipefail
OUT=$(realpath -m "${OUT:-runs/gpu}")
REPO=$(pwd)
mkdir -p "$OUT"
# SERVE_SEND=1: one call per chunk of the vLLM 0.26.0 set (benchmarks/vllm_gpu_set.sh makes them in
# .qbcache/vllm-set/), carrying that chunk alone; this call only copies it to /tmp/vllm-set, which the
# machine keeps between closely following calls. SERVE=1 (below) reassembles and installs them.
if [ "${SERVE_SEND:-0}" = 1 ]; then
  # vllm-set.part-NN: the vLLM set; demo.part-NN: the demo model's package (benchmarks/demo_gpu_set.sh)
  mkdir -p /tmp/vllm-set && cp -v "$REPO"/.qbcache/vllm-set/*.part-* /tmp/vllm-set/ 2>&1 | tail -n 4
  cp "$REPO"/.qbcache/vllm-set/MANIFEST /tmp/vllm-set/ 2>/dev/null || cp "$REPO"/benchmarks/vllm-set.MANIFEST /tmp/vllm-set/MANIFEST 2>/dev/null
  echo "== SERVE_SEND: /tmp/vllm-set now holds:"; ls -l /tmp/vllm-set; df -h /tmp | tail -n 1
  exit 0
fi
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
elif [ -d /tmp/site ]; then
  export PYTHONPATH=/tmp/site  # installed by an earlier call on this machine (/tmp is kept between close calls)
fi
# No network for a pip install of the project itself: mirror its package-dir mapping.
# Everything runs from that copy, so the repo's own quantbridge/ (without adapters/ and
# kernels/ inside) is not the one found first on sys.path.
rm -rf /tmp/qb && mkdir -p /tmp/qb && cp -r quantbridge tests benchmarks pyproject.toml /tmp/qb/ \
  && cp -r adapters /tmp/qb/quantbridge/adapters && cp -r kernels /tmp/qb/quantbridge/kernels && cd /tmp/qb || exit 1
export PYTHONPATH=/tmp/qb:${PYTHONPATH:-} QUANTBRIDGE_CACHE=${QUANTBRIDGE_CACHE:-/tmp/qbcache} PYTHONUNBUFFERED=1
# Kernel configurations tuned on this device kind by an earlier call (carried as .qbcache/), so
# a run split over two calls tunes once.
# Merged into a table this machine already holds (an earlier call of the same hold), whose own
# entries stay: a carried table never undoes what was tuned here since.
if ls "$REPO"/.qbcache/triton-int4-*.json >/dev/null 2>&1; then
  mkdir -p "$QUANTBRIDGE_CACHE"
  for f in "$REPO"/.qbcache/triton-int4-*.json; do
    python3 -c "import json, os, sys; src, dst = sys.argv[1:]; t = json.load(open(src)); t.update(json.load(open(dst)) if os.path.exists(dst) else {}); json.dump(t, open(dst, 'w'), indent=0, sort_keys=True)" \
      "$f" "$QUANTBRIDGE_CACHE/$(basename "$f")" || exit 1
  done
fi
if [ -f "$REPO/.qbcache/exllamav2_ext.so.xz" ]; then
  mkdir -p /tmp/exlext && xz -dc "$REPO/.qbcache/exllamav2_ext.so.xz" > /tmp/exlext/exllamav2_ext.so \
    && export PYTHONPATH=/tmp/exlext:$PYTHONPATH
elif [ -f /tmp/exlext/exllamav2_ext.so ]; then
  export PYTHONPATH=/tmp/exlext:$PYTHONPATH
fi
# vLLM's kernel library (VLLM_KERNELS=1): vllm/_C_stable_libtorch.abi3.so, decompressed from the carried
# .qbcache/vllm-$V-C.so.xz (benchmarks/fetch_vllm_kernels.sh makes it), and vllm/scalar_type.py, laid out
# as a directory vllm/ on PYTHONPATH with a vllm-$V.dist-info beside it, where an install has them. Nothing
# imports vllm: quantbridge's loader (adapters/_vllm_ops.py) finds the directory and loads the library.
# An earlier call's layout in /tmp/vllmlib is reused, so the 56 MB file can travel in a call of its own.
if [ "${VLLM_KERNELS:-0}" = 1 ]; then
  V=${VLLM_VERSION:-0.26.0}; VL=/tmp/vllmlib
  if [ -f "$REPO/.qbcache/vllm-$V-C.so.xz" ]; then
    rm -rf "$VL" && mkdir -p "$VL/vllm" "$VL/vllm-$V.dist-info" \
      && xz -dc "$REPO/.qbcache/vllm-$V-C.so.xz" > "$VL/vllm/_C_stable_libtorch.abi3.so" \
      && cp "$REPO/.qbcache/vllm-$V-scalar_type.py" "$VL/vllm/scalar_type.py" \
      && printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s\n' "$V" > "$VL/vllm-$V.dist-info/METADATA" || exit 1
  fi
  if [ -f "$VL/vllm/_C_stable_libtorch.abi3.so" ]; then
    export PYTHONPATH=$VL:$PYTHONPATH QB_REQUIRE_VLLM=1
  else
    echo "== VLLM_KERNELS: no .qbcache/vllm-$V-C.so.xz carried and no earlier layout in $VL" >&2
  fi
fi
exl_build() {
  start=$(date +%s)
  MAX_JOBS=${EXL_JOBS:-8} timeout "${EXL_TIMEOUT:-420}" python3 -c "from quantbridge.adapters.exllamav2 import _ext; _ext(); print('exllamav2 extension loaded')" \
    > "$OUT/exllamav2-build.log" 2>&1
  echo "== exllamav2 build rc=$? in $(( $(date +%s) - start )) s"; tail -n 3 "$OUT/exllamav2-build.log"
  so="$QUANTBRIDGE_CACHE/torch_extensions/exllamav2_ext/exllamav2_ext.so"
  [ -f "$so" ] && strip --strip-debug -o /tmp/exllamav2_ext.so "$so" && xz -T0 -6 -c /tmp/exllamav2_ext.so > "$OUT/exllamav2_ext.so.xz"
  ls -la "$so" "$OUT/exllamav2_ext.so.xz" 2>&1
}
# The build (minutes, CPU) runs beside the Triton precompilation; the tests wait for it.
[ "${EXL_BUILD:-0}" = 1 ] && { exl_build > "$OUT/exllamav2-build.summary" 2>&1 & exl_pid=$!; }
if [ "${PRECOMPILE:-0}" = 1 ]; then
  timeout "${PRECOMPILE_TIMEOUT:-240}" python3 benchmarks/precompile_triton.py --shapes "${PRE_SHAPES:-llama3-8b,llama3-70b}" \
    --batch "${PRE_BATCH:-1,2,4,8,16,32,64,128,512}" \
    --dtypes "${PRE_DTYPES:-bf16}" --modes "${PRE_MODES:-}" --workers "${PRE_WORKERS:-8}" 2>&1 | tail -n 3
fi
if [ "${WS_CHECK:-0}" = 1 ]; then
  # kernels/int4_wgmma.py's tiles against float64 for each IN_FLIGHT and RELEASE_LAG, bf16 and fp16 (benchmarks/wgmma_check.py)
  for dt in bf16 fp16; do
    timeout "${WS_CHECK_TIMEOUT:-240}" python3 benchmarks/wgmma_check.py --dtype "$dt" > "$OUT/wgmma-check-$dt.txt" 2>&1
    echo "== wgmma_check $dt rc=$?"; tail -n 60 "$OUT/wgmma-check-$dt.txt"
  done
fi
if [ "${VARIANTS:-0}" = 1 ]; then
  # A/B of kernel variants (benchmarks/kernel_variants.py), each tuned on its own. VAR_REPEAT=N runs
  # it in N processes one after another (a kernel whose time has levels from process to process,
  # as the M=1 GEMV's on the H100, shows them), each process's files in kernel-variants-pN.*.
  reps=${VAR_REPEAT:-1}
  for i in $(seq 1 "$reps"); do
    tag=$([ "$reps" -gt 1 ] && echo "-p$i")
    # QUANTBRIDGE_TUNE_LOG: every search's first-pass times, re-timings and pick (kernels/int4_tuner.log_search)
    QUANTBRIDGE_TUNE_LOG="$OUT/kernel-variants$tag.tune-log.jsonl" \
    timeout "${VARIANTS_TIMEOUT:-300}" python3 benchmarks/kernel_variants.py "$OUT/kernel-variants$tag.json" \
      --shapes "${VAR_SHAPES:-8192x28672,4096x4096,4096x14336,14336x4096}" --batch "${VAR_BATCH:-1,4,16,64,128}" \
      --variants "${VAR_VARIANTS:-i2f,magic,inplace}" > "$OUT/kernel-variants$tag.txt" 2> "$OUT/kernel-variants$tag.log"
    echo "== variants$tag rc=$?"; cat "$OUT/kernel-variants$tag.txt"; tail -n 3 "$OUT/kernel-variants$tag.log"
  done
  # a call returns at most 8 files: the processes' files as one archive
  [ "$reps" -gt 1 ] && tar -czf "$OUT/kernel-variants.tar.gz" -C "$OUT" $(cd "$OUT" && ls kernel-variants-p*) \
    && rm -f "$OUT"/kernel-variants-p*
fi
[ -n "${exl_pid:-}" ] && { wait "$exl_pid"; cat "$OUT/exllamav2-build.summary"; }
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.draw,temperature.gpu --format=csv > "$OUT/nvidia-smi.csv"
if [ "${TESTS:-1}" = 1 ]; then
  # TEST_K: a pytest -k expression (spaces allowed), e.g. TEST_K="bound or graph"
  timeout "${TEST_TIMEOUT:-240}" python3 -m pytest ${TEST_ARGS:--q} -p no:cacheprovider -m gpu ${TEST_K:+-k "$TEST_K"} ${TEST_FILES:-tests/test_int4_triton.py} \
    > "$OUT/gpu-tests.log" 2>&1; tail -n 15 "$OUT/gpu-tests.log"
fi
if [ "${BENCH:-1}" = 1 ]; then
  timeout "${BENCH_TIMEOUT:-480}" python3 -m quantbridge.cli bench --shapes "${SHAPES:-llama3-8b,llama3-70b}" \
    --batch "${BATCH:-1,2,4,8,16,32,64,128,512,4096}" --backends "${BACKENDS:-fp16,native,tinygemm,bnb-nf4,bnb-fp4}" \
    --runs "${RUNS:-50}" --out "$OUT" 2>"$OUT/bench-progress.log" | tail -n 80
fi
if [ "${COMPARE:-0}" = 1 ]; then
  # Every backend on a seeded model with real Llama-3-8B layer shapes; then the GPTQ weights
  # through every kernel that can run them (kernel differences without algorithm differences).
  model=${COMPARE_MODEL:-llama3-8b-2l}
  timeout "${COMPARE_TIMEOUT:-400}" python3 -m quantbridge.cli compare "$model" \
    --backends "${COMPARE_BACKENDS:-native,tinygemm,bnb-nf4,bnb-fp4,gptq,awq}" --batch "${COMPARE_BATCH:-1,16,128}" \
    --prefill 512 --no-layers --out "$OUT/compare-$model" > "$OUT/compare-$model.txt" 2>"$OUT/compare-$model.log"
  tail -n 30 "$OUT/compare-$model.txt"; tail -n 5 "$OUT/compare-$model.log"
  [ "${COMPARE_SHARED:-1}" = 1 ] && timeout "${COMPARE_TIMEOUT:-400}" python3 -m quantbridge.cli compare "$model" --weights gptq \
    --backends gptq,native,tinygemm --batch "${COMPARE_BATCH:-1,16,128}" --prefill 512 --no-layers \
    --out "$OUT/compare-$model-gptq-weights" > "$OUT/compare-$model-gptq-weights.txt" 2>"$OUT/compare-$model-gptq-weights.log"
  tail -n 20 "$OUT/compare-$model-gptq-weights.txt"; tail -n 5 "$OUT/compare-$model-gptq-weights.log"
fi
if [ "${ENGINES:-0}" = 1 ]; then
  # GPTQ and AWQ weights through the engines' own kernels, fp16 (exllamav2 and AutoAWQ compute
  # in fp16): 1. the backends as users name them (each through its best kernel here), 2. and 3.
  # one quantizer's weights through every kernel that can hold them; 4. the kernels alone on
  # Llama-3 8B and 70B shapes. ENGINE_RUNS picks steps; each step is archived as it ends.
  model=${ENGINE_MODEL:-llama3-8b-2l}; E="$OUT/engines-$model"; mkdir -p "$E"
  [ -f "$REPO/.qbcache/engines-$model.tar.gz" ] && tar -xzf "$REPO/.qbcache/engines-$model.tar.gz" -C "$OUT"
  [ -f "$REPO/.qbcache/qcache-$model.tar" ] && mkdir -p "$QUANTBRIDGE_CACHE" && tar -xf "$REPO/.qbcache/qcache-$model.tar" -C "$QUANTBRIDGE_CACHE"
  batch=${ENGINE_BATCH:-1,16,128}
  for run in ${ENGINE_RUNS:-backends gptq awq bench}; do
    case $run in
      backends) args="--backends fp16,native,bnb-nf4,gptq,awq" ;;
      gptq) args="--backends fp16 --weights gptq --kernels exllamav2,gemlite,gptq-layout,triton" ;;
      awq) args="--backends fp16 --weights awq --kernels autoawq,gemlite,awq-layout,triton" ;;
      bench)
        timeout "${BENCH_TIMEOUT:-420}" python3 -m quantbridge.cli bench --dtype fp16 --shapes llama3-8b,llama3-70b \
          --batch "${ENGINE_BENCH_BATCH:-1,2,4,8,16,32,64,128,512}" --backends fp16,native \
          --kernels exllamav2,gemlite,autoawq --runs 50 --out "$E/bench" > "$E/bench.txt" 2> "$E/bench.log"
        echo "== bench rc=$?"; tail -n 3 "$E/bench.log"; tar -czf "$OUT/engines-$model.tar.gz" -C "$OUT" "engines-$model"; continue ;;
    esac
    timeout "${ENGINE_TIMEOUT:-400}" python3 -m quantbridge.cli compare "$model" --dtype fp16 $args --batch "$batch" \
      --prefill 512 --no-report --out "$E/$run" > "$E/$run.txt" 2> "$E/$run.log"
    echo "== compare $run rc=$?"; tail -n 3 "$E/$run.log"
    python3 -c "import json,sys; d=json.load(open(sys.argv[1])); [print(b['name'], b['status'], (b.get('reason') or '')[:160], sorted({l['kernel'] for l in b['layers']})[:3]) for b in d['backends']]" "$E/$run/results.json" 2>/dev/null
    tar -czf "$OUT/engines-$model.tar.gz" -C "$OUT" "engines-$model"
  done
  sed -n '/whole step per M/,/└/p' "$E"/*.txt 2>/dev/null | head -n 60
fi
if [ "${VLLM_KERNELS:-0}" = 1 ]; then
  # vLLM's own INT4 kernels beside every other kernel: 1. their GPU tests, 2. bench on Llama-3 8B and
  # 70B shapes in fp16 (the exllama kernels take fp16 only) and in bf16 (tinygemm takes bf16 only),
  # 3. and 4. compare in graph mode, GPTQ and AWQ weights through each kernel (fp16). VLLM_RUNS picks
  # steps; each step is archived into $OUT/vllm-kernels.tar.gz as it ends (carry it back as
  # .qbcache/vllm-kernels.tar.gz to continue in a later call).
  VK="$OUT/vllm-kernels"; mkdir -p "$VK"
  [ -f "$REPO/.qbcache/vllm-kernels.tar.gz" ] && tar -xzf "$REPO/.qbcache/vllm-kernels.tar.gz" -C "$OUT"
  [ -f "$REPO/.qbcache/qcache-llama3-8b-2l.tar" ] && mkdir -p "$QUANTBRIDGE_CACHE" && tar -xf "$REPO/.qbcache/qcache-llama3-8b-2l.tar" -C "$QUANTBRIDGE_CACHE"
  python3 -c "import json, subprocess, sys; d = json.loads(subprocess.run([sys.executable, '-m', 'quantbridge.cli', 'env', '--json'], capture_output=True, text=True).stdout); [print(k['kernel'], k['available'], k['reason']) for k in d['kernels'] if k['kernel'] in ('machete', 'marlin', 'vllm-exllama', 'exllamav2', 'gemlite')]" 2>&1 | tee "$VK/env.txt"
  vbatch=${VLLM_BENCH_BATCH:-1,4,16,64,128,512}
  vruns=${VLLM_RUNS:-tests bench-fp16 bench-bf16 gptq awq}
  # gemlite compiles (and, for shapes its shipped tuning lacks, autotunes) on first use, one shape
  # after another: compile them first for the benches asked for, one process per (shape, dtype).
  vdt=$(for r in $vruns; do case $r in bench-*) printf '%s,' "${r#bench-}";; esac; done)
  if [ -n "$vdt" ] && [[ ",${VLLM_BENCH_KERNELS:-gemlite}," == *,gemlite,* ]]; then
    timeout "${PRE_GEMLITE_TIMEOUT:-300}" python3 benchmarks/precompile_gemlite.py --shapes "${VLLM_SHAPES:-llama3-8b,llama3-70b}" \
      --batch "$vbatch" --dtypes "${vdt%,}" 2>&1 | tail -n 2
  fi
  for run in $vruns; do
    case $run in
      tests)
        timeout "${TEST_TIMEOUT:-300}" python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_vllm_kernels.py > "$VK/gpu-tests.log" 2>&1
        echo "== vllm tests rc=$?"; tail -n 15 "$VK/gpu-tests.log" ;;
      bench-fp16|bench-bf16)
        dt=${run#bench-}
        # the exllama kernels take fp16 only: a bf16 bench leaves them out rather than report them unavailable
        kernels=${VLLM_BENCH_KERNELS:-machete,marlin$([ "$dt" = fp16 ] && echo ,vllm-exllama,exllamav2),gemlite}
        # tinygemm takes bf16 only; native is timed in bf16 (its tuned table here), not tuned again in fp16
        backends=${VLLM_BENCH_BACKENDS:-fp16$([ "$dt" = bf16 ] && echo ,native,tinygemm)}
        timeout "${BENCH_TIMEOUT:-480}" python3 -m quantbridge.cli bench --dtype "$dt" --shapes "${VLLM_SHAPES:-llama3-8b,llama3-70b}" \
          --batch "$vbatch" --backends "$backends" --kernels "$kernels" --runs "${RUNS:-50}" \
          --out "$VK/$run" > "$VK/$run.txt" 2> "$VK/$run.log"
        echo "== bench $dt rc=$?"; tail -n 40 "$VK/$run.txt"; tail -n 3 "$VK/$run.log" ;;
      gptq|awq)
        model=${VLLM_MODEL:-llama3-8b-2l}
        kernels=${VLLM_COMPARE_KERNELS:-machete,marlin,vllm-exllama,exllamav2,triton}
        timeout "${COMPARE_TIMEOUT:-400}" python3 -m quantbridge.cli compare "$model" --mode graph --dtype fp16 --backends fp16 \
          --weights "$run" --kernels "$kernels" --batch "${VLLM_COMPARE_BATCH:-1,16,128}" --prefill 512 --no-report \
          --out "$VK/compare-$run" > "$VK/compare-$run.txt" 2> "$VK/compare-$run.log"
        echo "== compare --weights $run rc=$?"; tail -n 3 "$VK/compare-$run.log"
        python3 -c "import json,sys; d=json.load(open(sys.argv[1])); [print(b['name'], b['status'], (b.get('reason') or '')[:160], sorted({l['kernel'] for l in b['layers']})[:3]) for b in d['backends']]" "$VK/compare-$run/results.json" 2>/dev/null ;;
    esac
    tar -czf "$OUT/vllm-kernels.tar.gz" -C "$OUT" vllm-kernels  # a call cut off later keeps this step
  done
fi
if [ "${PLAN:-0}" = 1 ]; then
  # Whole-model metrics with NVML telemetry, per-layer sensitivity, a weight-budget plan, and
  # the plan run as one more row: predicted against measured on the GPU. One archive back.
  model=${PLAN_MODEL:-llama3-8b-2l}; P="$OUT/plan-$model"; mkdir -p "$P"
  report=$(python3 -c 'import matplotlib' 2>/dev/null && echo --report || echo --no-report)  # plots need matplotlib
  timeout "${PLAN_TIMEOUT:-300}" python3 -m quantbridge.cli compare "$model" --backends "${PLAN_BACKENDS:-native,bnb-nf4,bnb-int8}" \
    --batch 1,16 --prefill 512 --sensitivity --no-layers $report --out "$P/sens" > "$P/sens.txt" 2> "$P/sens.log"
  python3 -m quantbridge.cli plan "$P/sens/results.json" --max-weight-gb "${PLAN_GB:-0.5}" --out "$P/plan.json" > "$P/plan.txt" 2>&1
  timeout "${PLAN_TIMEOUT:-300}" python3 -m quantbridge.cli compare "$model" --plan "$P/plan.json" --batch 1,16 --prefill 512 \
    --no-layers $report --out "$P/run" > "$P/run.txt" 2> "$P/run.log"
  cat "$P/plan.txt"; tail -n 12 "$P/run.txt"; tail -n 3 "$P/sens.log" "$P/run.log"
  tar -czf "$OUT/plan-$model.tar.gz" -C "$OUT" "plan-$model" && rm -rf "$P"
fi
if [ "${HOST:-0}" = 1 ]; then
  # Host enqueue cost per eager layer call: F.linear, native, tinygemm (and where native's goes).
  timeout "${HOST_TIMEOUT:-240}" python3 benchmarks/profile_host.py "$OUT/host-cost.json" --calls "${HOST_CALLS:-2000}" \
    > "$OUT/host-cost.log" 2>&1; echo "== host cost rc=$?"; tail -n 25 "$OUT/host-cost.log"
fi
if [ "${WS_LAUNCH:-0}" = 1 ]; then
  # Host cost of a held ws (and Triton) layer call through Gluon's launch, the fast launch and the bound
  # plan, and the tuner's figure for it under each timing (benchmarks/ws_launch_cost.py; WSL_ARGS: --case list).
  timeout "${WSL_TIMEOUT:-300}" python3 benchmarks/ws_launch_cost.py "$OUT/ws-launch-cost.json" ${WSL_ARGS:-} \
    > "$OUT/ws-launch-cost.log" 2>&1; echo "== ws launch cost rc=$?"; tail -n 20 "$OUT/ws-launch-cost.log"
fi
if [ "${SMOKE:-0}" = 1 ]; then
  # Every timing mode once on the demo model: a quick check that capture works end to end.
  for mode in graph eager compile; do
    timeout 240 python3 -m quantbridge.cli compare demo --backends fp16,native,tinygemm,bnb-nf4,bnb-int8 --batch 1,16 \
      --prefill 128 --runs 10 --mode $mode --no-report --no-layers --out "$OUT/smoke-$mode" > "$OUT/smoke-$mode.txt" 2>&1
    echo "== $mode rc=$?"; grep -E "^│ |timing|Error" "$OUT/smoke-$mode.txt" | head -n 30
    python3 -c "import json,sys; d=json.load(open(sys.argv[1])); [print(b['name'], b['status'], b.get('timing'), (b.get('reason') or '')[:200]) for b in d['backends']]" "$OUT/smoke-$mode/results.json"
  done
fi
if [ "${GRAPH:-0}" = 1 ]; then
  # compare in graph mode twice (repeatability) and in eager mode (host cost per call) on a
  # model with Llama-3-8B layer shapes; the same kernels alone through `bench`; then the
  # fidelity check over the four. One archive back.
  # GRAPH_RUNS picks the steps (a call may hold only part of them); an archive of an earlier
  # call's steps, carried as .qbcache/graph-MODEL.tar.gz, is unpacked first.
  model=${GRAPH_MODEL:-llama3-8b-2l}; G="$OUT/graph-$model"; mkdir -p "$G"
  [ -f "$REPO/.qbcache/graph-$model.tar.gz" ] && tar -xzf "$REPO/.qbcache/graph-$model.tar.gz" -C "$OUT"
  backends=${GRAPH_BACKENDS:-fp16,native,tinygemm,bnb-nf4}; batch=${GRAPH_BATCH:-1,16,128}
  for run in ${GRAPH_RUNS:-graph graph-repeat eager bench}; do
    if [ "$run" = bench ]; then
      timeout "${BENCH_TIMEOUT:-300}" python3 -m quantbridge.cli bench --shapes llama3-8b --batch "$batch,512" \
        --backends "$backends" --runs 50 --out "$G/bench" > "$G/bench.txt" 2> "$G/bench.log"
      echo "== bench rc=$?"; tar -czf "$OUT/graph-$model.tar.gz" -C "$OUT" "graph-$model"; continue
    fi
    timeout "${GRAPH_TIMEOUT:-300}" python3 -m quantbridge.cli compare "$model" --backends "$backends" --batch "$batch" \
      --prefill 512 --mode "${run%-repeat}" --no-report --out "$G/$run" > "$G/$run.txt" 2> "$G/$run.log"
    echo "== compare --mode ${run%-repeat} rc=$?"; tail -n 3 "$G/$run.log"
    tar -czf "$OUT/graph-$model.tar.gz" -C "$OUT" "graph-$model"  # a call cut off later keeps this step
  done
  [ -f "$G/bench/bench.json" ] && [ -f "$G/eager/results.json" ] && python3 benchmarks/graph_fidelity.py "$G/graph/results.json" "$G/graph-repeat/results.json" "$G/bench/bench.json" \
    "$G/eager/results.json" "$G/fidelity.md" > /dev/null 2> "$G/fidelity.log"
  cat "$G/fidelity.md" "$G/fidelity.log" 2>/dev/null; sed -n '/whole step per M/,/└/p' "$G"/*.txt
  tar -czf "$OUT/graph-$model.tar.gz" -C "$OUT" "graph-$model" && rm -rf "$G"
fi
if [ "${PROBES:-0}" = 1 ]; then
  # The probes' own cost and the machine check in graph mode, on a model of many small layers
  # (tiny: 29 linears, the worst case for per-layer probes) and one of Llama-3-8B layer shapes.
  for model in ${PROBE_MODELS:-tiny llama3-8b-2l}; do
    timeout "${PROBE_TIMEOUT:-300}" python3 -m quantbridge.cli compare "$model" --backends "${PROBE_BACKENDS:-fp16,native,tinygemm}" \
      --batch "${PROBE_BATCH:-1,16,128}" --prefill 512 --mode graph --no-report --out "$OUT/probes-$model" \
      > "$OUT/probes-$model.txt" 2> "$OUT/probes-$model.log"
    echo "== probes $model rc=$?"; tail -n 3 "$OUT/probes-$model.log"
    python3 -c "import json,sys; d=json.load(open(sys.argv[1])); [print(b['name'], b['status'], {k: (round(v, 2) if isinstance(v, float) else v) for k, v in b['model_metrics'].get('probe_overhead_pct', {}).items()}, b['model_metrics'].get('probe_graphs'), b['model_metrics'].get('probe_cost_per_layer_us'), b['model_metrics'].get('machine_check')) for b in d['backends']]" "$OUT/probes-$model/results.json"
    grep -E "probe|machine|steady|slowed" "$OUT/probes-$model.txt" | head -n 8
  done
fi
if [ "${EVENTS:-0}" = 1 ]; then
  # Where bench's timing events sit: outside the replay (bench), inside the graph (compare's probes),
  # and an empty graph's replay: does bench's kernel time hold the graph-launch latency?
  timeout "${EVENTS_TIMEOUT:-240}" python3 benchmarks/event_placement.py "$OUT/event-placement.json" \
    --shapes "${EVENT_SHAPES:-4096x1024,4096x4096,4096x14336,14336x4096}" --batch "${EVENT_BATCH:-1,16,128}" \
    --backends "${EVENT_BACKENDS:-fp16,native,tinygemm}" > "$OUT/event-placement.txt" 2>&1
  echo "== event placement rc=$?"; tail -n 40 "$OUT/event-placement.txt"
fi
# Nsight Compute, for the PROFILE and BENCH_NCU steps: on PATH, or where the CUDA images install it
ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -n 1)
if [ "${PROFILE:-0}" = 1 ]; then
  # profile_decode.py tunes and warms up outside the profiler range: the profiled launch is never a
  # tuning one (tuning takes seconds per shape without a tuned table from an earlier step).
  # Achieved bandwidth (SpeedOfLight), stall reasons (WarpStateStats), L2 hit rate (MemoryWorkloadAnalysis).
  # KxNxM, or KxNxMxKERNEL for another kernel on round-to-nearest codes (marlin, machete: with
  # VLLM_KERNELS=1's library in the same call), matched by PROFILE_KERNEL_RE (default: its name).
  # PROFILE_CONFIG=BM,BN,BK,SPLIT_K,WARPS,STAGES: the native kernel held to that tile, not the tuned one.
  # PROFILE_FIXUP=R: int4_settings.FIXUP_ROWS (how the ws tiles' stream-K parts are summed).
  # PROFILE_SZ_SPLIT=1: int4_settings.SZ_SPLIT (the tiles read the split scale and zero-point words).
  # PROFILE_FIXUP_LOADS=L: int4_settings.FIXUP_LOADS (parts whose loads the row-chunk fix-up issues at once).
  # PROFILE_FIXUP_SLICED=1 or 0: int4_settings.FIXUP_SLICED on or off (a split run's parts summed by all its
  # programs, the default since r11, or by the last to arrive); unset: the module's.
  # PROFILE_KERNEL_BASE=demangled: the regex sees the whole demangled name (Machete's kernel is a CUTLASS
  # device_kernel whose template argument names it).
  # PROFILE_CLOCKS=none: the GPU's own clocks, as the bench runs (ncu locks them to base by default, which
  # slows an SM-bound kernel more than a DRAM-bound one and so changes who is ahead).
  # PROFILE_SASS=1: a third run, stall samples per SASS instruction (benchmarks/ncu_sass_stalls.py), so a
  # stall reason can be laid at the instruction that waits (a barrier, a scale load, the fix-up's loads).
  for shape in ${PROFILE_SHAPES:-8192x28672x1 4096x4096x1 8192x28672x16 8192x28672x128}; do
    IFS=x read -r pk pn pm pkern <<< "$shape"
    kre=${pkern:+"regex:${PROFILE_KERNEL_RE:-$pkern|${pkern^}}"}; kre=${kre:-"regex:_(int4_matmul|int4_gemv|int4_ws|dequant)_kernel"}
    nf=(--profile-from-start off --kernel-name "$kre" --kernel-name-base "${PROFILE_KERNEL_BASE:-function}"
        --clock-control "${PROFILE_CLOCKS:-base}" --launch-skip 5 --launch-count 1)
    pd=(python3 benchmarks/profile_decode.py $pk $pn $pm $pkern ${PROFILE_CONFIG:+--config "$PROFILE_CONFIG"}
        ${PROFILE_FIXUP:+--fixup-rows "$PROFILE_FIXUP"} ${PROFILE_FIXUP_LOADS:+--fixup-loads "$PROFILE_FIXUP_LOADS"}
        $([ "${PROFILE_SZ_SPLIT:-0}" = 1 ] && echo --sz-split) $([ "${PROFILE_FIXUP_SLICED:-}" = 1 ] && echo --fixup-sliced) $([ "${PROFILE_FIXUP_SLICED:-}" = 0 ] && echo --no-fixup-sliced))
    timeout 120 "$ncu" "${nf[@]}" --section SpeedOfLight --section Occupancy --section LaunchStats \
      --section MemoryWorkloadAnalysis --section WarpStateStats --section SchedulerStats "${pd[@]}" > "$OUT/ncu-$shape.txt" 2>&1
    # The stall reasons themselves (WarpStateStats above prints only their total): warps stalled on each
    # reason per issued instruction; long_scoreboard is a wait on a global load's result.
    timeout 120 "$ncu" "${nf[@]}" --metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio" \
      "${pd[@]}" > "$OUT/ncu-$shape-stalls.txt" 2>&1
    if [ "${PROFILE_SASS:-0}" = 1 ]; then
      rep=/tmp/ncu-sass-$shape  # the report stays on the machine: the CSV and its summary come back
      timeout 150 "$ncu" "${nf[@]}" --section WarpStateStats --section SourceCounters -f -o "$rep" "${pd[@]}" \
        > "$OUT/ncu-$shape-sass.log" 2>&1
      "$ncu" --import "$rep.ncu-rep" --page source --print-source sass --csv > "$OUT/ncu-$shape-sass.csv" 2>> "$OUT/ncu-$shape-sass.log"
      python3 benchmarks/ncu_sass_stalls.py "$OUT/ncu-$shape-sass.csv" --reason barrier,long_sb,wait > "$OUT/ncu-$shape-sass.txt" 2>&1
      head -n 8 "$OUT/ncu-$shape-sass.txt"
    fi
    echo "== ncu $shape: $(grep -m1 -E '^ *Duration' "$OUT/ncu-$shape.txt" | tr -s ' ')"
  done
  # One archive back (a call returns at most 8 files): the bench's files need the other places.
  files=$(cd "$OUT" && ls ncu-*.txt ncu-*.csv ncu-*.log 2>/dev/null)
  tar -czf "$OUT/ncu.tar.gz" -C "$OUT" $files && (cd "$OUT" && rm -f $files)
fi
if [ "${BENCH_NCU:-0}" = 1 ]; then
  # The kernels as the bench runs them: ncu on `quantbridge bench`'s own graph replays, each kernel node
  # profiled where the graph runs it, with the bench's L2 flush and the GPU's clocks left alone. Where a
  # kernel's bench time and its profile_decode profile differ, this tells whether the gap is in the kernel
  # or around it. BN_SHAPES (KxN), BN_BATCH, BN_KERNELS (rtn+K rows), BN_RE (demangled kernel names).
  # BN_GRAPHS=1: each CUDA graph profiled whole instead (no name filter: the bench's eager work, its L2
  # flush among it, is profiled too): a timed graph holds the call between two events, so its duration
  # against its kernel's (a BN_GRAPHS=0 run) is the time the bench adds around the kernel.
  if [ "${BN_GRAPHS:-0}" = 1 ]; then filt=(--graph-profiling graph); else
    filt=(--graph-profiling node --kernel-name-base demangled --kernel-name "regex:${BN_RE:-_int4_|Marlin|machete}"); fi
  timeout "${BN_TIMEOUT:-300}" "$ncu" --target-processes all "${filt[@]}" --cache-control none --clock-control none --csv \
    --metrics gpu__time_duration.sum,dram__bytes_read.sum,sm__cycles_elapsed.avg.per_second \
    python3 -m quantbridge.cli bench --shapes "${BN_SHAPES:-28672x8192,8192x28672}" --batch "${BN_BATCH:-1,4}" \
    --backends fp16,native --kernels "${BN_KERNELS:-marlin}" --runs 20 --isolation none --out "$OUT/bench-ncu" \
    > "$OUT/bench-ncu.csv" 2> "$OUT/bench-ncu.log"
  echo "== bench under ncu rc=$?"; tail -n 2 "$OUT/bench-ncu.log"
  python3 benchmarks/ncu_kernel_summary.py "$OUT/bench-ncu.csv" | tee "$OUT/bench-ncu.summary.txt" | head -n 40
  python3 benchmarks/ncu_kernel_summary.py --each "$OUT/bench-ncu.csv" > "$OUT/bench-ncu.each.txt"
  cat "$OUT/bench-ncu/bench.md" 2>/dev/null | grep -E '^\| *[0-9]+ \|' | head -n 8
fi
if [ "${SERVE:-0}" = 1 ]; then
  # Under the call's 600 s limit, so the archive below is always made (a call killed at its limit returns
  # nothing of what the servers logged).
  QB_REPO="$REPO" QB_SERVE_TIMEOUT=${QB_SERVE_TIMEOUT:-500} SERVE_TIMEOUT=${SERVE_TIMEOUT:-540} \
    timeout "${SERVE_STEPS_TIMEOUT:-570}" bash "$REPO/benchmarks/vllm_serve_steps.sh" "$OUT/serve" 2>&1 \
    | tee "$OUT/serve-steps.log" | grep -E '^(==|  (OK|FAIL|MISSING|ABSENT|STARTED|LOG|SKIP|skipped|tokens))' || true
  # One archive back: a call returns at most 8 files, and the servers' logs are what a failure needs.
  tar -czf "$OUT/serve.tar.gz" -C "$OUT" serve && rm -rf "$OUT/serve"
fi
cp "$QUANTBRIDGE_CACHE"/triton-int4-*.json "$OUT/" 2>/dev/null || true

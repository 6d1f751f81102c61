#!/usr/bin/env bash
# One command on a GPU machine (H100): install the package (the native extension against the machine's
# torch), run the GPU tests, run the GPU benchmarks, write JSON into ${OUT:-bench/results}, print a short
# table last.
#
#   OUT=/some/dir bash bench/gpu_suite.sh
#
# The suite is a list of steps.  Each step is a shell function `step_<name>` that writes its own
# JSON into $OUT; a failing step is recorded (exit code, log tail) and the next step still runs.
# To add a step: define `step_<name>` below and append <name> to the default step list.
#
# LDEQ_SUITE_SMOKE=1 runs every step but the build on the CPU at toy sizes (each step's smoke flags come
# last and override its own); tests/test_gpu_suite.py does this so that the scripts, their JSON and
# the summary below are exercised before they meet a GPU.  Exit status: 0 when every step passed.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
PY=${PYTHON:-python3}  # the GPU image's interpreter is python3 (no plain `python` there)
SMOKE=${LDEQ_SUITE_SMOKE:-0}
DEV=cuda
if [ "$SMOKE" = 1 ]; then DEV=cpu; fi
smoke() { if [ "$SMOKE" = 1 ]; then echo "$@"; fi; }  # prints its arguments in smoke runs only

# --------------------------------------------------------------------------------------------------
# steps

step_build() {
  # --no-build-isolation: build against the installed (CUDA) torch; --no-deps: no internet there
  $PY -m pip install --no-build-isolation --no-deps -e . &&
    $PY -c "import json, sys, ldeq_fast._ext as e; json.dump({'cpp': e.has_cpp(), 'cuda': e.has_cuda(), \
'import_error': repr(e.IMPORT_ERROR)}, open(sys.argv[1], 'w'))" "$OUT/build.json"
}

step_gpu_tests() {
  # the tests that need CUDA (-m gpu) and the fused cell ops' Triton tests, which run on CUDA tensors when
  # there is a GPU (-m triton); junit XML + a JSON count
  $PY -m pytest -m "gpu or triton" -q -p no:cacheprovider tests/ --junitxml "$OUT/gpu_tests.xml"
  local rc=$?
  $PY - "$OUT/gpu_tests.xml" "$OUT/gpu_tests.json" <<'EOF'
import json, sys
import xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
suite = root if root.tag == "testsuite" else root.find("testsuite")
counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
json.dump(counts, open(sys.argv[2], "w"))
EOF
  return $rc
}

step_solver_bench() {
  $PY bench/bench_solver.py --device $DEV --json "$OUT/solver_cuda.json" $(smoke --quick)
}

step_model_bench() {
  # reference vs published-semantics vs fast path on the default model, batch 32 and 1
  $PY -m ldeq_fast.cli bench --device $DEV --batch 32,1 --repeats 5 --no-progress --json "$OUT/model_cuda.json" \
    $(smoke --small --batch 2,1 --repeats 1)
}

step_model_gpu() {
  # published-semantics eager vs torch.compile(reference, max-autotune) vs fast fp32 / bf16 at batch 32,
  # and streaming batch 1 (2 cell evaluations per frame) with the CUDA-graph forward
  $PY bench/bench_model_gpu.py --device $DEV --batch 32 --repeats 5 --json "$OUT/model_gpu.json" \
    $(smoke --small --batch 2 --repeats 1 --stream-frames 4) &&
    $PY bench/bf16_agreement.py --device $DEV --json "$OUT/bf16_agreement_cuda.json" $(smoke --images 2)
}

step_cellops() {
  $PY bench/bench_cellops.py --device $DEV --json "$OUT/cellops_cuda.json" $(smoke --quick)
}

step_profile() {
  $PY bench/profile_fast_path.py --device $DEV --batch 32 --json "$OUT/profile_cuda_b32.json" $(smoke --small --batch 2)
}

step_train_bench() {
  $PY bench/bench_train.py --device $DEV --batch 16,32,64 --repeats 3 --budget-gb 80 --json "$OUT/train_cuda.json" \
    $(smoke --small --batch 1,2 --repeats 1 --budget-gb 1)
}

step_torchdeq_adapter() {
  $PY bench/bench_torchdeq_adapter.py --device $DEV --json "$OUT/torchdeq_adapter_cuda.json" $(smoke --quick)
}

# LDEQ_GPU_STEPS="gpu_tests solver_bench" runs a subset (e.g. when the extension is already built)
# most wanted first: a lease that runs out part way still returns the figures that matter most
ALL_STEPS="build gpu_tests model_gpu profile train_bench model_bench cellops solver_bench torchdeq_adapter"
if [ "$SMOKE" = 1 ]; then ALL_STEPS=${ALL_STEPS#build }; fi
read -r -a STEPS <<<"${LDEQ_GPU_STEPS:-$ALL_STEPS}"

# --------------------------------------------------------------------------------------------------
# runner: every step gets a log and a status JSON; failures do not stop the suite

# LDEQ_STEP_TIMEOUT=SECONDS bounds each step (exit 124 when it runs out; the next step still runs), so one
# slow step (a max-autotune build) cannot spend a whole GPU lease
export OUT PY DEV SMOKE
export -f smoke $(compgen -A function step_)

run_step() {
  local name=$1 log="$OUT/$1.log" start rc
  echo "=== step $name (log: $log)"
  start=$(date +%s)
  if [ -n "${LDEQ_STEP_TIMEOUT:-}" ]; then
    timeout --kill-after=15 "$LDEQ_STEP_TIMEOUT" bash -c "step_$name" >"$log" 2>&1
  else
    "step_$name" >"$log" 2>&1
  fi
  rc=$?
  $PY - "$OUT/step_$name.json" "$name" "$rc" "$(($(date +%s) - start))" "$log" <<'EOF'
import json, sys
path, name, rc, secs, log = sys.argv[1:]
tail = open(log, errors="replace").read()[-3000:]
json.dump({"step": name, "exit_code": int(rc), "ok": rc == "0", "seconds": int(secs), "log": log,
           "log_tail": tail}, open(path, "w"), indent=2)
EOF
  if [ "$rc" -eq 124 ]; then echo "    TIMED OUT after ${LDEQ_STEP_TIMEOUT}s"; fi
  if [ "$rc" -ne 0 ]; then echo "    FAILED (exit $rc): $(tail -n 3 "$log" | tr '\n' ' ')"; FAILED=$((FAILED + 1)); fi
}

FAILED=0
for s in "${STEPS[@]}"; do run_step "$s"; done

# --------------------------------------------------------------------------------------------------
# summary table (last)

$PY - "$OUT" "${STEPS[@]}" <<'EOF'
import json, os, sys
out, steps = sys.argv[1], sys.argv[2:]
print("\n==== GPU suite summary (" + out + ")")
for s in steps:
    p = os.path.join(out, f"step_{s}.json")
    st = json.load(open(p)) if os.path.exists(p) else {"ok": False, "exit_code": "?", "seconds": "?"}
    print(f"  {s:<16} {'ok' if st['ok'] else 'FAILED (exit ' + str(st['exit_code']) + ')':<18} {st['seconds']}s")
p = os.path.join(out, "gpu_tests.json")
if os.path.exists(p):
    print("  gpu tests:", json.load(open(p)))
p = os.path.join(out, "solver_cuda.json")
if os.path.exists(p):
    r = json.load(open(p))
    print(f"  solver on {r['machine'].get('gpu')}: B={r['config']['B']} D={r['config']['D']} m={r['config']['m']}, "
          f"f = {r['f_ms']:.3f} ms")
    for name, v in r["per_iteration"].items():
        print(f"    {name:<10} {v['ms_per_iter']:8.3f} ms/iter  overhead {v['overhead_ms_per_iter']:8.3f} ms/iter  "
              f"to tol {r['to_tolerance'][name]['ms']:8.2f} ms ({r['to_tolerance'][name]['f_evals']} f evals)")
    k = r.get("kernels", {})
    if k:
        print(f"    copy {k['copy']['GB_per_s']:.0f} GB/s | update {k['update']['GB_per_s']:.0f} GB/s "
              f"({k['update']['fraction_of_copy']:.0%}) | mix {k['mix']['GB_per_s']:.0f} GB/s ({k['mix']['fraction_of_copy']:.0%})")
    g = r.get("cuda_graph")
    if g:
        print(f"    CUDA graph: {g['graph_ms_per_iter']:.3f} ms/iter replayed vs {g['eager_ms_per_iter']:.3f} eager")
p = os.path.join(out, "model_gpu.json")
if os.path.exists(p):
    r = json.load(open(p))
    for row in r["rows"]:
        print(f"  model {row['path']:<34} {row['images_per_s']:8.1f} img/s  {row['speedup_vs_published_eager']:.2f}x published"
              f"  dkpt {row['max_kpt_diff_px_vs_fast_fp32']:.3f} px")
    for name, s in r["streaming_batch1"].items():
        print(f"  streaming batch 1 ({name}): {s['ms_per_frame']:.3f} ms/frame")
    if isinstance(r.get("compiled"), dict):
        print(f"  torch.compile(reference, max-autotune) built in {r['compiled']['compile_s']:.0f} s; side by side:")
        for row in r["compiled"]["rows"]:
            print(f"  model {row['path']:<34} {row['images_per_s']:8.1f} img/s  "
                  f"{row['speedup_vs_compiled_reference']:.2f}x compiled")
    else:
        print(f"  torch.compile comparison: {r.get('compiled')}")
p = os.path.join(out, "bf16_agreement_cuda.json")
if os.path.exists(p):
    r = json.load(open(p))["bf16_vs_fp32_px"]
    print(f"  bf16 vs fp32 keypoints (demo model): mean {r['mean']:.4f}, p99 {r['p99']:.4f}, max {r['max']:.4f} px")
p = os.path.join(out, "profile_cuda_b32.json")
if os.path.exists(p):
    for name, r in json.load(open(p))["paths"].items():
        print(f"  {name}: convolutions {r['conv_share']:.1%} of {r['total_ms']:.1f} ms device time")
p = os.path.join(out, "train_cuda.json")
if os.path.exists(p):
    r = json.load(open(p))
    for row in r["rows"]:
        if "time_ratio_vs_published" in row:
            print(f"  train batch {row['batch']}: time {row['time_ratio_vs_published']:.2f}x, "
                  f"memory {row['memory_ratio_vs_published']:.2f}x the published-semantics step")
EOF
summary_rc=$?
if [ "$FAILED" -ne 0 ] || [ "$summary_rc" -ne 0 ]; then exit 1; fi

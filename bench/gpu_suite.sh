#!/usr/bin/env bash
# The GPU suite: two prepared commands of <= 7 minutes each on an H200 (15 minutes of device time in all,
# the machine's start included), key figures first.  Nothing is built or installed: the suite runs from the
# plain checkout (PYTHONPATH=checkout, LDEQ_FAST_NO_EXT=1; the Triton kernels need no build).
#
#   OUT=dir bash bench/gpu_suite.sh 1     # command 1: model, streaming, bf16, solver kernels, training, profile, tests
#   OUT=dir bash bench/gpu_suite.sh 2     # command 2: torch.compile of the reference next to the fast path
#   bash bench/gpu_suite.sh --plan        # both step lists with their time budgets
#
# Every step runs under its own budget (a timeout: SIGINT, then SIGKILL 10 s later), and no step may start or
# run past the command's deadline (LDEQ_COMMAND_BUDGET, 400 s: a step's budget shrinks to what is left, and a
# step with nothing left is recorded as not started, exit 125), so a command ends within ~410 s whatever
# happens; a failed or stopped step is recorded and the next one runs (no step depends on another).  After each step the command's results are bundled into $OUT (default
# bench/results) as two files -- suite<N>.json (every step's status, its result JSON and log tail) and
# suite<N>_logs.tar.gz (full logs, raw JSON, junit XML) -- so a command stopped part way still returns
# what was done, within the GPU machine's limit on files returned.  A short table of the key figures is
# printed last.
#
#   LDEQ_SUITE_SMOKE=1          every step on the CPU at toy sizes (each step's smoke flags come last and
#                               override its own; budgets LDEQ_SMOKE_BUDGET=600 s, a busy 2-core CPU being no
#                               H200); tests/apps/test_gpu_suite.py runs both commands this way
#   LDEQ_STEP_TIMEOUT=S         every step's budget;  LDEQ_STEP_TIMEOUT_<step>=S one step's budget
#   LDEQ_GPU_STEPS="a b"        only these steps of the command
# Exit status: 0 when every step passed or was skipped for a missing optional package.
set -u
cd "$(dirname "$0")/.."
ROOT=$PWD

# name:budget_seconds:what -- the order is the run order (most wanted first)
STEPS_1=(
  "env:15:versions, GPU, where the kernels load from; no native extension is built or claimed"
  "kernels:40:every Triton kernel variant of the suite compiled for sm_90 in parallel (fills triton's cache)"
  "model_gpu:95:fast fp32/bf16 vs published-semantics eager (fp32, bf16) at batch 32; streaming batch 1, CUDA graph"
  "bf16_agreement:40:bf16 vs fp32 keypoints on the trained demo model (64 images)"
  "solver_kernels:35:Anderson update/mix GB/s (CUDA-graph replays, CUDA events) vs a 1 GiB copy; solver overhead"
  "train:65:training step time and peak memory per sample, batch 16/32/64, fast vs published (one repeat)"
  "profile:35:convolution share of the forward's device-kernel time, reference / fast / fast bf16, batch 32"
  "gpu_tests:55:pytest -m 'gpu or triton' on CUDA tensors (interrupted at its budget: counts so far)"
)
STEPS_2=(
  "compile_cell:240:torch.compile(reference cell, max-autotune-no-cudagraphs; cap 190 s) vs published eager and fast"
  "compile_model:90:torch.compile(reference model, default mode; cap 60 s per dtype) fp32 and bf16 vs fast"
  "cellops:35:fused LeakyReLU->GroupNorm and heatmap-head kernels vs eager PyTorch, forward and backward"
  "torchdeq_adapter:15:torchdeq's Anderson vs ldeq_fast's inside torchdeq (skipped where torchdeq is absent)"
)

plan() {
  local n total
  for n in 1 2; do
    local -n list="STEPS_$n"
    total=0
    for s in "${list[@]}"; do total=$((total + $(cut -d: -f2 <<<"$s"))); done
    echo "command $n: $total s of budgets (limit 420 s)"
    for s in "${list[@]}"; do
      IFS=: read -r name budget what <<<"$s"
      printf '  %-17s %4s s  %s\n' "$name" "$budget" "$what"
    done
  done
}

case "${1:-}" in
  --plan) plan; exit 0 ;;
  1 | 2) CMD=$1 ;;
  *) echo "usage: bash bench/gpu_suite.sh 1|2|--plan" >&2; exit 2 ;;
esac

OUT=${OUT:-bench/results}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/ldeq_suite${CMD}.XXXXXX")  # raw per-step files, bundled into $OUT
PY=${PYTHON:-python3}  # the GPU image's interpreter is python3 (no plain `python` there)
SMOKE=${LDEQ_SUITE_SMOKE:-0}
DEV=cuda
if [ "$SMOKE" = 1 ]; then DEV=cpu; fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" LDEQ_FAST_NO_EXT=1 PYTHONUNBUFFERED=1
if [ "$SMOKE" = 1 ]; then export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}; fi  # no OpenMP spinning on a shared CPU
smoke() { if [ "$SMOKE" = 1 ]; then echo "$@"; fi; }  # prints its arguments in smoke runs only
# pytest-xdist's -n N where it is installed (the GPU image has it), nothing elsewhere
xdist() { if $PY -c "import xdist" 2>/dev/null; then echo "-n $1"; fi; }

# --------------------------------------------------------------------------------------------------
# steps: step_<name> writes $WORK/<name>.json; $BUDGET is its budget in seconds

step_env() {
  $PY - "$WORK/env.json" "$DEV" <<'EOF'
import json, sys
import torch
import triton
import ldeq_fast
from ldeq_fast import _ext
from ldeq_fast.machine import machine_info
from ldeq_fast.ops import load_triton_kernels
dev = torch.device(sys.argv[2])
try:  # the backend each fused op resolves to for this device's tensors
    from ldeq_fast.ops import cpu_kernels, resolve
    backend = {op: resolve(op, torch.empty(0, device=dev)) for op in cpu_kernels()}
except Exception as exc:  # noqa: BLE001 - recorded, not hidden
    backend = f"unknown ({type(exc).__name__}: {exc})"
json.dump({"machine": machine_info(), "torch": torch.__version__, "triton": triton.__version__,
           "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
           "ldeq_fast": ldeq_fast.__file__, "kernels": load_triton_kernels("heatmap").__file__,
           "cpp_extension_loaded": _ext.has_cpp(),
           "cuda_extension": "none: the project has no .cu sources; CUDA tensors run the Triton kernels",
           "backend_for_device": backend}, open(sys.argv[1], "w"), indent=2)
EOF
}

step_kernels() {
  # the compile-only harness on the GPU machine: launches through triton's own launcher, compiled, not run; the
  # kernels land in triton's cache under the keys the real launches use, so the steps below find them compiled
  local f=tests/ops/test_triton_sm90.py targets=tests/ops/test_triton_sm90.py
  if [ "$SMOKE" = 1 ]; then  # two small groups on a CPU
    targets="$f::test_compile_only_specialises_arguments_equal_to_one $f::test_suite_launches_compile_for_sm90_without_spills[tests-heatmaps-solver]"
  fi
  LDEQ_SM90_ALL=1 $PY -m pytest -q -p no:cacheprovider $(xdist 16) $targets --junitxml "$WORK/kernels.xml"
  local rc=$?
  $PY bench/suite_report.py junit "$WORK/kernels.xml" "$WORK/kernels.json" "$rc"
  return $rc
}

step_model_gpu() {
  $PY bench/bench_model_gpu.py --phase eager --device $DEV --batch 32 --repeats 5 --json "$WORK/model_gpu.json" \
    $(smoke --small --batch 1 --repeats 1 --max-iters 2 --stream-frames 2)
}

step_bf16_agreement() {
  $PY bench/bf16_agreement.py --device $DEV --images 64 --json "$WORK/bf16_agreement.json" $(smoke --images 1)
}

step_solver_kernels() {
  $PY bench/bench_solver.py --device $DEV --repeats 3 --json "$WORK/solver_kernels.json" $(smoke --quick)
}

step_train() {
  $PY bench/bench_train.py --device $DEV --batch 16,32,64 --repeats 1 --budget-gb 80 --json "$WORK/train.json" \
    $(smoke --small --batch 1,2 --max-iters 2 --budget-gb 1)
}

step_profile() {
  $PY bench/profile_fast_path.py --device $DEV --batch 32 --json "$WORK/profile.json" $(smoke --small --batch 1)
}

step_gpu_tests() {
  # interrupted (SIGINT) before the step's budget ends, pytest still writes the junit XML of what ran
  local paths=tests/ limit=$((BUDGET > 30 ? BUDGET - 12 : (BUDGET * 3 + 3) / 4))
  if [ "$SMOKE" = 1 ]; then paths="tests/ops/test_anderson.py -k launchers_match"; fi
  # tests fill torch.empty with NaN through deterministic mode, in which cuBLAS needs a fixed workspace
  CUBLAS_WORKSPACE_CONFIG=:4096:8 timeout -s INT -k 5 "$limit" $PY -m pytest -m "gpu or triton" -q -p no:cacheprovider \
    $(xdist 8) $paths --junitxml "$WORK/gpu_tests.xml"
  local rc=$?
  $PY bench/suite_report.py junit "$WORK/gpu_tests.xml" "$WORK/gpu_tests.json" "$rc"
  return $rc
}

step_compile_cell() {
  $PY bench/bench_model_gpu.py --phase compile --compile-target cell --compile-mode max-autotune-no-cudagraphs \
    --compile-dtypes fp32 --compile-cap 190 --device $DEV --batch 32 --repeats 5 --json "$WORK/compile_cell.json" \
    $(smoke --small --batch 1 --repeats 1 --max-iters 2 --compile-mode default --compile-backend eager --compile-cap 0)
}

step_compile_model() {
  $PY bench/bench_model_gpu.py --phase compile --compile-target model --compile-mode default \
    --compile-dtypes fp32,bf16 --compile-cap 60 --device $DEV --batch 32 --repeats 5 --json "$WORK/compile_model.json" \
    $(smoke --small --batch 1 --repeats 1 --max-iters 2 --compile-dtypes fp32 --compile-backend eager --compile-cap 0)
}

step_cellops() {
  $PY bench/bench_cellops.py --device $DEV --json "$WORK/cellops.json" $(smoke --quick)
}

step_torchdeq_adapter() {
  if ! $PY -c "import torchdeq" 2>/dev/null; then
    echo "torchdeq is not installed here: step skipped" | tee "$WORK/torchdeq_adapter.skipped"
    return 0
  fi
  $PY bench/bench_torchdeq_adapter.py --device $DEV --json "$WORK/torchdeq_adapter.json" $(smoke --quick)
}

# --------------------------------------------------------------------------------------------------
# runner: each step under its budget, its status and results bundled into $OUT after it

export PY DEV SMOKE WORK
export -f smoke xdist $(compgen -A function step_)
BUNDLE="$OUT/suite$CMD.json"
LOGS="$OUT/suite${CMD}_logs.tar.gz"
rm -f "$BUNDLE" "$LOGS"
declare -n LIST="STEPS_$CMD"
SELECTED=${LDEQ_GPU_STEPS:-}
FAILED=0

START=$(date +%s)
DEADLINE=$((START + ${LDEQ_COMMAND_BUDGET:-400}))
if [ "$SMOKE" = 1 ]; then DEADLINE=$((START + ${LDEQ_COMMAND_BUDGET:-100000})); fi

run_step() {
  local name=$1 budget=$2 log="$WORK/$1.log" start rc var left
  var="LDEQ_STEP_TIMEOUT_$name"
  if [ "$SMOKE" = 1 ]; then budget=${LDEQ_SMOKE_BUDGET:-600}; fi
  budget=${!var:-${LDEQ_STEP_TIMEOUT:-$budget}}
  left=$((DEADLINE - $(date +%s) - 10))  # the SIGKILL grace stays inside the deadline
  if [ "$left" -lt "$budget" ]; then budget=$left; fi
  start=$(date +%s)
  if [ "$budget" -le 0 ]; then
    echo "=== step $name: not started, the command's budget is spent" | tee "$log"
    rc=125
  else
    echo "=== step $name (budget ${budget}s)"
    BUDGET=$budget timeout -s INT -k 10 "$budget" bash -c "step_$name" >"$log" 2>&1
    rc=$?
  fi
  $PY bench/suite_report.py record "$BUNDLE" "$WORK" "$name" "$rc" "$(($(date +%s) - start))" "$budget" "$CMD"
  tar -czf "$LOGS.tmp" -C "$WORK" . && mv "$LOGS.tmp" "$LOGS"
  if [ "$rc" -eq 124 ]; then echo "    STOPPED at its budget of ${budget}s"; fi
  if [ "$rc" -ne 0 ]; then echo "    FAILED (exit $rc): $(tail -n 3 "$log" | tr '\n' ' ')"; FAILED=$((FAILED + 1)); fi
}

for s in "${LIST[@]}"; do
  IFS=: read -r name budget _ <<<"$s"
  if [ -n "$SELECTED" ] && [[ " $SELECTED " != *" $name "* ]]; then continue; fi
  run_step "$name" "$budget"
done
for name in $SELECTED; do  # a selected name that is no step of this command fails like a step
  if ! printf '%s\n' "${LIST[@]}" | grep -q "^$name:"; then
    echo "=== step $name: no such step in command $CMD"
    $PY bench/suite_report.py record "$BUNDLE" "$WORK" "$name" 127 0 0 "$CMD"
    FAILED=$((FAILED + 1))
  fi
done

$PY bench/suite_report.py summary "$BUNDLE"
summary_rc=$?
rm -rf "$WORK"
if [ "$FAILED" -ne 0 ] || [ "$summary_rc" -ne 0 ]; then exit 1; fi

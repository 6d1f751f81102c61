#!/usr/bin/env bash
# The GPU machine's Python stack, checked on a CPU machine: Python 3.12, torch 2.11 (the cu130 build PyPI
# ships for Linux, as on the H200 image), triton 3.6 and numpy < 2.3 (triton 3.6's interpreter breaks on
# numpy >= 2.4) in a venv outside the repository, then
#   1. the Triton tests under TRITON_INTERPRET=1 (every kernel against its PyTorch reference, on CPU);
#   2. the compile-only harness (tests/ops/test_triton_sm90.py): every kernel variant the GPU suite launches,
#      launched through triton 3.6's own launcher, argument binding and specialisation, compiled to sm_90
#      machine code and not run; each group's registers/spills go to $TWIN_OUT/sm90/<group>.json.
#
#   bash bench/gpu_twin.sh                  # first run builds the venv (~4 GB of wheels), reruns reuse it
#   TWIN_VENV=/path bash bench/gpu_twin.sh  # another venv location;  TWIN_OUT=dir for the reports
#
# The repository is used as a plain checkout (PYTHONPATH, LDEQ_FAST_NO_EXT=1), as on the GPU machine: nothing
# is built or installed from it.  Exit status 0 when both parts pass; the last lines are the counts.
set -u
cd "$(dirname "$0")/.."
VENV=${TWIN_VENV:-$HOME/.cache/ldeq_fast_gpu_twin}
PY312=${TWIN_PYTHON:-}
if [ -z "$PY312" ]; then  # a Python 3.12 that runs (a pyenv shim may exist without the version selected)
  for c in python3.12 "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12; do
    if "$c" -c "import sys; assert sys.version_info[:2] == (3, 12)" 2>/dev/null; then PY312=$c; break; fi
  done
fi
TWIN_OUT=${TWIN_OUT:-${TMPDIR:-/tmp}/ldeq_fast_gpu_twin_out}
# the project's own run-time needs (collected by the test suite), present on the GPU machine too
PINS=(torch==2.11.0 triton==3.6.0 "numpy<2.3" pytest pytest-benchmark pytest-xdist scipy tqdm opencv-python-headless)
mkdir -p "$TWIN_OUT"

# ---- the venv (reused when its pins are already there)
stack_ok() {
  [ -x "$VENV/bin/python" ] && "$VENV/bin/python" - <<'EOF' 2>/dev/null
import sys, numpy, torch, triton, pytest, xdist, scipy, cv2, tqdm  # noqa: F401
ok = (sys.version_info[:2] == (3, 12) and torch.__version__.startswith("2.11.") and triton.__version__.startswith("3.6.")
      and tuple(int(v) for v in numpy.__version__.split(".")[:2]) < (2, 3))
sys.exit(0 if ok else 1)
EOF
}
if ! stack_ok; then
  echo "=== building the twin venv in $VENV (python: $PY312)"
  [ -n "$PY312" ] || { echo "no Python 3.12 interpreter found (set TWIN_PYTHON)"; exit 2; }
  "$PY312" -m venv "$VENV" || exit 2
  # no project constraints file: the twin pins its own stack
  PIP_CONSTRAINT= "$VENV/bin/python" -m pip install -q "${PINS[@]}" || exit 2
  stack_ok || { echo "the twin venv does not hold the pinned stack"; exit 2; }
fi
TWIN_PY="$VENV/bin/python"
"$TWIN_PY" -c "import sys, torch, triton, numpy; print('twin stack: python', sys.version.split()[0], '| torch',
torch.__version__, '| triton', triton.__version__, '| numpy', numpy.__version__)"

export PYTHONPATH="$PWD" LDEQ_FAST_NO_EXT=1 CUDA_VISIBLE_DEVICES="" LDEQ_FAST_TEST_THREADS=1
rc=0

# ---- 1. the Triton tests in the interpreter (the -m triton tests of the cell ops, the new kernel checks)
echo "=== 1. Triton tests under TRITON_INTERPRET=1"
TRITON_INTERPRET=1 "$TWIN_PY" -m pytest -q -p no:cacheprovider -m "triton" tests/ \
  --junitxml "$TWIN_OUT/interpreter.xml" 2>&1 | tail -n 25
[ "${PIPESTATUS[0]}" -eq 0 ] || rc=1

# ---- 2. the compile-only harness: every suite launch compiled for sm_90 through triton's real launcher
echo "=== 2. compile-only harness (sm_90)"
rm -rf "$TWIN_OUT/sm90"
LDEQ_SM90_ALL=1 LDEQ_SM90_REPORT_DIR="$TWIN_OUT/sm90" "$TWIN_PY" -m pytest -q -p no:cacheprovider -n "${TWIN_JOBS:-2}" \
  tests/ops/test_triton_sm90.py --junitxml "$TWIN_OUT/sm90.xml" 2>&1 | tail -n 25
[ "${PIPESTATUS[0]}" -eq 0 ] || rc=1

# ---- counts (last)
"$TWIN_PY" - "$TWIN_OUT" <<'EOF'
import json, os, sys
import xml.etree.ElementTree as ET
out = sys.argv[1]
for name in ("interpreter", "sm90"):
    p = os.path.join(out, f"{name}.xml")
    if not os.path.exists(p):
        print(f"{name}: no report")
        continue
    root = ET.parse(p).getroot()
    s = root if root.tag == "testsuite" else root.find("testsuite")
    t, f, e, sk = (int(s.get(k, 0)) for k in ("tests", "failures", "errors", "skipped"))
    print(f"{name}: {t - f - e - sk} passed, {f + e} failed, {sk} skipped")
d = os.path.join(out, "sm90")
groups = [json.load(open(os.path.join(d, f))) for f in sorted(os.listdir(d))] if os.path.isdir(d) else []
if groups:
    v = {x["hash"]: x for g in groups for x in g["variants"]}.values()  # one kernel can serve several groups
    spills = [x for x in v if x["n_spills"]]
    print(f"sm_90 kernel variants compiled: {len(v)} distinct, from {sum(g['launches'] for g in groups)} launches "
          f"in {len(groups)} groups (triton {groups[0]['triton']}); registers <= {max(x['n_regs'] for x in v)}; "
          f"spilling: {len(spills)}")
EOF
exit $rc

#!/usr/bin/env bash
# Set up ldeq_fast in the current Python environment.
#   bash scripts/setup.sh            # the package, its native extension, video/export/peers extras (peers:
#                                    # onnxruntime and OpenVINO, which ldeq-fast bench times beside the fast path)
#   bash scripts/setup.sh test       # ... plus test dependencies (pytest, torchdeq, onnxruntime, triton)
# An installed torch (e.g. your CUDA build) is kept.  Without one: a GPU machine gets the default torch
# wheel; a machine without a GPU gets a CPU-only wheel, not the multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PIP="$PY -m pip install --disable-pip-version-check -q"
TORCH_RANGE="torch>=2.5,<2.16"
CPU_TORCH=${LDEQ_FAST_CPU_TORCH:-2.13.0}          # a version with a local/CPU wheel
CPU_INDEX=${LDEQ_FAST_CPU_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}

$PIP "setuptools>=64" wheel ninja "pybind11>=2.10" "numpy>=1.24"
if $PY -c "import torch" 2>/dev/null; then
  echo "setup: keeping installed torch $($PY -c 'import torch; print(torch.__version__)')"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  $PIP "$TORCH_RANGE"
elif $PY -c "import urllib.request,sys; urllib.request.urlopen(sys.argv[1], timeout=3)" "$CPU_INDEX/" 2>/dev/null; then
  $PIP "$TORCH_RANGE" --index-url "$CPU_INDEX"
else
  $PIP "torch==$CPU_TORCH"
fi

extras="video,export,peers"
if [ "${1:-}" = "test" ]; then extras="$extras,test,triton"; fi
# --no-build-isolation: build the extension against the torch installed above, not a fresh one
$PIP --no-build-isolation -e ".[$extras]"
# with LDEQ_FAST_REQUIRE_NATIVE=1 (CI) a missing or broken extension fails the setup here
$PY -c "
import os, sys, ldeq_fast, ldeq_fast._ext as e
print('setup: ldeq_fast', ldeq_fast.__version__, '| C++ kernels:', e.has_cpp() or e.missing_reason())
sys.exit(0 if e.has_cpp() or os.environ.get('LDEQ_FAST_REQUIRE_NATIVE', '0') != '1' else 1)"

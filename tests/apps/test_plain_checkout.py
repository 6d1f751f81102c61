"""A plain checkout, as the GPU machine gets it: no install, no built extension, PYTHONPATH=checkout,
LDEQ_FAST_NO_EXT=1.  ``ldeq_fast`` and every Triton kernel module import from the checkout's own files and
run (here under TRITON_INTERPRET=1), and a failed kernel import leaves no half-loaded module behind.

The checkout is a copy of the files git would send (tracked and untracked-not-ignored: no ``_C*.so``), run
in a child interpreter from which the editable install's import finder is removed first, so nothing can be
found through an install.
"""
from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys

import pytest
from conftest import REPO

from ldeq_fast.ops import triton_available

ROOT = REPO

HIDE_INSTALL = """
import sys
def _installed(f):
    return getattr(f, "__module__", "").startswith("__editable__") or "editable" in type(f).__name__.lower()
sys.meta_path[:] = [f for f in sys.meta_path if not _installed(f)]
sys.path_hooks[:] = [h for h in sys.path_hooks if "editable" not in getattr(h, "__qualname__", repr(h)).lower()]
sys.path_importer_cache.clear()
"""

CHECK = """
import os, sys
import torch
root = sys.argv[1]
import ldeq_fast
from ldeq_fast import _ext
from ldeq_fast.ops import load_triton_kernels
from ldeq_fast.ops.leaky_relu_group_norm import leaky_relu_group_norm_ref
from ldeq_fast.ops.heatmap import softargmax_heatmaps_ref
assert ldeq_fast.__file__.startswith(root), ldeq_fast.__file__
assert not _ext.has_cpp(), "a plain checkout has no built extension"
names = ("anderson_update", "anderson_step", "anderson_mix", "leaky_relu_group_norm", "heatmap")
mods = {n: load_triton_kernels(n) for n in names}
for n, m in mods.items():
    assert m.__file__ == os.path.join(root, "kernels", n + ".py"), m.__file__
assert sys.modules["ldeq_fast.kernels"].__file__ == os.path.join(root, "kernels", "__init__.py")
x, w, b = torch.randn(2, 6, 5, 5), torch.randn(6), torch.randn(6)
out = mods["leaky_relu_group_norm"].leaky_relu_group_norm(x, w, b, 2, 1e-5, 0.01)[0]
assert torch.allclose(out, leaky_relu_group_norm_ref(x, w, b, 2, 1e-5, 0.01), atol=1e-5)
h, beta = torch.randn(1, 3, 6, 7), torch.rand(3) + 0.5
assert torch.allclose(mods["heatmap"].softargmax_heatmaps(h, beta)[0], softargmax_heatmaps_ref(h, beta), atol=1e-6)
print("plain checkout ok")
"""

BROKEN = """
import sys
root = sys.argv[1]
from ldeq_fast.ops import load_triton_kernels
try:
    load_triton_kernels("heatmap")
except ImportError as exc:
    assert "broken on purpose" in str(exc), exc
else:
    raise AssertionError("the broken kernels package imported")
assert "ldeq_fast.kernels" not in sys.modules, "a half-loaded ldeq_fast.kernels was left behind"
assert "ldeq_fast.kernels.heatmap" not in sys.modules
print("failed import left nothing behind")
"""


def _copy_checkout(dst: pathlib.Path) -> pathlib.Path:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                           check=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = ROOT / rel
        if src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)
    return dst


def _run(tree: pathlib.Path, code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(tree), LDEQ_FAST_NO_EXT="1", TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    return subprocess.run([sys.executable, "-c", HIDE_INSTALL + code, str(tree)], cwd=tree.parent, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def checkout(tmp_path_factory):
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs the git checkout to know which files travel")
    return _copy_checkout(tmp_path_factory.mktemp("plain") / "ldeq_fast_checkout")


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
def test_plain_checkout_imports_and_runs_the_triton_kernels(checkout):
    assert not list(checkout.glob("ldeq_fast/_C*")), "the copy must not hold a built extension"
    proc = _run(checkout, CHECK)
    assert proc.returncode == 0 and "plain checkout ok" in proc.stdout, proc.stdout + proc.stderr[-4000:]


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
def test_failed_kernel_import_leaves_no_half_loaded_module(checkout, tmp_path):
    tree = pathlib.Path(shutil.copytree(checkout, tmp_path / "broken"))
    init = tree / "kernels" / "__init__.py"
    init.write_text(init.read_text() + '\nraise ImportError("broken on purpose")\n')
    proc = _run(tree, BROKEN)
    assert proc.returncode == 0 and "left nothing behind" in proc.stdout, proc.stdout + proc.stderr[-4000:]

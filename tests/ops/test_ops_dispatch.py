"""One op design (ldeq_fast/ops/__init__.py): every fused op is one torch.library op with its CPU kernel from C++
and its CUDA kernel from Triton; ``resolve`` is the only place backend rules live, no backend name silently
runs the reference, and what ran is recorded.  Also the CI switch LDEQ_FAST_REQUIRE_NATIVE=1: a missing
extension fails instead of turning tests into skips."""
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from conftest import REPO as CHECKOUT
from conftest import needs_cpp, tiny_config

import ldeq_fast.ops as ops
from ldeq_fast import LDEQ
from ldeq_fast.ops import heatmap, leaky_relu_group_norm  # noqa: F401 - defines the ops

OPS = ("anderson_update", "anderson_step", "anderson_mix", "leaky_relu_group_norm", "leaky_relu_group_norm_backward",
       "softargmax_heatmaps", "softargmax_heatmaps_backward", "heatmap_keypoints", "heatmap_keypoints_backward")
REPO = str(CHECKOUT)


@pytest.fixture(autouse=True)
def fresh_resolution(monkeypatch):
    monkeypatch.delenv("LDEQ_FAST_BACKEND", raising=False)
    monkeypatch.delenv("LDEQ_FAST_REQUIRE_NATIVE", raising=False)
    ops._resolve.cache_clear()
    yield
    ops._resolve.cache_clear()


def test_every_fused_op_is_one_op_with_a_cuda_kernel():
    assert sorted(ops.cpu_kernels()) == sorted(OPS)
    for name in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"ldeq_fast::{name}", "CUDA"), name


@needs_cpp
def test_every_fused_op_has_its_cpu_kernel():
    assert all(ops.cpu_kernels().values()), ops.cpu_kernels()


@needs_cpp
def test_resolution_rules_on_cpu():
    t = torch.zeros(1)
    assert ops.resolve("leaky_relu_group_norm", t, "auto") == "cpp"
    assert ops.resolve("leaky_relu_group_norm", t, "cpp") == "cpp"
    assert ops.resolve("leaky_relu_group_norm", t, "torch") == "torch"
    if not ops.triton_interpret():
        with pytest.raises(RuntimeError, match="backend 'triton' runs CUDA tensors"):
            ops.resolve("leaky_relu_group_norm", t, "triton")
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        ops.resolve("leaky_relu_group_norm", t, "cuda")
    with pytest.raises(RuntimeError, match="no fused kernel for meta tensors"):
        ops.resolve("leaky_relu_group_norm", t.to("meta"), "cpp")


def test_a_missing_kernel_warns_and_says_so_or_fails_when_required(monkeypatch):
    t = torch.zeros(1)
    with pytest.warns(RuntimeWarning, match="runs the PyTorch reference"):
        assert ops.resolve("op_without_kernels", t, "auto") == "torch"
    with pytest.raises(RuntimeError, match=r"no C\+\+ kernel"):
        ops.resolve("op_without_kernels", t, "cpp")
    monkeypatch.setenv("LDEQ_FAST_REQUIRE_NATIVE", "1")
    with pytest.raises(RuntimeError, match=r"no C\+\+ kernel.*LDEQ_FAST_REQUIRE_NATIVE=1"):
        ops.resolve("op_without_kernels", t, "auto")


def test_recording_collects_what_ran():
    with ops.recording_backends() as outer:
        ops.note("a", "cpp")
        with ops.recording_backends() as inner:
            ops.note("a", "torch")
        ops.note("b", "triton")
    assert inner == {"a": "torch"}
    assert outer == {"a": "cpp,torch", "b": "triton"}


@pytest.mark.parametrize("backend", ["torch", pytest.param("auto", marks=needs_cpp)])
def test_the_model_records_the_backend_of_every_op(backend):
    model = LDEQ(tiny_config(backend=backend)).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64))
    want = "torch" if backend == "torch" else "cpp"
    assert out.stats.backend == want
    names = {"solver", "softargmax_heatmaps", "heatmap_keypoints"} | (
        {"leaky_relu_group_norm", "anderson_update", "anderson_step", "anderson_mix"} if backend != "torch" else set())
    assert names <= set(out.backends) and set(out.backends.values()) == {want}, out.backends


def test_define_refuses_an_op_defined_differently():
    with pytest.raises(ImportError, match="older sources"):
        ops.define("anderson_update", "(Tensor fx) -> Tensor", fake=lambda fx: fx, cuda=lambda fx: fx)


def _run_hidden_extension(code: str, **env):
    """``code`` in a fresh interpreter where ``import ldeq_fast._C`` fails, as with a failed build."""
    site = textwrap.dedent('''
        import sys
        class _HideExtension:
            def find_spec(self, name, path=None, target=None):
                if name == "ldeq_fast._C":
                    raise ImportError("hidden by tests/ops/test_ops_dispatch.py")
                return None
        sys.meta_path.insert(0, _HideExtension())
    ''')
    return subprocess.run([sys.executable, "-c", site + code], env={**os.environ, "CUDA_VISIBLE_DEVICES": "", **env},
                          capture_output=True, text=True, timeout=300, cwd=REPO)


def test_without_the_extension_the_fast_path_says_it_ran_the_reference():
    proc = _run_hidden_extension(textwrap.dedent('''
        import warnings, torch
        import ldeq_fast.ops as ops
        import ldeq_fast.ops.leaky_relu_group_norm as gn
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            with ops.recording_backends() as ran:
                gn.leaky_relu_group_norm(torch.randn(1, 4, 3, 3), None, None, 1)
        print(ran, [str(x.message) for x in w])
    '''), LDEQ_FAST_REQUIRE_NATIVE="0")
    assert proc.returncode == 0, proc.stderr
    assert "'leaky_relu_group_norm': 'torch'" in proc.stdout and "runs the PyTorch reference" in proc.stdout


def test_ci_switch_fails_the_test_run_when_the_extension_is_missing():
    """What .ci/run relies on: with LDEQ_FAST_REQUIRE_NATIVE=1 a missing extension fails the run (it would
    otherwise skip every C++ test and pass)."""
    proc = _run_hidden_extension(textwrap.dedent('''
        import sys, pytest
        sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", "tests/model/test_config.py"]))
    '''), LDEQ_FAST_REQUIRE_NATIVE="1")
    assert proc.returncode != 0
    assert "LDEQ_FAST_REQUIRE_NATIVE=1 but the C++ kernels" in proc.stdout + proc.stderr
    proc = _run_hidden_extension(textwrap.dedent('''
        import torch
        import ldeq_fast.ops.leaky_relu_group_norm as gn
        gn.leaky_relu_group_norm(torch.randn(1, 4, 3, 3), None, None, 1)
    '''), LDEQ_FAST_REQUIRE_NATIVE="1")
    assert proc.returncode != 0 and "no C++ kernel" in proc.stderr and "hidden by tests" in proc.stderr


def test_ci_runs_the_readme_command_with_the_switch(tmp_path):
    """.ci/run on a copy of the README whose test command is replaced by a probe: the probe is what runs, it
    sees LDEQ_FAST_REQUIRE_NATIVE=1, and its failure is CI's failure."""
    (tmp_path / ".ci").mkdir()
    (tmp_path / ".ci" / "run").write_bytes(open(os.path.join(REPO, ".ci", "run"), "rb").read())
    lines = open(os.path.join(REPO, "README.md")).read().splitlines()
    at = lines.index("<!-- test-command -->") + 2        # the marker, the code fence, then the command
    real = lines[at]
    lines[at] = 'echo "probe ran, native=${LDEQ_FAST_REQUIRE_NATIVE:-unset}"; exit 3'
    (tmp_path / "README.md").write_text("\n".join(lines) + "\n")
    env = {k: v for k, v in os.environ.items() if k != "LDEQ_FAST_REQUIRE_NATIVE"}
    proc = subprocess.run(["bash", str(tmp_path / ".ci" / "run")], env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 3 and "probe ran, native=1" in proc.stdout, (proc.stdout, proc.stderr)
    assert "pytest" in real and "tests" in real, real     # the real README's slot holds the test command


def test_no_warning_on_the_fast_path_when_the_kernels_exist():
    if not all(ops.cpu_kernels().values()):
        pytest.skip("the C++ kernels are not built")
    model = LDEQ(tiny_config(backend="auto")).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            model(torch.randn(1, 3, 64, 64))

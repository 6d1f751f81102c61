"""Every Triton kernel variant the GPU suite launches, compiled to H100/H200 (sm_90) machine code, no GPU.

The CPU runs of the kernels go through TRITON_INTERPRET=1, which executes each program in Python and accepts
things the real compiler rejects (dtype mixes in tl.where, non-constexpr shapes, loop-carried type changes).
Here the *launchers* in kernels/ are called as the suite calls them -- the model shapes of the default and
the demo model at the suite's batches (1 streaming, 8 solver bench, 16/32/64 training, 32 throughput, 64
bf16 agreement), fp32 / bf16 / fp64, NCHW and channels_last, forward and backward, the solver's
(slot, n, k) schedule -- with real-shaped (uninitialised) CPU tensors.  ``kernel[grid](...)`` then goes
through triton's own launcher: argument binding, the specialisation of integer arguments (== 1 becomes a
constant, multiples of 16 get a divisibility hint) and of pointer alignment, the cache key, and the
compile to sm_90 with ptxas; only the launch itself is skipped (``CompileOnly``).  Each distinct compiled
kernel is then read back with ``ptxas -v`` for registers, spills and stack: a spilling variant fails the test.

LDEQ_SM90_REPORT_DIR=dir writes each group's variants (kernel, specialisation, registers, spills, grids) as JSON
there.  bench/gpu_twin.sh runs this file under triton 3.6 (the GPU machine's version); the GPU suite runs it
first on the GPU machine itself, in parallel (pytest-xdist), where the compiles land in triton's cache under
the keys the real launches look up, so the benchmarks after it find their kernels compiled.
"""
from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import tempfile

import pytest
import torch
from conftest import REPO

from ldeq_fast import LDEQConfig
from ldeq_fast.ops import load_triton_kernels

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                                reason="needs Triton's compiler, not its interpreter")

SM90 = ("cuda", 90, 32)  # backend, compute capability, warp size
SUITE_BATCHES = (1, 8, 16, 32, 64)
# the GPU tests' shapes in every dtype (fp64/bf16/fp16 too: ~180 more compiles, minutes on a 2-core CPU) only
# where asked: bench/gpu_twin.sh and the GPU suite's `kernels` step set it; the model launches always run
ALL_TEST_DTYPES = os.environ.get("LDEQ_SM90_ALL") == "1"
DEMO = str(REPO / "ldeq_fast" / "assets" / "demo_synthetic.json")


# --------------------------------------------------------------------------------------------------------
# compile-only launches through triton's real launcher

class _SM90Driver:
    """The parts of triton's active driver a launch asks for before it runs: device, stream, target."""

    def __init__(self, target):
        self.target = target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        return torch.device("cpu")


class CompileOnly:
    """Inside ``with CompileOnly() as c:``, ``kernel[grid](...)`` binds, specialises and compiles its arguments
    for sm_90 exactly as a launch would (``JITFunction.run`` with warmup=True: everything but the launch),
    and records (kernel, grid, compiled kernel)."""

    def __init__(self):
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.runtime import driver
        from triton.runtime.jit import JITFunction

        self.driver, self.jit, self.triton = driver, JITFunction, triton
        self.fake = _SM90Driver(GPUTarget(*SM90))
        self.launches: list[tuple[str, str, tuple, object]] = []  # (label, kernel, grid, compiled kernel)
        self.label = ""

    def __enter__(self):
        orig = self.orig = self.jit.run
        def run(fn, *args, grid, warmup, **kwargs):
            kernel = orig(fn, *args, grid=grid, warmup=True, **kwargs)
            self.launches.append((self.label, fn.__name__, tuple(grid) if not callable(grid) else grid, kernel))
            return kernel

        self.previous = self.driver._active  # None on a machine without a GPU: no driver is active there
        self.driver.set_active(self.fake)
        self.jit.run = run
        return self

    def __exit__(self, *exc):
        self.jit.run = self.orig
        self.driver._active = self.previous


def _ptxas():
    from triton.backends.nvidia import compiler as nv

    try:
        return nv.get_ptxas(90).path          # triton >= 3.4: per-architecture tool
    except TypeError:
        return nv.get_ptxas().path


def ptxas_usage(ptx: str, ptxas: str) -> dict:
    """Registers and spill bytes of a kernel's PTX assembled for sm_90a (ptxas -v)."""
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as fh:
            fh.write(ptx)
        out = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", src, "-o", os.path.join(d, "k.cubin")],
                             capture_output=True, text=True, check=True)
    log = out.stderr + out.stdout
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    stack = re.search(r"(\d+) bytes stack frame", log)
    return {"n_regs": int(regs.group(1)) if regs else None,
            "n_spills": int(spill.group(1)) + int(spill.group(2)) if spill else 0,
            "stack_bytes": int(stack.group(1)) if stack else 0}


# --------------------------------------------------------------------------------------------------------
# what the suite launches

def _configs() -> dict:
    with open(DEMO) as fh:
        demo = json.load(fh)
    return {"default": LDEQConfig(), "demo": LDEQConfig.from_dict(demo)}


def norm_shapes(cfg: LDEQConfig) -> list[tuple[int, int, int, int, bool]]:
    """(C, H, W, groups, with residual) of every fused LeakyReLU -> GroupNorm in one cell evaluation: the
    reference cell run once on the meta device, its GroupNorm conv blocks recorded."""
    from ldeq_fast import LDEQ
    from ldeq_fast.model.layers import ConvBlock

    model = LDEQ(cfg.replace(backend="torch")).to("meta")
    cell = model.deq_layer.cell
    seen = []

    def hook(mod, args, kwargs, out):
        seen.append((*out.shape[1:], mod.norm.num_groups, kwargs.get("residual") is not None))

    for mod in cell.modules():
        if isinstance(mod, ConvBlock) and isinstance(mod.norm, torch.nn.GroupNorm):
            mod.register_forward_hook(hook, with_kwargs=True)
    s = cfg.heatmap_size
    with torch.no_grad():
        cell(torch.empty(1, cfg.z_width, s, s, device="meta"), torch.empty(1, cfg.injection_width, s, s, device="meta"))
    return sorted(set(seen))


def _t(*shape, dtype=torch.float32, channels_last=False):
    t = torch.empty(*shape, dtype=dtype)
    return t.to(memory_format=torch.channels_last) if channels_last else t


def launch_norm(gn, B, C, H, W, G, residual, dtype, channels_last, backward):
    x = _t(B, C, H, W, dtype=dtype, channels_last=channels_last)
    w, b = torch.empty(C), torch.empty(C)
    res = torch.empty_like(x) if residual else None
    _out, mean, rstd = gn.leaky_relu_group_norm(x, w, b, G, 1e-5, 0.01, residual=res)
    if backward:
        gn.leaky_relu_group_norm_backward(torch.empty_like(x), x, w, mean, rstd, G, 0.01)


def launch_heatmaps(hm, B, K, H, W, dtype, backward):
    h = torch.empty(B, K, H, W, dtype=dtype)
    beta = torch.empty(K, dtype=dtype)
    maps, hmax = hm.softargmax_heatmaps(h, beta)
    kpts, spread, published, mass = hm.heatmap_keypoints(maps)
    if backward:
        hm.softargmax_heatmaps_backward(torch.empty_like(maps), h, beta, maps, hmax)
        hm.heatmap_keypoints_backward(torch.empty_like(kpts), torch.empty_like(spread), torch.empty_like(published),
                                      maps, kpts, spread, published, mass)


def launch_solver(upd, step, mix, B, D, m, max_iter, beta=1.0, dtype=torch.float32):
    """The Anderson ops as ldeq_fast.solvers.fused.anderson_fused calls them: m = min(m, max_iter), slot = k % m,
    n = min(k + 1, m), no mix after the last evaluation (fpi calls it with m = 1, beta = damping)."""
    m = min(m, max_iter)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    x, fx, best = (torch.empty(B, D, dtype=dtype) for _ in range(3))
    F, G = torch.empty(B, m, D, dtype=dtype), torch.empty(B, m, D, dtype=dtype)
    gram = torch.empty(B, m, m, dtype=acc)
    flags = torch.zeros(4, B, dtype=torch.bool)
    stat, nstep = torch.empty(4, B, dtype=acc), torch.zeros(B, dtype=torch.int64)
    trace = torch.empty(max_iter, B, dtype=acc)
    for k in range(max_iter):
        slot, n = k % m, min(k + 1, m)
        norms = upd.anderson_update(fx, x, F, G, gram, flags[0], slot, n)
        alpha = step.anderson_step(gram, norms, flags, stat, nstep, trace, k, n, 5e-3, True, 1e-4, True, 1e4)
        mix.anderson_mix(F, G, alpha, flags, x, best, slot, n, beta, k < max_iter - 1)


@functools.lru_cache(maxsize=1)
def launch_groups() -> dict:
    """{group: [(label, thunk), ...]} of every launch of the GPU suite: the model-shaped launches by model,
    activation dtype and layout (each at all the suite's batches), the heatmap and solver launches by model,
    and the GPU tests' shapes (the op test files' shape lists)."""
    from test_anderson import ANDERSON_SHAPES
    from test_heatmap import HEATMAP_SHAPES
    from test_leaky_relu_group_norm import NORM_SHAPES

    gn = load_triton_kernels("leaky_relu_group_norm")
    hm = load_triton_kernels("heatmap")
    upd, step, mix = (load_triton_kernels(n) for n in ("anderson_update", "anderson_step", "anderson_mix"))
    groups: dict = {}
    for name, cfg in _configs().items():
        s, K, D = cfg.heatmap_size, cfg.n_keypoints, cfg.z_width * cfg.heatmap_size ** 2
        shapes = norm_shapes(cfg)
        for dtype in (torch.float32, torch.bfloat16):
            for cl in (False, True):
                groups[f"{name}-norm-{str(dtype)[6:]}-{'cl' if cl else 'nchw'}"] = [
                    (f"{name} B{B} norm {C}x{H}x{W}{'+res' if res else ''}",
                     lambda a=(gn, B, C, H, W, G, res, dtype, cl): launch_norm(*a, backward=True))
                    for B in SUITE_BATCHES for C, H, W, G, res in shapes]
        launches = []
        for B in SUITE_BATCHES:
            launches.append((f"{name} B{B} heatmaps", lambda a=(hm, B, K, s, s, torch.float32): launch_heatmaps(*a, True)))
            # inference and training solves (forward and the IFT backward: one schedule), streaming (RwR:
            # 1 iteration), fixed-point iteration (m = 1, damping)
            for max_iter in sorted({cfg.max_iters, 1, 2}):
                launches.append((f"{name} B{B} anderson x{max_iter}",
                                 lambda a=(upd, step, mix, B, D, cfg.anderson_m, max_iter): launch_solver(*a)))
            launches.append((f"{name} B{B} fpi", lambda a=(upd, step, mix, B, D, 1, cfg.max_iters): launch_solver(*a, 0.8)))
        groups[f"{name}-heatmaps-solver"] = launches
    test_dtypes = (torch.float32, torch.float64, torch.bfloat16, torch.float16) if ALL_TEST_DTYPES else (torch.float32,)
    for dtype in test_dtypes:
        groups[f"tests-norm-{str(dtype)[6:]}"] = [
            (f"test norm {N}x{C}x{H}x{W} {'cl' if cl else 'nchw'}",
             lambda a=(gn, N, C, H, W, G, True, dtype, cl): launch_norm(*a, backward=True))
            for N, C, H, W, G in NORM_SHAPES for cl in (False, True)]
    groups["tests-heatmaps-solver"] = [
        *((f"test heatmaps {shape} {dtype}", lambda a=(hm, *shape, dtype): launch_heatmaps(*a, True))
          for shape in HEATMAP_SHAPES for dtype in test_dtypes if dtype != torch.bfloat16 and dtype != torch.float16),
        *((f"test anderson {B}x{D} m{m} {dtype}",
           lambda a=(upd, step, mix, B, D, m, 2 * m, 1.0, dtype): launch_solver(*a))
          for B, D, m in ANDERSON_SHAPES for dtype in test_dtypes if dtype in (torch.float32, torch.float64))]
    return groups


try:
    GROUPS = list(launch_groups()) if os.environ.get("TRITON_INTERPRET") != "1" else []
except ImportError:  # no triton: the tests below skip
    GROUPS = []


# --------------------------------------------------------------------------------------------------------
# the tests

@pytest.fixture(scope="module")
def sm90_backend():
    triton = pytest.importorskip("triton")
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.backends.nvidia import compiler  # noqa: F401  (the NVIDIA backend is installed)
    except ImportError as exc:
        pytest.skip(f"Triton's NVIDIA backend is not available: {exc}")
    return triton


@pytest.mark.parametrize("group", GROUPS)
def test_suite_launches_compile_for_sm90_without_spills(group, sm90_backend):
    with CompileOnly() as c:
        for label, launch in launch_groups()[group]:
            c.label = label
            try:
                launch()
            except Exception as exc:
                raise AssertionError(f"{label}: {type(exc).__name__}: {exc}") from exc
    assert c.launches, "no kernel was launched"
    ptxas = _ptxas()
    variants, seen = [], {}
    for label, name, grid, kernel in c.launches:
        key = id(kernel)
        if key not in seen:
            assert len(kernel.asm["cubin"]) > 0, f"{name}: no machine code"
            src = getattr(kernel, "src", None)
            seen[key] = {"kernel": name, "num_warps": kernel.metadata.num_warps, "first_launch": label,
                         "attrs": str(getattr(src, "attrs", "")), "grids": set(), "hash": kernel.hash,
                         **ptxas_usage(kernel.asm["ptx"], ptxas)}
            variants.append(seen[key])
        seen[key]["grids"].add(str(grid))
    report = os.environ.get("LDEQ_SM90_REPORT_DIR")
    if report:
        os.makedirs(report, exist_ok=True)
        with open(os.path.join(report, f"{group}.json"), "w") as fh:
            json.dump({"triton": sm90_backend.__version__, "group": group, "launches": len(c.launches),
                       "variants": [{**v, "grids": sorted(v["grids"])} for v in variants]}, fh, indent=1)
    spilling = [v for v in variants if v["n_spills"]]  # a stack frame alone can be an fp64 division's slow path
    assert not spilling, "kernels spill registers to local memory on sm_90:\n" + "\n".join(
        f"  {v['kernel']} ({v['num_warps']} warps, {v['first_launch']}): {v['n_regs']} registers, "
        f"{v['n_spills']} spill bytes, {v['stack_bytes']} stack bytes" for v in spilling)


def test_compile_only_specialises_arguments_equal_to_one(sm90_backend):
    """The harness goes through triton's real specialisation: an integer argument equal to 1 becomes a
    compile-time constant (another kernel than for 17 and 31, which share one), and a ``do_not_specialize``
    argument (n) does not."""
    mix = load_triton_kernels("anderson_mix")
    with CompileOnly() as c:
        for D, n in ((1, 1), (17, 1), (31, 2), (31, 3)):
            F, x = torch.empty(2, 3, D), torch.empty(2, D)
            mix.anderson_mix(F, F, torch.empty(2, 3), torch.zeros(4, 2, dtype=torch.bool), x, x.clone(), 0, n, 1.0, True,
                             block=32)
    kernels = [k for *_, k in c.launches]
    assert kernels[0] is not kernels[1], "D = 1 was not specialised"
    assert kernels[1] is kernels[2] is kernels[3], "D = 17 / 31 or n = 1 / 2 / 3 compiled apart"

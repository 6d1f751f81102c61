"""Every Triton kernel compiled to H100 (sm_90) machine code, no GPU needed.

The CPU runs of the kernels go through TRITON_INTERPRET=1, which executes each program in Python and
accepts things the real compiler rejects (dtype mixes in tl.where, non-constexpr shapes, loop-carried
type changes).  Compiling with Triton's NVIDIA backend and ptxas catches those here instead of on the
first GPU run.  Each kernel is compiled for every dtype / layout / constexpr variant its launcher uses.
"""
import os

import pytest

from ldeq_fast.ops import load_triton_kernels

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                                reason="needs Triton's compiler, not its interpreter")

SM90 = ("cuda", 90, 32)  # backend, compute capability, warp size


@pytest.fixture(scope="module")
def compile_sm90():
    triton = pytest.importorskip("triton")
    try:
        from triton.backends.compiler import GPUTarget
        from triton.backends.nvidia.compiler import get_ptxas  # noqa: F401  (the NVIDIA backend is installed)
        from triton.compiler import ASTSource
    except ImportError as exc:
        pytest.skip(f"Triton's NVIDIA backend is not available: {exc}")
    target = GPUTarget(*SM90)

    def compile_(fn, types: dict, constexprs: dict, num_warps: int = 4):
        """Compile ``fn`` with pointer/scalar ``types`` by argument name (unnamed ones are i32)."""
        unknown = (set(types) | set(constexprs)) - set(fn.arg_names)
        assert not unknown, f"{fn.__name__} has no arguments {sorted(unknown)}"
        sig = {name: "constexpr" if name in constexprs else types.get(name, "i32") for name in fn.arg_names}
        kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs), target=target,
                                # fp fusion explicit: Triton 3.9 warns that its default will change
                                options={"num_warps": num_warps, "enable_fp_fusion": True})
        assert len(kernel.asm["cubin"]) > 0, f"{fn.__name__}: no machine code"
        return kernel

    return compile_


@pytest.mark.parametrize("fp", ["fp32", "fp64"])
def test_anderson_kernels_compile_for_sm90(compile_sm90, fp):
    import triton.language as tl

    mix = load_triton_kernels("anderson_mix")
    sol = load_triton_kernels("anderson_step")
    upd = load_triton_kernels("anderson_update")
    p = f"*{fp}"
    acc = tl.float64 if fp == "fp64" else tl.float32
    compile_sm90(upd._update_blocks_kernel, {"fx_ptr": p, "x_ptr": p, "F_ptr": p, "G_ptr": p, "active_ptr": "*i1",
                                             "part_ptr": "*fp64"}, {"BLOCK": 4096}, 8)
    compile_sm90(upd._update_reduce_kernel, {"part_ptr": "*fp64", "active_ptr": "*i1", "gram_ptr": p,
                                             "norms_ptr": p}, {"QP": 8, "RB": 64}, 1)
    for mixing, use_g in ((True, True), (True, False), (False, False)):
        compile_sm90(mix._mix_kernel, {"F_ptr": p, "G_ptr": p, "alpha_ptr": p, "flags_ptr": "*i1", "x_ptr": p,
                                       "best_ptr": p, "one_minus_beta": "fp32"},
                     {"MIX": mixing, "USE_G": use_g, "BLOCK": 4096, "ACC": acc}, 8)
    for stop_rel in (True, False):
        compile_sm90(sol._step_kernel, {"gram_ptr": p, "norms_ptr": p, "flags_ptr": "*i1", "stat_ptr": p,
                                        "nstep_ptr": "*i64", "trace_ptr": p, "alpha_ptr": p,
                                        **{f"{v}_{h}": "fp32" for v in ("tol", "lam", "div") for h in ("hi", "lo")}},
                     {"STOP_REL": stop_rel, "LAM_SCALED": True, "MP": 8, "IS_FP64": fp == "fp64"}, 1)


# the activation dtypes the fused LeakyReLU -> GroupNorm sees: fp32, autocast's bf16/fp16, float64 in tests
@pytest.mark.parametrize("fp", ["fp32", "bf16", "fp16", "fp64"])
def test_groupnorm_kernels_compile_for_sm90(compile_sm90, fp):
    gn = load_triton_kernels("leaky_relu_group_norm")
    x = f"*{fp}"
    fp64 = fp == "fp64"
    st = "*fp64" if fp64 else "*fp32"  # statistics dtype
    floats = {"slope": "fp32"}
    compile_sm90(gn._partial_moments_kernel, {"x_ptr": x, "pmean_ptr": st, "pm2_ptr": st, **floats},
                 {"FP64": fp64, "BLOCK_S": 64, "BLOCK_C": 32})
    compile_sm90(gn._group_stats_kernel, {"pmean_ptr": st, "pm2_ptr": st, "mean_ptr": st, "rstd_ptr": st,
                                          "group_size": "fp32", "eps": "fp32"}, {"FP64": fp64, "BLOCK": 1024})
    compile_sm90(gn._grad_sums_kernel, {"x_ptr": x, "g_ptr": x, "mean_ptr": st, "psdy_ptr": st, "psg_ptr": st,
                                        **floats}, {"FP64": fp64, "BLOCK_S": 64, "BLOCK_C": 32})
    for channels_last in (False, True):
        for has_res in (False, True):
            compile_sm90(gn._apply_kernel, {"x_ptr": x, "res_ptr": x, "out_ptr": x, "mean_ptr": st, "rstd_ptr": st,
                                            "w_ptr": st, "b_ptr": st, "total": "i64", **floats},
                         {"CHANNELS_LAST": channels_last, "HAS_RES": has_res, "FP64": fp64, "BLOCK": gn._ELEM_BLOCK})
        compile_sm90(gn._grad_apply_kernel, {"x_ptr": x, "g_ptr": x, "dx_ptr": x, "mu_ptr": st, "k1_ptr": st,
                                             "k2_ptr": st, "k3_ptr": st, "total": "i64", **floats},
                     {"CHANNELS_LAST": channels_last, "FP64": fp64, "BLOCK": gn._ELEM_BLOCK})


@pytest.mark.parametrize("fp", ["fp32", "fp64"])
def test_heatmap_kernels_compile_for_sm90(compile_sm90, fp):
    hm = load_triton_kernels("heatmap")
    p = f"*{fp}"
    fp64 = fp == "fp64"
    fwd_ptrs = {name: p for name in ("src_ptr", "beta_ptr", "hm_ptr", "hmax_ptr", "kp_ptr", "spread_ptr", "pub_ptr",
                                     "mass_ptr")}
    bwd_ptrs = {name: p for name in ("g_ptr", "h_ptr", "beta_ptr", "hm_ptr", "hmax_ptr", "gk_ptr", "gs_ptr", "gp_ptr",
                                     "kp_ptr", "spread_ptr", "pub_ptr", "mass_ptr", "out_ptr", "dbeta_ptr")}
    # the launchers' variants: head (exp) with or without the read-out, read-out alone in the backward
    for block in (hm._block(64 * 64), hm._block(17 * 23)):
        for exp, keypoints in ((True, True), (True, False), (False, True)):
            compile_sm90(hm._head_fwd_kernel, {**fwd_ptrs, "mass_eps": "fp32"},
                         {"EXP": exp, "KEYPOINTS": keypoints, "FP64": fp64, "BLOCK": block})
            compile_sm90(hm._head_bwd_kernel, {**bwd_ptrs, "mass_eps": "fp32"},
                         {"EXP": exp, "KEYPOINTS": keypoints, "FP64": fp64, "BLOCK": block})

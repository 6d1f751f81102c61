"""The published-script drop-in (ldeq_fast.compat.published) against an independent oracle of the published
forward: a hand-written published Anderson / fixed-point solver and keypoint read-out, run on the model's
own stem and cell."""
import argparse
import contextlib
import math
import random

import pytest
import torch
from test_published_checkpoint import published_args, write_published

from ldeq_fast import _ext, notices
from ldeq_fast.compat.published import LDEQ, load_checkpoint, root_solver, weights_init
from ldeq_fast.model import fast_path
from ldeq_fast.model.published import CheckpointError, load_published

B = 3
K, HM, IM = 19, 16, 64  # a small published-format model (19 = the AFLW layout)


# ---------------------------------------------------------------- the oracle (published semantics, from scratch)
def oracle_anderson(f, x0, max_iters, tol, stop_mode, m, lam, beta):
    """Batch-mean stopping; returns the iterate (not its image) with the lowest batch-mean residual."""
    n_b = x0.shape[0]
    X, F = [None] * m, [None] * m
    X[0], F[0] = x0.reshape(n_b, -1), f(x0).reshape(n_b, -1)
    X[1], F[1] = F[0], f(F[0].view_as(x0)).reshape(n_b, -1)
    low = {"abs": math.inf, "rel": math.inf}
    best, prev_abs, stability, traj = None, None, 1, []
    for k in range(2, max_iters + 2):
        n = min(k, m)
        Xs, Fs = torch.stack(X[:n], 1), torch.stack(F[:n], 1)
        G = Fs - Xs
        A = torch.zeros(n_b, n + 1, n + 1)
        A[:, 0, 1:], A[:, 1:, 0] = 1, 1
        A[:, 1:, 1:] = G @ G.transpose(1, 2) + lam * torch.eye(n)
        rhs = torch.zeros(n_b, n + 1, 1)
        rhs[:, 0] = 1
        alpha = torch.linalg.solve(A, rhs)[:, 1:, 0]
        x = beta * (alpha[:, None] @ Fs)[:, 0] + (1 - beta) * (alpha[:, None] @ Xs)[:, 0]
        fx = f(x.view_as(x0)).reshape(n_b, -1)
        X[k % m], F[k % m] = x, fx
        d_abs = (fx - x).norm(dim=1).mean().item()
        d_rel = ((fx - x).norm(dim=1) / (1e-5 + fx).norm(dim=1)).mean().item()
        if k == 2 or {"abs": d_abs, "rel": d_rel}[stop_mode] < low[stop_mode]:
            best = x.clone()
        low = {"abs": min(low["abs"], d_abs), "rel": min(low["rel"], d_rel)}
        stability = 0 if (prev_abs is not None and d_abs > prev_abs) else stability
        prev_abs = d_abs
        traj.append(x.view_as(x0).clone())
        if {"abs": d_abs, "rel": d_rel}[stop_mode] < tol:
            break
    return best.view_as(x0), dict(n_iters=k - 1, final_abs_diff=low["abs"], final_rel_diff=low["rel"],
                                  stability=stability), traj


def oracle_fpi(f, x0, max_iters, tol, stop_mode):
    n_b, x, stability, prev_abs, it = x0.shape[0], x0, 1, None, 0
    while it < max_iters:
        it += 1
        fx = f(x)
        d = (fx - x).reshape(n_b, -1).norm(dim=1)
        d_abs, d_rel = d.mean().item(), (d / (1e-5 + fx.reshape(n_b, -1).norm(dim=1))).mean().item()
        stability = 0 if (prev_abs is not None and d_abs > prev_abs) else stability
        prev_abs, x = d_abs, fx
        if {"abs": d_abs, "rel": d_rel}[stop_mode] < tol:
            break
    return x, dict(n_iters=it, final_abs_diff=d_abs, final_rel_diff=d_rel, stability=stability), None


def oracle_keypoints(heat):
    """Expected (x, y) / H and the published 'uncertainty' (pixel grid minus the normalised mean)."""
    H, W = heat.shape[-2:]
    p = heat / (1e-4 + heat.sum(dim=(2, 3), keepdim=True))
    cols = torch.arange(W).float().view(1, 1, 1, W).expand(1, 1, H, W)
    rows = torch.arange(H).float().view(1, 1, H, 1).expand(1, 1, H, W)
    kx, ky = (p * cols).sum(dim=(2, 3)) / H, (p * rows).sum(dim=(2, 3)) / H
    vx = ((cols - kx[..., None, None]) ** 2 * p).sum(dim=(2, 3))
    vy = ((rows - ky[..., None, None]) ** 2 * p).sum(dim=(2, 3))
    return torch.stack((kx, ky), 2), torch.sqrt(0.5 * vx + 0.5 * vy) / H


@torch.no_grad()
def oracle_forward(model, x, z0, args):
    inj = model.tail(x)
    zs = z0.shape
    sshape = (zs[0], z0[0].numel(), 1)

    def func(v):
        return model.deq_layer.cell(v.view(zs), inj).view(sshape)

    tol = args.rel_diff_target if args.stop_mode == "rel" else args.abs_diff_target
    mi = max(1, round(args.max_iters / 2)) if args.stochastic_max_iters else args.max_iters
    if args.solver == "anderson":
        z, logs, _ = oracle_anderson(func, z0.reshape(sshape), mi, tol, args.stop_mode, args.anderson_m,
                                     args.anderson_lam, args.anderson_beta)
    else:
        z, logs, _ = oracle_fpi(func, z0.reshape(sshape), mi, tol, args.stop_mode)
    if not args.take_one_less_inference_step:
        z = func(z)
    z = z.view(zs)
    kpts, unc = oracle_keypoints(z[:, : args.n_keypoints])
    return kpts, unc, z, logs


# ---------------------------------------------------------------- helpers
@pytest.fixture(params=["torch", "cpp"])
def backend(request):
    """'torch': the plain published path (the published arithmetic, compared at 1e-6); 'cpp': the default
    fused engine and fast cell on CPU (the same arithmetic rounded differently: landmarks within 1e-3
    heatmap px).  The Triton engine runs these checks in tests/solvers/test_fused_solver.py (interpreter child)."""
    if request.param == "cpp" and not _ext.has_cpp():
        pytest.skip(f"C++ extension not built: {_ext.missing_reason()}")
    return request.param


def tolerances(backend):
    """(keypoints, z / uncertainty, log residuals relative): the plain path reproduces the oracle's
    arithmetic; the fused one rounds differently (fp64 Anderson weights, reordered cell sums)."""
    if backend == "torch":
        return 1e-6, 1e-6, 1e-6
    # the logged residuals of this tol = 0 checkpoint are the fp32 noise floor itself: a run that rounds
    # differently may differ from them by their own size (relative 1)
    return 1e-3 / HM, 1e-4, 1.0


def load_like_the_script(path, **fast):
    ckpt = load_checkpoint(path)
    train_args = ckpt["args"]
    model = LDEQ(train_args, **fast)
    model.apply(weights_init)
    model.load_state_dict(ckpt["state_dict"], strict=False)
    model.eval()
    return model, train_args


@pytest.fixture(scope="module")
def ckpt_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "final.pth.tar"
    # tol 0: the solver runs every iteration, so the comparison covers the whole schedule
    write_published(path, published_args(max_iters=4, rel_diff_target=0.0, abs_diff_target=0.0, n_keypoints=K,
                                         z_width=K, heatmap_size=HM, im_size=IM))
    return path


def images(seed, n=B):
    return torch.randn(n, 3, IM, IM, generator=torch.Generator().manual_seed(seed))


def assert_logs_match(logs, ref, rel=1e-6):
    """``rel`` > 1e-6: a run that rounds differently (the fused engine).  Its late residuals sit at the fp32
    noise floor of this tol = 0 checkpoint (~1e-5 abs over ~5000 values of size ~1), so 'stability' (did the
    batch-mean abs residual ever rise) is rounding noise there and only the plain path must match it; the
    residuals themselves must be that noise (between 0 and twice the plain path's)."""
    assert logs["n_iters"] == ref["n_iters"]
    if rel <= 1e-6:
        assert logs["stability"] == ref["stability"]
    assert logs["final_abs_diff"] == pytest.approx(ref["final_abs_diff"], rel=rel)
    assert logs["final_rel_diff"] == pytest.approx(ref["final_rel_diff"], rel=rel)


# ---------------------------------------------------------------- the script sequence
def test_eval_then_rwr_matches_published_oracle(ckpt_path, backend):
    model, train_args = load_like_the_script(ckpt_path, backend=backend)
    tk, tz, tl = tolerances(backend)
    x1, x2 = images(1), images(2)
    z0 = torch.zeros(B, train_args.z_width, train_args.heatmap_size, train_args.heatmap_size)
    with torch.no_grad():
        out = model(x1, mode=train_args.model_mode, args=train_args, z0=z0)
    assert model.last_stats.backend == backend and model.last_stats.semantics == "published"
    assert set(out) == {"keypoints", "uncertainty", "fwd_logs", "z_star", "trajectory"}
    kpts, unc, z_ref, logs = oracle_forward(model, x1, z0, train_args)
    torch.testing.assert_close(out["keypoints"], kpts, atol=tk, rtol=0)
    torch.testing.assert_close(out["uncertainty"], unc, atol=tz, rtol=0)
    torch.testing.assert_close(out["z_star"], z_ref, atol=tz, rtol=0)
    assert not out["z_star"].requires_grad and out["trajectory"] == []
    assert_logs_match(out["fwd_logs"], logs, tl)
    if backend != "torch":  # the plain published path (eager cell, plain solver): within 1e-3 heatmap px
        plain, _ = load_like_the_script(ckpt_path, backend="torch")
        with torch.no_grad():
            ref = plain(x1, mode=train_args.model_mode, args=train_args, z0=z0)
        assert plain.last_stats.backend == "torch"
        assert (out["keypoints"] - ref["keypoints"]).abs().max().item() * HM < 1e-3
        assert out["fwd_logs"]["n_iters"] == ref["fwd_logs"]["n_iters"]
    assert out["fwd_logs"]["n_iters"] == 4 and out["fwd_logs"]["max_iters"] == 4

    # ldeq_fast's own model with published semantics gives the same landmarks (eager cell ops here, fused
    # epilogues in `model`: float32 rounding, ~1e-6 of the crop)
    ours = load_published(ckpt_path, solver_semantics="published", backend="torch")
    with torch.no_grad():
        torch.testing.assert_close(ours(x1, z0=z0).keypoints, out["keypoints"], atol=3e-6, rtol=0)

    # RwR: one solver iteration per frame, warm-started from the previous frame's z_star (args read at call time)
    train_args.max_iters = 1
    with torch.no_grad():
        out2 = model(x2, mode=train_args.model_mode, args=train_args, z0=out["z_star"])
    kpts2, _, _, logs2 = oracle_forward(model, x2, z_ref, train_args)
    torch.testing.assert_close(out2["keypoints"], kpts2, atol=tk, rtol=0)
    assert_logs_match(out2["fwd_logs"], logs2, tl)
    assert out2["fwd_logs"]["n_iters"] == 1 and out2["fwd_logs"]["max_iters"] == 1
    assert (out2["keypoints"] - out["keypoints"]).abs().max() > 1e-4  # a different frame, not a stale answer


def test_fpi_early_stop_take_one_less_and_stochastic_halving(ckpt_path, backend):
    model, a = load_like_the_script(ckpt_path, backend=backend)
    tk, _, tl = tolerances(backend)
    a.solver, a.stop_mode, a.abs_diff_target, a.max_iters = "fpi", "abs", 1e-3, 5
    a.take_one_less_inference_step, a.stochastic_max_iters = True, True  # eval: round(5 / 2) = 2 iterations
    x, z0 = images(3), torch.zeros(B, K, HM, HM)
    with torch.no_grad():
        out = model(x, mode="implicit", args=a, z0=z0.view(B, -1, 1))  # the solver's (B, D, 1) view is accepted
    assert model.last_stats.backend == backend and model.last_stats.method == "fpi"
    kpts, _, _, logs = oracle_forward(model, x, z0, a)
    torch.testing.assert_close(out["keypoints"], kpts, atol=tk, rtol=0)
    assert_logs_match(out["fwd_logs"], logs, tl)
    assert out["fwd_logs"]["max_iters"] == 2 and "final_solver_error" not in out["fwd_logs"]
    a.take_one_less_inference_step, a.stochastic_max_iters, a.abs_diff_target = False, False, 1e9
    with torch.no_grad():
        out = model(x, mode="implicit", args=a, z0=z0)
    kpts, _, _, logs = oracle_forward(model, x, z0, a)
    torch.testing.assert_close(out["keypoints"], kpts, atol=tk, rtol=0)
    assert out["fwd_logs"]["n_iters"] == 1 == logs["n_iters"]  # stopped at once
    assert out["fwd_logs"]["final_solver_error"] > 0


def test_trajectory_explicit_mode_and_default_args(ckpt_path):
    model, a = load_like_the_script(ckpt_path, backend="torch")
    x, z0 = images(4, n=1), torch.zeros(1, K, HM, HM)
    with torch.no_grad():
        out = model(x, mode="implicit", args=a, z0=z0, save_trajectory=True)
        if _ext.has_cpp():  # the fused engine keeps no iterates: a forced backend says so
            forced, _ = load_like_the_script(ckpt_path, backend="cpp")
            with pytest.raises(ValueError, match="save_trajectory"):
                forced(x, mode="implicit", args=a, z0=z0, save_trajectory=True)
        auto, _ = load_like_the_script(ckpt_path)  # 'auto' runs the plain solver for it, recorded as such
        with pytest.warns(RuntimeWarning, match="save_trajectory") if "published-trajectory" not in notices._said \
                else contextlib.nullcontext():
            auto(x, mode="implicit", args=a, z0=z0, save_trajectory=True)
        assert auto.last_stats.backend == "torch"
        _, _, traj = oracle_anderson(lambda v: model.deq_layer.cell(v.view(z0.shape), model.tail(x)).view(1, -1, 1),
                                     z0.view(1, -1, 1), 4, 0.0, "rel", 6, 1e-4, 1.0)
    assert "trajectory" not in out["fwd_logs"]  # moved out of the logs, z0 first, as published
    assert len(out["trajectory"]) == 1 + len(traj) == 5
    assert torch.equal(out["trajectory"][0], z0)
    for got, want in zip(out["trajectory"][1:], traj):
        torch.testing.assert_close(got, want.view(z0.shape), atol=1e-6, rtol=0)
    with torch.no_grad():
        exp = model(x, mode="explicit", args=a, z0=z0, save_trajectory=True)
        z = z0
        for _ in range(a.explicit_depth):
            z = model.deq_layer.cell(z, model.tail(x))
        default = model(x)  # args=None: the constructor's namespace; z0=None: zeros
    assert exp["fwd_logs"] is None and len(exp["trajectory"]) == 1 + a.explicit_depth
    torch.testing.assert_close(exp["z_star"], z, atol=1e-6, rtol=0)
    torch.testing.assert_close(default["keypoints"], out["keypoints"], atol=0, rtol=0)


def test_root_solver_interface():
    g = torch.Generator().manual_seed(0)
    W = 0.6 * torch.randn(2, 12, 12, generator=g) / 12 ** 0.5
    c = torch.randn(2, 12, 1, generator=g)

    def f(x):  # (B, D, 1) -> (B, D, 1), as the published model calls it
        return torch.tanh(W @ x + c)

    args = argparse.Namespace(solver="anderson", stop_mode="abs", abs_diff_target=1e-4, rel_diff_target=1e-4,
                              anderson_m=3, anderson_lam=1e-4, anderson_beta=0.9, verbose_solver=False)
    x0 = torch.zeros(2, 12, 1)
    z, logs = root_solver(f, x0, 20, args, save_trajectory=True)
    z_ref, ref, traj = oracle_anderson(f, x0, 20, 1e-4, "abs", 3, 1e-4, 0.9)
    torch.testing.assert_close(z, z_ref, atol=1e-6, rtol=0)
    assert_logs_match(logs, ref)
    assert logs["max_iters"] == 20 and len(logs["trajectory"]) == len(traj) == logs["n_iters"]
    assert logs["final_abs_diff"] < 1e-4 and logs["n_iters"] < 20  # converged before max_iters
    random.seed(5)
    _, logs = root_solver(f, x0, 7, args, stochastic_max_iters=True)
    random.seed(5)
    assert logs["max_iters"] == random.randint(1, 7) and logs["trajectory"] == []
    with pytest.raises(NotImplementedError, match="broyden"):
        root_solver(f, x0, 5, argparse.Namespace(**{**vars(args), "solver": "broyden"}))
    with pytest.raises(AttributeError, match="anderson_m"):
        root_solver(f, x0, 5, argparse.Namespace(solver="anderson", stop_mode="rel", rel_diff_target=1e-3))
    with pytest.raises(ValueError, match="NaN"):
        root_solver(f, torch.full_like(x0, float("nan")), 5, args)
    # the fused engine (the default without save_trajectory) gives the oracle's answer and logs
    for be in ("auto", "cpp") if _ext.has_cpp() else ("auto",):
        z, logs = root_solver(f, x0, 20, args, backend=be)
        torch.testing.assert_close(z, z_ref, atol=1e-5, rtol=0)
        assert_logs_match(logs, ref, 1e-2)  # residuals ~1e-4 of 12 values ~1: fp32 rounding ~1e-3 of them
        assert logs["trajectory"] == []


def oracle_train_keypoints(model, x, z0, args):
    """The published training forward: solve without a graph, one tracked step, and a backward hook that
    solves g = g J + grad with the same published Anderson."""
    inj = model.tail(x)
    zs, sshape = z0.shape, (z0.shape[0], z0[0].numel(), 1)

    def func(v):
        return model.deq_layer.cell(v.view(zs), inj).view(sshape)

    with torch.no_grad():
        z_star, _, _ = oracle_anderson(func, z0.reshape(sshape), args.max_iters, 0.0, "rel", 6, 1e-4, 1.0)
    z_star = z_star.requires_grad_()
    z_new = func(z_star)

    def hook(grad):
        handle.remove()  # the solve below backpropagates through z_new again: the hook must not re-fire

        def vjp(y):
            return torch.autograd.grad(z_new, z_star, y, retain_graph=True)[0] + grad

        return oracle_anderson(vjp, torch.zeros_like(grad), args.max_iters, 0.0, "rel", 6, 1e-4, 1.0)[0]

    handle = z_new.register_hook(hook)
    return oracle_keypoints(z_new.view(zs)[:, : args.n_keypoints])[0]


def test_training_step_gradients_match_published_oracle(ckpt_path):
    model, a = load_like_the_script(ckpt_path)
    a.max_iters = 2
    ours = load_published(ckpt_path, solver_semantics="published", backend="torch", max_iters=2)
    x, z0 = images(5, n=2), torch.zeros(2, K, HM, HM)
    for m in (model, ours):
        m.train()
    model(x, mode="implicit", args=a, z0=z0)["keypoints"].square().sum().backward()
    ours(x, z0=z0).keypoints.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    oracle_train_keypoints(model, x, z0, a).square().sum().backward()
    # fp32 rounding (the oracle stacks its histories instead of slicing a ring buffer) is measured against
    # the largest gradient: some gradients are zero up to rounding (a per-channel bias before softargmax)
    scale = max(float(g.abs().max()) for g in grads.values())
    assert math.isfinite(scale) and scale > 0
    for (name, p), q in zip(model.named_parameters(), ours.parameters()):
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-5 * scale, msg=name)
        torch.testing.assert_close(grads[name], q.grad, rtol=1e-4, atol=1e-5 * scale, msg=name)
    assert len(model.backward_log.stats) == 1 and model.backward_log.stats[0].semantics == "published"


def test_fast_semantics_are_per_sample(ckpt_path):
    model, a = load_like_the_script(ckpt_path, fast=True)
    a.max_iters, a.rel_diff_target = 6, 1e-3
    x = images(6)
    with torch.no_grad():
        batch = model(x, mode="implicit", args=a)
        alone = model(x[1:2], mode="implicit", args=a)
    torch.testing.assert_close(alone["keypoints"][0], batch["keypoints"][1], atol=1e-5, rtol=0)
    assert model.last_stats.semantics == "per_sample"
    assert set(batch["fwd_logs"]) >= {"n_iters", "final_abs_diff", "final_rel_diff", "stability", "max_iters"}
    with pytest.raises(ValueError, match="save_trajectory"):
        model(x, args=a, save_trajectory=True)
    # per call: the published model switched to per-sample semantics by an args field
    published, a2 = load_like_the_script(ckpt_path)
    a2.max_iters, a2.rel_diff_target, a2.ldeq_fast_semantics = 6, 1e-3, "per_sample"
    with torch.no_grad():  # (the fast=True model also reorders the cell's arithmetic: rounding-level changes)
        torch.testing.assert_close(published(x, args=a2)["keypoints"], batch["keypoints"], atol=1e-5, rtol=0)


def test_load_state_dict_errors(ckpt_path):
    ckpt = load_checkpoint(ckpt_path)
    model = LDEQ(ckpt["args"])
    sd = dict(ckpt["state_dict"])
    model.load_state_dict({f"module.{k}": v for k, v in sd.items()}, strict=False)  # DataParallel prefix
    assert torch.equal(model.state_dict()["deq_layer.cell.head.conv.bias"], sd["deq_layer.cell.head.conv.bias"])
    with pytest.warns(UserWarning, match="final_features_to_heatmaps.beta"):
        model.load_state_dict({**sd, "final_features_to_heatmaps.beta": torch.ones(1)}, strict=False)
    sd.pop("deq_layer.cell.hourglass.same2.conv.weight")
    with pytest.raises(CheckpointError, match="hourglass.same2.conv.weight"):
        model.load_state_dict(sd, strict=False)
    with pytest.raises(ValueError, match="z0 must have shape"):
        model(images(0, n=1), z0=torch.zeros(1, 5))


def test_config_published_semantics_runs_the_fused_engine(ckpt_path, backend):
    """``LDEQConfig(solver_semantics='published')`` (ldeq_fast's own model) runs the backend asked for, fused
    engine and fast cell included, within 1e-3 heatmap px of the plain published path."""
    from ldeq_fast.ops import recording_backends

    x, z0 = images(7), torch.zeros(B, K, HM, HM)
    plain = load_published(ckpt_path, solver_semantics="published", backend="torch")
    ours = load_published(ckpt_path, solver_semantics="published", backend=backend)
    with torch.no_grad(), recording_backends() as ran:
        out = ours(x, z0=z0)
    with torch.no_grad():
        ref = plain(x, z0=z0)
    assert ran["solver"] == backend and out.backends["solver"] == backend
    if backend != "torch":
        assert ran["anderson_step"] == backend and fast_path.reordered_math(ours.cfg)
    assert (out.keypoints - ref.keypoints).abs().max().item() * HM < 1e-3

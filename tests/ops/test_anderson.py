"""The three fused Anderson ops (update, step, mix) of every backend against their PyTorch references.

C++ tests skip when ldeq_fast._C is not built; Triton tests run the kernels on CPU under
TRITON_INTERPRET=1 (tiny shapes: the interpreter runs each program in Python).
"""

import pytest
import torch
from conftest import INTERPRETED, TRITON_DEVICE, close_rel, needs_cpp

import ldeq_fast.ops.anderson as A
from ldeq_fast import _ext
from ldeq_fast.solvers.reference import anderson_weights_reference

pytestmark = pytest.mark.usefixtures("one_thread")



@pytest.fixture
def triton_interpret():
    pytest.importorskip("triton")
    if not INTERPRETED:
        pytest.skip("runs in the TRITON_INTERPRET=1 child run (tests/interpreter_child.py)")


@pytest.fixture(params=["cpp", pytest.param("triton", marks=pytest.mark.triton)])
def backend(request):
    if request.param == "cpp":
        if not _ext.has_cpp():
            pytest.skip(f"C++ extension not built: {_ext.missing_reason()}")
    else:
        request.getfixturevalue("triton_interpret")
    return request.param


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _ring(B, m, D, dtype, g):
    return torch.randn(B, m, D, generator=g, dtype=dtype), torch.randn(B, m, D, generator=g, dtype=dtype)


def _mask(B, g):
    mask = torch.rand(B, generator=g) < 0.6
    mask[0] = True                       # at least one active sample
    if B > 1:
        mask[-1] = False                 # and one inactive
    return mask


def _close(a, b, dtype, scale=1.0):
    rtol, atol = (1e-5, 1e-6) if dtype == torch.float32 else (1e-10, 1e-12)
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol * scale, equal_nan=True)


# ---------------------------------------------------------------------------------------------------------
# anderson_update

def _check_update(backend, B, D, m, dtype, seed):
    g = _gen(seed)
    slot_n = [(0, 1)] if m == 1 else [(m - 1, m), (1, 2)]       # full history and partially filled
    for slot, n in slot_n:
        F, G = _ring(B, m, D, dtype, g)
        F[:, slot] = float("nan")                               # must be written for active samples
        G[:, slot] = float("nan")
        gram = torch.randn(B, m, m, generator=g, dtype=A.acc_dtype(dtype))
        gram[:, slot, :] = float("nan")
        gram[:, :, slot] = float("nan")
        fx = torch.randn(B, D, generator=g, dtype=dtype)
        x = torch.randn(B, D, generator=g, dtype=dtype)
        active = _mask(B, g)
        Fr, Gr, gramr = F.clone(), G.clone(), gram.clone()
        norms_r = A.anderson_update_ref(fx, x, Fr, Gr, gramr, active, slot, n)
        norms = A.anderson_update(fx, x, F, G, gram, active, slot, n, backend=backend)
        assert torch.equal(F.nan_to_num(7.0), Fr.nan_to_num(7.0)) and torch.equal(G.nan_to_num(7.0), Gr.nan_to_num(7.0))
        assert not F[active, slot].isnan().any() and not gram[active, slot, :n].isnan().any()
        _close(gram, gramr, dtype, scale=D)                     # dot products of D unit-size terms
        _close(norms, norms_r, dtype, scale=D)
        assert (norms[~active] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("B", [1, 3, 8])
@pytest.mark.parametrize("D", [1, 37, 1001])
@pytest.mark.parametrize("m", [1, 2, 6])
@needs_cpp
def test_update_cpp(B, D, m, dtype):
    _check_update("cpp", B, D, m, dtype, seed=B * 1000 + D + m)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@needs_cpp
def test_update_cpp_multichunk(dtype):
    """D spans several fixed-size work chunks (8192 elements) whose partial sums are combined."""
    _check_update("cpp", 3, 20011, 6, dtype, seed=11)


@pytest.mark.parametrize("B,D,m,dtype", [(1, 1, 1, torch.float32), (3, 37, 2, torch.float32),
                                         (8, 1001, 6, torch.float32), (3, 37, 6, torch.float64)])
def test_update_triton(triton_interpret, B, D, m, dtype):
    _check_update("triton", B, D, m, dtype, seed=B + D + m)


def test_update_triton_multiblock(triton_interpret):
    """Several D-blocks per sample, so the cross-block reduction is exercised."""
    from ldeq_fast.ops import load_triton_kernels

    g = _gen(5)
    B, m, D = 3, 3, 37
    F, G = _ring(B, m, D, torch.float32, g)
    gram = torch.full((B, m, m), float("nan"))
    fx, x = torch.randn(B, D, generator=g), torch.randn(B, D, generator=g)
    active = torch.tensor([True, False, True])
    Fr, Gr, gramr = F.clone(), G.clone(), gram.clone()
    norms_r = A.anderson_update_ref(fx, x, Fr, Gr, gramr, active, 1, 3)
    norms = load_triton_kernels("anderson_update").anderson_update(fx, x, F, G, gram, active, 1, 3, block=16)
    _close(gram, gramr, torch.float32, scale=D)
    _close(norms, norms_r, torch.float32, scale=D)
    assert torch.equal(F, Fr) and torch.equal(G, Gr)


# ---------------------------------------------------------------------------------------------------------
# anderson_step

def _step_state(B, m, k, dtype, g, T=12):
    acc = A.acc_dtype(dtype)
    flags = torch.zeros(4, B, dtype=torch.bool)
    flags[0] = _mask(B, g)
    flags[1] = ~flags[0] & (torch.rand(B, generator=g) < 0.5)
    flags[2] = ~flags[0] & ~flags[1]
    flags[3] = torch.rand(B, generator=g) < 0.5                  # stale: must be overwritten
    stat = torch.rand(4, B, generator=g, dtype=acc) + 0.5
    nstep = torch.randint(0, 5, (B,), generator=g)
    trace = torch.full((T, B), -1.0, dtype=acc)                  # row k must be written for every sample
    return flags, stat, nstep, trace


def _check_step(backend, B, m, k, dtype, seed, lam_mode="scaled", stop_rel=True):
    g = _gen(seed)
    acc = A.acc_dtype(dtype)
    n = min(k + 1, m)
    Gh = torch.randn(B, m, 50, generator=g, dtype=torch.float64)
    gram = torch.einsum("bid,bjd->bij", Gh, Gh).to(acc)
    norms = (torch.rand(B, 3, generator=g, dtype=torch.float64) * 2).to(acc)
    if B >= 3:
        norms[1, 0] = float("nan")                                # diverged sample
        norms[2, 0] = 1e-12                                       # converged sample
    flags, stat, nstep, trace = _step_state(B, m, k, dtype, g)
    flags[0, :3] = True
    ref_state = [t.clone() for t in (flags, stat, nstep, trace)]
    args = (k, n, 1e-3, stop_rel, 1e-4, lam_mode == "scaled", 1e4)
    alpha_r = A.anderson_step_ref(gram, norms, *ref_state, *args)
    alpha = A.anderson_step(gram, norms, flags, stat, nstep, trace, *args, backend=backend)
    assert torch.equal(flags, ref_state[0])
    assert torch.equal(nstep, ref_state[2])
    _close(stat, ref_state[1], dtype)
    _close(trace, ref_state[3], dtype)
    assert not (trace[k] == -1).any()
    assert not alpha.isnan().any()
    _close(alpha, alpha_r, dtype)
    # the weights are the bordered system's solution, as anderson_weights_reference computes it
    still = flags[0]
    valid = torch.zeros(B, m, dtype=torch.bool)
    valid[:, :n] = True
    w_ref = anderson_weights_reference(Gh, valid, 1e-4, lam_mode)
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(alpha[still].double(), w_ref[still], rtol=tol, atol=tol)
    assert (alpha[~still] == 0).all()
    return flags


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("B", [1, 3, 8])
@pytest.mark.parametrize("m", [1, 2, 6])
@pytest.mark.parametrize("k", [0, 1, 7])
@needs_cpp
def test_step_cpp(B, m, k, dtype):
    _check_step("cpp", B, m, k, dtype, seed=B * 100 + m * 10 + k)


@needs_cpp
@pytest.mark.parametrize("lam_mode", ["scaled", "absolute"])
@pytest.mark.parametrize("stop_rel", [True, False])
def test_step_cpp_modes(lam_mode, stop_rel):
    _check_step("cpp", 4, 5, 6, torch.float64, seed=3, lam_mode=lam_mode, stop_rel=stop_rel)


@pytest.mark.parametrize("B,m,k,dtype,lam_mode", [(1, 1, 0, torch.float32, "scaled"),
                                                  (3, 6, 7, torch.float32, "scaled"),
                                                  (3, 2, 1, torch.float64, "absolute"),
                                                  (8, 6, 3, torch.float64, "scaled")])
def test_step_triton(triton_interpret, B, m, k, dtype, lam_mode):
    _check_step("triton", B, m, k, dtype, seed=B + m + k, lam_mode=lam_mode)


def test_step_semantics(backend):
    """Stopping rules spelled out: first residual, divergence factor, tolerance, best tracking."""
    B, m = 4, 3
    gram = torch.eye(m).repeat(B, 1, 1)
    flags, stat, nstep, trace = (torch.zeros(4, B, dtype=torch.bool), torch.full((4, B), float("inf")),
                                 torch.zeros(B, dtype=torch.long), torch.full((3, B), float("nan")))
    flags[0] = True
    stat[3] = float("nan")
    abs_sq = torch.tensor([4.0, 1.0, float("inf"), 9.0])
    norms = torch.stack([abs_sq, torch.full((B,), 1e6), torch.full((B,), 1e6)], 1)
    A.anderson_step(gram, norms, flags, stat, nstep, trace, 0, 1, 0.5, False, 1e-4, True, 2.0, backend=backend)
    assert flags[0].tolist() == [True, True, False, True] and flags[2].tolist() == [False, False, True, False]
    assert stat[3, :2].tolist() == [2.0, 1.0] and stat[0].tolist()[:2] == [2.0, 1.0]
    assert flags[3].tolist() == [True, True, False, True]
    # k = 1: sample 0 gets worse (no improvement), sample 1 blows past 2x its first residual,
    # sample 3 drops below tol
    norms = torch.stack([torch.tensor([5.0, 9.0, 0.0, 0.01]), torch.full((B,), 1e6), torch.full((B,), 1e6)], 1)
    A.anderson_step(gram, norms, flags, stat, nstep, trace, 1, 2, 0.5, False, 1e-4, True, 2.0, backend=backend)
    assert flags[0].tolist() == [True, False, False, False]
    assert flags[1].tolist() == [False, False, False, True]
    assert flags[2].tolist() == [False, True, True, False]
    assert flags[3].tolist() == [False, False, False, True]
    assert nstep.tolist() == [2, 2, 1, 2]
    assert trace[1, 2].isnan() and trace[1, 3].item() == pytest.approx(0.1)
    assert stat[0].tolist()[0] == 2.0 and stat[1, 3].item() == pytest.approx(0.1)


def test_step_rank_deficient_falls_back_to_fixed_point(backend):
    """lam = 0 and two identical residuals: the system is singular; the step is plain iteration."""
    B, m, k = 2, 3, 2
    Gh = torch.randn(B, m, 9, dtype=torch.float64)
    Gh[:, 1] = Gh[:, 0]
    gram = torch.einsum("bid,bjd->bij", Gh, Gh)
    flags, stat, nstep, trace = (torch.zeros(4, B, dtype=torch.bool), torch.full((4, B), float("inf"), dtype=torch.float64),
                                 torch.zeros(B, dtype=torch.long), torch.full((4, B), float("nan"), dtype=torch.float64))
    flags[0] = True
    stat[3] = 1.0
    norms = torch.ones(B, 3, dtype=torch.float64)
    alpha = A.anderson_step(gram, norms, flags, stat, nstep, trace, k, 3, 0.0, True, 0.0, False, 1e4, backend=backend)
    expected = torch.zeros(B, m, dtype=torch.float64)
    expected[:, k % m] = 1.0
    assert torch.equal(alpha, expected)


# ---------------------------------------------------------------------------------------------------------
# anderson_step under the published policies (batch-mean stop, published residuals, best iterate / last)

def _check_step_published(backend, B, m, k, dtype, seed, policy, stop_rel=True, stop=False, active=True):
    g = _gen(seed)
    acc = A.acc_dtype(dtype)
    n = min(k + 1, m)
    Gh = torch.randn(B, m, 50, generator=g, dtype=torch.float64)
    gram = torch.einsum("bid,bjd->bij", Gh, Gh).to(acc)
    norms = (torch.rand(B, 3, generator=g, dtype=torch.float64) * 2 + 0.1).to(acc)
    flags, stat, nstep, trace = _step_state(B, m, k, dtype, g)
    flags[0] = active                                             # a published batch moves together
    flags[1] = False
    flags[2] = False
    kfirst = 2 if policy == A.POLICY_PUBLISHED_ANDERSON else 0
    tol = 1e9 if stop else 1e-12
    ref_state = [t.clone() for t in (flags, stat, nstep, trace)]
    args = (k, n, tol, stop_rel, 1e-4, False, 1e4, policy)
    alpha_r = A.anderson_step_ref(gram, norms, *ref_state, *args)
    alpha = A.anderson_step(gram, norms, flags, stat, nstep, trace, *args, backend=backend)
    assert torch.equal(flags, ref_state[0]) and torch.equal(nstep, ref_state[2])
    _close(stat, ref_state[1], dtype)
    _close(trace, ref_state[3], dtype)
    assert not (trace[k] == -1).any()
    _close(alpha, alpha_r, dtype)
    # spelled out: the batch means of the published residuals
    abs_r = norms[:, 0].double().sqrt()
    rel_r = abs_r / (norms[:, 2].double().sqrt() if policy == A.POLICY_PUBLISHED_ANDERSON
                     else norms[:, 1].double().sqrt() + 1e-5)
    mres = (rel_r if stop_rel else abs_r).mean()
    counted = active and k >= kfirst
    if counted:
        torch.testing.assert_close(trace[k].double(), mres.expand(B), rtol=1e-5, atol=0)
        assert flags[0].tolist() == [not stop] * B and flags[1].tolist() == [stop] * B
    else:
        assert trace[k].isnan().all() and not flags[3].any() and not flags[1].any()
    assert flags[0].tolist() == [active and not (counted and stop)] * B
    assert not flags[2].any()                                    # no divergence freezing in published runs
    assert (alpha[~flags[0]] == 0).all()


@pytest.mark.parametrize("policy", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("B,m,k", [(1, 2, 0), (1, 6, 2), (3, 6, 1), (3, 6, 2), (5, 3, 7), (8, 6, 4)])
@pytest.mark.parametrize("stop", [False, True])
@needs_cpp
def test_step_published_cpp(B, m, k, dtype, policy, stop):
    _check_step_published("cpp", B, m, k, dtype, B * 100 + m * 10 + k, policy, stop=stop)


@needs_cpp
@pytest.mark.parametrize("policy", [1, 2])
def test_step_published_cpp_abs_and_inactive(policy):
    _check_step_published("cpp", 4, 5, 6, torch.float32, 9, policy, stop_rel=False)
    _check_step_published("cpp", 4, 5, 6, torch.float64, 9, policy, stop_rel=False, stop=True)
    _check_step_published("cpp", 4, 5, 6, torch.float32, 9, policy, active=False)


@pytest.mark.parametrize("B,m,k,dtype,policy,stop", [(1, 2, 0, torch.float32, 1, False),
                                                     (3, 6, 2, torch.float32, 1, True),
                                                     (5, 3, 7, torch.float32, 1, False),
                                                     (3, 6, 1, torch.float64, 2, True),
                                                     (8, 6, 4, torch.float64, 1, False),
                                                     (5, 1, 3, torch.float32, 2, False)])
def test_step_published_triton(triton_interpret, B, m, k, dtype, policy, stop):
    _check_step_published("triton", B, m, k, dtype, B + m + k, policy, stop=stop)
    _check_step_published("triton", B, m, k, dtype, B + m + k + 1, policy, stop_rel=False, active=k % 2 == 0)


def test_step_published_semantics(backend):
    """The published Anderson's bookkeeping spelled out over a run: iterations 0 and 1 are not counted, the
    first counted one is the best even when worse, ties keep the earlier, the batch mean stops everyone."""
    B, m = 2, 3
    gram = torch.eye(m).repeat(B, 1, 1)
    flags, stat, nstep, trace = (torch.zeros(4, B, dtype=torch.bool), torch.full((4, B), float("inf")),
                                 torch.zeros(B, dtype=torch.long), torch.full((6, B), float("nan")))
    flags[0] = True

    def step(k, abs0, abs1, tol=0.5):
        norms = torch.tensor([[abs0 ** 2, 1.0, 1.0], [abs1 ** 2, 1.0, 1.0]])   # ||fx + 1e-5|| = 1: rel = abs
        A.anderson_step(gram, norms, flags, stat, nstep, trace, k, min(k + 1, m), tol, False, 1e-4, False, 1e4,
                        A.POLICY_PUBLISHED_ANDERSON, backend=backend)
        return flags[3].tolist()

    assert step(0, 0.0, 0.0) == [False, False] and flags[0].all()        # not counted: no stop at residual 0
    assert step(1, 0.1, 0.1) == [False, False] and trace[:2].isnan().all()
    assert step(2, 3.0, 5.0) == [True, True] and stat[0].tolist() == [4.0, 4.0]   # first counted: best
    assert step(3, 4.0, 4.0) == [False, False]                           # a tie keeps the earlier
    assert stat[0].tolist() == [4.0, 4.0] and stat[1].tolist() == [4.0, 4.0]
    assert step(4, 2.0, 2.0) == [True, True] and trace[4].tolist() == [2.0, 2.0]
    assert flags[0].all() and not flags[1].any()
    assert step(5, 0.2, 0.6) == [True, True]                             # mean 0.4 < 0.5: everyone stops
    assert not flags[0].any() and flags[1].all() and nstep.tolist() == [6, 6]


def test_step_published_ties_keep_the_earlier(backend):
    B, m = 1, 2
    gram = torch.eye(m).repeat(B, 1, 1)
    flags, stat, nstep, trace = (torch.zeros(4, B, dtype=torch.bool), torch.full((4, B), float("inf")),
                                 torch.zeros(B, dtype=torch.long), torch.full((5, B), float("nan")))
    flags[0] = True
    got = []
    for k, a in enumerate([1.0, 1.0, 2.0, 2.0, 1.5]):
        norms = torch.tensor([[a * a, 1.0, 1.0]])
        A.anderson_step(gram, norms, flags, stat, nstep, trace, k, min(k + 1, m), 0.0, True, 1e-4, False, 1e4,
                        A.POLICY_PUBLISHED_ANDERSON, backend=backend)
        got.append(bool(flags[3, 0]))
    assert got == [False, False, True, False, True]
    # the fixed-point policy counts from iteration 0 and keeps the last
    flags[:] = False
    flags[0] = True
    for k, a in enumerate([1.0, 3.0]):
        norms = torch.tensor([[a * a, 4.0, 0.0]])                        # rel = abs / (||fx|| + 1e-5)
        A.anderson_step(gram[:, :1, :1].contiguous(), norms, flags, stat, nstep, trace, k, 1, 0.0, True, 0.0, False,
                        1e4, A.POLICY_PUBLISHED_FPI, backend=backend)
        assert bool(flags[3, 0]) and stat[0, 0].item() == pytest.approx(a / (2 + 1e-5))


def test_update_norms_hold_the_published_denominator():
    """norms[:, 2] is ||fx + 1e-5||^2, the published relative residual's denominator."""
    g = _gen(3)
    B, m, D = 3, 2, 41
    F, G = _ring(B, m, D, torch.float32, g)
    gram = torch.zeros(B, m, m)
    fx, x = torch.randn(B, D, generator=g), torch.randn(B, D, generator=g)
    norms = A.anderson_update_ref(fx, x, F, G, gram, torch.ones(B, dtype=torch.bool), 0, 1)
    torch.testing.assert_close(norms[:, 2], (1e-5 + fx).norm(dim=1) ** 2, rtol=1e-6, atol=0)
    torch.testing.assert_close(norms[:, 1], fx.norm(dim=1) ** 2, rtol=1e-6, atol=0)


# ---------------------------------------------------------------------------------------------------------
# anderson_mix

def _check_mix(backend, B, D, m, dtype, seed):
    g = _gen(seed)
    acc = A.acc_dtype(dtype)
    for slot, n, beta, mix, best_x in [(m - 1, m, 1.0, True, False), (0, 1, 0.5, True, False),
                                       (min(1, m - 1), min(2, m), 0.7, False, False), (m - 1, m, 1.0, True, True),
                                       (0, 1, 0.5, False, True)]:
        F, G = _ring(B, m, D, dtype, g)
        F[:, n:] = float("nan")                                  # invalid slots must not be read
        G[:, n:] = float("nan")
        if beta == 1.0:
            G[:] = float("nan")                                  # at beta = 1 G is not read at all
        alpha = torch.randn(B, m, generator=g, dtype=acc)
        flags = torch.zeros(4, B, dtype=torch.bool)
        flags[0] = _mask(B, g)
        flags[3] = torch.rand(B, generator=g) < 0.5
        flags[3, 0] = True
        x = torch.randn(B, D, generator=g, dtype=dtype)
        best = torch.randn(B, D, generator=g, dtype=dtype)
        xr, bestr, x_before = x.clone(), best.clone(), x.clone()
        A.anderson_mix_ref(F, G.nan_to_num(0.0) if beta == 1.0 else G, alpha, flags, xr, bestr, slot, n, beta, mix,
                           best_x)
        A.anderson_mix(F, G, alpha, flags, x, best, slot, n, beta, mix, best_x, backend=backend)
        assert torch.equal(best, bestr)
        if best_x:  # the published Anderson keeps the iterate from before the mix, exactly
            assert torch.equal(best[flags[3]], x_before[flags[3]])
        _close(x, xr, dtype, scale=m)
        assert not x.isnan().any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("B", [1, 3, 8])
@pytest.mark.parametrize("D", [1, 37, 1001])
@pytest.mark.parametrize("m", [1, 2, 6])
@needs_cpp
def test_mix_cpp(B, D, m, dtype):
    _check_mix("cpp", B, D, m, dtype, seed=B * 1000 + D + m)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@needs_cpp
def test_mix_cpp_multichunk(dtype):
    _check_mix("cpp", 3, 20011, 6, dtype, seed=12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@needs_cpp
def test_cpp_long_history(dtype):
    """m > 8: the mix's generic (not unrolled) path, and a longer Gram row."""
    _check_mix("cpp", 3, 1001, 11, dtype, seed=14)
    _check_update("cpp", 3, 1001, 11, dtype, seed=15)


@needs_cpp
def test_cpp_results_do_not_depend_on_thread_count():
    """Fixed-size work chunks combined in a fixed order: bitwise the same answer on 1 or 2 threads."""
    g = _gen(13)
    B, m, D = 3, 4, 3 * 8192 + 77
    F0, G0 = _ring(B, m, D, torch.float32, g)
    fx, x = torch.randn(B, D, generator=g), torch.randn(B, D, generator=g)
    alpha = torch.randn(B, m, generator=g)
    flags = torch.ones(4, B, dtype=torch.bool)
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        F, G, gram = F0.clone(), G0.clone(), torch.zeros(B, m, m)
        norms = torch.ops.ldeq_fast.anderson_update(fx, x, F, G, gram, flags[0], 2, 4)
        xo, best = x.clone(), x.clone()
        torch.ops.ldeq_fast.anderson_mix(F, G, alpha, flags, xo, best, 2, 4, 0.5, True)
        results.append((norms, gram, xo, best))
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("B,D,m,dtype", [(1, 1, 1, torch.float32), (3, 37, 2, torch.float32),
                                         (8, 1001, 6, torch.float32), (3, 37, 6, torch.float64)])
def test_mix_triton(triton_interpret, B, D, m, dtype):
    _check_mix("triton", B, D, m, dtype, seed=B + D + m)


# ---------------------------------------------------------------------------------------------------------
# registration, errors, GPU compile check

def _opcheck_args(B=2, m=3, D=5, dtype=torch.float64):
    g = _gen(0)
    acc = A.acc_dtype(dtype)
    F, G = _ring(B, m, D, dtype, g)
    fx, x = torch.randn(B, D, generator=g, dtype=dtype), torch.randn(B, D, generator=g, dtype=dtype)
    gram = torch.zeros(B, m, m, dtype=acc)
    flags = torch.zeros(4, B, dtype=torch.bool)
    flags[0] = True
    flags[3, 0] = True
    stat = torch.full((4, B), float("inf"), dtype=acc)
    stat[3] = 1.0
    nstep = torch.zeros(B, dtype=torch.long)
    trace = torch.zeros(4, B, dtype=acc)
    norms = torch.rand(B, 3, generator=g, dtype=acc)
    alpha = torch.full((B, m), 1.0 / m, dtype=acc)
    best = x.clone()
    return {
        "update": (fx, x, F, G, gram, flags[0].clone(), 1, 2),
        "step": (torch.eye(m, dtype=acc).repeat(B, 1, 1), norms, flags, stat, nstep, trace, 2, 3, 1e-3, True,
                 1e-4, True, 1e4),
        "mix": (F, G, alpha, flags, x, best, 1, 3, 0.5, True),
        "step_published": (torch.eye(m, dtype=acc).repeat(B, 1, 1), norms, flags, stat, nstep, trace, 2, 3, 1e-3,
                           True, 1e-4, False, 1e4, 1),
        "mix_best_x": (F, G, alpha, flags, x, best, 1, 3, 1.0, True, True),
    }


@needs_cpp
@pytest.mark.parametrize("op", ["update", "step", "mix", "step_published", "mix_best_x"])
def test_opcheck_cpp(op):
    name = op.split("_")[0]
    torch.library.opcheck(getattr(torch.ops.ldeq_fast, f"anderson_{name}").default, _opcheck_args()[op])


@pytest.mark.gpu
@pytest.mark.parametrize("op", ["update", "step", "mix"])
def test_opcheck_cuda(op):
    """The ops with their CUDA (Triton) kernels."""
    args = [a.cuda() if isinstance(a, torch.Tensor) else a for a in _opcheck_args(dtype=torch.float32)[op]]
    torch.library.opcheck(getattr(torch.ops.ldeq_fast, f"anderson_{op}").default, args)


def test_bad_inputs_name_the_problem():
    a = _opcheck_args(dtype=torch.float32)
    fx, x, F, G, gram, active, slot, n = a["update"]
    with pytest.raises(TypeError, match="fx dtype"):
        A.anderson_update(fx.double(), x, F, G, gram, active, slot, n, backend="torch")
    with pytest.raises(ValueError, match="slot"):
        A.anderson_update(fx, x, F, G, gram, active, 3, n, backend="torch")
    with pytest.raises(ValueError, match="gram must be"):
        A.anderson_update(fx, x, F, G, gram.double(), active, slot, n, backend="torch")
    with pytest.raises(ValueError, match="contiguous"):
        A.anderson_update(fx, x, F.transpose(0, 1).contiguous().transpose(0, 1), G, gram, active, slot, n,
                          backend="torch")
    with pytest.raises(TypeError, match="float32 and float64"):
        A.anderson_update(fx.half(), x.half(), F.half(), G.half(), gram, active, slot, n, backend="torch")
    s = a["step"]
    with pytest.raises(ValueError, match="flags"):
        A.anderson_step(s[0], s[1], s[2].int(), *s[3:], backend="torch")
    with pytest.raises(ValueError, match="lam"):
        A.anderson_step(*s[:10], -1.0, *s[11:], backend="torch")
    mx = a["mix"]
    with pytest.raises(ValueError, match="alpha"):
        A.anderson_mix(mx[0], mx[1], mx[2][:, :2].contiguous(), *mx[3:], backend="torch")


@needs_cpp
def test_cpp_kernels_check_their_inputs():
    fx, x, F, G, gram, active, slot, n = _opcheck_args()["update"]
    with pytest.raises(RuntimeError, match="slot"):
        torch.ops.ldeq_fast.anderson_update(fx, x, F, G, gram, active, 5, n)
    with pytest.raises(RuntimeError, match="fx dtype"):
        torch.ops.ldeq_fast.anderson_update(fx.float(), x, F, G, gram, active, slot, n)
    with pytest.raises(RuntimeError, match="gram must be"):
        torch.ops.ldeq_fast.anderson_update(fx, x, F, G, gram.float(), active, slot, n)

# --------------------------------------------------------------------------------------------------------
# the Triton launchers called directly (no dispatch), odd and minimal shapes, outputs NaN-filled
# --------------------------------------------------------------------------------------------------------
# Anderson

ANDERSON_SHAPES = [(1, 1, 1), (3, 37, 4), (2, 300, 6)]  # (B, D, m)


@pytest.mark.parametrize("B,D,m", ANDERSON_SHAPES)
def test_anderson_launchers_match_reference(B, D, m, triton_loader):
    upd, step, mix = (triton_loader(n) for n in ("anderson_update", "anderson_step", "anderson_mix"))
    g = torch.Generator().manual_seed(B * D + m)

    def state(k):
        x = torch.randn(B, D, generator=g).to(TRITON_DEVICE)
        F = torch.randn(B, m, D, generator=g).to(TRITON_DEVICE)
        G = torch.randn(B, m, D, generator=g).to(TRITON_DEVICE)
        gram = torch.randn(B, m, m, generator=g)
        gram = (gram @ gram.transpose(1, 2)).to(TRITON_DEVICE)
        flags = torch.zeros(4, B, dtype=torch.bool, device=TRITON_DEVICE)
        flags[0] = True
        flags[3, 0] = True
        stat = torch.full((4, B), float("inf"), device=TRITON_DEVICE)
        stat[3] = float("nan") if k == 0 else 1.0  # the first residual, set at k = 0
        return x, F, G, gram, flags, stat, torch.zeros(B, dtype=torch.int64, device=TRITON_DEVICE), \
            torch.full((6, B), float("nan"), device=TRITON_DEVICE)

    fx = torch.randn(B, D, generator=g).to(TRITON_DEVICE)
    for k in range(min(5, 2 * m)):
        slot, n = k % m, min(k + 1, m)
        a = state(k)
        b = [t.clone() for t in a]
        norms = upd.anderson_update(fx, a[0], a[1], a[2], a[3], a[4][0], slot, n)
        want_norms = A.anderson_update_ref(fx, b[0], b[1], b[2], b[3], b[4][0], slot, n)
        close_rel(norms, want_norms, 1e-5, "update norms")
        for got, want, what in zip(a[1:4], b[1:4], ("F", "G", "gram")):
            close_rel(got, want, 1e-5, f"update {what}")
        args = (k, n, 1e-3, True, 1e-4, True, 1e4)
        alpha = step.anderson_step(a[3], norms, a[4], a[5], a[6], a[7], *args)
        want_alpha = A.anderson_step_ref(b[3], want_norms, b[4], b[5], b[6], b[7], *args)
        close_rel(alpha, want_alpha, 1e-5, "step alpha")
        assert torch.equal(a[4], b[4]) and torch.equal(a[6], b[6])
        best_a, best_b = a[0].clone(), b[0].clone()
        for beta in (1.0, 0.7):
            mix.anderson_mix(a[1], a[2], alpha, a[4], a[0], best_a, slot, n, beta, True)
            A.anderson_mix_ref(b[1], b[2], want_alpha, b[4], b[0], best_b, slot, n, beta, True)
            close_rel(a[0], b[0], 1e-5, "mix x")
            close_rel(best_a, best_b, 1e-5, "mix best")

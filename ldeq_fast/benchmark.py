"""``ldeq-fast bench``: the model on random images, timed on every available path, side by side.

Each path is the same LDEQ weights run a different way (one model instance per eager path).  Paths are
interleaved and their order is rotated by one each repeat (``path_order``: no path always runs first); each
figure is the median of the repeats, so drift on a noisy machine hits every path alike.  Peak memory (live
tensor bytes of one forward; the CUDA allocator's peak on GPU) is taken in an extra, untimed run of the eager
paths.  Every row records the backend each fused op actually ran on (``backends``; a peer's row its runtime
and version) and, on CPU, the fast path's measured layout plan (``cpu_plan``, ldeq_fast/model/cpu_tuning.py:
measured at the warm-up run, so not timed); ``fast_path_problems`` lists the fast rows that ran an op on the
PyTorch reference (or a fast path that could not run), and the command exits non-zero when there are any.

Rows come in two groups, each compared like for like:

* 'solver': reference, published (the published code's semantics, plain PyTorch), fast and compile
  (``torch.compile`` of the reference), each with the model's own solver (Anderson to tolerance); speed-up
  against the published path (``baseline``; the reference when published did not run).
* 'fpi': the unrolled-graph peers (onnxruntime, OpenVINO running ldeq_fast's ONNX export, ldeq_fast/peers.py)
  and the fast path running the same computation: ``max_iters`` fixed-point iterations, tolerance 0, the
  extra step; speed-up against the fastest peer, keypoints against the reference running that computation.

By default (``default_paths``) the reference, fast, published and the first installed ONNX peer run; a peer
that is not installed is skipped and said so (``skipped``).  The memory run solves min(iterations, m)
iterations: the solvers allocate their history up front, so its peak is the full solve's.
"""
from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import dataclass, field

import torch

from ldeq_fast.config import LDEQConfig
from ldeq_fast.machine import finish_record, machine_info
from ldeq_fast.memory import peak_memory_bytes
from ldeq_fast.model.ldeq import LDEQ


@dataclass
class Path:
    name: str
    description: str
    config: dict = field(default_factory=dict)   # LDEQConfig overrides for this path
    available: bool = True
    why_unavailable: str = ""
    kind: str = "model"      # 'model' (an LDEQ, eager), 'onnx' (an ONNX runtime peer), 'compile'


def available_paths(device: torch.device) -> list[Path]:
    """Every way to run the model here.  The first path is the reference the others are compared with."""
    from ldeq_fast import _ext, peers

    paths = [
        Path("reference", "per-sample Anderson, plain PyTorch solver and eager cell", {"backend": "torch"}),
        Path("published", "published semantics (batch-mean stop), plain PyTorch", {"backend": "torch",
                                                                                   "solver_semantics": "published"}),
    ]
    try:
        import ldeq_fast.solvers.fused  # noqa: F401

        fused_ok, why = True, ""
    except ImportError as exc:
        fused_ok, why = False, f"fused solver not importable: {exc}"
    if device.type == "cpu" and not _ext.has_cpp():
        fused_ok, why = False, _ext.missing_reason()
    paths.append(Path("fast", "fused solver engine and cell ops (C++ kernels on CPU, Triton on CUDA)",
                      {"backend": "auto"}, fused_ok, why))
    for name in peers.ONNX_PEERS:
        why = peers.missing_reason(name) or ("" if device.type == "cpu" else "the ONNX peers run on the CPU only")
        paths.append(Path(name, f"{name} running ldeq_fast's ONNX export (fpi unrolled + extra step)", {},
                          not why, why, kind="onnx"))
    why = peers.missing_reason("compile") or ""
    paths.append(Path("compile", "torch.compile (inductor) of the reference model, its own solver",
                      {"backend": "torch"}, not why, why, kind="compile"))
    return paths


def default_paths() -> tuple[str, ...]:
    """What a plain ``ldeq-fast bench`` runs: the reference, the fast path, the published-semantics path and
    the first installed unrolled-graph peer (peers.DEFAULT_PEER_ORDER)."""
    from ldeq_fast import peers

    peer = [n for n in peers.DEFAULT_PEER_ORDER if peers.missing_reason(n) is None][:1]
    return ("reference", "fast", "published", *peer)


def path_order(names: list, rep: int) -> list:
    """The order paths run in at repeat ``rep``: rotated by one each repeat, so no path always runs first
    (or always right after another: a warm cache or a cooling CPU then favours no one)."""
    k = rep % len(names) if names else 0
    return list(names[k:]) + list(names[:k])


# an untimed pause before every timed call: two runtimes in one process keep their own thread pools (PyTorch's
# OpenMP, OpenVINO's TBB, onnxruntime's), and a pool still spinning from the last call takes the cores of the
# next one; on 2 cores the next path's parallel regions then wait on descheduled threads (measured: 40 ms calls
# taking 1.1-1.4 s right after a peer).  A user runs one runtime, not an alternation, so no path is charged for
# another's idle pool.
SETTLE_S = 0.2


def settle(device) -> None:
    _sync(device)
    time.sleep(SETTLE_S)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


@dataclass
class _Runner:
    key: str            # unique: path@group
    path: Path
    group: str          # 'solver' (each path's own solver settings) or 'fpi' (the ONNX export's computation)
    call: object        # (images, warm: bool) -> (keypoints, output or None)
    backends: dict = field(default_factory=dict)


FPI = "fpi"
SOLVER = "solver"


def _fpi_settings(model, iters: int):
    """The ONNX export's computation on an LDEQ: ``iters`` fixed-point iterations, tolerance 0 (+ the
    model's extra step)."""
    return model.solver_settings(iters, method="fpi", tol=0.0)


def run_bench(batch_sizes=(1, 8), repeats=3, max_iters=None, small=False, device="cpu", seed=0,
              paths=None, progress=True, config: LDEQConfig | None = None, state_dict=None) -> dict:
    """Time the model on every requested path, interleaved, rotating the order each repeat.

    Two groups of rows: 'solver' (reference, published, fast, compile: each with the model's own solver,
    Anderson to tolerance) compared with the published path (the reference when published did not run); and,
    when an ONNX peer runs, 'fpi' (fast and the ONNX peers running the same computation: ``max_iters``
    fixed-point iterations, tolerance 0, the extra step) compared with the fastest peer, their keypoints
    with the reference running that computation (one untimed run per batch).

    ``config`` (instead of ``small``) and ``state_dict`` (instead of random weights) bench another model.
    """
    from ldeq_fast import peers

    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    t_start = time.perf_counter()
    device = torch.device(device)
    torch.manual_seed(seed)
    if config is not None and small:
        raise ValueError("give config or small, not both")
    cfg = config if config is not None else LDEQConfig.small() if small else LDEQConfig()
    if max_iters is not None:
        cfg = cfg.replace(max_iters=int(max_iters))
    base = LDEQ(cfg).to(device).eval()
    if state_dict is not None:
        base.load_state_dict(state_dict)
    all_paths = available_paths(device)
    paths = default_paths() if paths is None else tuple(paths)
    unknown = sorted(set(paths) - {p.name for p in all_paths})
    if unknown:
        raise ValueError(f"unknown path(s) {unknown}; available: {[p.name for p in all_paths]}")
    all_paths = [p for p in all_paths if p.name in paths or p.name == "reference"]
    runnable = [p for p in all_paths if p.available]
    names = {p.name for p in runnable}
    onnx_paths = [p for p in runnable if p.kind == "onnx"]
    results = {"machine": machine_info(), "device": str(device), "config": cfg.to_dict(),
               "batch_sizes": list(batch_sizes), "repeats": repeats, "paths_requested": list(paths), "rows": [],
               "skipped": [{"path": p.name, "why": p.why_unavailable} for p in all_paths if not p.available],
               "order": "rotated by one path each repeat (ldeq_fast.benchmark.path_order)", "call_order": {},
               "settle_s": SETTLE_S}
    if paths == default_paths() and not any(p.kind == "onnx" for p in runnable):
        results["skipped"] += [{"path": n, "why": peers.missing_reason(n)} for n in peers.DEFAULT_PEER_ORDER
                               if n not in {s["path"] for s in results["skipped"]}]
    # one model per eager path, the same weights: switching one model between paths re-lays out its weights
    # and drops the fast path's per-weight caches (NCHW copies, Winograd transforms) before every timed call
    models = {}
    for p in runnable:
        if p.kind == "model":
            models[p.name] = LDEQ(cfg.replace(**p.config)).to(device).eval()
            models[p.name].load_state_dict(base.state_dict())
    if "reference" not in models:
        raise RuntimeError("the reference path must run")
    runners = []
    for p in runnable:
        if p.kind == "model":
            m = models[p.name]
            runners.append(_Runner(f"{p.name}@{SOLVER}", p, SOLVER, lambda x, warm, m=m: m(x, max_iters=1 if warm else None)))
    if "compile" in names:
        p = next(p for p in runnable if p.name == "compile")
        compiled = peers.compile_reference(models["reference"])
        # the first call at each batch (the warm-up) compiles: timed and recorded, not a repeat
        runners.append(_Runner(f"compile@{SOLVER}", p, SOLVER, lambda x, warm, c=compiled: c(x)))
        results["peers"] = {"compile": {"version": peers.peer_version("compile"), "mode": "default",
                                        "backend": "inductor"}}
    iters = cfg.max_iters
    if onnx_paths:
        import tempfile

        results.setdefault("peers", {})
        fpi_note = (f"fpi, {iters} iterations, tolerance 0, "
                    + ("no extra step" if cfg.take_one_less_inference_step else "+ the extra step"))
        results["fpi_group"] = {"setting": fpi_note, "iterations": iters,
                                "extra_step": not cfg.take_one_less_inference_step}
        tmp = tempfile.TemporaryDirectory(prefix="ldeq_fast_bench_")
        onnx_file = f"{tmp.name}/ldeq_fpi{iters}.onnx"
        results["onnx_export"] = peers.export_for_peers(models["reference"], onnx_file, iters)
        for p in onnx_paths:
            peer = peers.OnnxPeer(p.name, onnx_file)
            results["peers"][p.name] = peer.info()
            runners.append(_Runner(f"{p.name}@{FPI}", p, FPI, lambda x, warm, r=peer: (r(x), None),
                                   {"graph": f"{p.name} {peer.version}"}))
        if "fast" in models:
            m = models["fast"]
            runners.append(_Runner(f"fast@{FPI}", next(p for p in runnable if p.name == "fast"), FPI,
                                   lambda x, warm, m=m: m(x, solver=_fpi_settings(m, 1 if warm else iters))))
    results["paths_run"] = [r.key for r in runners]
    total = sum(repeats + 1 for _ in batch_sizes) * len(runners)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, desc="ldeq-fast bench", unit="run", leave=False)
    keys = [r.key for r in runners]
    by_key = {r.key: r for r in runners}
    for bs in batch_sizes:
        images = torch.randn(bs, 3, cfg.im_size, cfg.im_size, device=device)
        times = {k: [] for k in keys}
        first_call = {}
        outs = {}
        order_log = []
        for rep in range(repeats + 1):       # rep 0 is a warm-up (cheap: one iteration, where a path can)
            order = path_order(keys, rep)
            order_log.append(order)
            for k in order:
                r = by_key[k]
                settle(device)
                t0 = time.perf_counter()
                with torch.no_grad():
                    out = r.call(images, rep == 0)
                _sync(device)
                dt = time.perf_counter() - t0
                if rep > 0:
                    times[k].append(dt)
                elif r.path.kind != "model":
                    first_call[k] = dt
                outs[k] = out
                if bar is not None:
                    bar.update(1)
        results["call_order"][str(bs)] = order_log
        fpi_ref = None
        if onnx_paths:   # the correctness baseline of the fpi rows: the reference running that computation
            ref_model = models["reference"]
            with torch.no_grad():
                fpi_ref = ref_model(images, solver=_fpi_settings(ref_model, iters))
            trace = fpi_ref.stats.trace
            results.setdefault("fpi_reference", {})[str(bs)] = {
                "backends": fpi_ref.backends, "iterations": float(fpi_ref.stats.nstep.float().mean()),
                # the solver returns its best iterate: the unrolled graph's answer only when the last is the best
                "best_is_last": bool((trace[-1] <= trace.amin(dim=0)).all())}
        ref_kpts = {SOLVER: outs[f"reference@{SOLVER}"].keypoints,
                    FPI: fpi_ref.keypoints if fpi_ref is not None else None}
        med = {k: statistics.median(times[k]) for k in keys}
        peer_keys = [k for k in keys if by_key[k].path.kind == "onnx"]
        best_peer = min(peer_keys, key=med.get) if peer_keys else None
        base_solver = f"published@{SOLVER}" if f"published@{SOLVER}" in med else f"reference@{SOLVER}"
        for k in keys:
            r = by_key[k]
            out = outs[k]
            kpts = out if torch.is_tensor(out) else out[0] if isinstance(out, tuple) else out.keypoints
            lde = None if isinstance(out, tuple) or torch.is_tensor(out) else out
            baseline = base_solver if r.group == SOLVER else best_peer
            peak = None
            if r.path.kind == "model" and r.group == SOLVER:
                model = models[r.path.name]
                mem_iters = min(model.cfg.max_iters, max(2, model.cfg.anderson_m))
                with torch.no_grad():  # an extra, untimed forward: memory tracking slows every op on CPU
                    peak = peak_memory_bytes(lambda imgs=images, n=mem_iters, m=model: m(imgs, max_iters=n), device)
            row = {
                "path": r.path.name, "group": r.group, "description": r.path.description, "batch": bs,
                "setting": results["fpi_group"]["setting"] if r.group == FPI else
                f"{cfg.solver}, up to {cfg.max_iters} iterations, tolerance {cfg.tol:g}"
                + (", batch-mean stop" if r.path.name == "published" else ""),
                "images_per_s": bs / med[k], "ms_per_image": 1e3 * med[k] / bs, "times_s": times[k],
                "iterations": float(lde.stats.nstep.float().mean()) if lde is not None and lde.stats is not None
                else (float(iters) if r.group == FPI else None),
                "max_kpt_diff_px": float((kpts.to(ref_kpts[r.group].device) - ref_kpts[r.group]).abs().max()
                                         * cfg.heatmap_size),
                "diff_vs": "reference" + (" running the same fpi computation" if r.group == FPI else ""),
                "peak_mb": None if peak is None else peak / 2 ** 20,
                "baseline": None if baseline is None else baseline.split("@")[0],
                "speedup_vs_baseline": None if baseline is None else med[baseline] / med[k],
                "speedup_vs_reference": med[f"reference@{SOLVER}"] / med[k] if r.group == SOLVER else None,
                "backends": lde.backends if lde is not None else r.backends,
                **({"first_call_s": first_call[k]} if k in first_call else {}),
                **({"version": results["peers"][r.path.name]["version"]} if r.path.kind != "model" else {}),
                **({"cpu_plan": lde.extra["cpu_plan"]} if lde is not None and "cpu_plan" in lde.extra else {}),
            }
            if r.path.kind == "compile":
                row["backends"] = {"graph": f"torch.compile (inductor), torch {torch.__version__}",
                                   **{f"eager {op}": b for op, b in row["backends"].items()}}
            results["rows"].append(row)
    if bar is not None:
        bar.close()
    if onnx_paths:
        tmp.cleanup()
    results["summary"] = summary(results)
    results["fast_path_problems"] = fast_path_problems(results)
    finish_record(results["machine"])
    results["wall_s"] = time.perf_counter() - t_start
    return results


def summary(res: dict) -> list[dict]:
    """Per batch: fast against the published path (each its own solver) and against the fastest peer (the
    same fpi computation)."""
    out = []
    for bs in res["batch_sizes"]:
        rows = {(r["path"], r["group"]): r for r in res["rows"] if r["batch"] == bs}
        fast = rows.get(("fast", SOLVER))
        if fast:
            out.append({"batch": bs, "what": "fast vs " + fast["baseline"], "group": SOLVER,
                        "speedup": fast["speedup_vs_baseline"]})
        fast = rows.get(("fast", FPI))
        if fast and fast["baseline"]:
            out.append({"batch": bs, "what": "fast vs best peer " + fast["baseline"], "group": FPI,
                        "speedup": fast["speedup_vs_baseline"]})
    return out


FAST_PATHS = ("fast",)


def fast_path_problems(res: dict) -> list[str]:
    """What keeps a fast row from being the fast path: an op that ran on the reference, or the path skipped."""
    out = [f"{s['path']} path not run: {s['why']}" for s in res["skipped"] if s["path"] in FAST_PATHS]
    for r in res["rows"]:
        slow = sorted(op for op, b in r.get("backends", {}).items() if "torch" in b.split(","))
        if r["path"] in FAST_PATHS and slow:
            out.append(f"{r['path']} path at batch {r['batch']} ran {slow} on the PyTorch reference")
    return out


def format_table(res: dict) -> str:
    lines = [f"ldeq-fast bench on {res['machine']['cpu']} ({res['machine']['cores']} cores), device {res['device']}, "
             f"torch {res['machine']['torch']}; median of {res['repeats']} runs, interleaved, order rotated"]
    head = (f"{'path':<12} {'batch':>5} {'images/s':>9} {'ms/image':>9} {'iters':>6} {'max dkpt px':>11} "
            f"{'peak MB':>8} {'speed-up':>9}  vs")
    for group, title in ((SOLVER, "each path's own solver ({})"), (FPI, "the ONNX export's computation ({})")):
        rows = [r for r in res["rows"] if r["group"] == group]
        if not rows:
            continue
        lines += ["", title.format(rows[0]["setting"] if group == FPI else rows[0]["setting"].replace(", batch-mean stop", "")), head]
        for r in rows:
            it = "-" if r["iterations"] is None else f"{r['iterations']:.1f}"
            mem = "-" if r["peak_mb"] is None else f"{r['peak_mb']:.0f}"
            sp = "-" if r["speedup_vs_baseline"] is None else f"{r['speedup_vs_baseline']:.2f}x"
            name = r["path"] + (f" {r['version']}" if r.get("version") and r["path"] != "compile" else "")
            extra = f"  (first call {r['first_call_s']:.1f} s)" if r["path"] == "compile" else ""
            lines.append(f"{name:<12} {r['batch']:>5} {r['images_per_s']:>9.2f} {r['ms_per_image']:>9.1f} {it:>6} "
                         f"{r['max_kpt_diff_px']:>11.2e} {mem:>8} {sp:>9}  {r['baseline'] or '-'}{extra}")
    if res.get("onnx_export"):
        e = res["onnx_export"]
        lines.append(f"ONNX export: {e['iterations']} iterations + extra step {e['extra_step']}, z0 {e['z0']}, "
                     f"{e['exporter']} exporter, {e['export_s']:.1f} s; peers: "
                     + "; ".join(f"{n} {p['version']} ({p['threads']} threads" + (f", load {p['load_s']:.1f} s)" if "load_s" in p else ")")
                                 for n, p in res.get("peers", {}).items() if n != "compile"))
    lines.append("")
    for s in res.get("summary", []):
        lines.append(f"batch {s['batch']}: {s['what']} ({'same fpi computation' if s['group'] == FPI else 'own solvers'}):"
                     f" {s['speedup']:.2f}x")
    for s in res["skipped"]:
        lines.append(f"(skipped {s['path']}: {s['why']})")
    fast = [r for r in res["rows"] if r["path"] in FAST_PATHS]
    if fast:
        ran = sorted({f"{op}={b}" for r in fast for op, b in r["backends"].items()})
        lines.append("fast path ran: " + ", ".join(ran))
    for r in fast:
        if "cpu_plan" in r and r["group"] == SOLVER:
            p = r["cpu_plan"]
            src = "measured now" if p["source"] == "measured" else "from the cache, measured"
            lines.append(f"fast path CPU plan at batch {r['batch']} ({src} at batch {p['measured_batch']}): "
                         f"{p['nhwc_convs']} convs channels_last, {p['nchw_convs']} NCHW, {p.get('winograd_convs', 0)} "
                         f"Winograd; oneDNN conv+add on {p['post_add']} of {p['split_convs']} split convs")
    if "wall_s" in res:
        lines.append(f"wall time {res['wall_s']:.0f} s")
    for problem in res.get("fast_path_problems", []):
        lines.append(f"PROBLEM: {problem}")
    return "\n".join(lines)


def save_json(res: dict, path) -> None:
    """Write ``res`` as JSON atomically (a temporary file beside it, then a rename: never a torn file)."""
    from pathlib import Path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(res, indent=1, default=str))
    os.replace(tmp, path)

"""The GPU comparison of the whole model, in two phases that the GPU suite runs as separate steps.

``--phase eager`` (GPU suite command 1, the key figures): published-semantics eager PyTorch (fp32 and under
bf16 autocast), the per-sample reference, and our fast path in fp32 and bf16 at a throughput batch, side by
side; then streaming batch 1 (``--stream-iters`` warm-started iterations + the extra step per frame) with the
CUDA-graph forward (``GraphedForward``) against the same fixed-iteration forward run eagerly, both without
the per-frame host-side input check (its NaN test is a host sync per frame).

``--phase compile`` (command 2): ``torch.compile`` of the reference -- ``--compile-target cell`` (the
hourglass cell alone: the solver loop and stem stay eager, as they would for a user; the cell is ~all the
FLOPs) or ``model`` -- in ``--compile-mode`` (default max-autotune-no-cudagraphs), against published eager and
the fast path, side by side.  The compile (first call) is timed apart and bounded by ``--compile-cap``
seconds: past it the compile is abandoned and recorded as such, so a slow autotune cannot eat the lease.
The eager rows are written to the JSON before the compile starts.

    python bench/bench_model_gpu.py --phase eager --json bench/results/model_gpu.json      # on the GPU machine
    python bench/bench_model_gpu.py --phase compile --json bench/results/model_compiled.json
    python bench/bench_model_gpu.py --device cpu --small --batch 2 --stream-frames 4      # smoke run anywhere

Methods are interleaved over repeats (medians).  Keypoint differences are in heatmap pixels against the fast
path in fp32 on the same images (bf16 target: <= 0.05 px on a trained model; on random weights the heatmaps
are flat and the difference is larger).  TF32 stays at PyTorch's defaults (recorded).
"""
from __future__ import annotations

import argparse
import signal
import statistics
import sys
import time

import torch
from common import interleaved, machine_info, time_once, write_json


class CompileCapExceeded(BaseException):
    """Raised by the timer in the middle of a compile (a BaseException: torch's ``except Exception`` handlers
    must not turn it into a fallback)."""


def with_cap(fn, seconds: float):
    """fn() or CompileCapExceeded after ``seconds`` (0: no cap)."""
    if not seconds:
        return fn()

    def on_alarm(signum, frame):
        raise CompileCapExceeded(f"compile exceeded its cap of {seconds:g} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        return fn()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def main(argv=None) -> int:
    from ldeq_fast import LDEQ, LDEQConfig

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--phase", choices=("eager", "compile"), default="eager")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--max-iters", type=int, default=10)
    p.add_argument("--stream-iters", type=int, default=1, help="RwR solver iterations per streamed frame")
    p.add_argument("--stream-frames", type=int, default=200)
    p.add_argument("--compile-target", choices=("cell", "model"), default="cell")
    p.add_argument("--compile-mode", default="max-autotune-no-cudagraphs")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend ('eager': dynamo only, "
                   "for smoke runs)")
    p.add_argument("--compile-dtypes", default="fp32", help="comma list of fp32,bf16 for the compiled reference")
    p.add_argument("--compile-cap", type=float, default=180.0, help="seconds for the first compiled call (0: none)")
    p.add_argument("--small", action="store_true")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    device = torch.device(a.device)
    torch.manual_seed(0)
    base = (LDEQConfig.small() if a.small else LDEQConfig()).replace(max_iters=a.max_iters)
    images = torch.randn(a.batch, 3, base.im_size, base.im_size, device=device)
    models = {
        "published": LDEQ(base.replace(backend="torch", solver_semantics="published")),
        "reference": LDEQ(base.replace(backend="torch")),
        "fast": LDEQ(base.replace(backend="auto")),
    }
    state = models["fast"].state_dict()
    for m in models.values():
        m.load_state_dict(state)
        m.to(device).eval()

    def run(model, bf16=False):
        if not bf16:
            return lambda: model(images)

        def call():
            with torch.autocast(device.type, dtype=torch.bfloat16):
                return model(images)
        return call

    runs = {"published_eager": run(models["published"]), "published_eager_bf16": run(models["published"], True),
            "reference_eager": run(models["reference"]), "fast_fp32": run(models["fast"]),
            "fast_bf16": run(models["fast"], True)}
    skipped = _skip_bf16_without_native(runs, device)
    hm = base.heatmap_size
    ref_kpts = {}

    def measure(names: list[str]) -> list[dict]:
        """Warm up (compiling where needed), then time ``names`` interleaved; one row per path."""
        with torch.no_grad():
            outs = {name: runs[name]() for name in names}
            times = interleaved({name: runs[name] for name in names}, repeats=a.repeats, warmup=0, device=device)
        ref_kpts.setdefault("fast_fp32", outs["fast_fp32"].keypoints.float())
        rows = []
        for name in names:
            med = statistics.median(times[name])
            rows.append({"path": name, "batch": a.batch, "images_per_s": a.batch / med,
                         "ms_per_image": 1e3 * med / a.batch,
                         "max_kpt_diff_px_vs_fast_fp32": float((outs[name].keypoints.float() - ref_kpts["fast_fp32"]
                                                                ).abs().max() * hm),
                         "times_s": times[name],
                         # what ran (inside torch.compile the ops resolve at trace time and are not recorded)
                         "backends": getattr(outs[name], "backends", None) or "not recorded (compiled)"})
        return rows

    res = {"phase": a.phase, "machine": machine_info(device), "device": str(device), "config": base.to_dict(),
           "repeats": a.repeats, "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
           "tf32_cudnn": torch.backends.cudnn.allow_tf32, "skipped": skipped}
    if a.phase == "eager":
        res["rows"] = rows = measure(list(runs))
        ratios(rows, "published_eager", "speedup_vs_published_eager")
        _print_rows(rows, "vs published", "speedup_vs_published_eager")
        write_json(a.json, res)                       # the throughput figures first
        res["streaming_batch1"] = streaming(models["fast"], base, device, a)
        write_json(a.json, res)
        return 0

    # compile phase: the compiled reference against published eager and the fast path, side by side
    names = [n for n in ("published_eager", "fast_fp32", "fast_bf16") if n in runs]
    res["compiled"] = {"target": a.compile_target, "mode": a.compile_mode, "backend": a.compile_backend,
                       "cap_s": a.compile_cap, "status": "pending"}
    write_json(a.json, res)
    target = models["reference"]
    if a.compile_target == "cell":
        target.deq_layer.cell = torch.compile(target.deq_layer.cell, mode=a.compile_mode, backend=a.compile_backend)
        compiled = target
    else:
        compiled = torch.compile(target, mode=a.compile_mode, backend=a.compile_backend)
    compile_s, status = {}, "ok"
    for dt in a.compile_dtypes.split(","):
        if dt == "bf16" and skipped:
            skipped.append({"path": "reference_compiled_bf16", "why": skipped[0]["why"]})
            continue
        name = f"reference_compiled_{dt}"
        runs[name] = run(compiled, bf16=dt == "bf16")
        t0 = time.perf_counter()
        try:
            with torch.no_grad():
                with_cap(runs[name], a.compile_cap)
        except CompileCapExceeded as exc:   # the paths compiled so far are still measured
            status = f"{dt}: {exc}"
            print(f"torch.compile({a.compile_target}, {a.compile_mode}) {status}")
            break
        compile_s[dt] = time.perf_counter() - t0
        names.append(name)
        print(f"torch.compile({a.compile_target}, {a.compile_mode}) {dt}: first call {compile_s[dt]:.1f} s")
    res["compiled"].update(status=status, compile_s=compile_s)
    compiled_names = [n for n in names if n.startswith("reference_compiled_")]
    if compiled_names:
        rows = measure(names)
        ratios(rows, "published_eager", "speedup_vs_published_eager")
        ratios(rows, compiled_names[0], "speedup_vs_compiled_reference")
        res["compiled"].update(rows=rows, dynamo=_dynamo_counts())
        _print_rows(rows, f"vs {compiled_names[0][len('reference_'):]}", "speedup_vs_compiled_reference")
    write_json(a.json, res)
    return 0 if status == "ok" else 1


def streaming(fast, base, device, a) -> dict:
    """ms per frame at batch 1: the fixed-iteration forward replayed as a CUDA graph (GPU) and run eagerly."""
    from ldeq_fast.streaming import GraphedForward

    frames = torch.randn(8, 1, 3, base.im_size, base.im_size, device=device)
    variants = {"eager": GraphedForward(fast, batch=1, iters=a.stream_iters, use_graph=False)}
    if device.type == "cuda":
        variants["cuda_graph"] = GraphedForward(fast, batch=1, iters=a.stream_iters)
    out = {}
    for name, gf in variants.items():
        z = [None]

        def play(gf=gf, z=z):
            for t in range(a.stream_frames):
                z[0] = gf(frames[t % len(frames)], z[0], check=False).z_star

        play()  # warm-up
        per = [time_once(play, device) / a.stream_frames for _ in range(3)]
        out[name] = {"ms_per_frame": 1e3 * statistics.median(per), "cell_evals_per_frame": a.stream_iters + 1,
                     "backends": gf(frames[0], None, check=False).backends,
                     "frames": a.stream_frames, "input_check": "off (no per-frame host sync)"}
        print(f"streaming batch 1, {a.stream_iters + 1} cell evaluations/frame, {name}: "
              f"{out[name]['ms_per_frame']:.3f} ms/frame")
    return out


def ratios(rows: list[dict], base_path: str, key: str) -> None:
    base_rate = next(r for r in rows if r["path"] == base_path)["images_per_s"]
    for r in rows:
        r[key] = r["images_per_s"] / base_rate


def _dynamo_counts() -> dict:
    """Graphs compiled and graph breaks (dynamo's counters), to say what the compiled reference was."""
    try:
        from torch._dynamo.utils import counters
    except Exception:  # noqa: BLE001 - diagnostics only
        return {}
    return {"stats": dict(counters["stats"]), "graph_breaks": sum(counters["graph_break"].values())}


def _skip_bf16_without_native(runs: dict, device: torch.device) -> list[dict]:
    """bf16 rows only where bf16 is native: on a CPU without it a bf16 convolution is ~200x slower (the model
    would run fp32 under the autocast anyway, ldeq_fast/numerics.py), so those rows are dropped, and said so."""
    from ldeq_fast.numerics import native_bf16

    if native_bf16(device.type):
        return []
    why = (f"no native bf16 on this {device.type} (torch.ops.mkldnn._is_mkldnn_bf16_supported() is False): "
           "bf16 rows skipped")
    names = [n for n in runs if n.endswith("_bf16")]
    print(f"skipping {', '.join(names)}: {why}")
    for n in names:
        del runs[n]
    return [{"path": n, "why": why} for n in names]


def _print_rows(rows: list[dict], label: str, key: str) -> None:
    print(f"{'path':<34} {'images/s':>9} {'ms/image':>9} {label:>12} {'dkpt px':>8}")
    for r in rows:
        print(f"{r['path']:<34} {r['images_per_s']:>9.1f} {r['ms_per_image']:>9.2f} {r[key]:>11.2f}x "
              f"{r['max_kpt_diff_px_vs_fast_fp32']:>8.3f}")


if __name__ == "__main__":
    sys.exit(main())

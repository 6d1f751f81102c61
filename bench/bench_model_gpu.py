"""The GPU comparison of the whole model: published-semantics eager PyTorch, torch.compile of the reference
path, and our fast path in fp32 and bf16, at a throughput batch; and streaming batch 1 with the CUDA-graph
forward (``GraphedForward``) against the same fixed-iteration forward run eagerly.

    python bench/bench_model_gpu.py --json bench/results/model_gpu.json            # on the GPU machine
    python bench/bench_model_gpu.py --device cpu --small --no-compile --batch 2    # smoke run anywhere

Two phases, each timed side by side: the eager paths (published semantics, reference, fast fp32, fast bf16) and
streaming, written to the JSON first; then ``torch.compile(reference, mode="max-autotune")`` (its first call,
the build and autotuning, is timed apart) against published eager and the fast path, added to the JSON as
``compiled`` — so a time limit during a long compile still leaves the eager figures.  Methods are interleaved
over repeats (medians).  Keypoint differences are in heatmap pixels against the
fast path in fp32 on the same images (bf16 target: <= 0.05 px on a trained model; on random weights the
heatmaps are flat and the difference is larger).  TF32 stays at PyTorch's defaults.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from common import interleaved, machine_info, time_once, write_json


def main(argv=None) -> int:
    from ldeq_fast import LDEQ, LDEQConfig
    from ldeq_fast.streaming import GraphedForward

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--max-iters", type=int, default=10)
    p.add_argument("--stream-iters", type=int, default=1, help="RwR solver iterations per streamed frame")
    p.add_argument("--stream-frames", type=int, default=200)
    p.add_argument("--small", action="store_true")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile (slow to build)")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    device = torch.device(a.device)
    torch.manual_seed(0)
    base = (LDEQConfig.small() if a.small else LDEQConfig()).replace(max_iters=a.max_iters)
    images = torch.randn(a.batch, 3, base.im_size, base.im_size, device=device)
    models = {
        "published_eager": LDEQ(base.replace(backend="torch", solver_semantics="published")),
        "reference_eager": LDEQ(base.replace(backend="torch")),
        "fast_fp32": LDEQ(base.replace(backend="auto")),
    }
    state = models["fast_fp32"].state_dict()
    for m in models.values():
        m.load_state_dict(state)
        m.to(device).eval()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)

    def fast_bf16():
        with autocast:
            return models["fast_fp32"](images)

    runs = {
        "published_eager": lambda: models["published_eager"](images),
        "reference_eager": lambda: models["reference_eager"](images),
        "fast_fp32": lambda: models["fast_fp32"](images),
        "fast_bf16": fast_bf16,
    }
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
                         "times_s": times[name]})
        return rows

    def ratios(rows: list[dict], base_path: str, key: str) -> None:
        base_rate = next(r for r in rows if r["path"] == base_path)["images_per_s"]
        for r in rows:
            r[key] = r["images_per_s"] / base_rate

    # phase 1, eager paths side by side; written out before torch.compile (whose max-autotune build can take
    # minutes) so that a time limit during the compile still leaves these figures
    rows = measure(list(runs))
    ratios(rows, "published_eager", "speedup_vs_published_eager")

    # streaming: batch 1, `stream_iters` warm-started iterations + the extra step per frame
    stream = {}
    fast = models["fast_fp32"]
    frames = torch.randn(8, 1, 3, base.im_size, base.im_size, device=device)
    variants = {"eager": GraphedForward(fast, batch=1, iters=a.stream_iters, use_graph=False)}
    if device.type == "cuda":
        variants["cuda_graph"] = GraphedForward(fast, batch=1, iters=a.stream_iters)
    for name, gf in variants.items():
        z = [None]

        def play(gf=gf, z=z):
            for t in range(a.stream_frames):
                z[0] = gf(frames[t % len(frames)], z[0]).z_star

        per = [time_once(play, device) / a.stream_frames for _ in range(3)]
        stream[name] = {"ms_per_frame": 1e3 * statistics.median(per), "cell_evals_per_frame": a.stream_iters + 1}

    res = {"machine": machine_info(device), "device": str(device), "config": base.to_dict(), "repeats": a.repeats,
           "tf32_matmul": torch.backends.cuda.matmul.allow_tf32, "tf32_cudnn": torch.backends.cudnn.allow_tf32,
           "rows": rows, "streaming_batch1": stream, "compiled": "not run" if a.no_compile else "pending",
           "skipped": skipped}
    _print_rows(rows, "vs published", "speedup_vs_published_eager")
    for name, st in stream.items():
        print(f"streaming batch 1, {st['cell_evals_per_frame']} cell evaluations/frame, {name}: "
              f"{st['ms_per_frame']:.3f} ms/frame")
    write_json(a.json, res)

    # phase 2, torch.compile(reference, max-autotune) against the eager published path and the fast path, timed
    # side by side again in this phase
    if not a.no_compile:
        compiled = torch.compile(models["reference_eager"], mode="max-autotune")
        runs["reference_compiled_max_autotune"] = lambda: compiled(images)
        t0 = time.perf_counter()
        with torch.no_grad():
            runs["reference_compiled_max_autotune"]()
        compile_s = time.perf_counter() - t0
        crows = measure([n for n in ("published_eager", "reference_compiled_max_autotune", "fast_fp32", "fast_bf16")
                         if n in runs])
        ratios(crows, "published_eager", "speedup_vs_published_eager")
        ratios(crows, "reference_compiled_max_autotune", "speedup_vs_compiled_reference")
        res["compiled"] = {"compile_s": compile_s, "rows": crows}
        print(f"torch.compile(reference, max-autotune): first call {compile_s:.0f} s")
        _print_rows(crows, "vs compiled", "speedup_vs_compiled_reference")
    write_json(a.json, res)
    return 0


def _skip_bf16_without_native(runs: dict, device: torch.device) -> list[dict]:
    """bf16 rows only where bf16 is native: on a CPU without it a bf16 convolution is ~200x slower (the model
    would run fp32 under the autocast anyway, ldeq_fast/numerics.py), so those rows are dropped, and said so."""
    from ldeq_fast.numerics import native_bf16

    if native_bf16(device.type):
        return []
    why = (f"no native bf16 on this {device.type} (torch.ops.mkldnn._is_mkldnn_bf16_supported() is False): "
           "bf16 rows skipped")
    print(f"skipping fast_bf16: {why}")
    runs.pop("fast_bf16", None)
    return [{"path": "fast_bf16", "why": why}]


def _print_rows(rows: list[dict], label: str, key: str) -> None:
    print(f"{'path':<34} {'images/s':>9} {'ms/image':>9} {label:>12} {'dkpt px':>8}")
    for r in rows:
        print(f"{r['path']:<34} {r['images_per_s']:>9.1f} {r['ms_per_image']:>9.2f} {r[key]:>11.2f}x "
              f"{r['max_kpt_diff_px_vs_fast_fp32']:>8.3f}")


if __name__ == "__main__":
    sys.exit(main())

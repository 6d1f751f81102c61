"""CPU layouts and algorithms of the fast path, chosen by measurement.

The fixed choices (channels_last everywhere, oneDNN's conv + add post-op for the split 1x1 convs) are not
best on every CPU and shape: on the 2-core AMD EPYC (Zen 3, AVX2) the 5x5 convolutions run 1.3-1.5x slower
channels_last than NCHW at batch 1 while most 3x3 ones run faster channels_last, and the balance moves with
the batch.  So for CPU inference the fast path measures, once per machine and shape, each cell convolution
in both memory formats and each split 1x1 conv with and without the post-op, times the copy that changes
each activation's memory format, and runs the cheapest combination over the whole cell (``_choose``: each
layout change costs a copy; ignoring them once made the copies 13% of the fast path at batch 8).

* When: at the first solve of a (model shape, batch bucket) in a process; the plan is cached on disk
  (``$LDEQ_FAST_CACHE_DIR`` or ``~/.cache/ldeq_fast/cpu_plans.json``), keyed by the CPU's identity (vendor,
  family, model, stepping, the ISA flags that pick kernels), torch and oneDNN versions, thread count, the
  cell's widths and resolution, and the batch bucket (1, 2-3, 4-7, 8+: measured at 1, 2, 4, 8).  A published-size cell at batch 8 takes a few seconds to measure, once.
* What: each cell convolution's memory format (NCHW or channels_last), or for the 5x5 ones Winograd
  F(4x4, 5x5) (ldeq_fast/model/winograd.py; 6.25x fewer FLOPs, measured and accepted per convolution only
  when its rounding against the direct conv, on that conv's input when the model sees a face (a synthetic
  face through the stem and the cell), stays under ``WINOGRAD_MAX_ERROR``), and each split 1x1 conv's post-op.
* Where: CPU, float32, no autograd graph, no autocast, the fast path (``backend != 'torch'``, per-sample
  semantics).  Training, GPUs and the reference path keep the fixed layout (``cfg.channels_last``).
* Switch: ``LDEQ_FAST_CPU_TUNING=auto`` (default) | ``off`` (the fixed choices, nothing measured) |
  ``retune`` (measure again in this process and overwrite the cache).
* What ran: ``LDEQOutput.extra['cpu_plan']`` (and ``ldeq-fast bench`` rows) say how many convolutions ran
  in each format, how many split convs used the post-op, and whether the plan was measured or cached.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ldeq_fast.notices import warn_once

ENV_MODE = "LDEQ_FAST_CPU_TUNING"
ENV_CACHE = "LDEQ_FAST_CACHE_DIR"
MODES = ("auto", "off", "retune")
BATCH_BUCKETS = (1, 2, 4, 8)
FORMATS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}
CHOICES = (*FORMATS, "winograd")   # a conv's layout, or Winograd F(4x4, 5x5) (NCHW out; 5x5 convs only)
DEFAULT_FORMAT, DEFAULT_POST_ADD = "nhwc", True
# Winograd is a candidate only where its rounding, measured against the direct conv on a face's activations,
# stays within this fraction of the output's range (a direct float32 conv: ~3e-6; Winograd F(4, 5): ~1e-5)
WINOGRAD_MAX_ERROR = 5e-5
TIMING_FLOPS = 4e9   # at most this much work per timed call (see _timing_batch)
# a candidate replaces the fixed choice only when it is this much faster (timing noise must not flip it)
MARGIN = 0.03
_SCHEMA = 5   # 2: Winograd candidates; 3: layout changes counted; 4: warm-up before timing; 5: full CPU identity


def mode() -> str:
    m = os.environ.get(ENV_MODE, "auto").strip().lower() or "auto"
    if m not in MODES:
        raise ValueError(f"{ENV_MODE}={m!r}: expected one of {MODES}")
    return m


def cache_file() -> Path:
    root = os.environ.get(ENV_CACHE)
    if root:
        return Path(root) / "cpu_plans.json"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ldeq_fast" / "cpu_plans.json"


@dataclass
class CellPlan:
    formats: dict          # ConvBlock name in the cell -> 'nchw' | 'nhwc' | 'winograd'
    post_add: dict         # split block name -> bool
    source: str = "measured"   # 'measured' | 'cache'
    batch: int = 1         # the batch it was measured at
    timings_ms: dict = field(default_factory=dict)
    seconds: float = 0.0   # time the measurement took

    def describe(self) -> dict:
        count = {c: sum(v == c for v in self.formats.values()) for c in CHOICES}
        return {"source": self.source, "measured_batch": self.batch, "nhwc_convs": count["nhwc"],
                "nchw_convs": count["nchw"], "winograd_convs": count["winograd"],
                "post_add": sum(self.post_add.values()), "split_convs": len(self.post_add),
                "formats": dict(self.formats), "measure_seconds": round(self.seconds, 2)}

    def to_json(self) -> dict:
        return {"formats": self.formats, "post_add": self.post_add, "batch": self.batch,
                "timings_ms": self.timings_ms, "seconds": self.seconds}


def applies(model, x: torch.Tensor) -> bool:
    """The measured plan can be used for this solve (see the module docstring); the caller
    (ldeq_fast/model/fast_path.py) checks that the fast path's rewrites are on."""
    return (x.device.type == "cpu" and x.dtype == torch.float32
            and not torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu")
            and torch.backends.mkldnn.is_available() and mode() != "off")


def bucket(batch: int) -> int:
    return max(b for b in BATCH_BUCKETS if b <= max(1, batch))


def plan_key(model, batch: int) -> dict:
    """What a plan was measured for: the CPU (vendor, family, model, stepping, name, the ISA flags that pick
    kernels), torch and oneDNN, the thread count, the cell's shape and the batch bucket."""
    from ldeq_fast.machine import cpu_identity, onednn_version

    c = model.cfg
    return {"schema": _SCHEMA, "cpu": cpu_identity(), "machine": platform.machine(), "torch": torch.__version__,
            "onednn": onednn_version(), "threads": torch.get_num_threads(), "z_width": c.z_width,
            "injection_width": c.injection_width, "cell_base_width": c.cell_base_width,
            "cell_width_increment": c.cell_width_increment, "cell_gn_groups": c.cell_gn_groups,
            "heatmap_size": c.heatmap_size, "batch": bucket(batch)}


_plans: dict[str, CellPlan] = {}
_retuned: set = set()


def plan_for(model, batch: int) -> CellPlan:
    """The plan for ``model``'s cell at ``batch``: from this process, the disk cache, or measured now."""
    key = plan_key(model, batch)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    m = mode()
    if digest in _plans and (m != "retune" or digest in _retuned):
        return _plans[digest]
    if m != "retune":
        stored = _read_cache().get(digest)
        if stored is not None:
            try:
                plan = CellPlan(dict(stored["formats"]), dict(stored["post_add"]), "cache", int(stored["batch"]),
                                dict(stored.get("timings_ms", {})), float(stored.get("seconds", 0.0)))
                if set(plan.formats) == set(_conv_blocks(model.deq_layer.cell)):
                    _plans[digest] = plan
                    return plan
            except (KeyError, TypeError, ValueError):
                pass   # a malformed entry is measured again
    from ldeq_fast.ops import not_recorded

    with not_recorded():     # the candidates' runs are not the forward's: its record says what the forward ran
        plan = measure(model, key["batch"])
    _plans[digest] = plan
    _retuned.add(digest)
    _write_cache(digest, key, plan)
    return plan


def apply_plan(cell: nn.Module, plan: CellPlan | None) -> None:
    """Set each block's memory format and post-op choice (None: the fixed fast-path choices)."""
    from ldeq_fast.model.layers import ConvBlock

    for name, mod in cell.named_modules():
        if isinstance(mod, ConvBlock):
            if plan is None:
                for attr in ("memory_format", "post_add", "conv_algorithm"):
                    mod.__dict__.pop(attr, None)
            else:
                choice = plan.formats.get(name, DEFAULT_FORMAT)
                mod.memory_format = FORMATS.get(choice, torch.contiguous_format)
                mod.conv_algorithm = "winograd" if choice == "winograd" else "direct"
                mod.post_add = bool(plan.post_add.get(name, DEFAULT_POST_ADD))


# ------------------------------------------------------------------------------------------- measuring
def _conv_blocks(cell) -> dict:
    from ldeq_fast.model.layers import ConvBlock

    return {name: mod for name, mod in cell.named_modules() if isinstance(mod, ConvBlock)}


def _input_shapes(model, batch: int) -> tuple[dict, dict]:
    """Each cell ConvBlock's conv input shape and output shape at ``batch``, in execution order, from a run of a
    weightless copy on the meta device."""
    from ldeq_fast.model.layers import Cell

    c = model.cfg
    with torch.device("meta"):
        cell = Cell(c)
        shapes, outputs = {}, {}

        def record(name):
            def hook(mod, inp, out):    # returns None: the output is left alone
                shapes.setdefault(name, tuple(inp[0].shape))
                outputs.setdefault(name, tuple(out.shape))
            return hook
        hooks = [blk.conv.register_forward_hook(record(name)) for name, blk in _conv_blocks(cell).items()]
        z = torch.empty(model.z_shape(batch))
        x = torch.empty(batch, c.injection_width, c.heatmap_size, c.heatmap_size)
        cell(z, x)       # the concatenating path, eager ops: shapes only
    for h in hooks:
        h.remove()
    return shapes, outputs


def _time(cands: dict, rounds: int) -> dict:
    """Candidates interleaved (A, B, A, B, ...); the best time of each."""
    best = {k: float("inf") for k in cands}
    for _ in range(rounds):
        for k, fn in cands.items():
            t0 = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - t0)
    return best


def _layout(choice: str) -> str:
    """The memory format a choice reads and writes (Winograd works on NCHW)."""
    return "nhwc" if choice == "nhwc" else "nchw"


def _choose(order: list, costs: dict, copy_ms: dict, default, start_copy: float = 0.0) -> dict:
    """The cheapest choice per block over the whole cell, layout changes included: each block's candidates
    cost their time per image (a non-default one MARGIN more, so timing noise does not flip it), plus one copy
    of the previous block's output when the candidate reads the other memory format (the solver hands z in
    NCHW order, turning it costs ``start_copy``, and takes the heatmaps back in NCHW).  The blocks run in
    ``order``, so this is a shortest path over (block, output format) states, solved by dynamic programming."""
    best = {"nchw": (0.0, [])}                         # output format -> (cost, choices so far)
    prev_copy = start_copy
    for name in order:
        nxt = {}
        for cand, t in costs[name].items():
            cost_c = t * (1.0 if cand == default else 1.0 + MARGIN)
            fmt = _layout(cand[0])
            for state, (total, path) in best.items():
                total_c = total + cost_c + (prev_copy if state != fmt else 0.0)
                if fmt not in nxt or total_c < nxt[fmt][0]:
                    nxt[fmt] = (total_c, path + [(name, cand)])
        best, prev_copy = nxt, copy_ms[name]
    final = {f: tot + (prev_copy if f != "nchw" else 0.0) for f, (tot, _) in best.items()}
    return dict(best[min(final, key=final.get)][1])


def _copy_ms(shape: tuple, batch: int) -> float:
    """ms per image to turn an activation of ``shape`` into the other memory format (both ways, averaged),
    timed on at most ``batch`` images."""
    shape = (min(shape[0], batch),) + tuple(shape[1:])
    a = torch.randn(shape)
    b = a.contiguous(memory_format=torch.channels_last)
    times = _timed({"to_nhwc": lambda: a.contiguous(memory_format=torch.channels_last),
                    "to_nchw": lambda: b.contiguous()})
    return 1e3 * sum(times.values()) / 2 / shape[0]


def _timed(cands: dict) -> dict:
    """A warm-up call of every candidate (untimed: its first call builds kernels, caches transformed weights
    and touches fresh memory, and once made Winograd look 4x slower than it runs), then one round; cheap ones
    (< 20 ms) three more rounds (another process's time slice, ~10 ms, must not decide), expensive ones a
    second round for those within 20% of the best (a clear loser is not timed again)."""
    for fn in cands.values():
        fn()
    times = _time(cands, 1)
    if min(times.values()) < 0.02:
        extra = _time(cands, 3)
    else:
        close = {k: fn for k, fn in cands.items() if times[k] <= 1.2 * min(times.values())}
        extra = _time(close, 1) if len(close) > 1 else {}
    return {k: min(v, extra.get(k, v)) for k, v in times.items()}


def _timing_batch(conv: nn.Conv2d, shape: tuple) -> int:
    """The batch a conv is timed at: the real one, capped so one call stays under TIMING_FLOPS (a large map's
    per-image cost no longer depends on the batch; this keeps a published-size cell at batch 8 to seconds)."""
    k, c, kh, kw = conv.weight.shape
    per_image = 2 * k * c * kh * kw * shape[2] * shape[3] / (conv.stride[0] * conv.stride[1])
    return max(1, min(shape[0], int(TIMING_FLOPS // max(per_image, 1))))


@torch.no_grad()
def measure(model, batch: int) -> CellPlan:
    """Time every candidate of every cell convolution (with its norm epilogue, which runs in the conv's
    output format) at ``batch`` (capped per conv, ``_timing_batch``) on random inputs of the real shapes."""
    from ldeq_fast.model import winograd
    from ldeq_fast.model.layers import split_fuse_conv

    t_start = time.perf_counter()
    cell = model.deq_layer.cell
    blocks = _conv_blocks(cell)
    shapes, out_shapes = _input_shapes(model, batch)
    split = {name: blk for name, blk in blocks.items() if any(blk is s for s in cell.split_blocks())}
    attrs = ("memory_format", "post_add", "conv_algorithm")
    saved = {name: {a: blk.__dict__[a] for a in attrs if a in blk.__dict__} for name, blk in blocks.items()}
    gen = torch.Generator().manual_seed(0)

    def rand(shape, fmt):
        return torch.randn(shape, generator=gen).contiguous(memory_format=FORMATS[fmt])

    formats, post_add, timings, rejected, costs, copy_ms = {}, {}, {}, {}, {}, {}
    faces = None   # the 5x5 convs' inputs on a face, for Winograd's admission (computed when first needed)
    try:
        for blk in blocks.values():     # the cell as the fixed layout runs it while the activations are taken
            for attr in attrs:
                blk.__dict__.pop(attr, None)
        for name, blk in blocks.items():
            shape = shapes[name]
            shape = (_timing_batch(blk.conv, shape),) + shape[1:]
            cands = {}
            if name not in split:
                choices = list(FORMATS)
                if winograd.supports(blk.conv, shape[2], shape[3]):
                    if faces is None:
                        faces = _face_activations(model, [n for n, b in blocks.items() if n not in split
                                                          and winograd.supports(b.conv, *shapes[n][2:])])
                    err = _winograd_error(blk, faces[name])
                    if err <= WINOGRAD_MAX_ERROR:
                        choices.append("winograd")
                    else:
                        rejected[name] = f"winograd rounding {err:.1e} > {WINOGRAD_MAX_ERROR:g}"
                for f in choices:
                    xf = rand(shape, "nchw" if f == "winograd" else f)

                    def run(blk=blk, xf=xf, f=f):
                        _set_choice(blk, f)
                        return blk.epilogue(blk.conv_forward(xf))
                    cands[(f, DEFAULT_POST_ADD)] = run
            elif blk is cell.tail:
                zshape = (shape[0], model.cfg.z_width) + shape[2:]
                ishape = (shape[0], shape[1] - model.cfg.z_width) + shape[2:]
                for f in FORMATS:
                    for pa in (True, False):
                        _set_choice(blk, f)
                        blk.post_add = pa
                        zf, term = rand(zshape, f), cell.injection_term(rand(ishape, f))

                        def run(blk=blk, zf=zf, term=term, f=f, pa=pa):
                            _set_choice(blk, f)
                            blk.post_add = pa
                            return blk.epilogue(cell.split_tail_conv(zf, term))
                        cands[(f, pa)] = run
            else:
                half = shape[1] // 2
                sshape = (shape[0], half) + shape[2:]
                lshape = (shape[0], half, shape[2] // 2, shape[3] // 2)
                for f in FORMATS:
                    skip, low = rand(sshape, f), rand(lshape, f)
                    for pa in (True, False):
                        def run(blk=blk, skip=skip, low=low, f=f, pa=pa):
                            _set_choice(blk, f)
                            blk.post_add = pa
                            return blk.epilogue(split_fuse_conv(blk, skip, low))
                        cands[(f, pa)] = run
            times = _timed(cands)
            costs[name] = {k: 1e3 * v / shape[0] for k, v in times.items()}
            copy_ms[name] = _copy_ms(out_shapes[name], _timing_batch(blk.conv, shapes[name]))
            timings[name] = {"timed_batch": shape[0], "copy_ms_per_image": round(copy_ms[name], 3),
                             **{f"{k[0]}{'+post_add' if k[1] and name in split else ''}": round(1e3 * v, 3)
                                for k, v in times.items() if name in split or k[1] == DEFAULT_POST_ADD}}
        order = [name for name in shapes if name in blocks]          # execution order
        z_copy = _copy_ms(model.z_shape(batch), _timing_batch(cell.tail.conv, shapes["tail"]))
        timings["z_copy_ms_per_image"] = round(z_copy, 3)
        for name, (f, pa) in _choose(order, costs, copy_ms, (DEFAULT_FORMAT, DEFAULT_POST_ADD), z_copy).items():
            formats[name] = f
            if name in split:
                post_add[name] = pa
    finally:
        for name, blk in blocks.items():
            for attr in attrs:
                blk.__dict__.pop(attr, None)
            blk.__dict__.update(saved[name])
    if rejected:
        timings["rejected"] = rejected
    return CellPlan(formats, post_add, "measured", batch, timings, time.perf_counter() - t_start)


def _set_choice(blk, choice: str) -> None:
    blk.memory_format = FORMATS.get(choice, torch.contiguous_format)
    blk.conv_algorithm = "winograd" if choice == "winograd" else "direct"


def _face_activations(model, names: list) -> dict:
    """Each named block's conv input in one cell evaluation on a face: a synthetic face image (the
    model's input size) through the stem, and the cell at the solver's start z0.  Winograd's rounding grows
    with the input's spread across a tile, so it is judged on what the model feeds it, not on Gaussian noise."""
    from ldeq_fast.data.synthetic import SyntheticFaces

    cell = model.deq_layer.cell
    got = {}
    hooks = [cell.get_submodule(n).conv.register_forward_hook(
        lambda mod, inp, out, n=n: got.setdefault(n, inp[0].detach().clone())) for n in names]
    try:
        images = SyntheticFaces(1, size=model.cfg.im_size, seed=0)[0]["image"][None]
        x = model.injection(images)
        cell(model.initial_z0(x), x)
    finally:
        for h in hooks:
            h.remove()
    missing = sorted(set(names) - set(got))
    if missing:
        raise RuntimeError(f"CPU plan: the face's cell evaluation never reached the convs {missing}")
    return got


def _winograd_error(blk, x: torch.Tensor) -> float:
    """Max deviation of the block's Winograd conv from the direct one on x, over the output's range."""
    _set_choice(blk, "winograd")
    got = blk.conv_forward(x)
    _set_choice(blk, "nchw")
    want = blk.conv_forward(x)
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))


# ------------------------------------------------------------------------------------------- disk cache
def _read_cache() -> dict:
    path = cache_file()
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
        if data.get("schema") != _SCHEMA:
            return {}
        return dict(data.get("plans", {}))
    except (OSError, ValueError, AttributeError) as exc:
        warn_once("cpu-plan-cache-read", f"ldeq_fast: unreadable CPU plan cache {path} ({exc}); measuring again")
        return {}


def _write_cache(digest: str, key: dict, plan: CellPlan) -> None:
    path = cache_file()
    try:
        plans = _read_cache()
        plans[digest] = {"key": key, **plan.to_json()}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps({"schema": _SCHEMA, "plans": plans}, indent=1))
        os.replace(tmp, path)   # atomic: a reader never sees a torn file; concurrent writers: the last wins
    except OSError as exc:
        warn_once("cpu-plan-cache-write", f"ldeq_fast: cannot write the CPU plan cache {path} ({exc}); the plan is kept for "
                            "this process only")


def clear_memory() -> None:
    """Forget the plans of this process (tests; the disk cache stays)."""
    _plans.clear()
    _retuned.clear()

"""Shared benchmark helpers: machine description, synchronised timing, interleaved repeats, medians,
JSON output and a plain-text table.  Used by the scripts in bench/; nothing here is specific to one op.

Conventions (see the design notes): methods are interleaved, the order alternating (A, B, C, C, B, A, ...), so
drift on a noisy machine hits every method alike, each figure is the median of the repeats, and the machine is
recorded with every result.
"""
from __future__ import annotations

import json
import os
import statistics
import time
from typing import Callable

import torch


def machine_info(device: str | torch.device = "cpu") -> dict:
    """CPU identity and ISA flags, cores, versions, GPU name, the load average now (call it before measuring;
    write_json adds the load after)."""
    try:
        from ldeq_fast.machine import machine_info as base
        info = base()
    except Exception:  # noqa: BLE001 - the package's helper is optional here
        info = {"cores": os.cpu_count(), "torch": torch.__version__, "load_average_before": list(os.getloadavg())}
    info["torch_threads"] = torch.get_num_threads()
    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(dev)
        info["gpu"] = props.name
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["cuda"] = torch.version.cuda
    return info


def synchronize(device: str | torch.device) -> None:
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def time_once(fn: Callable[[], object], device: str | torch.device = "cpu") -> float:
    """Seconds for one call, the device synchronised before and after."""
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t0


def interleaved(methods: dict[str, Callable[[], object]], repeats: int = 5, warmup: int = 1,
                device: str | torch.device = "cpu") -> dict[str, list[float]]:
    """Time each method ``repeats`` times, interleaved, after ``warmup`` untimed rounds; the order alternates
    between rounds (A B C, C B A, A B C, ...) so no method always runs first (cold caches, a just-woken
    core) or right after the same neighbour.  Returns {name: [seconds, ...]}."""
    names = list(methods)
    for _ in range(warmup):
        for fn in methods.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in methods}
    for rep in range(repeats):
        for name in (names if rep % 2 == 0 else names[::-1]):
            times[name].append(time_once(methods[name], device))
    return times


def summary(samples: list[float], scale: float = 1.0) -> dict:
    """Median / min / max of a list of timings, times ``scale`` (e.g. 1e3 for ms)."""
    return {"median": statistics.median(samples) * scale, "min": min(samples) * scale,
            "max": max(samples) * scale, "n": len(samples)}


def write_json(path: str | None, payload: dict) -> None:
    if not path:
        return
    if isinstance(payload.get("machine"), dict) and "load_average_after" not in payload["machine"]:
        payload["machine"]["load_average_after"] = [round(v, 2) for v in os.getloadavg()]  # the measurement's end
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as fh:
        json.dump(payload, fh, indent=2, default=str)
        fh.write("\n")


def table(rows: list[dict], columns: list[str]) -> str:
    """A fixed-width text table of ``rows`` (dicts) restricted to ``columns``."""
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return "-" if v is None else str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)

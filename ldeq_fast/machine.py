"""What machine a measurement was taken on (recorded with every benchmark result)."""
from __future__ import annotations

import functools
import os
import platform

import torch


@functools.lru_cache(maxsize=None)   # read once: the CPU plan's key asks for it at every CPU solve
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    info = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        # the machine's load when the run started (1, 5, 15 min): timings on a shared machine are read with it
        "load_avg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cuda": torch.version.cuda,
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:  # noqa: BLE001
        info["triton"] = None
    from ldeq_fast import _ext

    info["native_extension"] = {"cpp": _ext.has_cpp()}  # the CPU kernels; GPU kernels are Triton
    return info

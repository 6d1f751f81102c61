"""What machine a measurement was taken on (recorded with every benchmark result): the CPU's identity and ISA
flags, versions, threads, and the load average before (``machine_info``) and after (``finish_record``) it."""
from __future__ import annotations

import functools
import os
import platform
import re

import torch

# the ISA features that change which kernels oneDNN and the C++ extension run (and so timings and rounding)
KERNEL_ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16")


@functools.lru_cache(maxsize=None)   # read once: the CPU plan's key asks for it at every CPU solve
def cpu_identity(cpuinfo: str = "/proc/cpuinfo") -> dict:
    """The CPU as /proc/cpuinfo names it (first processor): vendor, family, model, stepping, model name, and
    which of KERNEL_ISA_FLAGS it has.  Elsewhere (no /proc/cpuinfo) what platform knows, flags unknown."""
    fields = {}
    try:
        with open(cpuinfo) as fh:
            for line in fh:
                if not line.strip():
                    break                      # the end of the first processor's block
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        pass
    flags = set(fields.get("flags", "").split())
    return {"vendor": fields.get("vendor_id", platform.machine()),
            "family": fields.get("cpu family", ""), "model": fields.get("model", ""),
            "stepping": fields.get("stepping", ""),
            "model_name": fields.get("model name", platform.processor() or platform.machine()),
            "isa": sorted(f for f in KERNEL_ISA_FLAGS if f in flags) if "flags" in fields else None}


def cpu_model() -> str:
    return cpu_identity()["model_name"]


@functools.lru_cache(maxsize=None)
def onednn_version() -> str:
    """oneDNN's version as torch was built with it ('' when torch has none)."""
    m = re.search(r"(?:MKL-DNN|oneDNN) v([0-9][^\s]*)", torch.__config__.show())
    return m.group(1) if m else ""


def load_average() -> list | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def finish_record(info: dict) -> dict:
    """Add the load average after the measurement to a record ``machine_info()`` made before it."""
    info["load_average_after"] = load_average()
    return info


def machine_info() -> dict:
    info = {
        "cpu": cpu_model(),
        "cpu_identity": {k: v for k, v in cpu_identity().items() if k != "isa"},
        "isa_flags": cpu_identity()["isa"],
        # the load before the measurement; finish_record adds the one after (a busy machine's figures say so)
        "load_average_before": load_average(),
        "onednn": onednn_version(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
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

"""Peak tensor memory of a piece of code, on any device.

CUDA has ``torch.cuda.max_memory_allocated``; the CPU has no allocator statistics, and process RSS mixes
in the C library's retained heap.  ``PeakTensorMemory`` counts instead what the code itself allocates:
every tensor an op returns is traced to its storage, a storage counts from the first op that returns it
until the last tensor seen on it is gone.  The result is the peak of live tensor bytes, the CPU analogue of
``max_memory_allocated`` (temporaries inside a single fused kernel are not visible, as on CUDA).  The
tracking runs in Python for every op, so time the code in a separate, untracked run.
"""
from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class PeakTensorMemory(TorchDispatchMode):
    """``with PeakTensorMemory() as m: ...`` then ``m.peak_bytes`` (live bytes above the start)."""

    def __init__(self):
        super().__init__()
        self.live_bytes = 0
        self.peak_bytes = 0
        self._views: dict[int, int] = {}   # storage pointer -> live tensors seen on it
        self._sizes: dict[int, int] = {}

    def _release(self, key: int) -> None:
        self._views[key] -= 1
        if self._views[key] == 0:
            del self._views[key]
            self.live_bytes -= self._sizes.pop(key)

    def _track(self, t: torch.Tensor, input_storages: set) -> None:
        storage = t.untyped_storage()
        key, nbytes = storage.data_ptr(), storage.nbytes()
        if nbytes == 0 or key == 0:
            return
        if key not in self._views:
            if key in input_storages:   # a view of (or in-place result on) memory from before the tracking
                return
            self._views[key] = 0
            self._sizes[key] = nbytes
            self.live_bytes += nbytes
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        self._views[key] += 1           # every tensor on a tracked storage keeps it alive
        weakref.finalize(t, self._release, key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t, inputs)
        return out


def peak_memory_bytes(fn, device) -> int:
    """Peak memory of ``fn()`` above what was allocated when it started: the CUDA allocator's peak on a
    CUDA device, ``PeakTensorMemory`` elsewhere."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    with PeakTensorMemory() as mem:
        fn()
    return mem.peak_bytes

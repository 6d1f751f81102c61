"""Streaming inference with a fixed-iteration forward, replayed as a CUDA graph.

A video stream runs the same small batch through the model every frame: stem, a few warm-started solver
iterations (RwR), the extra step and the keypoint head.  At batch 1-8 the GPU time of that forward is
smaller than the time to launch its few hundred kernels from Python, so ``GraphedForward`` captures it
once (static input buffers, ``fixed_iters`` solve: no host sync anywhere) and replays the graph per frame.
Elsewhere (CPU, or ``use_graph=False``) it runs the same fixed-iteration forward eagerly, which is what the
tests compare against the ordinary forward.
"""
from __future__ import annotations

import torch

from ldeq_fast.model.ldeq import LDEQ, LDEQOutput


class GraphedForward:
    """``gf = GraphedForward(model, batch=1, iters=1)``; then ``out = gf(images, z0)`` per frame.

    ``iters`` solver evaluations from ``z0``, then the model's extra step: 2 cell evaluations per frame at
    ``iters=1`` (the published RwR inference).  ``z0=None`` (a cold start: first frame, reset) starts from the
    model's learned initial state when it has one (computed inside the graph: ldeq_fast/model/init_state.py),
    from zeros otherwise.  The returned keypoints, uncertainties and z_star are copies, safe to keep across
    calls (pass ``out.z_star`` as the next z0); ``heatmaps`` and ``stats`` are the forward's own buffers,
    overwritten by the next call.  One graph per kind of start, captured at first use.
    """

    def __init__(self, model: LDEQ, batch: int, iters: int = 1, use_graph: bool | None = None, warmup: int = 3):
        if batch < 1 or iters < 1:
            raise ValueError("GraphedForward: batch and iters must be >= 1")
        self.model = model.eval()
        c = model.cfg
        device = next(model.parameters()).device
        self.images = torch.zeros(batch, 3, c.im_size, c.im_size, device=device)
        self.z0 = model.zeros_z0(self.images)
        self.settings = model.solver_settings(iters, tol=0.0, fixed_iters=True, check_every=0)
        self.use_graph = device.type == "cuda" if use_graph is None else bool(use_graph)
        if self.use_graph and c.backend == "torch":
            raise ValueError("GraphedForward: the reference solver (backend 'torch') reads residuals on the host; "
                             "capture needs the fused engine (backend auto or triton)")
        if self.use_graph and device.type != "cuda":
            raise ValueError("GraphedForward: CUDA graphs need the model on a CUDA device")
        self.warmup = warmup
        self._graphs: dict[str, tuple[torch.cuda.CUDAGraph, LDEQOutput]] = {}
        if self.use_graph:
            self._capture(self._start(None))

    def _start(self, z0) -> str:
        return "learned" if z0 is None and self.model.uses_initial_state() else "given"

    def _capture(self, start: str) -> None:
        device = self.images.device
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):      # warm-up off the capture stream: kernels, allocator, caches
            for _ in range(self.warmup):
                self._run(start)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static = self._run(start)
        self._graphs[start] = (graph, static)

    @torch.no_grad()
    def _run(self, start: str = "given") -> LDEQOutput:
        return self.model.forward_unchecked(self.images, None if start == "learned" else self.z0,
                                            solver=self.settings)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, z0: torch.Tensor | None = None, *, check: bool = True) -> LDEQOutput:
        """One frame.  ``check=False`` skips the model's input check, whose NaN/inf test reads a flag back to
        the host every frame (a sync that stalls the GPU queue); the shapes are checked either way."""
        if tuple(images.shape) != tuple(self.images.shape):
            raise ValueError(f"GraphedForward was built for images of shape {tuple(self.images.shape)}, "
                             f"got {tuple(images.shape)}")
        if check:
            self.model.check_inputs(images, z0)
        elif z0 is not None and tuple(z0.shape) != tuple(self.z0.shape):
            raise ValueError(f"z0 must have shape {tuple(self.z0.shape)}, got {tuple(z0.shape)}")
        self.images.copy_(images)
        start = self._start(z0)
        if start == "given":
            if z0 is None:
                self.z0.zero_()
            else:
                self.z0.copy_(z0)
        if not self.use_graph:
            out = self._run(start)
        else:
            if start not in self._graphs:
                self._capture(start)
            graph, out = self._graphs[start]
            graph.replay()
        return LDEQOutput(keypoints=out.keypoints.clone(), uncertainty=out.uncertainty.clone(),
                          uncertainty_published=out.uncertainty_published.clone(), z_star=out.z_star.clone(),
                          heatmaps=out.heatmaps, stats=out.stats, backends=out.backends, extra=dict(out.extra))

"""Training memory of the fast path: store pre-activations, recompute the cheap parts in backward.

A training step keeps two graphs alive while the implicit backward solves its adjoint: the stem's and the
one tracked cell step's.  Two measures shrink them without changing any value:

* ``recompute_stem``: the stem is checkpointed (only the images are kept) and re-run after the DEQ backward,
  stage by stage; BatchNorm's running statistics are updated by the first run only.  The stem is ~2% of a
  step's convolution work, and its high-resolution activations are a third of the eager path's memory.
* ``EpilogueRecompute``: inside this context, each fused LeakyReLU -> GroupNorm output that an autograd
  node saves (the next conv's input, a pooling input) is stored as a recipe pointing at the conv output the
  fused op already keeps, and recomputed from it when backward unpacks it (a residual connection the fused
  op adds is recomputed from the residual's own recipe).  The recompute is one fused elementwise pass per
  block and per vector-Jacobian product, small next to the convolutions.

The recomputed tensors carry no graph, so double backward through them is refused with a clear error.
"""
from __future__ import annotations

import contextlib
import threading
import weakref

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

_active = threading.local()


class _Recipe:
    """``fn(*inputs)`` recomputed on demand; an input may itself be a recipe."""
    __slots__ = ("fn", "inputs", "versions")

    def __init__(self, fn, inputs):
        self.fn, self.inputs = fn, inputs
        self.versions = tuple(t._version if isinstance(t, torch.Tensor) else None for t in inputs)

    def __call__(self) -> torch.Tensor:
        if torch.is_grad_enabled():
            raise RuntimeError("double backward through the fast path's recomputed activations is not supported; "
                               "build the model with train_recompute=False")
        if tuple(t._version if isinstance(t, torch.Tensor) else None for t in self.inputs) != self.versions:
            raise RuntimeError("a tensor needed to recompute a saved activation was modified in place between "
                               "forward and backward")
        with torch.no_grad():
            return self.fn(*(t() if isinstance(t, _Recipe) else t for t in self.inputs))


class EpilogueRecompute:
    """``saved_tensors_hooks`` that swap registered outputs for recipes (see the module docstring)."""

    def __init__(self):
        self._recipes: dict[int, tuple[weakref.ref, _Recipe]] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def remember(self, out: torch.Tensor, fn, *inputs) -> None:
        """``out`` equals ``fn(*inputs)``.  An input that is itself a registered output is replaced by its
        recipe (so it is not kept alive); the other input tensors are kept alive by the graph anyway."""
        inputs = tuple(self._as_input(t) if isinstance(t, torch.Tensor) else t for t in inputs)
        self._recipes[id(out)] = (weakref.ref(out), _Recipe(fn, inputs))

    def recipe_of(self, t: torch.Tensor):
        entry = self._recipes.get(id(t))
        return entry[1] if entry is not None and entry[0]() is t else None

    def _as_input(self, t: torch.Tensor):
        recipe = self.recipe_of(t)
        return t.detach() if recipe is None else recipe

    def _pack(self, t: torch.Tensor):
        recipe = self.recipe_of(t)
        return t if recipe is None else recipe

    @staticmethod
    def _unpack(packed):
        return packed() if isinstance(packed, _Recipe) else packed

    def __enter__(self):
        self._outer = getattr(_active, "ctx", None)
        _active.ctx = self
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)
        _active.ctx = self._outer
        self._recipes.clear()  # packed recipes live on in the graph; the lookup table is not needed now
        return False


def remember(out: torch.Tensor, fn, *inputs: torch.Tensor) -> None:
    """Register ``out = fn(*inputs)`` with the active ``EpilogueRecompute`` (no-op outside one or when
    ``out`` is not part of a graph)."""
    if torch.compiler.is_compiling():
        # dynamo cannot trace the thread-local lookup (a graph break in every block); a compiled region keeps
        # its activations as autograd saves them (saved_tensors_hooks are not traced either)
        return
    ctx = getattr(_active, "ctx", None)
    if ctx is not None and out.requires_grad:
        ctx.remember(out, fn, *inputs)


_BN_STATS = ("running_mean", "running_var", "num_batches_tracked")


@contextlib.contextmanager
def _scratch_batchnorm_stats(module: nn.Module):
    """BatchNorm whose running-statistic updates go to throw-away copies (a recompute must not count the
    batch twice).  The ops, and so the tensors autograd saves, are exactly those of the first pass."""
    saved = []
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            for name in _BN_STATS:
                t = getattr(m, name, None)
                if t is not None:
                    saved.append((m, name, t))
                    setattr(m, name, t.clone())
    try:
        yield
    finally:
        for m, name, t in saved:
            setattr(m, name, t)


def recompute_stem(stem: nn.Sequential, images: torch.Tensor) -> torch.Tensor:
    """``stem(images)`` whose activations are recomputed in backward instead of stored.  Checkpoints are
    nested: the forward keeps only the images (nothing of the stem's is alive during the DEQ backward), and
    the stem's own backward recomputes it stage by stage (one stage's activations alive at a time)."""

    def stages(x):
        for stage in stem:
            x = _checkpointed(stage, x)
        return x

    return _checkpointed(stem, images, stages)


def _checkpointed(module: nn.Module, x: torch.Tensor, fn=None) -> torch.Tensor:
    """``fn(x)`` (default ``module(x)``) under a non-reentrant checkpoint; the recompute leaves ``module``'s
    BatchNorm statistics alone."""
    fn = fn or module
    calls = [0]

    def run(inp):
        calls[0] += 1
        if calls[0] == 1:
            return fn(inp)
        with _scratch_batchnorm_stats(module):
            return fn(inp)

    return checkpoint(run, x, use_reentrant=False, preserve_rng_state=False)

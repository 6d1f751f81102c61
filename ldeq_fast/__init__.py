"""ldeq_fast: a fast engine for Landmark Deep Equilibrium models (LDEQ, CVPR 2023)."""
from ldeq_fast.config import LDEQConfig
from ldeq_fast.solvers import SolverStats, solve

__version__ = "0.1.0"

__all__ = ["LDEQConfig", "SolverStats", "solve", "LDEQ", "Landmarker", "load_model", "__version__"]


def __getattr__(name):  # the model pulls in more; load it on first use
    if name == "LDEQ":
        from ldeq_fast.model import LDEQ

        return LDEQ
    if name == "load_model":
        from ldeq_fast.model import load_model

        return load_model
    if name == "Landmarker":
        from ldeq_fast.landmarker import Landmarker

        return Landmarker
    raise AttributeError(name)

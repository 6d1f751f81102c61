"""Guarded import of the native extension ``ldeq_fast._C`` (the fused ops' CPU kernels).

Importing ldeq_fast never fails because the extension is missing or broken: the error is kept and
reported (once, as a warning) when a backend that needs it is asked for.
"""
from __future__ import annotations

_C = None
IMPORT_ERROR: BaseException | None = None
try:  # the .so registers torch.ops.ldeq_fast.* when imported
    from ldeq_fast import _C  # type: ignore[attr-defined,no-redef]
except Exception as exc:  # noqa: BLE001 - any failure means "no native backend"
    IMPORT_ERROR = exc

def has_cpp() -> bool:
    return _C is not None


def missing_reason() -> str:
    if IMPORT_ERROR is None:
        return "the extension is loaded"
    return (f"ldeq_fast._C could not be imported ({type(IMPORT_ERROR).__name__}: {IMPORT_ERROR}); "
            "rebuild it with `pip install --no-build-isolation -e .` (see docs/design.md, 'Builds')")

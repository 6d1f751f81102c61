"""Warnings said once per process: a fallback, a slow path or an unreadable cache is worth one line, not
one per call."""
from __future__ import annotations

import warnings

_said: set[str] = set()


def warn_once(key: str, message: str, category: type[Warning] = RuntimeWarning) -> None:
    """Warn ``message`` the first time ``key`` is seen in this process."""
    if key not in _said:
        _said.add(key)
        warnings.warn(message, category, stacklevel=3)

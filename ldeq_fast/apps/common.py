"""What several subcommands share: the usage error, small argument types, and which errors are expected."""
from __future__ import annotations

import sys


class UsageError(Exception):
    """Arguments that do not fit together (exit status 2, as argparse's own usage errors)."""


def ints(s: str) -> tuple[int, ...]:
    """``'1,8'`` -> (1, 8)."""
    try:
        return tuple(int(v) for v in s.split(",") if v)
    except ValueError:
        raise ValueError(f"{s!r} is not a comma-separated list of integers") from None


# errors a user can cause with a bad input (missing or corrupt file, wrong config key or value, missing optional
# package, unreadable video): one line, no traceback.  Anything else is a bug and keeps its traceback.  The
# library's input errors -- CheckpointError (and InitFileError), ConfigError, ImageError, AnnotationError -- are
# ValueErrors; its video errors are RuntimeErrors, listed by name below.
EXPECTED_BUILTIN = (UsageError, OSError, ImportError, ValueError, FloatingPointError)
# (module, class): checked only when the module is loaded -- an exception of a class can only exist once its
# module is imported, and importing these here would load cv2 and torch for ``ldeq-fast --help``
EXPECTED_LIBRARY = (("ldeq_fast.data.wflw_v", "VideoError"), ("ldeq_fast.video.evaluate", "ClipError"))


def is_expected(exc: BaseException) -> bool:
    if isinstance(exc, EXPECTED_BUILTIN):
        return True
    for module, name in EXPECTED_LIBRARY:
        mod = sys.modules.get(module)
        if mod is not None and isinstance(exc, getattr(mod, name)):
            return True
    return False


def error_line(command: str, message) -> str:
    """``ldeq-fast <command>: error: <message>`` on one line."""
    return f"ldeq-fast {command}: error: " + " ".join(str(message).splitlines())


def print_error(command: str, message) -> None:
    print(error_line(command, message), file=sys.stderr, flush=True)

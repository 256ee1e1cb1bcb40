"""Warnings attributed to the user's line, not to the scinfl module that raises them."""

from __future__ import annotations

import os
import sys
import warnings

__all__ = ["warn"]

_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` at the first frame outside scinfl (Python 3.12's ``skip_file_prefixes``), so that
    a notebook shows the call that caused it, however deep in scinfl the warning is raised."""
    frame = sys._getframe(1)
    level = 2  # 1 is this function; 2 its caller
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE):
        frame = frame.f_back
        level += 1
    warnings.warn(message, category, stacklevel=level - 1 if frame is None else level)

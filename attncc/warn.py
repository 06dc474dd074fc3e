"""Warnings that name the user's line, whatever path (custom op, dispatcher) led to them."""

from __future__ import annotations

import os
import sys
import warnings

import torch

# frames in these packages are attncc's own or torch's dispatch machinery (custom ops)
_INTERNAL = (os.path.dirname(os.path.abspath(__file__)) + os.sep,
             os.path.dirname(torch.__file__) + os.sep)


def warn_user(message: str, category: type[Warning] = UserWarning) -> None:
    """`warnings.warn` with the stacklevel of the first frame outside attncc and torch (a fixed
    stacklevel would point into attncc when the call went through `torch.ops`)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(_INTERNAL):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level + 1)

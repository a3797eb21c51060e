"""Warnings attributed to the user's code: the first caller outside cbn_mmdet and torch (the
model's ``forward`` that called the layer), not the layer or torch's wrappers around it."""
import os
import sys
import warnings

import torch

_INTERNAL = (os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep,
             os.path.dirname(os.path.abspath(torch.__file__)) + os.sep)


def warn(message: str, category=UserWarning) -> None:
    frame, level = sys._getframe(1), 2
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_INTERNAL):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)

"""Torch devices named on the command line, checked before any work starts.

Every library entry that takes a ``device`` (capture's :func:`~ovstore.capture.load_pipeline`,
maps, optimize, label, demo) calls :func:`check_device` first, so a CPU-only torch or a
mistyped device ends in one line naming the fix instead of an assertion deep inside torch
after minutes of loading or reading.
"""

from __future__ import annotations

import torch

from .errors import InvalidInputError

__all__ = ["check_device"]

#: device types ovstore computes on (others, e.g. ``meta``, hold no data)
_TYPES = ("cpu", "cuda", "mps", "xpu")


def check_device(device: str | torch.device) -> torch.device:
    """Parse ``device`` and make sure this torch build and machine can use it.

    Raises :class:`InvalidInputError` (one line, with the fix) instead of the assertion deep
    inside torch that a CPU-only build raises on its first CUDA tensor.
    """
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise InvalidInputError(f"--device {device!r} is not a torch device; write cpu, cuda or cuda:N "
                                "(N the GPU's number, from 0)") from None
    if parsed.type not in _TYPES:
        raise InvalidInputError(f"--device {device}: ovstore computes on {', '.join(_TYPES)}; use --device cpu "
                                "or cuda")
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidInputError(
                f"--device {device}: this torch build or machine has no CUDA device "
                f"(torch {torch.__version__}); use --device cpu, or install a CUDA build of torch"
            )
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise InvalidInputError(
                f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) are visible; "
                f"use cuda:0..cuda:{torch.cuda.device_count() - 1}"
            )
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise InvalidInputError(f"--device {device}: MPS is not available here; use --device cpu")
    elif parsed.type == "xpu" and not (hasattr(torch, "xpu") and torch.xpu.is_available()):
        raise InvalidInputError(f"--device {device}: this torch build or machine has no XPU device; use --device cpu")
    return parsed

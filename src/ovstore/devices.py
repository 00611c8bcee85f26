"""Torch devices named on the command line, checked before any work starts."""

from __future__ import annotations

import torch

from .errors import InvalidInputError

__all__ = ["check_device"]


def check_device(device: str | torch.device) -> torch.device:
    """Parse ``device`` and make sure this torch build and machine can use it.

    Raises :class:`InvalidInputError` (one line, with the fix) instead of the assertion deep
    inside torch that a CPU-only build raises on its first CUDA tensor.
    """
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InvalidInputError(f"--device {device!r} is not a torch device ({exc}); use cpu, cuda or cuda:N") from None
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
    return parsed

"""Refining cross-attention maps with the image's own self-attention (``--refine self-attention``).

Each refinement is a plain function of maps ``(..., h, w)`` on the self-attention grid and the
image's averaged self-attention matrix ``SA`` ``(h*w, h*w)`` (row ``i``: how query pixel ``i``
attends every key pixel; rows sum to 1), as stored by ``ovstore capture --self-attention``:

* :func:`ovam` — OVAM's weighting: the map divided by its maximum, times a self-attention map
  rescaled to ``[min_sa, 1]``;
* :func:`propagate` — ``SA^k · CA`` (DiffSegmenter, Dataset Diffusion): every pixel takes the
  map of the pixels it attends; with ``mix < 1`` the propagated map is blended with the map it
  came from (both divided by their maximum), propagation with restart as in label propagation;
* :func:`iseg` — iSeg's iterative propagation through an entropy-reduced ``SA``.

:func:`refine_maps` brings maps of any grid to the self-attention grid (bilinear, area when
shrinking), refines them and brings them back, as the papers resize the cross-attention map to
the self-attention resolution; :class:`Refinement` is the parsed ``--refine`` option.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import InvalidInputError

__all__ = ["METHODS", "Refinement", "entropy_reduced", "iseg", "ovam", "parse_refinement", "propagate",
           "refine_maps", "resample"]

#: The refinement methods, by name.
METHODS = ("propagate", "ovam", "iseg")
#: Each method's parameters and their defaults (``k``: propagation steps; ``mix``: the propagated
#: map's share when blended with the unpropagated one, 1 = ``SA^k · CA`` alone; ``min_sa``: floor of
#: OVAM's rescaled map, 0.85 as OVAM's VOC-sim evaluation; ``iterations``/``step``: iSeg's
#: refinement rounds and entropy-descent step, ``0`` meaning ``1 / (N (ln N - 1))``).
PARAMETERS: dict[str, dict[str, float]] = {
    "propagate": {"k": 1, "mix": 1.0},
    "ovam": {"min_sa": 0.85},
    "iseg": {"iterations": 3, "step": 0.0},
}
_INTEGER = {"k", "iterations"}


def _torch(x: Any) -> torch.Tensor:
    return x.float() if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x, dtype=np.float32))


def _like(result: torch.Tensor, original: Any) -> Any:
    return result if isinstance(original, torch.Tensor) else result.numpy()


def _check(maps: torch.Tensor, sa: torch.Tensor) -> None:
    pixels = maps.shape[-2] * maps.shape[-1]
    if sa.dim() != 2 or sa.shape != (pixels, pixels):
        raise InvalidInputError(f"the self-attention matrix is {tuple(sa.shape)}, maps of {maps.shape[-2]}x"
                                f"{maps.shape[-1]} need ({pixels}, {pixels}); resample the maps to its grid")


def propagate(maps: Any, sa: Any, k: int = 1, mix: float = 1.0) -> Any:
    """``SA^k · CA``: each pixel's value becomes the attention-weighted mean of the map over the
    pixels it attends, ``k`` times (DiffSegmenter's and Dataset Diffusion's refinement).

    ``mix < 1`` returns ``(1 - mix)·CA/max(CA) + mix·P/max(P)`` with ``P = SA^k · CA``: a
    propagation that restarts from the map (as label propagation does), which keeps the map's
    peaks where a near-uniform ``SA`` would blur them, and fills the object around them; the
    result is on the scale of a max-normalised map. ``maps`` ``(..., h, w)``, ``sa``
    ``(h*w, h*w)``; numpy in, numpy out (torch likewise)."""
    m, a = _torch(maps), _torch(sa)
    _check(m, a)
    flat = m.reshape(-1, a.shape[0]).T  # (pixel, map)
    for _ in range(int(k)):
        flat = a @ flat
    out = flat.T.reshape(m.shape)
    if float(mix) < 1.0:
        out = (1.0 - float(mix)) * _peak_normalised(m) + float(mix) * _peak_normalised(out)
    return _like(out, maps)


def _peak_normalised(m: torch.Tensor) -> torch.Tensor:
    peak = m.amax(dim=(-2, -1), keepdim=True)
    return m / torch.where(peak > 0, peak, torch.ones_like(peak))


def ovam(maps: Any, sa: Any, min_sa: float = 0.85) -> Any:
    """OVAM's self-attention weighting: ``map / max(map) * rescale(sa_map)``.

    The paper multiplies each normalised map by a self-attention map of the image, min-max
    rescaled to ``[min_sa, 1]``, before thresholding and DenseCRF (OVAM's evaluation notebooks:
    ``min_sa`` 0.85 on VOC-sim, 0.91 on COCO-cap). Its released hook computes
    ``softmax(QKᵀ)·1`` summed over heads and channels, which is the same constant for every
    pixel (rows of a softmax sum to 1), so the released maps are constant and rescaling them
    divides 0 by 0. Here the self-attention map is what that sum was meant to show and the
    matrix gives: the attention each pixel receives, ``Σ_i SA[i, j]`` (column sums)."""
    m, a = _torch(maps), _torch(sa)
    _check(m, a)
    received = a.sum(dim=0)
    span = received.max() - received.min()
    scaled = (received - received.min()) / span if span > 0 else torch.ones_like(received)
    weight = (scaled * (1 - float(min_sa)) + float(min_sa)).reshape(m.shape[-2:])
    return _like(_peak_normalised(m) * weight, maps)


def entropy_reduced(sa: Any, step: float = 0.0) -> Any:
    """iSeg's entropy-reduced self-attention: one gradient-descent step on each row's entropy
    ``H = -Σ_j a_j log a_j``, i.e. ``a + step·(log a + 1)`` (``∂H/∂a = -(log a + 1)``), negative
    entries set to 0 and rows renormalised to sum to 1. Weak responses (the irrelevant global
    attention) fall to zero, strong ones stay. ``step`` 0: ``1 / (N (ln N - 1))``, which removes
    entries below about the uniform ``1/N``."""
    a = _torch(sa)
    n = a.shape[-1]
    if not step:
        step = 1.0 / (n * max(math.log(n) - 1.0, 1e-6))
    tiny = torch.finfo(torch.float32).tiny
    reduced = torch.clamp(a + float(step) * (torch.log(torch.clamp(a, min=tiny)) + 1.0), min=0.0)
    rows = reduced.sum(dim=-1, keepdim=True)
    reduced = torch.where(rows > 0, reduced / torch.where(rows > 0, rows, torch.ones_like(rows)), a)
    return _like(reduced, sa)


def iseg(maps: Any, sa: Any, iterations: int = 3, step: float = 0.0) -> Any:
    """iSeg's iterative refinement: ``CA ← SA_ent · CA``, ``iterations`` times, with
    ``SA_ent = entropy_reduced(SA, step)`` (the paper's entropy-reduced self-attention module;
    its category-enhanced cross-attention is not part of this). The description follows the
    paper (Sun et al., 2024); no code of it was released to compare with."""
    return propagate(maps, entropy_reduced(sa, step), k=iterations)


def resample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``(..., h, w)`` maps at ``size``: bilinear (half-pixel centres) when growing, area
    averaging when shrinking, as cross-attention maps are brought to another grid."""
    size = (int(size[0]), int(size[1]))
    if tuple(maps.shape[-2:]) == size:
        return maps
    lead = maps.shape[:-2]
    flat = maps.reshape(-1, 1, *maps.shape[-2:]).float()
    if size[0] <= maps.shape[-2] and size[1] <= maps.shape[-1]:
        out = torch.nn.functional.interpolate(flat, size=size, mode="area")
    else:
        out = torch.nn.functional.interpolate(flat, size=size, mode="bilinear", align_corners=False)
    return out.reshape(*lead, *size)


@dataclass(frozen=True)
class Refinement:
    """A parsed ``--refine self-attention[:METHOD[,NAME=VALUE...]]``: the method, its
    parameters (every one, defaults filled in) and the stored grid to use (``res``; ``None``:
    the finest the store holds)."""

    method: str = "propagate"
    params: tuple[tuple[str, float], ...] = ()
    resolution: int | None = None

    @property
    def spec(self) -> str:
        """The canonical option text (parses back to this refinement)."""
        values = [f"{k}={_show(v)}" for k, v in self.params]
        if self.resolution is not None:
            values.append(f"res={self.resolution}")
        return f"self-attention:{self.method}" + (f",{','.join(values)}" if values else "")

    def describe(self) -> dict[str, Any]:
        """As recorded in label provenance and map attributes."""
        return {"method": self.method, **{k: v for k, v in self.params}, "resolution": self.resolution}

    def apply(self, maps: torch.Tensor, sa: Any) -> torch.Tensor:
        """Refine ``(..., h, w)`` maps of any grid with the image's matrix ``sa`` ``(N, N)``: the
        maps are resampled to the matrix's (square) grid, refined, and resampled back."""
        side = int(round(math.sqrt(sa.shape[-1])))
        if side * side != sa.shape[-1]:
            raise InvalidInputError(f"a {sa.shape[-1]}-pixel self-attention grid is not square; give res=HxW maps "
                                    "of the same grid")
        return refine_maps(maps, sa, (side, side), self)


def _show(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def refine_maps(maps: Any, sa: Any, grid: tuple[int, int], refinement: Refinement) -> torch.Tensor:
    """``maps`` ``(..., h, w)`` refined by ``refinement`` with ``sa`` of ``grid``, back at ``(h, w)``."""
    m = _torch(maps)
    on_grid = resample(m, grid)
    params = {**PARAMETERS[refinement.method], **dict(refinement.params)}  # a Refinement built by hand may omit some
    if refinement.method == "propagate":
        out = propagate(on_grid, sa, k=int(params["k"]), mix=params["mix"])
    elif refinement.method == "ovam":
        out = ovam(on_grid, sa, min_sa=params["min_sa"])
    else:
        out = iseg(on_grid, sa, iterations=int(params["iterations"]), step=params["step"])
    return resample(_torch(out), tuple(m.shape[-2:]))


def parse_refinement(text: str | Refinement | None) -> Refinement | None:
    """``--refine``: ``self-attention`` (propagation, k=1), ``self-attention:METHOD`` or
    ``self-attention:METHOD,NAME=VALUE,...`` (METHOD one of :data:`METHODS`; ``res=R`` picks a
    stored grid); ``None`` or ``none``: no refinement."""
    if text is None or isinstance(text, Refinement):
        return text
    raw = str(text).strip()
    if raw.lower() in ("", "none"):
        return None
    kind, _, rest = raw.partition(":")
    usage = ("write --refine self-attention[:METHOD[,NAME=VALUE...]] with METHOD one of "
             + ", ".join(f"{m} ({', '.join(f'{k}={_show(v)}' for k, v in PARAMETERS[m].items())})" for m in METHODS)
             + "; res=R picks the stored grid, e.g. --refine self-attention:propagate,k=2")
    if kind.strip().lower() != "self-attention":
        raise InvalidInputError(f"--refine {raw!r}: {usage}")
    parts = [p.strip() for p in rest.split(",") if p.strip()] if rest else []
    method = "propagate"
    if parts and "=" not in parts[0]:
        method = parts.pop(0).lower()
    if method not in METHODS:
        raise InvalidInputError(f"--refine {raw!r}: unknown method {method!r}; {usage}")
    params = dict(PARAMETERS[method])
    resolution = None
    for part in parts:
        name, sep, value = (s.strip() for s in part.partition("="))
        if not sep or (name not in params and name != "res"):
            raise InvalidInputError(f"--refine {raw!r}: {part!r} is not a parameter of {method} "
                                    f"({', '.join([*params, 'res'])}); {usage}")
        try:
            number = float(value) if name != "res" else int(value.lower().split("x")[0])
        except ValueError:
            raise InvalidInputError(f"--refine {raw!r}: {name}={value!r} is not a number") from None
        if name == "res":
            if number < 1:
                raise InvalidInputError(f"--refine {raw!r}: res must be a positive grid side, e.g. res=32")
            resolution = int(number)
            continue
        if name in _INTEGER and (not float(number).is_integer() or not 1 <= number <= 100):
            raise InvalidInputError(f"--refine {raw!r}: {name} must be a whole number 1..100")
        if name == "mix" and not 0 <= number <= 1:
            raise InvalidInputError(f"--refine {raw!r}: mix must lie in [0, 1] (the propagated map's share; 1: "
                                    "SA^k·map alone)")
        if name == "min_sa" and not 0 <= number <= 1:
            raise InvalidInputError(f"--refine {raw!r}: min_sa must lie in [0, 1] (the floor of the rescaled map)")
        if name == "step" and number < 0:
            raise InvalidInputError(f"--refine {raw!r}: step must be >= 0 (0: the default step)")
        params[name] = int(number) if name in _INTEGER else number
    return Refinement(method=method, params=tuple(params.items()), resolution=resolution)

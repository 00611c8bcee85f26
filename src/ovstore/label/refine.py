"""From normalised class maps to a label mask, and the optional refinements."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..errors import InvalidInputError

__all__ = ["normalize_maps", "adaptive_threshold", "label_mask", "remove_small_components", "dense_crf", "crf_unary",
           "require_crf", "classes_in_prompt", "CRF_INSTALL"]

BACKGROUND = 0
IGNORE = 255


def normalize_maps(maps: np.ndarray, how: str = "minmax") -> np.ndarray:
    """Each ``(..., H, W)`` map to [0, 1]: ``minmax`` ``(m - min) / (max - min)`` or ``max`` ``m / max``.

    A constant map carries no localisation: ``minmax`` makes it 0 everywhere (nothing passes a
    threshold), ``max`` makes it 1 everywhere (as the reference protocol does).
    """
    maps = np.asarray(maps, dtype=np.float64)
    peak = maps.max(axis=(-2, -1), keepdims=True)
    tiny = np.finfo(np.float32).tiny
    if how == "max":
        return (maps / np.maximum(peak, tiny)).astype(np.float32)
    if how != "minmax":
        raise ValueError(f"unknown normalisation {how!r}")
    floor = maps.min(axis=(-2, -1), keepdims=True)
    span = peak - floor
    return np.where(span > tiny, (maps - floor) / np.maximum(span, tiny), 0.0).astype(np.float32)


def adaptive_threshold(norm_map: np.ndarray, sweep: Sequence[float], *, min_area: float = 0.005,
                       max_area: float = 0.95, tolerance: float = 0.01) -> float:
    """DiffuMask-style threshold: the middle of the sweep range where the mask area is most stable.

    The mask area (fraction of pixels ``>= t``) is measured at every threshold of ``sweep``
    (sorted). Between neighbouring thresholds the relative area change is computed; pairs
    whose masks are degenerate (area above ``max_area``, i.e. about the whole image, or
    below ``min_area``, about nothing) are ignored, since a map with a high floor has a
    perfectly "stable" whole-image plateau. The most stable pairs (change within
    ``tolerance`` of the smallest) are joined into runs of neighbouring pairs; the longest run
    wins (ties: the lower one) and its middle threshold (median of the run's thresholds) is
    returned, away from the run's edges where the area starts to move.

    When no pair is usable (the map is flat, or its area jumps straight from everything to
    nothing) the threshold whose area is nearest the usable range is returned.
    """
    values = np.asarray(sorted(float(t) for t in sweep), dtype=np.float64)
    if len(values) < 2 or len(np.unique(values)) != len(values):
        raise InvalidInputError(f"the adaptive threshold needs at least two different sweep values, got {list(sweep)}")
    norm_map = np.asarray(norm_map)
    areas = np.array([(norm_map >= t).mean() for t in values], dtype=np.float64)
    usable = (areas >= min_area) & (areas <= max_area)
    pairs = usable[:-1] & usable[1:]
    if not pairs.any():
        distance = np.maximum(min_area - areas, 0) + np.maximum(areas - max_area, 0)
        return float(values[int(np.argmin(distance))])
    change = np.abs(np.diff(areas)) / np.maximum(areas[:-1], 1.0 / norm_map.size)
    change = np.where(pairs, change, np.inf)
    stable = change <= change.min() + tolerance
    best_start, best_length, start = 0, 0, None
    for k, ok in enumerate([*stable, False]):
        if ok and start is None:
            start = k
        elif not ok and start is not None:
            if k - start > best_length:
                best_start, best_length = start, k - start
            start = None
    run = values[best_start:best_start + best_length + 1]  # the thresholds the stable pairs join
    return float(np.median(run))


def label_mask(norm_maps: np.ndarray, thresholds: Sequence[float], allowed: Sequence[bool]) -> np.ndarray:
    """Semantic labels from ``(class, H, W)`` normalised maps.

    A pixel is background (0) unless some allowed class passes its threshold; then it is
    the allowed class with the highest normalised map (labels 1..n in class order).
    """
    maps = np.where(np.asarray(allowed)[:, None, None], norm_maps, -np.inf)
    passing = maps >= np.asarray(thresholds, dtype=np.float32)[:, None, None]
    scores = np.where(passing, maps, -np.inf)
    best = scores.argmax(axis=0)
    return np.where(passing.any(axis=0), best + 1, BACKGROUND).astype(np.uint8)


def remove_small_components(labels: np.ndarray, min_size: int) -> np.ndarray:
    """Set connected class regions smaller than ``min_size`` pixels to background."""
    if min_size <= 0:
        return labels
    from scipy import ndimage

    out = labels.copy()
    for value in np.unique(labels):
        if value in (BACKGROUND, IGNORE):
            continue
        components, count = ndimage.label(labels == value)
        sizes = np.bincount(components.ravel(), minlength=count + 1)
        small = np.flatnonzero(sizes < min_size)
        small = small[small > 0]
        out[np.isin(components, small)] = BACKGROUND
    return out


CRF_INSTALL = "pip install 'ovstore[crf]'"


def require_crf() -> Any:
    """The ``pydensecrf`` modules (from pydensecrf2), or a clear error naming the extra."""
    try:
        import pydensecrf.densecrf as dcrf
        import pydensecrf.utils  # noqa: F401
    except ImportError:
        raise InvalidInputError(
            f"--crf needs DenseCRF, which is not installed: {CRF_INSTALL} (installs pydensecrf2)"
        ) from None
    return dcrf


def crf_unary(norm_maps: np.ndarray, thresholds: Sequence[float], allowed: Sequence[bool], *,
              temperature: float = 0.1) -> np.ndarray:
    """Per-pixel probabilities ``(1 + class, H, W)`` from each class's margin over its threshold.

    Logits: background 0, class ``c`` ``(map_c - threshold_c) / temperature`` (classes not
    allowed: impossible). A class is likelier than background exactly where it passes its
    threshold, so per-class and adaptive thresholds keep deciding under the CRF.
    """
    maps = np.asarray(norm_maps, dtype=np.float64)
    margin = (maps - np.asarray(thresholds, dtype=np.float64)[:, None, None]) / temperature
    margin = np.where(np.asarray(allowed)[:, None, None], margin, -np.inf)
    logits = np.concatenate([np.zeros((1, *maps.shape[1:])), margin])
    logits -= logits.max(axis=0, keepdims=True)
    probs = np.exp(logits)
    return (probs / probs.sum(axis=0, keepdims=True)).astype(np.float32)


def dense_crf(image: np.ndarray, norm_maps: np.ndarray, thresholds: Sequence[float], allowed: Sequence[bool], *,
              iterations: int = 5, temperature: float = 0.1) -> np.ndarray:
    """DenseCRF refinement (pydensecrf2) of the thresholded labels with the image's colours.

    Unary: ``crf_unary`` (threshold margins). Pairwise: a Gaussian smoothness kernel and a
    bilateral appearance kernel (colour std 13) with the weights of pydensecrf's example (3 and
    10); their spatial standard deviations (3 and 80 px at 512 px, at least 1 and 2 px) scale
    with the image size, so small images get proportionally small neighbourhoods.
    """
    dcrf = require_crf()
    from pydensecrf.utils import unary_from_softmax

    n, h, w = norm_maps.shape
    probs = crf_unary(norm_maps, thresholds, allowed, temperature=temperature)
    scale = max(h, w) / 512
    crf = dcrf.DenseCRF2D(w, h, n + 1)
    crf.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs, clip=1e-6)))
    crf.addPairwiseGaussian(sxy=max(1.0, 3 * scale), compat=3)
    crf.addPairwiseBilateral(sxy=max(2.0, 80 * scale), srgb=13,
                             rgbim=np.ascontiguousarray(np.asarray(image, dtype=np.uint8)[..., :3]), compat=10)
    q = np.array(crf.inference(iterations)).reshape(n + 1, h, w)
    q[1:][~np.asarray(allowed, dtype=bool)] = -1.0  # a class not allowed is never chosen
    return np.argmax(q, axis=0).astype(np.uint8)


def classes_in_prompt(prompt: str, classes: Sequence[str],
                      words: Mapping[str, Sequence[str]] | None = None) -> list[bool]:
    """Which classes ``prompt`` names: by their name or one of their ``words`` (as whole words,
    case-insensitive, plural 's' allowed)."""
    text = prompt.lower()
    words = words or {}
    return [any(re.search(rf"\b{re.escape(w.lower())}(s|es)?\b", text) is not None
                for w in (c, *words.get(c, ()))) for c in classes]

"""From normalised class maps to a label mask, and the optional refinements."""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from ..errors import InvalidInputError

__all__ = ["adaptive_threshold", "label_mask", "remove_small_components", "dense_crf", "classes_in_prompt"]

BACKGROUND = 0
IGNORE = 255


def adaptive_threshold(norm_map: np.ndarray, sweep: Sequence[float]) -> float:
    """DiffuMask-style threshold: the sweep value where the mask area changes least.

    Area is computed at every threshold of ``sweep``; the relative change between
    neighbours is smallest where the map has a sharp, stable boundary. Ties go to the
    lower threshold.
    """
    areas = np.array([(norm_map >= t).sum() for t in sweep], dtype=np.float64)
    change = np.abs(np.diff(areas)) / np.maximum(areas[:-1], 1.0)
    return float(sweep[int(np.argmin(change))])


def label_mask(norm_maps: np.ndarray, thresholds: Sequence[float], allowed: Sequence[bool]) -> np.ndarray:
    """Semantic labels from ``(class, H, W)`` max-normalised maps.

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


def dense_crf(image: np.ndarray, norm_maps: np.ndarray, labels: np.ndarray, *, iterations: int = 5) -> np.ndarray:
    """DenseCRF refinement of ``labels`` with the image's colours (pydensecrf2).

    Unary: background probability ``1 - max(class maps)``, class probabilities from the
    normalised maps, renormalised per pixel.
    """
    try:
        import pydensecrf.densecrf as dcrf
        from pydensecrf.utils import unary_from_softmax
    except ImportError:
        raise InvalidInputError(
            "--crf needs DenseCRF: pip install 'ovstore[crf]' (installs pydensecrf2)"
        ) from None
    n, h, w = norm_maps.shape
    fg = np.clip(norm_maps, 1e-4, 1.0)
    probs = np.concatenate([np.clip(1 - fg.max(0, keepdims=True), 1e-4, 1.0), fg]).astype(np.float32)
    probs /= probs.sum(0, keepdims=True)
    crf = dcrf.DenseCRF2D(w, h, n + 1)
    crf.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs)))
    crf.addPairwiseGaussian(sxy=3, compat=3)
    crf.addPairwiseBilateral(sxy=40, srgb=13, rgbim=np.ascontiguousarray(image), compat=10)
    refined = np.argmax(np.array(crf.inference(iterations)).reshape(n + 1, h, w), axis=0).astype(np.uint8)
    return np.where(labels == IGNORE, IGNORE, refined).astype(np.uint8)


def classes_in_prompt(prompt: str, classes: Sequence[str]) -> list[bool]:
    """Which class names occur in ``prompt`` as words (case-insensitive, plural 's' allowed)."""
    text = prompt.lower()
    return [re.search(rf"\b{re.escape(c.lower())}(s|es)?\b", text) is not None for c in classes]

"""Partial work made explicit: damaged images found before a run (``--skip-damaged``) and the
list of what was and was not done when a run stops."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .errors import OvstoreError, StoreError
from .store import Store

__all__ = ["find_damaged", "RunInterrupted", "listing", "progress_note"]


def find_damaged(store: Store, images: Sequence[int], *, picture: bool = True) -> list[int]:
    """Images among ``images`` whose stored queries (every layer and branch) or, with
    ``picture``, RGB image cannot be read back intact (corrupt or missing chunks), or whose
    queries hold NaN or Inf (written by other software; they would make NaN maps)."""
    damaged = []
    for image in images:
        try:
            for layer in store.layers:
                if not _finite(store.queries(layer.name, image, branch=None)):
                    raise StoreError(f"image {image}, layer {layer.name}: NaN or Inf queries")
            if picture:
                store.image(image)
        except StoreError:
            damaged.append(image)
    return damaged


def _finite(array: np.ndarray) -> bool:
    """No NaN or Inf in ``array`` (on float16, ``isfinite`` is several times faster than a
    ``max``/``min`` pair, and a small cost beside reading the chunks)."""
    return array.dtype.kind != "f" or bool(np.isfinite(array).all())


def listing(values: Sequence[int], most: int = 20) -> str:
    """``[0, 1, 2]`` or ``[0, 1, ..., 99] (100 in all)``: short lists of image indices."""
    values = list(values)
    if len(values) <= most:
        return str(values)
    return "[" + ", ".join(map(str, values[:most])) + f", ...] ({len(values)} in all)"


def progress_note(verb: str, done: Sequence[int], todo: Sequence[int], where: str) -> str:
    """``labelled 3 of 8 images (kept in OUT): [..]; not done: [..]``."""
    done, todo = sorted(done), sorted(todo)
    total = len(done) + len(todo)
    return (f"{verb} {len(done)} of {total} images (kept in {where}): {listing(done)}; "
            f"not done: {listing(todo)}")


class RunInterrupted(OvstoreError):
    """Ctrl-C during a run, with what was and was not done (the command line prints it and
    exits with status 130; not a KeyboardInterrupt, which click would swallow)."""

    def __init__(self, summary: str) -> None:
        super().__init__(summary)
        self.summary = summary

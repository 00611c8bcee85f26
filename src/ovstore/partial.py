"""Partial work made explicit: damaged images found before a run (``--skip-damaged``) and the
list of what was and was not done when a run stops."""

from __future__ import annotations

from collections.abc import Sequence

from .errors import OvstoreError, StoreError
from .store import Store

__all__ = ["find_damaged", "RunInterrupted", "listing", "progress_note"]


def find_damaged(store: Store, images: Sequence[int], *, picture: bool = True) -> list[int]:
    """Images among ``images`` whose stored queries (every layer and branch) or, with
    ``picture``, RGB image cannot be read back intact (corrupt or missing chunks)."""
    damaged = []
    for image in images:
        try:
            for layer in store.layers:
                store.queries(layer.name, image, branch=None)
            if picture:
                store.image(image)
        except StoreError:
            damaged.append(image)
    return damaged


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

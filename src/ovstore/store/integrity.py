"""Verifying a store: every chunk of every complete image is read and its checksum checked."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from . import format as fmt
from .reader import Store

__all__ = ["Problem", "VerifyReport", "verify_store"]


@dataclass(frozen=True)
class Problem:
    """One damaged piece: ``kind`` is ``missing`` or ``corrupt``."""

    image: int | None
    array: str
    kind: str
    detail: str = ""

    def __str__(self) -> str:
        where = f"image {self.image}, " if self.image is not None else ""
        return f"{where}{self.array}: {self.kind}" + (f" ({self.detail})" if self.detail else "")


@dataclass
class VerifyReport:
    """Result of :func:`verify_store`."""

    checked_images: int = 0
    incomplete: list[int] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def damaged_images(self) -> list[int]:
        return sorted({p.image for p in self.problems if p.image is not None})


def _read(store: Store, arr, image: int | None, name: str, report: VerifyReport, *, must_exist: bool = False) -> None:
    if must_exist and image is not None and not store.chunk_exists(arr, (image,)):
        report.problems.append(Problem(image, name, "missing"))
        return
    try:
        np.asarray(arr[image] if image is not None else arr[...])
    except Exception as exc:  # checksum or codec failure
        report.problems.append(Problem(image, name, "corrupt", f"{type(exc).__name__}: {exc}"[:200]))


def verify_store(store: Store, *, progress: Callable[[int], None] | None = None) -> VerifyReport:
    """Read everything a complete image consists of, and the key projections.

    Missing chunks (which zarr would return as fill values) and chunks that fail their
    CRC32C checksum are reported by image and array (layer); nothing is modified.
    """
    root = store._root
    report = VerifyReport(incomplete=store.incomplete_images())
    for info in store.layers:
        group = root[fmt.LAYERS_GROUP][info.name]
        for name in (fmt.TO_K_WEIGHT, fmt.TO_K_BIAS):
            if name not in group:
                report.problems.append(Problem(None, f"{info.name}/{name}", "missing"))
            else:
                _read(store, group[name], None, f"{info.name}/{name}", report)
    # records may equal their fill value (seed 0, empty negative prompt) and then have no
    # chunk; images, timesteps and queries are always written, so their absence is damage
    records = [fmt.PROMPT, fmt.NEGATIVE_PROMPT, fmt.SEED, fmt.GUIDANCE, fmt.NUM_INFERENCE_STEPS, fmt.BRANCH_LABELS]
    for image in store.complete_images():
        for name in records:
            _read(store, root[name], image, name, report)
        for name in (fmt.IMAGES, fmt.TIMESTEPS):
            _read(store, root[name], image, name, report, must_exist=True)
        for info in store.layers:
            _read(store, root[fmt.LAYERS_GROUP][info.name][fmt.QUERIES], image, info.name, report, must_exist=True)
        report.checked_images += 1
        if progress is not None:
            progress(image)
    return report

"""Verifying a store: every chunk of every complete image is read and its checksum checked.

Nothing here raises on damage: unreadable metadata, missing or corrupt chunks, non-finite
values and leftovers of interrupted writes are all collected into one report.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import OvstoreError
from . import format as fmt
from .reader import Store

__all__ = ["Problem", "VerifyReport", "verify_store"]


@dataclass(frozen=True)
class Problem:
    """One damaged piece: ``kind`` is ``missing``, ``corrupt``, ``unreadable metadata``,
    ``metadata mismatch``, ``wrong shape`` or ``not finite``; ``image`` is None for store-level pieces."""

    image: int | None
    array: str
    kind: str
    detail: str = ""

    def __str__(self) -> str:
        where = f"image {self.image}, " if self.image is not None else ""
        return f"{where}{self.array}: {self.kind}" + (f" ({self.detail})" if self.detail else "")


@dataclass
class VerifyReport:
    """Result of :func:`verify_store`.

    ``leftovers`` are temporary files (``*.partial``) of writes that were interrupted, and a
    stale lock file: harmless (readers ignore them) and safe to delete when no capture or
    merge is running.
    """

    checked_images: int = 0
    incomplete: list[int] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    leftovers: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def damaged_images(self) -> list[int]:
        return sorted({p.image for p in self.problems if p.image is not None})

    @property
    def store_problems(self) -> list[Problem]:
        """Problems that belong to no single image (metadata, key projections)."""
        return [p for p in self.problems if p.image is None]

    def summary(self) -> str:
        """One line: what was checked and what was found."""
        parts = [f"checked {self.checked_images} complete images",
                 f"{len(self.incomplete)} incomplete" + (f" {self.incomplete[:20]}" if self.incomplete else "")]
        if self.ok:
            parts.append("no damage found")
        else:
            if self.damaged_images:
                parts.append(f"{len(self.damaged_images)} damaged images: {self.damaged_images[:20]}")
            if self.store_problems:
                parts.append(f"{len(self.store_problems)} store-level problems (listed above)")
        if self.leftovers:
            parts.append(f"{len(self.leftovers)} leftover temporary files of interrupted writes (harmless; "
                         "delete them when no capture or merge runs: find STORE -name '*.partial' -delete)")
        return "; ".join(parts)


def _short(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:200]


class _Checker:
    def __init__(self, store: Store, report: VerifyReport) -> None:
        self.store = store
        self.report = report
        self.arrays: dict[str, object] = {}

    def array(self, name: str, *, shape: tuple[int, ...] | None = None):
        """Open an array, reporting unreadable metadata or a wrong shape (then None)."""
        if name in self.arrays:
            return self.arrays[name]
        arr = None
        try:
            arr = self.store.array(name)
        except OvstoreError as exc:
            kind = "missing" if "has no array" in str(exc) else "unreadable metadata"
            self.report.problems.append(Problem(None, name, kind, "" if kind == "missing" else _short(exc.__cause__ or exc)))
        if arr is not None and shape is not None and tuple(arr.shape[1:]) != shape:
            self.report.problems.append(Problem(None, name, "wrong shape",
                                                f"{tuple(arr.shape)}; the layout expects (n, {', '.join(map(str, shape))})"))
            arr = None
        self.arrays[name] = arr
        return arr

    def read(self, name: str, image: int | None, label: str, *, must_exist: bool, finite: bool = False):
        arr = self.array(name)
        if arr is None:
            return None
        if must_exist and image is not None and not self.store.chunk_exists(arr, (image,)):
            self.report.problems.append(Problem(image, label, "missing"))
            return None
        try:
            data = np.asarray(arr[image] if image is not None else arr[...])
        except Exception as exc:  # checksum or codec failure
            self.report.problems.append(Problem(image, label, "corrupt", _short(exc)))
            return None
        if finite and data.dtype.kind == "f" and not np.isfinite(data).all():
            bad = int(data.size - np.count_nonzero(np.isfinite(data)))
            self.report.problems.append(Problem(image, label, "not finite", f"{bad} NaN or Inf values"))
        return data


def verify_store(store: Store, *, progress: Callable[[int], None] | None = None) -> VerifyReport:
    """Read everything a complete image consists of, and the key projections.

    Missing chunks (which zarr would return as fill values), chunks that fail their CRC32C
    checksum, unreadable array metadata and NaN/Inf in queries or timesteps are reported by
    image and array (layer); nothing is modified.
    """
    report = VerifyReport()
    check = _Checker(store, report)
    layout = store.layout
    dense = store.fully_checksummed
    if not dense:
        report.notes.append("this store was written before every array had a checksum: only queries and "
                            "images are protected; records and key projections are read but cannot be checked")
    if fmt.LAYOUT_CHECKSUM not in store.meta:
        report.notes.append("no metadata checksum (older store): an edit of the layout record (a layer's scale, "
                            "heads, head_dim) cannot be detected")
    report.leftovers = sorted(p for p in store.path.rglob("*.partial"))
    if (store.path / fmt.LOCK_FILE).exists():
        report.notes.append(f"a lock file {fmt.LOCK_FILE} exists: a capture or merge is adding images, or one "
                            "was killed (the next writer removes a stale lock)")

    # --- layout-level arrays
    expected = {
        fmt.TIMESTEPS: (layout.n_steps,),
        fmt.IMAGES: (layout.height, layout.width, 3),
        **{name: () for name in (fmt.STATUS, *fmt.RECORD_ARRAYS, fmt.BRANCH_LABELS)},
    }
    if layout.context is not None:
        expected[fmt.CONTEXT] = (len(layout.branches), layout.context.length, layout.context.features)
        expected[fmt.CONTEXT_TOKEN_IDS] = (len(layout.branches), layout.context.length)
        if layout.context.per_tokenizer:
            expected[fmt.CONTEXT_TOKENIZER_IDS] = (len(layout.branches), len(layout.context.tokenizers),
                                                   layout.context.length)
    if layout.conditioning:
        expected[fmt.CONDITIONING] = (len(layout.branches), layout.n_steps, layout.conditioning)
    real = fmt.is_real_image_layout(layout)
    if real:
        expected |= {fmt.SOURCE: (), fmt.RECONSTRUCTIONS: (layout.height, layout.width, 3),
                     fmt.RECONSTRUCTION_PSNR: (), fmt.RECONSTRUCTION_MAE: ()}
    for h, w in layout.self_attention:
        expected[fmt.self_attention_name((h, w))] = (len(layout.branches), h * w, h * w)
    for info in layout.layers:
        for kind in (fmt.QUERIES, *layout.layer_arrays):
            expected[f"{fmt.LAYERS_GROUP}/{info.name}/{kind}"] = (
                len(layout.branches), layout.n_steps, info.heads, info.height, info.width, info.head_dim)
    for name, shape in expected.items():
        check.array(name, shape=shape)
    for info in layout.layers:  # the copy of each layer's record in its group must agree
        group = f"{fmt.LAYERS_GROUP}/{info.name}"
        try:
            attrs = store._root[group].attrs.get("layer")
            same = attrs is None or fmt.LayerInfo.from_json(attrs) == info
        except Exception as exc:
            report.problems.append(Problem(None, group, "unreadable metadata", _short(exc)))
            continue
        if not same:
            report.problems.append(Problem(None, group, "metadata mismatch",
                                           "the layer's attributes differ from the store's layout record"))
    for info in layout.layers:
        for kind in (fmt.TO_K_WEIGHT, fmt.TO_K_BIAS):
            name = f"{fmt.LAYERS_GROUP}/{info.name}/{kind}"
            arr = check.array(name)
            if arr is not None:
                # written whole; an all-zero bias of an older store may have no chunk
                must = kind == fmt.TO_K_WEIGHT or dense
                if must and not store.chunk_exists(arr, (0,)):
                    report.problems.append(Problem(None, name, "missing"))
                else:
                    check.read(name, None, name, must_exist=False, finite=True)

    if layout.layer_arrays:  # MM-DiT: the text-stream weights, each whole and matching its SHA-256
        from .writer import weights_sha256

        try:
            weights = store._root[fmt.WEIGHTS_GROUP]
            arrays = list(weights.arrays())
        except Exception as exc:
            report.problems.append(Problem(None, fmt.WEIGHTS_GROUP, "missing", _short(exc)))
            arrays = []
        for name, arr in arrays:
            data = check.read(f"{fmt.WEIGHTS_GROUP}/{name}", None, f"weight {name}", must_exist=True, finite=True)
            if data is not None and weights_sha256(data) != arr.attrs.get("sha256"):
                report.problems.append(Problem(None, f"{fmt.WEIGHTS_GROUP}/{name}", "checksum mismatch",
                                               "the weight differs from the SHA-256 recorded with it"))

    # --- status, chunk by chunk: a corrupt status entry makes its image unknown
    status_arr = check.array(fmt.STATUS)
    if status_arr is None:
        return report
    n = int(status_arr.shape[0])
    complete = []
    try:
        status = np.asarray(status_arr[...])
    except Exception:
        status = np.full(n, fmt.STATUS_RESERVED, np.uint8)
        for i in range(n):
            value = check.read(fmt.STATUS, i, "status", must_exist=False)
            if value is not None:
                status[i] = value
    for name in expected:
        arr = check.arrays.get(name)
        if arr is not None and arr.shape[0] < n:
            report.problems.append(Problem(None, name, "wrong shape",
                                           f"{arr.shape[0]} entries for {n} image slots"))
            check.arrays[name] = None
    complete = [i for i in range(n) if status[i] == fmt.STATUS_COMPLETE]
    report.incomplete = [i for i in range(n) if status[i] != fmt.STATUS_COMPLETE]

    # --- every piece of every complete image
    for image in complete:
        for name in fmt.RECORD_ARRAYS:
            # older stores skipped chunks equal to the fill value (seed 0, no negative prompt)
            check.read(name, image, name, must_exist=dense or name == fmt.PROMPT, finite=name == fmt.GUIDANCE)
        check.read(fmt.BRANCH_LABELS, image, fmt.BRANCH_LABELS, must_exist=dense)
        check.read(fmt.IMAGES, image, fmt.IMAGES, must_exist=True)
        check.read(fmt.TIMESTEPS, image, fmt.TIMESTEPS, must_exist=True, finite=True)
        if layout.context is not None:
            check.read(fmt.CONTEXT, image, fmt.CONTEXT, must_exist=True, finite=True)
            check.read(fmt.CONTEXT_TOKEN_IDS, image, fmt.CONTEXT_TOKEN_IDS, must_exist=True)
            if layout.context.per_tokenizer:
                check.read(fmt.CONTEXT_TOKENIZER_IDS, image, fmt.CONTEXT_TOKENIZER_IDS, must_exist=True)
        if layout.conditioning:
            check.read(fmt.CONDITIONING, image, fmt.CONDITIONING, must_exist=True, finite=True)
        if real:
            for name in (fmt.SOURCE, fmt.RECONSTRUCTIONS, fmt.RECONSTRUCTION_MAE):
                check.read(name, image, name, must_exist=True, finite=name == fmt.RECONSTRUCTION_MAE)
            check.read(fmt.RECONSTRUCTION_PSNR, image, fmt.RECONSTRUCTION_PSNR, must_exist=True)  # inf: exact
        for grid in layout.self_attention:
            name = fmt.self_attention_name(grid)
            check.read(name, image, name, must_exist=True, finite=True)
        for info in layout.layers:
            for kind in (fmt.QUERIES, *layout.layer_arrays):
                what = info.name if kind == fmt.QUERIES else f"{info.name} {kind}"
                check.read(f"{fmt.LAYERS_GROUP}/{info.name}/{kind}", image, what, must_exist=True, finite=True)
        report.checked_images += 1
        if progress is not None:
            progress(image)
    return report

"""Merging stores captured separately (one per GPU or machine) into one."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import IncompatibleStoreError, InvalidInputError
from . import format as fmt
from .reader import open_store
from .writer import StoreWriter

__all__ = ["MergeResult", "merge_stores"]


@dataclass(frozen=True)
class MergeResult:
    """Images copied into the output and complete images skipped as duplicates."""

    added: int
    duplicates: int
    incomplete_skipped: int


def _key(record: fmt.ImageRecord) -> tuple:
    """Identical requests generate identical images: such an image is a duplicate."""
    return (record.prompt, record.negative_prompt, record.seed, record.guidance, record.num_inference_steps)


def merge_stores(out: str | Path, sources: Sequence[str | Path], *,
                 progress: Callable[[int], None] | None = None) -> MergeResult:
    """Copy every complete image of ``sources`` into ``out`` (created or appended to).

    Sources must share the layout (model, layers, size, calls, branches, dtype). An image
    whose request (prompt, negative prompt, seed, guidance, steps) is already complete in
    ``out`` or in an earlier source is skipped, so merging twice adds nothing.
    """
    if not sources:
        raise InvalidInputError("no store to merge; give one or more source stores")
    stores = [open_store(s) for s in sources]
    layout = stores[0].layout
    for other in stores[1:]:
        diffs = layout.differences(other.layout)
        if diffs:
            raise IncompatibleStoreError(f"cannot merge {other.path} with {stores[0].path}: " + "; ".join(diffs))
    if Path(out).resolve() in {s.path.resolve() for s in stores}:
        raise InvalidInputError("--out must differ from every source store")
    writer = StoreWriter.open(out, layout)
    src = stores[0]
    writer.write_key_projections({l.name: src.key_projection(l.name) for l in layout.layers})
    target = writer.store
    seen = {_key(target.record(i)) for i in target.complete_images()}
    added = duplicates = skipped = 0
    for store in stores:
        for layer in layout.layers:  # same layout, different weights would be another model
            if not all(np.array_equal(a, b) for a, b in zip(store.key_projection(layer.name), src.key_projection(layer.name))):
                raise IncompatibleStoreError(f"{store.path}: to_k of {layer.name} differs; not the same model")
        skipped += len(store.incomplete_images())
        for image in store.complete_images():
            record = store.record(image)
            if _key(record) in seen:
                duplicates += 1
                continue
            (slot,) = writer.reserve([record])
            root = store._root
            queries = {l.name: np.asarray(root[fmt.LAYERS_GROUP][l.name][fmt.QUERIES][image]) for l in layout.layers}
            writer.write_image(slot, image=store.image(image), queries=queries, timesteps=store.timesteps(image),
                               branch_labels=store.branch_labels(image))
            writer.mark_complete(slot)
            seen.add(_key(record))
            added += 1
            if progress is not None:
                progress(slot)
    return MergeResult(added=added, duplicates=duplicates, incomplete_skipped=skipped)

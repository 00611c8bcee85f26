"""Merging stores captured separately (one per GPU or machine) into one."""

from __future__ import annotations

import dataclasses

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import IncompatibleStoreError, InvalidInputError
from . import format as fmt
from .reader import open_store
from .writer import MERGE_HINT, StoreWriter

__all__ = ["MergeResult", "merge_stores"]


@dataclass(frozen=True)
class MergeResult:
    """Images copied into the output and complete images skipped as duplicates."""

    added: int
    duplicates: int
    incomplete_skipped: int


def merge_stores(out: str | Path, sources: Sequence[str | Path], *,
                 progress: Callable[[int], None] | None = None) -> MergeResult:
    """Copy every complete image of ``sources`` into ``out`` (created or appended to).

    Sources must share the layout (model, layers, size, calls, branches, dtype). An image
    whose request (prompt, negative prompt, seed, guidance, steps) is already complete in
    ``out`` or in an earlier source is skipped, so merging twice adds nothing. A merge that
    was interrupted left incomplete slots in ``out``: running it again fills those slots
    instead of adding new ones, so nothing is duplicated.
    """
    if not sources:
        raise InvalidInputError("no store to merge; give one or more source stores")
    stores = [open_store(s) for s in sources]
    layout = stores[0].layout
    for other in stores[1:]:
        diffs = layout.differences(other.layout)
        if diffs:
            raise IncompatibleStoreError(
                f"cannot merge {other.path} with {stores[0].path}: " + "; ".join(diffs)
                + ". Only stores captured with the same model and settings can be merged; merge the others "
                "into a separate --out"
            )
    if Path(out).resolve() in {s.path.resolve() for s in stores}:
        raise InvalidInputError("--out must differ from every source store")
    if layout.context is not None and any(s.layout.context is None for s in stores):
        layout = dataclasses.replace(layout, context=None)  # not every source kept its contexts
    elif layout.context is not None and any(s.layout.context.tokenizers != layout.context.tokenizers for s in stores):
        # not every source kept every tokenizer's ids: the first tokenizer's, which all kept
        layout = dataclasses.replace(layout, context=dataclasses.replace(layout.context, tokenizers=()))
    src = stores[0]
    keys = {l.name: src.key_projection(l.name) for l in layout.layers}
    for store in stores[1:]:  # same layout, different weights would be another model
        for layer in layout.layers:
            if not all(np.array_equal(a, b) for a, b in zip(store.key_projection(layer.name), keys[layer.name])):
                raise IncompatibleStoreError(f"cannot merge {store.path}: to_k of {layer.name} differs from "
                                             f"{src.path}'s; not the same model")
    weights = src.weights() if layout.layer_arrays else None  # MM-DiT: the text-stream weights
    writer = StoreWriter.open(out, layout, key_projections=keys, hint=MERGE_HINT, weights=weights)
    target = writer.store
    status = target.status()
    records = target.records()
    seen = {records[i] for i in range(len(records)) if status[i] == fmt.STATUS_COMPLETE}
    # slots of an interrupted merge (or capture) of the same request, to be filled first
    open_slots: dict[fmt.ImageRecord, list[int]] = {}
    for i in range(len(records)):
        if status[i] != fmt.STATUS_COMPLETE:
            open_slots.setdefault(records[i], []).append(i)
    added = duplicates = skipped = 0
    for store in stores:
        skipped += len(store.incomplete_images())
        for image in store.complete_images():
            record = store.record(image)
            if record in seen:
                duplicates += 1
                continue
            waiting = open_slots.get(record)
            (slot,) = [waiting.pop(0)] if waiting else writer.reserve([record])
            queries = {l.name: store.queries(l.name, image, branch=None) for l in layout.layers}
            context = ((store.context(image)[0], store.context_tokenizer_ids(image))
                       if target.layout.context is not None else None)
            arrays = {kind: {l.name: store.layer_array(l.name, kind, image, branch=None) for l in layout.layers}
                      for kind in layout.layer_arrays}
            conditioning = (np.stack([store.conditioning(image, b) for b in range(len(layout.branches))])
                            if layout.conditioning else None)
            writer.write_image(slot, image=store.image(image), queries=queries, timesteps=store.timesteps(image),
                               branch_labels=store.branch_labels(image), context=context, layer_arrays=arrays,
                               conditioning=conditioning,
                               reconstruction=store.reconstruction(image) if store.is_real_images else None,
                               self_attention={g: store.self_attention(image, g, branch=None)
                                               for g in layout.self_attention})
            writer.mark_complete(slot)
            seen.add(record)
            added += 1
            if progress is not None:
                progress(slot)
    return MergeResult(added=added, duplicates=duplicates, incomplete_skipped=skipped)

"""Continuing an existing store: appending to it or resuming it with its own settings.

A store records its model and capture settings, so ``capture --resume --out STORE`` (or an
append without options) must not need them repeated; options given explicitly override the
recorded ones, and an override that would make the store inconsistent is refused before
anything is written.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import IncompatibleStoreError, InvalidInputError
from ..selection import LayerSelection
from ..store import Store, StoreLayout
from .config import CaptureConfig, store_settings


def continued_config(
    existing: Store | None,
    given: dict,
    *,
    layers: LayerSelection,
    layers_given: bool,
    preset: str | None,
    batch_size: int = 1,
) -> CaptureConfig:
    """The capture settings of a run: the store's recorded ones, overridden by ``given``.

    ``given`` maps :class:`CaptureConfig` fields to the values passed explicitly (``None``:
    not passed). Steps given without calls drop the store's call indices (they need not exist
    with another step count). ``layers`` and ``preset`` replace the store's layer choice when
    the store is new or when ``layers_given``/``preset`` say the user chose them.
    """
    settings: dict = {}
    if existing is not None:
        status, records = existing.status(), existing.records()
        pending = [r for r, st in zip(records, status) if st != 1]
        settings = store_settings(existing.layout, pending or records[::-1])
    settings.update({k: v for k, v in given.items() if v is not None})
    if given.get("num_inference_steps") is not None and given.get("calls") is None:
        settings.pop("calls", None)
    if existing is None or layers_given or preset is not None:
        settings["layers"] = layers
        settings["preset"] = preset or "full"
        if given.get("calls") is None:
            settings.pop("calls", None)
    settings["batch_size"] = batch_size
    return CaptureConfig(**settings)


def recorded_model(existing: Store, revision: str | None = None) -> tuple[str, str | None]:
    """``(model id or path, revision)`` that ``load_pipeline`` needs to continue ``existing``.

    A local pipeline that has since moved is an error naming the fix (pass MODEL), not a
    hub lookup of a path.
    """
    m = existing.layout.model
    if m.source == "local":
        found = [c for c in (m.path, m.id) if c and Path(c).expanduser().exists()]
        if not found:
            raise InvalidInputError(f"the store was captured with the local pipeline {m.path or m.id}, which no "
                                    "longer exists; pass the pipeline directory as the MODEL argument")
        return found[0], revision
    if m.source == "hub":
        return m.id, revision or m.commit_hash or m.revision
    return m.id, revision


def check_continuation(existing: Store, layout: StoreLayout, *, resume: bool) -> None:
    """Refuse a run whose planned layout differs from the store's (model, layers, calls, dtype...)."""
    diffs = existing.layout.differences(layout)
    if diffs:
        raise IncompatibleStoreError(
            f"cannot {'resume' if resume else 'append to'} {existing.path}: " + "; ".join(diffs)
            + ". Leave those options out to use the store's settings, or capture into a new --out"
        )

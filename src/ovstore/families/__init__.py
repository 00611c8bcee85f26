"""Model families: the one seam between ovstore's engine and a kind of denoiser.

A family (:class:`ModelFamily`) knows which modules of a pipeline to hook, how to describe
them, what the store must keep to recompute keys without the denoiser, and how attribution
text is encoded. Built in: ``unet`` (SD 1.x/2.x/SDXL), ``sd3`` (SD3/SD3.5 MM-DiT) and ``flux`` (FLUX.1). Others are found through the
``ovstore.families`` entry-point group (like xarray's backends)::

    [project.entry-points."ovstore.families"]
    mmdit = "my_package.mmdit:MMDiTFamily"

The entry point names a :class:`ModelFamily` subclass (or instance) whose ``name`` is the key.
"""

from __future__ import annotations

import functools
from typing import Any

from ..errors import InvalidInputError
from .base import ModelFamily
from .flux import FluxFamily
from .mmdit import SD3Family
from .unet import UNetFamily, cross_attention_layers, layer_level

__all__ = [
    "ModelFamily", "FluxFamily", "SD3Family", "UNetFamily", "cross_attention_layers", "layer_level", "available_families", "family_for_pipeline", "get_family", "ENTRY_POINT_GROUP",
]

ENTRY_POINT_GROUP = "ovstore.families"


def _builtin() -> dict[str, ModelFamily]:
    return {"unet": UNetFamily(), "sd3": SD3Family(), "flux": FluxFamily()}


@functools.lru_cache(maxsize=1)
def available_families() -> dict[str, ModelFamily]:
    """Every known family by name: the built-ins, then those of installed entry points (a
    built-in name cannot be taken over)."""
    import importlib.metadata as md

    families = _builtin()
    for ep in md.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in families:
            continue
        try:
            loaded = ep.load()
        except Exception:  # a broken plug-in must not break the built-in families
            continue
        family = loaded() if isinstance(loaded, type) else loaded
        if isinstance(family, ModelFamily):
            families[family.name or ep.name] = family
    return families


def _supported() -> str:
    return "; ".join(f"{name} ({f.pipelines})" for name, f in available_families().items())


def get_family(name: str) -> ModelFamily:
    """The family recorded in a store (``layout.model.family``)."""
    try:
        return available_families()[name]
    except KeyError:
        raise InvalidInputError(
            f"model family {name!r} is not known to this ovstore (known: {_supported()}); install the package "
            f"that provides it (entry-point group {ENTRY_POINT_GROUP}) or upgrade ovstore"
        ) from None


def family_for_pipeline(pipe: Any, model_id: str = "") -> ModelFamily:
    """The family that supports ``pipe``, else a one-line error naming the supported ones."""
    for family in available_families().values():
        if family.supports(pipe):
            return family
    what = f"{model_id} is a {type(pipe).__name__}" if model_id else f"{type(pipe).__name__}"
    raise InvalidInputError(f"{what}, which no ovstore model family supports; supported: {_supported()}")

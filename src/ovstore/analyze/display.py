"""How maps are normalised for display (``maps --png``): the user's choice, else the model's
``maps`` defaults recorded in the store, else not at all (ovstore's default: the drawing puts
every map of a sheet on one scale).

Drawing code takes the value from :func:`display_normalization` (or maps already brought to
[0, 1] by :func:`display_maps`); the stored and saved maps are never changed by it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import InvalidInputError
from ..model_defaults import DISPLAY_NORMALIZATIONS, OVSTORE_DISPLAY_NORMALIZE
from ..store import analysis_defaults

if TYPE_CHECKING:
    import xarray as xr

__all__ = ["display_maps", "display_normalization"]


def display_normalization(store: Any, normalize: str | None = None, *,
                          model_defaults: bool = True) -> tuple[str | None, str]:
    """The display normalisation (``max``, ``minmax`` or None: unchanged) and where it came from
    (``user``, ``model``, ``ovstore``): ``normalize`` when given, else the store's model default
    (unless ``model_defaults`` is False), else None."""
    if normalize is not None:
        if normalize not in DISPLAY_NORMALIZATIONS:
            raise InvalidInputError(f"display normalisation {normalize!r} is not one of "
                                    f"{', '.join(DISPLAY_NORMALIZATIONS)}")
        return normalize, "user"
    recorded = analysis_defaults(store).maps.get("normalize") if model_defaults else None
    return (recorded, "model") if recorded else (OVSTORE_DISPLAY_NORMALIZE, "ovstore")


def display_maps(maps: xr.DataArray, store: Any, normalize: str | None = None, *,
                 model_defaults: bool = True) -> xr.DataArray:
    """``maps`` (dims ``image``, ``token``, ``y``, ``x``) with each map brought to [0, 1] by
    :func:`display_normalization` (lazy for lazy maps; a map that is constant becomes 0), or
    ``maps`` itself where there is no display normalisation."""
    how, _ = display_normalization(store, normalize, model_defaults=model_defaults)
    if how is None:
        return maps
    floor = maps.min(dim=("y", "x")) if how == "minmax" else 0
    span = maps.max(dim=("y", "x")) - floor
    shown = ((maps - floor) / span.where(span > 0, 1)).where(span > 0, 0)
    shown.attrs = {**maps.attrs, "display_normalize": how}
    return shown.transpose(*maps.dims)

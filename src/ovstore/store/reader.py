"""Reading a store: metadata, per-image records, queries and lazy xarray views.

Nothing here imports torch or diffusers: a store opens with zarr, numpy, dask and xarray.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr

from .. import dims
from ..errors import IncompleteImageError, InvalidInputError, StoreError, StoreFormatError
from . import format as fmt
from .format import ImageRecord, LayerInfo, StoreLayout

if TYPE_CHECKING:
    import xarray as xr

__all__ = ["Store", "open_store"]


def open_store(path: str | Path, *, mode: str = "r") -> Store:
    """Open an ovstore store.

    Parameters
    ----------
    path
        Directory of the Zarr v3 group written by ``ovstore capture``.
    mode
        ``"r"`` (default) to read, ``"r+"`` to append.

    Raises
    ------
    StoreFormatError
        ``path`` is missing, not a Zarr group, not an ovstore store, or written by a newer
        format version than this library reads.
    """
    path = Path(path)
    if not path.exists():
        raise StoreFormatError(f"store {path} does not exist; create it with `ovstore capture ... --out {path}`")
    if not (path / "zarr.json").is_file():
        raise StoreFormatError(
            f"{path} is not an ovstore store (no zarr.json, so not a Zarr v3 group); "
            "pass the directory given to `ovstore capture --out`"
        )
    try:
        root = zarr.open_group(path, mode=mode, zarr_format=3)
    except Exception as exc:  # zarr raises several types for unreadable metadata
        raise StoreFormatError(f"{path} cannot be opened as a Zarr v3 group: {exc}") from exc
    meta = root.attrs.get("ovstore")
    if not isinstance(meta, dict) or meta.get("format") != fmt.FORMAT_NAME:
        raise StoreFormatError(
            f"{path} is a Zarr group but not an ovstore store (no 'ovstore' attributes); "
            "create one with `ovstore capture`"
        )
    version = meta.get("format_version")
    if version not in fmt.SUPPORTED_VERSIONS:
        raise StoreFormatError(
            f"{path} has store format version {version}; this ovstore reads versions "
            f"{', '.join(map(str, fmt.SUPPORTED_VERSIONS))}. Upgrade ovstore (pip install -U ovstore)."
        )
    return Store(path, root, meta)


@dataclass(frozen=True, slots=True)
class StoreSummary:
    """Figures printed by ``ovstore info``."""

    n_images: int
    n_complete: int
    bytes_on_disk: int
    query_bytes_uncompressed: int
    query_bytes_on_disk: int

    @property
    def compression_ratio(self) -> float:
        return self.query_bytes_uncompressed / max(self.query_bytes_on_disk, 1)


class Store:
    """A read view of one store (see :func:`open_store`)."""

    def __init__(self, path: Path, root: zarr.Group, meta: dict[str, Any]) -> None:
        self.path = path
        self._root = root
        self.meta = meta
        self.layout = StoreLayout.from_json(meta["layout"])

    def __repr__(self) -> str:
        return (f"<ovstore.Store {str(self.path)!r}: {self.n_images} images "
                f"({len(self.complete_images())} complete), {len(self.layers)} layers>")

    # ------------------------------------------------------------------ layout
    @property
    def layers(self) -> tuple[LayerInfo, ...]:
        return self.layout.layers

    @property
    def format_version(self) -> int:
        return int(self.meta["format_version"])

    @property
    def n_images(self) -> int:
        return int(self._root[fmt.STATUS].shape[0])

    def status(self) -> np.ndarray:
        """Status of every slot: 1 complete, anything else incomplete."""
        return np.asarray(self._root[fmt.STATUS][...])

    def complete_images(self) -> list[int]:
        return [int(i) for i in np.flatnonzero(self.status() == fmt.STATUS_COMPLETE)]

    def incomplete_images(self) -> list[int]:
        return [int(i) for i in np.flatnonzero(self.status() != fmt.STATUS_COMPLETE)]

    def check_images(self, images: Sequence[int] | None) -> list[int]:
        """Validate image indices (default: every complete image)."""
        complete = self.complete_images()
        if images is None:
            if not complete:
                raise IncompleteImageError(f"store {self.path} has no complete image yet")
            return complete
        done = set(complete)
        out = []
        for i in images:
            i = int(i)
            if not 0 <= i < self.n_images:
                raise IncompleteImageError(
                    f"image {i} is out of range: store {self.path} has {self.n_images} images "
                    f"(0..{self.n_images - 1})"
                )
            if i not in done:
                raise IncompleteImageError(
                    f"image {i} of {self.path} is incomplete (its capture was interrupted); "
                    "finish it with `ovstore capture --resume` or choose another image"
                )
            out.append(i)
        return out

    # ------------------------------------------------------------------ records
    def record(self, image: int) -> ImageRecord:
        r = self._root
        return ImageRecord(
            prompt=str(r[fmt.PROMPT][image]),
            negative_prompt=str(r[fmt.NEGATIVE_PROMPT][image]),
            seed=int(r[fmt.SEED][image]),
            guidance=float(r[fmt.GUIDANCE][image]),
            num_inference_steps=int(r[fmt.NUM_INFERENCE_STEPS][image]),
        )

    def branch_labels(self, image: int) -> tuple[str, ...]:
        text = str(self._root[fmt.BRANCH_LABELS][image])
        return tuple(text.split(",")) if text else ()

    def timesteps(self, image: int) -> np.ndarray:
        return np.asarray(self._root[fmt.TIMESTEPS][image])

    def image(self, image: int) -> np.ndarray:
        """The generated image as uint8 (height, width, 3)."""
        self.check_images([image])
        return np.asarray(self._root[fmt.IMAGES][image])

    # ------------------------------------------------------------------ queries
    def _queries_array(self, layer: str) -> zarr.Array:
        try:
            return self._root[fmt.LAYERS_GROUP][layer][fmt.QUERIES]
        except KeyError:
            raise InvalidInputError(
                f"layer {layer!r} is not in store {self.path}; stored layers: "
                + ", ".join(l.name for l in self.layers)
            ) from None

    def queries(self, layer: str, image: int, *, branch: int = 0,
                steps: Sequence[int] | None = None) -> np.ndarray:
        """Stored queries of one image and layer, shape ``(step, head, y, x, channel)``.

        ``steps`` are positions along the stored step axis (default: all).

        Raises
        ------
        StoreError
            The image's data is missing or fails its checksum (never returned as data).
        """
        arr = self._queries_array(layer)
        if not self.chunk_exists(arr, (image,)):
            raise StoreError(
                f"image {image}, layer {layer}: query data is missing from {self.path} although the "
                "image is marked complete; run `ovstore verify` and recapture it"
            )
        try:
            if steps is None:
                return np.asarray(arr[image, branch])
            steps = list(steps)
            if steps == list(range(steps[0], steps[-1] + 1)):
                return np.asarray(arr[image, branch, steps[0]:steps[-1] + 1])
            return np.asarray(arr.get_orthogonal_selection((image, branch, steps)))
        except Exception as exc:
            raise StoreError(
                f"image {image}, layer {layer}: stored queries are corrupted ({type(exc).__name__}: {exc}); "
                "run `ovstore verify` to list damaged images"
            ) from exc

    def chunk_exists(self, arr: zarr.Array, leading: tuple[int, ...]) -> bool:
        """Whether the storage object (chunk or shard) starting at ``leading`` coordinates
        exists; zarr would silently return fill values for a missing one."""
        grid = arr.shards or arr.chunks
        coords = tuple(leading) + (0,) * (len(grid) - len(leading))
        key = arr.metadata.encode_chunk_key(tuple(c // g for c, g in zip(coords, grid)))
        return (self.path / arr.path / key).exists()

    def key_projection(self, layer: str) -> tuple[np.ndarray, np.ndarray]:
        """``to_k`` weight (inner, text_dim) and bias (inner,) of a layer, float32."""
        g = self._root[fmt.LAYERS_GROUP][layer]
        if fmt.TO_K_WEIGHT not in g:
            raise StoreFormatError(f"store {self.path} has no key projection for layer {layer}")
        return np.asarray(g[fmt.TO_K_WEIGHT][...]), np.asarray(g[fmt.TO_K_BIAS][...])

    # ------------------------------------------------------------------ xarray views
    def query_view(self, layer: str) -> xr.DataArray:
        """Lazy (dask) view of a layer's queries with named dims and coordinates.

        Dims are ``(image, branch, step, head, y, x, channel)``; ``timestep`` is a 2-D
        coordinate over ``(image, step)``, ``complete`` a boolean coordinate over ``image``.
        Incomplete images are included (their data may be missing): select with
        ``view.sel(image=view.complete)``.
        """
        import dask.array as da
        import xarray as xr

        arr = self._queries_array(layer)
        data = da.from_zarr(arr)
        return xr.DataArray(
            data,
            dims=dims.QUERY_DIMS,
            name=f"queries:{layer}",
            coords=self._image_coords() | {
                dims.STEP: np.asarray(self.layout.calls),
                dims.BRANCH: list(self.layout.branches) if len(self.layout.branches) == arr.shape[1]
                else list(range(arr.shape[1])),
                "timestep": ((dims.IMAGE, dims.STEP), np.asarray(self._root[fmt.TIMESTEPS][...])),
            },
            attrs={"layer": self.layout.layer(layer).to_json()},
        )

    def _image_coords(self) -> dict[str, Any]:
        r = self._root
        return {
            dims.IMAGE: np.arange(self.n_images),
            "complete": (dims.IMAGE, self.status() == fmt.STATUS_COMPLETE),
            "prompt": (dims.IMAGE, np.asarray(r[fmt.PROMPT][...], dtype=object)),
            "seed": (dims.IMAGE, np.asarray(r[fmt.SEED][...])),
        }

    def images_view(self) -> xr.DataArray:
        """Lazy view of the generated images, dims ``(image, image_y, image_x, rgb)``."""
        import dask.array as da
        import xarray as xr

        arr = self._root[fmt.IMAGES]
        return xr.DataArray(da.from_zarr(arr), dims=(dims.IMAGE, dims.IMAGE_Y, dims.IMAGE_X, dims.RGB),
                            coords=self._image_coords(), name="images")

    def to_dataset(self) -> xr.Dataset:
        """All per-image records and every layer's queries as one lazy xarray Dataset.

        Layers have different spatial sizes, so each layer's ``y``/``x``/``head``/``channel``
        dims are suffixed with the layer's index (``y_0``, ``x_0``...).
        """
        import xarray as xr

        r = self._root
        ds = xr.Dataset(coords=self._image_coords())
        ds["negative_prompt"] = (dims.IMAGE, np.asarray(r[fmt.NEGATIVE_PROMPT][...], dtype=object))
        ds["guidance"] = (dims.IMAGE, np.asarray(r[fmt.GUIDANCE][...]))
        ds["num_inference_steps"] = (dims.IMAGE, np.asarray(r[fmt.NUM_INFERENCE_STEPS][...]))
        ds["images"] = self.images_view()
        for k, info in enumerate(self.layers):
            view = self.query_view(info.name).drop_vars([dims.BRANCH])
            view = view.rename({d: f"{d}_{k}" for d in (dims.BRANCH, dims.HEAD, dims.Y, dims.X, dims.CHANNEL)})
            ds[info.name] = view
        ds.attrs["ovstore"] = self.meta
        return ds

    # ------------------------------------------------------------------ summary
    @cached_property
    def _local_sizes(self) -> tuple[int, int]:
        total = queries = 0
        layers_dir = self.path / fmt.LAYERS_GROUP
        for dirpath, _, files in os.walk(self.path):
            size = sum(os.path.getsize(os.path.join(dirpath, f)) for f in files)
            total += size
            if dirpath.startswith(str(layers_dir)):
                queries += size
        return total, queries

    def summary(self) -> StoreSummary:
        """Counts and sizes (bytes on disk are those of a local directory store)."""
        total, queries = self._local_sizes
        n_complete = len(self.complete_images())
        return StoreSummary(
            n_images=self.n_images,
            n_complete=n_complete,
            bytes_on_disk=total,
            query_bytes_uncompressed=self.layout.query_bytes_per_image() * n_complete,
            query_bytes_on_disk=queries,
        )

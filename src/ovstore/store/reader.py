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
from ..errors import IncompleteImageError, InvalidInputError, StoreDamagedError, StoreError, StoreFormatError
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
    StoreDamagedError
        The root metadata exists but cannot be read (truncated ``zarr.json``, missing keys).
    """
    path = Path(path)
    if not path.exists():
        raise StoreFormatError(f"store {path} does not exist; create it with `ovstore capture ... --out {path}`")
    if not path.is_dir():
        raise StoreFormatError(f"{path} is a file, not a store directory; pass the directory given to "
                               "`ovstore capture --out`")
    if not (path / "zarr.json").is_file():
        raise StoreFormatError(
            f"{path} is not an ovstore store (no zarr.json, so not a Zarr v3 group); "
            "pass the directory given to `ovstore capture --out`"
        )
    try:
        root = zarr.open_group(path, mode=mode, zarr_format=3)
    except Exception as exc:  # zarr raises several types for unreadable metadata
        raise StoreDamagedError(
            f"{path}/zarr.json cannot be read ({_short(exc)}); the store's root metadata is damaged: "
            "restore it from a backup or a copy of the store"
        ) from exc
    meta = root.attrs.get("ovstore")
    if not isinstance(meta, dict) or meta.get("format") != fmt.FORMAT_NAME:
        raise StoreFormatError(
            f"{path} is a Zarr group but not an ovstore store (no 'ovstore' attributes); "
            "create one with `ovstore capture`"
        )
    check_format_version(path, meta)
    try:
        layout = StoreLayout.from_json(meta["layout"])
    except StoreFormatError:
        raise
    except Exception as exc:  # a missing or mistyped key of the layout record
        raise StoreDamagedError(
            f"{path}/zarr.json: the store's layout record is damaged ({_short(exc)}); restore it from a "
            "backup or a copy of the store"
        ) from exc
    check_layout_checksum(path, meta)
    return Store(path, root, meta, layout)


def check_format_version(path: Path, meta: dict[str, Any]) -> None:
    """Refuse a format version this library does not read, with the right advice: a newer
    store needs a newer ovstore, an older one the ovstore that wrote it, and a version that
    is not an integer is damage."""
    version = meta.get("format_version")
    supported = ", ".join(map(str, fmt.SUPPORTED_VERSIONS))
    if isinstance(version, bool) or not isinstance(version, int):
        raise StoreDamagedError(
            f"{path}/zarr.json: the store format version is {version!r}, not an integer; the root metadata "
            "is damaged (edited by hand?): restore it from a backup or a copy of the store"
        )
    if version in fmt.SUPPORTED_VERSIONS:
        return
    if version > max(fmt.SUPPORTED_VERSIONS):
        raise StoreFormatError(
            f"{path} has store format version {version}, newer than this ovstore reads (versions {supported}); "
            "upgrade ovstore (pip install -U ovstore)"
        )
    written = (meta.get("created_with") or {}).get("ovstore") if isinstance(meta.get("created_with"), dict) else None
    raise StoreFormatError(
        f"{path} has store format version {version}, older than this ovstore reads (versions {supported}); open it with "
        f"the ovstore that wrote it{f' ({written})' if written else ''}, or capture it again"
    )


def check_layout_checksum(path: Path, meta: dict[str, Any]) -> None:
    """Compare the layout record with the checksum written at creation (absent in older
    stores: nothing to check)."""
    expected = meta.get(fmt.LAYOUT_CHECKSUM)
    if expected is None or "layout" not in meta:
        return
    try:
        actual = fmt.layout_checksum(meta["layout"])
    except (TypeError, ValueError):
        actual = None
    if actual != expected:
        raise StoreDamagedError(
            f"{path}/zarr.json: the store's layout record is damaged: it does not match its checksum (a "
            "layer's scale, heads, head_dim or grid was edited, or the file is damaged), so maps would be "
            "wrong; restore zarr.json from a backup or a copy of the store"
        )


def _runs(steps: list[int]) -> list[tuple[int, int]]:
    """``[0, 1, 2, 7, 9, 10]`` as half-open runs ``[(0, 3), (7, 8), (9, 11)]`` (order kept)."""
    runs: list[tuple[int, int]] = []
    for s in steps:
        s = int(s)
        if runs and runs[-1][1] == s:
            runs[-1] = (runs[-1][0], s + 1)
        else:
            runs.append((s, s + 1))
    return runs


def _short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= 200 else text[:197] + "..."


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

    def __init__(self, path: Path, root: zarr.Group, meta: dict[str, Any],
                 layout: StoreLayout | None = None) -> None:
        self.path = path
        self._root = root
        self.meta = meta
        self.layout = layout if layout is not None else StoreLayout.from_json(meta["layout"])
        self._known_complete: set[int] = set()
        self._records: dict[int, ImageRecord] = {}
        self._query_arrays: dict[str, zarr.Array] = {}

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
        return int(self.array(fmt.STATUS).shape[0])

    @property
    def fully_checksummed(self) -> bool:
        """Whether every array carries a CRC32C checksum and every chunk of a slot is written
        (stores made before this was so checksum only queries and images)."""
        return self.meta.get("integrity") == fmt.INTEGRITY

    def array(self, name: str) -> zarr.Array:
        """A Zarr array of the store by path (``status``, ``layers/<name>/queries``...).

        Raises :class:`StoreDamagedError` when its metadata is unreadable and
        :class:`StoreFormatError` when it is missing.
        """
        try:
            node = self._root[name]
        except KeyError:
            raise StoreFormatError(
                f"store {self.path} has no array {name!r}; the store is incomplete or damaged: run "
                "`ovstore verify`"
            ) from None
        except Exception as exc:
            raise StoreDamagedError(
                f"{self.path}/{name}/zarr.json cannot be read ({_short(exc)}); the store is damaged: run "
                "`ovstore verify`"
            ) from exc
        if not isinstance(node, zarr.Array):
            raise StoreDamagedError(f"{self.path}/{name} is not an array; the store is damaged")
        return node

    def read(self, name: str, image: int | None = None, *, what: str | None = None,
             must_exist: bool = False) -> np.ndarray:
        """Read an array (whole, or one image's entry), checksum failures as :class:`StoreError`.

        With ``must_exist`` a missing chunk of ``image`` raises instead of reading as fill
        values.
        """
        arr = self.array(name)
        what = what or name
        if must_exist and image is not None and not self.chunk_exists(arr, (image,)):
            raise StoreError(
                f"image {image}, {what}: the data is missing from {self.path} (a chunk was deleted or never "
                "written); run `ovstore verify` to list damaged images"
            )
        try:
            return np.asarray(arr[...] if image is None else arr[image])
        except Exception as exc:
            where = f"image {image}, " if image is not None else ""
            raise StoreError(
                f"{where}{what}: stored data of {self.path} is corrupted ({_short(exc)}); run "
                "`ovstore verify` to list damaged images"
            ) from exc

    def status(self) -> np.ndarray:
        """Status of every slot: 1 complete, anything else incomplete."""
        return self.read(fmt.STATUS)

    def complete_images(self) -> list[int]:
        return [int(i) for i in np.flatnonzero(self.status() == fmt.STATUS_COMPLETE)]

    def incomplete_images(self) -> list[int]:
        return [int(i) for i in np.flatnonzero(self.status() != fmt.STATUS_COMPLETE)]

    def check_images(self, images: Sequence[int] | None) -> list[int]:
        """Validate image indices (default: every complete image)."""
        if images is None:
            complete = self.complete_images()
            if not complete:
                raise IncompleteImageError(
                    f"store {self.path} has no complete image yet; finish its images with `ovstore capture "
                    f"--resume --out {self.path}` or add some with `ovstore capture --prompt ... --out {self.path}`"
                )
            return complete
        # each slot's status is a chunk of its own (written independently): read only those asked,
        # once: a status only ever goes from reserved to complete
        images = [int(i) for i in images]
        if all(i in self._known_complete for i in images):
            return images
        n_images = self.n_images
        out = []
        for i in images:
            if not 0 <= i < n_images:
                raise IncompleteImageError(
                    f"image {i} is out of range: store {self.path} has {n_images} images "
                    f"(0..{n_images - 1})"
                )
            if int(self.read(fmt.STATUS, i, what="status")) != fmt.STATUS_COMPLETE:
                raise IncompleteImageError(
                    f"image {i} of {self.path} is incomplete (its capture was interrupted); "
                    "finish it with `ovstore capture --resume` or choose another image"
                )
            out.append(i)
        self._known_complete.update(out)
        return out

    # ------------------------------------------------------------------ records
    def record(self, image: int) -> ImageRecord:
        """The generation request of a slot (prompt, negative prompt, seed, guidance, steps)."""
        image = int(image)
        known = self._records.get(image)
        if known is not None:
            return known
        if not 0 <= image < self.n_images:
            raise IncompleteImageError(f"image {image} is out of range: store {self.path} has {self.n_images} images")
        must = self.fully_checksummed
        get = lambda name: self.read(name, image, what=f"record {name}", must_exist=must)[()]  # noqa: E731
        record = ImageRecord(
            prompt=str(get(fmt.PROMPT)),
            negative_prompt=str(get(fmt.NEGATIVE_PROMPT)),
            seed=int(get(fmt.SEED)),
            guidance=float(get(fmt.GUIDANCE)),
            num_inference_steps=int(get(fmt.NUM_INFERENCE_STEPS)),
            source=str(get(fmt.SOURCE)) if self.is_real_images else "",
        )
        if image in self._known_complete:  # written at reservation, before the slot completed: final
            self._records[image] = record
        return record

    def records(self) -> list[ImageRecord]:
        """Every slot's generation request, read array by array (faster than :meth:`record`)."""
        n = self.n_images
        names = (*fmt.RECORD_ARRAYS, fmt.SOURCE) if self.is_real_images else fmt.RECORD_ARRAYS
        columns = {name: self.read(name, what=f"record {name}")[:n] for name in names}
        return [
            ImageRecord(prompt=str(columns[fmt.PROMPT][i]), negative_prompt=str(columns[fmt.NEGATIVE_PROMPT][i]),
                        seed=int(columns[fmt.SEED][i]), guidance=float(columns[fmt.GUIDANCE][i]),
                        num_inference_steps=int(columns[fmt.NUM_INFERENCE_STEPS][i]),
                        source=str(columns[fmt.SOURCE][i]) if fmt.SOURCE in columns else "")
            for i in range(n)
        ]

    @property
    def is_real_images(self) -> bool:
        """Whether the store was captured from real images (``images`` holds the sources)."""
        return fmt.is_real_image_layout(self.layout)

    def reconstruction(self, image: int) -> tuple[np.ndarray, float, float]:
        """Real-image stores: the decoded reconstruction of a complete image (uint8 ``(H, W, 3)``),
        its PSNR (dB) and mean absolute error (in [0, 1] RGB) against the source."""
        if not self.is_real_images:
            raise StoreFormatError(f"store {self.path} holds generations, not real images; it has no reconstructions")
        (image,) = self.check_images([image])
        return (self.read(fmt.RECONSTRUCTIONS, image, what="reconstruction", must_exist=True),
                float(self.read(fmt.RECONSTRUCTION_PSNR, image, what="reconstruction PSNR", must_exist=True)[()]),
                float(self.read(fmt.RECONSTRUCTION_MAE, image, what="reconstruction error", must_exist=True)[()]))

    def branch_labels(self, image: int) -> tuple[str, ...]:
        text = str(self.read(fmt.BRANCH_LABELS, int(image), what="branch labels")[()])
        return tuple(text.split(",")) if text else ()

    def timesteps(self, image: int) -> np.ndarray:
        return self.read(fmt.TIMESTEPS, int(image), what="timesteps")

    def context(self, image: int, branch: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The context image ``image`` attended, as the denoiser received it: embeddings
        ``(branch, token, feature)`` and token ids ``(branch, token)`` (one branch when
        ``branch`` is given). Format v2 stores only."""
        if self.layout.context is None:
            raise InvalidInputError(
                f"store {self.path} holds no generation context (captured before ovstore kept it, format "
                f"v{self.format_version}); recapture the images to get --generation-context maps")
        self.check_images([image])
        emb = self.read(fmt.CONTEXT, image, what="generation context", must_exist=True)
        ids = self.read(fmt.CONTEXT_TOKEN_IDS, image, what="generation context token ids", must_exist=True)
        return (emb, ids) if branch is None else (emb[branch], ids[branch])

    def context_tokenizer_ids(self, image: int, branch: int | None = None) -> np.ndarray:
        """The token ids each tokenizer of the text recipe gave the context of ``image``:
        ``(branch, tokenizer, token)`` (one branch when ``branch`` is given), tokenizers as
        ``layout.context.tokenizers`` names them; stores that kept only the first tokenizer's
        ids give that one (a tokenizer axis of length 1)."""
        spec = self.layout.context
        if spec is None or not spec.per_tokenizer:
            ids = self.context(image)[1][:, None]
        else:
            self.check_images([image])
            ids = self.read(fmt.CONTEXT_TOKENIZER_IDS, image, what="generation context token ids",
                            must_exist=True)
        return ids if branch is None else ids[branch]

    def image(self, image: int) -> np.ndarray:
        """The generated image as uint8 (height, width, 3); in a real-image store the source.

        Raises
        ------
        IncompleteImageError
            The image is out of range or not marked complete.
        StoreError
            Its chunk is missing or fails its checksum (never returned as data).
        """
        (image,) = self.check_images([image])
        return self.read(fmt.IMAGES, image, what="image", must_exist=True)

    # ------------------------------------------------------------------ queries
    def _queries_array(self, layer: str, image: int | None = None) -> zarr.Array:
        """The layer's query array; kept open (opening reads its metadata from disk, which
        costs as much as reading a small image's queries), reopened when ``image`` lies
        beyond the length it had (the store grew since)."""
        cached = self._query_arrays.get(layer)
        if cached is not None and (image is None or image < cached.shape[0]):
            return cached
        if layer not in {l.name for l in self.layers}:
            raise InvalidInputError(
                f"layer {layer!r} is not in store {self.path}; stored layers: "
                + ", ".join(l.name for l in self.layers)
            )
        arr = self._query_arrays[layer] = self.array(f"{fmt.LAYERS_GROUP}/{layer}/{fmt.QUERIES}")
        return arr

    def queries(self, layer: str, image: int, *, branch: int | None = 0,
                steps: Sequence[int] | None = None) -> np.ndarray:
        """Stored queries of one image and layer, shape ``(step, head, y, x, channel)``.

        ``steps`` are positions along the stored step axis (default: all); ``branch=None``
        returns every stored half, shape ``(branch, step, head, y, x, channel)``.

        Raises
        ------
        IncompleteImageError
            The image is out of range or not marked complete (its data may be partial).
        StoreError
            The image's data is missing or fails its checksum (never returned as data).
        """
        return self.layer_array(layer, fmt.QUERIES, image, branch=branch, steps=steps)

    def layer_array(self, layer: str, kind: str, image: int, *, branch: int | None = 0,
                    steps: Sequence[int] | None = None) -> np.ndarray:
        """:meth:`queries`, or another per-layer array of the layout shaped as them
        (``image_keys``, ``image_values`` of MM-DiT stores)."""
        image = int(image)
        self.check_images([image])
        if kind == fmt.QUERIES:
            arr = self._queries_array(layer, image)
        else:
            if kind not in self.layout.layer_arrays:
                raise InvalidInputError(
                    f"store {self.path} holds no {kind.replace('_', ' ')} (it keeps "
                    f"{', '.join(('queries', *self.layout.layer_arrays))}); capture with a model family and preset "
                    "that record them")
            self._queries_array(layer)  # a known layer
            arr = self.array(f"{fmt.LAYERS_GROUP}/{layer}/{kind}")
        what = "query data" if kind == fmt.QUERIES else kind.replace("_", " ")
        if not self.chunk_exists(arr, (image,)):
            raise StoreError(
                f"image {image}, layer {layer}: {what} is missing from {self.path} although the "
                "image is marked complete; run `ovstore verify` and recapture it"
            )
        if steps is not None:
            n_steps = arr.shape[2]
            steps = [int(t) + n_steps if int(t) < 0 else int(t) for t in steps]
            if not steps or not all(0 <= t < n_steps for t in steps):
                raise InvalidInputError(f"stored step indices {steps} are out of range: there are {n_steps} "
                                        f"stored steps (0..{n_steps - 1})")
        try:
            if steps is None:
                return np.asarray(arr[image] if branch is None else arr[image, branch])
            # runs of consecutive steps as slices: zarr's orthogonal selection inside a shard
            # is several times slower than reading the whole shard (measured, zarr 3.1)
            pick = slice(None) if branch is None else branch
            axis = 1 if branch is None else 0
            parts = [np.asarray(arr[image, pick, start:stop]) for start, stop in _runs(steps)]
            return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=axis)
        except Exception as exc:
            raise StoreError(
                f"image {image}, layer {layer}: stored {what} is corrupted ({_short(exc)}); "
                "run `ovstore verify` to list damaged images"
            ) from exc

    def conditioning(self, image: int, branch: int = 0, steps: Sequence[int] | None = None) -> np.ndarray:
        """Conditioning vectors of the stored calls of one image and branch ``(step, channel)``
        (MM-DiT stores: the timestep and pooled-text embedding every block is modulated by)."""
        if not self.layout.conditioning:
            raise InvalidInputError(f"store {self.path} holds no conditioning vectors; it was not captured from an "
                                    "MM-DiT model family")
        self.check_images([image])
        data = self.read(fmt.CONDITIONING, int(image), what="conditioning vectors", must_exist=True)[branch]
        return data if steps is None else data[list(steps)]

    def _self_attention_grid(self, resolution: int | tuple[int, int] | None) -> tuple[int, int]:
        """The stored self-attention grid ``resolution`` names (``16`` or ``(16, 16)``; ``None``:
        the finest stored one), or a one-line error naming the capture option."""
        grids = self.layout.self_attention
        if not grids:
            raise InvalidInputError(
                f"store {self.path} holds no self-attention; capture with --self-attention RES (e.g. "
                "--self-attention 32 for SD 1.5, 16 for the toy-world model) to refine with it")
        if resolution is None:
            return max(grids, key=lambda g: g[0] * g[1])
        grid = (resolution, resolution) if isinstance(resolution, int) else tuple(int(v) for v in resolution)
        if grid not in grids:
            raise InvalidInputError(f"store {self.path} holds self-attention at "
                                    f"{', '.join(f'{h}x{w}' for h, w in grids)}, not {grid[0]}x{grid[1]}; "
                                    "choose one of those")
        return grid  # type: ignore[return-value]

    def self_attention(self, image: int, resolution: int | tuple[int, int] | None = None, *,
                       branch: int | None = 0) -> np.ndarray:
        """The averaged self-attention matrix of one image ``(H*W, H*W)`` float16 (row: query
        pixel, column: key pixel, row-major; rows sum to 1), at the stored grid ``resolution``
        (default: the finest stored); ``branch=None``: every stored half ``(branch, H*W, H*W)``."""
        grid = self._self_attention_grid(resolution)
        self.check_images([image])
        data = self.read(fmt.self_attention_name(grid), int(image), what=f"{grid[0]}x{grid[1]} self-attention",
                         must_exist=True)
        return data if branch is None else data[branch]

    def self_attention_view(self, resolution: int | tuple[int, int] | None = None) -> xr.DataArray:
        """Lazy (dask) view of the stored self-attention matrices of one grid, dims ``(image,
        branch, query_pixel, key_pixel)``; ``complete`` marks the images whose data is there."""
        import dask.array as da
        import xarray as xr

        grid = self._self_attention_grid(resolution)
        n = self.n_images
        arr = self.array(fmt.self_attention_name(grid))
        return xr.DataArray(da.from_zarr(arr)[:n], dims=(dims.IMAGE, dims.BRANCH, "query_pixel", "key_pixel"),
                            coords=self._image_coords() | {dims.BRANCH: list(self.layout.branches)},
                            name=f"self_attention:{grid[0]}x{grid[1]}", attrs={"grid": list(grid)})

    def weight_digests(self) -> dict[str, str]:
        """SHA-256 of each stored text-stream weight (``weights/``), by name."""
        try:
            group = self._root[fmt.WEIGHTS_GROUP]
        except KeyError:
            return {}
        return {name: str(arr.attrs.get("sha256", "")) for name, arr in group.arrays()}

    def weights(self) -> dict[str, np.ndarray]:
        """Every stored text-stream weight (``weights/``, float32), by name."""
        try:
            group = self._root[fmt.WEIGHTS_GROUP]
        except KeyError:
            raise StoreFormatError(f"store {self.path} holds no text-stream weights (weights/); it was not "
                                   "captured from an MM-DiT model family, or is damaged: run `ovstore verify`") from None
        out = {}
        for name, arr in group.arrays():
            try:
                out[name] = np.asarray(arr[...])
            except Exception as exc:
                raise StoreError(f"text-stream weight {name} of {self.path} is corrupted ({_short(exc)}); "
                                 "run `ovstore verify`") from exc
        return out

    def chunk_exists(self, arr: zarr.Array, leading: tuple[int, ...]) -> bool:
        """Whether the storage object (chunk or shard) starting at ``leading`` coordinates
        exists; zarr would silently return fill values for a missing one."""
        grid = arr.shards or arr.chunks
        coords = tuple(leading) + (0,) * (len(grid) - len(leading))
        key = arr.metadata.encode_chunk_key(tuple(c // g for c, g in zip(coords, grid)))
        return (self.path / arr.path / key).exists()

    def key_projection(self, layer: str) -> tuple[np.ndarray, np.ndarray]:
        """``to_k`` weight (inner, text_dim) and bias (inner,) of a layer, float32."""
        self._queries_array(layer)  # a known layer
        out = []
        for name in (fmt.TO_K_WEIGHT, fmt.TO_K_BIAS):
            path = f"{fmt.LAYERS_GROUP}/{layer}/{name}"
            try:
                arr = self.array(path)
            except StoreDamagedError:
                raise
            except StoreFormatError:
                raise StoreFormatError(f"store {self.path} has no key projection for layer {layer} ({name}); "
                                       "run `ovstore verify`") from None
            # written whole, never equal to the fill value everywhere: a missing chunk is damage
            if not self.chunk_exists(arr, (0,)) and (name == fmt.TO_K_WEIGHT or self.fully_checksummed):
                raise StoreError(f"layer {layer}: {name} is missing from {self.path}; run `ovstore verify`")
            out.append(self.read(path, what=f"layer {layer} {name}"))
        return out[0], out[1]

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

        n = self.n_images  # data arrays may be longer after an interrupted reserve
        arr = self._queries_array(layer, n - 1)  # as long as the store is now
        data = da.from_zarr(arr)[:n]
        return xr.DataArray(
            data,
            dims=dims.QUERY_DIMS,
            name=f"queries:{layer}",
            coords=self._image_coords() | {
                dims.STEP: np.asarray(self.layout.calls),
                dims.BRANCH: list(self.layout.branches) if len(self.layout.branches) == arr.shape[1]
                else list(range(arr.shape[1])),
                "timestep": ((dims.IMAGE, dims.STEP), self.read(fmt.TIMESTEPS)[:n]),
            },
            attrs={"layer": self.layout.layer(layer).to_json()},
        )

    def _image_coords(self) -> dict[str, Any]:
        n = self.n_images
        return {
            dims.IMAGE: np.arange(n),
            "complete": (dims.IMAGE, self.status() == fmt.STATUS_COMPLETE),
            "prompt": (dims.IMAGE, np.asarray(self.read(fmt.PROMPT)[:n], dtype=object)),
            "seed": (dims.IMAGE, self.read(fmt.SEED)[:n]),
        }

    def images_view(self) -> xr.DataArray:
        """Lazy view of the generated images, dims ``(image, image_y, image_x, rgb)``."""
        import dask.array as da
        import xarray as xr

        arr = self.array(fmt.IMAGES)
        return xr.DataArray(da.from_zarr(arr)[:self.n_images], dims=(dims.IMAGE, dims.IMAGE_Y, dims.IMAGE_X, dims.RGB),
                            coords=self._image_coords(), name="images")

    def to_dataset(self) -> xr.Dataset:
        """All per-image records and every layer's queries as one lazy xarray Dataset.

        Layers have different spatial sizes, so each layer's ``y``/``x``/``head``/``channel``
        dims are suffixed with the layer's index (``y_0``, ``x_0``...).
        """
        import xarray as xr

        n = self.n_images
        ds = xr.Dataset(coords=self._image_coords())
        ds["negative_prompt"] = (dims.IMAGE, np.asarray(self.read(fmt.NEGATIVE_PROMPT)[:n], dtype=object))
        ds["guidance"] = (dims.IMAGE, self.read(fmt.GUIDANCE)[:n])
        ds["num_inference_steps"] = (dims.IMAGE, self.read(fmt.NUM_INFERENCE_STEPS)[:n])
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
        """Bytes of the whole directory, and of the query shards of complete images (the
        figure the compression ratio compares with: partial shards of incomplete images,
        key projections and metadata are left out)."""
        total = queries = 0
        complete = set(self.complete_images())
        layers_dir = self.path / fmt.LAYERS_GROUP
        for dirpath, _, files in os.walk(self.path):
            size = sum(os.path.getsize(os.path.join(dirpath, f)) for f in files)
            total += size
            rel = Path(dirpath).relative_to(layers_dir).parts if dirpath.startswith(str(layers_dir)) else ()
            # layers/<name>/queries/c/<image>/...
            if len(rel) >= 4 and rel[1] == fmt.QUERIES and rel[2] == "c" and rel[3].isdigit() \
                    and int(rel[3]) in complete:
                queries += sum(os.path.getsize(os.path.join(dirpath, f)) for f in files if not f.endswith(".partial"))
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

"""Writing captures into a store: create or append, reserve slots, write, mark complete.

Crash safety comes from ordering. A slot is first *reserved* (its generation request is
written, status 0), then its data is written, and only then is its status set to complete.
Every zarr write of a local store is an atomic rename, so a process killed at any point
leaves a store that opens, with complete images intact and the others marked incomplete
and resumable from their recorded request.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import platform
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import zarr

from .._version import __version__
from ..errors import IncompatibleStoreError, InvalidInputError, StoreError
from . import format as fmt
from .format import ImageRecord, StoreLayout
from .reader import Store, open_store

__all__ = ["StoreWriter", "library_versions"]

_PER_IMAGE_SCALARS = {
    fmt.SEED: ("int64", 0),
    fmt.GUIDANCE: ("float64", 0.0),
    fmt.NUM_INFERENCE_STEPS: ("int32", 0),
}
_PER_IMAGE_TEXT = (fmt.PROMPT, fmt.NEGATIVE_PROMPT, fmt.BRANCH_LABELS)


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shape what is stored, recorded for provenance."""
    import importlib.metadata as md

    versions = {"ovstore": __version__, "python": platform.python_version()}
    for name in ("zarr", "numpy", "numcodecs", "torch", "diffusers", "transformers"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return versions


class StoreWriter:
    """Appends images to a store created with a fixed :class:`StoreLayout`.

    Use :meth:`open` rather than the constructor: it creates the store or checks that an
    existing one is compatible.
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self._root = store._root

    # ------------------------------------------------------------------ creation
    @classmethod
    def open(cls, path: str | Path, layout: StoreLayout) -> StoreWriter:
        """Create a store at ``path`` or open an existing one for appending.

        Raises
        ------
        IncompatibleStoreError
            The existing store was made with another model, layers, size or settings.
        """
        path = Path(path)
        if path.exists() and any(path.iterdir()):
            store = open_store(path, mode="r+")
            diffs = store.layout.differences(layout)
            if diffs:
                raise IncompatibleStoreError(
                    f"cannot append to {path}: " + "; ".join(diffs)
                    + ". Capture into a new store (--out NEW.zarr) or use matching settings."
                )
            return cls(store)
        if path.exists() and not path.is_dir():
            raise InvalidInputError(f"{path} exists and is not a directory; choose another --out")
        try:
            cls._create(path, layout)
        except PermissionError as exc:
            raise StoreError(f"cannot create store at {path}: {exc}. Choose a writable --out.") from exc
        return cls(open_store(path, mode="r+"))

    @staticmethod
    def _create(path: Path, layout: StoreLayout) -> None:
        root = zarr.open_group(path, mode="w", zarr_format=3)
        i = fmt.IMAGE_DIM
        root.create_array(
            fmt.STATUS, shape=(0,), chunks=(1,), dtype="uint8",
            fill_value=fmt.STATUS_RESERVED, dimension_names=(i,),
        )
        for name in _PER_IMAGE_TEXT:
            root.create_array(name, shape=(0,), chunks=(1,), dtype=str, fill_value="",
                              dimension_names=(i,))
        for name, (dtype, fill) in _PER_IMAGE_SCALARS.items():
            root.create_array(name, shape=(0,), chunks=(1,), dtype=dtype, fill_value=fill,
                              dimension_names=(i,))
        root.create_array(
            fmt.TIMESTEPS, shape=(0, layout.n_steps), chunks=(1, layout.n_steps),
            dtype="float64", fill_value=np.nan, dimension_names=(i, fmt.STEP_DIM),
        )
        root.create_array(
            fmt.IMAGES, shape=(0, layout.height, layout.width, 3),
            chunks=(1, layout.height, layout.width, 3), dtype="uint8", fill_value=0,
            dimension_names=(i, "image_y", "image_x", "rgb"),
            compressors=fmt.query_codecs("zstd3"),
        )
        layers = root.create_group(fmt.LAYERS_GROUP)
        nb = len(layout.branches)
        for info in layout.layers:
            g = layers.create_group(info.name, attributes={"layer": info.to_json()})
            inner = (1, 1, 1, info.heads, info.height, info.width, info.head_dim)
            shard = (1, nb, layout.n_steps, info.heads, info.height, info.width, info.head_dim)
            g.create_array(
                fmt.QUERIES, shape=(0, *shard[1:]), chunks=inner, shards=shard,
                dtype=layout.query_dtype, fill_value=0.0,
                compressors=fmt.query_codecs(layout.codec),
                dimension_names=fmt.QUERY_DIM_NAMES,
            )
        meta = {
            "format": fmt.FORMAT_NAME,
            "format_version": fmt.FORMAT_VERSION,
            "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "created_with": library_versions(),
            "layout": layout.to_json(),
        }
        root.attrs["ovstore"] = meta

    def write_key_projections(self, weights: Mapping[str, tuple[np.ndarray, np.ndarray | None]]) -> None:
        """Store each layer's ``to_k`` weight and bias (float32), once per store."""
        with _os_errors(self.store.path):
            self._write_key_projections(weights)

    def _write_key_projections(self, weights: Mapping[str, tuple[np.ndarray, np.ndarray | None]]) -> None:
        layers = self._root[fmt.LAYERS_GROUP]
        for name, (weight, bias) in weights.items():
            g = layers[name]
            if fmt.TO_K_WEIGHT in g:
                existing = g[fmt.TO_K_WEIGHT][...]
                if existing.shape != weight.shape or not np.array_equal(existing, weight):
                    raise IncompatibleStoreError(
                        f"cannot append: the to_k weights of layer {name} differ from the "
                        "store's; this is another model. Capture into a new store."
                    )
                continue
            w = np.asarray(weight, dtype=np.float32)
            b = np.zeros(w.shape[0], np.float32) if bias is None else np.asarray(bias, np.float32)
            g.create_array(fmt.TO_K_WEIGHT, data=w, dimension_names=("key_channel", "text_channel"))
            g.create_array(fmt.TO_K_BIAS, data=b, dimension_names=("key_channel",))

    # ------------------------------------------------------------------ images
    def reserve(self, records: Sequence[ImageRecord]) -> list[int]:
        """Add slots for ``records`` and store their generation requests (status: reserved).

        Only one process may reserve at a time (it rewrites array metadata); writers of
        already-reserved slots may run concurrently (see ``ovstore capture --worker``).
        """
        with _os_errors(self.store.path):
            return self._reserve(records)

    def _reserve(self, records: Sequence[ImageRecord]) -> list[int]:
        root = self._root
        start = root[fmt.STATUS].shape[0]
        n = start + len(records)
        # data arrays first, the status array last: the status length is the truth
        for info in self.store.layout.layers:
            arr = root[fmt.LAYERS_GROUP][info.name][fmt.QUERIES]
            arr.resize((n, *arr.shape[1:]))
        for name in (fmt.IMAGES, fmt.TIMESTEPS, *_PER_IMAGE_TEXT, *_PER_IMAGE_SCALARS):
            arr = root[name]
            arr.resize((n, *arr.shape[1:]))
        slots = list(range(start, n))
        if records:
            sl = slice(start, n)
            root[fmt.PROMPT][sl] = np.array([r.prompt for r in records], dtype=object)
            root[fmt.NEGATIVE_PROMPT][sl] = np.array([r.negative_prompt or "" for r in records], dtype=object)
            root[fmt.SEED][sl] = np.array([r.seed for r in records], dtype=np.int64)
            root[fmt.GUIDANCE][sl] = np.array([r.guidance for r in records], dtype=np.float64)
            root[fmt.NUM_INFERENCE_STEPS][sl] = np.array([r.num_inference_steps for r in records], dtype=np.int32)
        status = root[fmt.STATUS]
        status.resize((n,))
        return slots

    def write_image(
        self,
        slot: int,
        *,
        image: np.ndarray,
        queries: Mapping[str, np.ndarray],
        timesteps: Sequence[float],
        branch_labels: Sequence[str],
    ) -> None:
        """Write one image's data; it stays incomplete until :meth:`mark_complete`.

        ``queries[name]`` has shape ``(branch, step, head, y, x, channel)``.
        """
        root = self._root
        layout = self.store.layout
        if root[fmt.STATUS][slot] == fmt.STATUS_COMPLETE:
            raise StoreError(f"image {slot} is already complete; refusing to overwrite it")
        with zarr.config.set({"array.write_empty_chunks": True}), _os_errors(self.store.path):
            self._write_image(slot, image, queries, timesteps, branch_labels)

    def _write_image(self, slot: int, image: np.ndarray, queries: Mapping[str, np.ndarray],
                     timesteps: Sequence[float], branch_labels: Sequence[str]) -> None:
        root = self._root
        for info in self.store.layout.layers:
            arr = root[fmt.LAYERS_GROUP][info.name][fmt.QUERIES]
            data = queries[info.name]
            if data.shape != arr.shape[1:]:
                raise StoreError(
                    f"queries of layer {info.name} have shape {data.shape}, the store expects "
                    f"{arr.shape[1:]}"
                )
            if not np.isfinite(data).all():
                raise InvalidInputError(
                    f"queries of layer {info.name} for image {slot} contain NaN or Inf; the "
                    "generation diverged (try float32 weights or another seed); nothing written"
                )
            arr[slot] = data
        root[fmt.IMAGES][slot] = image
        root[fmt.TIMESTEPS][slot] = np.asarray(timesteps, dtype=np.float64)
        root[fmt.BRANCH_LABELS][slot] = ",".join(branch_labels)

    def mark_complete(self, slot: int) -> None:
        """The completion marker: written last, after every other piece of the image."""
        with _os_errors(self.store.path):
            self._root[fmt.STATUS][slot] = fmt.STATUS_COMPLETE


@contextlib.contextmanager
def _os_errors(path: Path) -> Iterator[None]:
    """Disk full, read-only or permission failures as one clear error (the store stays valid:
    every zarr write is a rename of a complete temporary file)."""
    try:
        yield
    except OSError as exc:
        reasons = {errno.ENOSPC: "the disk is full", errno.EROFS: "the file system is read-only",
                   errno.EACCES: "permission denied", errno.EDQUOT: "the disk quota is exceeded"}
        reason = reasons.get(exc.errno, exc.strerror or str(exc))
        raise StoreError(
            f"cannot write to store {path}: {reason}. Complete images are intact; free space or fix "
            "permissions, then finish with `ovstore capture --resume`"
        ) from exc

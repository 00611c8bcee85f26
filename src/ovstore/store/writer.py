"""Writing captures into a store: create or append, reserve slots, write, mark complete.

Crash safety comes from ordering and atomic renames:

* A new store is built completely (root metadata, every array, the ``to_k`` key
  projections) in a hidden sibling directory and renamed into place, so the store path holds
  either nothing or a valid empty store. A killed creation leaves only the hidden directory,
  which the next writer removes.
* A slot is first *reserved* (its generation request is written, status 0, under a lock
  file so that two processes never reserve the same slots), then its data is written, and
  only then is its status set to complete.
* Every chunk and metadata write of zarr >= 3.1.3 on a local store is a rename of a complete
  temporary file (``*.partial``), so a process killed at any point leaves a store that opens,
  with complete images intact and the others marked incomplete and resumable from their
  recorded request.

Durability against power loss depends on the file system: nothing here calls fsync.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import json
import os
import platform
import shutil
import socket
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import zarr

from .._version import __version__
from ..errors import (
    IncompatibleStoreError,
    InvalidInputError,
    StoreError,
    StoreFormatError,
    StoreLockedError,
)
from . import format as fmt
from .format import ImageRecord, StoreLayout
from .reader import Store, open_store
from ..outputs import describe_os_error, pid_alive as _pid_alive

__all__ = ["StoreWriter", "library_versions", "store_lock", "describe_os_error", "CAPTURE_HINT", "MERGE_HINT"]

_PER_IMAGE_SCALARS = {
    fmt.SEED: ("int64", 0),
    fmt.GUIDANCE: ("float64", 0.0),
    fmt.NUM_INFERENCE_STEPS: ("int32", 0),
}
_PER_IMAGE_TEXT = (fmt.PROMPT, fmt.NEGATIVE_PROMPT, fmt.BRANCH_LABELS)

#: What to do after a write failed, per command.
CAPTURE_HINT = "then finish with `ovstore capture --resume --out {path}`"
MERGE_HINT = "then re-run the same `ovstore merge` command (it fills the incomplete slots)"

_CREATING = ".creating-"
#: Seconds a writer waits for another process's lock before giving up.
LOCK_TIMEOUT = 60.0
_DENSE = {"array.write_empty_chunks": True}


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

    def __init__(self, store: Store, *, hint: str = CAPTURE_HINT) -> None:
        self.store = store
        self._root = store._root
        self.hint = hint

    # ------------------------------------------------------------------ creation
    @classmethod
    def open(cls, path: str | Path, layout: StoreLayout, *,
             key_projections: Mapping[str, tuple[np.ndarray, np.ndarray | None]] | None = None,
             hint: str = CAPTURE_HINT, weights: Mapping[str, np.ndarray] | None = None) -> StoreWriter:
        """Create a store at ``path`` or open an existing one for appending.

        A new store is built in a hidden sibling directory (with ``key_projections`` when
        given) and renamed into place, so a kill or a full disk never leaves a half-made store.
        For an existing store, missing key projections are written and present ones compared.
        ``weights`` (MM-DiT families: the text-stream weights) are written with a new store
        under ``weights/``; an existing store's must be the same (compared by SHA-256).

        Raises
        ------
        IncompatibleStoreError
            The existing store was made with another model, layers, size or settings.
        StoreError
            The store cannot be created or written (disk full, read-only, permissions).
        """
        path = Path(path)
        _check_zarr_version()
        if path.exists() and not path.is_dir():
            raise InvalidInputError(f"--out {path} exists and is not a directory; choose another --out")
        _remove_stale_creations(path)
        if not _is_empty_dir(path):
            return cls._open_existing(path, layout, key_projections, hint, weights)
        try:
            _create_atomically(path, layout, key_projections, hint, weights)
        except _Raced:  # another process created it meanwhile: append to it
            return cls._open_existing(path, layout, key_projections, hint, weights)
        return cls(open_store(path, mode="r+"), hint=hint)

    @classmethod
    def _open_existing(cls, path: Path, layout: StoreLayout, key_projections, hint: str,
                       weights: Mapping[str, np.ndarray] | None = None) -> StoreWriter:
        try:
            store = open_store(path, mode="r+")
        except StoreFormatError as exc:
            if (path / "zarr.json").is_file() or not path.is_dir():
                raise
            raise StoreFormatError(f"--out {path} is a directory that is not an ovstore store; choose a new "
                                   "--out (or an existing store to append to)") from exc
        diffs = store.layout.differences(layout)
        if diffs:
            raise IncompatibleStoreError(
                f"cannot append to {path}: " + "; ".join(diffs)
                + ". Leave those options out to use the store's settings, or capture into a new --out"
            )
        writer = cls(store, hint=hint)
        if key_projections is not None:
            writer.write_key_projections(key_projections)
        if weights:
            _check_weights(store, weights)
        return writer

    @contextlib.contextmanager
    def locked(self, timeout: float | None = None) -> Iterator[None]:
        """Hold the store's lock file (see :func:`store_lock`), with disk errors made clear."""
        with self._os_errors(), store_lock(self.store.path, timeout=LOCK_TIMEOUT if timeout is None else timeout):
            yield

    def write_key_projections(self, weights: Mapping[str, tuple[np.ndarray, np.ndarray | None]]) -> None:
        """Store each layer's ``to_k`` weight and bias (float32), once per store.

        Missing ones (a store made without them, or a write that was interrupted) are
        written; present ones must equal ``weights``, otherwise this is another model.
        """
        if self._key_projections_match(weights):
            return
        with self.locked(), self._os_errors():
            if not self._key_projections_match(weights):  # re-checked under the lock
                self._write_key_projections(weights)

    def _key_projections_match(self, weights: Mapping[str, tuple[np.ndarray, np.ndarray | None]]) -> bool:
        """True when every projection is stored and equal; False when some are missing.

        Raises :class:`IncompatibleStoreError` when a stored one differs.
        """
        store = self.store
        complete = True
        for name, (weight, bias) in weights.items():
            for kind, value in ((fmt.TO_K_WEIGHT, weight), (fmt.TO_K_BIAS, bias)):
                path = f"{fmt.LAYERS_GROUP}/{name}/{kind}"
                try:
                    arr = store.array(path)
                except StoreFormatError:
                    complete = False
                    continue
                expected = _key_array(value, weight, kind)
                if not store.chunk_exists(arr, (0,)):
                    if kind == fmt.TO_K_BIAS and not expected.any() and not store.fully_checksummed:
                        continue  # older stores skipped all-zero bias chunks
                    complete = False
                    continue
                existing = store.read(path, what=f"layer {name} {kind}")
                if existing.shape != expected.shape or not np.array_equal(existing, expected):
                    raise IncompatibleStoreError(
                        f"cannot append to {store.path}: the {kind} of layer {name} differs from the store's; "
                        "this is another model. Capture into a new --out"
                    )
        return complete

    def _write_key_projections(self, weights: Mapping[str, tuple[np.ndarray, np.ndarray | None]]) -> None:
        layers = self._root[fmt.LAYERS_GROUP]
        for name, (weight, bias) in weights.items():
            _write_key_arrays(layers[name], weight, bias)

    # ------------------------------------------------------------------ images
    def reserve(self, records: Sequence[ImageRecord]) -> list[int]:
        """Add slots for ``records`` and store their generation requests (status: reserved).

        Holds the store's lock file, so concurrent writers (captures, merges) never get the
        same slots; writers of already-reserved slots may run concurrently (see
        ``ovstore capture --worker``).
        """
        with self.locked(), self._os_errors():
            return self._reserve(records)

    def _reserve(self, records: Sequence[ImageRecord]) -> list[int]:
        store = self.store
        start = store.array(fmt.STATUS).shape[0]
        n = start + len(records)
        if not records:
            return []
        real = fmt.is_real_image_layout(store.layout)
        if any(bool(r.source) != real for r in records):
            raise InvalidInputError(
                "real images (with a source file) and generations (prompts only) cannot share a store; capture "
                "them into separate --out stores")
        with zarr.config.set(_DENSE):
            # data arrays first, the status array last: the status length is the truth, so a
            # reserve killed half-way adds no slot (longer data arrays are cut back next time)
            for info in store.layout.layers:
                for kind in (fmt.QUERIES, *store.layout.layer_arrays):
                    arr = store.array(f"{fmt.LAYERS_GROUP}/{info.name}/{kind}")
                    arr.resize((n, *arr.shape[1:]))
            for name in (fmt.IMAGES, fmt.TIMESTEPS, *_PER_IMAGE_TEXT, *_PER_IMAGE_SCALARS, *_context_arrays(store),
                         *(fmt.REAL_IMAGE_ARRAYS if real else ()), *_self_attention_arrays(store.layout)):
                arr = store.array(name)
                arr.resize((n, *arr.shape[1:]))
            sl = slice(start, n)
            store.array(fmt.PROMPT)[sl] = np.array([r.prompt for r in records], dtype=object)
            store.array(fmt.NEGATIVE_PROMPT)[sl] = np.array([r.negative_prompt or "" for r in records], dtype=object)
            store.array(fmt.SEED)[sl] = np.array([r.seed for r in records], dtype=np.int64)
            store.array(fmt.GUIDANCE)[sl] = np.array([r.guidance for r in records], dtype=np.float64)
            store.array(fmt.NUM_INFERENCE_STEPS)[sl] = np.array([r.num_inference_steps for r in records],
                                                                dtype=np.int32)
            if fmt.is_real_image_layout(store.layout):
                store.array(fmt.SOURCE)[sl] = np.array([r.source for r in records], dtype=object)
            status = store.array(fmt.STATUS)
            status.resize((n,))
        return list(range(start, n))

    def write_image(
        self,
        slot: int,
        *,
        image: np.ndarray,
        queries: Mapping[str, np.ndarray],
        timesteps: Sequence[float],
        branch_labels: Sequence[str],
        context: tuple[np.ndarray, np.ndarray] | None = None,
        layer_arrays: Mapping[str, Mapping[str, np.ndarray]] | None = None,
        conditioning: np.ndarray | None = None,
        reconstruction: tuple[np.ndarray, float, float] | None = None,
        self_attention: Mapping[tuple[int, int], np.ndarray] | None = None,
    ) -> None:
        """Write one image's data; it stays incomplete until :meth:`mark_complete`.

        ``queries[name]`` has shape ``(branch, step, head, y, x, channel)``; ``context`` is the
        attended context ``(branch, token, feature)`` and its token ids ``(branch, token)``,
        written when the store keeps contexts (format v2) and required then.
        ``layer_arrays[kind][name]`` (the layout's ``layer_arrays``, e.g. image keys) are shaped
        as the queries; ``conditioning`` is ``(branch, step, channel)`` when the layout has it;
        ``self_attention[(H, W)]`` is ``(branch, H*W, H*W)`` for every grid of
        ``layout.self_attention`` (required then).
        Real-image stores (``image`` is then the source) need ``reconstruction``: the decoded
        result (uint8, as ``image``), its PSNR and mean absolute error against the source.
        """
        if int(self.store.read(fmt.STATUS, slot)[()]) == fmt.STATUS_COMPLETE:
            raise StoreError(f"image {slot} is already complete; refusing to overwrite it")
        real = fmt.is_real_image_layout(self.store.layout)
        if real != (reconstruction is not None):
            raise StoreError(f"image {slot}: " + ("a real-image store needs the reconstruction of each image" if real
                                                  else "only real-image stores keep reconstructions"))
        if real and np.shape(reconstruction[0]) != np.shape(image):
            raise StoreError(f"image {slot}: the reconstruction has shape {np.shape(reconstruction[0])}, the image "
                             f"{np.shape(image)}")
        with zarr.config.set(_DENSE), self._os_errors():
            matrices = self._check_self_attention(slot, self_attention or {})  # before the first write
            self._write_image(slot, image, queries, timesteps, branch_labels, context, layer_arrays or {},
                              conditioning)
            if real:
                rgb, psnr, mae = reconstruction
                self.store.array(fmt.RECONSTRUCTIONS)[slot] = np.asarray(rgb, dtype=np.uint8)
                self.store.array(fmt.RECONSTRUCTION_PSNR)[slot] = float(psnr)
                self.store.array(fmt.RECONSTRUCTION_MAE)[slot] = float(mae)
            for name, data in matrices.items():
                self.store.array(name)[slot] = data

    def _check_self_attention(self, slot: int, given: Mapping[tuple[int, int], np.ndarray]) -> dict[str, np.ndarray]:
        """The self-attention matrices to write, by array path, each checked against the layout."""
        out = {}
        nb = len(self.store.layout.branches)
        for h, w in self.store.layout.self_attention:
            data = given.get((h, w))
            expected = (nb, h * w, h * w)
            if data is None or tuple(data.shape) != expected:
                raise StoreError(f"image {slot}: the {h}x{w} self-attention matrix has shape "
                                 f"{None if data is None else tuple(data.shape)}, the store expects {expected}")
            if not np.isfinite(data).all():
                raise InvalidInputError(f"the {h}x{w} self-attention of image {slot} contains NaN or Inf; the "
                                        "generation diverged (try float32 weights or another seed); nothing written")
            out[fmt.self_attention_name((h, w))] = np.asarray(data, dtype=np.float16)
        return out

    def _write_image(self, slot: int, image: np.ndarray, queries: Mapping[str, np.ndarray],
                     timesteps: Sequence[float], branch_labels: Sequence[str],
                     context: tuple[np.ndarray, np.ndarray] | None = None,
                     layer_arrays: Mapping[str, Mapping[str, np.ndarray]] | None = None,
                     conditioning: np.ndarray | None = None) -> None:
        store = self.store
        arrays = {}
        layer_arrays = layer_arrays or {}
        for info in store.layout.layers:  # every check before the first write
            for kind in (fmt.QUERIES, *store.layout.layer_arrays):
                arr = store.array(f"{fmt.LAYERS_GROUP}/{info.name}/{kind}")
                source = queries if kind == fmt.QUERIES else layer_arrays.get(kind, {})
                if info.name not in source:
                    raise StoreError(f"image {slot}: no {kind} of layer {info.name} were recorded; the store keeps them")
                data = source[info.name]
                what = kind.replace("_", " ")
                if data.shape != arr.shape[1:]:
                    raise StoreError(
                        f"{what} of layer {info.name} have shape {data.shape}, the store expects "
                        f"{arr.shape[1:]}"
                    )
                if not np.isfinite(data).all():
                    raise InvalidInputError(
                        f"{what} of layer {info.name} for image {slot} contain NaN or Inf; the "
                        "generation diverged (try float32 weights or another seed); nothing written"
                    )
                arrays[(info.name, kind)] = (arr, data)
        if store.layout.conditioning:
            expected_c = (len(store.layout.branches), store.layout.n_steps, store.layout.conditioning)
            if conditioning is None or tuple(conditioning.shape) != expected_c:
                raise StoreError(f"image {slot}: the conditioning vectors have shape "
                                 f"{None if conditioning is None else tuple(conditioning.shape)}, the store expects "
                                 f"{expected_c}")
        spec = store.layout.context
        if spec is not None:
            if context is None:
                raise StoreError(f"image {slot}: the store keeps the generation context, none was given")
            embeddings, ids = context
            ids = np.asarray(ids, dtype=np.int64)
            if ids.ndim == 2:  # (branch, token): the first tokenizer's only
                ids = ids[:, None]
            expected = (len(store.layout.branches), spec.length, spec.features)
            if tuple(embeddings.shape) != expected or ids.ndim != 3 or ids.shape[::2] != expected[:2]:
                raise StoreError(f"the context of image {slot} has shape {tuple(embeddings.shape)}, the store "
                                 f"expects {expected}")
            if spec.per_tokenizer and ids.shape[1] < len(spec.tokenizers):
                raise StoreError(f"the context of image {slot} has the token ids of {ids.shape[1]} tokenizer(s), "
                                 f"the store keeps those of {', '.join(spec.tokenizers)}")
        for arr, data in arrays.values():
            arr[slot] = data
        store.array(fmt.IMAGES)[slot] = image
        store.array(fmt.TIMESTEPS)[slot] = np.asarray(timesteps, dtype=np.float64)
        store.array(fmt.BRANCH_LABELS)[slot] = ",".join(branch_labels)
        if store.layout.conditioning:
            store.array(fmt.CONDITIONING)[slot] = np.asarray(conditioning, dtype=store.layout.query_dtype)
        if spec is not None:
            store.array(fmt.CONTEXT)[slot] = np.asarray(embeddings, dtype=spec.dtype)
            store.array(fmt.CONTEXT_TOKEN_IDS)[slot] = ids[:, 0]
            if spec.per_tokenizer:
                store.array(fmt.CONTEXT_TOKENIZER_IDS)[slot] = ids[:, :len(spec.tokenizers)]

    def mark_complete(self, slot: int) -> None:
        """The completion marker: written last, after every other piece of the image."""
        with self._os_errors():
            self.store.array(fmt.STATUS)[slot] = fmt.STATUS_COMPLETE

    def _os_errors(self) -> contextlib.AbstractContextManager[None]:
        return _os_errors(self.store.path, self.hint)


def _context_arrays(store: Store) -> tuple[str, ...]:
    """The per-image context arrays of a store that keeps them (format v2), and the
    conditioning vectors of one that has them (MM-DiT)."""
    spec = store.layout.context
    names = () if spec is None else (
        fmt.CONTEXT, fmt.CONTEXT_TOKEN_IDS, *((fmt.CONTEXT_TOKENIZER_IDS,) if spec.per_tokenizer else ()))
    return names + ((fmt.CONDITIONING,) if store.layout.conditioning else ())


def _self_attention_arrays(layout: StoreLayout) -> tuple[str, ...]:
    """The per-image self-attention arrays of a layout (format 2.1), by path."""
    return tuple(fmt.self_attention_name(g) for g in layout.self_attention)


# ---------------------------------------------------------------------- creation helpers
def _check_zarr_version() -> None:
    """Crash safety needs zarr's atomic local writes (temporary file + rename), new in 3.1.3."""
    parts = []
    for piece in zarr.__version__.split(".")[:3]:
        digits = "".join(c for c in piece if c.isdigit()) if piece[:1].isdigit() else ""
        parts.append(int(digits) if digits else 0)
    if tuple(parts) < (3, 1, 3):
        raise StoreError(f"zarr {zarr.__version__} writes chunks in place, so a killed capture could leave a "
                         "half-written chunk; install zarr>=3.1.3 (pip install -U 'zarr>=3.1.3') to write stores")



class _Raced(Exception):
    """The store path was created by another process while this one built its own."""


def _is_empty_dir(path: Path) -> bool:
    if not path.exists():
        return True
    return path.is_dir() and not any(path.iterdir())


def _creation_prefix(path: Path) -> str:
    return f".{path.name}{_CREATING}"


def _remove_stale_creations(path: Path) -> None:
    """Remove hidden half-built stores of ``path`` left by killed processes of this host."""
    parent = path.parent
    if not parent.is_dir():
        return
    prefix = _creation_prefix(path)
    host = socket.gethostname()
    try:
        entries = [e for e in parent.iterdir() if e.name.startswith(prefix)]
    except OSError:
        return
    for entry in entries:
        try:
            owner, pid, _ = entry.name[len(prefix):].rsplit("-", 2)
            stale = owner == host and not _pid_alive(int(pid))
        except ValueError:
            stale = False
        if stale:
            shutil.rmtree(entry, ignore_errors=True)


def _remove_settled(tmp: Path, settle: float = 0.1, limit: float = 3.0) -> None:
    """Remove a half-built store and make sure it stays removed: when one of zarr's concurrent
    writes fails, its siblings may still land a moment later and recreate folders."""
    deadline = time.monotonic() + limit
    while True:
        shutil.rmtree(tmp, ignore_errors=True)
        time.sleep(settle)
        if not os.path.lexists(tmp) or time.monotonic() > deadline:
            return


def _create_atomically(path: Path, layout: StoreLayout, key_projections, hint: str, weights=None) -> None:
    parent = path.parent
    tmp = parent / f"{_creation_prefix(path)}{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    renaming = False
    try:
        parent.mkdir(parents=True, exist_ok=True)
        _build(tmp, layout, key_projections, weights)
        renaming = True
        os.rename(tmp, path)  # atomic; replaces an empty directory, fails on a non-empty one
    except OSError as exc:
        _remove_settled(tmp)
        if renaming and exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise _Raced() from exc
        raise StoreError(
            f"cannot create store {path}: {_reason(exc)}; nothing was created. Free space, fix permissions "
            "or choose another --out, then run the same command again"
        ) from exc
    except BaseException:
        _remove_settled(tmp)
        raise


def _build(path: Path, layout: StoreLayout, key_projections, weights=None) -> None:
    """Write an empty store (no slot) with ``layout`` at ``path``."""
    meta = {
        "format": fmt.FORMAT_NAME,
        "format_version": fmt.FORMAT_VERSION,
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "created_with": library_versions(),
        "integrity": fmt.INTEGRITY,
        "layout": layout.to_json(),
    }
    if layout.self_attention or fmt.is_real_image_layout(layout):  # stores without the 2.1 additions stay minor 0 (no key)
        meta["format_minor_version"] = fmt.FORMAT_MINOR_VERSION
    meta[fmt.LAYOUT_CHECKSUM] = fmt.layout_checksum(meta["layout"])
    root = zarr.open_group(path, mode="w", zarr_format=3, attributes={"ovstore": meta})
    i = fmt.IMAGE_DIM
    checked = fmt.checked_codecs
    root.create_array(
        fmt.STATUS, shape=(0,), chunks=(1,), dtype="uint8",
        fill_value=fmt.STATUS_RESERVED, dimension_names=(i,), compressors=checked(),
    )
    for name in _PER_IMAGE_TEXT:
        root.create_array(name, shape=(0,), chunks=(1,), dtype=str, fill_value="",
                          dimension_names=(i,), compressors=checked())
    for name, (dtype, fill) in _PER_IMAGE_SCALARS.items():
        root.create_array(name, shape=(0,), chunks=(1,), dtype=dtype, fill_value=fill,
                          dimension_names=(i,), compressors=checked())
    root.create_array(
        fmt.TIMESTEPS, shape=(0, layout.n_steps), chunks=(1, layout.n_steps),
        dtype="float64", fill_value=np.nan, dimension_names=(i, fmt.STEP_DIM), compressors=checked(),
    )
    root.create_array(
        fmt.IMAGES, shape=(0, layout.height, layout.width, 3),
        chunks=(1, layout.height, layout.width, 3), dtype="uint8", fill_value=0,
        dimension_names=(i, "image_y", "image_x", "rgb"),
        compressors=fmt.query_codecs("zstd3"),
    )
    nb = len(layout.branches)
    if layout.context is not None:
        c = layout.context
        root.create_array(fmt.CONTEXT, shape=(0, nb, c.length, c.features), chunks=(1, nb, c.length, c.features),
                          dtype=c.dtype, fill_value=0.0, dimension_names=(i, "branch", "context_token", "text_channel"),
                          compressors=checked())
        root.create_array(fmt.CONTEXT_TOKEN_IDS, shape=(0, nb, c.length), chunks=(1, nb, c.length), dtype="int64",
                          fill_value=-1, dimension_names=(i, "branch", "context_token"), compressors=checked())
        if c.per_tokenizer:
            nt = len(c.tokenizers)
            root.create_array(fmt.CONTEXT_TOKENIZER_IDS, shape=(0, nb, nt, c.length), chunks=(1, nb, nt, c.length),
                              dtype="int64", fill_value=-1, dimension_names=(i, "branch", "tokenizer", "context_token"),
                              compressors=checked())
    if layout.conditioning:
        root.create_array(fmt.CONDITIONING, shape=(0, nb, layout.n_steps, layout.conditioning),
                          chunks=(1, nb, layout.n_steps, layout.conditioning), dtype=layout.query_dtype,
                          fill_value=0.0, dimension_names=(i, "branch", fmt.STEP_DIM, "conditioning_channel"),
                          compressors=checked())
    if fmt.is_real_image_layout(layout):
        root.create_array(fmt.SOURCE, shape=(0,), chunks=(1,), dtype=str, fill_value="",
                          dimension_names=(i,), compressors=checked())
        root.create_array(fmt.RECONSTRUCTIONS, shape=(0, layout.height, layout.width, 3),
                          chunks=(1, layout.height, layout.width, 3), dtype="uint8", fill_value=0,
                          dimension_names=(i, "image_y", "image_x", "rgb"), compressors=fmt.query_codecs("zstd3"))
        for name in (fmt.RECONSTRUCTION_PSNR, fmt.RECONSTRUCTION_MAE):
            root.create_array(name, shape=(0,), chunks=(1,), dtype="float64", fill_value=np.nan,
                              dimension_names=(i,), compressors=checked())
    if layout.self_attention:
        group = root.create_group(fmt.SELF_ATTENTION_GROUP)
        for h, w in layout.self_attention:  # one chunk per image: an image's matrix is read whole
            group.create_array(f"{h}x{w}", shape=(0, nb, h * w, h * w), chunks=(1, nb, h * w, h * w),
                               dtype="float16", fill_value=0.0, compressors=fmt.query_codecs(layout.codec),
                               dimension_names=(i, "branch", "query_pixel", "key_pixel"))
    if weights:
        _write_weights(root.create_group(fmt.WEIGHTS_GROUP), weights)
    layers = root.create_group(fmt.LAYERS_GROUP)
    for info in layout.layers:
        g = layers.create_group(info.name, attributes={"layer": info.to_json()})
        calls = fmt.query_chunk_steps(info, layout.n_steps, layout.query_dtype)
        inner = (1, 1, calls, info.heads, info.height, info.width, info.head_dim)
        shard = (1, nb, layout.n_steps, info.heads, info.height, info.width, info.head_dim)
        for kind in (fmt.QUERIES, *layout.layer_arrays):  # image keys and values are laid out as queries
            g.create_array(
                kind, shape=(0, *shard[1:]), chunks=inner, shards=shard,
                dtype=layout.query_dtype, fill_value=0.0,
                compressors=fmt.query_codecs(layout.codec),
                dimension_names=fmt.QUERY_DIM_NAMES,
            )
        if key_projections is not None:
            weight, bias = key_projections[info.name]
            _write_key_arrays(g, weight, bias)


def _key_array(value: np.ndarray | None, weight: np.ndarray, kind: str) -> np.ndarray:
    if kind == fmt.TO_K_WEIGHT:
        return np.asarray(weight, dtype=np.float32)
    return np.zeros(np.shape(weight)[0], np.float32) if value is None else np.asarray(value, np.float32)


def _write_key_arrays(group: zarr.Group, weight: np.ndarray, bias: np.ndarray | None) -> None:
    """(Re)write a layer's ``to_k`` weight and bias, every chunk written and checksummed."""
    w = _key_array(weight, weight, fmt.TO_K_WEIGHT)
    b = _key_array(bias, weight, fmt.TO_K_BIAS)
    with zarr.config.set(_DENSE):
        for name, data, dims in ((fmt.TO_K_WEIGHT, w, ("key_channel", "text_channel")),
                                 (fmt.TO_K_BIAS, b, ("key_channel",))):
            arr = group.create_array(name, shape=data.shape, chunks=data.shape, dtype="float32",
                                     fill_value=0.0, dimension_names=dims,
                                     compressors=fmt.checked_codecs(), overwrite=True)
            arr[...] = data


def weights_sha256(data: np.ndarray) -> str:
    """SHA-256 of a stored weight's float32 bytes and shape (compared on append)."""
    import hashlib

    a = np.ascontiguousarray(data, dtype=np.float32)
    return hashlib.sha256(repr(a.shape).encode() + a.tobytes()).hexdigest()


def _write_weights(group: zarr.Group, weights: Mapping[str, np.ndarray]) -> None:
    """Write each weight whole (float32, checksummed) with its SHA-256 as an attribute."""
    with zarr.config.set(_DENSE):
        for name, value in weights.items():
            data = np.asarray(value, dtype=np.float32)
            arr = group.create_array(name, shape=data.shape, chunks=data.shape or None, dtype="float32",
                                     fill_value=0.0, compressors=fmt.checked_codecs(),
                                     attributes={"sha256": weights_sha256(data)})
            arr[...] = data


def _check_weights(store: Store, weights: Mapping[str, np.ndarray]) -> None:
    """An append must come from the same text-side weights as the store's."""
    stored = store.weight_digests()
    for name, value in weights.items():
        if stored.get(name) != weights_sha256(value):
            raise IncompatibleStoreError(
                f"cannot append to {store.path}: the text-stream weight {name} differs from the store's (or is "
                "missing); this is another model. Capture into a new --out")


# ---------------------------------------------------------------------- lock
@contextlib.contextmanager
def store_lock(path: str | Path, *, timeout: float = 60.0) -> Iterator[None]:
    """Hold ``PATH/.ovstore.lock`` (created with O_EXCL) while adding slots to a store.

    A lock left by a process of this host that no longer runs is removed. A lock held
    longer than ``timeout`` seconds raises :class:`StoreLockedError` naming the holder.
    """
    lock = Path(path) / fmt.LOCK_FILE
    deadline = time.monotonic() + timeout
    me = {"pid": os.getpid(), "host": socket.gethostname(),
          "since": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _lock_holder(lock)
            if holder is None:  # stale, removed: try again at once
                continue
            if time.monotonic() >= deadline:
                raise StoreLockedError(
                    f"store {path} is locked by process {holder.get('pid')} on {holder.get('host')} since "
                    f"{holder.get('since')} (another capture or merge is adding images); wait for it, or delete "
                    f"{lock} if no such process runs"
                ) from None
            time.sleep(0.05)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        break
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            lock.unlink()


def _lock_holder(lock: Path) -> dict | None:
    """The lock's holder, or None after removing a stale lock (or when it vanished)."""
    try:
        text = lock.read_text(encoding="utf-8")
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return None
    except OSError:
        return {}
    try:
        holder = json.loads(text)
    except ValueError:  # killed between creating and filling it
        holder = {} if age < 5 else {"stale": True}
    stale = holder.get("stale") or (holder.get("host") == socket.gethostname()
                                    and isinstance(holder.get("pid"), int) and not _pid_alive(holder["pid"]))
    if not stale:
        return holder
    claimed = lock.with_name(f"{lock.name}.stale-{uuid.uuid4().hex[:8]}")
    with contextlib.suppress(OSError):  # only one process wins the rename
        os.rename(lock, claimed)
        claimed.unlink()
    return None


# ---------------------------------------------------------------------- errors
# describe_os_error lives in ovstore.outputs (shared by every command that writes files)
_reason = describe_os_error


@contextlib.contextmanager
def _os_errors(path: Path, hint: str = CAPTURE_HINT) -> Iterator[None]:
    """Disk full, read-only or permission failures as one clear error. The store stays
    valid: every zarr write is a rename of a complete temporary file, and a slot counts only
    once its completion marker is written."""
    try:
        yield
    except OSError as exc:
        raise StoreError(
            f"cannot write to store {path}: {_reason(exc)}. Complete images are intact; free space or fix "
            f"permissions, {hint.format(path=path)}"
        ) from exc

"""Writing maps: ``.npy`` for one attribution prompt, ``.zarr`` for many, PNG overlays."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import InvalidInputError
from ..outputs import Output, open_output, zarr_marker
from ..store import Store
from .config import MapConfig
from .text import Attribution, TextEncoder

if TYPE_CHECKING:
    import xarray as xr

    from .maps import MapBlock

__all__ = ["maps_template", "overlay_dir", "overlay_files", "save_maps", "write_block_budget", "write_context_maps_zarr",
           "write_maps_zarr", "write_overlays"]


def save_maps(maps: xr.DataArray, out: str | Path, *, overwrite: bool = False,
              inputs: Sequence[str | Path] = ()) -> Path:
    """Save maps by file suffix.

    ``.npy``: float32 ``(n_images, n_tokens, h, w)``, one attribution prompt only.
    ``.zarr``: an xarray Dataset (variable ``ovam_maps`` with every prompt and its
    coordinates), readable with ``xarray.open_zarr``.

    Written under the output discipline of :mod:`ovstore.outputs`: an existing ``out`` is
    replaced only when it holds maps and ``overwrite`` is given; never one of ``inputs``.
    """
    out = Path(out)
    if out.suffix not in (".npy", ".zarr"):
        raise InvalidInputError(f"--out {out}: use a .npy (one prompt) or .zarr (any number) file name")
    if out.suffix == ".npy" and len(np.unique(maps["prompt_index"].values)) != 1:
        raise InvalidInputError(
            f"{out} is a .npy file, which holds one attribution prompt; with several prompts "
            "write FILE.zarr instead"
        )
    inputs = [*inputs, *([maps.attrs["store"]] if "store" in maps.attrs else [])]
    target = open_output(out, "maps", kind="file" if out.suffix == ".npy" else "dir", inputs=inputs,
                         overwrite=overwrite)
    with target.writing(marker=False) as tmp:
        if out.suffix == ".npy":
            with open(tmp, "wb") as f:  # through write(): a short write raises its OSError (EFBIG, ENOSPC)
                np.save(_Writes(f), maps.values.astype(np.float32))
        else:
            ds = maps.to_dataset(name="ovam_maps")
            ds.attrs = {**maps.attrs, **zarr_marker("maps")}
            ds["ovam_maps"].attrs = {}
            ds.to_zarr(tmp, mode="w", zarr_format=3, consolidated=False)
    return target.path


class _Writes:
    """A file seen only through ``write``: numpy then writes in chunks with ``write`` (whose
    OSError carries the errno) instead of ``tofile`` (which reports a bare byte count)."""

    def __init__(self, file) -> None:
        self._file = file

    def write(self, data) -> int:
        return self._file.write(data)


def write_maps_zarr(
    store: Store | str | Path,
    attributions: Sequence[str | Attribution] | str,
    out: str | Path,
    *,
    images: Sequence[int] | None = None,
    config: MapConfig | None = None,
    text_encoder: TextEncoder | None = None,
    model: str | None = None,
    device: str = "cpu",
    progress: Callable[[int], None] | None = None,
    overwrite: bool = False,
    inputs: Sequence[str | Path] = (),
    skipped_damaged: Sequence[int] = (),
) -> Path:
    """Compute maps and stream them into ``out`` (a Zarr v3 xarray dataset), block by block.

    The same maps as :func:`~ovstore.analyze.compute_maps`, but memory holds one block of
    prompts on one image, whatever the number of prompts and images. The dataset is built
    in a hidden temporary beside ``out`` and published complete (:mod:`ovstore.outputs`:
    an existing ``out`` is replaced only when it holds maps and ``overwrite`` is given, never
    the store or another input). Open it with ``xarray.open_zarr(out)``. Chunks: one image ×
    up to ~2 MB of tokens. A background thread compresses and writes each block while the
    next is computed. ``skipped_damaged`` is recorded in the attrs (provenance).
    """
    import zarr

    from .maps import iter_map_blocks, prepare_run

    store, images, atts, plan = prepare_run(store, attributions, images=images, config=config,
                                            text_encoder=text_encoder, model=model, device=device)
    target = open_output(out, "maps", kind="dir", inputs=[store.path, *inputs], overwrite=overwrite)
    total = sum(a.n_tokens for a in atts)
    template = maps_template(store, images, atts, plan, skipped_damaged)
    with target.writing(kept=f"nothing was written there (an earlier {target.path.name} is unchanged)",
                        marker=False) as tmp:
        template.to_zarr(tmp, mode="w", zarr_format=3, consolidated=False, compute=False)
        array = zarr.open_array(tmp / "ovam_maps", mode="r+")
        budget = write_block_budget(plan)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ovstore-write") as writer:
            pending: Future[None] | None = None
            for block in iter_map_blocks(plan, images, atts, block_budget=budget):
                data = block.maps.detach().cpu().numpy()
                if pending is not None:
                    pending.result()  # at most one block waits to be written: memory stays bounded
                pending = writer.submit(_write_block, array, block, data, total, progress)
            if pending is not None:
                pending.result()
    return target.path


#: Blocks of at most this many bytes when streaming to Zarr, so that a block is compressed
#: and written in a background thread while the next one is computed.
_WRITE_BLOCK_BUDGET = 64 * 2**20


def write_block_budget(plan) -> int:
    """Bytes per block of maps written to Zarr (the same in-process and on Dask workers, so
    both compute the same blocks)."""
    return min(plan.config.block_budget, _WRITE_BLOCK_BUDGET)


def maps_template(store: Store, images: Sequence[int], atts: Sequence[Attribution], plan,
                  skipped_damaged: Sequence[int] = ()) -> xr.Dataset:
    """The lazy (all-zero) dataset of maps over ``images`` × the tokens of ``atts``: its
    coordinates, attributes and chunks (one image × up to ~2 MB of tokens), written with
    ``to_zarr(compute=False)`` before the blocks."""
    import dask.array as da
    import xarray as xr

    from .. import dims
    from .maps import map_attrs, map_coords

    total = sum(a.n_tokens for a in atts)
    height, width = plan.size
    token_chunk = int(min(total, max(1, 2**21 // (4 * height * width))))
    template = xr.DataArray(
        da.zeros((len(images), total, height, width), chunks=(1, token_chunk, height, width), dtype=np.float32),
        dims=(dims.IMAGE, dims.TOKEN, dims.Y, dims.X), coords=map_coords(store, images, atts), name="ovam_maps",
    ).to_dataset()
    template.attrs = {**map_attrs(store, plan), "skipped_damaged_images": [int(i) for i in skipped_damaged],
                      **zarr_marker("maps")}
    return template


def _write_block(array, block: MapBlock, data: np.ndarray, total: int,
                 progress: Callable[[int], None] | None) -> None:
    array[block.position, block.tokens] = data
    if progress is not None and block.tokens.stop == total:
        progress(block.image)


def write_context_maps_zarr(
    store: Store | str | Path,
    out: str | Path,
    *,
    images: Sequence[int] | None = None,
    config: MapConfig | None = None,
    device: str = "cpu",
    tokenizer: object | None = None,
    tokenizers: Sequence[object] | None = None,
    progress: Callable[[int], None] | None = None,
    overwrite: bool = False,
    inputs: Sequence[str | Path] = (),
    block_images: int | None = None,
    skipped_damaged: Sequence[int] = (),
) -> Path:
    """Generation-context maps (:func:`~ovstore.analyze.compute_context_maps`) streamed into
    ``out``, a Zarr v3 xarray dataset, one block of images at a time.

    ``xarray.open_zarr(out)["ovam_maps"]`` equals the in-memory result: dims ``(image, token,
    y, x)``, the per-image ``token_id``/``token_str`` (and ``token_id_2``/``token_str_2`` when
    the store keeps its second tokenizer's ids) as ``(image, token)`` coordinates. Memory holds
    one block of ``block_images`` images (default: about 64 MB of maps) and the block being
    written, whatever the number of images. Built in a hidden temporary beside ``out`` and
    published complete (:mod:`ovstore.outputs`): an interrupted write publishes nothing.
    Chunks: maps one image × up to ~2 MB of tokens; token coordinates one block of images.
    ``skipped_damaged`` is recorded in the attrs (provenance).
    """
    import dask.array as da
    import xarray as xr
    import zarr

    from .. import dims
    from .context import _ContextRun, _context_attrs, _iter_context_maps, context_coords, context_token_coords

    run = _ContextRun(store, images, config, device, tokenizer, tokenizers)
    target = open_output(out, "maps", kind="dir", inputs=[run.store.path, *inputs], overwrite=overwrite)
    n, length, (height, width) = len(run.images), run.length, run.plan.size
    per_image = 4 * length * height * width
    if block_images is None:
        block_images = max(1, _WRITE_BLOCK_BUDGET // per_image)
    block_images = int(min(max(1, int(block_images)), n))
    token_chunk = int(min(length, max(1, 2**21 // (4 * height * width))))
    names = context_token_coords(run.tokenizer_names)
    coords = context_coords(run.store, run.images, length)
    for id_name, _ in names:  # written block by block, like the maps
        coords[id_name] = ((dims.IMAGE, dims.TOKEN), da.full((n, length), -1, chunks=(block_images, length),
                                                             dtype=np.int64))
    template = xr.DataArray(
        da.zeros((n, length, height, width), chunks=(1, token_chunk, height, width), dtype=np.float32),
        dims=(dims.IMAGE, dims.TOKEN, dims.Y, dims.X), coords=coords, name="ovam_maps",
    ).to_dataset()
    template.attrs = {**_context_attrs(run), "skipped_damaged_images": [int(i) for i in skipped_damaged],
                      **zarr_marker("maps")}
    with target.writing(kept=f"nothing was written there (an earlier {target.path.name} is unchanged)",
                        marker=False) as tmp:
        template.to_zarr(tmp, mode="w", zarr_format=3, consolidated=False, compute=False)
        group = zarr.open_group(tmp, mode="r+", zarr_format=3)
        maps = group["ovam_maps"]
        for _, str_name in names:  # variable-length strings, created here so nothing is held for all images
            group.create_array(str_name, shape=(n, length), chunks=(block_images, length), dtype=str,
                               fill_value="", dimension_names=(dims.IMAGE, dims.TOKEN))
        maps.attrs["coordinates"] = " ".join([*str(maps.attrs.get("coordinates", "")).split(),
                                              *(str_name for _, str_name in names)])
        arrays = [(group[i], group[s]) for i, s in names]
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ovstore-write") as writer:
            pending: Future[None] | None = None
            block: list = []
            for item in _iter_context_maps(run):
                block.append(item)
                if len(block) == block_images or item.position == n - 1:
                    if pending is not None:
                        pending.result()  # at most one block waits to be written: memory stays bounded
                    pending = writer.submit(_write_context_block, maps, arrays, block, progress)
                    block = []
            if pending is not None:
                pending.result()
    return target.path


def _write_context_block(maps, arrays, block: Sequence, progress: Callable[[int], None] | None) -> None:
    """One block of consecutive images: their maps and per-image token coordinates."""
    rows = slice(block[0].position, block[-1].position + 1)
    maps[rows] = np.stack([item.maps for item in block])
    for k, (ids, strings) in enumerate(arrays):
        ids[rows] = np.stack([item.token_ids[k] for item in block])
        strings[rows] = np.array([item.token_str[k] for item in block], dtype=object)
    if progress is not None:
        for item in block:
            progress(item.image)


def overlay_dir(path: str | Path, *, overwrite: bool = False, inputs: Sequence[str | Path] = ()) -> Output:
    """The checked ``--png`` folder (refused before any work when it must not be written)."""
    return open_output(path, "maps --png", kind="dir", inputs=inputs, overwrite=overwrite, option="--png")


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text.replace("</w>", "")).strip("_") or "token"


def write_overlays(maps: xr.DataArray, image_of: Callable[[int], np.ndarray], out_dir: str | Path,
                   *, overwrite: bool = False, inputs: Sequence[str | Path] = (), **style) -> list[Path]:
    """:func:`overlay_files` into the folder ``out_dir``, built aside and published complete
    (an existing folder is replaced only when it holds overlays and ``overwrite`` is given)."""
    target = overlay_dir(out_dir, overwrite=overwrite, inputs=inputs)
    with target.writing() as tmp:
        names = [p.name for p in overlay_files(maps, image_of, tmp, **style)]
    return [target.path / n for n in names]


def overlay_files(maps: xr.DataArray, image_of: Callable[[int], np.ndarray], out_dir: str | Path,
                  *, all_tokens: bool = False, cmap: str | None = None, min_size: int | None = None) -> list[Path]:
    """One map sheet per image and attribution prompt, and one picture per word shown in it,
    written into the existing folder ``out_dir`` (drawn by :mod:`ovstore.pictures`).

    A sheet shows the image and one tile per word (sub-tokens joined) on one colour scale
    shared by its tiles, with a labelled colour bar; start/end-of-text, padding and filler
    words are left out unless ``all_tokens``. Files: ``{image:05d}_p{prompt:03d}.png`` (the
    sheet) and ``{image:05d}_p{prompt:03d}_t{pos:02d}_{word}.png`` (one word, on its sheet's
    scale; ``pos`` is the position of the word's first token).
    """
    from .. import pictures

    style = {"all_tokens": all_tokens}
    if cmap is not None:
        style["cmap"] = cmap
    if min_size is not None:
        style["min_size"] = min_size
    out_dir = Path(out_dir)
    written = []
    for image, k, sheet, singles in pictures.prompt_sheets(maps, image_of, **style):
        for tile, single in singles:
            written.append(single.save(out_dir / f"{image:05d}_p{k:03d}_t{tile.position:02d}_{_safe(tile.label)}.png"))
        written.append(sheet.save(out_dir / f"{image:05d}_p{k:03d}.png"))
    return written

"""Writing maps: ``.npy`` for one attribution prompt, ``.zarr`` for many, PNG overlays."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import InvalidInputError, StoreError
from ..store.reader import Store
from ..store.writer import describe_os_error
from .config import MapConfig
from .text import Attribution, TextEncoder

if TYPE_CHECKING:
    import xarray as xr

    from .maps import MapBlock

__all__ = ["overlay_dir", "save_maps", "write_maps_zarr", "write_overlays"]


def save_maps(maps: xr.DataArray, out: str | Path) -> Path:
    """Save maps by file suffix.

    ``.npy``: float32 ``(n_images, n_tokens, h, w)``, one attribution prompt only.
    ``.zarr``: an xarray Dataset (variable ``ovam_maps`` with every prompt and its
    coordinates), readable with ``xarray.open_zarr``.
    """
    out = Path(out)
    if out.suffix == ".npy":
        if len(np.unique(maps["prompt_index"].values)) != 1:
            raise InvalidInputError(
                f"{out} is a .npy file, which holds one attribution prompt; with several prompts "
                "write FILE.zarr instead"
            )
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".partial.npy")
        np.save(tmp, maps.values.astype(np.float32))
        tmp.replace(out)
        return out
    if out.suffix == ".zarr":
        ds = maps.to_dataset(name="ovam_maps")
        ds.attrs = {k: v for k, v in maps.attrs.items()}
        ds["ovam_maps"].attrs = {}
        ds.to_zarr(out, mode="w", zarr_format=3, consolidated=False)
        return out
    raise InvalidInputError(f"--out {out}: use a .npy (one prompt) or .zarr (any number) file name")


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
) -> Path:
    """Compute maps and stream them into ``out`` (a Zarr v3 xarray dataset), block by block.

    The same maps as :func:`~ovstore.analyze.compute_maps`, but memory holds one block of
    prompts on one image, whatever the number of prompts and images. The dataset is
    written to ``OUT.partial`` and renamed when complete, so ``out`` is never half-written;
    open it with ``xarray.open_zarr(out)``. Chunks: one image × up to ~2 MB of tokens. A
    background thread compresses and writes each block while the next is computed.
    """
    import shutil

    import dask.array as da
    import xarray as xr
    import zarr

    from .. import dims
    from .maps import iter_map_blocks, map_attrs, map_coords, prepare_run

    out = Path(out)
    store, images, atts, plan = prepare_run(store, attributions, images=images, config=config,
                                            text_encoder=text_encoder, model=model, device=device)
    total = sum(a.n_tokens for a in atts)
    height, width = plan.size
    token_chunk = int(min(total, max(1, 2**21 // (4 * height * width))))
    template = xr.DataArray(
        da.zeros((len(images), total, height, width), chunks=(1, token_chunk, height, width), dtype=np.float32),
        dims=(dims.IMAGE, dims.TOKEN, dims.Y, dims.X), coords=map_coords(store, images, atts), name="ovam_maps",
    ).to_dataset()
    template.attrs = map_attrs(store, plan)
    partial = out.with_name(out.name + ".partial")
    try:
        if partial.exists():
            shutil.rmtree(partial)
        template.to_zarr(partial, mode="w", zarr_format=3, consolidated=False, compute=False)
        array = zarr.open_array(partial / "ovam_maps", mode="r+")
        budget = min(plan.config.block_budget, _WRITE_BLOCK_BUDGET)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ovstore-write") as writer:
            pending: Future[None] | None = None
            for block in iter_map_blocks(plan, images, atts, block_budget=budget):
                data = block.maps.detach().cpu().numpy()
                if pending is not None:
                    pending.result()  # at most one block waits to be written: memory stays bounded
                pending = writer.submit(_write_block, array, block, data, total, progress)
            if pending is not None:
                pending.result()
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        partial.rename(out)
    except OSError as exc:
        shutil.rmtree(partial, ignore_errors=True)
        raise StoreError(f"cannot write maps to {out}: {describe_os_error(exc)}; nothing was written there, "
                         "free space or fix permissions and run the command again") from exc
    return out


#: Blocks of at most this many bytes when streaming to Zarr, so that a block is compressed
#: and written in a background thread while the next one is computed.
_WRITE_BLOCK_BUDGET = 64 * 2**20


def _write_block(array, block: MapBlock, data: np.ndarray, total: int,
                 progress: Callable[[int], None] | None) -> None:
    array[block.position, block.tokens] = data
    if progress is not None and block.tokens.stop == total:
        progress(block.image)


def overlay_dir(path: str | Path) -> Path:
    """The folder for PNG overlays, created; a clear error if ``path`` is a file."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InvalidInputError(f"--png {path} is a file; give a folder for the overlays")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text.replace("</w>", "")).strip("_") or "token"


def write_overlays(maps: xr.DataArray, image_of: Callable[[int], np.ndarray], out_dir: str | Path,
                   *, cmap: str = "jet", alpha: float = 0.5, min_size: int = 128) -> list[Path]:
    """Per-token heat-map overlays and one labelled sheet per image and prompt.

    Maps are upsampled bilinearly to the image size and divided by their maximum (the
    reference's display convention). Files: ``{image:05d}_p{prompt:03d}_t{pos:02d}_{token}.png``
    and ``{image:05d}_p{prompt:03d}.png`` (the sheet). Images smaller than ``min_size`` are
    enlarged (nearest neighbour) so that small models' pictures stay legible.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch
    from PIL import Image

    from .engine import resize_maps

    out_dir = overlay_dir(out_dir)
    colormap = matplotlib.colormaps[cmap]
    written = []
    prompt_index = maps["prompt_index"].values
    for i, image in enumerate(maps["image"].values):
        rgb = image_of(int(image))
        factor = max(1, -(-min_size // max(rgb.shape[:2])))
        rgb = np.repeat(np.repeat(rgb, factor, axis=0), factor, axis=1)
        h, w = rgb.shape[:2]
        data = torch.from_numpy(np.ascontiguousarray(maps.isel(image=i).values))  # one image (lazy arrays)
        up = resize_maps(data, (h, w)).numpy()
        for k in np.unique(prompt_index):
            cols = np.flatnonzero(prompt_index == k)
            tiles = []
            for col in cols:
                m = up[col]
                m = m / m.max() if m.max() > 0 else m
                heat = (colormap(np.clip(m, 0, 1))[..., :3] * 255).astype(np.float32)
                blend = ((1 - alpha) * rgb.astype(np.float32) + alpha * heat).round().astype(np.uint8)
                token = str(maps["token_str"].values[col])
                pos = int(maps["position"].values[col])
                path = out_dir / f"{int(image):05d}_p{int(k):03d}_t{pos:02d}_{_safe(token)}.png"
                Image.fromarray(blend).save(path)
                written.append(path)
                tiles.append((token.replace("</w>", ""), blend))
            n = len(tiles) + 1
            fig, axes = plt.subplots(1, n, figsize=(1.6 * n, 1.9), dpi=100)
            axes[0].imshow(rgb)
            axes[0].set_title("image", fontsize=7)
            for ax, (label, tile) in zip(axes[1:], tiles):
                ax.imshow(tile)
                ax.set_title(label, fontsize=7)
            for ax in axes:
                ax.axis("off")
            fig.suptitle(str(maps["prompt"].values[cols[0]])[:80], fontsize=8)
            sheet = out_dir / f"{int(image):05d}_p{int(k):03d}.png"
            fig.savefig(sheet, bbox_inches="tight")
            plt.close(fig)
            written.append(sheet)
    return written

"""Pictures the viewer sends, drawn by :mod:`ovstore.pictures` (the code of ``maps --png``):
map sheets of a token or of every word, the stored image, and label previews; as PNG bytes."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np

from .. import pictures
from .service import MapResult

__all__ = ["image_png", "label_png", "map_png", "png_bytes"]


def png_bytes(pixels: np.ndarray) -> bytes:
    """``(H, W, 3)`` uint8 pixels as PNG bytes."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8)).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _label(result: MapResult, k: int) -> str:
    token = result.tokens[k]
    return token[:-4] if token.endswith("</w>") else token


def map_png(result: MapResult, rgb: np.ndarray, *, position: int = 0, token: int | None = None,
            all_tokens: bool = False, min_size: int = pictures.MIN_TILE) -> bytes:
    """The overlay sheet of image ``result.images[position]``: one token (``token``), else every
    word (every token with ``all_tokens``), on the colour scale ``maps --png`` uses: the share of
    each pixel's attention, from 0 to the largest value of the words shown."""
    values = result.maps[position].astype(np.float64) / result.divisor
    shown = [k for k, kind in enumerate(result.kinds) if all_tokens or kind in ("word", "learned")]
    if not shown:
        shown = list(range(len(result.kinds)))
    vmax = max(float(values[k].max()) for k in shown)
    chosen = [token] if token is not None else shown
    if token is not None and token not in shown:
        vmax = float(values[token].max())
    tiles = [pictures.MapTile(label=_label(result, k), values=values[k], kind=result.kinds[k], prompt=result.text,
                              position=k) for k in chosen]
    image = result.images[position]
    what = f"{tiles[0].label} of " if token is not None else "maps of "
    if result.share:
        description = "share of each pixel's attention (softmax over the prompt's tokens, mean over every head, call and layer)"
    else:
        description = "map value (raw)"
    sheet = pictures.map_sheet([pictures.SheetRow(rgb, tiles)], title=f'{what}"{result.text}" on image {image}',
                               values=description, vmax=vmax, min_size=min_size)
    return png_bytes(sheet.pixels)


def image_png(rgb: np.ndarray, *, min_size: int = 0) -> bytes:
    """The stored image, enlarged by a whole factor (nearest neighbour) to ``min_size``."""
    factor = pictures.upscale_factor(rgb.shape, min_size) if min_size else 1
    return png_bytes(pictures.upscale(rgb, factor))


def label_png(rgb: np.ndarray, labels: np.ndarray, classes: Sequence[str], *, title: str = "") -> bytes:
    """The image beside its label mask in the VOC palette ``ovstore label`` writes, with the legend."""
    from ..label import voc_palette

    sheet = pictures.label_sheet([(rgb, labels, "")], ("background", *classes), voc_palette(), title=title)
    return png_bytes(sheet.pixels)

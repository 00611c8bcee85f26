"""Reading annotation masks for token optimization."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import InvalidInputError

__all__ = ["load_mask"]


def load_mask(path: str | Path | np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A binary mask resized (nearest) to ``size = (height, width)``.

    Any size with the image's aspect ratio works (another aspect ratio is refused: the mask
    was not drawn on this image). Any image mode works: a pixel belongs to the class when its brightest channel is above half of the
    mask's maximum, so 0/1 and 0/255 masks both work and the soft fringe of an anti-aliased
    or JPEG-compressed mask does not count as foreground. Raises a one-line error for
    unreadable or empty masks.
    """
    if isinstance(path, np.ndarray):
        array = np.asarray(path)
        name = "the mask array"
    else:
        from PIL import Image, UnidentifiedImageError

        name = str(path)
        try:
            with Image.open(path) as image:
                image.load()
                array = np.asarray(image.convert("RGBA") if image.mode in ("P", "PA") else image)
        except FileNotFoundError:
            raise InvalidInputError(f"mask {name} does not exist") from None
        except (UnidentifiedImageError, OSError) as exc:
            raise InvalidInputError(f"mask {name} is not a readable image ({exc}); save it as PNG") from None
    if array.dtype.kind not in "biuf":
        raise InvalidInputError(f"{name} has dtype {array.dtype}; a mask is boolean, integer or float (0 = "
                                "background, larger = the class)")
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        bad = int(array.size - np.count_nonzero(np.isfinite(array)))
        raise InvalidInputError(f"{name} holds {bad} NaN or Inf values; a mask needs finite values (0 = "
                                "background, larger = the class)")
    if array.dtype.kind in "if" and array.size and float(array.min()) < 0:
        raise InvalidInputError(f"{name} has negative values (min {float(array.min()):g}); a mask holds 0 for "
                                "background and positive values for the class")
    if array.ndim == 3:
        array = array[..., :3].max(axis=-1) if array.shape[-1] in (3, 4) else array.max(axis=-1)
    if array.ndim != 2:
        raise InvalidInputError(f"{name} has shape {array.shape}; expected a 2-D mask image")
    array = array.astype(np.float32)
    peak = float(array.max()) if array.size else 0.0
    binary = array > peak / 2 if peak > 0 else np.zeros(array.shape, dtype=bool)
    h, w = binary.shape
    if abs(h / w - size[0] / size[1]) > 0.01 * size[0] / size[1]:  # "the wrong size": not just a scale
        raise InvalidInputError(
            f"{name} is {w}x{h} but the image is {size[1]}x{size[0]} (another aspect ratio); "
            "draw the mask on the stored image (ovstore images STORE --out DIR)"
        )
    if binary.shape != tuple(size):
        from PIL import Image

        resized = Image.fromarray(binary.astype(np.uint8) * 255).resize((size[1], size[0]), Image.NEAREST)
        binary = np.asarray(resized) > 127
    if not binary.any():
        raise InvalidInputError(f"{name} is empty (no foreground pixel at {size[0]}x{size[1]}); "
                                "mark the object with non-zero pixels")
    if binary.all():
        raise InvalidInputError(f"{name} covers the whole image; a mask needs background pixels too")
    return binary

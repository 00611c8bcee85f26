"""Writers of the standard outputs: VOC-style label PNGs and COCO RLE annotations."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["voc_palette", "write_labelmap", "write_label_png", "write_jpeg", "rle_annotations",
           "write_json_atomic", "read_labelmap"]


def voc_palette(n: int = 256) -> list[int]:
    """The PASCAL VOC colour map (bit-interleaved), flattened RGB; 255 = ignore (white-ish)."""
    palette = []
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    palette[255 * 3:255 * 3 + 3] = [224, 224, 192]
    return palette


def write_labelmap(path: Path, classes: Sequence[str]) -> None:
    """``labelmap.txt`` in the VOC export format read by CVAT and others."""
    palette = voc_palette()
    lines = ["# label:color_rgb:parts:actions"]
    for k, name in enumerate(["background", *classes]):
        r, g, b = palette[3 * k:3 * k + 3]
        lines.append(f"{name}:{r},{g},{b}::")
    _write_text_atomic(path, "\n".join(lines) + "\n")


def read_labelmap(path: Path) -> list[str]:
    """Class names of a ``labelmap.txt`` (background first)."""
    names = []
    for line in Path(path).read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            names.append(line.split(":", 1)[0])
    return names


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.partial{path.suffix}")


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = _tmp(path)
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json_atomic(path: Path, data: Any) -> None:
    _write_text_atomic(path, json.dumps(data, indent=1, sort_keys=True))


def write_label_png(path: Path, labels: np.ndarray) -> None:
    """Palette-indexed PNG: pixel values are class indices (VOC ``SegmentationClass``)."""
    from PIL import Image

    image = Image.fromarray(labels.astype(np.uint8), mode="P")
    image.putpalette(voc_palette())
    tmp = _tmp(path)
    image.save(tmp, format="PNG")
    os.replace(tmp, path)


def write_jpeg(path: Path, rgb: np.ndarray) -> None:
    from PIL import Image

    tmp = _tmp(path)
    Image.fromarray(rgb).save(tmp, format="JPEG", quality=95)
    os.replace(tmp, path)


def rle_annotations(labels: np.ndarray, image_id: int, n_classes: int) -> list[dict[str, Any]]:
    """One COCO annotation per class present: compressed RLE of its semantic segment."""
    from pycocotools import mask as mask_utils

    out = []
    for k in range(1, n_classes + 1):
        binary = labels == k
        if not binary.any():
            continue
        rle = mask_utils.encode(np.asfortranarray(binary.astype(np.uint8)))
        out.append({
            "image_id": int(image_id),
            "category_id": k,
            "segmentation": {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")},
            "area": float(mask_utils.area(rle)),
            "bbox": [float(v) for v in mask_utils.toBbox(rle)],
            "iscrowd": 0,
        })
    return out

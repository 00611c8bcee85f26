"""Writers of the standard outputs: VOC-style label PNGs and COCO RLE annotations."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InvalidInputError
from ..outputs import MARKER, write_atomically, write_json_atomic, write_marker, write_text_atomic

__all__ = ["voc_palette", "write_labelmap", "write_label_png", "write_label_tree", "write_jpeg", "rle_annotations",
           "write_json_atomic", "write_text_atomic", "read_labelmap", "remove_partials", "write_coco_from_records",
           "voc_paths", "prepare_voc_output"]


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
    write_text_atomic(path, "\n".join(lines) + "\n")


def read_labelmap(path: Path) -> list[str]:
    """Class names of a ``labelmap.txt`` (background first; a name ends at its first ':')."""
    from ..inputs import read_lines

    names = [line.text.split(":", 1)[0].strip() for line in read_lines(path, "labelmap")]
    if not names or any(not n for n in names):
        raise InvalidInputError(f"labelmap {path} has an empty class name or none; write NAME:R,G,B:: lines "
                                "(background first)")
    return names


PARTIAL = ".partial"


def remove_partials(folder: Path) -> list[Path]:
    """Delete temporaries left in ``folder`` by a killed writer (this and older versions)."""
    removed = []
    if folder.is_dir():
        for entry in os.scandir(folder):
            if entry.is_file() and entry.name.startswith(".") and PARTIAL in entry.name:
                os.unlink(entry.path)
                removed.append(Path(entry.path))
    return removed


def write_label_png(path: Path, labels: np.ndarray) -> None:
    """Palette-indexed PNG: pixel values are class indices (VOC ``SegmentationClass``)."""
    from PIL import Image

    image = Image.fromarray(labels.astype(np.uint8), mode="P")
    image.putpalette(voc_palette())
    write_atomically(path, lambda tmp: image.save(tmp, format="PNG"))


def write_label_tree(root: Path, classes: Sequence[str], labels: Mapping[int, np.ndarray]) -> Path:
    """A fresh ground-truth folder that ``evaluate_dirs`` reads: ``root/labelmap.txt`` and one
    ``SegmentationClass/NNNNN.png`` per image of ``labels`` (image index -> class-index array);
    whatever ``root`` held is removed first. Returns ``root``."""
    import shutil

    root = Path(root)
    shutil.rmtree(root, ignore_errors=True)
    (root / "SegmentationClass").mkdir(parents=True)
    write_labelmap(root / "labelmap.txt", classes)
    for image, label in labels.items():
        write_label_png(root / "SegmentationClass" / f"{image:05d}.png", label)
    return root


def write_jpeg(path: Path, rgb: np.ndarray) -> None:
    from PIL import Image

    write_atomically(path, lambda tmp: Image.fromarray(rgb).save(tmp, format="JPEG", quality=95))


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


def write_coco_from_records(out: Path, classes: Sequence[str], info: Mapping[str, Any]) -> Path:
    """``annotations.json`` (COCO) and the image lists of a VOC tree from every finished image's
    record in ``out/records`` (``{"image": ..., "annotations": [...]}`` each, written last by the
    labeller); annotation ids are numbered across images. Returns the COCO file's path."""
    import json

    finished = sorted(int(p.stem) for p in (out / "records").glob("*.json") if p.stem.isdigit())
    coco_images, annotations = [], []
    for image in finished:
        record = json.loads((out / "records" / f"{image:05d}.json").read_text())
        coco_images.append(record["image"])
        for ann in record["annotations"]:
            annotations.append({**ann, "id": len(annotations) + 1})
    coco = {"info": dict(info), "licenses": [], "images": coco_images, "annotations": annotations,
            "categories": [{"id": k + 1, "name": c, "supercategory": "object"} for k, c in enumerate(classes)]}
    path = out / "annotations.json"
    write_json_atomic(path, coco)
    listing = "".join(f"{i:05d}\n" for i in finished)
    for name in ("default.txt", "train.txt"):
        write_text_atomic(out / "ImageSets" / "Segmentation" / name, listing)
    return path


def voc_paths(out: Path) -> dict[str, Path]:
    """The folders of a labelling output: the VOC tree's images, label PNGs and image sets, and
    the per-image records that say which images are finished."""
    return {"jpeg": out / "JPEGImages", "png": out / "SegmentationClass", "sets": out / "ImageSets" / "Segmentation",
            "records": out / "records"}


def prepare_voc_output(out: Path, command: str, settings_file: str, settings: Mapping[str, Any],
                       classes: Sequence[str], *, other: str) -> dict[str, Path]:
    """Create a labelling output ``out`` of ``ovstore COMMAND``, or reopen one to resume: its
    marker and folders, ``settings`` recorded in ``settings_file`` (a folder holding other
    settings, described by ``other``, is refused), the temporaries of a killed run removed and
    ``labelmap.txt`` written. Call it with ``out`` locked. Returns :func:`voc_paths`."""
    paths = voc_paths(out)
    if not (out / MARKER).exists():
        out.mkdir(parents=True, exist_ok=True)
        write_marker(out, command)
    for p in paths.values():
        p.mkdir(parents=True, exist_ok=True)
    recorded = out / settings_file
    if recorded.exists():
        if json.loads(recorded.read_text()) != settings:
            raise InvalidInputError(f"{out} holds a labelling with {other} ({settings_file}); re-run the same "
                                    "command to resume it, or choose a new --out")
    else:
        write_json_atomic(recorded, settings)
    for folder in (out, *paths.values(), paths["sets"].parent):
        remove_partials(folder)  # left by a killed run; nothing else writes here now
    write_labelmap(out / "labelmap.txt", classes)
    return paths

"""Evaluation of label masks against ground truth, with the OVAM paper's protocol:
intersections and unions summed per class over the whole set, then averaged over classes."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InvalidInputError
from .voc import read_labelmap

__all__ = ["EvaluationReport", "evaluate_masks", "evaluate_dirs", "evaluation_classes", "write_report"]

IGNORE = 255


@dataclass
class EvaluationReport:
    """Per-class figures from a confusion matrix.

    ``confusion[g, p]`` counts pixels of ground-truth class ``g`` predicted as ``p``;
    the last column counts predictions outside the class range (e.g. 255), which are
    misses but nobody's false positive. Pixels whose ground truth is 255 are ignored.
    """

    classes: list[str]
    confusion: np.ndarray
    n_images: int

    @property
    def n(self) -> int:
        return len(self.classes)

    def _tp_fp_fn(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        c = self.confusion[:, : self.n].astype(np.float64)
        tp = np.diag(c)
        fp = c.sum(0) - tp
        fn = self.confusion.sum(1) - tp
        return tp, fp, fn

    @property
    def present(self) -> np.ndarray:
        """Classes that occur in the ground truth or the predictions."""
        tp, fp, fn = self._tp_fp_fn()
        return (tp + fp + fn) > 0

    @property
    def iou(self) -> np.ndarray:
        tp, fp, fn = self._tp_fp_fn()
        return np.divide(tp, tp + fp + fn, out=np.full(self.n, np.nan), where=(tp + fp + fn) > 0)

    @property
    def precision(self) -> np.ndarray:
        tp, fp, _ = self._tp_fp_fn()
        return np.divide(tp, tp + fp, out=np.full(self.n, np.nan), where=(tp + fp) > 0)

    @property
    def recall(self) -> np.ndarray:
        tp, _, fn = self._tp_fp_fn()
        return np.divide(tp, tp + fn, out=np.full(self.n, np.nan), where=(tp + fn) > 0)

    @property
    def miou(self) -> float:
        """Mean IoU over present classes, background included (VOC convention)."""
        return float(np.nanmean(self.iou[self.present])) if self.present.any() else float("nan")

    @property
    def miou_foreground(self) -> float:
        """Mean IoU over present classes without background."""
        fg = self.present.copy()
        fg[0] = False
        return float(np.nanmean(self.iou[fg])) if fg.any() else float("nan")

    def to_json(self) -> dict[str, Any]:
        def clean(values: np.ndarray) -> list[float | None]:
            return [None if np.isnan(v) else float(v) for v in values]

        return {
            "protocol": "I and U summed per class over all images, then averaged over present classes",
            "n_images": self.n_images, "classes": self.classes, "miou": self.miou,
            "miou_foreground": self.miou_foreground, "iou": clean(self.iou),
            "precision": clean(self.precision), "recall": clean(self.recall),
            "ground_truth_pixels": [int(v) for v in self.confusion.sum(1)],
            "confusion": self.confusion.tolist(),
        }

    def to_markdown(self) -> str:
        def fmt(v: float) -> str:
            return "-" if np.isnan(v) else f"{v:.4f}"

        lines = [f"# Evaluation ({self.n_images} images)", "",
                 f"mIoU (background included): **{fmt(self.miou)}**; foreground mIoU: **{fmt(self.miou_foreground)}**",
                 "", "Protocol: intersections and unions summed per class over all images, then averaged "
                 "over the classes present in ground truth or predictions; ground-truth 255 ignored.", "",
                 "| class | IoU | precision | recall | GT pixels |", "|---|---:|---:|---:|---:|"]
        gt = self.confusion.sum(1)
        for k, name in enumerate(self.classes):
            lines.append(f"| {name} | {fmt(self.iou[k])} | {fmt(self.precision[k])} | {fmt(self.recall[k])} | {int(gt[k])} |")
        lines += ["", "Confusion matrix (pixels; rows: ground truth, columns: prediction; "
                  "'other': predicted values outside the classes, e.g. 255):", "",
                  "| ground truth \\ predicted | " + " | ".join([*self.classes, "other"]) + " |",
                  "|---|" + "---:|" * (self.n + 1)]
        for k, name in enumerate(self.classes):
            lines.append(f"| {name} | " + " | ".join(str(int(v)) for v in self.confusion[k]) + " |")
        return "\n".join(lines) + "\n"

    def plot(self, path: str | Path) -> Path:
        """Per-class IoU bars and the row-normalised confusion matrix, as PNG."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (a, b) = plt.subplots(1, 2, figsize=(4 + 0.5 * self.n, 3 + 0.25 * self.n))
        a.barh(self.classes, np.nan_to_num(self.iou))
        a.set_xlim(0, 1)
        a.set_xlabel("IoU")
        a.set_title(f"mIoU {self.miou:.3f}")
        a.invert_yaxis()
        rows = self.confusion[:, : self.n].astype(float)
        rows /= np.maximum(self.confusion.sum(1, keepdims=True), 1)
        b.imshow(rows, vmin=0, vmax=1, cmap="Blues")
        b.set_xticks(range(self.n), self.classes, rotation=90)
        b.set_yticks(range(self.n), self.classes)
        b.set_xlabel("predicted")
        b.set_ylabel("ground truth")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return Path(path)


def evaluate_masks(predictions: Iterable[np.ndarray], ground_truth: Iterable[np.ndarray],
                   classes: Sequence[str]) -> EvaluationReport:
    """Evaluate pairs of label masks (values: class indices, 0 background, 255 ignore)."""
    n = len(classes)
    confusion = np.zeros((n, n + 1), dtype=np.int64)
    count = 0
    for pred, gt in zip(predictions, ground_truth, strict=True):
        pred, gt = np.asarray(pred), np.asarray(gt)
        if pred.shape != gt.shape:
            raise InvalidInputError(f"prediction {pred.shape} and ground truth {gt.shape} differ in size")
        valid = gt != IGNORE
        g = gt[valid].astype(np.int64)
        if g.size and g.max() >= n:
            raise InvalidInputError(f"ground truth has class {int(g.max())} but only {n} classes are known; "
                                    "give the class list (labelmap.txt)")
        p = pred[valid].astype(np.int64)
        p = np.where(p < n, p, n)
        confusion += np.bincount(g * (n + 1) + p, minlength=n * (n + 1)).reshape(n, n + 1)
        count += 1
    return EvaluationReport(list(classes), confusion, count)


def _label_dir(path: Path) -> Path:
    return path / "SegmentationClass" if (path / "SegmentationClass").is_dir() else path


def evaluation_classes(classes: str | Sequence[str] | None = None,
                       labelmap: str | Path | None = None) -> list[str] | None:
    """Class names from 0 (background) for :func:`evaluate_dirs` (``ovstore evaluate``
    ``--classes``/``--labelmap``): comma-separated (or listed) names numbered from 1, or a
    ``labelmap.txt``; ``None`` when neither is given (the folders' labelmap.txt decides)."""
    if classes is not None and labelmap is not None:
        raise InvalidInputError("give --classes or --labelmap, not both")
    if classes is not None:
        from ..inputs import parse_names

        return ["background", *(parse_names(classes, "--classes") if isinstance(classes, str) else classes)]
    if labelmap is not None:
        return read_labelmap(Path(labelmap))
    return None


def evaluate_dirs(pred_dir: str | Path, gt_dir: str | Path, *, classes: Sequence[str] | None = None) -> EvaluationReport:
    """Evaluate label PNGs of ``pred_dir`` against ``gt_dir`` (matched by file name).

    Either may be a VOC tree (``SegmentationClass/`` inside) or a folder of PNGs. Class
    names (background first) come from ``classes``, else the ``labelmap.txt`` beside the
    PNGs, else numbers. When both folders carry a ``labelmap.txt`` they must agree (the same
    index must mean the same class), and so must ``classes`` with each of them.
    """
    from PIL import Image

    pred_root, gt_root = Path(pred_dir), Path(gt_dir)
    for root in (pred_root, gt_root):
        if not root.is_dir():
            raise InvalidInputError(f"{root} is not a directory of label PNGs")
    preds, gts = _label_dir(pred_root), _label_dir(gt_root)
    gt_files = sorted(gts.glob("*.png"))
    if not gt_files:
        raise InvalidInputError(f"no PNG label files in {gts}")
    missing = [f.name for f in gt_files if not (preds / f.name).exists()]
    if missing:
        raise InvalidInputError(f"{len(missing)} ground-truth files have no prediction in {preds} "
                                f"(first: {missing[0]}); label those images or remove them from {gts}")
    labelmaps = {}
    for role, root, inner in (("prediction", pred_root, preds), ("ground truth", gt_root, gts)):
        for folder in dict.fromkeys((root, inner)):
            if (folder / "labelmap.txt").exists():
                labelmaps[role] = (folder / "labelmap.txt", read_labelmap(folder / "labelmap.txt"))
                break
    if len(labelmaps) == 2 and labelmaps["prediction"][1] != labelmaps["ground truth"][1]:
        (p_path, p_names), (g_path, g_names) = labelmaps["prediction"], labelmaps["ground truth"]
        raise InvalidInputError(f"the label maps disagree: {p_path} has {', '.join(p_names)} but {g_path} has "
                                f"{', '.join(g_names)}; relabel with the ground truth's classes in its order")
    if classes is not None:
        classes = list(classes)
        for path, names in labelmaps.values():
            if names != classes:
                raise InvalidInputError(f"the classes given ({', '.join(classes)}) disagree with {path} "
                                        f"({', '.join(names)})")
    elif labelmaps:
        classes = next(iter(labelmaps.values()))[1]
    if classes is None:
        top = max(int(np.asarray(Image.open(f))[np.asarray(Image.open(f)) != IGNORE].max(initial=0)) for f in gt_files)
        classes = ["background", *[str(k) for k in range(1, top + 1)]]

    def load(path: Path) -> np.ndarray:
        return np.asarray(Image.open(path))

    return evaluate_masks((load(preds / f.name) for f in gt_files), (load(f) for f in gt_files), classes)


def write_report(report: EvaluationReport, out: str | Path, *, overwrite: bool = False,
                 inputs: Sequence[str | Path] = ()) -> list[Path]:
    """``report.json``, ``report.md`` and ``report.png`` in the folder ``out``, published
    complete (an existing report folder is replaced only with ``overwrite``; never an input)."""
    from ..outputs import open_output

    target = open_output(out, "evaluate", kind="dir", inputs=inputs, overwrite=overwrite)
    with target.writing() as tmp:
        (tmp / "report.json").write_text(json.dumps(report.to_json(), indent=1))
        (tmp / "report.md").write_text(report.to_markdown())
        report.plot(tmp / "report.png")
    return [target.path / name for name in ("report.json", "report.md", "report.png")]

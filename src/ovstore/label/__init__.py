"""Dataset-scale labelling: class maps to semantic masks, refinements, VOC and COCO exports,
on Dask from a laptop to a cluster; and evaluation against ground truth."""

from .config import MODES, NORMALIZATIONS, LabelConfig, parse_sweep
from .dataset import LabelResult, image_labels, label_partition, label_store
from .evaluate import EvaluationReport, evaluate_dirs, evaluate_masks, write_report
from .refine import (
    adaptive_threshold, classes_in_prompt, crf_unary, dense_crf, label_mask, normalize_maps, remove_small_components,
    require_crf,
)

__all__ = [
    "EvaluationReport",
    "LabelConfig",
    "LabelResult",
    "MODES",
    "NORMALIZATIONS",
    "adaptive_threshold",
    "classes_in_prompt",
    "crf_unary",
    "dense_crf",
    "evaluate_dirs",
    "evaluate_masks",
    "image_labels",
    "label_mask",
    "label_partition",
    "label_store",
    "normalize_maps",
    "parse_sweep",
    "remove_small_components",
    "require_crf",
    "write_report",
]

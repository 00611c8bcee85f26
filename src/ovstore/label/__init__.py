"""Dataset-scale labelling: class maps to semantic masks, refinements, VOC and COCO exports,
on Dask from a laptop to a cluster; and evaluation against ground truth."""

from .config import MODES, LabelConfig
from .dataset import LabelResult, label_partition, label_store
from .evaluate import EvaluationReport, evaluate_dirs, evaluate_masks, write_report
from .refine import adaptive_threshold, classes_in_prompt, dense_crf, label_mask, remove_small_components

__all__ = [
    "EvaluationReport",
    "LabelConfig",
    "LabelResult",
    "MODES",
    "adaptive_threshold",
    "classes_in_prompt",
    "dense_crf",
    "evaluate_dirs",
    "evaluate_masks",
    "label_mask",
    "label_partition",
    "label_store",
    "remove_small_components",
    "write_report",
]

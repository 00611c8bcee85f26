"""Dataset-scale labelling: class maps to semantic masks, refinements, VOC and COCO exports,
on Dask from a laptop to a cluster; and evaluation against ground truth."""

from .config import (
    MODEL_DEFAULT_SETTINGS, MODES, NORMALIZATIONS, OVSTORE_DEFAULTS, SOURCES, LabelConfig, check_label_defaults,
    label_config, parse_class_thresholds, parse_class_words, parse_sweep,
)
from .class_maps import ClassAttributions, class_attributions, prompt_word_columns
from .dataset import LabelResult, image_labels, label_partition, label_store
from .evaluate import EvaluationReport, evaluate_dirs, evaluate_masks, evaluation_classes, write_report
from .voc import (
    prepare_voc_output, read_labelmap, remove_partials, rle_annotations, voc_palette, voc_paths,
    write_coco_from_records, write_jpeg, write_json_atomic, write_label_png, write_labelmap, write_text_atomic,
)
from .cluster import connect_scheduler
from .refine import (
    adaptive_threshold, classes_in_prompt, crf_unary, dense_crf, label_mask, normalize_maps, remove_small_components,
    require_crf,
)

__all__ = [
    "ClassAttributions",
    "EvaluationReport",
    "LabelConfig",
    "LabelResult",
    "MODEL_DEFAULT_SETTINGS",
    "MODES",
    "NORMALIZATIONS",
    "OVSTORE_DEFAULTS",
    "SOURCES",
    "adaptive_threshold",
    "check_label_defaults",
    "class_attributions",
    "classes_in_prompt",
    "connect_scheduler",
    "crf_unary",
    "dense_crf",
    "evaluate_dirs",
    "evaluate_masks",
    "evaluation_classes",
    "image_labels",
    "label_config",
    "label_mask",
    "label_partition",
    "label_store",
    "normalize_maps",
    "parse_class_thresholds",
    "parse_class_words",
    "parse_sweep",
    "prepare_voc_output",
    "prompt_word_columns",
    "read_labelmap",
    "remove_partials",
    "remove_small_components",
    "rle_annotations",
    "require_crf",
    "voc_palette",
    "voc_paths",
    "write_coco_from_records",
    "write_jpeg",
    "write_json_atomic",
    "write_label_png",
    "write_labelmap",
    "write_text_atomic",
    "write_report"]

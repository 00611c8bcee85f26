"""Grounding heads: a small segmentation head trained from stores (after Grounded Diffusion,
offline): stored queries of chosen layers and calls + a class word's text rows → a mask, for
class words seen in training or not. See :func:`train_head`, :func:`ground_maps`, :func:`apply_head`.
"""

from .apply import (
    GroundResult, apply_head, ground_maps, ground_partition, head_maps_path, head_selection, write_head_maps,
)
from .data import (
    DEFAULT_CACHE_BYTES, DEFAULT_TEMPLATE, TEXT_SOURCES, ClassText, FeatureReader, LabelFolder, Selection, class_rows,
    read_label_folder, select_layers,
)
from .headfile import HEAD_FORMAT, HeadFile, check_head_store, is_head_file, load_head, save_head
from .model import GroundHead, HeadSpec, LayerSpec
from .train import EpochReport, TrainConfig, TrainResult, checkpoint_path, mask_loss, train_head

__all__ = [
    "DEFAULT_CACHE_BYTES",
    "DEFAULT_TEMPLATE",
    "EpochReport",
    "FeatureReader",
    "GroundHead",
    "GroundResult",
    "HEAD_FORMAT",
    "HeadFile",
    "HeadSpec",
    "LabelFolder",
    "LayerSpec",
    "Selection",
    "TrainConfig",
    "TrainResult",
    "apply_head",
    "check_head_store",
    "checkpoint_path",
    "ClassText",
    "TEXT_SOURCES",
    "class_rows",
    "ground_maps",
    "ground_partition",
    "head_maps_path",
    "head_selection",
    "is_head_file",
    "load_head",
    "mask_loss",
    "read_label_folder",
    "save_head",
    "select_layers",
    "train_head",
    "write_head_maps",
]

"""The ovstore store: a versioned Zarr v3 layout of captured cross-attention queries.

Open one with :func:`open_store`; see ``docs/store-format.md`` for the format.
"""

from .format import (
    IMAGE_KEYS, IMAGE_OUTPUTS, IMAGE_VALUES, CODEC_PRESETS, DEFAULT_CODEC, FORMAT_VERSION, STATUS_COMPLETE, AnalysisDefaults,
    ContextSpec, ImageRecord, LayerInfo, ModelIdentity, StoreLayout, TextRecipe, analysis_defaults,
)
from .format import REAL_IMAGES, is_real_image_layout
from .integrity import Problem, VerifyReport, verify_store
from .merge import MergeResult, merge_stores
from .reader import Store, StoreSummary, open_store
from .writer import StoreWriter, library_versions

__all__ = [
    "AnalysisDefaults",
    "analysis_defaults",
    "IMAGE_KEYS",
    "IMAGE_VALUES",
    "REAL_IMAGES",
    "is_real_image_layout",
    "IMAGE_OUTPUTS",
    "CODEC_PRESETS",
    "DEFAULT_CODEC",
    "FORMAT_VERSION",
    "STATUS_COMPLETE",
    "ContextSpec",
    "TextRecipe",
    "ImageRecord",
    "LayerInfo",
    "ModelIdentity",
    "Store",
    "StoreLayout",
    "StoreSummary",
    "StoreWriter",
    "library_versions",
    "open_store",
    "Problem",
    "VerifyReport",
    "verify_store",
    "MergeResult",
    "merge_stores",
]

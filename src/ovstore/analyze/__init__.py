"""Analysis: OVAM maps for any attribution prompt from stored captures.

Loads only a tokenizer and a text encoder plus the stored key projections; never a UNet.
"""

from .config import MapConfig
from .context import compute_context_maps
from .engine import (
    PreparedQueries,
    TokenBuckets,
    combine_layers,
    layer_keys,
    layer_token_maps,
    normalize_maps,
    prepare_queries,
    resize_maps,
)
from .export import overlay_files, save_maps, write_maps_zarr, write_overlays
from .maps import MapPlan, compute_maps, iter_image_maps, iter_map_blocks, split_by_prompt
from .text import Attribution, TextEncoder, load_text_encoder
from .words import word_maps

__all__ = [
    "Attribution",
    "MapConfig",
    "MapPlan",
    "PreparedQueries",
    "TextEncoder",
    "TokenBuckets",
    "combine_layers",
    "compute_context_maps",
    "compute_maps",
    "iter_image_maps",
    "iter_map_blocks",
    "layer_keys",
    "layer_token_maps",
    "load_text_encoder",
    "normalize_maps",
    "prepare_queries",
    "resize_maps",
    "overlay_files",
    "save_maps",
    "write_maps_zarr",
    "write_overlays",
    "split_by_prompt",
    "word_maps",
]

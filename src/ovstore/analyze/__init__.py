"""Analysis: OVAM maps for any attribution prompt from stored captures.

Loads only a tokenizer and a text encoder plus the stored key projections; never a UNet.
"""

from .cache import QueryCache, prepared_bytes, set_query_cache, shared_query_cache
from .config import SPACES, MapConfig
from .context import (
    ContextRequest, ContextResult, check_context_request, compute_context_maps, context_map_config, per_image,
    write_context_maps,
)
from .display import display_maps, display_normalization
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
from .export import overlay_dir, overlay_files, save_maps, write_context_maps_zarr, write_maps_zarr, write_overlays
from .jobs import write_maps_job
from .maps import MapPlan, compute_maps, iter_image_maps, iter_map_blocks, split_by_prompt
from .self_attention import Refinement, parse_refinement
from .text import (
    Attribution, TextEncoder, check_recorded_encoder, load_text_encoder, start_of_text_row, word_in_context,
    words_in_context,
)
from .words import word_maps

__all__ = [
    "Attribution",
    "ContextRequest",
    "ContextResult",
    "MapConfig",
    "MapPlan",
    "Refinement",
    "SPACES",
    "PreparedQueries",
    "QueryCache",
    "TextEncoder",
    "TokenBuckets",
    "check_context_request",
    "check_recorded_encoder",
    "combine_layers",
    "compute_context_maps",
    "compute_maps",
    "context_map_config",
    "display_maps",
    "display_normalization",
    "iter_image_maps",
    "iter_map_blocks",
    "layer_keys",
    "layer_token_maps",
    "load_text_encoder",
    "normalize_maps",
    "parse_refinement",
    "prepare_queries",
    "prepared_bytes",
    "resize_maps",
    "overlay_dir",
    "overlay_files",
    "per_image",
    "save_maps",
    "set_query_cache",
    "shared_query_cache",
    "write_context_maps",
    "write_context_maps_zarr",
    "write_maps_job",
    "write_maps_zarr",
    "write_overlays",
    "split_by_prompt",
    "start_of_text_row",
    "word_in_context",
    "words_in_context",
    "word_maps",
]

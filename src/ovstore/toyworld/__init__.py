"""Toy world: a procedural scene generator with exact word masks, and a small
text-to-image pipeline trained on it from scratch so that its cross-attention truly
binds colour and shape words to image regions.

``world`` is pure numpy + Pillow; ``model`` and ``probe`` import torch and diffusers
only when their functions are called.
"""

from .model import (
    build_toy_pipeline,
    load_toy_pipeline,
    parameter_counts,
    save_toy_pipeline,
)
from .probe import AttentionProbe, ProbeResult, probe_grid, probe_scenes, run_probe, topk_iou, word_token_ids
from .world import (
    BACKGROUND,
    COLORS,
    MIN_GAP,
    PALETTE,
    SHAPES,
    Scene,
    ToyObject,
    caption_for,
    classify_pixels,
    parse_caption,
    recover_masks,
    render_object_mask,
    render_scene,
    sample_scene,
    sample_scenes,
    scenes_to_array,
    word_masks,
)

__all__ = [
    "BACKGROUND",
    "COLORS",
    "MIN_GAP",
    "PALETTE",
    "SHAPES",
    "Scene",
    "ToyObject",
    "caption_for",
    "classify_pixels",
    "parse_caption",
    "recover_masks",
    "render_object_mask",
    "render_scene",
    "sample_scene",
    "sample_scenes",
    "scenes_to_array",
    "word_masks",
    "build_toy_pipeline",
    "load_toy_pipeline",
    "save_toy_pipeline",
    "parameter_counts",
    "AttentionProbe",
    "ProbeResult",
    "probe_grid",
    "probe_scenes",
    "run_probe",
    "topk_iou",
    "word_token_ids",
]

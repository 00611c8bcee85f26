"""Capture: run a diffusers pipeline once and store its cross-attention queries.

Everything ``ovstore capture`` does (new store, append, ``resume``, ``reserve_only``,
``worker``), with the same option names::

    from ovstore.capture import run_capture

    run_capture("path/or/hub-id", prompts=["a cat on a sofa"], steps=30, out="captures.zarr")
    run_capture(out="captures.zarr", resume=True)  # after an interruption, the store's model

Lower level, with a pipeline of your own::

    from ovstore.capture import CaptureConfig, build_requests, capture, load_pipeline

    pipe, identity = load_pipeline("path/or/hub-id")
    requests = build_requests([("a cat on a sofa", None, None)], seed=0)
    capture(pipe, identity, requests, "captures.zarr", config=CaptureConfig(num_inference_steps=30))

Real images (``ovstore capture --images-file F.jsonl --strength 0.5``): ``run_capture(images_file=...,
strength=0.5)``, or :mod:`ovstore.capture.real_images` (``build_image_requests``,
``capture_real_images``).
"""

from .cluster import capture_on_cluster, fill_slots
from .config import BRANCH_CHOICES, PRESETS, CaptureConfig, store_settings
from .job import CaptureJob, parse_worker, prepare_capture, run_capture
from .continuation import check_continuation, continued_config, recorded_model
from .layers import cross_attention_layers
from .pipeline import load_pipeline, model_identity
from .real_images import (
    RealImageMethod, build_image_requests, capture_real_images, read_images_file, resume_real_images,
)
from .recorder import QueryRecorder
from .requests import build_requests, read_prompts_file
from .runner import CaptureResult, capture, check_requests, match_requests, plan_capture, resume

__all__ = [
    "BRANCH_CHOICES",
    "CaptureConfig",
    "PRESETS",
    "CaptureJob",
    "CaptureResult",
    "parse_worker",
    "prepare_capture",
    "run_capture",
    "QueryRecorder",
    "RealImageMethod",
    "build_image_requests",
    "capture_real_images",
    "read_images_file",
    "resume_real_images",
    "build_requests",
    "capture",
    "capture_on_cluster",
    "fill_slots",
    "cross_attention_layers",
    "load_pipeline",
    "match_requests",
    "model_identity",
    "plan_capture",
    "read_prompts_file",
    "resume",
    "check_requests",
    "check_continuation",
    "continued_config",
    "recorded_model",
    "store_settings",
]

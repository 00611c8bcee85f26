"""Capture: run a diffusers pipeline once and store its cross-attention queries.

Typical use::

    from ovstore.capture import CaptureConfig, build_requests, capture, load_pipeline

    pipe, identity = load_pipeline("path/or/hub-id")
    requests = build_requests([("a cat on a sofa", None, None)], seed=0)
    capture(pipe, identity, requests, "captures.zarr", config=CaptureConfig(num_inference_steps=30))
"""

from .config import BRANCH_CHOICES, PRESETS, CaptureConfig, store_settings
from .continuation import check_continuation, continued_config, recorded_model
from .layers import cross_attention_layers
from .pipeline import load_pipeline, model_identity
from .recorder import QueryRecorder
from .requests import build_requests, read_prompts_file
from .runner import CaptureResult, capture, check_requests, plan_capture, resume

__all__ = [
    "BRANCH_CHOICES",
    "CaptureConfig",
    "PRESETS",
    "CaptureResult",
    "QueryRecorder",
    "build_requests",
    "capture",
    "cross_attention_layers",
    "load_pipeline",
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

"""Loading diffusers pipelines the way diffusers users expect, with clear errors."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from ..errors import InvalidInputError, ModelLoadError
from ..models import (
    BUILTIN_MODELS,
    DEFAULT_MODEL,
    build_builtin_pipeline,
    hub_error,
    packaged_model_path,
    text_encoders_fingerprint,
)
from ..families import family_for_pipeline
from ..model_defaults import read_model_defaults
from ..store import AnalysisDefaults, ModelIdentity

__all__ = ["load_pipeline", "model_identity"]

_DTYPES = ("float32", "float16", "bfloat16")


def load_pipeline(model: str | None = None, *, torch_dtype: str = "float32", device: str = "cpu",
                  revision: str | None = None) -> tuple[Any, ModelIdentity]:
    """Load a text-to-image pipeline with ``DiffusionPipeline.from_pretrained``.

    Parameters
    ----------
    model
        A diffusers pipeline directory, a hub id, or ``None`` for the embedded default.
    torch_dtype
        Weights dtype (``float32``, ``float16``, ``bfloat16``).

    Returns
    -------
    (pipeline, identity)
        The pipeline on ``device`` and the :class:`ModelIdentity` recorded in stores,
        with the model directory's analysis defaults (``ovstore_defaults.json``, validated:
        a bad file is refused here, before anything is written).
    """
    import torch

    from ..devices import check_device

    if torch_dtype not in _DTYPES:
        raise InvalidInputError(f"--torch-dtype {torch_dtype!r} is not one of {', '.join(_DTYPES)}")
    check_device(device)  # before the (maybe long) loading, not when the pipeline is moved
    model_id = model or DEFAULT_MODEL
    packaged = packaged_model_path(model_id)
    folder = packaged or Path(model_id).expanduser()
    built_in_code = packaged is None and model_id in BUILTIN_MODELS
    # a pipeline directory's bad defaults file is refused before the (maybe long) loading
    defaults = None if built_in_code or not (folder / "model_index.json").is_file() else read_model_defaults(folder)
    if packaged is not None:
        pipe, _, _ = _from_pretrained(str(packaged), getattr(torch, torch_dtype), None)
        source, path = "builtin", str(packaged)
    elif model_id in BUILTIN_MODELS:
        pipe = build_builtin_pipeline(model_id)
        source, path = "builtin", None
    else:
        pipe, source, path = _from_pretrained(model_id, getattr(torch, torch_dtype), revision)
    try:
        pipe = pipe.to(device, getattr(torch, torch_dtype)) if source == "builtin" and path is None else pipe.to(device)
    except (RuntimeError, AssertionError) as exc:
        raise ModelLoadError(f"cannot move the pipeline to device {device!r}: {exc}") from exc
    pipe.set_progress_bar_config(disable=True)
    # refuse unsupported pipelines before anything else; img2img/inpaint pipelines of a family
    # are captured through the text-to-image pipeline sharing their components
    pipe = family_for_pipeline(pipe, model_id).text_to_image(pipe)
    identity = model_identity(pipe, model_id, source=source, path=path, revision=revision, torch_dtype=torch_dtype)
    if source == "hub":
        defaults = read_model_defaults(model_id, source="hub", revision=identity.commit_hash or revision)
    return pipe, replace(identity, analysis_defaults=defaults)


def _dtype_kwargs(dtype: Any) -> dict[str, Any]:
    import diffusers
    from packaging.version import Version

    # diffusers renamed torch_dtype to dtype in 0.36
    key = "dtype" if Version(diffusers.__version__) >= Version("0.36") else "torch_dtype"
    return {key: dtype}


def _from_pretrained(model_id: str, dtype: Any, revision: str | None) -> tuple[Any, str, str | None]:
    from diffusers import DiffusionPipeline

    local = Path(model_id).expanduser()
    if local.exists():
        if not (local / "model_index.json").is_file():
            raise ModelLoadError(
                f"{local} is not a diffusers pipeline directory (no model_index.json); pass the "
                "folder written by pipeline.save_pretrained()"
            )
        try:
            pipe = DiffusionPipeline.from_pretrained(str(local), **_dtype_kwargs(dtype))
        except Exception as exc:
            raise hub_error(str(local), exc) from exc
        return pipe, "local", str(local.resolve())
    if local.parent != Path(".") and local.parent.is_dir():
        # "runs/model" where ./runs exists is a mistyped local path far more often than a hub id
        raise ModelLoadError(
            f"model path {model_id} does not exist (its folder {local.parent} does); pass an existing "
            "pipeline directory, or run from another folder to load the hub id"
        )
    try:
        pipe = DiffusionPipeline.from_pretrained(model_id, revision=revision, **_dtype_kwargs(dtype))
    except Exception as exc:
        raise hub_error(model_id, exc) from exc
    return pipe, "hub", None


def model_identity(pipe: Any, model_id: str, *, source: str, path: str | None = None,
                   revision: str | None = None, torch_dtype: str = "float32",
                   analysis_defaults: AnalysisDefaults | None = None) -> ModelIdentity:
    """Describe ``pipe`` for the store: where it came from, its model family, how its
    family encodes attribution text (the text recipe) and the model's analysis defaults
    (``ovstore.model_defaults.read_model_defaults(directory)``; ``None``: none)."""
    config = getattr(pipe, "config", {}) or {}
    family = family_for_pipeline(pipe, model_id)
    recipe = family.text_recipe(pipe)
    models = [m for _, m in family.text_components(pipe)]
    return ModelIdentity(
        id=model_id,
        source=source,
        path=path,
        revision=revision,
        commit_hash=config.get("_commit_hash") if hasattr(config, "get") else None,
        pipeline_class=type(pipe).__name__,
        unet_class=type(family.denoiser(pipe)).__name__,
        text_encoder_subfolders=recipe.encoders,
        tokenizer_subfolders=recipe.tokenizers,
        text_encoder_classes=recipe.encoder_classes,
        torch_dtype=torch_dtype,
        text_encoder_hidden_size=recipe.width,
        text_encoder_fingerprint=text_encoders_fingerprint(models) if models else None,
        family=family.name,
        text=recipe,
        analysis_defaults=analysis_defaults,
    )

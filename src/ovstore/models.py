"""Model identity shared by capture and analysis: built-in models, loading errors and the
text-encoder fingerprint.

Capture loads whole diffusers pipelines; analysis loads only a tokenizer and a text
encoder. Both resolve a model id the same way through this module. It imports torch,
transformers and diffusers lazily, inside the functions that need them.
"""

from __future__ import annotations

import hashlib
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ModelLoadError

if TYPE_CHECKING:
    import torch

__all__ = [
    "DEFAULT_MODEL",
    "TOY_MODEL",
    "TINY_RANDOM_MODEL",
    "BUILTIN_MODELS",
    "packaged_model_path",
    "clip_tokenizer",
    "build_builtin_text_encoder",
    "build_builtin_pipeline",
    "text_encoder_fingerprint",
    "hub_error",
]

#: The embedded default: a small Stable Diffusion pipeline trained from scratch on the toy
#: world of ``ovstore.toyworld`` (flat coloured shapes; 32x32 images), shipped inside the
#: package in ``save_pretrained`` format, so its words really bind to image regions.
TOY_MODEL = "ovstore/toy-shapes"
#: A tiny Stable-Diffusion-1.x-shaped pipeline with random weights, built in code (seeded,
#: so every machine builds the same weights) with the real CLIP tokenizer: maps show the
#: mechanics, not semantics.
TINY_RANDOM_MODEL = "ovstore/tiny-random-sd"
DEFAULT_MODEL = TOY_MODEL
BUILTIN_MODELS = (TOY_MODEL, TINY_RANDOM_MODEL)
_PACKAGED = {TOY_MODEL: "toy-shapes"}

_SEEDS = {"text_encoder": 1, "unet": 2, "vae": 3}


def packaged_model_path(model_id: str) -> Path | None:
    """Directory of a built-in model shipped as files (``None`` for models built in code)."""
    folder = _PACKAGED.get(model_id)
    return Path(str(resources.files("ovstore") / "data" / folder)) if folder else None


def clip_tokenizer() -> Any:
    """The CLIP ViT-L/14 BPE tokenizer shipped inside ovstore (49408 tokens)."""
    from transformers import CLIPTokenizer

    path = resources.files("ovstore") / "data" / "clip_tokenizer"
    return CLIPTokenizer.from_pretrained(str(path))


def build_builtin_text_encoder(model_id: str = TINY_RANDOM_MODEL) -> Any:
    """The built-in random model's text encoder, rebuilt from its seed (no UNet needed)."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    _check_builtin(model_id)
    config = CLIPTextConfig(
        hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=5,
        vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
        pad_token_id=49407, projection_dim=512, hidden_act="quick_gelu",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SEEDS["text_encoder"])
        model = CLIPTextModel(config)
    return model.eval()


def build_builtin_pipeline(model_id: str = TINY_RANDOM_MODEL) -> Any:
    """The built-in random model as a ``StableDiffusionPipeline`` (64x64 images, latent 32x32)."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    _check_builtin(model_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SEEDS["unet"])
        unet = UNet2DConditionModel(
            sample_size=32, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=(32, 64, 64), attention_head_dim=4, cross_attention_dim=32,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        )
        torch.manual_seed(_SEEDS["vae"])
        vae = AutoencoderKL(
            block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4,
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
            sample_size=64,
        )
    scheduler = PNDMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
        set_alpha_to_one=False, steps_offset=1,
    )
    return StableDiffusionPipeline(
        vae=vae.eval(), text_encoder=build_builtin_text_encoder(model_id), tokenizer=clip_tokenizer(),
        unet=unet.eval(), scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )


def _check_builtin(model_id: str) -> None:
    if model_id != TINY_RANDOM_MODEL:
        raise ModelLoadError(f"{model_id!r} is not a built-in model; built-in: {', '.join(BUILTIN_MODELS)}")


def text_encoder_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 over the text encoder's parameters (names, shapes and float32 bytes).

    Stored with every capture so that analysis and token files can tell when a different
    text encoder is used than the one the store was captured with.
    """
    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def text_encoders_fingerprint(models: list[torch.nn.Module]) -> str:
    """:func:`text_encoder_fingerprint` of one encoder; for several (SDXL's two), a SHA-256 of
    their fingerprints in join order."""
    prints = [text_encoder_fingerprint(m) for m in models]
    if len(prints) == 1:
        return prints[0]
    return hashlib.sha256(":".join(prints).encode()).hexdigest()


def hub_error(model_id: str, exc: BaseException, what: str = "pipeline") -> ModelLoadError:
    """The one-line error for a model that could not be found locally or on the hub."""
    if Path(model_id).exists():
        return ModelLoadError(
            f"{model_id} exists but could not be loaded as a diffusers {what}: {exc}. "
            "Pass a directory written by save_pretrained (with model_index.json)."
        )
    looks_local = model_id.startswith((".", "/", "~")) or model_id.count("/") > 1
    if looks_local:
        return ModelLoadError(f"model path {model_id} does not exist; pass an existing pipeline directory")
    return ModelLoadError(
        f"could not load {what} {model_id!r} from the Hugging Face hub (no network or unknown id: "
        f"{type(exc).__name__}). Download it where there is network "
        "(huggingface-cli download ID --local-dir DIR) and pass the local directory instead."
    )

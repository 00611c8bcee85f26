"""A small Stable-Diffusion-shaped pipeline for the toy world, built untrained in code.

The layout is a standard diffusers ``StableDiffusionPipeline`` so that everything that
works on real SD 1.x checkpoints (attention capture, OVAM maps) works on it too:

* ``CLIPTextModel`` (hidden 64, 2 layers, 77 positions) with the real CLIP BPE tokenizer;
* ``AutoencoderKL`` with two levels (32x32 RGB <-> 16x16x4 latents);
* ``UNet2DConditionModel`` whose only text pathway is cross-attention (``attn2``) at
  16x16 and 8x8 latent resolution; no class or added embeddings;
* ``DDIMScheduler`` with the SD 1.x noise schedule (epsilon prediction).

torch, diffusers and transformers are imported inside the functions.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = [
    "DEFAULT_TOKENIZER",
    "build_text_encoder",
    "build_unet",
    "build_vae",
    "build_scheduler",
    "build_toy_pipeline",
    "load_toy_pipeline",
    "save_toy_pipeline",
    "parameter_counts",
]

#: Where the CLIP BPE tokenizer is found when none is given: the copy shipped in ovstore.
DEFAULT_TOKENIZER = "ovstore:data/clip_tokenizer"


def _load_tokenizer(path: str | Path | None) -> Any:
    from transformers import CLIPTokenizer

    if path is None or str(path) == DEFAULT_TOKENIZER:
        from importlib import resources

        path = resources.files("ovstore") / "data" / "clip_tokenizer"
    return CLIPTokenizer.from_pretrained(str(path))


def build_text_encoder(hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4) -> Any:
    """Randomly initialised CLIP text encoder; its 49408x``hidden_size`` token table
    dominates the saved size, hence the small width."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=49408, hidden_size=hidden_size, intermediate_size=4 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, max_position_embeddings=77,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, projection_dim=hidden_size,
        hidden_act="quick_gelu",
    )
    return CLIPTextModel(config)


def build_unet(
    cross_attention_dim: int = 64,
    block_out_channels: tuple[int, ...] = (32, 64, 64),
    layers_per_block: int = 1,
    num_heads: int | tuple[int, ...] = 4,
    latent_size: int = 16,
) -> Any:
    """UNet on 16x16x4 latents with cross-attention at 16x16, 8x8 (and the 4x4 mid block).

    The deepest level is a plain ``DownBlock2D``/``UpBlock2D`` pair that widens the
    receptive field cheaply; text reaches the UNet only through ``attn2`` layers.
    """
    from diffusers import UNet2DConditionModel

    n = len(block_out_channels)
    down = ("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",)
    up = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1)
    return UNet2DConditionModel(
        sample_size=latent_size, in_channels=4, out_channels=4, layers_per_block=layers_per_block,
        block_out_channels=tuple(block_out_channels), down_block_types=down, up_block_types=up,
        mid_block_type="UNetMidBlock2DCrossAttn", cross_attention_dim=cross_attention_dim,
        # diffusers reads attention_head_dim as the number of heads for this model class.
        attention_head_dim=num_heads, norm_num_groups=8, class_embed_type=None,
        addition_embed_type=None, act_fn="silu",
    )


def build_vae(block_out_channels: tuple[int, ...] = (32, 64), image_size: int = 32) -> Any:
    """Two-level KL autoencoder (scale factor 2); no mid-block attention, which flat
    colour images do not need."""
    from diffusers import AutoencoderKL

    n = len(block_out_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=tuple(block_out_channels),
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        layers_per_block=1, norm_num_groups=8, sample_size=image_size, mid_block_add_attention=False,
        scaling_factor=1.0,
    )


def build_scheduler() -> Any:
    """DDIM with the SD 1.x schedule: deterministic sampling at eta 0, epsilon targets."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
        timestep_spacing="leading",
    )


def build_toy_pipeline(
    seed: int = 0,
    tokenizer_path: str | Path | None = None,
    text_hidden: int = 64,
    text_layers: int = 2,
    unet_channels: tuple[int, ...] = (32, 64, 64),
    unet_layers_per_block: int = 1,
    unet_heads: int | tuple[int, ...] = 4,
    vae_channels: tuple[int, ...] = (32, 64),
    image_size: int = 32,
) -> Any:
    """The untrained toy ``StableDiffusionPipeline`` (seeded, so builds are reproducible).

    Parameters
    ----------
    seed : int
        Seed for all weight initialisations (the global torch RNG is left untouched).
    tokenizer_path : str or Path, optional
        A CLIPTokenizer directory; defaults to the tokenizer shipped with ovstore.
    text_hidden, text_layers : int
        Width and depth of the CLIP text encoder (also the cross-attention dimension).
    unet_channels, unet_layers_per_block, unet_heads
        UNet size; the last level has no cross-attention.
    vae_channels : tuple of int
        Autoencoder widths; ``len - 1`` halvings of the image size.
    image_size : int
        Image side in pixels.
    """
    import torch
    from diffusers import StableDiffusionPipeline

    latent = image_size // 2 ** (len(vae_channels) - 1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = build_text_encoder(text_hidden, text_layers)
        unet = build_unet(text_hidden, unet_channels, unet_layers_per_block, unet_heads, latent)
        vae = build_vae(vae_channels, image_size)
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=_load_tokenizer(tokenizer_path), unet=unet,
        scheduler=build_scheduler(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )


def save_toy_pipeline(pipe: Any, path: str | Path, half: bool = True) -> Path:
    """Write ``pipe`` with ``save_pretrained``, atomically (temporary folder, then rename).

    With ``half`` the weights are stored as float16 (half the size; the token table alone
    is 49408 x hidden) while the text encoder's config keeps ``dtype: float32``, so a
    plain ``StableDiffusionPipeline.from_pretrained(path)`` loads every part in float32.
    The pipeline passed in is not modified.
    """
    import copy
    import json
    import os
    import shutil

    import torch

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    old = path.with_name(path.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    clone = copy.deepcopy(pipe)
    if half:
        for name in ("text_encoder", "unet", "vae"):
            getattr(clone, name).to(torch.float16)
    clone.save_pretrained(str(tmp))
    config_file = tmp / "text_encoder" / "config.json"
    config = json.loads(config_file.read_text())
    config["dtype"] = "float32"
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
    return path


def load_toy_pipeline(path: str | Path, device: str | torch.device = "cpu") -> Any:
    """Load a saved toy pipeline in float32 (weights may be stored as float16)."""
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        str(path), torch_dtype=torch.float32, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def parameter_counts(pipe: Any) -> dict[str, int]:
    """Number of parameters of each network in the pipeline."""
    return {
        name: sum(p.numel() for p in getattr(pipe, name).parameters())
        for name in ("text_encoder", "unet", "vae")
    }

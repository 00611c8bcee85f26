"""Family ``unet``: text-conditioned ``UNet2DConditionModel`` pipelines (SD 1.x, SD 2.x, SDXL,
and the UNets of their img2img and inpainting pipelines).

Recorded layers are the ``attn2`` cross-attention modules of the down, mid and up blocks;
queries are ``to_q(hidden_states)`` (a forward hook on ``to_q``), keys ``to_k`` of the text
rows. The text recipe follows each pipeline's own prompt encoding: SD 1.x/2.x use the text
encoder's last hidden state; SDXL uses ``hidden_states[-2]`` of ``text_encoder`` and
``text_encoder_2`` joined on the channel axis.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..errors import InvalidInputError
from ..store import LayerInfo, ModelIdentity, TextRecipe
from .base import ModelFamily

__all__ = ["UNetFamily", "cross_attention_layers", "layer_level"]

_BLOCK = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.|^(mid_block)\.")
#: diffusers UNet2DConditionModel configurations whose cross-attention attends to something
#: other than encoded text (Kandinsky's image embeddings, IP-style projections)
_NON_TEXT_HID = ("image_proj", "text_image_proj", "ip_image_proj")


def layer_level(name: str, n_levels: int) -> tuple[str, int]:
    """Block kind and resolution level (number of 2x downsamplings) of a module path.

    In ``UNet2DConditionModel`` the attentions of ``down_blocks.i`` run at level ``i``,
    the mid block at the lowest level, and ``up_blocks.i`` at level ``n_levels - 1 - i``.
    """
    m = _BLOCK.match(name)
    if m is None:
        raise InvalidInputError(f"cannot place layer {name} in the UNet's down/mid/up blocks")
    if m.group(3):
        return "mid", n_levels - 1
    index = int(m.group(2))
    if m.group(1) == "down_blocks":
        return "down", index
    return "up", n_levels - 1 - index


def _size_at_level(size: int, level: int) -> int:
    for _ in range(level):
        size = math.ceil(size / 2)  # Downsample2D: conv stride 2, padding 1
    return size


def cross_attention_layers(unet: Any, latent_height: int, latent_width: int) -> list[tuple[LayerInfo, Any]]:
    """Every ``attn2`` cross-attention module of ``unet`` with its :class:`LayerInfo`.

    Raises
    ------
    InvalidInputError
        The UNet has no cross-attention, or uses a variant whose keys are not ``to_k`` of
        the text embedding (cross-attention norm, key norm).
    """
    from diffusers.models.attention_processor import Attention

    n_levels = len(unet.config.block_out_channels)
    found = []
    for name, module in unet.named_modules():
        if not (name.endswith("attn2") and isinstance(module, Attention)):
            continue
        if not module.is_cross_attention:
            continue
        if getattr(module, "norm_cross", None) is not None or getattr(module, "norm_k", None) is not None:
            raise InvalidInputError(
                f"layer {name} normalises its keys (cross_attention_norm or qk_norm); the unet family "
                "stores only to_k and cannot reproduce its attention"
            )
        block, level = layer_level(name, n_levels)
        heads = module.heads
        inner = module.to_q.out_features
        found.append((
            LayerInfo(
                name=name, block=block, level=level,
                height=_size_at_level(latent_height, level), width=_size_at_level(latent_width, level),
                heads=heads, head_dim=inner // heads, scale=float(module.scale),
                key_input_dim=module.to_k.in_features, has_bias=module.to_k.bias is not None,
                upcast_attention=bool(getattr(module, "upcast_attention", False)),
            ),
            module,
        ))
    if not found:
        raise InvalidInputError(
            f"the UNet ({type(unet).__name__}) has no cross-attention (attn2) layers; the unet family "
            "needs a text-conditioned UNet2DConditionModel such as Stable Diffusion's"
        )
    return found


#: (tokenizer, encoder) subfolder pairs a UNet pipeline may have, in SDXL's join order
_TEXT_PAIRS = (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))


class UNetFamily(ModelFamily):
    """SD 1.x / 2.x / SDXL UNets: ``attn2`` queries, ``to_k`` keys, CLIP text."""

    name = "unet"
    pipelines = "Stable Diffusion 1.x/2.x and SDXL (text-to-image, img2img, inpainting)"

    # ------------------------------------------------------------------ capture
    def supports(self, pipe: Any) -> bool:
        unet = getattr(pipe, "unet", None)
        if unet is None or type(unet).__name__ != "UNet2DConditionModel" or not hasattr(unet, "config"):
            return False
        if unet.config.get("encoder_hid_dim_type") in _NON_TEXT_HID:
            return False
        return bool(self.text_components(pipe))

    def text_to_image(self, pipe: Any) -> Any:
        name = type(pipe).__name__
        if "Img2Img" not in name and "Inpaint" not in name:
            return pipe
        if pipe.unet.config.in_channels != pipe.unet.config.out_channels:
            raise InvalidInputError(
                f"{name} has an inpainting UNet ({pipe.unet.config.in_channels} input channels: latents, mask and "
                "masked image), which cannot generate from text alone; capture its base text-to-image checkpoint")
        from diffusers import AutoPipelineForText2Image

        # the same UNet, text encoders and VAE, driven from text (the images are text-to-image)
        converted = AutoPipelineForText2Image.from_pipe(pipe)
        converted.set_progress_bar_config(disable=True)
        return converted

    def image_to_image(self, pipe: Any) -> Any:
        from diffusers import AutoPipelineForImage2Image

        # StableDiffusion(XL)Img2ImgPipeline on the same UNet, text encoders, VAE and scheduler
        converted = AutoPipelineForImage2Image.from_pipe(pipe)
        converted.set_progress_bar_config(disable=True)
        return converted

    def inversion_pipelines(self, pipe: Any) -> tuple[Any, Any]:
        from diffusers import DDIMInverseScheduler, DDIMScheduler

        # the text-to-image pipeline itself, stepping backwards (DDIM inversion: latents given,
        # init_noise_sigma 1) and forwards (DDIM, eta 0) with the model's scheduler settings
        pipes = []
        for scheduler in (DDIMInverseScheduler, DDIMScheduler):
            p = type(pipe).from_pipe(pipe, scheduler=scheduler.from_config(pipe.scheduler.config))
            p.set_progress_bar_config(disable=True)
            pipes.append(p)
        return pipes[0], pipes[1]

    def encode_images(self, pipe: Any, pixels: np.ndarray) -> Any:
        import torch

        vae = pipe.vae
        x = torch.from_numpy(np.ascontiguousarray(pixels)).float().div(127.5).sub(1).permute(0, 3, 1, 2)
        # SDXL's float16 VAE overflows when encoding: its pipelines upcast it (force_upcast)
        dtype = torch.float32 if vae.dtype == torch.float16 and vae.config.get("force_upcast") else vae.dtype
        original = vae.dtype
        with torch.no_grad():
            if dtype != original:
                vae.to(dtype)
            try:
                latents = vae.encode(x.to(vae.device, dtype)).latent_dist.mean
            finally:
                if dtype != original:
                    vae.to(original)
            mean, std = vae.config.get("latents_mean"), vae.config.get("latents_std")
            if mean is not None and std is not None:  # as the SDXL img2img pipeline
                mean = torch.tensor(mean).view(1, -1, 1, 1).to(latents)
                std = torch.tensor(std).view(1, -1, 1, 1).to(latents)
                latents = (latents - mean) * vae.config.scaling_factor / std
            else:
                latents = latents * vae.config.scaling_factor
        return latents.to(pipe.unet.dtype)

    def denoiser(self, pipe: Any) -> Any:
        return pipe.unet

    def latent_size(self, pipe: Any, height: int, width: int) -> tuple[int, int]:
        factor = pipe.vae_scale_factor
        if height % factor or width % factor:
            raise InvalidInputError(f"--height/--width must be multiples of the VAE factor {factor}")
        return height // factor, width // factor

    def native_size(self, pipe: Any) -> tuple[int, int]:
        size = pipe.unet.config.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return h * pipe.vae_scale_factor, w * pipe.vae_scale_factor

    def attention_layers(self, pipe: Any, latent_height: int, latent_width: int) -> list[tuple[LayerInfo, Any]]:
        return cross_attention_layers(pipe.unet, latent_height, latent_width)

    def self_attention_layers(self, pipe: Any, latent_height: int, latent_width: int) -> list[tuple[str, int, int, Any]]:
        from diffusers.models.attention_processor import Attention

        unet = pipe.unet
        n_levels = len(unet.config.block_out_channels)
        found = []
        for name, module in unet.named_modules():
            if not (name.endswith("attn1") and isinstance(module, Attention)) or module.is_cross_attention:
                continue
            if getattr(module, "norm_q", None) is not None or getattr(module, "norm_k", None) is not None:
                raise InvalidInputError(f"layer {name} normalises its queries and keys (qk_norm); --self-attention "
                                        "reads to_q and to_k outputs and cannot reproduce its attention")
            _, level = layer_level(name, n_levels)
            found.append((name, _size_at_level(latent_height, level), _size_at_level(latent_width, level), module))
        return found

    def stack_leaders(self, layers: Sequence[LayerInfo]) -> list[str]:
        # a Transformer2DModel stacks transformer_layers_per_block BasicTransformerBlocks
        return [info.name for info in layers if ".transformer_blocks.0." in info.name or
                ".transformer_blocks." not in info.name]

    def query_module(self, layer: Any) -> Any:
        return layer.to_q

    def context(self, args: tuple, kwargs: Mapping[str, Any]) -> Any:
        return kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)

    def context_token_ids(self, pipe: Any, texts: Sequence[str], **options: Any) -> list[list[int]]:
        return self.context_tokenizer_ids(pipe, texts)[0]

    def context_tokenizer_ids(self, pipe: Any, texts: Sequence[str], **options: Any) -> list[list[list[int]]]:
        # as encode_prompt: each tokenizer pads to its own model_max_length with its own pad
        # token (SDXL's tokenizer_2 pads with "!", id 0; tokenizer with end-of-text, 49407)
        out = []
        for tokenizer, _ in self.text_components(pipe):
            ids = tokenizer(list(texts), padding="max_length", max_length=tokenizer.model_max_length,
                            truncation=True)["input_ids"]
            out.append([list(map(int, row)) for row in ids])
        return out

    def pipeline_arguments(self, prompts: Sequence[str], negative_prompts: Sequence[str]) -> dict[str, Any]:
        # no negative prompt is None, not "": SDXL then applies force_zeros_for_empty_prompt
        # (zero embeddings), as it does for a user who gives none; SD 1.x encodes "" either way
        negatives = None if not any(negative_prompts) else list(negative_prompts)
        return {"prompt": list(prompts), "negative_prompt": negatives}

    # ------------------------------------------------------------------ store
    def text_components(self, pipe: Any) -> list[tuple[Any, Any]]:
        pairs = [(getattr(pipe, t, None), getattr(pipe, e, None)) for t, e in _TEXT_PAIRS]
        return [(t, e) for t, e in pairs if t is not None and e is not None]

    def text_recipe(self, pipe: Any) -> TextRecipe:
        names = [(t, e) for t, e in _TEXT_PAIRS if getattr(pipe, t, None) is not None
                 and getattr(pipe, e, None) is not None]
        encoders = [getattr(pipe, e) for _, e in names]
        # SDXL-style pipelines (they have a second encoder slot) take the penultimate layer
        penultimate = hasattr(pipe, "text_encoder_2")
        return TextRecipe(
            tokenizers=tuple(t for t, _ in names), encoders=tuple(e for _, e in names),
            encoder_classes=tuple(type(m).__name__ for m in encoders),
            widths=tuple(int(m.config.hidden_size) for m in encoders),
            hidden_state=-2 if penultimate else None, join="channels", key="to_k",
        )

    def key_parameters(self, layers: Sequence[tuple[LayerInfo, Any]]) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
        out = {}
        for info, module in layers:
            w = module.to_k.weight.detach().float().cpu().numpy()
            b = module.to_k.bias
            out[info.name] = (w, None if b is None else b.detach().float().cpu().numpy())
        return out

    # ------------------------------------------------------------------ analysis
    def load_text_encoder(self, identity: ModelIdentity, target: str, *, device: str = "cpu") -> Any:
        from ..analyze import TextEncoder

        components = self.load_text_components(
            identity, target, hint="pass the diffusers pipeline directory of the captured model family as --model")
        (tokenizer, encoder), *more = components
        return TextEncoder(tokenizer, encoder, device=device, name=str(target), more=more,
                           hidden_state=identity.text_recipe.hidden_state, family=self.name)

    def layer_keys(self, rows: Any, parameters: tuple[Any, Any], info: LayerInfo) -> Any:
        from ..analyze import layer_keys

        return layer_keys(rows, parameters[0], parameters[1], info)

"""Finding the cross-attention layers of a diffusers UNet and describing them for the store."""

from __future__ import annotations

import math
import re
from typing import Any

from ..errors import InvalidInputError
from ..store.format import LayerInfo

__all__ = ["cross_attention_layers", "layer_level"]

_BLOCK = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.|^(mid_block)\.")


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
                f"layer {name} normalises its keys (cross_attention_norm or qk_norm); ovstore "
                "format v1 stores only to_k and cannot reproduce its attention"
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
            f"the UNet ({type(unet).__name__}) has no cross-attention (attn2) layers; ovstore "
            "needs a text-conditioned UNet2DConditionModel such as Stable Diffusion's"
        )
    return found

"""Cross-attention layers of a UNet: provided by the ``unet`` model family (re-exported here
for code that imported them from capture)."""

from __future__ import annotations

from ..families import cross_attention_layers, layer_level

__all__ = ["cross_attention_layers", "layer_level"]

"""The grounding head: stored queries of chosen layers + a class word's text rows → mask logits.

After Grounded Diffusion's grounding module, with the denoiser's features replaced by what a
store holds (each layer's ``to_q`` output, a linear image of that layer's features):

* **visual encoder** (multi-scale): per layer, the queries averaged over the chosen calls
  ``(heads·head_dim, h, w)``, normalised (GroupNorm, no affine) and projected by a 1×1 conv to
  ``width`` channels; the layers of one resolution are summed and refined by a 3×3 conv; every
  resolution is upsampled (bilinear) to the finest and the concatenation fused by a 3×3 conv;
* **text**: the class word's rows in a template sentence, from the store's own text encoder,
  mean-pooled; a two-layer MLP gives FiLM scale and shift of the visual features;
* **attention cue**: the same pooled row and the start-of-text row through each layer's stored
  ``to_k`` (frozen, read from the store): per layer and head the scaled score of the word minus
  that of start-of-text (the softmax's two-token logit, linear in the queries, so averaging the
  queries over calls first is exact), each map standardised over the image and also kept as its
  level; these ``layers·heads`` maps are what lets a word the head never saw in training find
  its object;
* **fusion**: FiLM-modulated visual features beside a 1×1 projection of the attention cue,
  a 3×3 conv and a 1×1 conv → one logit map, upsampled to the image size;
* **image** (``image_channels=3``, optional): the stored image itself (every store keeps it; a
  real-image store its source) through two 3×3 convs at full resolution, beside the fused
  features upsampled to it, then a 3×3 conv before the logit: the attention layers' grids are a
  half to an eighth of the image's (16×16 for a 32×32 toy image, 64×64 for SD's 512²), and the
  pixels say where an object's edge lies, as DenseCRF's colour kernel does, but learned.

About 86 k parameters on the toy-world model at ``width=32``, the training default
(``parameter_count``; 103 k with the image); most of them in the 3×3 convs, so SD's wider
layers add only their 1×1 projections.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["HeadSpec", "GroundHead", "LayerSpec"]


@dataclass(frozen=True)
class LayerSpec:
    """One stored layer the head reads (as the store's layout describes it)."""

    name: str
    height: int
    width: int
    heads: int
    head_dim: int
    scale: float
    key_input_dim: int

    @property
    def channels(self) -> int:
        return self.heads * self.head_dim

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "height": self.height, "width": self.width, "heads": self.heads,
                "head_dim": self.head_dim, "scale": self.scale, "key_input_dim": self.key_input_dim}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LayerSpec:
        return cls(name=str(data["name"]), height=int(data["height"]), width=int(data["width"]),
                   heads=int(data["heads"]), head_dim=int(data["head_dim"]), scale=float(data["scale"]),
                   key_input_dim=int(data["key_input_dim"]))

    @classmethod
    def from_layer(cls, info: Any) -> LayerSpec:
        return cls(name=info.name, height=info.height, width=info.width, heads=info.heads,
                   head_dim=info.head_dim, scale=float(info.scale), key_input_dim=info.key_input_dim)


@dataclass(frozen=True)
class HeadSpec:
    """The architecture: the layers read, the text width, the image size and the channel width."""

    layers: tuple[LayerSpec, ...]
    text_dim: int
    image_size: tuple[int, int]
    width: int = 32
    image_channels: int = 0  # 3: the stored RGB image is an input too; 0: attention features only

    def to_json(self) -> dict[str, Any]:
        return {"layers": [l.to_json() for l in self.layers], "text_dim": self.text_dim,
                "image_size": list(self.image_size), "width": self.width, "image_channels": self.image_channels}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> HeadSpec:
        return cls(layers=tuple(LayerSpec.from_json(l) for l in data["layers"]), text_dim=int(data["text_dim"]),
                   image_size=(int(data["image_size"][0]), int(data["image_size"][1])), width=int(data["width"]),
                   image_channels=int(data.get("image_channels", 0)))  # heads written before images were read: 0

    @property
    def resolutions(self) -> list[tuple[int, int]]:
        """Distinct layer resolutions, finest first."""
        return sorted({(l.height, l.width) for l in self.layers}, key=lambda r: -r[0] * r[1])


class GroundHead(nn.Module):
    """See the module docstring. ``forward(features, text)``:

    ``features``: one tensor per layer of ``spec.layers``, ``(batch, heads·head_dim, h, w)``
    (queries averaged over calls), then, when ``spec.image_channels``, the image ``(batch, 3, H, W)``
    scaled to [-1, 1]; ``text``: ``(batch, 2, text_dim)``, rows [start-of-text, pooled class
    word]. Returns mask logits ``(batch, H, W)`` at ``spec.image_size``.
    The stored key projections must be attached (:meth:`attach_keys`) before a forward.
    """

    def __init__(self, spec: HeadSpec) -> None:
        super().__init__()
        self.spec = spec
        d = spec.width
        self.resolutions = spec.resolutions
        self.project = nn.ModuleList(nn.Conv2d(l.channels, d, 1) for l in spec.layers)
        self.refine = nn.ModuleList(nn.Conv2d(d, d, 3, padding=1) for _ in self.resolutions)
        self.fuse = nn.Conv2d(d * len(self.resolutions), d, 3, padding=1)
        self.text = nn.Sequential(nn.Linear(spec.text_dim, d), nn.GELU(), nn.Linear(d, 2 * d))
        n_cues = sum(l.heads for l in spec.layers)
        self.cue = nn.Conv2d(2 * n_cues, d // 2, 1)
        self.mix = nn.Conv2d(d + d // 2, d, 3, padding=1)
        self.out = nn.Conv2d(d, 1, 1)
        if spec.image_channels:
            self.stem = nn.Sequential(nn.Conv2d(spec.image_channels, d // 2, 3, padding=1), nn.GELU(),
                                      nn.Conv2d(d // 2, d // 2, 3, padding=1))
            self.edges = nn.Conv2d(d + d // 2, d, 3, padding=1)
        self._keys: list[tuple[torch.Tensor, torch.Tensor | None]] | None = None

    def attach_keys(self, projections: Sequence[tuple[Any, Any]]) -> None:
        """The stored ``to_k`` weight ``(inner, text_dim)`` and bias of every layer, in order
        (frozen: not parameters, not saved; they come from the store the head is applied to)."""
        if len(projections) != len(self.spec.layers):
            raise ValueError("one key projection per layer")
        device = self.out.weight.device
        self._keys = [(torch.as_tensor(w, dtype=torch.float32, device=device),
                       None if b is None else torch.as_tensor(b, dtype=torch.float32, device=device))
                      for w, b in projections]

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def attention_cues(self, features: Sequence[torch.Tensor], text: torch.Tensor) -> torch.Tensor:
        """Per layer and head, ``scale·q·k(word) − scale·q·k(start-of-text)`` at the finest
        resolution: ``(batch, Σ heads, H0, W0)``."""
        if self._keys is None:
            raise RuntimeError("attach the stored key projections first (GroundHead.attach_keys)")
        top = self.resolutions[0]
        cues = []
        for spec, x, (w, b) in zip(self.spec.layers, features, self._keys):
            keys = F.linear(text, w, b)  # (batch, 2, inner)
            diff = (keys[:, 1] - keys[:, 0]).view(-1, spec.heads, spec.head_dim) * spec.scale
            q = x.view(x.shape[0], spec.heads, spec.head_dim, spec.height * spec.width)
            score = torch.einsum("bhd,bhdp->bhp", diff, q).view(x.shape[0], spec.heads, spec.height, spec.width)
            cues.append(_resize(score, top))
        return torch.cat(cues, dim=1)

    def forward(self, features: Sequence[torch.Tensor], text: torch.Tensor) -> torch.Tensor:
        n_layers = len(self.spec.layers)
        if len(features) != n_layers + (1 if self.spec.image_channels else 0):
            raise ValueError(f"the head reads {n_layers} layer(s)" + (" and the image" if self.spec.image_channels
                                                                         else "") + f", got {len(features)} tensors")
        image = features[n_layers] if self.spec.image_channels else None
        features = features[:n_layers]
        by_res: dict[tuple[int, int], torch.Tensor] = {}
        for spec, x, proj in zip(self.spec.layers, features, self.project):
            y = proj(F.group_norm(x, 1))
            key = (spec.height, spec.width)
            by_res[key] = y if key not in by_res else by_res[key] + y
        top = self.resolutions[0]
        scales = [_resize(F.gelu(conv(by_res[r])), top) for r, conv in zip(self.resolutions, self.refine)]
        visual = F.gelu(self.fuse(torch.cat(scales, dim=1)))
        gamma, beta = self.text(text[:, 1]).chunk(2, dim=-1)
        visual = visual * (1 + gamma[:, :, None, None]) + beta[:, :, None, None]
        raw = self.attention_cues(features, text)
        # the spatial pattern (each map standardised, as OVAM maps are normalised per image) and the
        # level (how strongly the word is attended at all), scaled to order one
        cue = self.cue(torch.cat([F.instance_norm(raw), raw / _CUE_SCALE], dim=1))
        mixed = F.gelu(self.mix(torch.cat([F.gelu(visual), cue], dim=1)))
        if image is None:
            return _resize(self.out(mixed), self.spec.image_size)[:, 0]
        pixels = F.gelu(self.stem(image))
        mixed = F.gelu(self.edges(torch.cat([_resize(mixed, self.spec.image_size), pixels], dim=1)))
        return self.out(mixed)[:, 0]


#: Typical magnitude of a score difference (scaled q·k of word minus start-of-text).
_CUE_SCALE = 16.0


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)

"""Map settings: which layers and steps, and how to activate, aggregate and normalise."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import InvalidInputError
from ..inputs import check_int
from ..selection import LayerSelection, parse_index_spec

__all__ = ["MapConfig", "ACTIVATIONS", "REDUCTIONS", "NORMALIZATIONS", "SPACES"]

ACTIVATIONS = ("token_softmax", "sigmoid", "linear")
REDUCTIONS = ("sum", "mean")
NORMALIZATIONS = ("none", "max", "minmax")
#: What a map's scores compare (MM-DiT stores): the image queries with the attribution's keys
#: (``attention``, OVAM's and the model's own attention), or ConceptAttention's output space:
#: the image attention outputs with the attribution's (``output``; capture --image-outputs)
SPACES = ("attention", "output")
#: Largest side of an upsampled map (--size): 16384 px, 1 GB per float32 map.
MAX_MAP_SIDE = 16384


@dataclass(frozen=True, slots=True)
class MapConfig:
    """How stored queries become one map per attribution token.

    The defaults are the OVAM reference semantics: softmax over the attribution's tokens
    (per pixel, step and head), sums over heads, steps and layers, bilinear upsampling of
    each layer to the largest stored resolution, mid-block excluded, no normalisation.

    Parameters
    ----------
    layers
        Layer selection (default: every stored layer except the mid block).
    steps
        Positions along the stored step axis, e.g. ``"0:5,-1"`` (default: all).
    branch
        ``None`` takes the first stored half (the unconditional one by default); or
        ``"uncond"``/``"cond"`` to pick a half by name.
    activation
        ``token_softmax`` (reference), ``sigmoid`` of the scaled scores, or ``linear``.
    head_reduction, step_reduction, layer_reduction
        ``sum`` (reference) or ``mean``.
    normalize
        ``none`` (reference), ``max`` (divide each map by its maximum) or ``minmax``.
    size
        Final ``(height, width)``; ``None`` keeps the largest layer resolution.
    memory_budget
        Bytes of scores (and of queries) one pass may take. ``None``: 8 MiB on CPU (the
        passes stay in the last-level cache while Python's per-operation cost stays small:
        1000 prompts 12-26 % faster than at 2 MiB, BENCHMARKS.md), 256 MiB on a GPU (fewer,
        larger kernels).
    block_budget
        Bytes of keys and maps held for one block of prompts on one image: many prompts are
        evaluated in blocks of this size, so memory stays bounded whatever their number.
    refine
        ``None``, or a self-attention refinement (``"self-attention:propagate,k=2"`` or an
        ``ovstore.analyze.self_attention.Refinement``) applied to each image's maps with its stored
        self-attention matrix, after the layer sum and before resizing and normalising; the
        store must be captured with ``--self-attention``.
    space
        ``attention`` (default): image queries against the attribution's keys, per head;
        ``output`` (SD3/FLUX stores captured with ``--image-outputs``): ConceptAttention's
        output-space maps, the image attention outputs against the attribution's attention
        outputs (before the output projections), one dot product over the block's width, softmax
        over the attribution's tokens; aggregated over calls and blocks the same way.
    """

    layers: LayerSelection = field(default_factory=lambda: LayerSelection(include_mid=False))
    steps: tuple[str, ...] | None = None
    branch: str | None = None
    activation: str = "token_softmax"
    head_reduction: str = "sum"
    step_reduction: str = "sum"
    layer_reduction: str = "sum"
    normalize: str = "none"
    size: tuple[int, int] | None = None
    memory_budget: int | None = None
    block_budget: int = 512 * 2**20
    refine: Any = None
    space: str = "attention"

    def __post_init__(self) -> None:
        if self.space not in SPACES:
            raise InvalidInputError(f"--space {self.space!r} is not one of {', '.join(SPACES)}")
        if self.refine is not None:
            from .self_attention import parse_refinement

            object.__setattr__(self, "refine", parse_refinement(self.refine))
        if self.activation not in ACTIVATIONS:
            raise InvalidInputError(f"activation {self.activation!r} is not one of {', '.join(ACTIVATIONS)}")
        for name in ("head_reduction", "step_reduction", "layer_reduction"):
            if getattr(self, name) not in REDUCTIONS:
                raise InvalidInputError(f"{name} {getattr(self, name)!r} is not one of sum, mean")
        if self.normalize not in NORMALIZATIONS:
            raise InvalidInputError(f"normalize {self.normalize!r} is not one of {', '.join(NORMALIZATIONS)}")
        if self.branch not in (None, "uncond", "cond"):
            raise InvalidInputError(f"branch {self.branch!r} is not one of uncond, cond")
        if self.size is not None:
            if len(self.size) != 2:
                raise InvalidInputError(f"--size {self.size} must be two positive integers (height width)")
            for side in self.size:
                check_int(side, "--size", 1, MAX_MAP_SIDE)
            object.__setattr__(self, "size", (int(self.size[0]), int(self.size[1])))
        for name in ("memory_budget", "block_budget"):
            if getattr(self, name) is not None:
                check_int(getattr(self, name), name, 1)
        if isinstance(self.steps, str):
            object.__setattr__(self, "steps", parse_index_spec(self.steps))

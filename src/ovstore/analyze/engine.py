"""The OVAM computation, batched over many attribution prompts.

For one image and layer, queries ``Q`` (step, head, pixel, channel) meet the keys of every
attribution token at once in one matrix product per head. Prompts with the same token
count form a bucket whose scores reshape to ``(..., prompts, tokens)``, so the per-prompt
softmax is one vectorised call with no padding and no mask. Prompts are processed in
chunks sized to a memory budget. Nothing here knows about stores or files.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..store.format import LayerInfo

__all__ = [
    "PreparedQueries",
    "TokenBuckets",
    "combine_layers",
    "layer_keys",
    "layer_token_maps",
    "normalize_maps",
    "prepare_queries",
]


@dataclass(frozen=True)
class TokenBuckets:
    """Attribution tokens grouped by prompt length: ``(n_tokens, column indices)`` pairs.

    The columns index the concatenated token axis; within a bucket they are laid out
    prompt-major, so ``scores[..., cols]`` reshapes to ``(..., n_prompts, n_tokens)``.
    """

    total: int
    buckets: tuple[tuple[int, torch.Tensor], ...]

    @classmethod
    def from_offsets(cls, offsets: Sequence[int]) -> TokenBuckets:
        groups: dict[int, list[int]] = {}
        for start, stop in zip(offsets[:-1], offsets[1:]):
            groups.setdefault(stop - start, []).extend(range(start, stop))
        return cls(
            total=int(offsets[-1]),
            buckets=tuple((n, torch.tensor(cols, dtype=torch.long)) for n, cols in groups.items()),
        )


@dataclass(frozen=True)
class PreparedQueries:
    """One layer's queries laid out for the engine: ``data`` is ``(head, channel, step*pixel)``
    float32; ``max_norm`` bounds every query's length (for the overflow-free softmax)."""

    data: torch.Tensor
    steps: int
    pixels: int
    max_norm: float


def prepare_queries(queries: torch.Tensor, device: str | torch.device | None = None) -> PreparedQueries:
    """Lay out ``(step, head, pixel, channel)`` queries once, so that repeated passes (many
    prompt chunks, or every epoch of token optimization) do not copy them again."""
    steps, heads, pixels, channels = queries.shape
    q = queries.to(device or queries.device, non_blocking=True).to(torch.float32)
    q = q.permute(1, 3, 0, 2).reshape(heads, channels, steps * pixels)
    return PreparedQueries(q, steps, pixels, float(q.norm(dim=1).amax()))


def layer_keys(embedding: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               info: LayerInfo) -> torch.Tensor:
    """Keys of every token for one layer, pre-multiplied by the attention scale.

    Returns ``(head, token, channel)``; ``embedding`` is ``(token, hidden)``.
    """
    keys = F.linear(embedding.float(), weight.float(), None if bias is None else bias.float())
    keys = keys.view(-1, info.heads, info.head_dim).transpose(0, 1)
    return keys * info.scale


#: exp() of scores up to this magnitude neither overflows nor underflows in float32, even
#: summed over 77 tokens, so the softmax may skip subtracting the row maximum.
_SAFE_EXP = 80.0


def _activate(scores: torch.Tensor, activation: str, inplace: bool, bounded: bool) -> torch.Tensor:
    """Activation over the token axis (dim 2 of ``(head, prompt, token, step*pixel)``)."""
    if activation == "token_softmax":
        if not inplace:
            return scores.softmax(dim=2)
        if not bounded:
            scores.sub_(scores.amax(dim=2, keepdim=True))
        scores.exp_()
        return scores.div_(scores.sum(dim=2, keepdim=True))
    if activation == "sigmoid":
        return scores.sigmoid_() if inplace else scores.sigmoid()
    return scores


def layer_token_maps(
    queries: PreparedQueries,
    keys: torch.Tensor,
    buckets: TokenBuckets,
    *,
    activation: str = "token_softmax",
    memory_budget: int = 2 * 2**20,
) -> torch.Tensor:
    """Maps of every token for one layer, summed over steps and heads.

    Scores are laid out ``(head, token, step*pixel)`` so that the softmax over tokens and
    the sums run over contiguous pixel vectors, and each chunk of prompts is sized to stay
    in cache (``memory_budget`` bytes of scores). When ``|q|·|k|`` bounds every score below
    80, the softmax skips the max-subtraction pass (exactly the same result in float32).

    Parameters
    ----------
    queries
        From :func:`prepare_queries`.
    keys
        ``(head, token, channel)`` from :func:`layer_keys`.

    Returns
    -------
    torch.Tensor
        ``(token, pixel)`` float32: for each token, the sum over steps and heads of its
        activation.
    """
    q, steps, pixels = queries.data, queries.steps, queries.pixels
    heads = q.shape[0]
    inplace = not (torch.is_grad_enabled() and keys.requires_grad)
    q_norm = queries.max_norm
    k_norm = keys.detach().norm(dim=2)  # (head, token)
    out = torch.zeros((buckets.total, pixels), dtype=torch.float32, device=keys.device)
    per_prompt_token = heads * steps * pixels * 4
    for n_tokens, cols in buckets.buckets:
        cols = cols.to(keys.device)
        n_prompts = cols.numel() // n_tokens
        chunk = max(1, min(n_prompts, memory_budget // max(per_prompt_token * n_tokens, 1)))
        for p0 in range(0, n_prompts, chunk):
            c = cols[p0 * n_tokens:(p0 + chunk) * n_tokens]
            bounded = q_norm * float(k_norm[:, c].amax()) < _SAFE_EXP
            scores = torch.bmm(keys[:, c], q)  # (head, c*n, step*pixel)
            scores = _activate(scores.view(heads, -1, n_tokens, steps * pixels), activation, inplace, bounded)
            out[c] = scores.reshape(heads, -1, steps, pixels).sum(dim=(0, 2))  # (c*n, pixel)
    return out


def combine_layers(layer_maps: Mapping[str, torch.Tensor], layers: Sequence[LayerInfo],
                   target: tuple[int, int], *, reduction: str = "sum") -> torch.Tensor:
    """Upsample each ``(token, pixel)`` layer map to ``target`` (bilinear, align_corners=False,
    as the reference) and reduce over layers; returns ``(token, height, width)``."""
    total = None
    for info in layers:
        maps = layer_maps[info.name].view(-1, 1, info.height, info.width)
        if (info.height, info.width) != tuple(target):
            maps = F.interpolate(maps, size=target, mode="bilinear", align_corners=False)
        total = maps if total is None else total + maps
    assert total is not None
    if reduction == "mean":
        total = total / len(layers)
    return total[:, 0]


def normalize_maps(maps: torch.Tensor, mode: str) -> torch.Tensor:
    """Per-map normalisation over the last two dims: ``none``, ``max`` or ``minmax``."""
    if mode == "none":
        return maps
    flat = maps.flatten(-2)
    if mode == "max":
        scale = flat.amax(-1).clamp_min(torch.finfo(maps.dtype).tiny)
        return maps / scale[..., None, None]
    low = flat.amin(-1)[..., None, None]
    span = (flat.amax(-1)[..., None, None] - low).clamp_min(torch.finfo(maps.dtype).tiny)
    return (maps - low) / span

"""The OVAM computation, batched over many attribution prompts.

For one image and layer, queries ``Q`` (step, head, pixel, channel) meet the keys of every
attribution token at once in one matrix product per head. Prompts with the same token
count form a bucket whose scores reshape to ``(..., prompts, tokens)``, so the per-prompt
softmax is one vectorised call with no padding and no mask. Prompts are processed in
chunks sized to a memory budget. On CPU the bounded softmax of a whole group goes through
the fused kernel of :mod:`ovstore.analyze.kernel` when it is available (the same maps, no
score written to memory). Nothing here knows about stores or files.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..store import LayerInfo
from .kernel import fused_kernel, fused_maps

__all__ = [
    "PreparedQueries",
    "TokenBuckets",
    "combine_layers",
    "layer_keys",
    "layer_token_maps",
    "normalize_maps",
    "ordered_token_maps",
    "prepare_queries",
    "resize_maps",
    "upsample_sum",
]


@dataclass(frozen=True)
class TokenBuckets:
    """Attribution tokens grouped by prompt length, for the engine.

    The engine visits token columns in ``order`` (a permutation of the concatenated token
    axis) in which prompts of equal token count are adjacent, so that each group
    ``(n_tokens, start, stop)`` is one contiguous slice that reshapes to
    ``(..., n_prompts, n_tokens)``: the per-prompt softmax is then one vectorised call with
    no padding, no mask and no gather.

    ``rows`` (engine order) numbers the distinct embedding rows: equal numbers mean equal
    rows, hence equal keys and scores. A causal text encoder (CLIP) gives every prompt the
    same start-of-text row and prompts with a common beginning ("a photo of a ...") the
    same rows for it; prompts are sorted so that such prompts are adjacent, split into
    groups that share a beginning (several templates of one length give one group each),
    and the engine computes the rows a whole group shares once.
    """

    total: int
    order: torch.Tensor
    groups: tuple[tuple[int, int, int], ...]
    rows: torch.Tensor

    @classmethod
    def from_offsets(cls, offsets: Sequence[int], row_keys: Sequence[object] | None = None) -> TokenBuckets:
        """``row_keys``: one hashable per token, equal for identical embedding rows
        (default: every row distinct)."""
        total = int(offsets[-1])
        keys = list(range(total)) if row_keys is None else list(row_keys)
        ids: dict[object, int] = {}
        row_id = [ids.setdefault(k, len(ids)) for k in keys]
        by_length: dict[int, list[tuple[int, int]]] = {}
        for start, stop in zip(offsets[:-1], offsets[1:]):
            by_length.setdefault(stop - start, []).append((start, stop))
        order: list[int] = []
        groups = []
        for n_tokens, prompts in by_length.items():
            prompts.sort(key=lambda span: row_id[span[0]:span[1]])  # shared beginnings side by side
            for run in _prefix_runs(prompts, row_id, n_tokens):
                groups.append((n_tokens, len(order), len(order) + n_tokens * len(run)))
                for start, stop in run:
                    order.extend(range(start, stop))
        return cls(total=total, order=torch.tensor(order, dtype=torch.long), groups=tuple(groups),
                   rows=torch.tensor([row_id[i] for i in order], dtype=torch.long))

    @property
    def inverse(self) -> torch.Tensor:
        """Indices that restore the token order: ``ordered[inverse]``."""
        return torch.argsort(self.order)

    @property
    def longest(self) -> int:
        return max((n for n, _, _ in self.groups), default=1)

    def shared_prefix(self, start: int, stop: int, n_tokens: int) -> int:
        """How many leading token positions all prompts in engine columns ``start:stop`` share
        (at most ``n_tokens - 1``; 0 for a single prompt)."""
        rows = self.rows[start:stop].view(-1, n_tokens)
        if rows.shape[0] < 2:
            return 0
        same = (rows == rows[:1]).all(dim=0).tolist()
        k = 0
        while k < n_tokens - 1 and same[k]:
            k += 1
        return k


#: Prompts sharing a beginning form their own group (whose shared rows the engine computes
#: once) when at least this many of them share it.
_MIN_RUN = 8


def _prefix_runs(prompts: list[tuple[int, int]], row_id: list[int], n_tokens: int,
                 depth: int = 0) -> list[list[tuple[int, int]]]:
    """Split prompt spans of one length (sorted by rows) into runs that share beginnings.

    All ``prompts`` share their first ``depth`` rows. Those that also share the next row
    with at least ``_MIN_RUN - 1`` others form their own run (recursively, so a run keeps
    the longest beginning common to enough prompts); the others stay together, sharing
    ``depth`` rows. The engine then computes each run's shared rows once per tile.
    """
    if depth >= n_tokens - 1 or len(prompts) < _MIN_RUN:
        return [prompts]
    children: dict[int, list[tuple[int, int]]] = {}
    for span in prompts:
        children.setdefault(row_id[span[0] + depth], []).append(span)
    if len(children) == 1:
        return _prefix_runs(prompts, row_id, n_tokens, depth + 1)
    runs: list[list[tuple[int, int]]] = []
    rest: list[tuple[int, int]] = []
    for child in children.values():
        if len(child) >= _MIN_RUN:
            runs.extend(_prefix_runs(child, row_id, n_tokens, depth + 1))
        else:
            rest.extend(child)
    return runs + ([rest] if rest else [])


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
    prompt chunks, or every epoch of token optimization) do not copy them again.

    The float32 conversion and the transpose are one copy; the query norms are accumulated
    channel by channel over contiguous rows (on CPU a reduction over the middle axis of
    ``(head, channel, pixel)`` is many times slower).
    """
    steps, heads, pixels, channels = queries.shape
    target = torch.device(device) if device is not None else queries.device
    source = queries.to(target, non_blocking=True)
    q = torch.empty((heads, channels, steps, pixels), dtype=torch.float32, device=target)
    q.copy_(source.permute(1, 3, 0, 2))
    q = q.view(heads, channels, steps * pixels)
    if target.type == "cpu":
        squares = torch.zeros((heads, steps * pixels), dtype=torch.float32)
        for c in range(channels):
            squares.addcmul_(q[:, c], q[:, c])
        max_norm = float(squares.amax().sqrt()) if squares.numel() else 0.0
    else:
        max_norm = float(torch.linalg.vector_norm(q, dim=1).amax()) if q.numel() else 0.0
    return PreparedQueries(q, steps, pixels, max_norm)


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
_LOG2_E = 1.4426950408889634
#: bytes of scores (and of queries) one pass of the engine takes on CPU (``MapConfig.memory_budget``)
CPU_MEMORY_BUDGET = 8 * 2**20


def _activate(scores: torch.Tensor, activation: str) -> torch.Tensor:
    """``(head, prompt, token, step*pixel)`` scores → activated, for autograd (token optimization)."""
    if activation == "token_softmax":
        return scores.softmax(dim=2)
    if activation == "sigmoid":
        return scores.sigmoid()
    return scores


def _activate_inplace(keys: torch.Tensor, keys_log2e: torch.Tensor | None, q: torch.Tensor, out: torch.Tensor,
                      n_tokens: int, activation: str, bounded: bool) -> torch.Tensor:
    """Scores of ``keys`` against ``q`` written into ``out`` and activated there.

    Bounded softmax scores take ``exp2`` of the scores of ``keys_log2e`` (the keys times
    log2(e): folded into the few keys, not the many scores): the same values as ``exp`` in
    float32, at a fraction of its cost on CPU. The token sum is inverted once and
    multiplied in.
    """
    if activation == "token_softmax":
        if bounded and keys_log2e is not None:
            torch.bmm(keys_log2e, q, out=out)
            out.exp2_()
        else:
            torch.bmm(keys, q, out=out)
            grouped = out.view(out.shape[0], -1, n_tokens, out.shape[-1])
            grouped.sub_(grouped.amax(dim=2, keepdim=True))
            out.exp_()
        grouped = out.view(out.shape[0], -1, n_tokens, out.shape[-1])
        grouped.mul_(grouped.sum(dim=2, keepdim=True).reciprocal_())
        return out
    torch.bmm(keys, q, out=out)
    return out.sigmoid_() if activation == "sigmoid" else out


def _softmax_into(keys_log2e: torch.Tensor, q: torch.Tensor, out: torch.Tensor, n_tokens: int,
                  target: torch.Tensor) -> None:
    """Bounded token softmax of one chunk of prompts, summed over heads into ``target``
    ``(token, pixel)``: the normalisation and the head sum are one ``addcmul`` per head
    (no pass that writes the normalised scores)."""
    torch.bmm(keys_log2e, q, out=out)
    out.exp2_()
    heads, width = out.shape[0], out.shape[-1]
    grouped = out.view(heads, -1, n_tokens, width)
    inverse = grouped.sum(dim=2, keepdim=True).reciprocal_()
    into = target.view(-1, n_tokens, width)
    for h in range(heads):
        into.addcmul_(grouped[h], inverse[h])


def _width_tiles(steps: int, pixels: int, max_width: int) -> list[tuple[int, int, int, int]]:
    """Split the ``step*pixel`` axis into tiles of at most ``max_width`` columns.

    A tile is ``(first step, pixel start, pixel stop, steps)``: several whole steps when a
    step is small, else a pixel range of one step. A tile's queries stay in cache while every
    prompt chunk meets them, so queries are read from memory once per pass, not once per chunk.
    """
    if pixels <= max_width:
        k = max(1, min(steps, max_width // pixels))
        return [(s, 0, pixels, min(k, steps - s)) for s in range(0, steps, k)]
    n = min(pixels, -(-pixels // max(1, max_width)))
    edges = [round(i * pixels / n) for i in range(n + 1)]
    return [(s, a, b, 1) for s in range(steps) for a, b in zip(edges[:-1], edges[1:])]


def layer_token_maps(
    queries: PreparedQueries,
    keys: torch.Tensor,
    buckets: TokenBuckets,
    *,
    activation: str = "token_softmax",
    memory_budget: int = CPU_MEMORY_BUDGET,
) -> torch.Tensor:
    """Maps of every token for one layer, summed over steps and heads.

    Work is tiled twice: the ``step*pixel`` axis into tiles whose queries fit
    ``memory_budget`` bytes, and, within a tile, the prompts into chunks whose scores fit it
    too, written into one reused buffer. Scores are laid out ``(head, token, pixel)`` so the
    softmax over tokens and the sums run over contiguous pixel vectors. When ``|q|·|k|``
    bounds every score below 80, the softmax skips the max-subtraction pass (the same
    result in float32). With gradients enabled for ``keys`` (token optimization) the same
    maps come from out-of-place, differentiable operations.

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
    ordered = ordered_token_maps(queries, keys[:, buckets.order.to(keys.device)], buckets,
                                 activation=activation, memory_budget=memory_budget)
    return ordered[buckets.inverse.to(keys.device)]


def ordered_token_maps(queries: PreparedQueries, keys: torch.Tensor, buckets: TokenBuckets, *,
                       activation: str = "token_softmax", memory_budget: int = CPU_MEMORY_BUDGET,
                       out: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`layer_token_maps` with keys and maps in engine order (``buckets.order``).

    Sums over layers are linear, so a caller combining layers can stay in engine order and
    restore the token order once, with ``buckets.inverse``; with ``out`` (``(token, pixel)``
    float32, contiguous) the maps are added to it in place, so that layers of one resolution
    are summed with no pass of their own.
    """
    q, steps, pixels = queries.data, queries.steps, queries.pixels
    heads, channels, _ = q.shape
    if torch.is_grad_enabled() and keys.requires_grad:
        ordered = _differentiable_maps(queries, keys, buckets, activation)
        return ordered if out is None else out.add_(ordered)
    k_norm = keys.norm(dim=2).amax(dim=0)  # (token,)
    keys_log2e = (keys * _LOG2_E).contiguous() if activation == "token_softmax" else None
    fused = keys_log2e is not None and _fusable(q, keys_log2e) and (out is None or out.is_contiguous())
    if out is not None:
        ordered = out
    else:  # the kernel writes every pixel of its groups' rows: only torch's need zeros to add to
        ordered = (torch.empty if fused else torch.zeros)((buckets.total, pixels), dtype=torch.float32,
                                                           device=keys.device)
    groups = buckets.groups
    if fused:
        groups = tuple(g for g in groups
                       if not _fused_group(queries, keys_log2e, k_norm, buckets, g, ordered, out is not None))
        if out is None:
            for _, start, stop in groups:
                ordered[start:stop].zero_()
        if not groups:
            return ordered
    tiles = _width_tiles(steps, pixels, max(1, memory_budget // (4 * heads * channels)))
    widest = max(k * (b - a) for _, a, b, k in tiles)
    columns = max(buckets.longest, memory_budget // (heads * widest * 4))
    buffer = torch.empty(heads * min(columns, buckets.total) * widest, dtype=torch.float32, device=keys.device)
    # a beginning shared by every prompt of a group ("a photograph of a ...") is computed once
    # per tile for the whole group; one shared row (the start of text alone) gains nothing
    shared = {}
    if keys_log2e is not None:
        for n_tokens, start, stop in groups:
            prefix = buckets.shared_prefix(start, stop, n_tokens)
            if prefix >= 2 and queries.max_norm * float(k_norm[start:stop].amax()) < _SAFE_EXP:
                shared[start] = prefix
    for step, a, b, k in tiles:  # k whole steps, or pixels a:b of one step
        q_tile = q[:, :, step * pixels + a:(step + k - 1) * pixels + b]
        width = q_tile.shape[-1]
        for n_tokens, start, stop in groups:
            chunk = max(1, columns // n_tokens) * n_tokens
            common = None
            if start in shared:  # exponentials of the shared rows (head, shared, width), and their sum
                common = torch.bmm(keys_log2e[:, start:start + shared[start]], q_tile).exp2_()
                common = (common, common.sum(dim=1, keepdim=True))
            for c0 in range(start, stop, chunk):
                c1 = min(stop, c0 + chunk)
                if common is not None:
                    _shared_prefix_softmax(keys_log2e[:, c0:c1], q_tile, common, buffer, n_tokens, k,
                                           ordered[c0:c1].view(-1, n_tokens, pixels)[:, :, a:b])
                    continue
                bounded = queries.max_norm * float(k_norm[c0:c1].amax()) < _SAFE_EXP
                scores = buffer[:heads * (c1 - c0) * width].view(heads, c1 - c0, width)
                target = ordered[c0:c1, a:b]
                if k == 1 and bounded and keys_log2e is not None:
                    _softmax_into(keys_log2e[:, c0:c1], q_tile, scores, n_tokens, target)
                    continue
                _activate_inplace(keys[:, c0:c1], None if keys_log2e is None else keys_log2e[:, c0:c1],
                                  q_tile, scores, n_tokens, activation, bounded)
                _add_step_head_sum(target, scores, k)
    return ordered


def _fusable(q: torch.Tensor, keys_log2e: torch.Tensor) -> bool:
    """Whether the fused CPU kernel (:mod:`ovstore.analyze.kernel`) can take this layer."""
    return (q.device.type == "cpu" and keys_log2e.device.type == "cpu" and q.dtype == torch.float32
            and keys_log2e.dtype == torch.float32 and q.stride(-1) == 1 and keys_log2e.is_contiguous()
            and fused_kernel() is not None)


def _fused_group(queries: PreparedQueries, keys_log2e: torch.Tensor, k_norm: torch.Tensor, buckets: TokenBuckets,
                 group: tuple[int, int, int], ordered: torch.Tensor, accumulate: bool) -> bool:
    """One group of prompts through the fused kernel, when every score is bounded; False: not
    taken (torch's operations compute it)."""
    n_tokens, start, stop = group
    if queries.max_norm * float(k_norm[start:stop].amax()) >= _SAFE_EXP:
        return False
    return fused_maps(keys_log2e, start, stop, n_tokens, buckets.shared_prefix(start, stop, n_tokens), queries.data,
                      queries.steps, queries.pixels, ordered, threads=torch.get_num_threads(), accumulate=accumulate)


def _add_step_head_sum(target: torch.Tensor, scores: torch.Tensor, steps: int) -> None:
    """Add ``scores`` ``(head, rows, steps*pixel)`` summed over steps and heads into ``target``
    (``rows`` entries of ``pixel``, any shape): steps first, over contiguous pixel rows, then
    heads as a loop of adds, which on CPU beats a reduction over the outer axis."""
    heads, rows = scores.shape[0], scores.shape[1]
    if steps > 1:
        scores = scores.reshape(heads, rows, steps, -1).sum(dim=2)
    for h in range(heads):
        target += scores[h].view(target.shape)


def _shared_prefix_softmax(keys_log2e: torch.Tensor, q: torch.Tensor, common: torch.Tensor, buffer: torch.Tensor,
                           n_tokens: int, steps: int, out: torch.Tensor) -> None:
    """Token softmax of a chunk of prompts whose first tokens are the same rows.

    ``common`` holds the shared rows' exponentials ``(head, shared, width)``, computed once
    for all the prompts; they enter every prompt's denominator, and each prompt's map of
    them is their normalisation by that prompt's denominator. Adds the step- and
    head-summed maps into ``out`` ``(prompt, token, pixel)``.
    """
    common, common_sum = common
    heads, _, channels = keys_log2e.shape
    width, shared = q.shape[-1], common.shape[1]
    prompts, rest = keys_log2e.shape[1] // n_tokens, n_tokens - shared
    grouped = keys_log2e.view(heads, prompts, n_tokens, channels)
    own = buffer[:heads * prompts * rest * width].view(heads, prompts * rest, width)
    torch.bmm(grouped[:, :, shared:].reshape(heads, prompts * rest, channels), q, out=own)
    own = own.exp2_().view(heads, prompts, rest, width)
    inverse = own.sum(dim=2).add_(common_sum).reciprocal_()  # (head, prompt, width)
    own.mul_(inverse[:, :, None])
    products = buffer[own.numel():own.numel() + heads * prompts * shared * width]
    mine = torch.mul(common[:, None], inverse[:, :, None], out=products.view(heads, prompts, shared, width))
    for part, tokens in ((mine, slice(0, shared)), (own, slice(shared, n_tokens))):
        _add_step_head_sum(out[:, tokens], part.reshape(heads, prompts * part.shape[2], width), steps)


def _differentiable_maps(queries: PreparedQueries, keys: torch.Tensor, buckets: TokenBuckets,
                         activation: str) -> torch.Tensor:
    """The maps of :func:`layer_token_maps` from out-of-place operations, for autograd."""
    q, heads = queries.data, queries.data.shape[0]
    pieces = []
    for n_tokens, start, stop in buckets.groups:
        scores = torch.bmm(keys[:, start:stop], q).view(heads, -1, n_tokens, q.shape[-1])
        scores = _activate(scores, activation)
        pieces.append(scores.reshape(heads, stop - start, queries.steps, queries.pixels).sum(dim=2).sum(dim=0))
    return torch.cat(pieces)


def combine_layers(layer_maps: Mapping[str, torch.Tensor], layers: Sequence[LayerInfo],
                   target: tuple[int, int], *, reduction: str = "sum") -> torch.Tensor:
    """Upsample each ``(token, pixel)`` layer map to ``target`` (bilinear, align_corners=False,
    as the reference) and reduce over layers; returns ``(token, height, width)``."""
    return upsample_sum(((info, layer_maps[info.name]) for info in layers), target, reduction=reduction)


def upsample_sum(layer_maps: Iterable[tuple[LayerInfo, torch.Tensor]], target: tuple[int, int], *,
                 reduction: str = "sum", owned: bool = False) -> torch.Tensor:
    """:func:`combine_layers` over ``(layer, (token, pixel) maps)`` pairs, consumed one at a time.

    Upsampling is linear, so layers of one resolution are summed as they come and each
    resolution is upsampled once: memory holds one sum per resolution, not every layer.
    ``owned``: the maps are the caller's to overwrite (fresh engine output), so the first of
    each resolution becomes its sum without a copy.
    """
    by_size: dict[tuple[int, int], torch.Tensor] = {}
    count = 0
    for info, maps in layer_maps:
        size = (info.height, info.width)
        if size in by_size:
            by_size[size].add_(maps)
        else:
            by_size[size] = maps if owned and not maps.requires_grad else maps.clone()
        count += 1
    if not count:
        raise ValueError("combining layer maps needs at least one layer")
    total = None
    for (height, width), maps in by_size.items():
        maps = resize_maps(maps.view(-1, height, width), target)
        total = maps if total is None else total.add_(maps)
    assert total is not None
    if reduction == "mean":
        total = total / count
    return total


def resize_maps(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``(..., h, w)`` maps resized to ``size`` bilinearly (align_corners=False, as the
    reference). Linear, so summing maps (a word's pieces, a class's tokens) before resizing
    gives the same result for a fraction of the work.

    Bilinear resizing is separable: ``A_h · map · A_wᵀ`` with the interpolation weights of
    ``F.interpolate`` in two matrix products, several times faster on CPU than the direct
    kernel for thousands of small maps, equal to it within float32 rounding."""
    size = (int(size[0]), int(size[1]))
    if tuple(maps.shape[-2:]) == size:
        return maps
    lead = maps.shape[:-2]
    h, w = maps.shape[-2:]
    if maps.dtype not in (torch.float32, torch.float64) or 0 in maps.shape:
        flat = maps.reshape(-1, 1, h, w)
        return F.interpolate(flat, size=size, mode="bilinear", align_corners=False).reshape(*lead, *size)
    rows = _bilinear_matrix(h, size[0], maps.dtype, maps.device)
    cols = _bilinear_matrix(w, size[1], maps.dtype, maps.device)
    flat = maps.reshape(-1, h, w)
    return torch.matmul(rows, torch.matmul(flat, cols.t())).reshape(*lead, *size)


@functools.lru_cache(maxsize=64)
def _bilinear_matrix(n_in: int, n_out: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``(n_out, n_in)`` weights of 1-D bilinear resizing, align_corners=False, computed in
    float32 as ``F.interpolate`` computes its source positions."""
    with torch.inference_mode(False):  # cached: usable under autograd (token optimization) too
        scale = torch.tensor(n_in / n_out, dtype=torch.float32)
        source = ((torch.arange(n_out, dtype=torch.float32) + 0.5) * scale - 0.5).clamp_min(0)
        low = source.floor().long().clamp_max(n_in - 1)
        frac = source - low
        high = torch.where(low < n_in - 1, low + 1, low)
        matrix = torch.zeros((n_out, n_in), dtype=torch.float32)
        index = torch.arange(n_out)
        matrix.index_put_((index, low), 1 - frac, accumulate=True)
        matrix.index_put_((index, high), frac, accumulate=True)
        return matrix.to(dtype=dtype, device=device)


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

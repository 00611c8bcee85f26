"""Recording the averaged self-attention (``attn1``) matrix of each image during generation.

Refinements of cross-attention maps (OVAM's weighting, ``SA^k · CA``, iSeg) need one matrix per
image and latent grid: ``softmax(Q·Kᵀ·scale)`` of every ``attn1`` layer at that grid, averaged
over heads, over the stored denoiser calls and over the layers. Forward hooks on each layer's
``to_q`` and ``to_k`` (which a self-attention layer applies to the same hidden states, ``to_q``
first) see ``Q`` and ``K`` under any attention processor without changing the computation; the
matrix is accumulated in float32 on the device, heads in groups of bounded size (an SD 1.5
64x64 layer would need 8 x 4096² floats at once), and only the average of a batch is copied to the host. Storing the
matrix rather than the ``attn1`` queries and keys is a measured choice (docs/store-format.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..errors import InvalidInputError

__all__ = ["SelfAttentionRecorder", "check_self_attention_grids", "parse_self_attention"]

#: Scores of several heads are computed at once up to this many bytes (an SD 1.5 64x64 head of
#: one image is 64 MiB: one head at a time there; the toy model's 16x16 heads all at once).
_CHUNK_BYTES = 256 * 2**20


def parse_self_attention(spec: str | Sequence[str | int | tuple[int, int]] | None) -> tuple[tuple[int, int], ...]:
    """``--self-attention``: ``"16"``, ``"16,32"``, ``"32x32"`` (or a list of those) as latent
    grids ``((16, 16), (32, 32))``; ``None`` or empty: none."""
    from ..selection import parse_resolution

    if spec is None:
        return ()
    items = [p for p in spec.split(",")] if isinstance(spec, str) else list(spec)
    grids = []
    for item in items:
        if isinstance(item, str) and not item.strip():
            continue
        grid = tuple(item) if isinstance(item, tuple) else parse_resolution(item.strip() if isinstance(item, str)
                                                                            else item)
        if not all(isinstance(v, int) and 1 <= v <= 1024 for v in grid):
            raise InvalidInputError(f"--self-attention {item!r}: a latent grid side is a whole number 1..1024, "
                                    "e.g. --self-attention 32 or 16,32")
        if grid not in grids:
            grids.append(grid)
    if isinstance(spec, str) and spec.strip() and not grids:
        raise InvalidInputError(f"--self-attention {spec!r}: give one or more latent grids, e.g. 32 or 16,32")
    return tuple(sorted(grids))  # type: ignore[arg-type]


def check_self_attention_grids(grids: Sequence[tuple[int, int]],
                               layers: Sequence[tuple[str, int, int, Any]]) -> None:
    """Refuse a grid no self-attention layer of the pipeline runs at, naming those that exist."""
    available = sorted({(h, w) for _, h, w, _ in layers}, reverse=True)
    for grid in grids:
        if grid not in available:
            raise InvalidInputError(
                f"--self-attention {grid[0]}x{grid[1]}: the pipeline's self-attention layers run at "
                f"{', '.join(f'{h}x{w}' for h, w in available)} (at this image size); choose among those")


class SelfAttentionRecorder:
    """Hooks that average ``softmax(Q·Kᵀ·scale)`` of the ``attn1`` layers at chosen grids.

    It follows a :class:`~ovstore.capture.recorder.QueryRecorder` (entered first): its call
    counter decides which calls are stored and its ``_select`` which halves of the batch.

    Parameters
    ----------
    queries
        The capture's query recorder.
    layers
        ``(name, height, width, attention module)`` of the self-attention layers to average.
    grids
        Latent grids to record (every one must have a layer).
    """

    def __init__(self, queries: Any, layers: Sequence[tuple[str, int, int, Any]],
                 grids: Sequence[tuple[int, int]]) -> None:
        check_self_attention_grids(grids, layers)
        self.queries = queries
        self.grids = tuple(grids)
        self.layers = [(name, h, w, m) for name, h, w, m in layers if (h, w) in self.grids]
        self._handles: list[Any] = []
        self._q: dict[str, torch.Tensor] = {}
        self._sums: dict[tuple[int, int], torch.Tensor] = {}
        self._counts: dict[tuple[int, int], int] = {}

    def start_batch(self) -> None:
        """Forget the previous batch's sums."""
        self._q, self._sums, self._counts = {}, {}, {}

    def __enter__(self) -> SelfAttentionRecorder:
        for name, h, w, module in self.layers:
            self._handles.append(module.to_q.register_forward_hook(self._on_q(name)))
            self._handles.append(module.to_k.register_forward_hook(self._on_k(name, (h, w), module)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _stored(self) -> bool:
        rec = self.queries
        return rec._call in rec.calls and rec._keeps_branch()

    def _on_q(self, name: str) -> Any:
        def hook(module: Any, inputs: tuple, out: torch.Tensor) -> None:
            if self._stored():
                self._q[name] = out.detach()
        return hook

    def _on_k(self, name: str, grid: tuple[int, int], attention: Any) -> Any:
        def hook(module: Any, inputs: tuple, out: torch.Tensor) -> None:
            q = self._q.pop(name, None)
            if q is None or not self._stored():
                return
            q, _ = self.queries._select(q)  # (image, branch, pixel, heads * head_dim)
            k, _ = self.queries._select(out.detach())
            n, nb, pixels, inner = q.shape
            if pixels != grid[0] * grid[1] or k.shape[2] != pixels:
                raise InvalidInputError(f"self-attention layer {name} saw {pixels} query and {k.shape[2]} key pixels, "
                                        f"expected {grid[0]}x{grid[1]}; is the UNet a standard UNet2DConditionModel?")
            heads = attention.heads
            q = q.float().reshape(n, nb, pixels, heads, inner // heads)
            k = k.float().reshape(n, nb, pixels, heads, inner // heads)
            total = self._sums.get(grid)
            if total is None:
                total = self._sums[grid] = torch.zeros((n, nb, pixels, pixels), dtype=torch.float32, device=q.device)
            # heads in groups whose scores fit _CHUNK_BYTES (at least one: one matrix per image at a time)
            group = max(1, min(heads, _CHUNK_BYTES // max(4 * n * nb * pixels * pixels, 1)))
            for start in range(0, heads, group):
                part = slice(start, min(start + group, heads))
                scores = torch.einsum("ibphc,ibqhc->ibhpq", q[..., part, :], k[..., part, :]) * float(attention.scale)
                total += torch.softmax(scores, dim=-1).sum(dim=2) / heads
            self._counts[grid] = self._counts.get(grid, 0) + 1
        return hook

    def result(self) -> dict[tuple[int, int], torch.Tensor]:
        """The batch's averaged matrices by grid, ``(image, branch, H*W, H*W)`` float32 on the host."""
        out = {}
        for grid in self.grids:
            if not self._counts.get(grid):
                raise InvalidInputError(f"no {grid[0]}x{grid[1]} self-attention call was recorded; the pipeline did "
                                        "not run its attn1 layers as a UNet2DConditionModel does")
            out[grid] = (self._sums[grid] / self._counts[grid]).cpu()
        return out

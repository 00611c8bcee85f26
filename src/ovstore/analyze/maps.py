"""OVAM maps from a store: the public entry point of analysis.

Reads each image's stored queries once per call, evaluates every attribution prompt in
batched passes, and returns one :class:`xarray.DataArray` for all of them.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from .. import dims
from ..errors import InvalidInputError
from ..selection import resolve_indices
from ..store.format import LayerInfo
from ..store.reader import Store, open_store
from .config import MapConfig
from .engine import (
    PreparedQueries,
    TokenBuckets,
    combine_layers,
    layer_keys,
    layer_token_maps,
    normalize_maps,
    prepare_queries,
)
from .text import Attribution, TextEncoder, embedding_matrix, load_text_encoder

if TYPE_CHECKING:
    import xarray as xr

__all__ = ["compute_maps", "iter_image_maps", "split_by_prompt", "MapPlan"]


class MapPlan:
    """Everything resolved before the pass over images: layers, steps, branch and the
    stored key projections. Keys for any embedding follow from :meth:`keys`, so the same
    plan serves fixed prompts and token optimization."""

    def __init__(self, store: Store, config: MapConfig, device: str = "cpu") -> None:
        self.store = store
        self.config = config
        self.device = device
        names = config.layers.select([(l.name, l.resolution) for l in store.layers])
        self.layers: list[LayerInfo] = [store.layout.layer(n) for n in names]
        self.steps = resolve_indices(config.steps, store.layout.n_steps, what="stored step")
        self.branch = self._branch_index(config.branch)
        largest = max(self.layers, key=lambda l: l.height * l.width)
        self.target = (largest.height, largest.width)
        self.projections = {}
        for info in self.layers:
            w, b = store.key_projection(info.name)
            self.projections[info.name] = (torch.from_numpy(w).to(device), torch.from_numpy(b).to(device))

    def keys(self, embedding: torch.Tensor) -> dict[str, torch.Tensor]:
        """Scaled keys ``(head, token, channel)`` per layer for ``(token, hidden)`` embeddings."""
        hidden = int(embedding.shape[-1])
        for info in self.layers:
            if info.key_input_dim != hidden:
                raise InvalidInputError(
                    f"the text embeddings have {hidden} channels but layer {info.name} projects "
                    f"{info.key_input_dim}; use the text encoder of the captured model "
                    f"({self.store.layout.model.id})"
                )
        embedding = embedding.to(self.device)
        return {info.name: layer_keys(embedding, *self.projections[info.name], info) for info in self.layers}

    def _branch_index(self, branch: str | None) -> int:
        branches = self.store.layout.branches
        if branch is None:
            return 0
        if branch not in branches:
            raise InvalidInputError(
                f"branch {branch!r} is not stored in {self.store.path}; stored: {', '.join(branches)}"
            )
        return branches.index(branch)

    def read(self, image: int) -> dict[str, PreparedQueries]:
        """One image's queries for the planned layers and steps, laid out for the engine."""
        out = {}
        for info in self.layers:
            q = self.store.queries(info.name, image, branch=self.branch, steps=self.steps)
            q = torch.from_numpy(q).reshape(q.shape[0], q.shape[1], -1, q.shape[-1])
            out[info.name] = prepare_queries(q, self.device)
        return out

    def image_maps(self, queries: dict[str, PreparedQueries], keys: dict[str, torch.Tensor],
                   buckets: TokenBuckets) -> torch.Tensor:
        """Maps of every token for one image: ``(token, height, width)`` float32."""
        cfg = self.config
        per_layer = {}
        for info in self.layers:
            maps = layer_token_maps(queries[info.name], keys[info.name],
                                    buckets, activation=cfg.activation,
                                    memory_budget=cfg.memory_budget)
            if cfg.head_reduction == "mean":
                maps = maps / info.heads
            if cfg.step_reduction == "mean":
                maps = maps / len(self.steps)
            per_layer[info.name] = maps
        maps = combine_layers(per_layer, self.layers, self.target, reduction=cfg.layer_reduction)
        if cfg.size is not None and tuple(cfg.size) != self.target:
            maps = F.interpolate(maps[:, None], size=tuple(cfg.size), mode="bilinear", align_corners=False)[:, 0]
        return normalize_maps(maps, cfg.normalize)


def _attributions(store: Store, items: Sequence[str | Attribution], text_encoder: TextEncoder | None,
                  model: str | None, device: str) -> list[Attribution]:
    if isinstance(items, (str, Attribution)):
        items = [items]
    if not items:
        raise InvalidInputError("no attribution prompt given; pass --attribution TEXT")
    texts = [x for x in items if isinstance(x, str)]
    encoded: dict[str, Attribution] = {}
    if texts:
        if text_encoder is None:
            text_encoder = load_text_encoder(store.layout.model, model=model, device=device)
            recorded = store.layout.model.text_encoder_fingerprint
            if recorded and model is None and text_encoder.fingerprint() != recorded:
                warnings.warn(
                    f"the text encoder loaded for {store.layout.model.id!r} differs from the one "
                    "the store was captured with; maps may be meaningless", stacklevel=3)
        for att in text_encoder.encode(list(dict.fromkeys(texts))):
            encoded[att.label] = att
    return [encoded[x] if isinstance(x, str) else x for x in items]


def iter_image_maps(plan: MapPlan, images: Sequence[int], keys: dict[str, torch.Tensor],
                    buckets: TokenBuckets) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(image, maps)`` while the next image's queries are read in a thread."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ovstore-read") as pool:
        pending = pool.submit(plan.read, images[0]) if images else None
        for k, image in enumerate(images):
            queries = pending.result()
            if k + 1 < len(images):
                pending = pool.submit(plan.read, images[k + 1])
            with torch.inference_mode():
                maps = plan.image_maps(queries, keys, buckets)
            yield image, maps


def compute_maps(
    store: Store | str | Path,
    attributions: Sequence[str | Attribution] | str,
    *,
    images: Sequence[int] | None = None,
    config: MapConfig | None = None,
    text_encoder: TextEncoder | None = None,
    model: str | None = None,
    device: str = "cpu",
    progress: Callable[[int], None] | None = None,
) -> xr.DataArray:
    """OVAM attention maps of attribution prompts over stored images.

    Parameters
    ----------
    store
        A :class:`~ovstore.store.Store` or its path.
    attributions
        Attribution prompts (any words, in the generation prompt or not) and/or
        :class:`Attribution` objects (e.g. optimized tokens).
    images
        Image indices (default: every complete image).
    config
        :class:`MapConfig`; the default reproduces the OVAM reference.
    text_encoder, model
        A loaded :class:`TextEncoder`, or a model to load one from instead of the recorded
        one. Only the tokenizer and text encoder are loaded, never the UNet.
    device
        ``"cpu"`` or ``"cuda"``.

    Returns
    -------
    xarray.DataArray
        float32 with dims ``(image, token, y, x)``. The ``token`` axis concatenates the
        tokens of every attribution; its coordinates ``prompt``, ``prompt_index``,
        ``position``, ``token_str`` and ``token_id`` say which is which (see
        :func:`split_by_prompt`).

    Examples
    --------
    >>> maps = compute_maps("captures.zarr", ["a cat and a sofa", "furniture"])  # doctest: +SKIP
    >>> maps.isel(token=maps.prompt_index == 1)  # doctest: +SKIP
    """
    import xarray as xr

    store = store if isinstance(store, Store) else open_store(store)
    config = config or MapConfig()
    images = store.check_images(images)
    atts = _attributions(store, attributions, text_encoder, model, device)
    plan = MapPlan(store, config, device=device)
    embedding, offsets = embedding_matrix(atts)
    keys = plan.keys(embedding)
    out = None
    for k, (image, maps) in enumerate(iter_image_maps(plan, images, keys, TokenBuckets.from_offsets(offsets))):
        if out is None:
            out = np.empty((len(images), *maps.shape), dtype=np.float32)
        out[k] = maps.detach().cpu().numpy()
        if progress is not None:
            progress(image)
    assert out is not None
    return xr.DataArray(out, dims=(dims.IMAGE, dims.TOKEN, dims.Y, dims.X),
                        coords=_coords(store, images, atts), name="ovam_maps",
                        attrs=_attrs(store, plan))


def _coords(store: Store, images: Sequence[int], atts: Sequence[Attribution]) -> dict[str, Any]:
    prompt, prompt_index, position, token_str, token_id = [], [], [], [], []
    for k, att in enumerate(atts):
        for j, tok in enumerate(att.tokens):
            prompt.append(att.label)
            prompt_index.append(k)
            position.append(j)
            token_str.append(tok)
            token_id.append(att.token_ids[j] if att.token_ids is not None else -1)
    return {
        dims.IMAGE: np.asarray(images, dtype=np.int64),
        "generation_prompt": (dims.IMAGE, np.asarray([store.record(i).prompt for i in images], dtype=str)),
        "prompt": (dims.TOKEN, np.asarray(prompt, dtype=str)),
        "prompt_index": (dims.TOKEN, np.asarray(prompt_index, dtype=np.int64)),
        "position": (dims.TOKEN, np.asarray(position, dtype=np.int64)),
        "token_str": (dims.TOKEN, np.asarray(token_str, dtype=str)),
        "token_id": (dims.TOKEN, np.asarray(token_id, dtype=np.int64)),
    }


def _attrs(store: Store, plan: MapPlan) -> dict[str, Any]:
    cfg = plan.config
    return {
        "store": str(store.path),
        "model": store.layout.model.id,
        "layers": [l.name for l in plan.layers],
        "steps": list(plan.steps),
        "branch": store.layout.branches[plan.branch],
        "activation": cfg.activation,
        "head_reduction": cfg.head_reduction,
        "step_reduction": cfg.step_reduction,
        "layer_reduction": cfg.layer_reduction,
        "normalize": cfg.normalize,
    }


def split_by_prompt(maps: xr.DataArray) -> list[xr.DataArray]:
    """One DataArray per attribution prompt, each with only that prompt's tokens."""
    index = maps["prompt_index"].values
    return [maps.isel(token=np.flatnonzero(index == k)) for k in np.unique(index)]

"""OVAM maps from a store: the public entry point of analysis.

Reads each image's stored queries once per call and evaluates every attribution prompt in
batched passes. Prompts are split into blocks whose keys and maps fit a memory budget, so
ten thousand prompts over a thousand images run in bounded memory: :func:`iter_map_blocks`
yields one (image, block of tokens) at a time, :func:`compute_maps` gathers them into one
:class:`xarray.DataArray`, and :func:`~ovstore.analyze.export.write_maps_zarr` streams them
to disk.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .. import dims
from ..devices import check_device
from ..errors import InvalidInputError, StoreError
from ..inputs import Line, check_memory
from ..selection import resolve_indices
from ..store import IMAGE_OUTPUTS, LayerInfo, Store, open_store
from .cache import QueryCache, shared_query_cache, store_cache_key, stored_key_projection
from .config import MapConfig
from .engine import (
    CPU_MEMORY_BUDGET,
    PreparedQueries,
    TokenBuckets,
    normalize_maps,
    ordered_token_maps,
    prepare_queries,
    resize_maps,
    upsample_sum,
)
from .text import (
    Attribution,
    TextEncoder,
    check_encoder_family,
    check_recorded_encoder,
    embedding_matrix,
    load_text_encoder,
    row_keys,
)

if TYPE_CHECKING:
    import xarray as xr

__all__ = [
    "MapBlock",
    "MapPlan",
    "PromptBlock",
    "compute_maps",
    "iter_image_maps",
    "iter_map_blocks",
    "map_coords",
    "prepare_attributions",
    "split_by_prompt",
]


def _checked_projection(store: Store, layer: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer's stored ``to_k`` weight and bias as CPU tensors, refused when not finite."""
    w, b = store.key_projection(layer)
    if not (np.isfinite(w).all() and (b is None or np.isfinite(b).all())):  # every map would be NaN
        raise StoreError(f"layer {layer}: the stored key projection holds NaN or Inf, so every map "
                         f"would be NaN; `ovstore verify {store.path}` reports it; restore the store "
                         "from a copy, or capture it again (not one image: --skip-damaged cannot help)")
    return torch.from_numpy(w), torch.from_numpy(b)


class MapPlan:
    """Everything resolved before the pass over images: layers, steps, branch and the
    stored key projections. Keys for any embedding follow from :meth:`keys`, so the same
    plan serves fixed prompts and token optimization."""

    def __init__(self, store: Store, config: MapConfig, device: str = "cpu",
                 query_cache: QueryCache | None = None) -> None:
        self.store = store
        self._early: tuple[int, Any] | None = None  # a read begun ahead (start_reading): (image, future)
        #: where :meth:`read` keeps prepared queries for the next call on the same image (None: read each time)
        self.query_cache = query_cache
        self.config = config
        self.device = check_device(device)
        self.memory_budget = config.memory_budget or (CPU_MEMORY_BUDGET if self.device.type == "cpu" else 256 * 2**20)
        #: CPU layers evaluated in parallel, one per torch thread of the caller (each worker's
        #: operations single-threaded: small operations scale far better this way)
        self.workers = max(1, torch.get_num_threads()) if self.device.type == "cpu" else 1
        try:
            names = config.layers.select([(l.name, l.resolution) for l in store.layers])
            self.steps = resolve_indices(config.steps, store.layout.n_steps, what="stored call")
        except InvalidInputError as exc:
            preset = store.layout.extra.get("preset", "full")
            if preset == "full":
                raise
            raise InvalidInputError(f"{exc}; the store was captured with --preset {preset}, which does not store the others: "
                                    "capture again with --preset full (or a preset that keeps them)") from None
        self.layers: list[LayerInfo] = [store.layout.layer(n) for n in names]
        self.branch = self._branch_index(config.branch)
        # as the reference: the largest resolution among the layers used (--size for another)
        largest = max(self.layers, key=lambda l: l.height * l.width)
        self.target = (largest.height, largest.width)
        self.size = tuple(config.size) if config.size is not None else self.target
        from ..families import get_family

        #: the store's model family: it turns encoded rows into each layer's keys
        self.family = get_family(store.layout.model.family)
        self.projections = {info.name: tuple(t.to(device) for t in stored_key_projection(
            store, info.name, functools.partial(_checked_projection, store, info.name))) for info in self.layers}
        self.output_space = config.space == "output"
        if self.output_space:  # before the stored weights are read
            _check_output_space(store, self.family)
        #: families whose keys depend on the image (MM-DiT: the text stream attends it) keep
        #: what they need for every image here (their stored weights on the device)
        self.family_state = (self.family.analysis_state(store, self.layers, self.device)
                             if self.family.image_dependent_keys else None)
        #: the stored self-attention grid a refinement uses (a store without any: one line, now)
        self.refine_grid = store._self_attention_grid(config.refine.resolution) if config.refine else None
        self._self_attention: tuple[int, torch.Tensor] | None = None

    def self_attention(self, image: int) -> torch.Tensor:
        """The image's stored self-attention matrix for the refinement, on the device (the
        last image's is kept: every prompt block of an image meets the same one)."""
        if self._self_attention is None or self._self_attention[0] != image:
            sa = self.store.self_attention(image, self.refine_grid, branch=self.branch)
            self._self_attention = (image, torch.from_numpy(sa.astype(np.float32)).to(self.device))
        return self._self_attention[1]

    def bytes_per_token(self) -> int:
        """Memory one attribution token takes while one image is evaluated: its keys (twice:
        the softmax keeps a log2(e)-scaled copy), one running sum per resolution and the
        upsampled map."""
        keys = sum(info.heads * info.head_dim for info in self.layers)
        if self.family.image_dependent_keys:  # one set of keys per stored call, plus the text stream
            keys *= len(self.steps) + 4
        sums = sum(h * w for h, w in {(l.height, l.width) for l in self.layers})
        in_flight = self.workers * max(l.height * l.width for l in self.layers)  # layer maps being summed
        return 4 * (2 * keys + sums + in_flight + 2 * self.target[0] * self.target[1] + self.size[0] * self.size[1])

    def ordered_keys(self, embedding: torch.Tensor, buckets: TokenBuckets,
                     image: int | None = None, inputs: Any | None = None) -> dict[str, torch.Tensor]:
        """:meth:`keys` of the tokens in engine order (``buckets.order``), as :meth:`image_maps` takes them.
        Families with image-dependent keys need ``image`` (their keys are per stored call:
        ``(step, head, token, channel)``) and take that image's :meth:`key_inputs` if given."""
        ordered = embedding[buckets.order.to(embedding.device)]
        if not self.family.image_dependent_keys:
            return self.keys(ordered)
        if image is None:
            raise InvalidInputError(f"the {self.family.name} family's keys depend on the image; this analysis "
                                    "does not support it yet")
        self.keys(ordered[:0])  # the width check
        extra = {} if inputs is None else {"inputs": inputs}
        if self.output_space:
            extra["space"] = "output"
        return self.family.image_layer_keys(self.family_state, self.store, image, self.branch, self.steps,
                                            self.layers, ordered.to(self.device), buckets.groups, **extra)

    def key_inputs(self, image: int) -> Any | None:
        """What an image-dependent family reads of ``image`` to compute keys (its stored image
        keys/values and conditioning), read once for :meth:`ordered_keys` to take many times
        (token optimization); ``None`` for families whose keys do not depend on the image."""
        if not self.family.image_dependent_keys:
            return None
        return self.family.image_key_inputs(self.family_state, self.store, image, self.branch, self.steps,
                                            self.layers)

    @property
    def keys_per_image(self) -> bool:
        """Whether keys must be computed for every image (MM-DiT families)."""
        return bool(self.family.image_dependent_keys)

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
        if self.family.image_dependent_keys:
            return {}
        return {info.name: self.family.layer_keys(embedding, self.projections[info.name], info)
                for info in self.layers}

    def _branch_index(self, branch: str | None) -> int:
        branches = self.store.layout.branches
        if branch is None:
            return 0
        if branch not in branches:
            raise InvalidInputError(
                f"branch {branch!r} is not stored in {self.store.path}; stored: {', '.join(branches)}"
            )
        return branches.index(branch)

    def start_reading(self, image: int) -> None:
        """Begin :meth:`read` of ``image`` in a background thread (the first image of a run, while
        its prompts are encoded); the next :meth:`read` of it takes the result."""
        self._early = (int(image), _read_pool().submit(self._read, image))

    def read(self, image: int) -> dict[str, PreparedQueries]:
        """One image's queries for the planned layers and steps, laid out for the engine:
        from :attr:`query_cache` when an earlier call left them there, else :meth:`read_store`."""
        early, self._early = self._early, None
        if early is not None:
            if early[0] == int(image):
                return early[1].result()
            early[1].cancel()
        return self._read(image)

    def _read(self, image: int) -> dict[str, PreparedQueries]:
        if self.query_cache is None:
            return self.read_store(image)
        key = (store_cache_key(self.store), int(image), str(self.device), self.branch, tuple(self.steps),
               self.output_space, tuple(info.name for info in self.layers))
        return self.query_cache.get(key, functools.partial(self.read_store, image))

    def read_store(self, image: int) -> dict[str, PreparedQueries]:
        """One image's queries for the planned layers and steps, read from the store and laid out.

        On CPU with several threads the layers are read and laid out in parallel
        (decompression and the layout copy release the GIL)."""

        def read_layer(info: LayerInfo) -> PreparedQueries:
            if self.output_space:  # the image attention outputs, as one head of the block's width
                q = self.store.layer_array(info.name, IMAGE_OUTPUTS, image, branch=self.branch, steps=self.steps)
                q = torch.from_numpy(q).permute(0, 2, 3, 1, 4).reshape(q.shape[0], 1, -1, q.shape[1] * q.shape[-1])
            else:
                q = self.store.queries(info.name, image, branch=self.branch, steps=self.steps)
                q = torch.from_numpy(q).reshape(q.shape[0], q.shape[1], -1, q.shape[-1])
            prepared = prepare_queries(q, self.device)
            if not math.isfinite(prepared.max_norm):  # the bound the softmax needs anyway: no extra pass
                raise StoreError(
                    f"image {image}, layer {info.name}: the stored queries hold NaN or Inf (written by other "
                    "software, or a generation that overflowed, e.g. float16 on CPU), which would make NaN maps; "
                    f"`ovstore verify {self.store.path}` lists every such image: recapture them "
                    "(--torch-dtype float32), or leave them out with --skip-damaged"
                )
            return prepared

        if self.workers > 1 and len(self.layers) > 1:
            prepared = list(_layer_pool(self.workers).map(read_layer, self.layers))
        else:
            prepared = [read_layer(info) for info in self.layers]
        return {info.name: p for info, p in zip(self.layers, prepared)}

    def image_maps(self, queries: dict[str, PreparedQueries], keys: dict[str, torch.Tensor],
                   buckets: TokenBuckets, image: int | None = None) -> torch.Tensor:
        """Maps of every token for one image: ``(token, height, width)`` float32, in token
        order; ``keys`` from :meth:`ordered_keys`. With a ``config.refine``, ``image`` (its store
        index) gives the self-attention matrix the maps are refined with."""
        cfg = self.config

        def layer_maps(info: LayerInfo) -> tuple[LayerInfo, torch.Tensor]:
            q, k = queries[info.name], keys[info.name]
            if k.dim() == 4:  # keys per stored call (MM-DiT): each call's queries meet its own keys
                p = q.pixels
                maps = sum(ordered_token_maps(PreparedQueries(q.data[:, :, s * p:(s + 1) * p], 1, p, q.max_norm),
                                              k[s], buckets, activation=cfg.activation,
                                              memory_budget=self.memory_budget) for s in range(q.steps))
            else:
                maps = ordered_token_maps(q, k, buckets, activation=cfg.activation, memory_budget=self.memory_budget)
            if cfg.head_reduction == "mean" and not self.output_space:  # output space: one dot over all heads
                maps = maps / info.heads
            if cfg.step_reduction == "mean":
                maps = maps / len(self.steps)
            return info, maps

        differentiable = torch.is_grad_enabled() and any(k.requires_grad for k in keys.values())
        if self.workers > 1 and not differentiable and len(self.layers) > 1:
            # layers are independent: one per worker thread (torch ops release the GIL), the
            # costliest first; results are summed as they complete, so only `workers` layer maps
            # are held besides one sum per resolution
            inference = torch.is_inference_mode_enabled()

            def in_worker(info: LayerInfo) -> tuple[LayerInfo, torch.Tensor]:
                with torch.inference_mode(inference):
                    return layer_maps(info)

            pool = _layer_pool(self.workers)
            costly_first = sorted(self.layers, key=lambda l: -l.height * l.width * l.heads * (l.head_dim + 8))
            futures = [pool.submit(in_worker, info) for info in costly_first]
            per_layer = (f.result() for f in as_completed(futures))
        elif (cfg.head_reduction, cfg.step_reduction, cfg.layer_reduction) == ("sum", "sum", "sum") and all(
                keys[info.name].dim() == 3 for info in self.layers):
            # one layer at a time, each added by the engine into its resolution's sum (no pass of its own)
            sums: dict[tuple[int, int], tuple[LayerInfo, torch.Tensor]] = {}  # per resolution: a layer, the sum
            for info in self.layers:
                size = (info.height, info.width)
                first, total = sums.get(size, (info, None))
                sums[size] = first, ordered_token_maps(queries[info.name], keys[info.name], buckets,
                                                       activation=cfg.activation, memory_budget=self.memory_budget,
                                                       out=total)
            per_layer = iter(sums.values())
        else:  # consumed one layer at a time: only one sum per resolution is kept
            per_layer = (layer_maps(info) for info in self.layers)
        maps = upsample_sum(per_layer, self.target, reduction=cfg.layer_reduction, owned=True)  # fresh engine maps
        maps = maps[buckets.inverse.to(maps.device)]
        if cfg.refine is not None:
            if image is None:
                raise InvalidInputError("a self-attention refinement needs the image's index (image_maps(..., image=))")
            maps = cfg.refine.apply(maps, self.self_attention(image))
        return normalize_maps(resize_maps(maps, self.size), cfg.normalize)


def _check_output_space(store: Store, family: Any) -> None:
    """Refuse output-space maps where the store cannot give them (one line naming the fix)."""
    if not family.image_dependent_keys:
        raise InvalidInputError(f"--space output (ConceptAttention's output-space maps) applies to MM-DiT stores "
                                f"(SD3, FLUX); {store.path} is a {family.name} store: use --space attention")
    if IMAGE_OUTPUTS not in store.layout.layer_arrays:
        raise InvalidInputError(f"store {store.path} holds no image attention outputs, which --space output needs: "
                                "capture it again with --image-outputs, or use --space attention")


_POOLS: dict[int, ThreadPoolExecutor] = {}


_READ_POOL: list[ThreadPoolExecutor] = []


def _read_pool() -> ThreadPoolExecutor:
    """One lasting thread for reads begun ahead of their use (:meth:`MapPlan.start_reading`)."""
    if not _READ_POOL:
        _READ_POOL.append(ThreadPoolExecutor(1, thread_name_prefix="ovstore-early-read"))
    return _READ_POOL[0]


def _forget_pools() -> None:
    """In a forked child the pools' threads do not exist: new pools are made on first use."""
    _READ_POOL.clear()
    _POOLS.clear()


os.register_at_fork(after_in_child=_forget_pools)


def _layer_pool(workers: int) -> ThreadPoolExecutor:
    """A lasting pool of ``workers`` threads whose torch operations run single-threaded."""
    if workers not in _POOLS:
        _POOLS[workers] = ThreadPoolExecutor(workers, thread_name_prefix="ovstore-layer",
                                             initializer=torch.set_num_threads, initargs=(1,))
    return _POOLS[workers]


@dataclass(frozen=True)
class PromptBlock:
    """Consecutive attributions whose keys and maps fit the memory budget together.

    ``tokens`` is the block's slice of the concatenated token axis of all attributions.
    """

    attributions: tuple[Attribution, ...]
    tokens: slice
    embedding: torch.Tensor
    buckets: TokenBuckets


@dataclass(frozen=True)
class MapBlock:
    """Maps of one block of tokens on one image: ``maps`` is ``(tokens, height, width)``.

    ``position`` is the image's index in the requested list, ``image`` its store index and
    ``tokens`` the block's slice of the token axis.
    """

    position: int
    image: int
    tokens: slice
    maps: torch.Tensor


def prompt_blocks(attributions: Sequence[Attribution], bytes_per_token: int,
                  budget: int) -> list[PromptBlock]:
    """Split attributions (never one prompt) into blocks of at most ``budget`` bytes."""
    limit = max(1, budget // max(bytes_per_token, 1))
    blocks: list[PromptBlock] = []
    start, first, count = 0, 0, 0
    for k, att in enumerate(attributions):
        if count and count + att.n_tokens > limit:
            blocks.append(_block(attributions[first:k], start))
            start, first, count = start + count, k, 0
        count += att.n_tokens
    if count:
        blocks.append(_block(attributions[first:], start))
    return blocks


def _block(attributions: Sequence[Attribution], start: int) -> PromptBlock:
    embedding, offsets = embedding_matrix(attributions)
    return PromptBlock(tuple(attributions), slice(start, start + int(offsets[-1])), embedding,
                       TokenBuckets.from_offsets(offsets, row_keys(attributions)))


def prepare_attributions(store: Store, items: Sequence[str | Attribution] | str, *,
                         text_encoder: TextEncoder | None = None, model: str | None = None,
                         device: str = "cpu") -> list[Attribution]:
    """Encode attribution prompts (with the recorded text encoder unless one is given) and
    keep ready :class:`Attribution` objects (e.g. learned tokens) as they are. Prompts read
    from a file as :class:`ovstore.inputs.Line` keep their line number (``Attribution.line``)."""
    if isinstance(items, (str, Attribution, Line)):
        items = [items]
    if not items:
        raise InvalidInputError("no attribution prompt given; pass --attribution TEXT")
    texts = [x.text if isinstance(x, Line) else x for x in items if isinstance(x, (str, Line))]
    encoded: dict[str, Attribution] = {}
    if texts:
        if text_encoder is None:
            text_encoder = load_text_encoder(store.layout.model, model=model, device=device)
            if model is None:
                check_recorded_encoder(text_encoder, store.layout.model, store.path)
        check_encoder_family(text_encoder, store.layout.model, store.path)
        for att in text_encoder.encode(list(dict.fromkeys(texts))):
            encoded[att.label] = att
    return [encoded[x] if isinstance(x, str)
            else dataclasses.replace(encoded[x.text], line=x.number) if isinstance(x, Line) else x for x in items]


def iter_map_blocks(plan: MapPlan, images: Sequence[int], attributions: Sequence[Attribution], *,
                    block_budget: int = 512 * 2**20) -> Iterator[MapBlock]:
    """Yield the maps of every (image, prompt block), images in order, in bounded memory.

    Each image's queries are read once (the next image's in a background thread while this
    one is computed) and meet every block. With one block its keys are computed once; with
    several, each block's keys are recomputed per image (a small fraction of the work) so
    that memory holds one block's keys and maps whatever the number of prompts.
    """
    blocks = prompt_blocks(attributions, plan.bytes_per_token(), block_budget)
    cached = plan.ordered_keys(blocks[0].embedding, blocks[0].buckets) \
        if len(blocks) == 1 and not plan.keys_per_image else None
    for position, image, queries in _prefetched(plan, images):
        with torch.inference_mode():
            for block in blocks:
                keys = cached if cached is not None else plan.ordered_keys(block.embedding, block.buckets, image)
                yield MapBlock(position, image, block.tokens, plan.image_maps(queries, keys, block.buckets, image))


def iter_image_maps(plan: MapPlan, images: Sequence[int], keys: dict[str, torch.Tensor],
                    buckets: TokenBuckets) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(image, maps)`` for fixed keys (from :meth:`MapPlan.ordered_keys`), reading
    the next image's queries in a thread."""
    for _, image, queries in _prefetched(plan, images):
        with torch.inference_mode():
            maps = plan.image_maps(queries, keys, buckets, image)
        yield image, maps


def _prefetched(plan: MapPlan, images: Sequence[int]) -> Iterator[tuple[int, int, dict[str, PreparedQueries]]]:
    """``(position, image, queries)`` of each image, the next image's queries read in a
    background thread while this one is computed (reading overlaps compute)."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ovstore-read") as pool:
        pending = pool.submit(plan.read, images[0]) if images else None
        for position, image in enumerate(images):
            assert pending is not None
            queries = pending.result()
            if position + 1 < len(images):
                pending = pool.submit(plan.read, images[position + 1])
            yield position, image, queries


def prepare_run(store: Store | str | Path, attributions: Sequence[str | Attribution] | str, *,
                images: Sequence[int] | None, config: MapConfig | None, text_encoder: TextEncoder | None,
                model: str | None, device: str, query_cache: QueryCache | None = None,
                read_ahead: bool = False) -> tuple[Store, list[int], list[Attribution], MapPlan]:
    """What every map computation resolves first: the store, the images, the encoded
    attributions and the plan (all arguments checked before any work). ``read_ahead``: the
    plan will read the images here, so the first one's queries are read while the prompts are
    encoded."""
    check_device(device)
    store = store if isinstance(store, Store) else open_store(store)
    config = config or MapConfig()
    images = store.check_images(images)
    plan = MapPlan(store, config, device=device, query_cache=query_cache)
    if read_ahead and images:
        plan.start_reading(images[0])
    atts = prepare_attributions(store, attributions, text_encoder=text_encoder, model=model, device=device)
    height, width = plan.size
    check_memory(2 * 4 * height * width * max(a.n_tokens for a in atts),
                 f"the maps of one image and prompt at {height}x{width}", "choose a smaller --size")
    return store, images, atts, plan


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
    cache: bool = True,
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
    progress
        Called with each image index when its maps are done.
    cache
        Keep the images' prepared queries in the process-wide cache
        (:func:`~ovstore.analyze.shared_query_cache`, 1 GiB by default), so that the next call on
        the same open store and images skips reading them: a few words at a time on one image
        cost their maps, not a read each. Passes that visit each image once (labelling, bulk
        jobs) turn it off.

    Returns
    -------
    xarray.DataArray
        float32 with dims ``(image, token, y, x)``, held in memory (to stream many prompts
        and images to disk instead, use :func:`~ovstore.analyze.write_maps_zarr`). The
        ``token`` axis concatenates the tokens of every attribution; its coordinates
        ``prompt``, ``prompt_index``, ``position``, ``token_str`` and ``token_id`` say which
        is which (see :func:`split_by_prompt`).

    Examples
    --------
    >>> maps = compute_maps("captures.zarr", ["a cat and a sofa", "furniture"])  # doctest: +SKIP
    >>> maps.isel(token=maps.prompt_index == 1)  # doctest: +SKIP
    """
    import xarray as xr

    store, images, atts, plan = prepare_run(store, attributions, images=images, config=config,
                                            text_encoder=text_encoder, model=model, device=device,
                                            query_cache=shared_query_cache() if cache else None, read_ahead=True)
    total = sum(a.n_tokens for a in atts)
    check_memory(4 * len(images) * total * plan.size[0] * plan.size[1],
                 f"maps of {len(images)} images x {total} tokens at {plan.size[0]}x{plan.size[1]} held in memory",
                 "write FILE.zarr (streamed to disk, bounded memory), or choose fewer images or a smaller --size")
    out = np.empty((len(images), total, *plan.size), dtype=np.float32)
    for block in iter_map_blocks(plan, images, atts, block_budget=plan.config.block_budget):
        out[block.position, block.tokens] = block.maps.detach().cpu().numpy()
        if progress is not None and block.tokens.stop == total:
            progress(block.image)
    return xr.DataArray(out, dims=(dims.IMAGE, dims.TOKEN, dims.Y, dims.X),
                        coords=map_coords(store, images, atts), name="ovam_maps",
                        attrs=map_attrs(store, plan))


def map_coords(store: Store, images: Sequence[int], atts: Sequence[Attribution]) -> dict[str, Any]:
    """Coordinates of maps over ``images`` × the tokens of ``atts``."""
    prompt, prompt_index, position, token_str, token_id = [], [], [], [], []
    for k, att in enumerate(atts):
        for j, tok in enumerate(att.tokens):
            prompt.append(att.label)
            prompt_index.append(k)
            position.append(j)
            token_str.append(tok)
            token_id.append(att.token_ids[j] if att.token_ids is not None else -1)
    lines = {}
    if any(att.line is not None for att in atts):  # prompts of an attributions file: their line numbers
        lines["prompt_line"] = (dims.TOKEN, np.asarray([-1 if att.line is None else att.line
                                                        for att in atts for _ in att.tokens], dtype=np.int64))
    return {
        dims.IMAGE: np.asarray(images, dtype=np.int64),
        "generation_prompt": (dims.IMAGE, np.asarray([store.record(i).prompt for i in images], dtype=str)),
        "prompt": (dims.TOKEN, np.asarray(prompt, dtype=str)),
        "prompt_index": (dims.TOKEN, np.asarray(prompt_index, dtype=np.int64)),
        "position": (dims.TOKEN, np.asarray(position, dtype=np.int64)),
        "token_str": (dims.TOKEN, np.asarray(token_str, dtype=str)),
        "token_id": (dims.TOKEN, np.asarray(token_id, dtype=np.int64)),
    } | lines


def map_attrs(store: Store, plan: MapPlan) -> dict[str, Any]:
    """Provenance of maps: store, model, layers, steps, branch and the map settings."""
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
        "refine": cfg.refine.spec if cfg.refine is not None else "none",
        "space": cfg.space,
    }


def split_by_prompt(maps: xr.DataArray) -> list[xr.DataArray]:
    """One DataArray per attribution prompt, each with only that prompt's tokens."""
    index = maps["prompt_index"].values
    return [maps.isel(token=np.flatnonzero(index == k)) for k in np.unique(index)]

"""Maps of the context the model really attended (``ovstore maps --generation-context``).

For each image, one map per token of the context the stored denoiser calls attended: the
stored branch's prompt (the negative prompt for ``uncond``) exactly as the pipeline encoded
it, padding and start/end tokens included, its embeddings stored at capture (format v2).
The softmax runs over all of those tokens, so the maps are the model's own attention
probabilities, aggregated as OVAM maps are (heads, calls, layers; mid block excluded).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .. import dims
from ..devices import check_device
from ..errors import InvalidInputError
from ..store import Store, open_store
from .config import MapConfig
from .maps import MapPlan, _block, _prefetched, map_attrs
from .text import Attribution

if TYPE_CHECKING:
    import xarray as xr

__all__ = ["compute_context_maps", "context_attribution", "per_image"]


def context_attribution(store: Store, image: int, branch: int, tokenizer: Any | None = None) -> Attribution:
    """The stored context of ``image`` (one branch) as an attribution: its rows are the
    embeddings the denoiser received, its tokens the pipeline's ids (strings when a
    tokenizer is given, else ``<id>``)."""
    embedding, ids = store.context(image, branch)
    ids = [int(i) for i in ids]
    tokens = tokenizer.convert_ids_to_tokens(ids) if tokenizer is not None else [f"<{i}>" for i in ids]
    return Attribution(label=f"context:{image}", tokens=tuple(tokens),
                       embedding=torch.from_numpy(np.asarray(embedding, dtype=np.float32)), token_ids=tuple(ids))


def _tokenizer(store: Store) -> Any | None:
    """The recorded model's first tokenizer, for token strings (``None`` when unavailable:
    the maps do not need it)."""
    try:
        from .text import load_text_encoder

        return load_text_encoder(store.layout.model).tokenizer
    except Exception:  # token strings are a convenience; the ids are always given
        return None


def compute_context_maps(
    store: Store | str | Path,
    *,
    images: Sequence[int] | None = None,
    config: MapConfig | None = None,
    device: str = "cpu",
    tokenizer: Any | None = None,
    progress: Callable[[int], None] | None = None,
) -> xr.DataArray:
    """Maps of every token of each image's attended context (see the module docstring).

    Parameters
    ----------
    store
        A format-v2 store (captured with the generation context).
    images
        Image indices (default: every complete image).
    config
        :class:`MapConfig` (layers, steps, branch, aggregation, size, normalisation); its
        ``activation`` must be the default ``token_softmax``.
    tokenizer
        For the ``token_str`` coordinate; default: the recorded model's tokenizer if it can
        be loaded (the maps need no model at all).

    Returns
    -------
    xarray.DataArray
        float32 ``(image, token, y, x)``; the token axis is the context length (77 for CLIP).
        ``token_id`` and ``token_str`` are per image ``(image, token)``.
    """
    import xarray as xr

    check_device(device)
    store = store if isinstance(store, Store) else open_store(store)
    config = config or MapConfig()
    if store.layout.context is None:
        raise InvalidInputError(
            f"--generation-context needs the context each image attended, which {store.path} does not hold "
            f"(captured before ovstore kept it, format v{store.format_version}); recapture the images")
    if config.activation != "token_softmax":
        raise InvalidInputError("--generation-context maps are the model's softmax over its context; "
                                f"drop --activation {config.activation}")
    images = store.check_images(images)
    plan = MapPlan(store, config, device=device)
    tokenizer = tokenizer if tokenizer is not None else _tokenizer(store)
    length = store.layout.context.length
    out = np.empty((len(images), length, *plan.size), dtype=np.float32)
    token_ids = np.empty((len(images), length), dtype=np.int64)
    token_str = np.empty((len(images), length), dtype=object)
    for position, image, queries in _prefetched(plan, images):
        att = context_attribution(store, image, plan.branch, tokenizer)
        block = _block([att], 0)
        with torch.inference_mode():
            keys = plan.ordered_keys(block.embedding, block.buckets, image)
            out[position] = plan.image_maps(queries, keys, block.buckets).detach().cpu().numpy()
        token_ids[position] = att.token_ids
        token_str[position] = att.tokens
        if progress is not None:
            progress(image)
    coords = {
        dims.IMAGE: np.asarray(images, dtype=np.int64),
        "generation_prompt": (dims.IMAGE, np.asarray([store.record(i).prompt for i in images], dtype=str)),
        "position": (dims.TOKEN, np.arange(length, dtype=np.int64)),
        # one attribution (the context) for the writers of maps
        "prompt": (dims.TOKEN, np.full(length, "<generation context>")),
        "prompt_index": (dims.TOKEN, np.zeros(length, dtype=np.int64)),
        "token_id": ((dims.IMAGE, dims.TOKEN), token_ids),
        "token_str": ((dims.IMAGE, dims.TOKEN), token_str.astype(str)),
    }
    attrs = map_attrs(store, plan)
    attrs["attribution"] = "generation-context"
    return xr.DataArray(out, dims=(dims.IMAGE, dims.TOKEN, dims.Y, dims.X), coords=coords,
                        name="ovam_maps", attrs=attrs)


def per_image(maps: xr.DataArray, position: int) -> xr.DataArray:
    """One image of context maps with its own token strings and ids as plain token
    coordinates (the form PNG overlays and per-prompt tools take)."""
    one = maps.isel(image=[position])
    return one.assign_coords(token_str=(dims.TOKEN, one["token_str"].values[0]),
                             token_id=(dims.TOKEN, one["token_id"].values[0]))

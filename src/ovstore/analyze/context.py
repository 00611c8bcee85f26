"""Maps of the context the model really attended (``ovstore maps --generation-context``).

For each image, one map per token of the context the stored denoiser calls attended: the
stored branch's prompt (the negative prompt for ``uncond``) exactly as the pipeline encoded
it, padding and start/end tokens included, its embeddings stored at capture (format v2).
The softmax runs over all of those tokens, so the maps are the model's own attention
probabilities, aggregated as OVAM maps are (heads, calls, layers; mid block excluded).

:func:`compute_context_maps` holds them in memory; :func:`~ovstore.analyze.export.
write_context_maps_zarr` streams them to a ``.zarr`` in blocks of images;
:func:`check_context_request` and :func:`write_context_maps` are what ``ovstore maps
--generation-context`` runs (every option checked before any work, then one call).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .. import dims
from ..devices import check_device
from ..errors import InvalidInputError
from ..inputs import check_memory
from ..outputs import Output, open_output
from ..selection import LayerSelection
from ..store import Store, open_store
from .config import REDUCTIONS, MapConfig
from .maps import MapPlan, _block, _prefetched, map_attrs
from .text import Attribution

if TYPE_CHECKING:
    import xarray as xr

__all__ = [
    "ContextImage",
    "ContextRequest",
    "ContextResult",
    "check_context_request",
    "compute_context_maps",
    "context_attribution",
    "context_coords",
    "context_map_config",
    "context_token_coords",
    "per_image",
    "write_context_maps",
]


def context_attribution(store: Store, image: int, branch: int, tokenizer: Any | None = None) -> Attribution:
    """The stored context of ``image`` (one branch) as an attribution: its rows are the
    embeddings the denoiser received, its tokens the pipeline's ids (strings when a
    tokenizer is given, else ``<id>``)."""
    embedding, ids = store.context(image, branch)
    ids = [int(i) for i in ids]
    return Attribution(label=f"context:{image}", tokens=tuple(_strings(ids, tokenizer)),
                       embedding=torch.from_numpy(np.asarray(embedding, dtype=np.float32)), token_ids=tuple(ids))


def _strings(ids: Sequence[int], tokenizer: Any | None) -> list[str]:
    return list(tokenizer.convert_ids_to_tokens([int(i) for i in ids])) if tokenizer is not None \
        else [f"<{int(i)}>" for i in ids]


def _tokenizers(store: Store) -> list[Any]:
    """Tokenizers for token strings, one per stored id row: the recorded model's tokenizers in
    text-recipe order where each one's ids are stored, else the encoder's own tokenizer (SD3's
    names CLIP then T5 positions); empty when unavailable (the maps do not need them)."""
    try:
        from .text import load_text_encoder

        encoder = load_text_encoder(store.layout.model)
    except Exception:  # token strings are a convenience; the ids are always given
        return []
    spec = store.layout.context
    if spec is not None and spec.per_tokenizer:
        return [t for t, _ in encoder.components]
    return [encoder.tokenizer]


def _check_context(store: Store, config: MapConfig) -> None:
    if store.layout.context is None:
        raise InvalidInputError(
            f"--generation-context needs the context each image attended, which {store.path} does not hold "
            f"(captured before ovstore kept it, format v{store.format_version}); recapture the images")
    if config.activation != "token_softmax":
        raise InvalidInputError("--generation-context maps are the model's softmax over its context; "
                                f"drop --activation {config.activation}")


@dataclass(frozen=True)
class ContextImage:
    """The context maps of one image: ``maps`` ``(token, height, width)`` float32 and the
    context's ids ``(tokenizer, token)`` and strings, one row per stored tokenizer."""

    position: int
    image: int
    maps: np.ndarray
    token_ids: np.ndarray
    token_str: list[list[str]]


class _ContextRun:
    """What a pass over images resolves first: the store, images, plan and tokenizers."""

    def __init__(self, store: Store | str | Path, images: Sequence[int] | None, config: MapConfig | None,
                 device: str, tokenizer: Any | None, tokenizers: Sequence[Any] | None) -> None:
        check_device(device)
        self.store = store if isinstance(store, Store) else open_store(store)
        self.config = config or MapConfig()
        _check_context(self.store, self.config)
        self.images = self.store.check_images(images)
        if not self.images:
            raise InvalidInputError("no image chosen; give --image N (or none for every complete image)")
        self.plan = MapPlan(self.store, self.config, device=device)
        spec = self.store.layout.context
        recipe = self.store.layout.model.text_recipe
        #: tokenizers whose ids the store holds (recipe order); stores of before: the first only
        self.tokenizer_names = tuple(spec.tokenizers) if spec.per_tokenizer else tuple(recipe.tokenizers[:1])
        if tokenizers is None:
            tokenizers = [tokenizer] if tokenizer is not None else _tokenizers(self.store)
        self.tokenizers = [*tokenizers, *[None] * len(self.tokenizer_names)][:len(self.tokenizer_names)]
        self.length = spec.length


def _iter_context_maps(run: _ContextRun) -> Iterator[ContextImage]:
    """Yield each image's :class:`ContextImage`, in order (the next image's queries read in
    a thread while this one is computed)."""
    plan, store = run.plan, run.store
    for position, image, queries in _prefetched(plan, run.images):
        att = context_attribution(store, image, plan.branch, run.tokenizers[0])
        block = _block([att], 0)
        with torch.inference_mode():
            keys = plan.ordered_keys(block.embedding, block.buckets, image)
            maps = plan.image_maps(queries, keys, block.buckets, image).detach().cpu().numpy()
        ids = (store.context_tokenizer_ids(image, plan.branch) if len(run.tokenizer_names) > 1
               else np.asarray([att.token_ids]))
        strings = [list(att.tokens)] + [_strings(ids[k], run.tokenizers[k]) for k in range(1, len(ids))]
        yield ContextImage(position, image, maps, np.asarray(ids, dtype=np.int64), strings)


def context_token_coords(names: Sequence[str]) -> list[tuple[str, str]]:
    """Names of the per-image ``(image, token)`` coordinates of each stored tokenizer:
    ``token_id``/``token_str`` for the first, ``token_id_2``/``token_str_2``... for the others."""
    return [("token_id", "token_str") if k == 0 else (f"token_id_{k + 1}", f"token_str_{k + 1}")
            for k in range(len(names))]


def context_coords(store: Store, images: Sequence[int], length: int) -> dict[str, Any]:
    """The coordinates of context maps that do not depend on the context's tokens."""
    return {
        dims.IMAGE: np.asarray(images, dtype=np.int64),
        "generation_prompt": (dims.IMAGE, np.asarray([store.record(i).prompt for i in images], dtype=str)),
        "position": (dims.TOKEN, np.arange(length, dtype=np.int64)),
        # one attribution (the context) for the writers of maps
        "prompt": (dims.TOKEN, np.full(length, "<generation context>")),
        "prompt_index": (dims.TOKEN, np.zeros(length, dtype=np.int64)),
    }


def _context_attrs(run: _ContextRun) -> dict[str, Any]:
    attrs = map_attrs(run.store, run.plan)
    attrs["attribution"] = "generation-context"
    attrs["context_tokenizers"] = list(run.tokenizer_names)
    return attrs


def compute_context_maps(
    store: Store | str | Path,
    *,
    images: Sequence[int] | None = None,
    config: MapConfig | None = None,
    device: str = "cpu",
    tokenizer: Any | None = None,
    tokenizers: Sequence[Any] | None = None,
    progress: Callable[[int], None] | None = None,
) -> xr.DataArray:
    """Maps of every token of each image's attended context (see the module docstring),
    held in memory (:func:`~ovstore.analyze.export.write_context_maps_zarr` streams them).

    Parameters
    ----------
    store
        A format-v2 store (captured with the generation context).
    images
        Image indices (default: every complete image).
    config
        :class:`MapConfig` (layers, steps, branch, aggregation, size, normalisation); its
        ``activation`` must be the default ``token_softmax``.
    tokenizer, tokenizers
        For the ``token_str`` coordinates: the first tokenizer, or every tokenizer in the
        text recipe's order; default: the recorded model's if they can be loaded (the maps
        need no model at all), else ``<id>`` strings.

    Returns
    -------
    xarray.DataArray
        float32 ``(image, token, y, x)``; the token axis is the context length (77 for CLIP).
        ``token_id`` and ``token_str`` are per image ``(image, token)``, from the first
        tokenizer; stores that keep every tokenizer's ids (SDXL: its second tokenizer pads
        with another token) add ``token_id_2``/``token_str_2`` for the second. The attribute
        ``context_tokenizers`` names them.
    """
    import xarray as xr

    run = _ContextRun(store, images, config, device, tokenizer, tokenizers)
    n, length, (height, width) = len(run.images), run.length, run.plan.size
    check_memory(4 * n * length * height * width,
                 f"generation-context maps of {n} images x {length} tokens at {height}x{width} held in memory",
                 "write FILE.zarr (streamed to disk, bounded memory), or choose fewer images or a smaller --size")
    out = np.empty((n, length, height, width), dtype=np.float32)
    n_tok = len(run.tokenizer_names)
    token_ids = np.empty((n_tok, n, length), dtype=np.int64)
    token_str = np.empty((n_tok, n, length), dtype=object)
    for item in _iter_context_maps(run):
        out[item.position] = item.maps
        token_ids[:, item.position] = item.token_ids
        token_str[:, item.position] = item.token_str
        if progress is not None:
            progress(item.image)
    coords = context_coords(run.store, run.images, length)
    for k, (id_name, str_name) in enumerate(context_token_coords(run.tokenizer_names)):
        coords[id_name] = ((dims.IMAGE, dims.TOKEN), token_ids[k])
        coords[str_name] = ((dims.IMAGE, dims.TOKEN), token_str[k].astype(str))
    return xr.DataArray(out, dims=(dims.IMAGE, dims.TOKEN, dims.Y, dims.X), coords=coords,
                        name="ovam_maps", attrs=_context_attrs(run))


def per_image(maps: xr.DataArray, position: int) -> xr.DataArray:
    """One image of context maps with its own token strings and ids as plain token
    coordinates (the form PNG overlays and per-prompt tools take)."""
    one = maps.isel(image=[position])
    per = {name: (dims.TOKEN, one[name].values[0]) for name in one.coords
           if name.startswith(("token_id", "token_str")) and one[name].dims == (dims.IMAGE, dims.TOKEN)}
    return one.assign_coords(per)


# ---------------------------------------------------------------------- the command
def context_map_config(*, layers: LayerSelection | None = None, steps: str | Sequence[str] | None = None,
                       branch: str | None = None, activation: str = "token_softmax", aggregation: str = "sum",
                       normalize: str = "none", size: Sequence[int] | None = None, refine: Any = None,
                       space: str = "attention") -> MapConfig:
    """The :class:`MapConfig` of ``maps --generation-context`` options, with one-line errors
    naming the options (aggregation applies to heads, calls and layers alike)."""
    if activation != "token_softmax":
        raise InvalidInputError("--generation-context maps are the model's softmax over its context; "
                                f"drop --activation {activation}")
    if aggregation not in REDUCTIONS:
        raise InvalidInputError(f"--aggregation {aggregation!r} is not one of sum, mean")
    return MapConfig(layers=layers or LayerSelection(include_mid=False), steps=steps, branch=branch,
                     head_reduction=aggregation, step_reduction=aggregation, layer_reduction=aggregation,
                     normalize=normalize, size=tuple(size) if size else None, refine=refine, space=space)


@dataclass(frozen=True)
class ContextRequest:
    """A checked ``maps --generation-context`` run: nothing in it can fail for a bad option."""

    store: Store
    images: tuple[int, ...]
    config: MapConfig
    out: Output
    png: Output | None
    device: str
    #: images left out by ``skip_damaged`` (recorded in a ``.zarr`` output's attrs)
    damaged: tuple[int, ...] = ()
    #: draw start/end-of-text, padding and filler words in the ``png`` pictures too
    png_all_tokens: bool = False


def check_context_request(
    store: Store | str | Path,
    out: str | Path,
    *,
    images: Sequence[int] | None = None,
    config: MapConfig | None = None,
    png: str | Path | None = None,
    overwrite: bool = False,
    device: str = "cpu",
    attributions: Sequence[object] = (),
    attributions_file: str | Path | None = None,
    tokens: Sequence[object] = (),
    skip_damaged: bool = False,
    png_all_tokens: bool = False,
) -> ContextRequest:
    """Check everything of a generation-context run before any work, with the one-line
    errors of ``ovstore maps --generation-context``: no attribution prompts or tokens
    besides it, an ``out`` of ``.npy`` or ``.zarr``, a store that holds contexts (format 2),
    the softmax activation, existing images, the device and both outputs (never an input;
    an earlier output of ``maps`` only with ``overwrite``). ``skip_damaged`` leaves out the
    images whose queries, context (or, with ``png``, picture) cannot be read back intact."""
    if attributions or attributions_file is not None or tokens:
        raise InvalidInputError("--generation-context maps the context each image attended; drop "
                                "--attribution/--attributions-file/--token (or drop --generation-context)")
    out = Path(out)
    if out.suffix not in (".npy", ".zarr"):
        raise InvalidInputError(f"--out {out}: use a .npy (one array in memory) or .zarr (streamed) file name")
    config = config or MapConfig()
    check_device(device)
    store = store if isinstance(store, Store) else open_store(store)
    _check_context(store, config)
    chosen = tuple(store.check_images(images))
    damaged: list[int] = []
    if skip_damaged:
        damaged = _damaged(store, chosen, picture=png is not None)
        chosen = tuple(i for i in chosen if i not in damaged)
        if not chosen:
            raise InvalidInputError(f"every chosen image of {store.path} is damaged; nothing to compute")
    target = open_output(out, "maps", kind="file" if out.suffix == ".npy" else "dir", inputs=[store.path],
                         overwrite=overwrite)
    overlays = None
    if png is not None:
        from .export import overlay_dir

        overlays = overlay_dir(png, overwrite=overwrite, inputs=[store.path, target.path])
    if png_all_tokens and png is None:
        raise InvalidInputError("--png-all-tokens draws into the --png pictures; add --png DIR (or drop it)")
    return ContextRequest(store, chosen, config, target, overlays, device, tuple(damaged), png_all_tokens)


def _damaged(store: Store, images: Sequence[int], *, picture: bool) -> list[int]:
    from ..errors import StoreError
    from ..partial import find_damaged

    damaged = set(find_damaged(store, images, picture=picture))
    for image in images:
        if image not in damaged:
            try:
                store.context(image)
                store.context_tokenizer_ids(image)
            except StoreError:
                damaged.add(image)
    return sorted(damaged)


@dataclass(frozen=True)
class ContextResult:
    """What :func:`write_context_maps` wrote: the maps (read back lazily from a ``.zarr``),
    their file and the PNG overlays."""

    maps: xr.DataArray
    path: Path
    overlays: tuple[Path, ...] = ()


def write_context_maps(request: ContextRequest, *, progress: Callable[[int], None] | None = None,
                       block_images: int | None = None) -> ContextResult:
    """Compute and write the maps of a checked request: ``.zarr`` streamed in blocks of
    images (bounded memory), ``.npy`` from memory; then the overlays (every image's, one
    folder published complete)."""
    from .export import overlay_files, save_maps, write_context_maps_zarr

    store, out = request.store, request.out.path
    if out.suffix == ".zarr":
        import xarray as xr

        write_context_maps_zarr(store, out, images=request.images, config=request.config, device=request.device,
                                overwrite=request.out.replace, progress=progress, block_images=block_images,
                                skipped_damaged=request.damaged)
        maps = xr.open_zarr(out, consolidated=False)["ovam_maps"]
    else:
        maps = compute_context_maps(store, images=request.images, config=request.config, device=request.device,
                                    progress=progress)
        save_maps(maps, out, overwrite=request.out.replace, inputs=[store.path])
    files: list[Path] = []
    if request.png is not None:
        with request.png.writing() as tmp:
            names = [f.name for k in range(len(request.images))
                     for f in overlay_files(per_image(maps, k), store.image, tmp, all_tokens=request.png_all_tokens)]
        files = [request.png.path / n for n in names]
    return ContextResult(maps, out, tuple(files))

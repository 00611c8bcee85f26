"""Word-level maps: a word's sub-tokens combined into one map."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .. import dims
from ..errors import InvalidInputError

if TYPE_CHECKING:
    import xarray as xr

__all__ = ["word_maps", "SPECIAL_TOKENS"]

SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")
_WORD_END = "</w>"


def _words(tokens: list[str], token_ids: list[int] | None = None) -> list[tuple[str, list[int]]]:
    """Group token positions into words. Special tokens and learned tokens (no vocabulary
    id: ``token_id`` < 0) are words of their own; other pieces end a word at ``</w>``."""
    words: list[tuple[str, list[int]]] = []
    current: list[int] = []
    for i, tok in enumerate(tokens):
        if tok in SPECIAL_TOKENS or (token_ids is not None and token_ids[i] < 0):
            if current:
                words.append(("".join(tokens[j] for j in current), current))
                current = []
            words.append((tok, [i]))
            continue
        current.append(i)
        if tok.endswith(_WORD_END):
            words.append(("".join(tokens[j] for j in current).replace(_WORD_END, ""), current))
            current = []
    if current:
        words.append(("".join(tokens[j] for j in current).replace(_WORD_END, ""), current))
    return words


def word_maps(maps: xr.DataArray, *, reduction: str = "sum") -> xr.DataArray:
    """Combine CLIP sub-tokens (``sof`` + ``a</w>``) into words.

    Parameters
    ----------
    maps
        Output of :func:`~ovstore.analyze.compute_maps`.
    reduction
        ``sum`` (a word takes the attention of all its pieces) or ``mean``.

    Returns
    -------
    xarray.DataArray
        Dims ``(image, word, y, x)`` with coordinates ``prompt``, ``prompt_index`` and
        ``word_str``; start/end-of-text tokens and learned tokens stay words of their own.
    """
    import xarray as xr

    if reduction not in ("sum", "mean"):
        raise InvalidInputError(f"reduction {reduction!r} is not one of sum, mean")
    pieces, prompt, prompt_index, word_str = [], [], [], []
    for k in np.unique(maps["prompt_index"].values):
        cols = np.flatnonzero(maps["prompt_index"].values == k)
        tokens = [str(t) for t in maps["token_str"].values[cols]]
        ids = [int(i) for i in maps["token_id"].values[cols]] if "token_id" in maps.coords else None
        for text, members in _words(tokens, ids):
            sel = maps.isel(token=cols[members])
            pieces.append(sel.sum(dims.TOKEN) if reduction == "sum" else sel.mean(dims.TOKEN))
            prompt.append(str(maps["prompt"].values[cols[0]]))
            prompt_index.append(int(k))
            word_str.append(text)
    out = xr.concat(pieces, dim=dims.WORD)
    out = out.transpose(dims.IMAGE, dims.WORD, ...)
    return out.assign_coords(
        prompt=(dims.WORD, np.asarray(prompt, dtype=str)),
        prompt_index=(dims.WORD, np.asarray(prompt_index)),
        word_str=(dims.WORD, np.asarray(word_str, dtype=str)),
    )

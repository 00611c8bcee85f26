"""Class maps: each class's attribution (a template sentence or a learned token), evaluated
for many images at once, summed over the class word's sub-tokens and normalised per image and
class (min-max, or max as in the reference protocol)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..analyze import (
    Attribution, MapConfig, TextEncoder, compute_maps, resize_maps, start_of_text_row, words_in_context,
)
from ..optimize import SOT, load_token, token_attribution
from ..store import Store
from .config import LabelConfig
from .refine import normalize_maps

__all__ = ["ClassAttributions", "class_attributions", "class_maps"]


@dataclass(frozen=True)
class ClassAttributions:
    """Attributions to evaluate and, per class, the columns of their token axis to sum."""

    attributions: tuple[Attribution, ...]
    columns: tuple[tuple[int, ...], ...]


def class_attributions(store: Store, config: LabelConfig, encoder: TextEncoder) -> ClassAttributions:
    """Build the attributions of ``config.classes`` for ``store``'s model."""
    words = [name for name in config.classes if name not in config.tokens]
    in_context = dict(zip(words, words_in_context(encoder, words, config.prompt_template))) if words else {}
    per_class: list[tuple[Attribution, list[int]]] = []
    for name in config.classes:
        if name in config.tokens:
            per_class.append((token_attribution(load_token(config.tokens[name]), store.layout.model), [1]))
        else:
            per_class.append(in_context[name])
    if config.mode == "separate":
        columns, offset = [], 0
        for att, rows in per_class:
            columns.append(tuple(offset + r for r in rows))
            offset += att.n_tokens
        return ClassAttributions(tuple(a for a, _ in per_class), tuple(columns))
    # compete: one softmax over [SoT, class rows of every class]. The start-of-text row is the
    # text encoder's (identical in every sentence: CLIP attends causally), never a learned
    # token's trained row, so the result does not depend on the order of the classes.
    sot = start_of_text_row(encoder)[None].to(dtype=per_class[0][0].embedding.dtype,
                                              device=per_class[0][0].embedding.device)
    rows, tokens, columns = [sot], [SOT], []
    for (att, idx), name in zip(per_class, config.classes):
        start = len(tokens)
        rows.append(att.embedding[idx])
        tokens += [att.tokens[i] for i in idx]
        columns.append(tuple(range(start, len(tokens))))
    joint = Attribution(label=" | ".join(config.classes), tokens=tuple(tokens), embedding=torch.cat(rows))
    return ClassAttributions((joint,), tuple(columns))


def class_maps(store: Store, images: Sequence[int], attributions: ClassAttributions, *,
               size: tuple[int, int], device: str = "cpu", normalize: str = "minmax") -> np.ndarray:
    """Normalised class maps ``(image, class, H, W)`` float32 at ``size`` (see ``normalize_maps``).

    Token maps stay at the latent resolution until each class's columns are summed: resizing
    is linear, so only the class maps are brought to the image size (not every token of every
    template sentence)."""
    maps = compute_maps(store, list(attributions.attributions), images=images, config=MapConfig(),
                        device=device).values
    out = np.stack([maps[:, list(cols)].sum(axis=1) for cols in attributions.columns], axis=1)
    return normalize_maps(resize_maps(torch.from_numpy(out), size).numpy(), normalize)

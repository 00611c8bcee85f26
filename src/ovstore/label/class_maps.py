"""Class maps: each class's attribution (a template sentence or a learned token), evaluated
for many images at once, summed over the class word's sub-tokens and normalised per image and
class (min-max, or max as in the reference protocol)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from ..analyze import (
    Attribution, MapConfig, TextEncoder, compute_maps, resize_maps, start_of_text_row, words_in_context,
)
from ..optimize import SOT, load_token, token_attribution
from ..store import Store
from .config import LabelConfig
from .refine import normalize_maps

__all__ = ["ClassAttributions", "class_attributions", "class_maps", "label_class_maps", "prompt_class_maps",
           "prompt_word_columns", "refine_class_maps"]


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


def refine_class_maps(store: Store, images: Sequence[int], maps: torch.Tensor, refine: Any) -> torch.Tensor:
    """``(image, class, h, w)`` maps refined with each image's stored self-attention (the first
    stored branch, the one the maps come from); ``refine`` ``None``: unchanged."""
    if refine is None:
        return maps
    grid = store._self_attention_grid(refine.resolution)
    sa = [torch.from_numpy(store.self_attention(i, grid, branch=0).astype(np.float32)) for i in images]
    return torch.stack([refine.apply(maps[k], sa[k]) for k in range(len(images))])


def class_maps(store: Store, images: Sequence[int], attributions: ClassAttributions, *,
               size: tuple[int, int], device: str = "cpu", normalize: str = "minmax",
               refine: Any = None, space: str = "attention") -> np.ndarray:
    """Normalised class maps ``(image, class, H, W)`` float32 at ``size`` (see ``normalize_maps``);
    ``space``: ``MapConfig.space``.

    Token maps stay at the latent resolution until each class's columns are summed: resizing
    is linear, so only the class maps are brought to the image size (not every token of every
    template sentence)."""
    maps = compute_maps(store, list(attributions.attributions), images=images, config=MapConfig(space=space),
                        device=device, cache=False).values  # a labelling pass visits each image once
    out = np.stack([maps[:, list(cols)].sum(axis=1) for cols in attributions.columns], axis=1)
    out = refine_class_maps(store, images, torch.from_numpy(out), refine)
    return normalize_maps(resize_maps(out, size).numpy(), normalize)


#: Token strings that are no word of a prompt (CLIP and T5 specials).
_SPECIAL = {"<|startoftext|>", "<|endoftext|>", "</s>", "<pad>", "<unk>"}


def _word_spans(tokens: Sequence[str]) -> list[tuple[str, list[int]]]:
    """The words of a tokenised prompt with their token columns: CLIP BPE ends a word with
    ``</w>``, SentencePiece (T5) starts one with ``▁``."""
    spans: list[tuple[str, list[int]]] = []
    current, cols, open_word = "", [], False
    for col, tok in enumerate(tokens):
        if tok in _SPECIAL:
            if open_word:
                spans.append((current, cols))
            current, cols, open_word = "", [], False
            continue
        if tok.startswith("\u2581") and open_word:
            spans.append((current, cols))
            current, cols = "", []
        current += tok.replace("</w>", "").lstrip("\u2581")
        cols.append(col)
        open_word = True
        if tok.endswith("</w>"):
            spans.append((current, cols))
            current, cols, open_word = "", [], False
    if open_word:
        spans.append((current, cols))
    return [(w.lower(), c) for w, c in spans if w]


def prompt_word_columns(tokens: Sequence[str], phrases: Sequence[str]) -> list[int]:
    """Token columns of every occurrence of any of ``phrases`` (one or more words; the last may
    take a plural ``s``/``es``) in a tokenised prompt."""
    spans = _word_spans(tokens)
    words = [w for w, _ in spans]
    out: list[int] = []
    for phrase in phrases:
        parts = phrase.lower().split()
        n = len(parts)
        for start in range(len(words) - n + 1):
            got = words[start:start + n]
            if got[:-1] == parts[:-1] and got[-1] in (parts[-1], parts[-1] + "s", parts[-1] + "es"):
                out += [c for _, cols in spans[start:start + n] for c in cols]
    return sorted(set(out))


def prompt_class_maps(store: Store, images: Sequence[int], config: LabelConfig, encoder: TextEncoder, *,
                      size: tuple[int, int], device: str = "cpu", normalize: str = "minmax") -> np.ndarray:
    """Class maps from each image's own generation prompt (``maps_from="prompt"``): a class the
    prompt names, by its name or one of its class words, takes the map of those words' tokens
    in the prompt, within the prompt's own softmax, the way DiffuMask and Dataset Diffusion
    label with the generation's class tokens; a class it does not name gets an empty map.
    Classes with a learned token use the token. ``(image, class, H, W)``, normalised."""
    out = np.zeros((len(images), len(config.classes), *size), dtype=np.float32)
    token_classes = [c for c in config.classes if c in config.tokens]
    if token_classes:
        sub = replace(config, classes=tuple(token_classes), mode="separate",
                      tokens={c: config.tokens[c] for c in token_classes},
                      class_words={c: w for c, w in config.class_words.items() if c in token_classes},
                      class_thresholds={c: t for c, t in config.class_thresholds.items() if c in token_classes})
        maps = class_maps(store, images, class_attributions(store, sub, encoder), size=size, device=device,
                          normalize=normalize, refine=config.refine, space=config.space)
        for k, name in enumerate(token_classes):
            out[:, config.classes.index(name)] = maps[:, k]
    by_prompt: dict[str, list[int]] = {}
    for k, image in enumerate(images):
        by_prompt.setdefault(store.record(image).prompt, []).append(k)
    word_classes = [(c, name) for c, name in enumerate(config.classes) if name not in config.tokens]
    for prompt, rows in by_prompt.items():
        maps = compute_maps(store, [prompt], images=[images[k] for k in rows], config=MapConfig(space=config.space),
                            device=device, text_encoder=encoder, cache=False)  # the labelling's encoder, loaded once
        tokens = [str(t) for t in maps["token_str"].values]
        values = maps.values
        for c, name in word_classes:
            cols = prompt_word_columns(tokens, config.words_of(name))
            if cols:
                summed = refine_class_maps(store, [images[k] for k in rows],
                                           torch.from_numpy(values[:, cols].sum(axis=1)[:, None]), config.refine)
                out[rows, c] = normalize_maps(resize_maps(summed, size).numpy(), normalize)[:, 0]
    return out


def label_class_maps(store: Store, images: Sequence[int], config: LabelConfig, encoder: TextEncoder, *,
                     size: tuple[int, int], device: str = "cpu") -> np.ndarray:
    """The normalised class maps ``ovstore label`` thresholds: from the class attributions
    (``maps_from="template"``) or from each image's prompt (``"prompt"``)."""
    if config.maps_from == "prompt":
        return prompt_class_maps(store, images, config, encoder, size=size, device=device,
                                 normalize=config.normalize)
    return class_maps(store, list(images), class_attributions(store, config, encoder), size=size, device=device,
                      normalize=config.normalize, refine=config.refine, space=config.space)

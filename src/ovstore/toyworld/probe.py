"""Quick check that a toy pipeline binds words to image regions.

Generates images, records the cross-attention queries (outputs of every ``attn2.to_q``)
with forward hooks, and rebuilds OVAM-style maps: ``softmax(Q K^T * scale)`` over the 77
prompt tokens with ``K = attn2.to_k(prompt embedding)``, summed over heads, denoising
steps and layers after bilinear upsampling to the image size. Each colour or shape word's
map is compared with the word's mask recovered from the generated image
(:func:`~ovstore.toyworld.world.recover_masks`) by top-k IoU, where k is the mask's area.

Baselines, both closed-form expectations under random tie-breaking:

* ``uniform``: a constant map; top-k picks k random pixels, IoU = p / (2 - p) with p the
  mask's share of the image;
* ``foreground``: a map that finds all objects but does not tell them apart; top-k picks
  k random foreground pixels, IoU = q / (2 - q) with q the mask's share of the foreground.
  Beating it means the maps tell objects apart by word, not just find objects.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .world import COLORS, SHAPES, Scene, _components, _shape_of, parse_caption, recover_masks, sample_scene

__all__ = ["AttentionProbe", "probe_scenes", "word_token_ids", "topk_iou", "run_probe", "ProbeResult", "probe_grid"]


class AttentionProbe:
    """Forward hooks on every ``attn2.to_q`` of a UNet that accumulate OVAM maps.

    Parameters
    ----------
    unet : UNet2DConditionModel
        The UNet to hook.
    text_embeds : torch.Tensor
        ``(B, T, D)`` embeddings the keys are computed from (the conditional prompts).
    image_size : int
        Side of the output maps.
    """

    def __init__(self, unet: Any, text_embeds: Any, image_size: int) -> None:
        import torch

        self._torch = torch
        self.text_embeds = text_embeds
        self.image_size = image_size
        b, t, _ = text_embeds.shape
        self.maps = torch.zeros(b, t, image_size, image_size)
        self.calls = 0
        self._handles = []
        for name, module in unet.named_modules():
            if name.endswith("attn2"):
                self._handles.append(module.to_q.register_forward_hook(self._make_hook(module)))

    def _make_hook(self, attn: Any):
        torch = self._torch
        f = torch.nn.functional

        def hook(_module: Any, _inputs: Any, output: Any) -> None:
            b, t, _ = self.text_embeds.shape
            with torch.no_grad():
                q = output[-b:].float()  # the conditional half comes last under CFG
                k = attn.to_k(self.text_embeds.to(q.dtype))
                n, hw, c = q.shape
                h = attn.heads
                qh = q.view(n, hw, h, c // h).transpose(1, 2)
                kh = k.view(n, t, h, c // h).transpose(1, 2)
                probs = torch.softmax(qh @ kh.transpose(-1, -2) * attn.scale, dim=-1).sum(1)
                side = int(round(hw**0.5))
                grid = probs.transpose(1, 2).reshape(n, t, side, side)
                self.maps += f.interpolate(grid, size=(self.image_size,) * 2, mode="bilinear", align_corners=False)
                self.calls += 1

        return hook

    def remove(self) -> None:
        """Detach all hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


def probe_scenes(seed: int, per_count: int = 4, image_size: int = 32) -> list[Scene]:
    """A fixed probe set: ``per_count`` scenes each with 1, 2 and 3 objects."""
    rng = np.random.default_rng([seed, 3])
    return [
        sample_scene(rng, image_size=image_size, min_objects=n, max_objects=n)
        for n in (1, 2, 3)
        for _ in range(per_count)
    ]


def word_token_ids(tokenizer: Any) -> dict[str, int]:
    """Token id of each colour and shape word (each is one CLIP BPE token)."""
    out = {}
    for word in COLORS + SHAPES:
        ids = tokenizer(word, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise ValueError(f"{word!r} is not a single token: {ids}")
        out[word] = ids[0]
    return out


def topk_iou(score: np.ndarray, mask: np.ndarray) -> float:
    """IoU between a mask and the top-k pixels of a map, k = mask area (stable ties)."""
    k = int(mask.sum())
    if k == 0:
        return float("nan")
    order = np.argsort(-score.ravel(), kind="stable")[:k]
    pred = np.zeros(mask.size, dtype=bool)
    pred[order] = True
    inter = np.logical_and(pred, mask.ravel()).sum()
    return float(inter / (2 * k - inter))


@dataclass
class ProbeResult:
    """Probe figures plus what is needed to draw a sample grid."""

    metrics: dict[str, float]
    images: np.ndarray  # (N, H, W, 3) uint8
    word_maps: list[dict[str, np.ndarray]]
    masks: list[dict[str, np.ndarray]]
    captions: list[str]


def run_probe(
    pipe: Any,
    captions: list[str],
    seed: int = 0,
    steps: int = 20,
    guidance_scale: float = 3.0,
    image_size: int = 32,
) -> ProbeResult:
    """Generate one image per caption and score the word maps against recovered masks.

    Metrics: mean top-k IoU for colour words, shape words and all words; the two
    closed-form baselines; ``iou_other_word``, a word's map scored against the mask of
    another word of the same kind with disjoint pixels (low values mean the maps tell
    objects apart by word, not just find objects); ``word_token_mass``, the share of
    attention on colour/shape tokens (next to its value under uniform attention);
    ``color_present``, how often a caption colour appears in the image; and
    ``shape_correct``, how often a colour that names one caption object forms a blob of
    the right shape.
    """
    import torch

    tokenizer = pipe.tokenizer
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        embeds = pipe.text_encoder(ids)[0]
    probe = AttentionProbe(pipe.unet, embeds, image_size)
    try:
        gen = torch.Generator().manual_seed(seed)
        out = pipe(prompt_embeds=embeds, negative_prompt=[""] * len(captions), num_inference_steps=steps,
                   guidance_scale=guidance_scale, height=image_size, width=image_size,
                   generator=gen, output_type="np")
    finally:
        probe.remove()
    images = (np.clip(out.images, 0, 1) * 255).round().astype(np.uint8)
    maps = probe.maps.numpy()
    tok_ids = word_token_ids(tokenizer)
    ious: dict[str, list[float]] = {"color": [], "shape": []}
    base_u: list[float] = []
    base_f: list[float] = []
    present = []
    shape_ok = []
    missing = 0
    all_word_maps, all_masks = [], []
    word_mass, word_mass_uniform = [], []
    cross: list[float] = []
    k_min = 3
    for i, caption in enumerate(captions):
        is_word = torch.isin(ids[i], torch.tensor(list(tok_ids.values())))
        word_mass.append(float(maps[i, is_word.numpy()].sum() / maps[i].sum()))
        word_mass_uniform.append(float(is_word.sum()) / ids.shape[1])
        masks = recover_masks(images[i], caption)
        fg = np.zeros(masks[next(iter(masks))].shape, dtype=bool)
        for w in masks:
            if w in COLORS:
                fg |= masks[w]
        word_maps = {}
        for word, mask in masks.items():
            pos = (ids[i] == tok_ids[word]).nonzero().flatten().numpy()
            word_maps[word] = maps[i, pos].sum(0)
            k = int(mask.sum())
            if k == 0:
                missing += 1
                continue
            ious["color" if word in COLORS else "shape"].append(topk_iou(word_maps[word], mask))
            for other, other_mask in masks.items():
                same_kind = (other in COLORS) == (word in COLORS)
                if other != word and same_kind and other_mask.sum() >= k_min and not (other_mask & mask).any():
                    cross.append(topk_iou(word_maps[word], other_mask))
            p = k / mask.size
            q = k / max(int(fg.sum()), k)
            base_u.append(p / (2 - p))
            base_f.append(q / (2 - q))
        pairs = parse_caption(caption)
        for color, shape in pairs:
            present.append(bool(masks[color].sum() >= 3))
            if [c for c, _ in pairs].count(color) == 1 and masks[color].sum() >= 3:
                blob = max(_components(masks[color]), key=lambda m: m.sum())
                shape_ok.append(_shape_of(blob) == shape)
        all_word_maps.append(word_maps)
        all_masks.append(masks)
    mean = lambda xs: float(np.mean(xs)) if xs else float("nan")  # noqa: E731
    metrics = {
        "iou_color": mean(ious["color"]),
        "iou_shape": mean(ious["shape"]),
        "iou_all": mean(ious["color"] + ious["shape"]),
        "iou_other_word": mean(cross),
        "baseline_uniform": mean(base_u),
        "baseline_foreground": mean(base_f),
        "n_words_scored": len(ious["color"]) + len(ious["shape"]),
        "n_words_missing": missing,
        "color_present": mean(present),
        "shape_correct": mean(shape_ok),
        "word_token_mass": mean(word_mass),
        "word_token_mass_uniform": mean(word_mass_uniform),
        "attn_calls": probe.calls,
    }
    return ProbeResult(metrics, images, all_word_maps, all_masks, list(captions))


def probe_grid(result: ProbeResult, scale: int = 4) -> np.ndarray:
    """A picture per probe caption: image, then the maps of its first object's colour and
    shape words, then their recovered masks (grey, upscaled ``scale`` times)."""
    rows = []
    for img, maps, masks, caption in zip(result.images, result.word_maps, result.masks, result.captions):
        color, shape = parse_caption(caption)[0]
        tiles = [img]
        for word in (color, shape):
            m = maps[word]
            m = (m - m.min()) / (m.max() - m.min() + 1e-12)
            tiles.append(np.repeat((m * 255).astype(np.uint8)[..., None], 3, -1))
        for word in (color, shape):
            tiles.append(np.repeat((masks[word] * 255).astype(np.uint8)[..., None], 3, -1))
        sep = np.full((img.shape[0], 2, 3), 128, np.uint8)
        row = np.concatenate(sum(([t, sep] for t in tiles), [])[:-1], 1)
        rows.append(row)
        rows.append(np.full((2, row.shape[1], 3), 128, np.uint8))
    grid = np.concatenate(rows[:-1], 0)
    return np.repeat(np.repeat(grid, scale, 0), scale, 1)

"""Measured quality of a toy-world model through ovstore's own APIs.

Held-out world-v2 captions (:func:`quality_scenes`) are generated with ``ovstore capture``
(:func:`capture_captions`); ground truth is recovered from the *generated* images with
:func:`~ovstore.toyworld.world.recover_masks` (the model places objects where it likes, so the
rendered scene's masks do not apply); maps come from :func:`ovstore.analyze.compute_maps`,
labels from :mod:`ovstore.label`. Every figure has its two baselines beside it:

* ``flat``: a constant map (random tie-breaks), which knows nothing;
* ``objects``: the object oracle, a map marking the union of the image's true objects alike
  (it knows where things are, not which is which).

Used by ``benchmarks/bench_toyworld.py`` and ``tests/toyworld/test_quality.py``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .world import HYPERNYMS, NOUNS, PALETTE, SHAPES, SYNONYMS, classify_pixels, parse_phrases, \
    recover_masks, sample_rich_scene

__all__ = [
    "BARE_SHAPES", "LABEL_NAMES", "IGNORE", "ImageTruth", "IoUSums", "quality_scenes", "capture_captions",
    "image_truth", "prompt_word_quality", "open_vocabulary_quality", "bare_rows", "bare_iou", "bare_baselines",
    "label_truth", "label_miou", "label_baselines", "padded_attribution",
]

#: The bare attribution of the reference protocol.
BARE_SHAPES = "circle square triangle"
LABEL_NAMES = ("background", *SHAPES)
IGNORE = 255
_MIN_PIXELS = 3  # a word whose object the generated image lacks (fewer pixels) is a generation failure


def quality_scenes(seed: int, per_count: int, *, image_size: int = 32, exclude: Sequence[str] = ()) -> list:
    """``per_count`` held-out v2 scenes each with 1, 2 and 3 objects, from the stream ``[seed, 11]``
    (training draws none of these captions; the training probe uses the stream ``[seed, 9]``).

    Two- and three-object captions in ``exclude`` (another set's) are skipped, so two sets share
    none of them; one-object captions may repeat (the held-out split has only about five of them:
    4 colours x 11 nouns, one in eight held out), each with its own generation seed."""
    rng = np.random.default_rng([seed, 11])
    skip = set(exclude)
    out = []
    for n in (1, 2, 3):
        count = 0
        while count < per_count:
            scene = sample_rich_scene(rng, image_size=image_size, min_objects=n, max_objects=n, split="held_out")
            if n > 1 and scene.caption in skip:
                continue
            out.append(scene)
            count += 1
    return out


def capture_captions(captions: Sequence[str], out: str | Path, *, seed: int, steps: int = 20,
                     guidance: float = 5.0, batch_size: int = 16, model: str | None = None) -> Any:
    """Generate one image per caption with ``ovstore capture`` (image ``i`` gets seed ``seed + i``)
    and return the opened store; an existing complete store at ``out`` is reused."""
    from ..capture import CaptureConfig, build_requests, capture, load_pipeline
    from ..store import open_store

    out = Path(out)
    if not (out / "zarr.json").exists():
        pipe, identity = load_pipeline(model)
        capture(pipe, identity, build_requests([(c, None, None) for c in captions], seed=seed, guidance=guidance,
                                               num_inference_steps=steps),
                out, config=CaptureConfig(num_inference_steps=steps, guidance=guidance, batch_size=batch_size))
    store = open_store(out)
    stored = [store.record(i).prompt for i in store.complete_images()]
    if stored != list(captions):
        from ..errors import InvalidInputError

        raise InvalidInputError(f"{out} holds other or incomplete captures than this set ({len(stored)} complete of "
                                f"{len(captions)}); remove it to capture again")
    return store


@dataclass
class ImageTruth:
    """Ground truth of one generated image, recovered from its pixels."""

    caption: str
    phrases: list[tuple[str, str, str | None]]
    masks: dict[str, np.ndarray]  # recover_masks: colours, shapes, other nouns
    objects: np.ndarray  # every object pixel of the caption's colours
    own: list[np.ndarray]  # per phrase: its object's pixels
    rgb: np.ndarray


def image_truth(store: Any, image: int) -> ImageTruth:
    """:class:`ImageTruth` of a stored image (its prompt must be a toy-world caption)."""
    caption = store.record(image).prompt
    rgb = store.image(image)
    masks = recover_masks(rgb, caption)
    phrases = parse_phrases(caption)
    colours = [c for c, _, _ in phrases]
    objects = np.logical_or.reduce([masks[c] for c in colours])
    own = [masks[c] if colours.count(c) == 1 else masks[c] & masks[shape or noun] for c, noun, shape in phrases]
    return ImageTruth(caption, phrases, masks, objects, own, rgb)


class IoUSums:
    """Intersections and unions summed per word over a set, for a map and its two baselines
    (top-k: the k = |truth| highest pixels), and per-instance outcomes (binding and others).

    mIoU: I / U per word, averaged over words (the protocol of the earlier toy-world tables)."""

    def __init__(self, seed: int = 0) -> None:
        self.iu: dict[tuple[str, str], np.ndarray] = defaultdict(lambda: np.zeros(2))
        self.outcomes: dict[str, list[bool]] = defaultdict(list)
        self.instances: dict[str, list[float]] = defaultdict(list)
        self.rng = np.random.default_rng(seed)

    def add(self, word: str, score: np.ndarray, truth: np.ndarray, objects: np.ndarray) -> None:
        k = int(truth.sum())
        noise = self.rng.random(truth.shape)
        for name, m in (("map", score), ("flat", noise), ("objects", objects + 0.5 * noise)):
            top = np.zeros(truth.size, bool)
            top[np.argsort(-m.ravel(), kind="stable")[:k]] = True
            top = top.reshape(truth.shape)
            inter, union = int((top & truth).sum()), int((top | truth).sum())
            self.iu[(name, word)] += (inter, union)
            self.instances[name].append(inter / union)

    @classmethod
    def merged(cls, parts: Sequence[IoUSums]) -> IoUSums:
        """One set's sums from the sums of its disjoint parts."""
        out = cls()
        for part in parts:
            for key, iu in part.iu.items():
                out.iu[key] += iu
            for key, v in part.outcomes.items():
                out.outcomes[key] += v
            for key, v in part.instances.items():
                out.instances[key] += v
        return out

    def miou(self, name: str = "map") -> float:
        values = [iu[0] / iu[1] for (n, _), iu in self.iu.items() if n == name and iu[1]]
        return float(np.mean(values)) if values else float("nan")

    def words(self) -> list[str]:
        return sorted({w for (_, w) in self.iu})

    def rate(self, key: str) -> tuple[float, int]:
        v = self.outcomes.get(key, [])
        return (float(np.mean(v)) if v else float("nan")), len(v)


def _phrase_words(words: Sequence[str]) -> list[tuple[int, int]]:
    """Indices ``(colour, noun)`` of each ``COLOUR NOUN`` pair in a list of words, in order."""
    return [(k, k + 1) for k in range(len(words) - 1) if words[k] in PALETTE and words[k + 1] in NOUNS]


def prompt_word_quality(store: Any, images: Sequence[int], truths: dict[int, ImageTruth], *,
                        text_encoder: Any = None, config: Any = None, seed: int = 0) -> IoUSums:
    """Colour words and nouns of each generation prompt, maps from that prompt (the default
    OVAM maps), against their recovered masks.

    Outcomes: ``binding`` (a word's mean map higher on its object than on a disjoint object of
    another colour; objects oracle and flat map: 0.5), ``inside`` (a noun naming a shape: its
    mean map higher inside its own object than outside; flat: 0.5), ``inside_objects`` (the
    object oracle's score on ``inside``), ``missing`` (a word whose object the image lacks)."""
    from ..analyze import MapConfig, compute_maps, word_maps

    size = (store.layout.height, store.layout.width)
    config = config or MapConfig(size=size)
    scores = IoUSums(seed)
    for i in images:
        t = truths[i]
        maps = word_maps(compute_maps(store, [t.caption], images=[i], text_encoder=text_encoder, config=config))
        words = [str(w) for w in maps["word_str"].values]
        pairs = _phrase_words(words)
        if len(pairs) != len(t.phrases):
            raise ValueError(f"cannot align the words of {t.caption!r}: {words}")
        colours = [c for c, _, _ in t.phrases]
        for (ci, ni), (colour, noun, shape), own in zip(pairs, t.phrases, t.own):
            for idx, truth in ((ci, t.masks[colour]), (ni, t.masks[noun])):
                word = words[idx]
                m = maps.values[0, idx]
                if truth.sum() < _MIN_PIXELS:
                    scores.outcomes["missing"].append(True)
                    continue
                scores.outcomes["missing"].append(False)
                scores.add(word, m, truth, t.objects)
                for other_colour in dict.fromkeys(colours):
                    other = t.masks[other_colour]
                    if other_colour != colour and other.sum() >= _MIN_PIXELS and not (other & truth).any():
                        scores.outcomes["binding"].append(bool(m[truth].mean() > m[other].mean()))
                if idx == ni and shape is not None and own.sum() >= _MIN_PIXELS and (~own).any():
                    scores.outcomes["inside"].append(bool(m[own].mean() > m[~own].mean()))
                    oracle = t.objects.astype(float)
                    scores.outcomes["inside_objects"].append(bool(oracle[own].mean() > oracle[~own].mean()))
    return scores


def open_vocabulary_quality(store: Any, images: Sequence[int], truths: dict[int, ImageTruth], *,
                            text_encoder: Any = None, seed: int = 0) -> dict[str, IoUSums]:
    """Nouns that are *not* in the generation prompt, each alone (``"a ball"``), on every image.

    ``synonyms``: a synonym of a shape in the image, against all objects of that shape;
    ``shape words``: the shape word itself where the prompt used a synonym or hypernym;
    ``hypernyms``: ``"a shape"``/``"a object"`` against every object; ``synonyms + hypernyms``
    pools both. Outcome ``binding``: higher on its shape's objects than on a disjoint object."""
    from ..analyze import MapConfig, compute_maps, word_maps

    size = (store.layout.height, store.layout.width)
    nouns = list(NOUNS)
    maps = word_maps(compute_maps(store, [f"a {n}" for n in nouns], images=list(images), text_encoder=text_encoder,
                                  config=MapConfig(size=size)))
    col = {n: int(np.flatnonzero((maps["prompt_index"].values == k) & (maps["word_str"].values == n))[0])
           for k, n in enumerate(nouns)}
    out = {name: IoUSums(seed + k) for k, name in enumerate(("synonyms", "shape words", "hypernyms",
                                                             "synonyms + hypernyms"))}
    for row, i in enumerate(images):
        t = truths[i]
        in_prompt = set(t.caption.replace(",", " ").split())
        shapes = {s for _, _, s in t.phrases if s is not None}
        for shape in shapes:
            truth = t.masks[shape]
            if truth.sum() < _MIN_PIXELS:
                continue
            others = [t.masks[c] for c, _, s in t.phrases if s != shape]
            for noun, kind in [(n, "synonyms") for n in SYNONYMS[shape]] + [(shape, "shape words")]:
                if noun in in_prompt:
                    continue
                m = maps.values[row, col[noun]]
                for name in ((kind, "synonyms + hypernyms") if kind == "synonyms" else (kind,)):
                    out[name].add(noun, m, truth, t.objects)
                    for other in others:
                        if other.sum() >= _MIN_PIXELS and not (other & truth).any():
                            out[name].outcomes["binding"].append(bool(m[truth].mean() > m[other].mean()))
        if t.objects.sum() >= _MIN_PIXELS:
            for noun in HYPERNYMS:
                if noun not in in_prompt:
                    for name in ("hypernyms", "synonyms + hypernyms"):
                        out[name].add(noun, maps.values[row, col[noun]], t.objects, t.objects)
    return out


def padded_attribution(encoder: Any, text: str) -> Any:
    """``text`` encoded padded to the encoder's full length (77 tokens), as a pipeline encodes
    its prompt and as the training probe evaluates maps: the end-of-text and padding rows then
    take their share of each pixel's softmax. ovstore's attributions are unpadded (the OVAM
    reference semantics); this is for comparison only."""
    import torch

    from ..analyze import Attribution

    tok = encoder.tokenizer
    ids = tok(text, padding="max_length", max_length=encoder.max_length, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        rows = encoder._rows(ids.to(encoder.device))[0]
    return Attribution(label=text + " [padded]", tokens=tuple(tok.convert_ids_to_tokens(ids[0].tolist())),
                       embedding=rows, token_ids=tuple(int(i) for i in ids[0]))


def bare_rows(store: Any, images: Sequence[int], truths: dict[int, ImageTruth], *,
              text_encoder: Any = None, padded: bool = False
              ) -> list[tuple[int, int, str, np.ndarray, np.ndarray, np.ndarray]]:
    """The reference protocol's inputs: ``"circle square triangle"`` as attribution; per image and
    shape the image shows, ``(image, objects in the caption, shape, map / its max, truth, objects)``.
    ``padded``: the attribution padded to 77 tokens (:func:`padded_attribution`)."""
    from ..analyze import MapConfig, compute_maps, load_text_encoder

    size = (store.layout.height, store.layout.width)
    if padded:
        text_encoder = text_encoder or load_text_encoder(store.layout.model)
        attribution: Any = padded_attribution(text_encoder, BARE_SHAPES)
    else:
        attribution = BARE_SHAPES
    maps = compute_maps(store, [attribution], images=list(images), text_encoder=text_encoder,
                        config=MapConfig(size=size))
    tokens = [str(t).replace("</w>", "") for t in maps["token_str"].values]
    col = {s: tokens.index(s) for s in SHAPES}
    rows = []
    for row, i in enumerate(images):
        t = truths[i]
        for shape in dict.fromkeys(s for _, _, s in t.phrases if s is not None):
            truth = t.masks[shape]
            if truth.sum() >= _MIN_PIXELS:
                m = maps.values[row, col[shape]]
                rows.append((i, len(t.phrases), shape, m / max(float(m.max()), 1e-12), truth, t.objects))
    return rows


def bare_iou(rows: Sequence[tuple], threshold: float) -> float:
    """Mean IoU of ``map / max >= threshold`` against each object's pixels."""
    ious = [((m >= threshold) & truth).sum() / max(((m >= threshold) | truth).sum(), 1)
            for _, _, _, m, truth, _ in rows]
    return float(np.mean(ious)) if ious else float("nan")


def bare_baselines(rows: Sequence[tuple]) -> dict[str, float]:
    """The protocol's baselines at their best threshold: a flat map labels the whole image
    (IoU |truth| / N), the object oracle every object (|truth| / |objects|)."""
    return {"flat": float(np.mean([truth.sum() / truth.size for *_, truth, _ in rows])),
            "objects": float(np.mean([truth.sum() / max((truth | fg).sum(), 1) for *_, truth, fg in rows]))}


def label_truth(t: ImageTruth) -> np.ndarray:
    """VOC-style labels of the three shape classes: 0 background, 1.. for ``SHAPES``, 255 for
    object-coloured pixels no caption shape claims (a hypernym's object, a blob of unexpected
    extent), which are ignored."""
    label = np.zeros(t.rgb.shape[:2], np.uint8)
    label[classify_pixels(t.rgb) > 0] = IGNORE
    for k, shape in enumerate(SHAPES, start=1):
        if shape in t.masks:
            label[t.masks[shape]] = k
    return label


def label_miou(norm: np.ndarray, images: Sequence[int], truths: dict[int, ImageTruth], config: Any) -> float:
    """mIoU (background + classes, ``ovstore evaluate``'s protocol) of ``ovstore label``'s labelling
    function (``image_labels``, every refinement of ``config``) on given normalised class maps
    ``(image, class, H, W)`` (``ovstore.label.class_maps`` makes them as ``label_store`` does)."""
    from ..label import evaluate_masks, image_labels

    preds = [image_labels(norm[k], truths[i].rgb, truths[i].caption, config)[0] for k, i in enumerate(images)]
    return evaluate_masks(preds, [label_truth(truths[i]) for i in images], LABEL_NAMES).miou


def label_baselines(images: Sequence[int], truths: dict[int, ImageTruth], config: Any,
                    seed: int = 0) -> dict[str, float]:
    """``label_miou`` of the same settings on maps that need no word knowledge: ``flat``
    (uniform noise: no localisation) and ``objects`` (every class map = the union of the true
    objects, plus noise to break ties: where things are, not which is which)."""
    rng = np.random.default_rng(seed)
    n = len(config.classes)
    out = {}
    for name in ("flat", "objects"):
        maps = []
        for i in images:
            noise = rng.random((n, *truths[i].rgb.shape[:2]))
            m = noise if name == "flat" else truths[i].objects[None] + 0.5 * noise
            maps.append(((m - m.min()) / (m.max() - m.min())).astype(np.float32))
        out[name] = label_miou(np.stack(maps), images, truths, config)
    return out


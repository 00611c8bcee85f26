"""Semantic quality of OVAM on the embedded toy-world model, with exact ground truth.

A fixed evaluation set (toy-world captions from a seed, fixed generation seeds) is captured;
ground-truth masks of the *generated* images come from their flat colours
(``ovstore.toyworld.recover_masks``: nearest palette colour per pixel; a colour word takes
the pixels of its colour, a shape word the pixels of the colour(s) its caption pairs it
with). Every IoU has I and U summed per word over the set, then averaged over words, and
is printed beside two baselines that no word knowledge is needed for:

- flat: a uniform map (random tie-breaks), which scores the object's area share;
- objects: a map that marks every object of the image alike (it knows where things are,
  not which is which).

Protocols:

- top-k: the k = |ground truth| highest pixels of the map (a flat map cannot pass it);
- threshold t: pixels of the max-normalised map >= t (the reference protocol), swept;
- binding: in images with several objects, the fraction of (word, other object) pairs
  where the word's map is higher on average over its own object than over the other
  (chance 0.5; the objects baseline scores 0.5).

Sections: (a) words of the prompt; (b) open vocabulary (attributions that were never the
prompt, and words never in any prompt); (c) tokens optimized on annotated images, on
held-out images, vs the plain word; (d) layer and step subsets. Run:

    python benchmarks/bench_toyworld.py [--images 200] [--epochs 300] [--store EVAL.zarr] [--model DIR]
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

THRESHOLDS = (0.3, 0.5, 0.7, 0.8, 0.9)
OPEN_VOCABULARY = {"round": ("circle",), "pointy": ("triangle",), "shape": None, "object": None}


class Scores:
    """I and U summed per word for each protocol and baseline, and binding outcomes."""

    def __init__(self, seed: int = 0) -> None:
        self.iu: dict[tuple, np.ndarray] = defaultdict(lambda: np.zeros(2))
        self.binding: dict[str, list[bool]] = defaultdict(list)
        self.rng = np.random.default_rng(seed)

    def add(self, word: str, score_map: np.ndarray, mask: np.ndarray, objects: np.ndarray,
            others: list[np.ndarray] = ()) -> None:
        """``objects``: every object's pixels; ``others``: masks of objects that are not ``word``'s."""
        k = int(mask.sum())
        noise = self.rng.random(mask.shape)
        for name, m in (("map", score_map), ("flat", noise), ("objects", objects + 0.5 * noise)):
            top = np.zeros(mask.size, bool)
            top[np.argsort(m.ravel())[::-1][:k]] = True
            top = top.reshape(mask.shape)
            self.iu[(name, "top-k", word)] += ((top & mask).sum(), (top | mask).sum())
        peak = max(float(score_map.max()), 1e-12)
        for t in THRESHOLDS:
            pred = score_map / peak >= t
            self.iu[("map", t, word)] += ((pred & mask).sum(), (pred | mask).sum())
        self.iu[("flat", "threshold", word)] += (mask.sum(), mask.size)  # a flat map passes everywhere
        self.iu[("objects", "threshold", word)] += (mask.sum(), objects.sum())
        for other in others:
            if other.any() and not (other & mask).any():
                self.binding[word].append(bool(score_map[mask].mean() > score_map[other].mean()))

    def miou(self, name: str, protocol) -> float:
        values = [iu[0] / iu[1] for (n, p, _), iu in self.iu.items() if n == name and p == protocol and iu[1]]
        return float(np.mean(values)) if values else float("nan")

    def binding_accuracy(self) -> tuple[float, int]:
        outcomes = [o for v in self.binding.values() for o in v]
        return (float(np.mean(outcomes)) if outcomes else float("nan")), len(outcomes)

    def row(self, label: str) -> str:
        sweep = " | ".join(f"{self.miou('map', t):.3f}" for t in THRESHOLDS)
        words = len({w for (_, _, w) in self.iu})
        bind, pairs = self.binding_accuracy()
        best = max(self.miou("objects", "threshold"), self.miou("flat", "threshold"))
        return (f"| {label} | {words} | {self.miou('map', 'top-k'):.3f} | {self.miou('flat', 'top-k'):.3f} | "
                f"{self.miou('objects', 'top-k'):.3f} | {sweep} | {best:.3f} | "
                + (f"{bind:.2f} ({pairs}) |" if pairs else "- |"))


HEADER = ("| maps | words | top-k mIoU | flat | objects | " + " | ".join(f"t={t}" for t in THRESHOLDS)
          + " | best baseline (any t) | binding (pairs) |\n|---|---:|---:|---:|---:|" + "---:|" * len(THRESHOLDS)
          + "---:|---:|")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--seed", type=int, default=2024)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--epochs", type=int, default=300)
    parser.add_argument("--store", type=Path, default=None, help="reuse (or create) this evaluation store")
    parser.add_argument("--model", default=None, help="pipeline to evaluate (default: the embedded toy-world model)")
    args = parser.parse_args()
    torch.set_num_threads(1)

    from ovstore.analyze import MapConfig, compute_maps, load_text_encoder, word_maps
    from ovstore.capture import CaptureConfig, build_requests, capture, load_pipeline
    from ovstore.optimize import OptimizeConfig, TokenTask, optimize_tokens, token_attribution
    from ovstore.selection import LayerSelection
    from ovstore.store import open_store
    from ovstore.toyworld import COLORS, SHAPES, parse_caption, recover_masks, sample_scenes

    t_start = time.perf_counter()
    store_path = args.store or Path(tempfile.mkdtemp()) / "toy-eval.zarr"
    if not (store_path / "zarr.json").exists():
        captions = [s.caption for s in sample_scenes(args.seed, args.images)]
        pipe, identity = load_pipeline(args.model)
        capture(pipe, identity, build_requests([(c, None, None) for c in captions], seed=args.seed,
                                               guidance=args.guidance, num_inference_steps=args.steps),
                store_path, config=CaptureConfig(num_inference_steps=args.steps, guidance=args.guidance, batch_size=16))
    store = open_store(store_path)
    images = store.complete_images()
    encoder = load_text_encoder(store.layout.model)
    size = (store.layout.height, store.layout.width)
    truth, objects, pairs_of = {}, {}, {}
    for i in images:
        caption = store.record(i).prompt
        masks = recover_masks(store.image(i), caption)
        truth[i] = {w: m for w, m in masks.items() if m.any()}
        pairs_of[i] = parse_caption(caption)
        objects[i] = np.logical_or.reduce([masks[c] for c, _ in pairs_of[i]])

    def others(i: int, word: str) -> list[np.ndarray]:
        """Masks of the objects of image ``i`` that ``word`` does not name."""
        return [truth[i][c] for c, s in pairs_of[i] if word not in (c, s) and c in truth[i]]

    print(f"machine: {platform.machine()}, 1 torch thread; model {store.layout.model.id}; {len(images)} images, "
          f"{store.layout.n_steps} UNet calls, guidance {args.guidance}")

    def in_prompt(config: MapConfig, words=None) -> Scores:
        scores = Scores()
        for i in images:
            maps = word_maps(compute_maps(store, [store.record(i).prompt], images=[i], text_encoder=encoder,
                                          config=config))
            for k, word in enumerate(maps["word_str"].values):
                word = str(word)
                if word in truth[i] and (words is None or word in words):
                    scores.add(word, maps.values[0, k], truth[i][word], objects[i], others(i, word))
        return scores

    full = MapConfig(size=size)
    print("\n(a) words of the prompt\n")
    print(HEADER)
    print(in_prompt(full, COLORS).row("colour words"))
    print(in_prompt(full, SHAPES).row("shape words"))
    print(in_prompt(full).row("all words"))

    print("\n(b) open vocabulary: attributions that are not the generation prompt\n")
    print(HEADER)
    phrase_scores, word_scores_b = Scores(), Scores()
    for i in images:
        phrases = [f"a {c} {s}" for c, s in pairs_of[i]] + [f"a {w}" for c, s in pairs_of[i] for w in (c, s)]
        maps = word_maps(compute_maps(store, phrases, images=[i], text_encoder=encoder, config=full))
        for k, phrase in enumerate(phrases):
            target = phrase.split()[1:]
            for word in target:
                col = np.flatnonzero((maps["prompt_index"].values == k) & (maps["word_str"].values == word))
                if word in truth[i] and col.size:
                    (phrase_scores if len(target) == 2 else word_scores_b).add(
                        word, maps.values[0, col[0]], truth[i][word], objects[i], others(i, word))
    print(phrase_scores.row("one object's phrase alone ('a red circle')"))
    print(word_scores_b.row("one word in a template ('a circle', 'a red')"))
    attributions = list(OPEN_VOCABULARY)
    maps = word_maps(compute_maps(store, attributions, images=images, text_encoder=encoder, config=full))
    for k, word in enumerate(attributions):
        scores = Scores()
        col = int(np.flatnonzero((maps["prompt_index"].values == k) & (maps["word_str"].values == word))[0])
        targets = OPEN_VOCABULARY[word]
        for row, i in enumerate(images):
            present = [truth[i][s] for s in (targets or SHAPES) if s in truth[i]]
            if present:
                rest = [truth[i][c] for c, s in pairs_of[i] if targets and s not in targets and c in truth[i]]
                scores.add(word, maps.values[row, col], np.logical_or.reduce(present), objects[i], rest)
        target = "/".join(targets) if targets else "every object"
        print(scores.row(f'unseen word "{word}" vs {target}'))

    for n_train in (1, 3):
        print(f"\n(c) tokens optimized on {n_train} annotated image(s) per word ({args.epochs} epochs, reference "
              "recipe), on the held-out images, vs the plain word ('a WORD')\n")
        print(HEADER)
        tasks, train_images = [], {}
        for word in (*SHAPES, *COLORS):
            having = [i for i in images if word in truth[i]][:n_train]
            if len(having) == n_train:
                train_images[word] = set(having)
                tasks.append(TokenTask(word, tuple(having), tuple(truth[i][word] for i in having)))
        tokens = optimize_tokens(store, tasks, config=OptimizeConfig(epochs=args.epochs), text_encoder=encoder)
        token_scores, word_scores = Scores(), Scores()
        for token in tokens:
            word = token.name
            held = [i for i in images if word in truth[i] and i not in train_images[word]]
            maps = word_maps(compute_maps(store, [token_attribution(token, store.layout.model), f"a {word}"],
                                          images=held, text_encoder=encoder, config=full))
            col = int(np.flatnonzero((maps["prompt_index"].values == 1) & (maps["word_str"].values == word))[0])
            for row, i in enumerate(held):
                token_scores.add(word, maps.values[row, 1], truth[i][word], objects[i], others(i, word))
                word_scores.add(word, maps.values[row, col], truth[i][word], objects[i], others(i, word))
        print(token_scores.row("learned tokens"))
        print(word_scores.row("plain words ('a WORD')"))

    print("\n(d) layer and step subsets (words of the prompt)\n")
    print(HEADER)
    n = store.layout.n_steps
    subsets = {
        "all layers, all calls": full,
        "16x16 layers only": MapConfig(size=size, layers=LayerSelection(resolutions=((16, 16),), include_mid=False)),
        "8x8 layers only": MapConfig(size=size, layers=LayerSelection(resolutions=((8, 8),), include_mid=False)),
        "mid block included": MapConfig(size=size, layers=LayerSelection(include_mid=True)),
        f"first half of the calls (0:{n // 2})": MapConfig(size=size, steps=f"0:{n // 2}"),
        f"second half of the calls ({n // 2}:)": MapConfig(size=size, steps=f"{n // 2}:"),
        "every other call": MapConfig(size=size, steps="::2"),
    }
    for label, config in subsets.items():
        print(in_prompt(config).row(label))
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()

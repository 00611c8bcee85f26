"""Why a token learned from one annotated image loses to the plain word on the toy world, and the
variants of the recipe tried against it. Run:

    python benchmarks/bench_token_trials.py [--per-count 50] [--choices 3] [--work DIR]

Sets as ``bench_toyworld.py`` makes them (held-out world-v2 captions, ``quality_scenes``): the
evaluation set (``--per-count`` scenes per object count, seed 2024) holds the annotated images and
the held-out images; the calibration set (seed 7, 20 per count) gives the unannotated images of the
consistency variant and nothing else. Each variant learns one token per class from one annotated
image per class (choice ``k``: the ``k``-th evaluation image whose class mask has >= 10 pixels, as
``bench_toyworld.py`` picks its first) and is scored by top-k mIoU on every other evaluation image
with the class, beside the plain word ``a WORD`` (the same images), over ``--choices`` choices.

The variants share the reference recipe's forward pass (``ovstore.optimize``: the [SoT, class]
rows of ``A photograph of a WORD``, default maps, min-max over the map tensor) and differ in the
loss, the parameters or the images:

- ``reference``: cross-entropy with the mask as class index, SGD lr 100, StepLR 120 x 0.7,
  300 epochs, the lowest-loss rows kept (``optimize_tokens``);
- ``start``: the rows before any step;
- ``frozen SoT``: only the class row learns;
- ``prior``: + ``w * |rows - start|^2 / |start|^2``;
- ``balanced``: cross-entropy weighted by the inverse class frequency;
- ``dice``: soft Dice of the class map (min-max over the image) against the mask (lr 10);
- ``share``: binary cross-entropy of the class row's share of the softmax (lr 10);
- ``consistency``: + ``w *`` the mean squared difference between the token's min-max maps on 24
  unannotated calibration images and the start's;
- ``span``: the class row moves only in the span of the class words (or of all nine shape words):
  ``row = start + sum_v beta_v (word_v - start)``, Adam lr 0.01, 300 epochs;
- ``multi-object``: the reference recipe on annotated images with two or three objects.

Then the reference token's held-out top-k by the colour of the object, at the start and after
training (the diagnosis: the token learns the annotated object's colour).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

CLASSES = ("circle", "square", "triangle")
CONTEXT = "A photograph of a {}"
SHAPE_WORDS = ("circle", "ball", "disc", "square", "box", "block", "triangle", "wedge", "pyramid")


class Trial:
    """The evaluation store, its truth and the differentiable forward pass of the reference recipe."""

    def __init__(self, ev, cal, encoder) -> None:
        from ovstore.toyworld import quality as q

        self.ev, self.cal, self.encoder = ev, cal, encoder
        self.images = ev.complete_images()
        self.truth = {i: q.image_truth(ev, i) for i in self.images}
        self.size = (ev.layout.height, ev.layout.width)

    def annotated(self, choice: int, min_objects: int = 1) -> dict[str, int]:
        return {c: [i for i in self.images if c in self.truth[i].masks and self.truth[i].masks[c].sum() >= 10
                    and len(self.truth[i].phrases) >= min_objects][choice] for c in CLASSES}

    def learn(self, train: dict[str, int], *, loss: str = "ce", epochs: int = 300, lr: float = 100.0,
              prior: float = 0.0, frozen_sot: bool = False, consistency: float = 0.0,
              span: tuple[str, ...] | None = None) -> torch.Tensor:
        """Rows (class, 2, hidden) learned on ``train`` with one variant of the recipe."""
        from ovstore.analyze import MapConfig, MapPlan, normalize_maps
        from ovstore.optimize.trainer import _Forward, initial_rows

        union = sorted(set(train.values()))
        slot = {i: k for k, i in enumerate(union)}
        forward = _Forward(MapPlan(self.ev, MapConfig()), union, self.size)
        start = torch.stack([initial_rows(self.encoder, c, CONTEXT) for c in CLASSES])
        masks = [torch.from_numpy(self.truth[train[c]].masks[c]) for c in CLASSES]
        if consistency:
            unannotated = _Forward(MapPlan(self.cal, MapConfig()), self.cal.complete_images()[:24], self.size)
            with torch.no_grad():
                target = normalize_maps(unannotated(start)[:, :, 1], "minmax")
        if span is not None:
            basis = torch.stack([initial_rows(self.encoder, w, CONTEXT)[1] for w in span])
            directions = basis[None] - start[:, 1:2]  # (class, word, hidden)
            beta = torch.nn.Parameter(torch.zeros(len(CLASSES), len(span)))
            optimizer = torch.optim.Adam([beta], lr=lr)
            scheduler = None
        else:
            free = torch.nn.Parameter(start.clone())
            optimizer = torch.optim.SGD([free], lr=lr)
            scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=120, gamma=0.7)

        def rows() -> torch.Tensor:
            if span is not None:
                return torch.stack([start[:, 0], start[:, 1] + torch.einsum("cv,cvh->ch", beta, directions)], 1)
            return torch.cat([start[:, :1], free[:, 1:]], 1) if frozen_sot else free

        best, best_rows = [float("inf")] * len(CLASSES), start.clone()
        for _ in range(epochs):
            optimizer.zero_grad(set_to_none=True)
            r = rows()
            maps = forward(r)
            # the unannotated images' maps, once per epoch for every class
            drifts = normalize_maps(unannotated(r)[:, :, 1], "minmax") - target if consistency else None
            losses = []
            for c in range(len(CLASSES)):
                m, mask = maps[slot[train[CLASSES[c]]], c], masks[c]  # (2, H, W)
                if loss in ("ce", "balanced"):
                    mm = (m - m.min()) / (m.max() - m.min()).clamp_min(1e-12)
                    weight = None
                    if loss == "balanced":
                        weight = torch.stack([torch.tensor(1.0), (~mask).sum() / mask.sum()]).float()
                        weight = weight / weight.sum()
                    value = F.cross_entropy(mm[None], mask.long()[None], weight=weight)
                elif loss == "dice":
                    t = normalize_maps(m[1], "minmax")
                    value = 1 - 2 * (t * mask).sum() / (t.sum() + mask.sum())
                else:  # share
                    p = (m[1] / (m[0] + m[1]).clamp_min(1e-12)).clamp(1e-6, 1 - 1e-6)
                    value = F.binary_cross_entropy(p, mask.float())
                if consistency:
                    value = value + consistency * (drifts[:, c] ** 2).mean()
                if prior:
                    value = value + prior * ((r[c] - start[c]) ** 2).sum() / (start[c] ** 2).sum()
                losses.append(value)
            for c, value in enumerate(losses):
                if float(value.detach()) < best[c]:
                    best[c], best_rows[c] = float(value.detach()), r.detach()[c]
            torch.stack(losses).sum().backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
        return best_rows if epochs else start

    def held_out(self, train: dict[str, int], rows: torch.Tensor, by_colour: bool = False):
        """Top-k mIoU of the learned rows and of ``a WORD`` on the evaluation images not annotated;
        with ``by_colour``: per class and colour of the object, the token's mean instance IoU."""
        from ovstore.analyze import MapConfig, compute_maps
        from ovstore.analyze.text import Attribution
        from ovstore.toyworld import quality as q

        token, word, colours = q.IoUSums(1), q.IoUSums(2), {}
        for c, name in enumerate(CLASSES):
            having = [i for i in self.images if i not in train.values() and name in self.truth[i].masks
                      and self.truth[i].masks[name].sum() >= 3]
            attribution = Attribution(label=f"{name}*", tokens=("<|startoftext|>", f"{name}*"),
                                      embedding=rows[c].float())
            maps = compute_maps(self.ev, [attribution, f"a {name}"], images=having, text_encoder=self.encoder,
                                config=MapConfig(size=self.size))
            col = int(np.flatnonzero(maps["token_str"].values == f"{name}</w>")[0])
            for r, i in enumerate(having):
                truth = self.truth[i].masks[name]
                token.add(name, maps.values[r, 1], truth, self.truth[i].objects)
                word.add(name, maps.values[r, col], truth, self.truth[i].objects)
                for colour in {co for co, noun, shape in self.truth[i].phrases if (shape or noun) == name}:
                    colours.setdefault((name, colour), []).append(token.instances["map"][-1])
        if by_colour:
            return {key: (float(np.mean(v)), len(v)) for key, v in sorted(colours.items())}
        return token.miou(), word.miou(), token.miou("flat"), token.miou("objects")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-count", type=int, default=50)
    parser.add_argument("--choices", type=int, default=3)
    parser.add_argument("--work", type=Path, default=None, help="stores (default: a temp dir)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    import shutil
    import tempfile

    from ovstore.analyze import load_text_encoder
    from ovstore.toyworld import quality as q

    t_start = time.perf_counter()
    work = args.work or Path(tempfile.mkdtemp())
    work.mkdir(parents=True, exist_ok=True)
    cal_scenes = q.quality_scenes(7, 20)
    ev_scenes = q.quality_scenes(2024, args.per_count, exclude=[s.caption for s in cal_scenes])
    cal = q.capture_captions([s.caption for s in cal_scenes], work / "toy-v2-cal.zarr", seed=7000)
    ev = q.capture_captions([s.caption for s in ev_scenes], work / "toy-v2-eval.zarr", seed=2024)
    trial = Trial(ev, cal, load_text_encoder(ev.layout.model))
    print(f"evaluation {len(trial.images)} images, {args.choices} choices of annotated images per variant; "
          f"capture {time.perf_counter() - t_start:.0f} s\n")
    variants = {
        "reference": {}, "start (no step)": {"epochs": 0}, "frozen SoT": {"frozen_sot": True},
        "prior, weight 1": {"prior": 1.0}, "balanced cross-entropy": {"loss": "balanced"},
        "soft Dice, lr 10": {"loss": "dice", "lr": 10.0}, "share + BCE, lr 10": {"loss": "share", "lr": 10.0},
        "consistency, weight 1": {"consistency": 1.0}, "consistency, weight 10": {"consistency": 10.0},
        "consistency, weight 100": {"consistency": 100.0},
        "span of the class words": {"span": CLASSES, "lr": 0.01},
        "span of the nine shape words": {"span": SHAPE_WORDS, "lr": 0.01},
    }
    print("| variant | token top-k, per choice | token mean | word `a WORD` mean | flat | object oracle | s |")
    print("|---|---|---:|---:|---:|---:|---:|")
    rows_of = {}
    for name, options in [*variants.items(), ("multi-object annotated images", {"min_objects": 2})]:
        t0 = time.perf_counter()
        options = dict(options)
        min_objects = options.pop("min_objects", 1)
        scores = []
        for choice in range(args.choices):
            train = trial.annotated(choice, min_objects)
            rows = trial.learn(train, **options)
            rows_of[(name, choice)] = (train, rows)
            scores.append(trial.held_out(train, rows))
        print(f"| {name} | {' '.join(f'{s[0]:.3f}' for s in scores)} | {np.mean([s[0] for s in scores]):.3f} | "
              f"{np.mean([s[1] for s in scores]):.3f} | {np.mean([s[2] for s in scores]):.3f} | "
              f"{np.mean([s[3] for s in scores]):.3f} | {time.perf_counter() - t0:.0f} |", flush=True)

    print("\nthe reference token's held-out top-k by the colour of the object (mean instance IoU), "
          "start -> trained\n")
    print("| choice | annotated images | class | " + " | ".join(("red", "green", "blue", "yellow")) + " |")
    print("|---|---|---|" + "---:|" * 4)
    for choice in range(min(args.choices, 2)):
        train, rows = rows_of[("reference", choice)]
        before = trial.held_out(train, rows_of[("start (no step)", choice)][1], by_colour=True)
        after = trial.held_out(train, rows, by_colour=True)
        shown = ", ".join(f"{c} {i} ({trial.truth[i].caption})" for c, i in train.items())
        for name in CLASSES:
            cells = [f"{before[(name, co)][0]:.3f} → {after[(name, co)][0]:.3f} ({after[(name, co)][1]})"
                     if (name, co) in after else "-" for co in ("red", "green", "blue", "yellow")]
            print(f"| {choice} | {shown} | {name} | " + " | ".join(cells) + " |")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()

"""A segmentation network trained on ``ovstore label``'s output against the same network trained
on exact masks (DiffuMask / DatasetDM, in miniature, on the toy world).

1. ``N`` toy-world captions (held-out world-v2 captions, ``quality_scenes``; seeds ``1000 * seed + i``)
   are generated with the embedded model (``ovstore capture``) and labelled by ``label_store`` with
   the model's defaults: a VOC folder.
2. The same images' exact masks, recovered from the generated pixels (``label_truth``, as
   bench_toyworld.py; object-coloured pixels no caption shape claims are ignored): a second VOC
   folder (``write_label_tree``). Its agreement with the first is the label quality.
3. One tiny U-Net (32x32 RGB in, background + circle/square/triangle out) is trained on each folder
   with the same recipe and seed (fixed epochs, Adam, horizontal flips, CPU), for each of several
   network seeds, so the ratio comes with its spread.
4. Both networks are evaluated on ``M`` freshly *rendered* toy-world scenes (renderer masks, another
   seed stream, no caption shared with training beyond the few one-object ones), mIoU over
   background + 3 classes, beside the majority (all-background) baseline. Target: the label-trained
   network reaches >= 0.80 of the exact-mask network's mIoU.

The work folder is resumable: the store, the label folders, each trained network and its scores
are reused when present.

    nice -n 10 python benchmarks/bench_downstream.py [--n 300] [--m 200] [--epochs 40] [--net-seeds 0 1 2] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_real_images import exact_labels  # noqa: E402  (renderer masks -> VOC labels)

CLASSES = ("circle", "square", "triangle")
IGNORE = 255


class TinyUNet(nn.Module):
    """Two-level U-Net (32 -> 16 -> 8 px), ``width`` channels at full resolution."""

    def __init__(self, width: int = 24, classes: int = 4) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                                 nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

        w = width
        self.enc1, self.enc2, self.mid = block(3, w), block(w, 2 * w), block(2 * w, 4 * w)
        self.up2, self.dec2 = nn.ConvTranspose2d(4 * w, 2 * w, 2, stride=2), block(4 * w, 2 * w)
        self.up1, self.dec1 = nn.ConvTranspose2d(2 * w, w, 2, stride=2), block(2 * w, w)
        self.head = nn.Conv2d(w, classes, 1)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(self.pool(e1))
        m = self.mid(self.pool(e2))
        d2 = self.dec2(torch.cat([self.up2(m), e2], 1))
        return self.head(self.dec1(torch.cat([self.up1(d2), e1], 1)))


def to_tensor(rgbs: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(rgbs)).permute(0, 3, 1, 2).float() / 255.0


def read_labels(folder: Path, images: list[int]) -> np.ndarray:
    """The label PNGs of a VOC folder (``SegmentationClass/NNNNN.png``) for ``images``."""
    from PIL import Image

    return np.stack([np.asarray(Image.open(folder / "SegmentationClass" / f"{i:05d}.png")) for i in images])


def train(rgbs: torch.Tensor, labels: np.ndarray, *, epochs: int, width: int, batch: int, lr: float,
          seed: int, vertical_flips: bool = False) -> tuple[TinyUNet, float]:
    """The fixed recipe: Adam, cross-entropy ignoring 255, random horizontal flips (and vertical
    ones with ``vertical_flips``: they turn the world's upright triangles over, shapes no scene
    has), ``epochs`` passes."""
    torch.manual_seed(seed)
    net = TinyUNet(width)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    y = torch.from_numpy(labels.astype(np.int64))
    loss_fn = nn.CrossEntropyLoss(ignore_index=IGNORE)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    net.train()
    for _ in range(epochs):
        order = torch.randperm(len(rgbs), generator=gen)
        for k in range(0, len(order), batch):
            idx = order[k:k + batch]
            xb, yb = rgbs[idx], y[idx]
            if torch.rand(1, generator=gen) < 0.5:
                xb, yb = xb.flip(-1), yb.flip(-1)
            if torch.rand(1, generator=gen) < 0.5 and vertical_flips:
                xb, yb = xb.flip(-2), yb.flip(-2)
            opt.zero_grad()
            loss_fn(net(xb), yb).backward()
            opt.step()
        sched.step()
    return net, time.perf_counter() - t0


@torch.no_grad()
def predict(net: TinyUNet, rgbs: torch.Tensor) -> np.ndarray:
    net.eval()
    return net(rgbs).argmax(1).numpy().astype(np.uint8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=300, help="generated training images (a multiple of 3)")
    parser.add_argument("--m", type=int, default=200, help="rendered evaluation scenes")
    parser.add_argument("--train-seed", type=int, default=5)
    parser.add_argument("--eval-seed", type=int, default=2024)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--width", type=int, default=24)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--net-seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="one pair of networks per seed: mean and spread of both mIoUs and of the ratio")
    parser.add_argument("--vertical-flips", action="store_true", help="also flip vertically (the earlier recipe)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from ovstore.label import LabelConfig, evaluate_dirs, evaluate_masks, label_store
    from ovstore.label.voc import write_label_tree
    from ovstore.toyworld import quality as q

    t_start = time.perf_counter()
    work = args.work or Path(tempfile.mkdtemp())
    work.mkdir(parents=True, exist_ok=True)
    tr_scenes = q.quality_scenes(args.train_seed, -(-args.n // 3))[: args.n]
    ev_scenes = q.quality_scenes(args.eval_seed, -(-args.m // 3), exclude=[s.caption for s in tr_scenes])[: args.m]
    shared = len({s.caption for s in ev_scenes} & {s.caption for s in tr_scenes})

    # 1. generated training images, labelled by ovstore with the model's defaults
    t = time.perf_counter()
    store = q.capture_captions([s.caption for s in tr_scenes], work / "train.zarr", seed=1000 * args.train_seed,
                               steps=args.steps)
    t_capture = time.perf_counter() - t
    images = store.complete_images()
    t = time.perf_counter()
    voc_label = work / "voc-ovstore-label"
    label_store(store, voc_label, LabelConfig(classes=CLASSES), scheduler="synchronous", partition_size=32)
    t_label = time.perf_counter() - t
    # 2. the same images' exact masks, recovered from their pixels
    voc_exact = write_label_tree(work / "voc-exact", CLASSES, {i: q.label_truth(q.image_truth(store, i))
                                                               for i in images})
    quality = evaluate_dirs(voc_label, voc_exact)

    # 3. one network per folder, same recipe and seed; 4. scored on rendered scenes
    x_train = to_tensor([store.image(i) for i in images])
    x_eval = to_tensor([s.image for s in ev_scenes])
    truths = [exact_labels(s) for s in ev_scenes]
    runs: dict[int, dict[str, dict]] = {}
    for net_seed in args.net_seeds:
        results = runs[net_seed] = {}
        for name, folder in (("ovstore label", voc_label), ("exact masks", voc_exact)):
            key = name.replace(" ", "-")
            cache = work / f"net-{key}-seed{net_seed}.json"
            config = {k: getattr(args, k) for k in ("n", "m", "epochs", "width", "batch", "lr", "train_seed",
                                                    "eval_seed", "steps", "vertical_flips")} | {"net_seed": net_seed}
            if cache.exists() and json.loads(cache.read_text())["config"] == config:
                results[name] = json.loads(cache.read_text())
                continue
            labels = read_labels(folder, images)
            net, seconds = train(x_train, labels, epochs=args.epochs, width=args.width, batch=args.batch, lr=args.lr,
                                 seed=net_seed, vertical_flips=args.vertical_flips)
            torch.save(net.state_dict(), work / f"net-{key}-seed{net_seed}.pt")
            report = evaluate_masks(list(predict(net, x_eval)), truths, q.LABEL_NAMES)
            results[name] = {"config": config, "miou": report.miou, "iou": [float(v) for v in report.iou],
                             "seconds": seconds, "ignored": float((labels == IGNORE).mean())}
            cache.write_text(json.dumps(results[name]))
    majority = evaluate_masks([np.zeros_like(t) for t in truths], truths, q.LABEL_NAMES)
    params = sum(p.numel() for p in TinyUNet(args.width).parameters())

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores (shared), {args.threads} torch thread(s); model "
          f"{store.layout.model.id}, 32x32, {args.steps} steps; training {len(images)} generated images "
          f"(capture {t_capture:.0f} s, label {t_label:.0f} s), evaluation {len(ev_scenes)} rendered scenes "
          f"({shared} one-object captions shared with training, other images); network {params} parameters, "
          f"{args.epochs} epochs, Adam lr {args.lr}, batch {args.batch}, "
          f"{'horizontal and vertical' if args.vertical_flips else 'horizontal'} flips; network seeds {args.net_seeds}")
    print(f"label quality (ovstore label vs exact masks of the {len(images)} training images): mIoU "
          f"{quality.miou:.3f}; IoU " + ", ".join(f"{c} {v:.3f}" for c, v in zip(q.LABEL_NAMES, quality.iou)) + "\n")
    print("| network trained on | seed | mIoU (bg + 3) | " + " | ".join(f"{c} IoU" for c in q.LABEL_NAMES)
          + " | ignored train pixels | train s |")
    print("|---|---:|" + "---:|" * (len(q.LABEL_NAMES) + 3))
    for net_seed, results in runs.items():
        for name, r in results.items():
            print(f"| {name} | {net_seed} | {r['miou']:.3f} | " + " | ".join(f"{v:.3f}" for v in r["iou"])
                  + f" | {r['ignored']:.3f} | {r['seconds']:.0f} |")
    print(f"| baseline: majority (all background) | | {majority.miou:.3f} | "
          + " | ".join(f"{v:.3f}" for v in majority.iou) + " | | |")

    def mean_sd(values: list[float]) -> str:
        return f"{np.mean(values):.3f} ± {np.std(values, ddof=1) if len(values) > 1 else 0.0:.3f}"

    label_m = [r["ovstore label"]["miou"] for r in runs.values()]
    exact_m = [r["exact masks"]["miou"] for r in runs.values()]
    ratios = [a / b for a, b in zip(label_m, exact_m)]
    print(f"\nover {len(runs)} network seeds (mean ± sd): ovstore label {mean_sd(label_m)}, exact masks "
          f"{mean_sd(exact_m)}; ratio per seed {', '.join(f'{r:.3f}' for r in ratios)}, {mean_sd(ratios)}; ratio of "
          f"the means {np.mean(label_m) / np.mean(exact_m):.3f} (target >= 0.80)")
    print(f"total {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()

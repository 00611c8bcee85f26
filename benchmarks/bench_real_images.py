"""Labels of real images against labels of generations, on the toy world, every figure beside its
flat-map and object-oracle baselines.

Rendered world-v2 scenes (held-out captions, ``ovstore.toyworld.quality.quality_scenes``; the
renderer gives their exact masks) are written as PNG files with an images file and captured with
``ovstore capture --images-file`` by both methods (``--strength S``, img2img; ``--invert``, DDIM
inversion); the same captions are also generated (``ovstore capture``, seeds ``seed + i``). Then
``ovstore label --classes circle,square,triangle`` (``label_class_maps`` + ``image_labels``, as
``label_store`` runs them) with

- the model's defaults (``ovstore_defaults.json``: class maps from the image's prompt, min-max,
  threshold 0.05, prompt classes only), and
- the threshold chosen on a calibration set (other captions and seeds) of the same kind,

each with and without ``--crf``. mIoU is over background + 3 classes: real images against the
renderer's exact masks, generations against the masks recovered from the generated pixels
(``recover_masks``, as bench_toyworld.py; the model draws objects where it likes). Baselines
(``flat``: uniform noise maps; ``objects``: every class map = the union of the true objects) are
labelled with the same settings. Target: labels of real renders within 0.05 of labels of
generated images.

    nice -n 10 python benchmarks/bench_real_images.py [--per-count 12] [--calibration-per-count 6]
        [--strength 0.5] [--work DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ("circle", "square", "triangle")
GRID = (0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.6)


def write_renders(scenes, folder: Path) -> Path:
    """The scenes as PNG files and their images file (one line per scene, seed = its index)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "images.jsonl", "w") as f:
        for k, scene in enumerate(scenes):
            scene.to_pil().save(folder / f"{k:04d}.png")
            f.write(json.dumps({"image": f"{k:04d}.png", "prompt": scene.caption}) + "\n")
    return folder / "images.jsonl"


def capture_real(images_file: Path, out: Path, *, method: str, strength: float, steps: int, guidance: float,
                 seed: int):
    """``ovstore capture --images-file F --strength S | --invert`` through its Python API (reused when done)."""
    from ovstore.capture import run_capture
    from ovstore.store import open_store

    if not (out / "zarr.json").exists() or open_store(out).incomplete_images():
        options = {"strength": strength, "guidance": guidance} if method == "strength" else {"invert": True}
        run_capture(images_file=images_file, out=out, steps=steps, seed=seed, batch_size=16,
                    resume=(out / "zarr.json").exists(), **options)
    return open_store(out)


def exact_labels(scene) -> np.ndarray:
    """VOC labels from the renderer's masks: 0 background, 1.. the shape classes (nothing ignored)."""
    label = np.zeros(scene.image.shape[:2], np.uint8)
    for mask, obj in zip(scene.object_masks, scene.objects):
        label[mask] = CLASSES.index(obj.shape) + 1
    return label


def miou(norm, rgbs, captions, truths, config) -> float:
    from ovstore.label import evaluate_masks, image_labels
    from ovstore.toyworld.quality import LABEL_NAMES

    preds = [image_labels(norm[k], rgbs[k], captions[k], config)[0] for k in range(len(truths))]
    return evaluate_masks(preds, truths, LABEL_NAMES).miou


def baselines(objects, rgbs, captions, truths, config, seed: int = 0) -> dict[str, float]:
    """mIoU of the same settings on maps without word knowledge (flat noise; the object oracle)."""
    rng = np.random.default_rng(seed)
    out = {}
    for name in ("flat", "objects"):
        maps = []
        for fg in objects:
            noise = rng.random((len(CLASSES), *fg.shape))
            m = noise if name == "flat" else fg[None] + 0.5 * noise
            maps.append(((m - m.min()) / (m.max() - m.min())).astype(np.float32))
        out[name] = miou(np.stack(maps), rgbs, captions, truths, config)
    return out


class LabelSet:
    """One store's class maps, images, captions and truth (exact for real images, recovered for generations)."""

    def __init__(self, store, config, encoder, scenes=None) -> None:
        from ovstore.label.class_maps import label_class_maps
        from ovstore.toyworld import quality as q

        self.images = store.complete_images()
        self.norm = label_class_maps(store, self.images, config, encoder,
                                     size=(store.layout.height, store.layout.width))
        self.rgbs = [store.image(i) for i in self.images]
        self.captions = [store.record(i).prompt for i in self.images]
        if scenes is not None:
            self.truths = [exact_labels(scenes[i]) for i in self.images]
            self.objects = [scenes[i].object_masks.any(axis=0) for i in self.images]
        else:
            t = [q.image_truth(store, i) for i in self.images]
            self.truths = [q.label_truth(x) for x in t]
            self.objects = [x.objects for x in t]

    def miou(self, config) -> float:
        return miou(self.norm, self.rgbs, self.captions, self.truths, config)

    def baselines(self, config) -> dict[str, float]:
        return baselines(self.objects, self.rgbs, self.captions, self.truths, config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-count", type=int, default=12, help="evaluation scenes per object count (1, 2, 3)")
    parser.add_argument("--calibration-per-count", type=int, default=6)
    parser.add_argument("--seed", type=int, default=2024)
    parser.add_argument("--calibration-seed", type=int, default=7)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=5.0, help="generations and --strength")
    parser.add_argument("--strength", type=float, default=0.5)
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)

    from ovstore.analyze import load_text_encoder
    from ovstore.label import LabelConfig
    from ovstore.store import analysis_defaults
    from ovstore.toyworld import quality as q

    t0 = time.perf_counter()
    work = args.work or Path(tempfile.mkdtemp())
    work.mkdir(parents=True, exist_ok=True)
    cal_scenes = q.quality_scenes(args.calibration_seed, args.calibration_per_count)
    ev_scenes = q.quality_scenes(args.seed, args.per_count, exclude=[s.caption for s in cal_scenes])
    sets = {}
    for split, scenes, seed in (("cal", cal_scenes, 1000 * args.calibration_seed), ("eval", ev_scenes, args.seed)):
        images_file = write_renders(scenes, work / f"renders-{split}")
        stores = {}
        t = time.perf_counter()
        stores["generated"] = q.capture_captions([s.caption for s in scenes], work / f"gen-{split}.zarr", seed=seed,
                                                 steps=args.steps, guidance=args.guidance)
        times = {"generated": time.perf_counter() - t}
        for method in ("strength", "invert"):
            t = time.perf_counter()
            stores[method] = capture_real(images_file, work / f"{method}-{split}.zarr", method=method,
                                          strength=args.strength, steps=args.steps, guidance=args.guidance, seed=seed)
            times[method] = time.perf_counter() - t
        sets[split] = (scenes, stores, times)
    t_capture = time.perf_counter() - t0

    ev_stores = sets["eval"][1]
    encoder = load_text_encoder(ev_stores["generated"].layout.model)
    base = LabelConfig(classes=CLASSES).with_model_defaults(analysis_defaults(ev_stores["generated"]))
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, 1 torch thread; model "
          f"{ev_stores['generated'].layout.model.id}, 32x32, {args.steps} steps; evaluation {len(ev_scenes)} scenes "
          f"(1-3 objects), calibration {len(cal_scenes)}, disjoint captions; capture {t_capture:.0f} s")
    print(f"defaults: maps from {base.maps_from}, {base.normalize}, threshold {base.threshold}, prompt classes only "
          f"{base.prompt_classes_only}\n")
    print("reconstruction of the renders (evaluation set), PSNR dB / mean abs error in [0, 1] RGB:\n")
    for method in ("strength", "invert"):
        st = ev_stores[method]
        rec = [st.reconstruction(i) for i in st.complete_images()]
        label = f"--strength {args.strength}, guidance {args.guidance}" if method == "strength" else \
            "--invert (inversion and regeneration at guidance 1)"
        print(f"- {label}: PSNR mean {np.mean([r[1] for r in rec]):.1f} (min {min(r[1] for r in rec):.1f}), "
              f"MAE {np.mean([r[2] for r in rec]):.3f}; {st.layout.num_unet_calls} UNet calls recorded; capture "
              f"{sets['eval'][2][method]:.0f} s for {len(rec)} images (generation {sets['eval'][2]['generated']:.0f} s)")

    rows = []
    for kind in ("generated", "strength", "invert"):
        cal_set = LabelSet(sets["cal"][1][kind], base, encoder, None if kind == "generated" else sets["cal"][0])
        ev_set = LabelSet(ev_stores[kind], base, encoder, None if kind == "generated" else ev_scenes)
        for crf in (False, True):
            config = dataclasses.replace(base, crf=crf)
            sweep = {t: cal_set.miou(dataclasses.replace(config, threshold=t)) for t in GRID}
            best = max(sweep, key=sweep.get)
            for label, c in (("defaults", config), (f"calibrated t={best}", dataclasses.replace(config, threshold=best))):
                rows.append((kind, crf, label, ev_set.miou(c), ev_set.baselines(c)))
    names = {"generated": "generated from the captions", "strength": f"real renders, --strength {args.strength}",
             "invert": "real renders, --invert"}
    print("\n| images | --crf | threshold | mIoU | flat map | object oracle |")
    print("|---|---|---|---:|---:|---:|")
    for kind, crf, label, m, b in rows:
        print(f"| {names[kind]} | {'yes' if crf else 'no'} | {label} | {m:.3f} | {b['flat']:.3f} | {b['objects']:.3f} |")
    print("\nreal renders minus generated (same settings; target: > -0.05):")
    gen = {(crf, label.split('=')[0]): m for kind, crf, label, m, _ in rows if kind == "generated"}
    for kind, crf, label, m, _ in rows:
        if kind != "generated":
            print(f"- {names[kind]}, crf {'yes' if crf else 'no'}, {label}: {m - gen[(crf, label.split('=')[0])]:+.3f}")
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()

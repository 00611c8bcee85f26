"""Labelling quality on the toy-world evaluation set: mIoU of the full `ovstore label` pipeline
(``label_store``: class maps, normalisation, thresholds, refinements, VOC PNGs) for the three
shape classes, against exact ground truth, with plain words and with optimized tokens, in both
modes, with and without each refinement. Run:

    python benchmarks/bench_label_quality.py --store TOY_EVAL.zarr --calibration TOY_CAL.zarr [--epochs 300]

A store that does not exist yet is captured first, exactly as ``benchmarks/bench_toyworld.py``
makes its evaluation set (the embedded default model, 20 steps, guidance 5, batch 16): the
evaluation store from ``--images 200 --seed 2024``, the calibration store from
``--calibration-images 60 --calibration-seed 7`` (other captions, other generation seeds).

Protocol:

- Ground truth: the shape masks recovered from the generated images' flat colours
  (``ovstore.toyworld.recover_masks``), as VOC label PNGs; object-coloured pixels that no caption
  shape claims (blobs of an unexpected extent) are 255 = ignore.
- Tokens: one annotated image per class (the first image showing it), optimized with the reference
  recipe; the same image also sets that class's per-class threshold (the value in 0.30..0.95 with
  the best IoU on it). These annotated images are left out of every row (held-out evaluation).
- mIoU: intersections and unions summed per class over the held-out set, averaged over the classes
  present (background included; ``ovstore evaluate``'s protocol).
- Flat-map baseline, beside every figure: the same labelling function (``image_labels``, every
  refinement of the row, DenseCRF included) given uniform-noise maps instead of attention maps,
  i.e. no localisation at all. A row is only worth what it gains over its baseline.
- Defaults (min-max normalisation, threshold 0.6, adaptive sweep 0.50..0.95) were chosen on the
  calibration store, not on this set; ``--calibration`` prints that sweep again.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

CLASSES = ("circle", "square", "triangle")
NAMES = ["background", *CLASSES]
GRID = tuple(round(0.3 + 0.05 * k, 2) for k in range(14))  # per-class threshold candidates
IGNORE = 255


def make_store(path: Path, n_images: int, seed: int) -> None:
    """Capture ``n_images`` toy-world captions of ``seed`` (bench_toyworld.py's evaluation set)."""
    from ovstore.capture import CaptureConfig, build_requests, capture, load_pipeline
    from ovstore.toyworld import sample_scenes

    captions = [s.caption for s in sample_scenes(seed, n_images)]
    pipe, identity = load_pipeline(None)
    capture(pipe, identity, build_requests([(c, None, None) for c in captions], seed=seed, guidance=5.0,
                                           num_inference_steps=20),
            path, config=CaptureConfig(num_inference_steps=20, guidance=5.0, batch_size=16))


def ground_truth(store, images):
    from ovstore.toyworld import classify_pixels, recover_masks

    truth, labels = {}, {}
    for i in images:
        rgb = store.image(i)
        masks = recover_masks(rgb, store.record(i).prompt)
        label = np.zeros(rgb.shape[:2], np.uint8)
        label[classify_pixels(rgb) > 0] = IGNORE  # object colour, but no caption shape claims it
        for k, name in enumerate(CLASSES, start=1):
            if name in masks:
                label[masks[name]] = k
        truth[i] = {c: m for c, m in masks.items() if c in CLASSES and m.any()}
        labels[i] = label
    return truth, labels


def normalised_maps(store, images, config, encoder):
    from ovstore.label.class_maps import class_attributions, class_maps

    size = (store.layout.height, store.layout.width)
    return class_maps(store, list(images), class_attributions(store, config, encoder), size=size,
                      normalize=config.normalize)


def sweep_table(store, images, labels, encoder, tokens=None, title=""):
    """mIoU over thresholds, both normalisations (in memory, with the pipeline's labelling function)."""
    from ovstore.label import LabelConfig, evaluate_masks, image_labels

    thresholds = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
    rgbs = {i: store.image(i) for i in images}
    prompts = {i: store.record(i).prompt for i in images}
    rows = [f"\n{title}\n", "| class maps | normalisation | prompt classes only | "
            + " | ".join(f"t={t}" for t in thresholds) + " |", "|---|---|---|" + "---:|" * len(thresholds)]
    for source, token_files in (("words", {}), ("tokens", tokens)):
        if token_files is None:
            continue
        for mode in ("separate", "compete"):
            for normalize in ("minmax", "max"):
                config = LabelConfig(classes=CLASSES, mode=mode, tokens=token_files, normalize=normalize)
                maps = normalised_maps(store, images, config, encoder)
                for prompt_only in (False, True):
                    cells = []
                    for t in thresholds:
                        c = LabelConfig(classes=CLASSES, mode=mode, tokens=token_files, normalize=normalize,
                                        threshold=t, prompt_classes_only=prompt_only)
                        preds = [image_labels(maps[k], rgbs[i], prompts[i], c)[0] for k, i in enumerate(images)]
                        cells.append(f"{evaluate_masks(preds, [labels[i] for i in images], NAMES).miou:.3f}")
                    rows.append(f"| {source}, {mode} | {normalize} | {'yes' if prompt_only else 'no'} | "
                                + " | ".join(cells) + " |")
    return "\n".join(rows)


def class_thresholds(store, train, truth, config, encoder):
    """Per class, the threshold of GRID with the best IoU on that class's annotated image."""
    out = {}
    for k, name in enumerate(CLASSES):
        image = train[name]
        norm = normalised_maps(store, [image], config, encoder)[0, k]
        mask = truth[image][name]
        ious = [((norm >= t) & mask).sum() / max(((norm >= t) | mask).sum(), 1) for t in GRID]
        out[name] = float(GRID[int(np.argmax(ious))])
    return out


def flat_baseline(store, images, labels, config, seed=0):
    """The same labelling function on uniform-noise maps: what the refinements give without attention."""
    from ovstore.label import evaluate_masks, image_labels

    rng = np.random.default_rng(seed)
    shape = (len(CLASSES), store.layout.height, store.layout.width)
    preds = [image_labels(rng.random(shape, dtype=np.float32), store.image(i), store.record(i).prompt, config)[0]
             for i in images]
    return evaluate_masks(preds, [labels[i] for i in images], NAMES).miou


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument("--epochs", type=int, default=300)
    parser.add_argument("--images", type=int, default=200, help="images of a new evaluation store")
    parser.add_argument("--seed", type=int, default=2024, help="caption and generation seed of a new evaluation store")
    parser.add_argument("--calibration", type=Path, default=None, help="also print the threshold sweep on this store")
    parser.add_argument("--calibration-images", type=int, default=60)
    parser.add_argument("--calibration-seed", type=int, default=7)
    parser.add_argument("--min-component", type=int, default=8, help="pixels, for the small-component rows")
    parser.add_argument("--work", type=Path, default=None,
                        help="folder for the labelled datasets (default: a temp dir, removed)")
    args = parser.parse_args()
    torch.set_num_threads(1)

    from ovstore.analyze.text import load_text_encoder
    from ovstore.label import LabelConfig, evaluate_dirs, evaluate_masks, label_store
    from ovstore.label.voc import write_label_tree
    from ovstore.optimize import OptimizeConfig, TokenTask, optimize_tokens, save_token
    from ovstore.store import open_store

    t_start = time.perf_counter()
    try:
        import pydensecrf  # noqa: F401

        has_crf = True
    except ImportError:
        has_crf = False
    if not (args.store / "zarr.json").exists():
        make_store(args.store, args.images, args.seed)
    if args.calibration is not None and not (args.calibration / "zarr.json").exists():
        make_store(args.calibration, args.calibration_images, args.calibration_seed)
    store = open_store(args.store)
    images = store.complete_images()
    encoder = load_text_encoder(store.layout.model)
    work = args.work or Path(tempfile.mkdtemp())
    work.mkdir(parents=True, exist_ok=True)
    truth, labels = ground_truth(store, images)

    # one annotated image per class: token optimization and per-class thresholds; then held out
    train = {c: next(i for i in images if c in truth[i]) for c in CLASSES}
    t0 = time.perf_counter()
    tokens = optimize_tokens(store, [TokenTask(c, (train[c],), (truth[train[c]][c],)) for c in CLASSES],
                             config=OptimizeConfig(epochs=args.epochs), text_encoder=encoder)
    optimize_s = time.perf_counter() - t0
    token_files = {t.name: save_token(t, work / f"{t.name}.safetensors") for t in tokens}
    held_out = [i for i in images if i not in train.values()]
    gt = write_label_tree(work / "gt", CLASSES, {i: labels[i] for i in held_out})
    present = {c: sum(c in truth[i] for i in held_out) for c in CLASSES}
    area = {c: np.mean([truth[i][c].mean() for i in held_out if c in truth[i]]) for c in CLASSES}
    background = evaluate_masks([np.zeros_like(labels[i]) for i in held_out], [labels[i] for i in held_out], NAMES)

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.get_num_threads()} thread(s); "
          f"model {store.layout.model.id} (text encoder {(store.layout.model.text_encoder_fingerprint or '?')[:12]}); "
          f"{store.layout.height}x{store.layout.width} images, "
          f"{store.layout.n_steps} UNet calls")
    print(f"held-out images: {len(held_out)} of {len(images)} (annotated: "
          + ", ".join(f"{c} {train[c]}" for c in CLASSES) + "); images showing each class: "
          + ", ".join(f"{c} {present[c]} (mean area {area[c]:.1%})" for c in CLASSES))
    print(f"tokens: {args.epochs} epochs on one image per class, {optimize_s:.0f} s; "
          f"all-background prediction: mIoU {background.miou:.3f}")
    if not has_crf:
        print("DenseCRF is not installed here (pip install 'ovstore[crf]'): its rows are left out")

    thresholds = {source: {mode: class_thresholds(store, train, truth,
                                                  LabelConfig(classes=CLASSES, mode=mode, tokens=files), encoder)
                           for mode in ("separate", "compete")}
                  for source, files in (("words", {}), ("tokens", token_files))}
    for source in thresholds:
        for mode in thresholds[source]:
            print(f"per-class thresholds ({source}, {mode}): "
                  + ", ".join(f"{c} {t:.2f}" for c, t in thresholds[source][mode].items()))

    m = args.min_component
    variants = {
        "none (default: min-max, threshold 0.6)": {},
        "max normalisation (reference), threshold 0.6": {"normalize": "max"},
        "max normalisation (reference), threshold 0.9": {"normalize": "max", "threshold": 0.9},
        "per-class thresholds": {"class_thresholds": "tuned"},
        "adaptive threshold (sweep 0.50..0.95)": {"adaptive": True},
        "DenseCRF": {"crf": True},
        f"small components (< {m} px) removed": {"min_component": m},
        "prompt classes only": {"prompt_classes_only": True},
        "prompt classes only + per-class thresholds": {"prompt_classes_only": True, "class_thresholds": "tuned"},
        "prompt classes only + adaptive": {"prompt_classes_only": True, "adaptive": True},
        "prompt classes only + DenseCRF": {"prompt_classes_only": True, "crf": True},
        f"prompt classes only + DenseCRF + small components (< {m} px)":
            {"prompt_classes_only": True, "crf": True, "min_component": m},
        # words only: the toy model was trained on captions "a COLOUR SHAPE", so a shape word after
        # "a photograph of a" is out of its distribution; this template was picked on the calibration set
        "template 'a red {}' (caption grammar)": {"prompt_template": "a red {}"},
        "template 'a red {}' + prompt classes only + DenseCRF":
            {"prompt_template": "a red {}", "prompt_classes_only": True, "crf": True},
    }
    if not has_crf:
        variants = {k: v for k, v in variants.items() if not v.get("crf")}
    print("\n| class maps | refinement | mIoU | flat-map baseline | foreground mIoU | "
          + " | ".join(f"{c} IoU" for c in CLASSES) + " | s |")
    print("|---|---|---:|---:|---:|" + "---:|" * len(CLASSES) + "---:|")
    run = 0
    for source, files in (("words", {}), ("tokens", token_files)):
        for k, (name, options) in enumerate(variants.items()):
            if files and "prompt_template" in options:
                continue  # a learned token has no template
            for mode in ("separate", "compete"):
                settings = dict(options)
                if settings.get("class_thresholds") == "tuned":
                    settings["class_thresholds"] = thresholds[source][mode]
                config = LabelConfig(classes=CLASSES, mode=mode, tokens=files, **settings)
                out = work / f"{source}-{mode}-{k:02d}"  # one folder per row: settings never collide
                shutil.rmtree(out, ignore_errors=True)
                t0 = time.perf_counter()
                label_store(store, out, config, images=held_out, scheduler="synchronous", partition_size=32)
                seconds = time.perf_counter() - t0
                report = evaluate_dirs(out, gt)
                flat = flat_baseline(store, held_out, labels, config, seed=run)
                run += 1
                per = " | ".join(f"{v:.3f}" for v in report.iou[1:])
                print(f"| {source}, {mode} | {name} | {report.miou:.3f} | {flat:.3f} | "
                      f"{report.miou_foreground:.3f} | {per} | {seconds:.0f} |", flush=True)
                if args.work is None:
                    shutil.rmtree(out)
    print(sweep_table(store, held_out, labels, encoder, tokens=token_files,
                      title="Threshold sweep on the held-out evaluation images (in memory, same labelling function; "
                            "for reading only, the defaults were not chosen here):"))
    if args.calibration is not None:
        calibration = open_store(args.calibration)
        cal_images = calibration.complete_images()
        _, cal_labels = ground_truth(calibration, cal_images)
        print(sweep_table(calibration, cal_images, cal_labels, encoder,
                          title=f"Threshold sweep on the calibration store ({len(cal_images)} images; plain words; "
                                "the defaults were chosen here):"))
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()

"""Self-attention refinements of `ovstore label` on the embedded toy-world model, held out. Run:

    nice -n 10 python benchmarks/bench_refine.py [--per-count 20] [--calibration-per-count 10] [--work DIR]

Sets (``ovstore.toyworld.quality.quality_scenes``, as ``bench_toyworld.py`` makes them): held-out
world-v2 captions with 1, 2 and 3 objects, captured with ``--self-attention 16,8`` (the model's
two self-attention grids: latent 16x16 and 8x8), 20 steps, guidance 5:

- calibration: ``--calibration-per-count`` scenes per object count from ``--calibration-seed``,
  generation seeds ``1000 * calibration-seed + i``; every threshold and refinement parameter is
  chosen here;
- evaluation: ``--per-count`` per count from ``--seed``, no caption of the calibration set,
  generation seeds ``seed + i``.

Ground truth: the shape masks recovered from the generated images (``image_truth``). Labels: the
store's model defaults (maps from each image's prompt, prompt classes only, its class words),
min-max normalisation, the threshold chosen on the calibration set per row; mIoU over
background + circle, square, triangle (``ovstore evaluate``'s protocol). Every row has the
flat-map and object-oracle baselines of ``quality.label_baselines`` beside it (same settings, maps
that know nothing / know where every object is but not which). The evaluation rows are also run
through ``label_store`` + ``evaluate_dirs`` (the CLI's path) for the plain and best rows.

Part (a) measures what the store costs with self-attention: capture time with and without
``--self-attention`` on the same captions, bytes per image of the matrices against the queries,
and what storing the ``attn1`` queries and keys instead would take.
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
LABEL_GRID = (0.01, 0.02, 0.03, 0.04) + tuple(round(0.05 * k, 2) for k in range(1, 19))  # 0.01 .. 0.9
#: refinement candidates per method; the parameter of each is chosen on the calibration set
CANDIDATES = {
    "propagate": [f"self-attention:propagate,k={k},mix={m}" for k in (1, 2, 4) for m in (0.25, 0.5, 0.75, 1)],
    "ovam": [f"self-attention:ovam,min_sa={m}" for m in (0.0, 0.5, 0.85)],
    "iseg": [f"self-attention:iseg,iterations={n}" for n in (1, 2, 4)],
}
GRIDS = "16,8"


def capture_set(captions, out: Path, *, seed: int, self_attention: str | None, steps: int, guidance: float):
    """``ovstore capture`` of ``captions`` (image ``i``: seed ``seed + i``); reused when complete."""
    from ovstore.capture import CaptureConfig, build_requests, capture, load_pipeline
    from ovstore.store import open_store

    seconds = None
    if not (out / "zarr.json").exists():
        pipe, identity = load_pipeline(None)
        t0 = time.process_time()  # CPU seconds of this process: the machine is shared, wall time is not ours
        capture(pipe, identity, build_requests([(c, None, None) for c in captions], seed=seed, guidance=guidance,
                                               num_inference_steps=steps),
                out, config=CaptureConfig(num_inference_steps=steps, guidance=guidance, batch_size=16,
                                          self_attention=self_attention or ()))
        seconds = time.process_time() - t0
    store = open_store(out)
    assert [store.record(i).prompt for i in store.complete_images()] == list(captions), f"{out}: other captures"
    return store, seconds


def share_cross_attention_maps() -> None:
    """Compute each (store, prompt, images) cross-attention map once for every refinement row:
    the label pipeline refines the maps that ``compute_maps`` returns (after it, before resizing),
    so the rows differ only in the refinement, which is all that is recomputed."""
    from ovstore.label import class_maps as module

    original, memo = module.compute_maps, {}

    def cached(store, attributions, *, images=None, config=None, **options):
        key = (str(store.path), tuple(attributions), tuple(images or ()), config)
        if key not in memo:
            memo[key] = original(store, attributions, images=images, config=config, **options)
        return memo[key]

    module.compute_maps = cached


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def qk_bytes(store) -> int:
    """Uncompressed bytes per image of the attn1 queries and keys at the stored grids, every
    stored call and branch, float16 (the alternative to storing the averaged matrix)."""
    from ovstore.capture import load_pipeline
    from ovstore.families import get_family

    pipe, _ = load_pipeline(None)  # the embedded model the stores were captured with
    layers = get_family("unet").self_attention_layers(pipe, store.layout.latent_height, store.layout.latent_width)
    grids = set(store.layout.self_attention)
    per_call = sum(2 * h * w * m.to_q.out_features * 2 for _, h, w, m in layers if (h, w) in grids)
    return per_call * store.layout.n_steps * len(store.layout.branches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-count", type=int, default=20)
    parser.add_argument("--calibration-per-count", type=int, default=10)
    parser.add_argument("--seed", type=int, default=2024)
    parser.add_argument("--calibration-seed", type=int, default=7)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--work", type=Path, default=None, help="folder for the stores (default: a temp dir)")
    args = parser.parse_args()
    torch.set_num_threads(1)

    from ovstore.analyze import load_text_encoder
    from ovstore.label import LabelConfig, evaluate_dirs, label_store
    from ovstore.label.class_maps import label_class_maps
    from ovstore.label.voc import write_label_tree
    from ovstore.store import analysis_defaults
    from ovstore.toyworld import quality as q

    t_start = time.perf_counter()
    work = args.work or Path(tempfile.mkdtemp())
    work.mkdir(parents=True, exist_ok=True)
    cal_scenes = q.quality_scenes(args.calibration_seed, args.calibration_per_count)
    ev_scenes = q.quality_scenes(args.seed, args.per_count, exclude=[s.caption for s in cal_scenes])
    options = dict(steps=args.steps, guidance=args.guidance)
    cal, cal_s = capture_set([s.caption for s in cal_scenes], work / "refine-cal.zarr",
                             seed=1000 * args.calibration_seed, self_attention=GRIDS, **options)
    ev, ev_s = capture_set([s.caption for s in ev_scenes], work / "refine-eval.zarr", seed=args.seed,
                           self_attention=GRIDS, **options)
    plain, plain_s = capture_set([s.caption for s in cal_scenes], work / "refine-cal-plain.zarr",
                                 seed=1000 * args.calibration_seed, self_attention=None, **options)
    cal_images, ev_images = cal.complete_images(), ev.complete_images()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, 1 torch thread; model {ev.layout.model.id}; "
          f"{ev.layout.height}x{ev.layout.width} images, latent {ev.layout.latent_height}x{ev.layout.latent_width}, "
          f"{ev.layout.n_steps} UNet calls, guidance {args.guidance}; calibration {len(cal_images)} images, "
          f"evaluation {len(ev_images)} (disjoint captions and seeds)")

    # (a) cost of --self-attention
    n = len(cal_images)
    sa_disk = folder_bytes(cal.path / "self_attention") / n
    q_disk = sum(folder_bytes(cal.path / "layers" / l.name / "queries") for l in cal.layers) / n
    print("\n(a) what --self-attention costs (calibration captions captured twice, same seeds)\n")
    print("| figure | without | with --self-attention 16,8 |")
    print("|---|---:|---:|")
    if cal_s is not None and plain_s is not None:
        print(f"| capture CPU time, {n} images (1 thread) | {plain_s:.1f} s | {cal_s:.1f} s "
              f"({cal_s / plain_s - 1:+.0%}) |")
    print(f"| store on disk per image | {folder_bytes(plain.path) / n / 1e3:.1f} kB | "
          f"{folder_bytes(cal.path) / n / 1e3:.1f} kB |")
    print(f"| self-attention matrices per image (uncompressed / on disk) | - | "
          f"{cal.layout.self_attention_bytes_per_image() / 1e3:.1f} kB / {sa_disk / 1e3:.1f} kB |")
    print(f"| queries per image (uncompressed / on disk) | {cal.layout.query_bytes_per_image() / 1e3:.1f} kB | "
          f"{q_disk / 1e3:.1f} kB |")
    print(f"| attn1 queries + keys instead of the matrices (uncompressed) | - | {qk_bytes(cal) / 1e3:.1f} kB |")

    # (b) label quality with and without each refinement, with and without DenseCRF
    share_cross_attention_maps()
    encoder = load_text_encoder(ev.layout.model)
    truths = {"cal": {i: q.image_truth(cal, i) for i in cal_images}, "ev": {i: q.image_truth(ev, i) for i in ev_images}}
    stores, sets = {"cal": cal, "ev": ev}, {"cal": cal_images, "ev": ev_images}
    base = LabelConfig(classes=CLASSES).with_model_defaults(analysis_defaults(ev))
    size = (ev.layout.height, ev.layout.width)
    cache: dict = {}

    def norm(which: str, refine: str | None) -> np.ndarray:
        if (which, refine) not in cache:
            config = LabelConfig(classes=CLASSES, refine=refine).with_model_defaults(analysis_defaults(ev))
            cache[(which, refine)] = label_class_maps(stores[which], sets[which], config, encoder, size=size)
        return cache[(which, refine)]

    def config_of(refine, crf, threshold):
        from dataclasses import replace

        return replace(base, refine=refine, crf=crf, threshold=threshold, sources=base.sources)

    def calibrate(refine, crf):
        scores = {t: q.label_miou(norm("cal", refine), cal_images, truths["cal"], config_of(refine, crf, t))
                  for t in LABEL_GRID}
        best = max(scores, key=scores.get)
        return best, scores[best]

    print(f"\n(b) `ovstore label --classes {','.join(CLASSES)}` with the model's defaults (maps from the prompt, "
          "prompt classes only, class words); threshold (and refinement parameter) chosen on the calibration set\n")
    print("| refinement | DenseCRF | threshold | calibration mIoU | evaluation mIoU | flat-map baseline | "
          "object oracle | gain over plain |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    chosen_rows = {}
    for crf in (False, True):
        plain_miou = None
        for method, specs in [("none", [None]), *CANDIDATES.items()]:
            tried = [(spec, *calibrate(spec, crf)) for spec in specs]
            spec, threshold, cal_miou = max(tried, key=lambda r: r[2])
            config = config_of(spec, crf, threshold)
            miou = q.label_miou(norm("ev", spec), ev_images, truths["ev"], config)
            baselines = q.label_baselines(ev_images, truths["ev"], config, seed=len(chosen_rows))
            if method == "none":
                plain_miou = miou
            chosen_rows[(method, crf)] = (config, miou)
            print(f"| {spec or 'none'} | {'yes' if crf else 'no'} | {threshold} | {cal_miou:.3f} | {miou:.3f} | "
                  f"{baselines['flat']:.3f} | {baselines['objects']:.3f} | {miou - plain_miou:+.3f} |", flush=True)
    calibration_best = {crf: max(((m, c) for (m, c) in chosen_rows if c == crf and m != "none"),
                                 key=lambda key: calibrate(chosen_rows[key][0].refine, crf)[1])
                        for crf in (False, True)}

    # (c) the CLI's path (label_store + evaluate_dirs) for plain and the calibration-best refinement
    print("\n(c) the same settings through `label_store` and `evaluate_dirs` (VOC PNGs on disk), evaluation set\n")
    print("| refinement | DenseCRF | mIoU | " + " | ".join(f"{c} IoU" for c in CLASSES) + " | s |")
    print("|---|---|---:|" + "---:|" * len(CLASSES) + "---:|")
    gt = write_label_tree(work / "gt", CLASSES, {i: q.label_truth(truths["ev"][i]) for i in ev_images})
    for crf in (False, True):
        for key in (("none", crf), calibration_best[crf]):
            config = chosen_rows[key][0]
            out = work / f"label-{key[0]}-{'crf' if crf else 'plain'}"
            shutil.rmtree(out, ignore_errors=True)
            t0 = time.perf_counter()
            label_store(ev, out, config, scheduler="synchronous", partition_size=32, model_defaults=False)
            report = evaluate_dirs(out, gt)
            print(f"| {config.refine.spec if config.refine else 'none'} | {'yes' if crf else 'no'} | "
                  f"{report.miou:.3f} | " + " | ".join(f"{v:.3f}" for v in report.iou[1:])
                  + f" | {time.perf_counter() - t0:.0f} |", flush=True)
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()

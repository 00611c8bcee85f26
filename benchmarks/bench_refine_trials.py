"""Other matrices for the propagation refinement, and the refinements on real renders: the trials
toward bench_refine.py's +0.05 target on the embedded model. Run:

    python benchmarks/bench_refine_trials.py [--per-count 20] [--calibration-per-count 10] [--work DIR]

Protocol of ``bench_refine.py`` (b): ``ovstore label`` with the model's defaults, no DenseCRF,
threshold and refinement parameters chosen on the calibration set, mIoU on the evaluation set
(held-out captions and seeds, stores captured with ``--self-attention 16,8``). The trials swap the
matrix the refinement reads (``Store.self_attention``, patched in this process only), for
``propagate`` with k in {1, 2, 4} and mix in {0.25, 0.5, 0.75, 1}:

- ``stored``: the stored head- and call-averaged ``attn1`` matrix (what the product uses);
- ``mutual``: sqrt(SA * SA^T), rows renormalised (attention that both pixels give each other);
- ``above uniform c``: max(SA - c / N, 0), rows renormalised (only the attention above a uniform
  row's share);
- ``query affinity``: softmax over the stored cross-attention *queries* of the grid's layers
  (cosine / tau, or q.q / sqrt(d) / tau), averaged over heads, calls and layers: no ``attn1`` at all.

``--blocks up_blocks`` (or ``down_blocks``): the stores are captured with the matrix averaged over
the ``attn1`` layers of those blocks only (the capture's layer list patched in this process; give
a ``--work`` of its own, since stores are reused).

``--real``: rendered scenes captured as real images (``--images-file``, ``--strength 0.5``, exact
masks from the renderer, ``bench_real_images.py``'s sets and truth), every refinement method of
``bench_refine.py`` with the stored matrix, with and without DenseCRF.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_real_images as real  # noqa: E402
import bench_refine as refine  # noqa: E402

PROPAGATE = [f"self-attention:propagate,k={k},mix={m}" for k in (1, 2, 4) for m in (0.25, 0.5, 0.75, 1)]
MATRICES = [("stored", None), ("mutual", None), *(("above uniform", c) for c in (0.75, 1.0, 1.25, 1.5)),
            *(("query affinity, cosine", t) for t in (0.05, 0.1, 0.2)),
            *(("query affinity, dot", t) for t in (0.25, 0.5, 1.0))]


def patch_matrix(choice: dict) -> None:
    """``Store.self_attention`` returns the matrix ``choice`` names (``{"name": ..., "value": ...}``)."""
    from ovstore.store.reader import Store

    stored, memo = Store.self_attention, {}

    def matrix(self, image, resolution=None, *, branch=0):
        name, value = choice["name"], choice["value"]
        if name == "stored":
            return stored(self, image, resolution, branch=branch)
        key = (str(self.path), image, resolution, name, value)
        if key not in memo:
            if name.startswith("query affinity"):
                grid = self._self_attention_grid(resolution)
                total = 0
                layers = [layer.name for layer in self.layers if tuple(layer.resolution) == tuple(grid)]
                for layer in layers:
                    q = torch.from_numpy(self.queries(layer, image).astype(np.float32))  # step, head, y, x, c
                    q = q.reshape(q.shape[0], q.shape[1], -1, q.shape[-1])
                    if name.endswith("cosine"):
                        f = q / q.norm(dim=-1, keepdim=True).clamp_min(1e-6)
                        logits = f @ f.transpose(-1, -2) / value
                    else:
                        logits = q @ q.transpose(-1, -2) * q.shape[-1] ** -0.5 / value
                    total = total + torch.softmax(logits, -1).mean((0, 1))
                out = (total / len(layers)).numpy()
            else:
                sa = stored(self, image, resolution, branch=branch).astype(np.float32)
                out = np.sqrt(sa * sa.T) if name == "mutual" else np.maximum(sa - value / sa.shape[-1], 0)
                out = out / np.maximum(out.sum(-1, keepdims=True), 1e-12)
            memo[key] = out
        return memo[key]

    Store.self_attention = matrix


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-count", type=int, default=20)
    parser.add_argument("--calibration-per-count", type=int, default=10)
    parser.add_argument("--real", action="store_true", help="also the refinements on real renders")
    parser.add_argument("--blocks", default=None, help="capture the matrix of these blocks' attn1 layers only "
                        "(up_blocks, down_blocks)")
    parser.add_argument("--work", type=Path, default=None, help="stores (default: a temp dir)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    import shutil
    import tempfile

    from ovstore.analyze import load_text_encoder
    from ovstore.capture import run_capture
    from ovstore.label import LabelConfig
    from ovstore.label.class_maps import label_class_maps
    from ovstore.store import analysis_defaults, open_store
    from ovstore.toyworld import quality as q

    if args.blocks:
        from ovstore.families.unet import UNetFamily

        every_layer = UNetFamily.self_attention_layers
        UNetFamily.self_attention_layers = lambda self, pipe, h, w: [
            layer for layer in every_layer(self, pipe, h, w) if layer[0].startswith(args.blocks)]
    t_start = time.perf_counter()
    work = args.work or Path(tempfile.mkdtemp())
    work.mkdir(parents=True, exist_ok=True)
    cal_scenes = q.quality_scenes(7, args.calibration_per_count)
    ev_scenes = q.quality_scenes(2024, args.per_count, exclude=[s.caption for s in cal_scenes])
    options = dict(self_attention=refine.GRIDS, steps=20, guidance=5.0)
    cal, _ = refine.capture_set([s.caption for s in cal_scenes], work / "refine-cal.zarr", seed=7000, **options)
    ev, _ = refine.capture_set([s.caption for s in ev_scenes], work / "refine-eval.zarr", seed=2024, **options)
    choice = {"name": "stored", "value": None}
    patch_matrix(choice)
    refine.share_cross_attention_maps()
    encoder = load_text_encoder(ev.layout.model)
    defaults = analysis_defaults(ev)
    base = LabelConfig(classes=refine.CLASSES).with_model_defaults(defaults)
    sets = {"cal": (cal, cal.complete_images()), "ev": (ev, ev.complete_images())}
    truths = {k: {i: q.image_truth(s, i) for i in images} for k, (s, images) in sets.items()}
    size = (ev.layout.height, ev.layout.width)

    def scores(spec):
        config = LabelConfig(classes=refine.CLASSES, refine=spec).with_model_defaults(defaults)
        norm = {k: label_class_maps(s, images, config, encoder, size=size) for k, (s, images) in sets.items()}

        def miou(which, t):
            return q.label_miou(norm[which], sets[which][1], truths[which],
                                dataclasses.replace(base, refine=spec, threshold=t, sources=base.sources))

        calibration = {t: miou("cal", t) for t in refine.LABEL_GRID}
        t = max(calibration, key=calibration.get)
        return t, calibration[t], miou("ev", t)

    _, _, plain = scores(None)
    print(f"evaluation {len(sets['ev'][1])} images, calibration {len(sets['cal'][1])}; plain labels {plain:.3f}\n")
    print("| matrix | calibration-best row | threshold | calibration mIoU | evaluation mIoU | gain over plain |")
    print("|---|---|---:|---:|---:|---:|")
    for name, value in MATRICES:
        choice.update(name=name, value=value)
        tried = [(spec, *scores(spec)) for spec in PROPAGATE]
        spec, t, cal_miou, ev_miou = max(tried, key=lambda r: r[2])
        label = name if value is None else f"{name} {value}"
        print(f"| {label} | {spec.split(':')[1]} | {t} | {cal_miou:.3f} | {ev_miou:.3f} | {ev_miou - plain:+.3f} |",
              flush=True)
    choice.update(name="stored", value=None)

    if args.real:
        stores = {}
        for split, scenes, seed in (("cal", cal_scenes, 7000), ("ev", ev_scenes, 2024)):
            images_file = real.write_renders(scenes, work / f"renders-{split}")
            out = work / f"real-{split}.zarr"
            if not (out / "zarr.json").exists():
                run_capture(images_file=images_file, out=out, steps=20, seed=seed, batch_size=16, strength=0.5,
                            guidance=5.0, self_attention=refine.GRIDS)
            stores[split] = (open_store(out), scenes)
        print(f"\nreal renders, --strength 0.5 ({len(ev_scenes)} evaluation / {len(cal_scenes)} calibration scenes, "
              "exact masks), stored matrix\n")
        print("| refinement | DenseCRF | threshold | calibration mIoU | evaluation mIoU | flat | object oracle | "
              "gain over plain |")
        print("|---|---|---:|---:|---:|---:|---:|---:|")
        for crf in (False, True):
            plain_real = None
            for specs in [[None], *refine.CANDIDATES.values()]:
                best = None
                for spec in specs:
                    config = LabelConfig(classes=refine.CLASSES, refine=spec, crf=crf).with_model_defaults(defaults)
                    labels = real.LabelSet(stores["cal"][0], config, encoder, stores["cal"][1])
                    by_t = {t: labels.miou(dataclasses.replace(config, threshold=t, sources=config.sources))
                            for t in real.GRID}
                    t = max(by_t, key=by_t.get)
                    if best is None or by_t[t] > best[2]:
                        best = (spec, t, by_t[t], config)
                spec, t, cal_miou, config = best
                labels = real.LabelSet(stores["ev"][0], config, encoder, stores["ev"][1])
                at = dataclasses.replace(config, threshold=t, sources=config.sources)
                ev_miou, baselines = labels.miou(at), labels.baselines(at)
                plain_real = ev_miou if plain_real is None else plain_real
                print(f"| {spec or 'none'} | {'yes' if crf else 'no'} | {t} | {cal_miou:.3f} | {ev_miou:.3f} | "
                      f"{baselines['flat']:.3f} | {baselines['objects']:.3f} | {ev_miou - plain_real:+.3f} |",
                      flush=True)
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()

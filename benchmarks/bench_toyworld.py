"""Quality of the embedded toy-world (v2) model against the toy-world targets, every figure beside
its flat-map and object-oracle baselines, through ovstore's own APIs (``capture``,
``analyze.compute_maps``, ``label.label_store`` + ``evaluate_dirs``, ``optimize_tokens``).

Sets (``ovstore.toyworld.quality.quality_scenes``: held-out world-v2 captions, which training never
draws, 1, 2 and 3 objects in equal numbers):

- calibration: ``--calibration-per-count`` scenes per object count from ``--calibration-seed``,
  generation seeds ``1000 * calibration-seed + i``; every threshold and label setting is chosen here;
- evaluation: ``--per-count`` per count from ``--seed``, no caption of the calibration set,
  generation seeds ``seed + i``; every reported figure is measured here.

Ground truth is recovered from the generated images (``recover_masks``), not taken from the
world renderer: the model draws objects where it likes. Run (re-runnable after the weights change;
stores are captured again when missing):

    python benchmarks/bench_toyworld.py [--per-count 100] [--calibration-per-count 20] [--work DIR]
        [--write-defaults]

``--write-defaults`` writes the label settings chosen on the calibration set to
``src/ovstore/data/toy-shapes/ovstore_defaults.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ovstore.toyworld.world import SYNONYMS

ROOT = Path(__file__).resolve().parents[1]
MODEL_DIR = ROOT / "src" / "ovstore" / "data" / "toy-shapes"
CLASSES = ("circle", "square", "triangle")
BARE_GRID = (0.02, 0.04, 0.06, 0.08) + tuple(round(0.1 + 0.05 * k, 2) for k in range(17))  # 0.02 .. 0.9
LABEL_GRID = (0.01, 0.02, 0.03, 0.04) + tuple(round(0.05 * k, 2) for k in range(1, 19))  # 0.01 .. 0.9
TEMPLATES = ("a photograph of a {}", "a {}", "{}")
#: The other words the toy world's captions name each class by: the model's vocabulary, which
#: its defaults may give ``--prompt-classes-only`` (a prompt saying "ball" names the circle class).
CLASS_WORDS = {c: list(words) for c, words in SYNONYMS.items()}
SUBSET = 8  # scenes per object count in a test-sized subset (tests/toyworld/test_quality.py's size)


def fmt(x: float) -> str:
    return "-" if x != x else f"{x:.3f}"


def spread(values: list[float]) -> str:
    v = [x for x in values if x == x]
    return f"{min(v):.3f} .. {max(v):.3f} (sd {np.std(v):.3f})" if v else "-"


def subsets(images: list[int], per_count: int) -> list[list[int]]:
    """Disjoint test-sized subsets: the j-th ``SUBSET`` scenes of each object count."""
    blocks = [images[k * per_count:(k + 1) * per_count] for k in range(3)]
    return [[i for b in blocks for i in b[j * SUBSET:(j + 1) * SUBSET]] for j in range(per_count // SUBSET)]


def checkpoint_table(paths: list[Path]) -> str:
    """Per probe step of each training.json: the training probe's figures (beside baselines)."""
    rows = ["| run | step | words top-k (flat / objects) | binding | noun in > out | bare t, IoU (2-obj) "
            "(flat / objects) | 'a SYNONYM' top-k (flat / objects), binding | 'a HYPERNYM' (flat) | words missing |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    seen: dict[str, Path] = {}
    for path in paths:
        d = json.loads(path.read_text())
        key = json.dumps(d.get("probes", []), sort_keys=True)
        if key in seen:
            rows.append(f"\n{path}: the same probes as {seen[key]} (the same run)")
            continue
        seen[key] = path
        for p in d.get("probes", []):
            g = lambda k: p.get(k, float("nan"))  # noqa: E731
            missing = g("n_missing") / max(g("n_missing") + g("n_words"), 1)
            rows.append(f"| {path.parent.name} | {p['step']} | {fmt(g('words'))} ({fmt(g('words_flat'))} / "
                        f"{fmt(g('words_objects'))}) | {fmt(g('binding'))} | {fmt(g('inside_gt_outside'))} | "
                        f"{g('bare_threshold'):.1f}, {fmt(g('bare_iou'))} ({fmt(g('bare_iou_2obj'))}) "
                        f"({fmt(g('bare_iou_flat'))} / {fmt(g('bare_iou_objects'))}) | {fmt(g('synonym'))} "
                        f"({fmt(g('synonym_flat'))} / {fmt(g('synonym_objects'))}), {fmt(g('synonym_binding'))} | "
                        f"{fmt(g('hypernym'))} ({fmt(g('hypernym_flat'))}) | {missing:.2f} |")
        ae = d.get("autoencoder", {})
        rows.append(f"\n{path}: {d['steps']} steps of batch {d['batch']}, diffusion "
                    f"{d['seconds_diffusion'] / 3600:.2f} h ({d['steps_per_second']:.2f} steps/s), autoencoder "
                    f"{ae.get('vae_seconds', float('nan')) / 3600:.2f} h, on {d['hardware']['cpu']} "
                    f"({d['hardware']['torch_threads']} torch thread, {d['hardware']['device']})\n")
    return "\n".join(rows)


def class_norm_maps(store, images, config, text_encoder=None):
    """Normalised class maps ``(image, class, H, W)`` exactly as ``ovstore label`` makes them."""
    from ovstore.analyze import load_text_encoder
    from ovstore.label.class_maps import label_class_maps

    text_encoder = text_encoder or load_text_encoder(store.layout.model)
    return label_class_maps(store, list(images), config, text_encoder, size=(store.layout.height, store.layout.width))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-count", type=int, default=100)
    parser.add_argument("--seed", type=int, default=2024)
    parser.add_argument("--calibration-per-count", type=int, default=20)
    parser.add_argument("--calibration-seed", type=int, default=7)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--epochs", type=int, default=300)
    parser.add_argument("--model", default=None, help="pipeline to evaluate (default: the embedded toy-world model)")
    parser.add_argument("--work", type=Path, default=None, help="stores and datasets (default: a temp dir)")
    parser.add_argument("--maps-only", action="store_true", help="sections (a)-(c) only: prompt words, the bare "
                        "attribution and words not in the prompt (a checkpoint's figures in minutes)")
    parser.add_argument("--write-defaults", action="store_true", help="write the chosen label settings to "
                        "src/ovstore/data/toy-shapes/ovstore_defaults.json")
    args = parser.parse_args()
    torch.set_num_threads(1)

    from ovstore.analyze import MapConfig, compute_maps, load_text_encoder
    from ovstore.label import LabelConfig, evaluate_dirs, label_store
    from ovstore.label.voc import write_label_tree
    from ovstore.optimize import OptimizeConfig, TokenTask, optimize_tokens, save_token, token_attribution
    from ovstore.toyworld import quality as q

    t_start = time.perf_counter()
    work = args.work or Path(tempfile.mkdtemp())
    work.mkdir(parents=True, exist_ok=True)
    cal_scenes = q.quality_scenes(args.calibration_seed, args.calibration_per_count)
    ev_scenes = q.quality_scenes(args.seed, args.per_count, exclude=[s.caption for s in cal_scenes])
    cal = q.capture_captions([s.caption for s in cal_scenes], work / "toy-v2-cal.zarr",
                             seed=1000 * args.calibration_seed, steps=args.steps, guidance=args.guidance,
                             model=args.model)
    ev = q.capture_captions([s.caption for s in ev_scenes], work / "toy-v2-eval.zarr", seed=args.seed,
                            steps=args.steps, guidance=args.guidance, model=args.model)
    t_capture = time.perf_counter() - t_start
    encoder = load_text_encoder(ev.layout.model)
    cal_images, ev_images = cal.complete_images(), ev.complete_images()
    cal_truth = {i: q.image_truth(cal, i) for i in cal_images}
    ev_truth = {i: q.image_truth(ev, i) for i in ev_images}
    parts = subsets(ev_images, args.per_count)
    n_syn = sum(any(n != s for _, n, s in t.phrases) for t in ev_truth.values())
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, 1 torch thread; model {ev.layout.model.id} "
          f"(text encoder {(ev.layout.model.text_encoder_fingerprint or '?')[:12]}); {ev.layout.height}x"
          f"{ev.layout.width}, {ev.layout.n_steps} UNet calls, guidance {args.guidance}; evaluation "
          f"{len(ev_images)} images ({n_syn} captions with a synonym or hypernym), calibration {len(cal_images)}; "
          f"capture {t_capture:.0f} s; {len(parts)} test-sized subsets of {3 * SUBSET}")

    # (a) prompt words in their caption
    word_parts = [q.prompt_word_quality(ev, p, ev_truth, text_encoder=encoder) for p in parts]
    words = q.IoUSums.merged(word_parts)
    bind, n_bind = words.rate("binding")
    inside, n_inside = words.rate("inside")
    print("\n(a) prompt words in their caption (colour words and nouns, maps from the generation prompt)\n")
    print("| figure | target | measured | flat map | object oracle | instances | spread over subsets |")
    print("|---|---:|---:|---:|---:|---:|---|")
    print(f"| top-k mIoU ({len(words.words())} words) | ≥ 0.60 | {fmt(words.miou())} | {fmt(words.miou('flat'))} | "
          f"{fmt(words.miou('objects'))} | {len(words.instances['map'])} | {spread([w.miou() for w in word_parts])} |")
    print(f"| binding (own object > other object) | ≥ 0.97 | {fmt(bind)} | 0.5 | 0.5 | {n_bind} | "
          f"{spread([w.rate('binding')[0] for w in word_parts])} |")
    print(f"| noun's mean map higher inside its object | ≥ 0.95 | {fmt(inside)} | 0.5 | "
          f"{fmt(words.rate('inside_objects')[0])} | {n_inside} | "
          f"{spread([w.rate('inside')[0] for w in word_parts])} |")
    print(f"\nwords whose object the generation lacks (excluded): {words.rate('missing')[0]:.3f} of "
          f"{words.rate('missing')[1]}; per word top-k IoU: " + ", ".join(
              f"{w} {words.iu[('map', w)][0] / words.iu[('map', w)][1]:.2f}" for w in words.words()))

    # (b) reference protocol: bare attribution, threshold chosen on the calibration set
    cal_rows = q.bare_rows(cal, cal_images, cal_truth, text_encoder=encoder)
    cal_sweep = {t: q.bare_iou(cal_rows, t) for t in BARE_GRID}
    best_t = max(cal_sweep, key=cal_sweep.get)
    ev_rows = q.bare_rows(ev, ev_images, ev_truth, text_encoder=encoder)
    print(f"\n(b) reference protocol: '{q.BARE_SHAPES}', each map ÷ its max, threshold {best_t} (chosen on the "
          "calibration set: " + ", ".join(f"{t} {v:.3f}" for t, v in cal_sweep.items()) + ")\n")
    print("| generations | target | mean IoU | flat map (any t) | object oracle (any t) | top-k | objects | "
          "spread over subsets |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    # for comparison: the attribution padded to 77 tokens, as the pipeline and the training probe encode it
    cal_padded = q.bare_rows(cal, cal_images, cal_truth, text_encoder=encoder, padded=True)
    padded_sweep = {t: q.bare_iou(cal_padded, t) for t in BARE_GRID}
    padded_t = max(padded_sweep, key=padded_sweep.get)
    ev_padded = q.bare_rows(ev, ev_images, ev_truth, text_encoder=encoder, padded=True)
    from ovstore.toyworld import topk_iou

    for label, n_obj, source, t in (("two-object", (2,), ev_rows, best_t),
                                    ("all (1-3 objects)", (1, 2, 3), ev_rows, best_t),
                                    (f"two-object, padded to 77 tokens (t={padded_t}, calibrated)", (2,), ev_padded,
                                     padded_t),
                                    ("all, padded to 77 tokens", (1, 2, 3), ev_padded, padded_t)):
        rows = [r for r in source if r[1] in n_obj]
        base = q.bare_baselines(rows)
        topk = np.mean([topk_iou(m, truth) for *_, m, truth, _ in rows])
        per = [q.bare_iou([r for r in rows if r[0] in set(p)], t) for p in parts]
        print(f"| {label} | {'≥ 0.55' if label == 'two-object' else ''} | {fmt(q.bare_iou(rows, t))} | "
              f"{fmt(base['flat'])} | {fmt(base['objects'])} | {fmt(topk)} | {len(rows)} | {spread(per)} |")

    # (c) synonyms and hypernyms not in the prompt
    ov_parts = [q.open_vocabulary_quality(ev, p, ev_truth, text_encoder=encoder) for p in parts]
    print("\n(c) nouns not in the generation prompt, each alone ('a ball'), top-k\n")
    print("| nouns | target | top-k mIoU | flat map | ÷ flat | object oracle | binding (pairs) | instances | "
          "spread over subsets |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for name in ("synonyms + hypernyms", "synonyms", "hypernyms", "shape words"):
        s = q.IoUSums.merged([o[name] for o in ov_parts])
        b, nb = s.rate("binding")
        goal = "≥ 0.50, ≥ 5× flat" if name.startswith("synonyms +") else ""
        print(f"| {name} ({', '.join(s.words())}) | {goal} | "
              f"{fmt(s.miou())} | {fmt(s.miou('flat'))} | {s.miou() / s.miou('flat'):.1f}× | "
              f"{fmt(s.miou('objects'))} | {fmt(b)} ({nb}) | {len(s.instances['map'])} | "
              f"{spread([o[name].miou() for o in ov_parts])} |")

    if args.maps_only:  # a checkpoint's map figures, before the labelling grid and the tokens
        print(f"\n(--maps-only: labelling and tokens skipped; {time.perf_counter() - t_start:.0f} s)")
        return

    # (d) label settings chosen on the calibration set
    print("\n(d) `ovstore label --classes circle,square,triangle`: settings chosen on the calibration set\n")
    results = []
    for template in TEMPLATES:
        for mode in ("separate", "compete"):
            for normalize in ("minmax", "max"):
                norm = class_norm_maps(cal, cal_images, LabelConfig(classes=CLASSES, prompt_template=template,
                                                                      mode=mode, normalize=normalize), encoder)
                for prompt_only, words in ((False, None), (True, None), (True, CLASS_WORDS)):
                    for min_component in (0, 4):
                        for t in LABEL_GRID:
                            c = LabelConfig(classes=CLASSES, prompt_template=template, mode=mode, normalize=normalize,
                                            threshold=t, prompt_classes_only=prompt_only, class_words=words,
                                            min_component=min_component)
                            results.append((q.label_miou(norm, cal_images, cal_truth, c), c))
    # maps from each image's own prompt (template and mode do not apply; the prompt must name the class)
    for normalize in ("minmax", "max"):
        norm = class_norm_maps(cal, cal_images, LabelConfig(classes=CLASSES, maps_from="prompt", normalize=normalize,
                                                              class_words=CLASS_WORDS), encoder)
        for min_component in (0, 4):
            for t in LABEL_GRID:
                c = LabelConfig(classes=CLASSES, maps_from="prompt", normalize=normalize, threshold=t,
                                prompt_classes_only=True, class_words=CLASS_WORDS, min_component=min_component)
                results.append((q.label_miou(norm, cal_images, cal_truth, c), c))
    results.sort(key=lambda r: -r[0])
    print("best 8 on the calibration set (mIoU, background + 3 classes):\n")
    print("| maps from | template | mode | normalize | threshold | prompt classes only | min component | calibration mIoU |")
    print("|---|---|---|---|---:|---|---:|---:|")
    best_template = next(c for m, c in results if c.maps_from == "template")
    shown = results[:8] + [r for r in results if r[1] is best_template and r not in results[:8]]
    for miou, c in shown:
        only = ("yes, with class words" if c.class_words else "yes, names only") if c.prompt_classes_only else "no"
        template = "-" if c.maps_from == "prompt" else f"`{c.prompt_template}`"
        mode = "-" if c.maps_from == "prompt" else c.mode
        print(f"| {c.maps_from} | {template} | {mode} | {c.normalize} | {c.threshold} | {only} | "
              f"{c.min_component} | {miou:.3f} |")
    chosen = results[0][1]
    best_without = next(c for m, c in results if not c.prompt_classes_only)
    defaults = {"format": 1,
                "label": {"prompt_template": chosen.prompt_template, "mode": chosen.mode,
                          "normalize": chosen.normalize, "threshold": chosen.threshold,
                          "prompt_classes_only": chosen.prompt_classes_only, "min_component": chosen.min_component}}
    if chosen.class_words:
        defaults["label"]["class_words"] = {c: list(w) for c, w in chosen.class_words.items()}
    if chosen.maps_from != "template":  # template and mode do not apply to maps from the prompt
        defaults["label"]["maps_from"] = chosen.maps_from
        del defaults["label"]["prompt_template"], defaults["label"]["mode"]
    # no "maps" display default: `maps --png` then draws every word of a sheet on one scale (shares
    # of attention), where a per-map normalisation would stretch weak words to full range
    print("\nchosen: " + json.dumps(defaults))
    if args.write_defaults:
        (MODEL_DIR / "ovstore_defaults.json").write_text(json.dumps(defaults, indent=1) + "\n")
        print(f"written to {MODEL_DIR / 'ovstore_defaults.json'}")

    # the evaluation set, through label_store and evaluate_dirs
    train = {c: next(i for i in ev_images if c in ev_truth[i].masks and ev_truth[i].masks[c].sum() >= 10)
             for c in CLASSES}
    held = [i for i in ev_images if i not in train.values()]
    gt = write_label_tree(work / "gt", CLASSES, {i: q.label_truth(ev_truth[i]) for i in held})
    t0 = time.perf_counter()
    tokens = optimize_tokens(ev, [TokenTask(c, (train[c],), (ev_truth[train[c]].masks[c],)) for c in CLASSES],
                             config=OptimizeConfig(epochs=args.epochs), text_encoder=encoder)
    t_tokens = time.perf_counter() - t0
    token_files = {t.name: save_token(t, work / f"{t.name}.safetensors", overwrite=True) for t in tokens}
    try:
        import pydensecrf  # noqa: F401

        has_crf = True
    except ImportError:
        has_crf = False
    fields = dict(defaults["label"])
    rows = {
        "package defaults (`a photograph of a {}`, separate, minmax, 0.6)": LabelConfig(classes=CLASSES),
        "chosen settings (ovstore_defaults.json)": LabelConfig(classes=CLASSES, **fields),
        f"calibration best without prompt classes only (`{best_without.prompt_template}`, {best_without.mode}, "
        f"{best_without.normalize}, {best_without.threshold}, min component {best_without.min_component})":
            best_without,
    }
    if best_template is not chosen:
        rows[f"calibration best with template maps (`{best_template.prompt_template}`, {best_template.mode}, "
             f"{best_template.normalize}, {best_template.threshold}, prompt classes only "
             f"{best_template.prompt_classes_only})"] = best_template
    if has_crf:
        rows["chosen settings + `--crf`"] = LabelConfig(classes=CLASSES, crf=True, **fields)
    token_fields = {**fields, "mode": "separate", "maps_from": "template"}  # against the word as an attribution
    rows["tokens (1 annotated image per class), chosen settings, separate"] = LabelConfig(
        classes=CLASSES, tokens=token_files, **token_fields)
    # a token's maps are not a word's: its threshold chosen on the calibration set too (the
    # tokens were learned on evaluation images, so the calibration set stays disjoint)
    tok_norm = class_norm_maps(cal, cal_images, LabelConfig(classes=CLASSES, tokens=token_files, **token_fields),
                               encoder)
    tok_t = max(LABEL_GRID, key=lambda t: q.label_miou(tok_norm, cal_images, cal_truth, LabelConfig(
        classes=CLASSES, tokens=token_files, **{**token_fields, "threshold": t})))
    rows[f"tokens, threshold chosen for them on the calibration set ({tok_t})"] = LabelConfig(
        classes=CLASSES, tokens=token_files, **{**token_fields, "threshold": tok_t})
    rows["plain words, same settings (for the tokens row)"] = LabelConfig(classes=CLASSES, **token_fields)
    print(f"\nevaluation: {len(held)} images (the 3 annotated images of the token rows, "
          f"{', '.join(f'{c} {i}' for c, i in train.items())}, left out of every row); tokens {args.epochs} "
          f"epochs, {t_tokens:.0f} s" + ("" if has_crf else "; DenseCRF not installed: its row is left out") + "\n")
    print("| settings | mIoU | flat map | object oracle | " + " | ".join(f"{c} IoU" for c in ("background", *CLASSES))
          + " | spread over subsets |")
    print("|---|---:|---:|---:|" + "---:|" * 4 + "---|")
    for k, (label, config) in enumerate(rows.items()):
        out = work / f"label-{k:02d}"
        shutil.rmtree(out, ignore_errors=True)
        # every row is its own settings: the store's recorded model defaults must not fill the rest
        label_store(ev, out, config, images=held, scheduler="synchronous", partition_size=32, model_defaults=False)
        report = evaluate_dirs(out, gt)
        base = q.label_baselines(held, ev_truth, config, seed=k)
        norm = class_norm_maps(ev, held, config, encoder)
        per = [q.label_miou(norm[[held.index(i) for i in p if i in held]], [i for i in p if i in held], ev_truth,
                            config) for p in parts]
        print(f"| {label} | {report.miou:.3f} | {base['flat']:.3f} | {base['objects']:.3f} | "
              + " | ".join(f"{v:.3f}" for v in report.iou) + f" | {spread(per)} |", flush=True)
        shutil.rmtree(out)

    # learned tokens against the plain word, top-k on held-out images
    tok_scores, word_scores = q.IoUSums(1), q.IoUSums(2)
    for token in tokens:
        having = [i for i in held if token.name in ev_truth[i].masks and ev_truth[i].masks[token.name].sum() >= 3]
        maps = compute_maps(ev, [token_attribution(token, ev.layout.model), f"a {token.name}"], images=having,
                            text_encoder=encoder, config=MapConfig(size=(ev.layout.height, ev.layout.width)))
        col = int(np.flatnonzero(maps["token_str"].values == f"{token.name}</w>")[0])
        for row, i in enumerate(having):
            truth = ev_truth[i].masks[token.name]
            tok_scores.add(token.name, maps.values[row, 1], truth, ev_truth[i].objects)
            word_scores.add(token.name, maps.values[row, col], truth, ev_truth[i].objects)
    print(f"\ntop-k on held-out images: learned tokens {tok_scores.miou():.3f}, plain word 'a WORD' "
          f"{word_scores.miou():.3f} (flat {tok_scores.miou('flat'):.3f}, object oracle "
          f"{tok_scores.miou('objects'):.3f}; {len(tok_scores.instances['map'])} instances)")

    print("\n(e) training probe per checkpoint (training.json `probes`)\n")
    print(checkpoint_table([MODEL_DIR / "training.json", ROOT / "training" / "toyworld-v2" / "training.json"]))
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    print(f"total {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()

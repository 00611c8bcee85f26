"""``ovstore demo``: the whole method on the embedded toy-world model, offline, in minutes.

Captures a handful of generations, computes maps for words in the prompts and for words that
never were (open vocabulary), learns one token from one image's mask and applies it to the
others, labels the images, and writes a Markdown report with the pictures.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from .devices import check_device
from .errors import InvalidInputError, StoreError
from .outputs import (Output, held_lock, open_output, os_errors, read_marker, write_atomically, write_marker,
                      write_text_atomic)
from .partial import find_damaged

__all__ = ["CAPTIONS", "open_vocabulary", "run_demo"]

CAPTIONS = (
    "a red circle and a blue square",
    "a green triangle and a yellow circle",
    "a blue circle",
    "a yellow square and a red triangle",
    "a green circle and a blue triangle",
    "a red square and a yellow circle",
)


def _topk_iou(norm_map: np.ndarray, mask: np.ndarray) -> float:
    """IoU of the mask-area top pixels of a map: a protocol a flat map cannot pass."""
    k = int(mask.sum())
    if k == 0:
        return float("nan")
    top = np.zeros(mask.size, bool)
    top[np.argsort(norm_map.ravel())[::-1][:k]] = True
    top = top.reshape(mask.shape)
    return float((top & mask).sum() / (top | mask).sum())


def run_demo(out: str | Path = "ovstore-demo", *, device: str = "cpu", steps: int = 20, guidance: float = 5.0,
             epochs: int = 300, log: Callable[[str], None] = print) -> Path:
    """Run the demo into ``out`` and return the path of its ``report.md``.

    On a folder of an earlier (maybe interrupted) demo it finishes what is missing: the
    captures are resumed until all images are complete, and every later part is rebuilt
    and published whole, so the report always covers every image.
    """
    from .inputs import check_int

    check_int(epochs, "--epochs", 1, 1_000_000)  # before minutes of capture, not after
    check_device(device)
    target = open_output(out, "demo", kind="dir", resume=True)
    out = target.path
    with held_lock(out, wait=None, what="demo folder"), \
            os_errors(out, kept="complete parts are kept", then="run `ovstore demo` again to finish"):
        out.mkdir(parents=True, exist_ok=True)
        if read_marker(out) is None:
            write_marker(out, "demo")
        return _run_demo(out, device=device, steps=steps, guidance=guidance, epochs=epochs, log=log)


def _captures(store_path: Path, *, device: str, steps: int, guidance: float, log: Callable[[str], None]):
    """The demo's store with every caption complete: captured, or an interrupted one finished."""
    from .capture import CaptureConfig, build_requests, load_pipeline, resume
    from .store import open_store

    requests = build_requests([(c, None, None) for c in CAPTIONS], seed=0, guidance=guidance,
                              num_inference_steps=steps)
    store = open_store(store_path) if (store_path / "zarr.json").exists() else None
    if store is not None and [store.record(i).prompt for i in range(store.n_images)] != list(CAPTIONS)[:store.n_images]:
        raise InvalidInputError(f"{store_path} holds other captures than the demo's; move it away and run "
                                "`ovstore demo` again")
    if store is None or store.complete_images() != list(range(len(CAPTIONS))):
        missing = len(CAPTIONS) - (len(store.complete_images()) if store is not None else 0)
        log(f"capturing {missing} of {len(CAPTIONS)} generations of the embedded toy-world model ...")
        pipe, identity = load_pipeline(None, device=device)
        resume(pipe, identity, store_path, requests=requests,
               config=CaptureConfig(num_inference_steps=steps, guidance=guidance, batch_size=len(CAPTIONS)))
        store = open_store(store_path)
    damaged = find_damaged(store, store.complete_images())
    if damaged:
        raise StoreError(f"images {damaged} of {store_path} are damaged; delete {store_path} and run "
                         "`ovstore demo` again to capture them anew")
    return store


def _folder(path: Path) -> Output:
    """A picture folder of the demo: rebuilt aside and swapped in whole on every run."""
    return open_output(path, "maps --png", kind="dir", overwrite=True, option="folder")


def _flat_iou(mask: np.ndarray, rng: np.random.Generator, draws: int = 20) -> float:
    """The top-k IoU of a flat map (ties broken at random): the baseline of :func:`_topk_iou`."""
    return float(np.mean([_topk_iou(rng.random(mask.shape), mask) for _ in range(draws)]))


def open_vocabulary(caption: str) -> tuple[str, str]:
    """Two attributions of words that are not in ``caption``, in the grammar of the model's
    captions: its shapes' first synonyms (``"a red ball and a blue box"``), and the
    hypernyms ``shape`` and ``object`` in turn (``"a red shape and a blue object"``)."""
    from .toyworld import HYPERNYMS, SYNONYMS, parse_caption

    pairs = parse_caption(caption)
    synonyms = " and ".join(f"a {colour} {SYNONYMS[shape][0]}" for colour, shape in pairs)
    hypernyms = " and ".join(f"a {colour} {HYPERNYMS[k % len(HYPERNYMS)]}" for k, (colour, _) in enumerate(pairs))
    return synonyms, hypernyms


def _write_report(path: Path, lines: list[str]) -> None:
    write_text_atomic(path, "\n".join(lines) + "\n")


def _run_demo(out: Path, *, device: str, steps: int, guidance: float, epochs: int,
              log: Callable[[str], None]) -> Path:
    import json

    from PIL import Image

    from . import pictures
    from .analyze import compute_maps, overlay_files, word_maps
    from .label import LabelConfig, label_store
    from .optimize import OptimizeConfig, TokenTask, optimize_tokens, save_token, token_attribution
    from .toyworld import NOUNS, parse_caption, recover_masks

    store_path = out / "captures.zarr"
    store = _captures(store_path, device=device, steps=steps, guidance=guidance, log=log)
    images = store.complete_images()
    truth = {i: recover_masks(store.image(i), store.record(i).prompt) for i in images}
    # the object each caption phrase names: its colour's pixels of its shape
    objects = {i: [truth[i][c] & truth[i][s] for c, s in parse_caption(store.record(i).prompt)] for i in images}
    rng = np.random.default_rng(0)
    size = (store.layout.height, store.layout.width)
    scores: dict[str, list[tuple[float, float]]] = {}  # what -> [(top-k IoU, flat map's), ...]
    inside: dict[str, dict[str, list[float]]] = {}  # picture -> word -> [mean inside, mean outside]

    def score(what: str, values: np.ndarray, mask: np.ndarray | None) -> None:
        if mask is not None and mask.any():
            scores.setdefault(what, []).append((_topk_iou(values, mask), _flat_iou(mask, rng)))

    log("maps of the words in each prompt ...")
    lines = ["# ovstore demo", "", f"Model: `{store.layout.model.id}` (trained on the toy world). Store: "
             f"`{store_path.name}`, {len(images)} images, {store.layout.n_steps} UNet calls each.", "",
             "Every picture shows maps on one colour scale per picture, from 0 to its largest value: the share "
             "of each pixel's attention that a word takes (softmax over the attribution prompt's tokens, mean "
             "over every head, UNet call and layer). White lines are the image's object outlines. "
             "Start/end-of-text and filler words (a, and, ...) are not drawn.", "",
             "## Words of the prompt", "", "Each sheet: the generated image, then the map of each word of its own "
             "prompt (`ovstore maps --png`).", ""]
    with _folder(out / "prompt_words").writing() as folder:
        for i in images:
            caption = store.record(i).prompt
            maps = compute_maps(store, [caption], images=[i], device=device, config=_map_config(size))
            overlay_files(maps, store.image, folder)
            lines.append(f"![{caption}](prompt_words/{i:05d}_p000.png)")
            words = word_maps(maps)
            for k, word in enumerate(words["word_str"].values):
                mask = truth[i].get(str(word))
                score("words of the prompt", words.values[0, k], mask)
                if mask is not None and mask.any():
                    v = words.values[0, k]
                    inside.setdefault(f"prompt_words/{i:05d}_p000.png", {})[str(word)] = [
                        float(v[mask].mean()), float(v[~mask].mean())]

    log("maps of words that are not in the prompts ...")
    lines += ["", "## Open vocabulary: words that are not in the prompt", "",
              "Per image: synonyms of its shapes (`ball`, `box`, `wedge`) and the hypernyms `shape` and `object`, "
              "each in a phrase with its object's colour, as the model's captions read (\"a red ball and a blue "
              "box\" for \"a red circle and a blue square\"). Only the words not in the prompt are drawn.", ""]
    with _folder(out / "open_vocabulary").writing() as folder:
        for i in images:
            caption = store.record(i).prompt
            prompted = set(caption.split())
            attributions = [*open_vocabulary(caption), *sorted({f"a {n}" for n, s in NOUNS.items()
                                                               if s is not None and s in caption and n != s})]
            maps = compute_maps(store, attributions, images=[i], device=device, config=_map_config(size))
            tiles = [t for t in pictures.word_tiles(maps.isel(token=maps["prompt_index"].values < 2))
                     if t.label not in prompted]
            sheet = pictures.map_sheet([pictures.SheetRow(store.image(i), tiles)],
                                       title=f"words not in the prompt \"{caption}\" (image {i})",
                                       values=pictures.value_scale(maps.isel(token=maps["prompt_index"].values == 0)
                                                                   ).description)
            sheet.save(folder / f"{i:05d}.png")
            lines.append(f"![words not in \"{caption}\"](open_vocabulary/{i:05d}.png)")
            words = word_maps(maps)
            phrase = {}  # (prompt, word) -> the object its phrase names
            for k in range(2):
                cols = np.flatnonzero(words["prompt_index"].values == k)
                nouns = [c for c in cols if str(words["word_str"].values[c]) in NOUNS]
                for c, mask in zip(nouns, objects[i]):
                    phrase[c] = mask
            for c, mask in phrase.items():
                word = str(words["word_str"].values[c])
                what = "hypernyms, in a phrase with the colour" if NOUNS[word] is None else \
                    "synonyms, in a phrase with the colour"
                score(what, words.values[0, c], mask)
                if mask.any():
                    v = words.values[0, c]
                    inside.setdefault(f"open_vocabulary/{i:05d}.png", {})[word] = [
                        float(v[mask].mean()), float(v[~mask].mean())]
            for c in np.flatnonzero(words["prompt_index"].values >= 2):  # "a ball": the synonym alone
                word = str(words["word_str"].values[c])
                if word in NOUNS and NOUNS[word] is not None:
                    score("synonyms alone (\"a ball\")", words.values[0, c], truth[i].get(NOUNS[word]))

    log(f"optimizing a 'circle' token on image 0 for {epochs} epochs ...")
    (token,) = optimize_tokens(store, [TokenTask("circle", (images[0],), (truth[images[0]]["circle"],))],
                               config=OptimizeConfig(epochs=epochs), device=device)
    token_path = save_token(token, out / "circle.safetensors", overwrite=True)
    learned = compute_maps(store, [token_attribution(token, store.layout.model), "a circle"], images=images,
                           device=device, config=_map_config(size))
    word_col = int(np.flatnonzero((learned["prompt_index"].values == 1) & (learned["token_str"].values == "circle</w>"))[0])
    held_out = [i for i in images[1:] if "circle" in truth[i] and truth[i]["circle"].any()]
    token_iou = [_topk_iou(learned.values[images.index(i), 1], truth[i]["circle"]) for i in held_out]
    word_iou = [_topk_iou(learned.values[images.index(i), word_col], truth[i]["circle"]) for i in held_out]
    flat_iou = [_flat_iou(truth[i]["circle"], rng) for i in held_out]
    for a, f in zip(token_iou, flat_iou):
        scores.setdefault("learned token on held-out images", []).append((a, f))
    for b, f in zip(word_iou, flat_iou):
        scores.setdefault("the word (\"a circle\") on the same images", []).append((b, f))
    token_maps = learned.isel(token=learned["prompt_index"].values == 0)
    rows = []
    for i, a, b, f in zip(held_out, token_iou, word_iou, flat_iou):
        tiles = pictures.word_tiles(token_maps.isel(image=[images.index(i)]))
        rows.append(pictures.SheetRow(store.image(i), tiles, f"image {i}: \"{store.record(i).prompt}\"; top-k IoU "
                                                             f"{a:.2f} (word {b:.2f}, flat map {f:.2f})"))
        v = token_maps.values[images.index(i), 1]
        inside.setdefault("token/held_out.png", {})[f"image {i}"] = [float(v[truth[i]["circle"]].mean()),
                                                                    float(v[~truth[i]["circle"]].mean())]
    with _folder(out / "token").writing() as folder:
        if rows:
            pictures.map_sheet(rows, title=f"a 'circle' token learned from image {images[0]}'s mask, on the other "
                                           "images", values=pictures.value_scale(token_maps).description
                               ).save(folder / "held_out.png")
    lines += ["", "## A learned token", "",
              f"Learned from image {images[0]}'s circle mask only (`{token_path.name}`: loss "
              f"{token.training['best_loss']:.3f}, training IoU {token.training['train_iou']:.2f} vs "
              f"{token.training['plain_word_iou']:.2f} for the word), drawn on the images it was not trained on.",
              "", "| held-out image | token top-k IoU | 'a circle' top-k IoU | flat map |", "|---:|---:|---:|---:|"]
    for i, a, b, f in zip(held_out, token_iou, word_iou, flat_iou):
        lines.append(f"| {i} | {a:.2f} | {b:.2f} | {f:.2f} |")
    if rows:
        lines += ["", "![the token on held-out images](token/held_out.png)"]

    log("labelling the images (circle, square, triangle) ...")
    # the plain command: every setting from the model's ovstore_defaults.json (recorded in the
    # store), which were chosen on a calibration set (BENCHMARKS.md, "Toy world v2: quality")
    classes = ("circle", "square", "triangle")
    label_store(store, out / "dataset", LabelConfig(classes=classes), scheduler="synchronous")
    lines += ["", "## Labels", "", "VOC tree and COCO JSON in `dataset/` (classes circle=1, square=2, "
              "triangle=3; palette PNGs; `ovstore label --classes circle,square,triangle`, the model's "
              "default settings): each image beside its label PNG, in the PNG's palette.", "",
              "![labels](dataset/preview.png)", ""]
    label_rows = []
    for i in images:
        with Image.open(out / "dataset" / "SegmentationClass" / f"{i:05d}.png") as png:
            label, palette = np.asarray(png), png.getpalette()
        label_rows.append((store.image(i), label, f"image {i}: \"{store.record(i).prompt}\""))
        _save(pictures.label_sheet([label_rows[-1]], ("background", *classes), palette),
              out / "dataset" / f"preview_{i:05d}.png")
    _save(pictures.label_sheet(label_rows, ("background", *classes), palette, title="labels of every image"),
          out / "dataset" / "preview.png")
    # the labels against the masks recovered from the images (I and U summed over the images)
    label_iou = {}
    for k, name in enumerate(("background", *classes)):
        inter = union = 0
        for i, (_, label, _) in zip(images, label_rows):
            true = ~np.any([m for w, m in truth[i].items() if w in classes], axis=0) if k == 0 else \
                truth[i].get(name, np.zeros(label.shape, bool))
            inter += int((true & (label == k)).sum())
            union += int((true | (label == k)).sum())
        label_iou[name] = inter / union if union else float("nan")
    lines += ["Labels against the masks recovered from the images (IoU, intersections and unions summed over "
              "the images): " + ", ".join(f"{n} {v:.2f}" for n, v in label_iou.items()) +
              f"; mIoU {np.nanmean(list(label_iou.values())):.2f}.", ""]

    lines += ["## Figures", "",
              "Top-k IoU: the share of the map's k highest pixels on the object, k = the object's area (IoU of "
              "the two); a flat map scores the figure beside it.", "",
              "| maps | top-k IoU | flat map | n |", "|---|---:|---:|---:|"]
    figures = {}
    for what, pairs in scores.items():
        a = np.asarray(pairs, dtype=np.float64)
        figures[what] = {"topk_iou": float(np.nanmean(a[:, 0])), "flat": float(np.nanmean(a[:, 1])), "n": len(a)}
        lines.append(f"| {what} | {figures[what]['topk_iou']:.2f} | {figures[what]['flat']:.2f} | {len(a)} |")
    lines.append("")
    _write_report(out / "figures.json", [json.dumps({"topk_iou": figures, "inside_outside": inside,
                                                     "label_iou": label_iou}, indent=1)])
    report = out / "report.md"
    _write_report(report, lines)
    log(f"wrote {report}")
    return report


def _save(sheet, path: Path) -> None:
    """A picture written whole: a temporary beside it, renamed into place."""
    from PIL import Image

    write_atomically(path, lambda tmp: Image.fromarray(sheet.pixels).save(tmp, format="PNG"))


def _map_config(size: tuple[int, int]):
    from .analyze import MapConfig

    return MapConfig(size=size)

"""``ovstore demo``: the whole method on the embedded toy-world model, offline, in minutes.

Captures a handful of generations, computes maps for words in the prompts and for words that
never were (open vocabulary), learns one token from one image's mask and applies it to the
others, labels the images, and writes a Markdown report with the pictures.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .devices import check_device
from .errors import InvalidInputError, StoreError
from .outputs import Output, held_lock, open_output, os_errors, read_marker, temporary_path, write_marker
from .partial import find_damaged

__all__ = ["CAPTIONS", "run_demo"]

CAPTIONS = (
    "a red circle and a blue square",
    "a green triangle and a yellow circle",
    "a blue circle",
    "a yellow square and a red triangle",
    "a green circle and a blue triangle",
    "a red square and a yellow circle",
)
OPEN_VOCABULARY = ("a round shape", "a pointy shape", "a colourful object")


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


def _run_demo(out: Path, *, device: str, steps: int, guidance: float, epochs: int,
              log: Callable[[str], None]) -> Path:
    import torch.nn.functional as F
    import torch

    from .analyze import compute_maps, overlay_files, word_maps, write_overlays
    from .label import LabelConfig, label_store
    from .optimize import OptimizeConfig, TokenTask, optimize_tokens, save_token, token_attribution
    from .toyworld import recover_masks

    store_path = out / "captures.zarr"
    store = _captures(store_path, device=device, steps=steps, guidance=guidance, log=log)
    images = store.complete_images()
    truth = {i: recover_masks(store.image(i), store.record(i).prompt) for i in images}

    log("maps of the words in each prompt ...")
    size = (store.layout.height, store.layout.width)
    lines = ["# ovstore demo", "", f"Model: `{store.layout.model.id}` (trained on the toy world). Store: "
             f"`{store_path.name}`, {len(images)} images, {store.layout.n_steps} UNet calls each.", "",
             "## Words of the prompt", "",
             "Each sheet: the generated image, then one overlay per token of its own prompt.", ""]
    scores: dict[str, list[float]] = {}
    with _folder(out / "prompt_words").writing() as folder:
        for i in images:
            caption = store.record(i).prompt
            maps = compute_maps(store, [caption], images=[i], device=device)
            overlay_files(maps, store.image, folder)
            lines.append(f"![{caption}](prompt_words/{i:05d}_p000.png)")
            words = word_maps(compute_maps(store, [caption], images=[i], device=device,
                                           config=_map_config(size)))
            for k, word in enumerate(words["word_str"].values):
                if str(word) in truth[i]:
                    scores.setdefault("in prompt", []).append(_topk_iou(words.values[0, k], truth[i][str(word)]))
    lines += ["", "## Open vocabulary: words that were never in a prompt", ""]
    log("maps of open-vocabulary words ...")
    open_maps = compute_maps(store, list(OPEN_VOCABULARY), images=images, device=device)
    write_overlays(open_maps, store.image, out / "open_vocabulary", overwrite=True)
    for i in images:
        for k in range(len(OPEN_VOCABULARY)):
            lines.append(f"![{OPEN_VOCABULARY[k]}](open_vocabulary/{i:05d}_p{k:03d}.png)")

    log(f"optimizing a 'circle' token on image 0 for {epochs} epochs ...")
    (token,) = optimize_tokens(store, [TokenTask("circle", (images[0],), (truth[images[0]]["circle"],))],
                               config=OptimizeConfig(epochs=epochs), device=device)
    token_path = save_token(token, out / "circle.safetensors", overwrite=True)
    learned = compute_maps(store, [token_attribution(token, store.layout.model), "a circle"], images=images,
                           device=device, config=_map_config(size))
    write_overlays(learned, store.image, out / "token", overwrite=True)
    word_col = int(np.flatnonzero((learned["prompt_index"].values == 1) & (learned["token_str"].values == "circle</w>"))[0])
    held_out = [i for i in images[1:] if "circle" in truth[i] and truth[i]["circle"].any()]
    token_iou = [_topk_iou(learned.values[images.index(i), 1], truth[i]["circle"]) for i in held_out]
    word_iou = [_topk_iou(learned.values[images.index(i), word_col], truth[i]["circle"]) for i in held_out]
    lines += ["", "## A learned token", "",
              f"Learned from image 0's circle mask only (`{token_path.name}`: loss {token.training['best_loss']:.3f}, "
              f"training IoU {token.training['train_iou']:.2f} vs {token.training['plain_word_iou']:.2f} for the word).",
              "", "| held-out image | token IoU | 'a circle' IoU |", "|---:|---:|---:|"]
    for i, a, b in zip(held_out, token_iou, word_iou):
        lines.append(f"| {i} | {a:.2f} | {b:.2f} |")
    for i in held_out:
        lines.append(f"![token on image {i}](token/{i:05d}_p000.png)")

    log("labelling the images (circle, square, triangle) ...")
    # the toy model only saw captions "a COLOUR SHAPE": the template follows their grammar, the
    # classes of one image compete in one softmax, and only the prompt's classes are labelled
    # (the best plain-word settings without DenseCRF in BENCHMARKS.md's label-quality section)
    config = LabelConfig(classes=("circle", "square", "triangle"), prompt_template="a {}", mode="compete",
                         prompt_classes_only=True)
    label_store(store, out / "dataset", config, scheduler="synchronous")
    lines += ["", "## Labels", "", "VOC tree and COCO JSON in `dataset/` (classes circle=1, square=2, "
              "triangle=3; palette PNGs; `ovstore label --classes circle,square,triangle --prompt-template "
              "'a {}' --mode compete --prompt-classes-only`):", ""]
    from PIL import Image

    for i in images:
        label = np.asarray(Image.open(out / "dataset" / "SegmentationClass" / f"{i:05d}.png").convert("RGB"))
        big = np.concatenate([np.kron(store.image(i), np.ones((4, 4, 1), np.uint8)),
                              np.kron(label, np.ones((4, 4, 1), np.uint8))], axis=1)
        preview = out / "dataset" / f"preview_{i:05d}.png"
        tmp = temporary_path(preview)
        try:
            Image.fromarray(big).save(tmp, format="PNG")
            os.replace(tmp, preview)
        finally:
            tmp.unlink(missing_ok=True)
        lines.append(f"![labels {i}](dataset/preview_{i:05d}.png)")
    mean = {k: float(np.nanmean(v)) for k, v in scores.items()}
    lines += ["", "## Figures", "",
              "Top-k IoU (k = the true object's area; a flat map scores about the object's area share):",
              f"- words of the prompt: {mean.get('in prompt', float('nan')):.2f}",
              f"- learned token on held-out images: {np.nanmean(token_iou):.2f} (plain word: {np.nanmean(word_iou):.2f})",
              ""]
    report = out / "report.md"
    tmp = temporary_path(report)
    try:
        tmp.write_text("\n".join(lines) + "\n")
        os.replace(tmp, report)
    finally:
        tmp.unlink(missing_ok=True)
    log(f"wrote {report}")
    return report


def _map_config(size: tuple[int, int]):
    from .analyze import MapConfig

    return MapConfig(size=size)

"""``ovstore demo``: the whole method on the embedded toy-world model, offline, in minutes.

Captures a handful of generations, computes maps for words in the prompts and for words that
never were (open vocabulary), learns one token from one image's mask and applies it to the
others, labels the images, and writes a Markdown report with the pictures.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

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
    """Run the demo into ``out`` and return the path of its ``report.md``."""
    from .inputs import check_int

    check_int(epochs, "--epochs", 1, 1_000_000)  # before minutes of capture, not after
    import torch.nn.functional as F
    import torch

    from .analyze import compute_maps, word_maps, write_overlays
    from .capture import CaptureConfig, build_requests, capture, load_pipeline
    from .label import LabelConfig, label_store
    from .optimize import OptimizeConfig, TokenTask, optimize_tokens, save_token, token_attribution
    from .store import open_store
    from .toyworld import recover_masks

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    store_path = out / "captures.zarr"
    if not (store_path / "zarr.json").exists():
        log(f"capturing {len(CAPTIONS)} generations of the embedded toy-world model ...")
        pipe, identity = load_pipeline(None, device=device)
        requests = build_requests([(c, None, None) for c in CAPTIONS], seed=0, guidance=guidance,
                                  num_inference_steps=steps)
        capture(pipe, identity, requests, store_path,
                config=CaptureConfig(num_inference_steps=steps, guidance=guidance, batch_size=len(CAPTIONS)))
    store = open_store(store_path)
    images = store.complete_images()
    truth = {i: recover_masks(store.image(i), store.record(i).prompt) for i in images}

    log("maps of the words in each prompt ...")
    size = (store.layout.height, store.layout.width)
    lines = ["# ovstore demo", "", f"Model: `{store.layout.model.id}` (trained on the toy world). Store: "
             f"`{store_path.name}`, {len(images)} images, {store.layout.n_steps} UNet calls each.", "",
             "## Words of the prompt", "",
             "Each sheet: the generated image, then one overlay per token of its own prompt.", ""]
    scores: dict[str, list[float]] = {}
    for i in images:
        caption = store.record(i).prompt
        maps = compute_maps(store, [caption], images=[i], device=device)
        write_overlays(maps, store.image, out / "prompt_words")
        lines.append(f"![{caption}](prompt_words/{i:05d}_p000.png)")
        words = word_maps(compute_maps(store, [caption], images=[i], device=device,
                                       config=_map_config(size)))
        for k, word in enumerate(words["word_str"].values):
            if str(word) in truth[i]:
                scores.setdefault("in prompt", []).append(_topk_iou(words.values[0, k], truth[i][str(word)]))
    lines += ["", "## Open vocabulary: words that were never in a prompt", ""]
    log("maps of open-vocabulary words ...")
    open_maps = compute_maps(store, list(OPEN_VOCABULARY), images=images, device=device)
    write_overlays(open_maps, store.image, out / "open_vocabulary")
    for i in images:
        for k in range(len(OPEN_VOCABULARY)):
            lines.append(f"![{OPEN_VOCABULARY[k]}](open_vocabulary/{i:05d}_p{k:03d}.png)")

    log(f"optimizing a 'circle' token on image 0 for {epochs} epochs ...")
    (token,) = optimize_tokens(store, [TokenTask("circle", (images[0],), (truth[images[0]]["circle"],))],
                               config=OptimizeConfig(epochs=epochs), device=device)
    token_path = save_token(token, out / "circle.safetensors")
    learned = compute_maps(store, [token_attribution(token, store.layout.model), "a circle"], images=images,
                           device=device, config=_map_config(size))
    write_overlays(learned, store.image, out / "token")
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
        Image.fromarray(big).save(out / "dataset" / f"preview_{i:05d}.png")
        lines.append(f"![labels {i}](dataset/preview_{i:05d}.png)")
    mean = {k: float(np.nanmean(v)) for k, v in scores.items()}
    lines += ["", "## Figures", "",
              "Top-k IoU (k = the true object's area; a flat map scores about the object's area share):",
              f"- words of the prompt: {mean.get('in prompt', float('nan')):.2f}",
              f"- learned token on held-out images: {np.nanmean(token_iou):.2f} (plain word: {np.nanmean(word_iou):.2f})",
              ""]
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    log(f"wrote {report}")
    return report


def _map_config(size: tuple[int, int]):
    from .analyze import MapConfig

    return MapConfig(size=size)

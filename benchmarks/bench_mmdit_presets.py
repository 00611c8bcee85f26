"""MM-DiT storage presets: bytes per image and the map deviation each preset causes.

On the tiny public SD3 and FLUX pipelines (tests/data/online, float32 storage) every preset the
family offers captures the same prompts; each store's maps (generation-context maps and a few
attribution words') are compared with the full capture's: cosine similarity and IoU of the
top 10 % pixels, per map (both are invariant to a map's scale, so maps summed over fewer blocks
or calls compare as normalised maps), averaged over maps and images. Bytes per image are the
layout's (before compression) and the store's query arrays on disk. Then the bytes per image
of real SD3-medium and FLUX.1 shapes at 1024² (float16, the default), from the layer shapes.

    PYTHONPATH=src python benchmarks/bench_mmdit_presets.py [--steps 4] [--out DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
PIPELINES = {"sd3": ROOT / "tests/data/online/sd3/pipeline", "flux": ROOT / "tests/data/online/flux/pipeline"}
GUIDANCE = {"sd3": 4.0, "flux": 3.5}
PROMPTS = ["a robot in the rain", "a red house by the sea", "a cat on a sofa"]
WORDS = ["robot", "house", "cat", "rain"]
#: real shapes at 1024² (the models' configs): blocks, heads, head dim, image tokens, steps,
#: conditioning width, context tokens (CLIP + T5 / T5) and features
REAL = {
    "SD3-medium": dict(family="sd3", blocks=24, heads=24, head_dim=64, grid=(64, 64), steps=28, temb=1536,
                       context=(77 + 256, 4096)),
    "FLUX.1-dev": dict(family="flux", blocks=19, heads=24, head_dim=128, grid=(64, 64), steps=28, temb=3072,
                       context=(512, 4096)),
    "FLUX.1-schnell": dict(family="flux", blocks=19, heads=24, head_dim=128, grid=(64, 64), steps=4, temb=3072,
                           context=(256, 4096)),
}


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def _deviation(full: np.ndarray, other: np.ndarray, top: float = 0.1) -> tuple[float, float]:
    """Mean cosine similarity and top-``top`` IoU of maps ``(n, y, x)`` against the full ones."""
    a, b = full.reshape(len(full), -1).astype(np.float64), other.reshape(len(other), -1).astype(np.float64)
    cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)
    k = max(1, int(round(top * a.shape[1])))
    ious = []
    for x, y in zip(a, b):
        sx, sy = set(np.argsort(-x)[:k]), set(np.argsort(-y)[:k])
        ious.append(len(sx & sy) / len(sx | sy))
    return float(cos.mean()), float(np.mean(ious))


def bench_tiny(family: str, steps: int, root: Path) -> list[dict]:
    from ovstore.analyze import MapConfig, compute_maps
    from ovstore.analyze.context import compute_context_maps
    from ovstore.capture import CaptureConfig, build_requests, capture, load_pipeline
    from ovstore.families import family_for_pipeline
    from ovstore.store import open_store

    pipe, identity = load_pipeline(str(PIPELINES[family]))
    presets = family_for_pipeline(pipe).presets
    g = GUIDANCE[family]
    requests = build_requests([(p, None, s) for s, p in enumerate(PROMPTS)], guidance=g, num_inference_steps=steps)
    rows, reference = [], None
    for preset in presets:
        out = root / f"{family}-{preset}.zarr"
        start = time.perf_counter()
        capture(pipe, identity, requests, out, config=CaptureConfig(
            num_inference_steps=steps, guidance=g, height=64, width=64, branch="cond", dtype="float32",
            preset=preset, max_sequence_length=16))
        seconds = time.perf_counter() - start
        store = open_store(out)
        layout, summary = store.layout, store.summary()
        config = MapConfig(branch="cond")
        context = compute_context_maps(store, config=config).values
        words = compute_maps(store, WORDS, config=config)
        maps = {"context": context.reshape(-1, *context.shape[-2:]),
                "words": words.values.reshape(-1, *words.values.shape[-2:])}
        if reference is None:
            reference = maps
        row = dict(family=family, preset=preset, blocks=len(layout.layers), calls=f"{layout.n_steps}/{layout.num_unet_calls}",
                   raw=layout.query_bytes_per_image() + layout.context_bytes_per_image(),
                   disk=summary.query_bytes_on_disk / summary.n_complete, seconds=seconds / len(PROMPTS))
        row["ctx_cos"], row["ctx_iou"] = _deviation(reference["context"], maps["context"])
        row["word_cos"], row["word_iou"] = _deviation(reference["words"], maps["words"])
        rows.append(row)
    return rows


def real_bytes() -> list[tuple[str, str, int, int, int]]:
    """(model, preset, blocks kept, stored calls, bytes per image before compression) of real
    shapes: the tiny pipeline's layout with real-shaped layers (the store's own arithmetic)."""
    from ovstore.capture import PRESETS, CaptureConfig, load_pipeline, plan_capture
    from ovstore.families import family_for_pipeline
    from ovstore.selection import resolve_indices

    rows = []
    for model, shape in REAL.items():
        pipe, identity = load_pipeline(str(PIPELINES[shape["family"]]))
        family = family_for_pipeline(pipe)
        g = GUIDANCE[shape["family"]]
        base, _ = plan_capture(pipe, identity, CaptureConfig(num_inference_steps=2, guidance=g, branch="cond",
                                                             height=64, width=64, dtype="float16"))
        h, w = shape["grid"]
        block = dataclasses.replace(base.layers[0], heads=shape["heads"], head_dim=shape["head_dim"], height=h, width=w)
        for preset in family.presets:
            config = CaptureConfig(num_inference_steps=shape["steps"], guidance=g, branch="cond", preset=preset)
            n = shape["blocks"]
            if config.first_blocks:
                a, b = config.first_blocks
                n = -(-n * a // b)
            calls = resolve_indices(config.call_spec, shape["steps"], what="call")
            layout = dataclasses.replace(
                base, layers=tuple(dataclasses.replace(block, name=f"transformer_blocks.{i}.attn") for i in range(n)),
                height=1024, width=1024, latent_height=128, latent_width=128, num_unet_calls=shape["steps"],
                calls=tuple(calls), conditioning=shape["temb"],
                context=dataclasses.replace(base.context, length=shape["context"][0], features=shape["context"][1]))
            rows.append((model, preset, n, len(calls), layout.query_bytes_per_image() + layout.context_bytes_per_image()))
        assert set(family.presets) <= set(PRESETS)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--out", type=Path, default=None, help="keep the stores here (default: a temporary folder)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.out or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        print("| family | preset | blocks | calls | bytes/image raw | queries on disk | context maps cos / top-10% IoU "
              "| word maps cos / top-10% IoU | capture s/image |")
        print("|---|---|---|---|---|---|---|---|---|")
        for family in PIPELINES:
            for r in bench_tiny(family, args.steps, root):
                print(f"| {r['family']} (tiny) | {r['preset']} | {r['blocks']} | {r['calls']} | {_human(r['raw'])} | "
                      f"{_human(r['disk'])} | {r['ctx_cos']:.4f} / {r['ctx_iou']:.3f} | "
                      f"{r['word_cos']:.4f} / {r['word_iou']:.3f} | {r['seconds']:.2f} |")
    print()
    print("| model (1024², float16) | preset | blocks | calls | bytes/image before compression |")
    print("|---|---|---|---|---|")
    for model, preset, n, calls, size in real_bytes():
        print(f"| {model} | {preset} | {n} | {calls} | {_human(size)} |")


if __name__ == "__main__":
    main()

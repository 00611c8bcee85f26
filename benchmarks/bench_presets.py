"""Storage presets: bytes per image, capture overhead (generation with capture / without, same
run) and the effect on maps (deviation of max-normalised maps from the full preset). Run:

    python benchmarks/bench_presets.py [--images 4] [--repeats 3]
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "data" / "golden" / "tiny-sd15"
ATTRIBUTIONS = ["a cat and a sofa", "a dog", "furniture", "an animal in a room"]


def normalised(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    t = torch.from_numpy(maps)
    n, k, h, w = t.shape
    if (h, w) != size:
        t = F.interpolate(t.reshape(n * k, 1, h, w), size=size, mode="bilinear", align_corners=False).reshape(n, k, *size)
    return (t / t.amax(dim=(-2, -1), keepdim=True)).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)

    from ovstore.analyze import compute_maps, load_text_encoder
    from ovstore.capture import PRESETS, CaptureConfig, build_requests, capture, load_pipeline
    from ovstore.store import open_store

    pipe, identity = load_pipeline(str(TINY))
    requests = build_requests([(f"a photo of a cat number {i}", None, None) for i in range(args.images)],
                              num_inference_steps=args.steps)
    tmp = Path(tempfile.mkdtemp())

    def plain() -> float:
        t0 = time.perf_counter()
        for r in requests:
            pipe(prompt=[r.prompt], negative_prompt=[r.negative_prompt], num_inference_steps=args.steps,
                 generator=[torch.Generator("cpu").manual_seed(r.seed)], output_type="np")
        return time.perf_counter() - t0

    print(f"machine: {platform.machine()}, 1 torch thread; tiny pipeline, {args.images} images x {args.steps} steps; "
          f"overhead = median over {args.repeats} alternating repeats")
    print("| preset | dtype | query MB/image | ratio to full | overhead (with/without) | max dev | mean dev |")
    print("|---|---|---:|---:|---:|---:|---:|")
    full_bytes, full_maps = None, None
    encoder = None
    for preset in PRESETS:
        for dtype in ("float16", "float32"):
            ratios, store_path = [], None
            for rep in range(args.repeats):
                base = plain()
                store_path = tmp / f"{preset}-{dtype}-{rep}.zarr"
                t0 = time.perf_counter()
                capture(pipe, identity, requests, store_path,
                        config=CaptureConfig(num_inference_steps=args.steps, dtype=dtype, preset=preset))
                ratios.append((time.perf_counter() - t0) / base)
            store = open_store(store_path)
            per_image = store.summary().query_bytes_on_disk / args.images
            encoder = encoder or load_text_encoder(store.layout.model)
            maps = compute_maps(store, ATTRIBUTIONS, text_encoder=encoder).values
            size = (store.layout.latent_height, store.layout.latent_width)
            norm = normalised(maps, size)
            if full_maps is None:
                full_bytes, full_maps = per_image, norm
            dev = np.abs(norm - full_maps)
            print(f"| {preset} | {dtype} | {per_image / 1e6:.3f} | {per_image / full_bytes:.2f} | "
                  f"{float(np.median(ratios)):.3f} | {dev.max():.3f} | {dev.mean():.4f} |")


if __name__ == "__main__":
    main()

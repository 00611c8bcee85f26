"""Bytes per image, write and read time of each query codec preset, on real activations of
the tiny pipeline (float16 and float32 storage). Run:

    python benchmarks/bench_storage.py [--images 4]
"""

from __future__ import annotations

import argparse
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "data" / "golden" / "tiny-sd15"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(1)

    from ovstore.capture import CaptureConfig, build_requests, capture, load_pipeline
    from ovstore.store import open_store
    from ovstore.store.format import CODEC_PRESETS

    pipe, identity = load_pipeline(str(TINY))
    requests = build_requests([(f"a photo of a cat number {i}", None, None) for i in range(args.images)],
                              num_inference_steps=10)
    tmp = Path(tempfile.mkdtemp())
    print(f"machine: {platform.machine()}, 1 torch thread, {args.images} images of the tiny pipeline, 10 steps")
    print("| dtype | codec | query bytes/image | ratio | capture s/image | read ms/image |")
    print("|---|---|---:|---:|---:|---:|")
    for dtype in ("float16", "float32"):
        for codec in CODEC_PRESETS:
            out = tmp / f"{dtype}-{codec}.zarr"
            t0 = time.perf_counter()
            capture(pipe, identity, requests, out,
                    config=CaptureConfig(num_inference_steps=10, dtype=dtype, codec=codec))
            t_capture = (time.perf_counter() - t0) / args.images
            store = open_store(out)
            summary = store.summary()
            t0 = time.perf_counter()
            for i in range(args.images):
                for info in store.layers:
                    store.queries(info.name, i)
            t_read = (time.perf_counter() - t0) / args.images
            per_image = summary.query_bytes_on_disk / args.images
            print(f"| {dtype} | {codec} | {per_image / 1e6:.3f} MB | {summary.compression_ratio:.3f} | "
                  f"{t_capture:.3f} | {t_read * 1e3:.1f} |")
            shutil.rmtree(out)


if __name__ == "__main__":
    main()

"""Labelling throughput (images/s) for 20 classes, 1 vs 2 Dask workers, side by side:
on a store of the tiny pipeline (or any --store, e.g. the toy-world evaluation set) and on an
SD-1.5-shaped store. Run:

    python benchmarks/bench_label.py [--images 200] [--sd15-images 4] [--store STORE]
"""

from __future__ import annotations

import argparse
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "data" / "golden" / "tiny-sd15"
CLASSES = ("cat dog person car tree house sofa chair table bird horse boat bottle bus cow sheep train "
           "plant bicycle motorbike").split()


def timed_label(store: Path, workers: int, tmp: Path) -> float:
    from ovstore.label import LabelConfig, label_store
    from ovstore.store import open_store

    out = tmp / f"labels-{store.stem}-{workers}"
    shutil.rmtree(out, ignore_errors=True)
    n = len(open_store(store).complete_images())
    t0 = time.perf_counter()
    label_store(store, out, LabelConfig(classes=tuple(CLASSES)), workers=workers, partition_size=8)
    return n / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--sd15-images", type=int, default=4)
    parser.add_argument("--sd15-calls", type=int, default=10)
    parser.add_argument("--store", type=Path, default=None, help="label this store instead of a new tiny one")
    args = parser.parse_args()
    torch.set_num_threads(1)

    from ovstore.capture import CaptureConfig, build_requests, capture, load_pipeline
    from sd15_shaped import make_sd15_store, make_text_encoder_dir

    tmp = Path(tempfile.mkdtemp())
    store = args.store
    if store is None:
        store = tmp / "tiny.zarr"
        pipe, identity = load_pipeline(str(TINY))
        requests = build_requests([(f"a photo of a {CLASSES[i % 20]} and a {CLASSES[(3 * i) % 20]}", None, None)
                                   for i in range(args.images)], num_inference_steps=10)
        capture(pipe, identity, requests, store, config=CaptureConfig(num_inference_steps=10, batch_size=8))
    sd15 = make_sd15_store(tmp / "sd15.zarr", make_text_encoder_dir(tmp / "clip-l"), n_images=args.sd15_images,
                           n_calls=args.sd15_calls)
    print(f"machine: {platform.machine()}, {__import__('os').cpu_count()} cores; workers are processes with 1 thread")
    print("| store | images | 1 worker images/s | 2 workers images/s | ratio |")
    print("|---|---:|---:|---:|---:|")
    for label, path, n in ((f"{store.name}", store, None), (f"SD-1.5-shaped, {args.sd15_calls} calls", sd15, args.sd15_images)):
        one = timed_label(path, 1, tmp)
        two = timed_label(path, 2, tmp)
        from ovstore.store import open_store

        count = len(open_store(path).complete_images())
        print(f"| {label} | {count} | {one:.2f} | {two:.2f} | {two / one:.2f}x |")


if __name__ == "__main__":
    main()

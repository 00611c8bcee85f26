"""Chunk layout of the query arrays: the store's v1 layout against two alternatives, with the
same codec, on one layer's worth of queries per image. Run:

    python benchmarks/bench_chunking.py [--images 8] [--steps 20] [--repeats 3]

Layouts (dimensions as in the store: image, step, head, y, x, channel; one branch):

- v1: one shard per (image, layer), inner chunks of as many steps as fit 1 MiB (the store's
  layout: one step per chunk at most SD-1.5 layer sizes, all steps on small models);
- one shard per (image, layer), one inner chunk per step (where that differs from v1);
- one chunk per (image, layer) holding every step, no shard;
- one chunk per (image, layer, step), no shard (a file per step).

Measured per image, best of ``--repeats``: write time, reads of all steps, of 5 consecutive
steps of 20, and of one step. Queries are random normal float16 (scale 2, like activations),
codec blosc-zstd1-bitshuffle + CRC32C (the default). The figures are in docs/store-format.md.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np


def layouts(steps: int, heads: int, h: int, w: int, c: int) -> dict[str, dict]:
    from ovstore.store.format import LayerInfo, query_chunk_steps

    info = LayerInfo(name="layer", block="up", level=0, height=h, width=w, heads=heads, head_dim=c, scale=1.0,
                     key_input_dim=768)
    calls = query_chunk_steps(info, steps, "float16")
    step_chunk = (1, 1, heads, h, w, c)
    image_chunk = (1, steps, heads, h, w, c)
    store_rule = {}
    if calls > 1:
        store_rule = {f"shard per (image, layer), inner chunk of {calls} steps (v1: steps per ≤ 1 MiB)": {
            "chunks": (1, calls, heads, h, w, c), "shards": image_chunk}}
    return {
        **store_rule,
        f"shard per (image, layer), inner chunk per step{' (v1)' if calls == 1 else ''}": {
            "chunks": step_chunk, "shards": image_chunk},
        "one chunk per (image, layer), all steps, no shard": {"chunks": image_chunk},
        "one chunk per (image, layer, step), no shard": {"chunks": step_chunk},
    }


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--size", type=int, default=32, help="layer resolution (size x size)")
    parser.add_argument("--channels", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import zarr

    from ovstore.store.format import DEFAULT_CODEC, query_codecs

    shape = (args.steps, args.heads, args.size, args.size, args.channels)
    rng = np.random.default_rng(0)
    data = [(rng.standard_normal(shape, dtype=np.float32) * 2).astype(np.float16) for _ in range(args.images)]
    mb = data[0].nbytes / 1e6
    part = slice(args.steps // 2, args.steps // 2 + max(1, args.steps // 4))
    print(f"machine: {platform.processor() or platform.machine()}; zarr {zarr.__version__}; one layer of "
          f"{args.steps} steps x {args.heads} heads x {args.size}x{args.size} x {args.channels} channels, float16, "
          f"{mb:.1f} MB per image, {args.images} images, {DEFAULT_CODEC} + CRC32C, best of {args.repeats}\n")
    print(f"| layout | files per image and layer | write s/image | read all steps ms | "
          f"read {part.stop - part.start} of {args.steps} steps ms | read 1 step ms |")
    print("|---|---:|---:|---:|---:|---:|")
    tmp = Path(tempfile.mkdtemp())
    try:
        for name, chunking in layouts(*shape[:2], args.size, args.size, args.channels).items():
            path = tmp / "layout.zarr"

            def write() -> None:
                shutil.rmtree(path, ignore_errors=True)
                arr = zarr.create_array(store=str(path), shape=(args.images, *shape), dtype="float16",
                                        compressors=query_codecs(DEFAULT_CODEC), fill_value=0, **chunking)
                for i, q in enumerate(data):
                    arr[i] = q

            t_write = best(write, args.repeats) / args.images
            arr = zarr.open_array(str(path), mode="r")
            files = sum(1 for p in path.rglob("*") if p.is_file() and p.name != "zarr.json") / args.images
            t_all = best(lambda: [arr[i] for i in range(args.images)], args.repeats) / args.images
            t_part = best(lambda: [arr[i, part] for i in range(args.images)], args.repeats) / args.images
            t_one = best(lambda: [arr[i, args.steps // 3] for i in range(args.images)], args.repeats) / args.images
            assert np.array_equal(arr[args.images - 1], data[-1])
            print(f"| {name} | {files:.0f} | {t_write:.3f} | {t_all * 1e3:.1f} | {t_part * 1e3:.1f} | "
                  f"{t_one * 1e3:.1f} |")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

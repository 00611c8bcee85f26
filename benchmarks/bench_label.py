"""Labelling throughput (images/s) of ``label_store`` (what ``ovstore label`` runs) for 20 classes,
1 vs 2 Dask workers, side by side: on a store of ≥ 200 toy-world images (``--store``; made by
``benchmarks/bench_toyworld.py``) and on an SD-1.5-shaped store. Run on an idle machine:

    python benchmarks/bench_label.py --store TOY_EVAL.zarr [--sd15-images 8] [--workers 1,2]

Each worker count gets its own LocalCluster (processes, 1 thread each), started and warmed up
(one image labelled, so every worker has imported torch and loaded the text encoder) before the
clock starts; the timed run labels every complete image into a fresh folder, default settings
(separate mode, min-max, threshold 0.6), partitions of 8 images (fewer on a store too small to give
every worker two). Cluster start-up is reported
apart. The load average before and after is printed: figures taken on a busy machine say
nothing about scaling. ``--check`` labels 2 images per store with 1 worker, to try the script.
A ``--store`` that does not exist yet is captured first as the toy-world evaluation set
(``--images`` captions of seed 2024, as ``bench_label_quality.py`` and ``bench_toyworld.py`` make
it); without ``--store`` a store of the random tiny pipeline is captured instead.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
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


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(l.split(":", 1)[1].strip() for l in out.splitlines() if l.startswith("Model name"))
    except Exception:
        return platform.processor() or platform.machine()


def _load_encoder(store_path: str) -> None:
    import json

    from ovstore.label.dataset import _encoder
    from ovstore.store import open_store

    _encoder(json.dumps(open_store(store_path).layout.model.to_json(), sort_keys=True), None, "cpu")


def timed_label(store: Path, workers: int, tmp: Path, images: list[int]) -> tuple[float, float]:
    """(seconds to start and warm up the cluster, images/s of the timed run)."""
    from distributed import Client, LocalCluster

    from ovstore.label import LabelConfig, label_store

    config = LabelConfig(classes=tuple(CLASSES))
    t0 = time.perf_counter()
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        client.run(_load_encoder, str(store))  # every worker process: imports and the text encoder
        warm = tmp / f"warm-{store.stem}-{workers}"
        shutil.rmtree(warm, ignore_errors=True)
        label_store(store, warm, config, images=images[:workers], scheduler=client, partition_size=1)
        startup = time.perf_counter() - t0
        out = tmp / f"labels-{store.stem}-{workers}"
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        # partitions of 8 images, or fewer so that every worker has work on a small store
        partition = max(1, min(8, len(images) // (2 * workers)))
        result = label_store(store, out, config, images=images, scheduler=client, partition_size=partition)
        seconds = time.perf_counter() - t0
    assert len(result.labelled) == len(images)
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(warm, ignore_errors=True)
    return startup, len(images) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, default=None, help="store to label, e.g. the toy-world evaluation set")
    parser.add_argument("--images", type=int, default=200, help="images of a store this script captures")
    parser.add_argument("--sd15-images", type=int, default=8)
    parser.add_argument("--sd15-calls", type=int, default=10)
    parser.add_argument("--workers", default="1,2", help="worker counts, comma-separated")
    parser.add_argument("--check", action="store_true", help="2 images per store, 1 worker: does the script run?")
    args = parser.parse_args()
    torch.set_num_threads(1)

    from ovstore.capture import CaptureConfig, build_requests, capture, load_pipeline
    from ovstore.store import open_store
    from sd15_shaped import make_sd15_store, make_text_encoder_dir

    tmp = Path(tempfile.mkdtemp())
    store = args.store
    if store is not None and not (store / "zarr.json").exists():
        from bench_label_quality import make_store

        make_store(store, args.images, 2024)
    if store is None:
        store = tmp / "tiny.zarr"
        pipe, identity = load_pipeline(str(TINY))
        requests = build_requests([(f"a photo of a {CLASSES[i % 20]} and a {CLASSES[(3 * i) % 20]}", None, None)
                                   for i in range(args.images)], num_inference_steps=10)
        capture(pipe, identity, requests, store, config=CaptureConfig(num_inference_steps=10, batch_size=8))
    sd15 = make_sd15_store(tmp / "sd15.zarr", make_text_encoder_dir(tmp / "clip-l"),
                           n_images=2 if args.check else args.sd15_images, n_calls=args.sd15_calls)
    workers = [1] if args.check else [int(w) for w in args.workers.split(",")]
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores ({platform.machine()}); Dask workers are processes "
          f"with 1 thread; load average before: {os.getloadavg()[0]:.2f}")
    print("| store | images | classes | " + " | ".join(f"{w} worker{'s' * (w > 1)} images/s" for w in workers)
          + " | " + " | ".join(f"start-up {w}w s" for w in workers) + (" | ratio |" if len(workers) == 2 else " |"))
    print("|---|---:|---:|" + "---:|" * (2 * len(workers)) + ("---:|" if len(workers) == 2 else ""))
    for label, path in ((f"{store.name} ({open_store(store).layout.model.id})", store),
                        (f"SD-1.5-shaped, {args.sd15_calls} calls", sd15)):
        images = open_store(path).complete_images()[: 2 if args.check else None]
        results = [timed_label(path, w, tmp, images) for w in workers]
        rates = " | ".join(f"{rate:.2f}" for _, rate in results)
        starts = " | ".join(f"{start:.1f}" for start, _ in results)
        ratio = f" | {results[1][1] / results[0][1]:.2f}x |" if len(results) == 2 else " |"
        print(f"| {label} | {len(images)} | {len(CLASSES)} | {rates} | {starts}{ratio}", flush=True)
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

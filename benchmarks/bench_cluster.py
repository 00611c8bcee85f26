"""`ovstore maps` over many images and prompts: in one process vs as a Dask job with 1 and 2
workers, side by side on one SD-1.5-shaped store (random contents, real layer shapes).

Each configuration runs in a fresh child process of this script, so that its peak memory is
its own: in-process, the child's peak resident set; on Dask, each worker's (read from the
workers after the job). Cluster start-up (worker processes importing torch) is timed apart
from the job. Outputs are checked equal to the in-process one. Run:

    python benchmarks/bench_cluster.py [--images 16] [--prompts 1000] [--calls 2] [--work /tmp/clbench]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def prompts(n: int) -> list[str]:
    from bench_maps import prompts as short_prompts

    return short_prompts(n)


def store(work: Path, n_images: int, n_calls: int) -> Path:
    from sd15_shaped import make_sd15_store, make_text_encoder_dir

    from ovstore.store import open_store

    path = work / f"sd15-{n_images}x{n_calls}.zarr"
    if not ((path / "zarr.json").exists() and len(open_store(path).complete_images()) == n_images):
        encoder = make_text_encoder_dir(work / "sd15-text-encoder")
        make_sd15_store(path, encoder, n_images=n_images, n_calls=n_calls)
    return path


def one(config: str, store_path: Path, out: Path, n_prompts: int) -> dict:
    """One configuration, in this (child) process."""
    import torch

    from ovstore.analyze import write_maps_job, write_maps_zarr

    torch.set_num_threads(1)
    texts = prompts(n_prompts)
    if config == "in-process":
        started = time.perf_counter()
        write_maps_zarr(store_path, texts, out)
        elapsed = time.perf_counter() - started
        return {"seconds": elapsed, "peak_mb": [resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024]}
    from distributed import Client, LocalCluster

    workers = int(config.split("-")[0])
    started = time.perf_counter()
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        client.run(lambda: __import__("ovstore.analyze"))
        startup = time.perf_counter() - started
        started = time.perf_counter()
        write_maps_job(store_path, texts, out, scheduler=client, partition_size=1)
        elapsed = time.perf_counter() - started
        peaks = client.run(lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"seconds": elapsed, "startup_s": startup, "peak_mb": sorted(peaks.values())}


def tree_equal(a: Path, b: Path) -> bool:
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    return files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file()) and \
        all((a / f).read_bytes() == (b / f).read_bytes() for f in files)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--prompts", type=int, default=1000)
    parser.add_argument("--calls", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("/tmp/clbench"))
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    path = store(args.work, args.images, args.calls)
    if args.one:
        out = args.work / f"maps-{args.one}.zarr"
        shutil.rmtree(out, ignore_errors=True)
        print(json.dumps(one(args.one, path, out, args.prompts)))
        return
    from ovstore.store import open_store

    s = open_store(path)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"python {platform.python_version()}; store {path.name}: {s.n_images} images x {s.layout.n_steps} calls, "
          f"{len(s.layers)} layers, {s.layout.height}x{s.layout.width}; {args.prompts} prompts of 1-8 words; "
          "1 torch thread per process")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    results = {}
    for config in ("in-process", "1-worker", "2-workers"):
        done = subprocess.run([sys.executable, __file__, "--one", config, "--images", str(args.images), "--prompts",
                               str(args.prompts), "--calls", str(args.calls), "--work", str(args.work)],
                              env=env, check=True, capture_output=True, text=True)
        results[config] = json.loads(done.stdout.strip().splitlines()[-1])
    reference = args.work / "maps-in-process.zarr"
    print("| run | images/s | job s | cluster start s | peak memory per process (MB) | output |")
    print("|---|---|---|---|---|---|")
    for config, r in results.items():
        same = "reference" if config == "in-process" else \
            ("identical" if tree_equal(reference, args.work / f"maps-{config}.zarr") else "DIFFERS")
        print(f"| {config} | {args.images / r['seconds']:.2f} | {r['seconds']:.1f} | "
              f"{r.get('startup_s', 0):.1f} | {', '.join(f'{m:.0f}' for m in r['peak_mb'])} | {same} |")


if __name__ == "__main__":
    main()

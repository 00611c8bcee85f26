"""`ovstore serve` latency: a new prompt over a page of 24 images, from the HTTP request to the
last byte of the answer, and a burst of concurrent requests.

    python benchmarks/bench_serve.py                       # toy world, 24 images, 200 prompts
    python benchmarks/bench_serve.py --sd15                # and an SD-1.5-shaped store (random weights)

The toy-world store is captured once with the embedded model `ovstore/toy-shapes` through the
capture API (24 toy-world captions, 20 steps, guidance 5, seed 0) into --work. The server runs as
`ovstore serve STORE --port 0` in its own process, as a user starts it (torch's default threads);
this process is the client. Every prompt is new to the server (none repeats), so each request
encodes its text and computes its maps; the page's prepared queries are in the server's cache
after the first request, which is timed apart ("cold").
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import quote

ROOT = Path(__file__).resolve().parents[1]


def toy_prompts(n: int, seed: int = 0) -> list[str]:
    """``n`` different toy-world prompts: 1–3 phrases of a colour and a noun (shape, synonym or
    hypernym) with the captions' joiners, or a bare word."""
    from ovstore.toyworld import COLORS, JOINERS, NOUNS

    rng = random.Random(seed)
    nouns, seen, out = sorted(NOUNS), set(), []
    while len(out) < n:
        if rng.random() < 0.1:
            text = rng.choice([*nouns, *COLORS])
        else:
            phrases = [f"a {rng.choice(COLORS)} {rng.choice(nouns)}" for _ in range(rng.randint(1, 3))]
            text = phrases[0]
            for phrase in phrases[1:]:
                text += rng.choice(JOINERS) + phrase
        if text not in seen:
            seen.add(text)
            out.append(text)
    return out


def sd15_prompts(n: int, seed: int = 0) -> list[str]:
    words = ("cat dog sofa car tree house person bird horse boat table chair lamp window road sky field "
             "mountain river flower red blue green small large old wooden").split()
    rng = random.Random(seed)
    seen, out = set(), []
    while len(out) < n:
        text = "a " + " ".join(rng.choice(words) for _ in range(rng.randint(1, 8)))
        if text not in seen:
            seen.add(text)
            out.append(text)
    return out


def toy_store(work: Path, n_images: int = 24) -> Path:
    """The toy-world store of the benchmark, captured once through the capture API."""
    from ovstore.capture import run_capture
    from ovstore.store import open_store
    from ovstore.toyworld import sample_scenes

    path = work / f"toy{n_images}.zarr"
    if (path / "zarr.json").exists() and len(open_store(path).complete_images()) == n_images:
        return path
    captions = [scene.caption for scene in sample_scenes(17, n_images)]
    started = time.perf_counter()
    run_capture(prompts=captions, steps=20, guidance=5.0, seed=0, batch_size=8, out=str(path),
                resume=path.exists())
    print(f"captured {n_images} toy-world images in {time.perf_counter() - started:.1f} s -> {path}")
    return path


def sd15_store(work: Path, n_images: int, n_calls: int) -> Path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from sd15_shaped import make_sd15_store, make_text_encoder_dir

    from ovstore.store import open_store

    path = work / f"sd15-{n_images}x{n_calls}.zarr"
    if (path / "zarr.json").exists() and len(open_store(path).complete_images()) == n_images:
        return path
    encoder = make_text_encoder_dir(work / "sd15-text-encoder")
    started = time.perf_counter()
    make_sd15_store(path, encoder, n_images=n_images, n_calls=n_calls)
    print(f"wrote the SD-1.5-shaped store ({n_images} images, {n_calls} calls) in "
          f"{time.perf_counter() - started:.1f} s -> {path}")
    return path


class Server:
    """`ovstore serve STORE --port 0` in a child process."""

    def __init__(self, store: Path, *extra: str) -> None:
        script = Path(sys.executable).with_name("ovstore")  # this environment's console script
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
        started = time.perf_counter()
        self.process = subprocess.Popen([str(script), "serve", str(store), "--port", "0", *extra], env=env,
                                        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        for line in self.process.stderr:
            found = re.search(r"at (http://\S+/)", line)
            if found:
                self.url = found.group(1)
                break
        else:
            raise SystemExit(f"the server did not start (exit {self.process.wait()})")
        self.startup_s = time.perf_counter() - started
        threading.Thread(target=self.process.stderr.read, daemon=True).start()  # keep its pipe drained

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


def fetch(url: str, timeout: float = 120) -> tuple[int, bytes, float]:
    """Status, body and seconds from sending the request to reading the last byte."""
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            body = response.read()
            status = response.status
    except urllib.error.HTTPError as exc:
        body, status = exc.read(), exc.code
    return status, body, time.perf_counter() - started


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def latency(server: Server, prompts: list[str], per_page: int) -> dict[str, float]:
    status, body, cold = fetch(f"{server.url}api/maps?text={quote('a warm up prompt')}&page=0&per_page={per_page}")
    assert status == 200, body[:200]
    answer = json.loads(body)
    times, server_ms, sizes = [], [], []
    for text in prompts:
        status, body, seconds = fetch(f"{server.url}api/maps?text={quote(text)}&page=0&per_page={per_page}")
        assert status == 200, (text, body[:200])
        times.append(seconds * 1000)
        server_ms.append(json.loads(body)["elapsed_ms"])
        sizes.append(len(body))
    png = [fetch(f"{server.url}api/map.png?image={k % per_page}&text={quote(t)}&token=1")[2] * 1000
           for k, t in enumerate(prompts[:20])]
    return {"images": len(answer["images"]), "tokens_map": answer["size"], "cold_ms": cold * 1000,
            "median_ms": statistics.median(times), "p95_ms": percentile(times, 95), "max_ms": max(times),
            "server_median_ms": statistics.median(server_ms), "bytes_median": statistics.median(sizes),
            "png_median_ms": statistics.median(png), "startup_s": server.startup_s}


def burst(server: Server, prompts: list[str], n: int = 100) -> dict[str, float]:
    """``n`` requests sent at once from one client (threads released together)."""
    barrier = threading.Barrier(n)

    def one(text: str) -> tuple[int, float]:
        barrier.wait(timeout=30)
        status, _, seconds = fetch(f"{server.url}api/maps?text={quote(text)}&page=0&per_page=24", timeout=120)
        return status, seconds * 1000

    started = time.perf_counter()
    with ThreadPoolExecutor(n) as pool:
        results = list(pool.map(one, prompts[:n]))
    wall = time.perf_counter() - started
    ok = [ms for status, ms in results if status == 200]
    refused = [ms for status, ms in results if status == 503]
    after = fetch(f"{server.url}api/info")[0]
    return {"sent": n, "ok": len(ok), "refused_503": len(refused),
            "other": n - len(ok) - len(refused), "wall_s": wall,
            "ok_median_ms": statistics.median(ok) if ok else float("nan"), "ok_max_ms": max(ok, default=float("nan")),
            "refused_max_ms": max(refused, default=float("nan")), "info_after": after}


def report(name: str, lat: dict, load: dict | None) -> None:
    print(f"\n## {name}")
    print(f"server start (process, imports, text encoder, key projections): {lat['startup_s']:.1f} s; "
          f"page of {lat['images']} images, maps {lat['tokens_map'][0]}x{lat['tokens_map'][1]}")
    print("| request | median ms | p95 ms | max ms |")
    print("|---|---|---|---|")
    print(f"| new prompt, page of {lat['images']} (`/api/maps`, {lat['bytes_median'] / 1024:.0f} KiB) | "
          f"{lat['median_ms']:.1f} | {lat['p95_ms']:.1f} | {lat['max_ms']:.1f} |")
    print(f"| of which in the server (parse to JSON) | {lat['server_median_ms']:.1f} | | |")
    print(f"| first request, cold cache | {lat['cold_ms']:.1f} | | |")
    print(f"| one token's overlay PNG (`/api/map.png`, 20 requests) | {lat['png_median_ms']:.1f} | | |")
    if load:
        print(f"burst of {load['sent']} concurrent requests: {load['ok']} answered 200 (median "
              f"{load['ok_median_ms']:.0f} ms, max {load['ok_max_ms']:.0f} ms), {load['refused_503']} refused 503 "
              f"(within {load['refused_max_ms']:.0f} ms), {load['other']} other, in {load['wall_s']:.1f} s; "
              f"/api/info after: {load['info_after']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/ovstore-bench-serve"),
                        help="folder for the benchmark's stores (kept between runs)")
    parser.add_argument("--prompts", type=int, default=200)
    parser.add_argument("--per-page", type=int, default=24)
    parser.add_argument("--sd15", action="store_true", help="also an SD-1.5-shaped store")
    parser.add_argument("--sd15-images", type=int, default=24)
    parser.add_argument("--sd15-calls", type=int, default=2)
    parser.add_argument("--sd15-prompts", type=int, default=30)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    import torch

    torch.set_num_threads(1)  # the client's capture and store writing; the server chooses its own
    store = toy_store(args.work)
    prompts = toy_prompts(args.prompts + 100)
    server = Server(store)
    try:
        lat = latency(server, prompts[:args.prompts], args.per_page)
        load = burst(server, prompts[args.prompts:])
    finally:
        server.close()
    report(f"toy world: {store.name}, {len(prompts[:args.prompts])} new prompts", lat, load)
    if args.sd15:
        store = sd15_store(args.work, args.sd15_images, args.sd15_calls)
        server = Server(store, "--cache-mb", "4096")  # the page's prepared queries: 92 MB an image at 2 calls
        try:
            lat = latency(server, sd15_prompts(args.sd15_prompts), min(args.per_page, args.sd15_images))
        finally:
            server.close()
        report(f"SD-1.5-shaped: {store.name} ({args.sd15_images} images, {args.sd15_calls} stored calls, "
               f"{len(sd15_prompts(args.sd15_prompts))} new prompts)", lat, None)


if __name__ == "__main__":
    main()

"""Seconds per epoch of token optimization: ovstore (cached queries, one batched product per
layer) vs a reference-style loop over layers and UNet calls, side by side in one run, on the
tiny pipeline and on an SD-1.5-shaped store (random weights). Run:

    python benchmarks/bench_optimize.py [--epochs 5] [--sd15-calls 10]
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "data" / "golden" / "tiny-sd15"


def reference_style_epochs(store, init: torch.Tensor, mask: torch.Tensor, epochs: int) -> float:
    """Seconds per epoch of the straightforward recipe: loops over layers and calls."""
    layers = [l for l in store.layers if l.block != "mid"]
    queries = {l.name: torch.from_numpy(store.queries(l.name, 0)).float() for l in layers}
    weights = {l.name: torch.from_numpy(store.key_projection(l.name)[0]) for l in layers}
    target = max((l.height, l.width) for l in layers)
    x = torch.nn.Parameter(init.clone())
    opt = torch.optim.SGD([x], lr=100)
    times = []
    for _ in range(epochs + 1):  # as on ovstore's side: the first epoch (warm-up) is not counted
        opt.zero_grad()
        total = 0
        for l in layers:
            k = F.linear(x, weights[l.name]).view(2, l.heads, l.head_dim).transpose(0, 1)
            q = queries[l.name]
            acc = 0
            for t in range(q.shape[0]):
                attn = (q[t].reshape(l.heads, -1, l.head_dim) @ k.transpose(1, 2) * l.scale).softmax(-1)
                acc = acc + attn.sum(0)
            m = acc.T.reshape(1, 2, l.height, l.width)
            if (l.height, l.width) != target:
                m = F.interpolate(m, size=target, mode="bilinear", align_corners=False)
            total = total + m
        total = F.interpolate(total, size=mask.shape, mode="bilinear", align_corners=False)
        total = (total - total.min()) / (total.max() - total.min())
        F.cross_entropy(total, mask[None].long()).backward()
        opt.step()
        times.append(time.perf_counter())
    return (times[-1] - times[0]) / epochs


def ours_epochs(store, mask: np.ndarray, encoder, epochs: int) -> float:
    from ovstore.optimize import OptimizeConfig, TokenTask, optimize_tokens

    times = []
    optimize_tokens(store, [TokenTask("cat", (0,), (mask,))], config=OptimizeConfig(epochs=epochs + 1),
                    text_encoder=encoder, progress=lambda e, l: times.append(time.perf_counter()))
    return (times[-1] - times[0]) / epochs  # excludes loading and the first epoch's warm-up


def run(label: str, store, encoder, epochs: int) -> None:
    from ovstore.optimize import initial_rows

    h, w = store.layout.height, store.layout.width
    mask = np.zeros((h, w), bool)
    mask[h // 6:h // 2, w // 8:w // 2] = True
    init = initial_rows(encoder, "cat", "A photograph of a {}")
    ours = ours_epochs(store, mask, encoder, epochs)
    base = reference_style_epochs(store, init, torch.from_numpy(mask), epochs)
    print(f"| {label} | {ours:.3f} | {base:.3f} | {base / ours:.1f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--sd15-calls", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from ovstore.analyze import load_text_encoder
    from ovstore.capture import CaptureConfig, build_requests, capture, load_pipeline
    from ovstore.store import open_store
    from sd15_shaped import make_sd15_store, make_text_encoder_dir

    tmp = Path(tempfile.mkdtemp())
    pipe, identity = load_pipeline(str(TINY))
    capture(pipe, identity, build_requests([("a photo of a cat on a sofa", None, 0)], num_inference_steps=10),
            tmp / "tiny.zarr", config=CaptureConfig(num_inference_steps=10))
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}")
    print("| store | ovstore s/epoch | reference-style s/epoch | speed-up |")
    print("|---|---:|---:|---:|")
    tiny = open_store(tmp / "tiny.zarr")
    run("tiny pipeline (6 layers, 11 calls, 64x64 mask)", tiny, load_text_encoder(tiny.layout.model), args.epochs)
    encoder_dir = make_text_encoder_dir(tmp / "clip-l")
    sd15 = open_store(make_sd15_store(tmp / "sd15.zarr", encoder_dir, n_calls=args.sd15_calls))
    run(f"SD-1.5-shaped (15 layers, {args.sd15_calls} calls, 512x512 mask)", sd15,
        load_text_encoder(sd15.layout.model), args.epochs)


if __name__ == "__main__":
    main()

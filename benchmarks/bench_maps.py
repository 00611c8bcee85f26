"""Maps for many attribution prompts on one stored image: ovstore's batched engine vs a
straightforward per-prompt loop written like the reference implementation, side by side.

Both sides include text encoding and read the same stored queries (already in memory for the
baseline, read from the store by ovstore). ``--sd15`` adds an SD-1.5-shaped store (random
weights); ``--e2e N`` times whole processes (start-up included): ``ovstore maps`` with N
prompts vs this file run as a reference-style script on the same prompts. Run:

    python benchmarks/bench_maps.py [--counts 1 10 100 1000 10000] [--sd15] [--e2e 5000]
    python benchmarks/bench_maps.py --reference-script STORE PROMPTS_FILE   (the e2e baseline)
"""

from __future__ import annotations

import argparse
import platform
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "data" / "golden" / "tiny-sd15"
WORDS = ("cat dog sofa car tree house a the red blue green photo of on in and with small large "
         "wooden furniture animal street night sky person table chair window flower bird").split()


def prompts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 8))) for _ in range(n)]


def reference_style(store, encoder, texts: list[str]) -> np.ndarray:
    """One prompt at a time; per layer, a loop over UNet calls; heads batched (as the reference)."""
    layers = [l for l in store.layers if l.block != "mid"]
    queries = {l.name: torch.from_numpy(store.queries(l.name, 0)).float() for l in layers}
    weights = {l.name: torch.from_numpy(store.key_projection(l.name)[0]) for l in layers}
    target = max((l.height, l.width) for l in layers)
    out = []
    for text in texts:
        ids = encoder.tokenizer(text, padding=False)["input_ids"]
        with torch.no_grad():
            emb = encoder.model(torch.tensor([ids]))[0][0]
            total = 0
            for l in layers:
                k = F.linear(emb, weights[l.name]).view(-1, l.heads, l.head_dim).transpose(0, 1)
                q = queries[l.name]
                acc = 0
                for t in range(q.shape[0]):
                    qt = q[t].reshape(l.heads, -1, l.head_dim)
                    attn = (qt @ k.transpose(1, 2) * l.scale).softmax(dim=-1)  # (head, pixel, token)
                    acc = acc + attn.sum(0)
                m = acc.transpose(0, 1).reshape(1, -1, l.height, l.width)  # (1, token, h, w)
                if (l.height, l.width) != target:
                    m = F.interpolate(m, size=target, mode="bilinear", align_corners=False)
                total = total + m[0]
            out.append(total.numpy())
    return np.concatenate(out, axis=0)


def reference_script(store_path: str, prompts_file: str) -> None:
    """The end-to-end baseline process: load, then one prompt at a time."""
    from ovstore.analyze import load_text_encoder
    from ovstore.store import open_store

    store = open_store(store_path)
    texts = [l for l in Path(prompts_file).read_text().splitlines() if l.strip()]
    maps = reference_style(store, load_text_encoder(store.layout.model), texts)
    np.save(Path(prompts_file).with_suffix(".baseline.npy"), maps)


def table(label: str, store, encoder, counts: list[int], baseline_max: int) -> None:
    from ovstore.analyze import compute_maps

    compute_maps(store, prompts(4), text_encoder=encoder)  # warm-up
    reference_style(store, encoder, prompts(4))
    print(f"\n{label}\n")
    print("| prompts | ovstore s | ovstore prompts/s | baseline s | baseline prompts/s | speed-up | max abs diff |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for n in counts:
        texts = prompts(n, seed=n)
        t0 = time.perf_counter()
        ours = compute_maps(store, texts, text_encoder=encoder).values[0]
        t_ours = time.perf_counter() - t0
        if n <= args.baseline_max:
            t0 = time.perf_counter()
            base = reference_style(store, encoder, texts)
            t_base = time.perf_counter() - t0
            diff = float(np.abs(ours - base).max())
            print(f"| {n} | {t_ours:.3f} | {n / t_ours:.0f} | {t_base:.3f} | {n / t_base:.0f} | "
                  f"{t_base / t_ours:.1f}x | {diff:.1e} |")
        else:
            print(f"| {n} | {t_ours:.3f} | {n / t_ours:.0f} | - | - | - | - |")


def end_to_end(store_path: Path, n: int) -> None:
    import subprocess
    import sys

    prompts_file = store_path.parent / f"prompts-{n}.txt"
    prompts_file.write_text("\n".join(prompts(n, seed=7)) + "\n")
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    subprocess.run(["ovstore", "maps", str(store_path), "--attributions-file", str(prompts_file),
                    "--out", str(store_path.parent / "e2e.zarr")], check=True, env=env, capture_output=True)
    t_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    subprocess.run([sys.executable, __file__, "--reference-script", str(store_path), str(prompts_file)],
                   check=True, env=env, capture_output=True)
    t_base = time.perf_counter() - t0
    print(f"\nEnd to end, {n} prompts, whole processes (start-up, model load, text encoding, maps, writing):\n")
    print("| prompts | `ovstore maps` s | reference-style script s | speed-up |")
    print("|---:|---:|---:|---:|")
    print(f"| {n} | {t_ours:.1f} | {t_base:.1f} | {t_base / t_ours:.1f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", type=int, nargs="+", default=[1, 100, 1000])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--baseline-max", type=int, default=1000, help="largest count the baseline runs")
    parser.add_argument("--sd15", action="store_true", help="also an SD-1.5-shaped store (random weights)")
    parser.add_argument("--sd15-calls", type=int, default=10)
    parser.add_argument("--e2e", type=int, default=0, help="end-to-end process timing with this many prompts")
    parser.add_argument("--reference-script", nargs=2, metavar=("STORE", "PROMPTS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.reference_script:
        reference_script(*args.reference_script)
        return

    from ovstore.analyze import load_text_encoder
    from ovstore.capture import CaptureConfig, build_requests, capture, load_pipeline
    from ovstore.store import open_store

    tmp = Path(tempfile.mkdtemp()) / "bench.zarr"
    pipe, identity = load_pipeline(str(TINY))
    capture(pipe, identity, build_requests([("a photo of a cat on a sofa", None, 0)], num_inference_steps=10),
            tmp, config=CaptureConfig(num_inference_steps=10, dtype="float16"))
    store = open_store(tmp)
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch thread(s), "
          f"torch {torch.__version__}")
    table("Tiny pipeline (6 layers, 4 heads, 11 calls, latent 32x32)", store,
          load_text_encoder(store.layout.model), args.counts, args.baseline_max)
    if args.sd15:
        import sys

        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from sd15_shaped import make_sd15_store, make_text_encoder_dir

        sd15 = open_store(make_sd15_store(tmp.parent / "sd15.zarr", make_text_encoder_dir(tmp.parent / "clip-l"),
                                          n_calls=args.sd15_calls))
        table(f"SD-1.5-shaped (15 layers, 8 heads, {args.sd15_calls} calls, latent 64x64, CLIP-L text encoder)",
              sd15, load_text_encoder(sd15.layout.model), [c for c in args.counts if c <= 1000], min(args.baseline_max, 100))
    if args.e2e:
        end_to_end(tmp, args.e2e)


if __name__ == "__main__":
    main()

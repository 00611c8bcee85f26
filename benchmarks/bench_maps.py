"""Maps for many attribution prompts on one stored image: ovstore's batched engine vs a
straightforward per-prompt loop written like the reference implementation, side by side.

Both sides encode the prompts with the same text encoder and read the same stored queries
(the baseline holds them in memory, ovstore reads them from the store). The baseline runs
one prompt at a time with a Python loop over layers and UNet calls, heads batched, softmax
over the token axis (as the reference). Both use the same number of torch threads.

Besides the speed-up, each table states a bound that no exact implementation can beat on
this machine, measured in the same run:

- tiny pipeline: every score needs one exponential and a dot product of its query and key;
  ``exp + matmul bound`` is the time of ``torch.exp2`` over that many floats in cache plus
  the Q·Kᵀ and text-encoder FLOPs at the throughput of a large float32 matrix product;
- SD-1.5-shaped store: the Q·Kᵀ and text-encoder FLOPs at the throughput of a large
  float32 matrix product (``torch.mm`` 2048³).

``--sd15-few`` times the few-prompt case: one image, 1 and 5 prompts, ``compute_maps`` from an
open store (cold, and warm through the query cache) beside the baseline with the image's
queries in memory.

``--e2e N`` times whole processes (start-up included): ``ovstore maps`` with N prompts vs
this file run as a reference-style script on the same prompts. Run:

    python benchmarks/bench_maps.py [--counts 1 10 100 1000 10000] [--threads 1] [--sd15] [--e2e 5000] [--device cuda]

On a GPU (``--device cuda``) both sides run there, timings synchronise the device, and the
bound of every table is the larger of the two (exponentials, matrix products).
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "data" / "golden" / "tiny-sd15"
DEVICE = torch.device("cpu")
WORDS = ("cat dog sofa car tree house a the red blue green photo of on in and with small large "
         "wooden furniture animal street night sky person table chair window flower bird").split()


#: "short": random 1-8-word prompts; "templates": sentences of 12-15 tokens sharing their
#: beginning, as labelling and dataset prompts are written
PROMPT_KIND = "short"
TEMPLATES = ("a photograph of a {} on a wooden table in the room", "a photo of a {} and a {} in the street at night",
             "a close-up picture of a small {} next to a {}")


def prompts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    if PROMPT_KIND == "templates":
        out = []
        for _ in range(n):
            template = rng.choice(TEMPLATES)
            out.append(template.format(*(rng.choice(WORDS) for _ in range(template.count("{}")))))
        return out
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 8))) for _ in range(n)]


def last_hidden_state(encoder, ids: torch.Tensor) -> torch.Tensor:
    """SD 1.x/2.x key input: the one encoder's last hidden state, ``(tokens, features)``."""
    return encoder.model(ids)[0][0]


def reference_inputs(store, images=(0,)) -> tuple[list[dict], dict]:
    """What the published implementation holds in memory before evaluating prompts: each image's
    queries per layer as float32 ``(call, head, pixel, dim)`` and each layer's ``to_k`` weight."""
    layers = [l for l in store.layers if l.block != "mid"]
    queries = [{l.name: torch.from_numpy(store.queries(l.name, i)).to(DEVICE).float()
                .reshape(-1, l.heads, l.height * l.width, l.head_dim) for l in layers} for i in images]
    weights = {l.name: torch.from_numpy(store.key_projection(l.name)[0]).to(DEVICE).float() for l in layers}
    return queries, weights


def reference_style(store, encoder, texts: list[str], embed=last_hidden_state, images=(0,),
                    inputs: tuple[list[dict], dict] | None = None) -> np.ndarray:
    """One prompt at a time, with the published implementation's loop structure: per layer, the
    prompt's keys, then per stored UNet call one batched-over-heads score product laid out as
    ``(head, token, h, w)``; the calls stacked, one softmax over the tokens, sums over calls and
    heads; each layer upsampled to the largest grid and the layers summed.

    ``embed(encoder, ids)`` gives the key input of one tokenized prompt (the family's recipe).
    Timed beside the published implementation on the same stored queries, this loop is at
    least as fast (BENCHMARKS.md), so speed-ups against it are speed-ups against what users run.

    With several ``images`` each prompt is encoded once and evaluated on every image (stronger than
    the published evaluator's string input, which encodes the prompt again for every generation);
    the result is then ``(image, token, h, w)``. ``inputs`` (from :func:`reference_inputs`) are
    queries and weights already in memory; without them they are read from ``store`` first."""
    layers = [l for l in store.layers if l.block != "mid"]
    queries, weights = inputs if inputs is not None else reference_inputs(store, images)
    target = max((l.height, l.width) for l in layers)
    out: list[list[np.ndarray]] = [[] for _ in images]
    for text in texts:
        ids = encoder.tokenizer(text, padding=False, return_tensors="pt")["input_ids"].to(DEVICE)
        with torch.no_grad():
            emb = embed(encoder, ids)
            for image, image_queries in enumerate(queries):
                total = 0
                for l in layers:
                    k = F.linear(emb, weights[l.name]).view(-1, l.heads, l.head_dim).permute(1, 2, 0)  # (head, dim, token)
                    per_call = []
                    for q in image_queries[l.name]:  # (head, pixel, dim) of one stored call
                        scores = torch.bmm(q, k).mul_(l.scale)  # (head, pixel, token)
                        per_call.append(scores.permute(0, 2, 1).reshape(l.heads, -1, l.height, l.width))
                    maps = torch.stack(per_call).softmax(dim=-3).sum(0).sum(0)  # (token, h, w)
                    if (l.height, l.width) != target:
                        maps = F.interpolate(maps[None], size=target, mode="bilinear", align_corners=False)[0]
                    total = total + maps
                out[image].append(total.cpu().numpy())
    if len(images) == 1:
        return np.concatenate(out[0], axis=0)
    return np.stack([np.concatenate(o, axis=0) for o in out])


def reference_script(store_path: str, prompts_file: str) -> None:
    """The end-to-end baseline process: load, then one prompt at a time, then save."""
    from ovstore.analyze import load_text_encoder
    from ovstore.store import open_store

    store = open_store(store_path)
    texts = [l for l in Path(prompts_file).read_text().splitlines() if l.strip()]
    maps = reference_style(store, load_text_encoder(store.layout.model, device=str(DEVICE)), texts,
                           images=store.complete_images())
    np.save(Path(prompts_file).with_suffix(".baseline.npy"), maps)


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def _timed(fn, *args):
    _sync()
    t0 = time.perf_counter()
    value = fn(*args)
    _sync()
    return value, time.perf_counter() - t0


def gemm_gflops(size: int = 2048, repeats: int = 5) -> float:
    if DEVICE.type == "cuda":
        size, repeats = 8192, 20
    a, b = torch.randn(size, size, device=DEVICE), torch.randn(size, size, device=DEVICE)
    a @ b
    _sync()
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    _sync()
    return 2 * size ** 3 * repeats / (time.perf_counter() - t0) / 1e9


def exp_seconds_per_element(n: int = 1 << 18, repeats: int = 200) -> float:
    if DEVICE.type == "cuda":  # in place over a large tensor: the GPU's exp2 rate at full occupancy
        n = 1 << 26
    x = torch.rand(n, device=DEVICE)
    out = torch.empty_like(x)
    rates = []
    for fn in (torch.exp2, torch.exp):  # the faster of the two on this machine bounds any exact method
        fn(x, out=out)
        _sync()
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn(x, out=out)
        _sync()
        rates.append((time.perf_counter() - t0) / (n * repeats))
    return min(rates)


def work(store, encoder, texts: list[str]) -> tuple[int, float, float]:
    """(scores, Q·Kᵀ FLOPs, text-encoder FLOPs) of evaluating ``texts`` on one image."""
    layers = [l for l in store.layers if l.block != "mid"]
    tokens = sum(len(encoder.tokenizer(t)["input_ids"]) for t in texts)
    calls = store.layout.n_steps
    scores = sum(calls * l.heads * l.height * l.width for l in layers) * tokens
    qk = sum(2 * calls * l.heads * l.head_dim * l.height * l.width for l in layers) * tokens
    cfg = encoder.model.config
    weights = sum(p.numel() for n, p in encoder.model.named_parameters() if "embeddings" not in n)
    # 2 FLOPs per weight per token, plus attention over (at most) the prompt's own tokens
    text = 2 * weights * tokens + 4 * cfg.num_hidden_layers * cfg.hidden_size * sum(
        len(encoder.tokenizer(t)["input_ids"]) ** 2 for t in texts)
    return scores, float(qk), float(text)


def table(label: str, store, encoder, counts: list[int], baseline_max: int, bound: str) -> None:
    from ovstore.analyze import compute_maps

    compute_maps(store, prompts(4), text_encoder=encoder, device=str(DEVICE), cache=False)  # warm-up
    reference_style(store, encoder, prompts(2))
    gflops = gemm_gflops()
    exp_s = exp_seconds_per_element()
    print(f"\n{label}\n")
    print(f"measured in this run: float32 matrix product {gflops:.0f} GFLOP/s; exp or exp2, the faster, "
          f"{exp_s * 1e9:.2f} ns/element\n")
    print(f"| prompts | ovstore s | ovstore prompts/s | baseline s | baseline prompts/s | speed-up | {bound} | "
          "ovstore ÷ bound | max abs diff |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    base_rate = None
    for n in counts:
        texts = prompts(n, seed=n)
        ours, t_ours = _timed(lambda: compute_maps(store, texts, text_encoder=encoder, device=str(DEVICE),
                                                   cache=False).values[0])  # queries read from the store each time
        scores, qk, text = work(store, encoder, texts)
        exp_limit, mm_limit = scores * exp_s, (qk + text) / (gflops * 1e9)
        limit = exp_limit + mm_limit if bound == "exp + matmul bound s" else mm_limit
        if DEVICE.type == "cuda":
            limit = max(exp_limit, mm_limit)
        if n <= baseline_max:
            base, t_base = _timed(reference_style, store, encoder, texts)
            base_rate = n / t_base
            diff = f"{float(np.abs(ours - base).max()):.1e}"
            base_cols = f"{t_base:.3f} | {base_rate:.1f}"
            speed = f"{t_base / t_ours:.1f}x"
        else:  # the baseline is linear in prompts: its rate at the largest measured count
            diff = "-"
            base_cols = f"({n / base_rate:.0f}) | ({base_rate:.1f})" if base_rate else "- | -"
            speed = f"({n / base_rate / t_ours:.1f}x)" if base_rate else "-"
        print(f"| {n} | {t_ours:.3f} | {n / t_ours:.1f} | {base_cols} | {speed} | {limit:.3f} | "
              f"{t_ours / limit:.2f} | {diff} |")
    print(f"\n(parentheses: baseline extrapolated from its measured rate at {baseline_max} prompts)")


def few_prompts(store_path: Path, encoder, counts: tuple[int, ...] = (1, 5), repeats: int = 7) -> None:
    """A user re-analysing one image for a handful of words, side by side: the baseline with
    the image's queries already in memory as float32 (as the published implementation holds
    them right after generating), against ``compute_maps`` from an open store, cold (a store
    object just opened: the queries and key projections read from disk) and warm (the same
    open store again, new words: the prepared queries come from the process-wide cache).
    Cold is the median of ``repeats`` fresh opens, warm and baseline the medians of three new
    prompts after each, alternating; every side encodes its prompts."""
    from ovstore.analyze import compute_maps, shared_query_cache
    from ovstore.store import open_store

    store = open_store(store_path)
    in_ram = reference_inputs(store)  # the image's queries already in memory, as after generating

    def baseline(texts: list[str]) -> np.ndarray:
        return reference_style(store, encoder, texts, inputs=in_ram)

    baseline(prompts(1, seed=99))
    megabytes = sum(v.numel() for v in in_ram[0][0].values()) * 2 / 1e6
    print(f"\nA handful of words on one SD-1.5-shaped image ({store.layout.n_steps} stored calls, {megabytes:.0f} MB "
          f"of float16 queries), medians of {repeats} cold and {3 * repeats} warm calls, each with new prompts:\n")
    print("| prompts | baseline, queries in memory ms | ovstore cold (store just opened) ms | ovstore warm (same open "
          "store) ms | warm ÷ baseline | max abs diff |")
    print("|---:|---:|---:|---:|---:|---:|")
    for n in counts:
        t_base, t_cold, t_warm, diff = [], [], [], 0.0
        for r in range(repeats):
            texts = prompts(n, seed=1000 * n + r)
            shared_query_cache().resize(0)  # cold: nothing of this image in memory ...
            shared_query_cache().resize(2**30)
            fresh = open_store(store_path)  # ... and a store object of its own (key projections unread)
            _, t = _timed(lambda: compute_maps(fresh, texts, text_encoder=encoder, device=str(DEVICE)))
            t_cold.append(t)
            for w in range(3):  # new words on the open store, alternating with the baseline on the same words
                warm_texts = prompts(n, seed=2000 * n + 10 * r + w)
                ours, t = _timed(lambda: compute_maps(fresh, warm_texts, text_encoder=encoder, device=str(DEVICE)))
                t_warm.append(t)
                base, t = _timed(baseline, warm_texts)
                t_base.append(t)
                diff = max(diff, float(np.abs(ours.values[0] - base).max()))
        med = lambda xs: 1e3 * float(np.median(xs))  # noqa: E731
        print(f"| {n} | {med(t_base):.0f} | {med(t_cold):.0f} | {med(t_warm):.0f} | "
              f"{med(t_warm) / med(t_base):.2f} | {diff:.1e} |")


def end_to_end(store_path: Path, n: int, threads: int, repeats: int = 1) -> None:
    prompts_file = store_path.parent / f"prompts-{n}.txt"
    prompts_file.write_text("\n".join(prompts(n, seed=7)) + "\n")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    console_script = Path(sys.executable).with_name("ovstore")  # this environment's, not one on PATH
    ours = [str(console_script) if console_script.exists() else "ovstore", "maps", str(store_path), "--attributions-file", str(prompts_file),
            "--out", str(store_path.parent / "e2e.zarr"), "--device", str(DEVICE)]
    base = [sys.executable, __file__, "--reference-script", str(store_path), str(prompts_file), "--threads", str(threads),
            "--device", str(DEVICE), "--prompts", PROMPT_KIND]
    times: dict[str, list[float]] = {"ours": [], "base": []}
    for _ in range(repeats):  # alternating, so that both sides see the same machine state
        for side, command in (("ours", ours), ("base", base)):
            times[side].append(_timed(lambda: subprocess.run(command, env=env, check=True, capture_output=True))[1])
    t_ours, t_base = min(times["ours"]), min(times["base"])
    from ovstore.store import open_store

    n_images = len(open_store(store_path).complete_images())
    print(f"\nEnd to end, {n} prompts over {n_images} stored image(s), whole processes (start-up, model load, "
          "text encoding, maps, writing), "
          f"best of {repeats}:\n")
    print("| prompts | `ovstore maps` s | reference-style script s | speed-up | all runs (ours; baseline) |")
    print("|---:|---:|---:|---:|---|")
    runs = f"{', '.join(f'{t:.1f}' for t in times['ours'])}; {', '.join(f'{t:.1f}' for t in times['base'])}"
    print(f"| {n} | {t_ours:.1f} | {t_base:.1f} | {t_base / t_ours:.1f}x | {runs} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", type=int, nargs="+", default=[1, 10, 100, 1000, 10000])
    parser.add_argument("--threads", type=int, default=1, help="torch threads, both sides")
    parser.add_argument("--baseline-max", type=int, default=1000, help="largest count the baseline runs (tiny)")
    parser.add_argument("--sd15", action="store_true", help="also an SD-1.5-shaped store (random weights)")
    parser.add_argument("--sd15-calls", type=int, default=10)
    parser.add_argument("--sd15-counts", type=int, nargs="+", default=[1, 10, 100, 1000])
    parser.add_argument("--sd15-baseline-max", type=int, default=10)
    parser.add_argument("--sd15-few", action="store_true", help="only the few-prompt case on an SD-1.5-shaped "
                        "store of 4 stored calls: cold and warm, beside the baseline with its queries in memory")
    parser.add_argument("--e2e", type=int, default=0, help="end-to-end process timing with this many prompts")
    parser.add_argument("--e2e-repeats", type=int, default=1, help="end-to-end runs per side (the best is reported)")
    parser.add_argument("--e2e-images", type=int, default=1, help="stored images of the end-to-end store")
    parser.add_argument("--device", default="cpu", help="cpu or cuda: where both sides run")
    parser.add_argument("--prompts", choices=("short", "templates"), default="short",
                        help="short: random 1-8 words; templates: 12-15-token sentences sharing their beginning")
    parser.add_argument("--reference-script", nargs=2, metavar=("STORE", "PROMPTS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    global DEVICE, PROMPT_KIND
    DEVICE = torch.device(args.device)
    PROMPT_KIND = args.prompts
    if args.reference_script:
        reference_script(*args.reference_script)
        return

    from ovstore.analyze import load_text_encoder
    from ovstore.capture import CaptureConfig, build_requests, capture, load_pipeline
    from ovstore.store import open_store

    tmp = Path(tempfile.mkdtemp()) / "bench.zarr"
    if args.sd15_few:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from sd15_shaped import make_sd15_store, make_text_encoder_dir

        print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
              f"{torch.get_num_threads()} torch thread(s), torch {torch.__version__}")
        path = make_sd15_store(tmp.parent / "sd15-4.zarr", make_text_encoder_dir(tmp.parent / "clip-l"), n_calls=4)
        few_prompts(path, load_text_encoder(open_store(path).layout.model, device=str(DEVICE)))
        return
    pipe, identity = load_pipeline(str(TINY))
    capture(pipe, identity, build_requests([("a photo of a cat on a sofa", None, 0)], num_inference_steps=10),
            tmp, config=CaptureConfig(num_inference_steps=10, dtype="float16"))
    store = open_store(tmp)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"{torch.get_num_threads()} torch thread(s), torch {torch.__version__}")
    if DEVICE.type == "cuda":
        print(f"device: {torch.cuda.get_device_name(DEVICE)}")
    table("Tiny pipeline (6 layers, 4 heads, 11 calls, latent 32x32, float16 storage)", store,
          load_text_encoder(store.layout.model, device=str(DEVICE)), args.counts, args.baseline_max, "exp + matmul bound s")
    if args.sd15:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from sd15_shaped import make_sd15_store, make_text_encoder_dir

        sd15 = open_store(make_sd15_store(tmp.parent / "sd15.zarr", make_text_encoder_dir(tmp.parent / "clip-l"),
                                          n_calls=args.sd15_calls))
        table(f"SD-1.5-shaped (15 layers, 8 heads, {args.sd15_calls} calls, latent 64x64, CLIP ViT-L/14-shaped "
              "text encoder, float16 storage)", sd15, load_text_encoder(sd15.layout.model, device=str(DEVICE)),
              args.sd15_counts,
              args.sd15_baseline_max, "matmul bound s")
    if args.e2e:
        e2e_store = tmp
        if args.e2e_images > 1:  # a store of its own: the tables above stay on one image
            e2e_store = tmp.parent / f"e2e-{args.e2e_images}" / "bench.zarr"
            texts = [f"a photo of a {w} on a sofa" for w in ("cat", "dog", "car", "tree", "bird", "chair", "house",
                                                             "flower")]
            capture(pipe, identity, build_requests([(texts[i % len(texts)], None, i) for i in range(args.e2e_images)],
                                                   num_inference_steps=10),
                    e2e_store, config=CaptureConfig(num_inference_steps=10, dtype="float16"))
        end_to_end(e2e_store, args.e2e, args.threads, args.e2e_repeats)


if __name__ == "__main__":
    main()

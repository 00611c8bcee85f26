"""MM-DiT (SD3, FLUX): capture overhead, bytes per image per preset, and open-vocabulary
analysis from the store against re-running the transformer with the new vocabulary.

SD3- and FLUX-shaped transformers with random weights and the real block shapes (SD3-medium:
joint blocks 1536 wide, 24 heads of 64; FLUX.1: double and single blocks 3072 wide, 24 heads of
128, rotary axes 16/56/56), in the pipelines of the tiny public SD3 and FLUX cases
(tests/data/online: their tokenizers, text encoders, VAE and scheduler, so the context and
pooled widths are the tiny encoders'). On CPU only a few blocks (``--sd3-blocks``,
``--flux-double``, ``--flux-single``; FLUX.1 keeps 2 single blocks per double one), a few calls
(``--steps``) and a small image (``--size``, 64: 16x16 image tokens) fit; every figure is measured
side by side in one run:

* capture overhead: the pipeline's generation alone against ``ovstore.capture`` of the same
  prompt and seed (generation, hooks, the store written), ``--repeats`` times alternately;
* bytes per image of every preset, with and without ``--image-outputs``, at these shapes (the
  layout's arithmetic, before compression, as ``capture`` prints) and at the real models' 1024²
  shapes;
* analysis of 1, 100, 1000 attribution prompts on one stored image: ``compute_maps`` from the
  store (text encoding, the attribution's text stream through the stored blocks, maps), against
  the baseline users have today, running the transformer again with the new vocabulary
  (ConceptAttention-style): its cost is the generation run (the transformer's forward passes for
  the stored calls, measured here as the plain generation) plus the same concept streams and
  maps, which ovstore's engine computes without reading anything; that part is measured as
  ``compute_maps`` minus its reads of the store (measured: ``MapPlan.read`` and the image
  keys/values), so the baseline is given ovstore's own engine for the concepts;
* ``--compare-spaces`` instead: on the tiny pipelines themselves, how attention-space and
  output-space maps (``MapConfig.space``) of the same store differ: cosine similarity and top-10 %
  IoU between them, and each space's share of a map's mass in its top 10 % pixels (sharpness);
* the physical bound: the matrix-multiply FLOPs of the concept streams (and, for the baseline,
  of the transformer's forward passes) over this machine's measured matmul throughput.

    PYTHONPATH=src nice -n 10 python benchmarks/bench_mmdit.py                 # CPU, a few blocks
    PYTHONPATH=src nice -n 10 python benchmarks/bench_mmdit.py --compare-spaces
    PYTHONPATH=src python benchmarks/bench_mmdit.py --device cuda --torch-dtype bfloat16 \\
        --sd3-blocks 24 --flux-double 19 --flux-single 38 --size 256 --steps 28 --repeats 3

The tiny pipelines' VAE downsamples 2x (not 8x), so ``--size 256`` gives the 64x64 = 4096 image
tokens of a real 1024² image.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
PIPELINES = {"sd3": ROOT / "tests/data/online/sd3/pipeline", "flux": ROOT / "tests/data/online/flux/pipeline"}
GUIDANCE = {"sd3": 4.0, "flux": 3.5}
PROMPT = "a red house by the sea under a cloudy sky"
VOCABULARY = ["house", "a red roof", "the sea", "sky", "a small boat", "clouds", "a lighthouse", "rocks",
              "a tree", "sand", "a dog on the beach", "waves"]
#: real shapes at 1024² (4096 image tokens): blocks recorded, width, calls (the pipelines' default steps)
REAL = {"SD3-medium": dict(blocks=24, width=1536, calls=28, forward_blocks=24, single=0),
        "FLUX.1-dev": dict(blocks=19, width=3072, calls=28, forward_blocks=19, single=38),
        "FLUX.1-schnell": dict(blocks=19, width=3072, calls=4, forward_blocks=19, single=38)}


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def build(family: str, args: argparse.Namespace):
    """The tiny pipeline with a real-shaped random transformer; ``(pipe, identity)``."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    from ovstore.capture import load_pipeline

    pipe, identity = load_pipeline(str(PIPELINES[family]), torch_dtype=args.torch_dtype)
    tiny = pipe.transformer.config
    torch.manual_seed(0)
    if family == "sd3":  # SD3-medium's block shapes (with SD3.5's RMS q/k norms)
        model = SD3Transformer2DModel(
            sample_size=tiny.sample_size, patch_size=2, in_channels=tiny.in_channels, out_channels=tiny.out_channels,
            num_layers=args.sd3_blocks, attention_head_dim=64, num_attention_heads=24,
            joint_attention_dim=tiny.joint_attention_dim, caption_projection_dim=1536,
            pooled_projection_dim=tiny.pooled_projection_dim,
            pos_embed_max_size=max(32, -(-args.size // (pipe.vae_scale_factor * 2))),  # patches per side
            qk_norm="rms_norm")
    else:  # FLUX.1's block shapes
        model = FluxTransformer2DModel(
            patch_size=1, in_channels=tiny.in_channels, num_layers=args.flux_double,
            num_single_layers=args.flux_single, attention_head_dim=128, num_attention_heads=24,
            joint_attention_dim=tiny.joint_attention_dim, pooled_projection_dim=tiny.pooled_projection_dim,
            guidance_embeds=True, axes_dims_rope=(16, 56, 56))
    dtype = getattr(torch, args.torch_dtype)
    pipe.transformer = model.to(args.device, dtype).eval()
    pipe.to(args.device)
    pipe.set_progress_bar_config(disable=True)
    return pipe, identity


def _config(family: str, args: argparse.Namespace, **extra):
    from ovstore.capture import CaptureConfig

    return CaptureConfig(num_inference_steps=args.steps, guidance=GUIDANCE[family], height=args.size,
                         width=args.size, branch="cond", dtype="float16", max_sequence_length=args.max_sequence_length,
                         **extra)


def capture_overhead(family: str, pipe, identity, args: argparse.Namespace, root: Path) -> tuple[dict, Path]:
    """Median seconds, alternately, of the plain generation of one image and of two capture
    calls into the same existing store, of one image and of three: their difference over two is
    the capture's cost per image (a call's fixed checks, e.g. the appended store's text-side
    weights compared by SHA-256, cancel out). The store's creation (layout, weights written) is
    timed apart: it happens once per store."""
    from ovstore.capture import build_requests, capture

    store = root / f"{family}.zarr"
    config = _config(family, args, image_outputs=args.image_outputs)

    def requests(n: int):
        return build_requests([(PROMPT, None, k) for k in range(n)], guidance=GUIDANCE[family],
                              num_inference_steps=args.steps)

    start = time.perf_counter()
    capture(pipe, identity, requests(1), store, config=config)  # creates the store: weights, first image
    _sync(args.device)
    first = time.perf_counter() - start
    plain, one, three = [], [], []
    for _ in range(args.repeats):
        _sync(args.device)
        start = time.perf_counter()
        with torch.inference_mode():
            pipe(PROMPT, num_inference_steps=args.steps, guidance_scale=GUIDANCE[family], height=args.size,
                 width=args.size, max_sequence_length=args.max_sequence_length,
                 generator=torch.Generator("cpu").manual_seed(0), output_type="np")
        _sync(args.device)
        plain.append(time.perf_counter() - start)
        for n, into in ((1, one), (3, three)):
            start = time.perf_counter()
            capture(pipe, identity, requests(n), store, config=config)  # appended
            _sync(args.device)
            into.append(time.perf_counter() - start)
    t1, t3 = statistics.median(one), statistics.median(three)
    return {"plain": statistics.median(plain), "call1": t1, "call3": t3, "per_image": (t3 - t1) / 2,
            "first": first, "runs": list(zip(plain, one, three))}, store


def preset_bytes(family: str, pipe, identity, args: argparse.Namespace) -> list[tuple[str, int, int, int, int]]:
    """``(preset, blocks, calls, bytes, bytes with image outputs)`` per image at the bench shapes."""
    from ovstore.capture import plan_capture
    from ovstore.families import family_for_pipeline

    rows = []
    for preset in family_for_pipeline(pipe).presets:
        sizes = []
        for outputs in (False, True):
            layout, _ = plan_capture(pipe, identity, _config(family, args, preset=preset, image_outputs=outputs))
            sizes.append(layout.query_bytes_per_image() + layout.context_bytes_per_image())
        rows.append((preset, len(layout.layers), layout.n_steps, *sizes))
    return rows


def real_output_bytes() -> list[tuple[str, str, float]]:
    """What ``--image-outputs`` adds per 1024² image at real shapes, float16: one array of
    4096 tokens × width per recorded block and stored call (the presets keep the blocks and calls
    of BENCHMARKS.md's preset table)."""
    rows = []
    for model, r in REAL.items():
        for preset, blocks, calls in (("full", r["blocks"], r["calls"]), ("half-calls", r["blocks"], r["calls"] // 2),
                                      ("first-half", -(-r["blocks"] // 2), r["calls"]),
                                      ("first-half-half-calls", -(-r["blocks"] // 2), r["calls"] // 2)):
            rows.append((model, preset, 4096 * r["width"] * 2 * blocks * calls))
    return rows


def matmul_throughput(device: str, dtype: torch.dtype, width: int) -> float:
    """FLOP/s of this machine's ``(4096 x W) @ (W x W)`` products (the concept stream's shape)."""
    a = torch.randn(4096, width, device=device, dtype=dtype)
    b = torch.randn(width, width, device=device, dtype=dtype)
    torch.mm(a, b)
    _sync(device)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * 4096 * width * width / best


def stream_flops(tokens: int, blocks: int, calls: int, width: int, pixels: int) -> float:
    """Matrix-multiply FLOPs of the attribution streams and their maps: per token and call,
    every recorded block but the last runs the context-side q/k/v/out projections (4 W²), the
    feed-forward (8 W²) and the attention over the image keys and values (2 P W); the last needs
    its keys only (W²); every block's map scores the image queries against the keys (P W); x2 for
    multiply-add."""
    return 2.0 * tokens * calls * ((blocks - 1) * (12 * width * width + 2 * pixels * width)
                                   + width * width + blocks * pixels * width)


def forward_flops(blocks: int, width: int, pixels: int, text: int, calls: int) -> float:
    """Matrix-multiply FLOPs of the transformer's forward passes: per block and call every row
    (image and text) meets its stream's q/k/v/out projections and feed-forward (12 W², a single
    block's fused ones too), and the joint attention (scores and values, 2 (P + T)² W each);
    x2 for multiply-add."""
    n = pixels + text
    return 2.0 * calls * blocks * (12 * width * width * n + 2 * n * n * width)


def analysis(family: str, store: Path, args: argparse.Namespace) -> list[dict]:
    """``compute_maps`` seconds for 1/100/1000 prompts (the text encoder loaded once, as the
    baseline's pipeline holds it), and what of that the baseline has no need of: the plan (the
    store's text-side weights read onto the device) and the image's reads."""
    from ovstore.analyze import MapConfig, compute_maps, load_text_encoder
    from ovstore.analyze.maps import MapPlan
    from ovstore.store import open_store

    opened = open_store(store)
    config = MapConfig(branch="cond")
    encoder = load_text_encoder(opened.layout.model, device=args.device)
    prompts_all = [f"{w} {i}" if i else w for i in range(1 + max(args.counts) // len(VOCABULARY))
                   for w in VOCABULARY]
    compute_maps(opened, ["warm up"], config=config, text_encoder=encoder, device=args.device)
    start = time.perf_counter()
    plan = MapPlan(opened, config, device=args.device)
    setup = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(3):
        plan.read(0)
        plan.key_inputs(0)
    reads = (time.perf_counter() - start) / 3
    rows = []
    for n in args.counts:
        prompts = prompts_all[:n]
        tokens = sum(a.n_tokens for a in encoder.encode(prompts))
        _sync(args.device)
        start = time.perf_counter()
        compute_maps(opened, prompts, config=config, text_encoder=encoder, device=args.device)
        _sync(args.device)
        rows.append({"prompts": n, "tokens": tokens, "ovstore": time.perf_counter() - start, "reads": reads + setup})
        gc.collect()
    return rows


def compare_spaces(steps: int = 4) -> None:
    """Attention- against output-space maps on the tiny pipelines (their own random weights):
    three prompts captured with ``--image-outputs``; generation-context maps and four words."""
    from ovstore.analyze import MapConfig, compute_maps
    from ovstore.analyze.context import compute_context_maps
    from ovstore.capture import CaptureConfig, build_requests, capture, load_pipeline

    prompts = ["a robot in the rain", "a red house by the sea", "a cat on a sofa"]
    words = ["robot", "house", "cat", "rain"]

    def flat(maps: np.ndarray) -> np.ndarray:
        return maps.reshape(-1, maps.shape[-2] * maps.shape[-1]).astype(np.float64)

    def top_share(m: np.ndarray) -> float:
        k = max(1, m.shape[1] // 10)
        return float((np.sort(m, axis=1)[:, -k:].sum(1) / np.maximum(m.sum(1), 1e-30)).mean())

    print("| family | maps | cosine attention vs output | top-10% IoU | top-10% mass share: attention | output |")
    print("|---|---|---|---|---|---|")
    for family, path in PIPELINES.items():
        pipe, identity = load_pipeline(str(path))
        g = GUIDANCE[family]
        requests = build_requests([(p, None, k) for k, p in enumerate(prompts)], guidance=g, num_inference_steps=steps)
        with tempfile.TemporaryDirectory() as tmp:
            store = Path(tmp) / "s.zarr"
            capture(pipe, identity, requests, store, config=CaptureConfig(
                num_inference_steps=steps, guidance=g, height=64, width=64, branch="cond", dtype="float32",
                max_sequence_length=16, image_outputs=True))
            for what in ("context", "words"):
                got = {}
                for space in ("attention", "output"):
                    config = MapConfig(branch="cond", space=space)
                    maps = (compute_context_maps(store, config=config) if what == "context"
                            else compute_maps(store, words, config=config)).values
                    got[space] = flat(maps)
                a, b = got["attention"], got["output"]
                cos = ((a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30))
                k = max(1, a.shape[1] // 10)
                ious = [len(set(np.argsort(-x)[:k]) & set(np.argsort(-y)[:k])) / len(set(np.argsort(-x)[:k])
                                                                                   | set(np.argsort(-y)[:k]))
                        for x, y in zip(a, b)]
                print(f"| {family} (tiny) | {what} | {cos.mean():.3f} | {np.mean(ious):.3f} | {top_share(a):.3f} | "
                      f"{top_share(b):.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--torch-dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    parser.add_argument("--family", action="append", choices=tuple(PIPELINES), help="default: both")
    parser.add_argument("--sd3-blocks", type=int, default=2, help="joint blocks (SD3-medium: 24)")
    parser.add_argument("--flux-double", type=int, default=1, help="double-stream blocks (FLUX.1: 19)")
    parser.add_argument("--flux-single", type=int, default=2, help="single-stream blocks (FLUX.1: 38)")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (the tiny VAE downsamples 2x: "
                        "64 gives 16x16 image tokens, 256 the 64x64 of a real 1024² image)")
    parser.add_argument("--steps", type=int, default=2, help="denoising steps = stored calls")
    parser.add_argument("--max-sequence-length", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--counts", type=int, nargs="+", default=[1, 100, 1000])
    parser.add_argument("--image-outputs", action="store_true", help="capture with --image-outputs")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--compare-spaces", action="store_true", help="only compare the two map spaces (tiny)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.compare_spaces:
        compare_spaces()
        return
    dtype = getattr(torch, args.torch_dtype)
    print(f"device {args.device}, {args.torch_dtype}, torch threads {args.threads}, image {args.size}², "
          f"{args.steps} calls, T5 length {args.max_sequence_length}")
    for family in args.family or tuple(PIPELINES):
        pipe, identity = build(family, args)
        t = pipe.transformer
        width = t.config.num_attention_heads * t.config.attention_head_dim
        shape = (f"{args.sd3_blocks} joint blocks" if family == "sd3"
                 else f"{args.flux_double} double + {args.flux_single} single blocks")
        print(f"\n## {family}: {shape}, width {width}, {t.config.num_attention_heads} heads of "
              f"{t.config.attention_head_dim}")
        with tempfile.TemporaryDirectory() as tmp:
            times, store = capture_overhead(family, pipe, identity, args, Path(tmp))
            print(f"capture overhead: generation {times['plain']:.2f} s per image; capture {times['per_image']:.2f} s per "
                  f"image (calls of 1 and 3 images into the store: {times['call1']:.2f} s, {times['call3']:.2f} s), "
                  f"ratio {times['per_image'] / times['plain']:.3f}; one capture call of one image "
                  f"{times['call1'] / times['plain']:.3f}; creating the store with its first image {times['first']:.2f} s "
                  "(runs plain/1/3: " + ", ".join(f"{a:.1f}/{b:.1f}/{c:.1f}" for a, b, c in times["runs"]) + ")")
            print("\n| preset | blocks | calls | bytes/image | with --image-outputs |\n|---|---|---|---|---|")
            for preset, blocks, calls, plain, outputs in preset_bytes(family, pipe, identity, args):
                print(f"| {preset} | {blocks} | {calls} | {_human(plain)} | {_human(outputs)} |")
            from ovstore.store import open_store

            layout = open_store(store).layout
            pixels = layout.layers[0].height * layout.layers[0].width
            flops_per_s = matmul_throughput(args.device, dtype, width)
            n_blocks = len(t.transformer_blocks) + len(getattr(t, "single_transformer_blocks", []))
            gen_flops = forward_flops(n_blocks, width, pixels, layout.context.length, args.steps)
            print(f"\nmatmul throughput {flops_per_s / 1e9:.1f} GFLOP/s; transformer forward passes "
                  f"{gen_flops / 1e9:.1f} GFLOP ({gen_flops / flops_per_s:.2f} s at that rate)")
            print("\n| prompts | tokens | ovstore compute_maps s | of which plan and store reads s | baseline: re-run s "
                  "(generation + concept streams) | baseline / ovstore | bound: ovstore s | bound: baseline / "
                  "ovstore |\n|---|---|---|---|---|---|---|---|")
            for row in analysis(family, store, args):
                baseline = times["plain"] + row["ovstore"] - row["reads"]
                bound = stream_flops(row["tokens"], len(layout.layers), args.steps, width, pixels) / flops_per_s
                print(f"| {row['prompts']} | {row['tokens']} | {row['ovstore']:.3f} | {row['reads']:.3f} | "
                      f"{baseline:.2f} | {baseline / row['ovstore']:.1f}× | {bound:.4f} | "
                      f"{(bound + gen_flops / flops_per_s) / bound:.1f}× |")
        del pipe, t
        gc.collect()
    print("\n| model (1024², float16) | preset | --image-outputs adds per image |\n|---|---|---|")
    for model, preset, size in real_output_bytes():
        print(f"| {model} | {preset} | {_human(size)} |")
    print("\nreal shapes, the bound per new vocabulary of N prompts of 4 tokens (stream FLOPs vs the re-run's "
          "forward passes, both at one matmul rate):")
    for model, r in REAL.items():
        pixels, text, w = 4096, 512 if "FLUX" in model else 77 + 256, r["width"]
        gen = forward_flops(r["forward_blocks"] + r["single"], w, pixels, text, r["calls"])
        for prompts in (1, 100, 1000):
            stream = stream_flops(4 * prompts, r["blocks"], r["calls"], w, pixels)
            print(f"  {model}: {prompts} prompts: streams {stream / 1e12:.2f} TFLOP; the re-run adds {gen / 1e12:.1f} "
                  f"TFLOP of forward passes: at most {(stream + gen) / stream:.0f}x")


if __name__ == "__main__":
    main()

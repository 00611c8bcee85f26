"""SDXL-shaped benchmarks: bytes per image per preset, capture overhead, map throughput.

* **Bytes per image** at 1024² for every preset, computed exactly from SDXL-1.0's layer table
  (70 ``attn2`` layers: 10 at 64x64 with 10 heads x 64, 60 at 32x32 with 20 heads x 64, of them
  10 in the mid block) and the 77 x 2048 context, without building anything.
* **Map throughput** for 1/100/1000 prompts on one stored image of an SDXL-shaped store (real
  layer shapes, random queries and ``to_k``), text encoded by randomly initialised encoders
  of CLIP ViT-L/14's and OpenCLIP ViT-bigG/14's widths (768 and 1280, joined 2048,
  ``hidden_states[-2]``), against a reference-style loop (one prompt at a time, a loop over
  layers and calls) and against the matrix-multiply bound (Q·Kᵀ and text-encoder FLOPs at the
  measured ``torch.mm`` rate). ``--encoder-layers`` sets the depth of both encoders (SDXL:
  12 and 32; the default 2 keeps the run short and is said in the output).
* **Capture overhead** (``--capture``): generation with and without ovstore on an
  SDXL-layout ``StableDiffusionXLPipeline`` (text_time UNet, transformer depths 2 and 10,
  two encoders), channels divided by ``--channel-divisor`` (1 = real SDXL, 2.6 B parameters)
  at ``--size`` pixels, a few calls.

GPU run: ``python benchmarks/bench_sdxl.py --device cuda --encoder-layers 12 32 --calls 50 --capture
--channel-divisor 1 --size 1024 --capture-steps 10``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
import bench_maps  # noqa: E402
from bench_maps import _timed, gemm_gflops, prompts  # noqa: E402

# (module path, level, channels): SDXL-1.0 UNet, block_out_channels (320, 640, 1280),
# transformer_layers_per_block (1, 2, 10), cross-attention in down_blocks.1/2, mid, up_blocks.0/1
SDXL_LAYERS = (
    [(f"down_blocks.1.attentions.{a}.transformer_blocks.{t}.attn2", 1, 640) for a in (0, 1) for t in range(2)]
    + [(f"down_blocks.2.attentions.{a}.transformer_blocks.{t}.attn2", 2, 1280) for a in (0, 1) for t in range(10)]
    + [(f"mid_block.attentions.0.transformer_blocks.{t}.attn2", 2, 1280) for t in range(10)]
    + [(f"up_blocks.0.attentions.{a}.transformer_blocks.{t}.attn2", 2, 1280) for a in (0, 1, 2) for t in range(10)]
    + [(f"up_blocks.1.attentions.{a}.transformer_blocks.{t}.attn2", 1, 640) for a in (0, 1, 2) for t in range(2)]
)
HEAD_DIM = 64


def sdxl_layers(latent: int = 128):
    from ovstore.store import LayerInfo

    out = []
    for name, level, channels in SDXL_LAYERS:
        size = latent >> level
        block = "mid" if name.startswith("mid") else name.split("_")[0]
        out.append(LayerInfo(name=name, block=block, level=level, height=size, width=size, heads=channels // HEAD_DIM,
                             head_dim=HEAD_DIM, scale=HEAD_DIM ** -0.5, key_input_dim=2048))
    return out


def bytes_table(calls: int = 50) -> None:
    """Exact uncompressed bytes per image per preset (float16, one branch, ``calls`` Euler calls)."""
    from ovstore.capture.config import PRESETS
    from ovstore.families.unet import UNetFamily
    from ovstore.store import ContextSpec, ModelIdentity, StoreLayout
    from ovstore.selection import parse_index_spec, resolve_indices

    layers = sdxl_layers()
    identity = ModelIdentity(id="sdxl-shaped", source="local", pipeline_class="StableDiffusionXLPipeline")
    print(f"\nBytes per image, SDXL-1.0 at 1024² (latent 128², {len(layers)} layers), float16, one branch, "
          f"{calls} UNet calls, uncompressed (exact):\n")
    print("| preset | layers | stored calls | queries per image | + context (77 × 2048) | total |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, preset in PRESETS.items():
        chosen = list(layers)
        if preset["skip_finest"]:
            finest = min(l.level for l in chosen)
            chosen = [l for l in chosen if l.level > finest]
        if preset.get("thin"):
            keep = set(UNetFamily().stack_leaders(chosen))
            chosen = [l for l in chosen if l.name in keep]
        kept = resolve_indices(parse_index_spec(preset["calls"]) if preset["calls"] else None, calls, what="call")
        layout = StoreLayout(model=identity, layers=tuple(chosen), height=1024, width=1024, latent_height=128,
                             latent_width=128, branches=("uncond",), num_unet_calls=calls, calls=tuple(kept),
                             context=ContextSpec(length=77, features=2048, dtype="float16"))
        q, c = layout.query_bytes_per_image(), layout.context_bytes_per_image()
        print(f"| {name} | {len(chosen)} | {len(kept)} | {q / 1e9:.2f} GB | {c / 1e3:.0f} KB | {(q + c) / 1e9:.2f} GB |")


def sdxl_encoders(layers: tuple[int, int]):
    """Random text encoders of SDXL's shapes: CLIP ViT-L/14 (768) and OpenCLIP ViT-bigG/14 (1280, projection)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    common = dict(max_position_embeddings=77, vocab_size=49408, bos_token_id=49406, eos_token_id=49407,
                  pad_token_id=49407)
    te1 = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                       num_hidden_layers=layers[0], **common))
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_attention_heads=20,
                                                     projection_dim=1280, num_hidden_layers=layers[1], **common))
    return te1, te2


def make_encoder_dir(path: Path, layers: tuple[int, int]) -> Path:
    """Random encoders of SDXL's widths (CLIP-L 768, bigG 1280 with projection) + CLIP tokenizer."""
    from ovstore.models import clip_tokenizer

    if (path / "text_encoder_2" / "config.json").exists():
        return path
    torch.manual_seed(0)
    te1, te2 = sdxl_encoders(layers)
    te1.save_pretrained(path / "text_encoder")
    te2.save_pretrained(path / "text_encoder_2")
    for sub in ("tokenizer", "tokenizer_2"):
        clip_tokenizer().save_pretrained(path / sub)
    (path / "model_index.json").write_text('{"_class_name": "StableDiffusionXLPipeline"}')
    return path


def make_store(path: Path, encoder_dir: Path, calls: int, latent: int = 128) -> Path:
    from ovstore.analyze.text import TextEncoder  # noqa: F401  (the family loads it)
    from ovstore.families import get_family
    from ovstore.store import ImageRecord, ModelIdentity, StoreLayout, StoreWriter, TextRecipe

    recipe = TextRecipe(tokenizers=("tokenizer", "tokenizer_2"), encoders=("text_encoder", "text_encoder_2"),
                        encoder_classes=("CLIPTextModel", "CLIPTextModelWithProjection"), widths=(768, 1280),
                        hidden_state=-2)
    probe = ModelIdentity(id=str(encoder_dir), source="local", pipeline_class="StableDiffusionXLPipeline",
                          path=str(encoder_dir), text=recipe, text_encoder_hidden_size=2048)
    encoder = get_family("unet").load_text_encoder(probe, str(encoder_dir))
    identity = ModelIdentity(**{**{f: getattr(probe, f) for f in probe.__dataclass_fields__},
                                "text_encoder_fingerprint": encoder.fingerprint()})
    layers = sdxl_layers(latent)
    layout = StoreLayout(model=identity, layers=tuple(layers), height=latent * 8, width=latent * 8,
                         latent_height=latent, latent_width=latent, branches=("uncond",), num_unet_calls=calls,
                         calls=tuple(range(calls)), query_dtype="float16")
    if (path / "zarr.json").exists():
        return path
    writer = StoreWriter.open(path, layout)
    rng = np.random.default_rng(0)
    writer.write_key_projections({
        l.name: (rng.standard_normal((l.heads * l.head_dim, 2048), dtype=np.float32) / np.sqrt(2048), None)
        for l in layers})
    (slot,) = writer.reserve([ImageRecord(prompt="random", seed=0)])
    queries = {l.name: rng.standard_normal((1, calls, l.heads, l.height, l.width, l.head_dim),
                                           dtype=np.float32).astype(np.float16) for l in layers}
    writer.write_image(slot, image=np.zeros((latent * 8, latent * 8, 3), np.uint8), queries=queries,
                       timesteps=np.arange(calls, dtype=float), branch_labels=("uncond",))
    writer.mark_complete(slot)
    return path


def joined_penultimate(encoder, ids: torch.Tensor) -> torch.Tensor:
    """SDXL key input: both encoders' ``hidden_states[-2]`` joined on channels, ``(tokens, 2048)``."""
    return torch.cat([m(ids, output_hidden_states=True).hidden_states[-2][0] for _, m in encoder.components], -1)


def reference_style(store, encoder, texts):
    """One prompt at a time, a loop over layers and calls (bench_maps' loop with SDXL's key input)."""
    return bench_maps.reference_style(store, encoder, texts, embed=joined_penultimate)


def flops(store, encoder, texts) -> float:
    layers = [l for l in store.layers if l.block != "mid"]
    lengths = [len(encoder.tokenizer(t)["input_ids"]) for t in texts]
    tokens = sum(lengths)
    qk = sum(2 * store.layout.n_steps * l.heads * l.head_dim * l.height * l.width for l in layers) * tokens
    text = 0.0
    for _, m in encoder.components:
        weights = sum(p.numel() for n, p in m.named_parameters() if "embeddings" not in n)
        text += 2 * weights * tokens + 4 * m.config.num_hidden_layers * m.config.hidden_size * sum(n * n for n in lengths)
    return float(qk + text)


def maps_table(store, encoder, counts, baseline_max) -> None:
    from ovstore.analyze import compute_maps

    device = str(bench_maps.DEVICE)
    compute_maps(store, prompts(2), text_encoder=encoder, device=device)  # warm-up
    gflops = gemm_gflops()
    print(f"\nmeasured in this run: float32 matrix product {gflops:.0f} GFLOP/s\n")
    print("| prompts | ovstore s | ovstore prompts/s | baseline s | baseline prompts/s | speed-up | matmul bound s | "
          "ovstore ÷ bound | max abs diff |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    base_rate = None
    for n in counts:
        texts = prompts(n, seed=n)
        ours, t_ours = _timed(lambda: compute_maps(store, texts, text_encoder=encoder, device=device).values[0])
        bound = flops(store, encoder, texts) / (gflops * 1e9)
        if n <= baseline_max:
            base, t_base = _timed(reference_style, store, encoder, texts)
            base_rate = n / t_base
            cols = f"{t_base:.2f} | {base_rate:.2f} | {t_base / t_ours:.1f}x"
            diff = f"{float(np.abs(ours - base).max()):.1e}"
        else:
            cols = f"({n / base_rate:.0f}) | ({base_rate:.2f}) | ({n / base_rate / t_ours:.1f}x)"
            diff = "-"
        print(f"| {n} | {t_ours:.2f} | {n / t_ours:.1f} | {cols} | {bound:.2f} | {t_ours / bound:.2f} | {diff} |")
    print(f"\n(parentheses: baseline extrapolated from its rate at {baseline_max} prompts)")


def capture_overhead(divisor: int, size: int, steps: int, repeats: int, encoder_layers: tuple[int, int]) -> None:
    """Generation with and without capture, SDXL layout with channels / ``divisor`` (1: SDXL-1.0's
    UNet and autoencoder shapes), alternating plain and captured runs so that drift hits both."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    from ovstore.capture import CaptureConfig, build_requests, capture, model_identity
    from ovstore.models import clip_tokenizer

    torch.manual_seed(0)
    ch = [c // divisor for c in (320, 640, 1280)]
    unet = UNet2DConditionModel(
        sample_size=size // 8, block_out_channels=ch, layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=tuple(max(1, c // 64) for c in ch),
        cross_attention_dim=2048, addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=6 * 256 + 1280, use_linear_projection=True,
        norm_num_groups=32 // divisor if 32 % divisor == 0 else 8)
    te1, te2 = sdxl_encoders(encoder_layers)
    vae_channels = (128, 256, 512, 512) if divisor == 1 else (32, 32, 32, 32)  # SDXL's autoencoder at 1
    vae = AutoencoderKL(block_out_channels=vae_channels, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=32,
                        layers_per_block=2 if divisor == 1 else 1)
    params = sum(p.numel() for p in unet.parameters())
    tok = clip_tokenizer()
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok,
                                     unet=unet, scheduler=EulerDiscreteScheduler(), add_watermarker=False)
    pipe.to(bench_maps.DEVICE)
    pipe.set_progress_bar_config(disable=True)
    identity = model_identity(pipe, "sdxl-layout", source="builtin")
    kwargs = dict(num_inference_steps=steps, guidance_scale=5.0, height=size, width=size, output_type="np")
    print(f"\nCapture overhead, SDXL layout, UNet channels {ch} (÷{divisor}, {params / 1e9:.2f} B parameters), "
          f"autoencoder {vae_channels}, encoders {encoder_layers[0]} + {encoder_layers[1]} layers, {size}², {steps} "
          f"calls, guidance 5 (batch of 2), full preset, float16 storage, {repeats} alternating pairs, "
          f"{torch.get_num_threads()} thread(s):\n")
    print("| run | plain s | with capture s | overhead | plain CPU s | with capture CPU s | CPU overhead |")
    print("|---|---:|---:|---:|---:|---:|---:|")

    def timed(fn):
        """Wall and process CPU seconds (all threads, the store writer's included)."""
        c0, t0 = time.process_time(), time.perf_counter()
        _timed(fn)
        return time.perf_counter() - t0, time.process_time() - c0

    with tempfile.TemporaryDirectory() as tmp:
        plain, ours = [], []
        for r in range(repeats):
            plain.append(timed(lambda: pipe("a photo", generator=torch.Generator("cpu").manual_seed(r), **kwargs)))
            config = CaptureConfig(num_inference_steps=steps, guidance=5.0, height=size, width=size)
            req = build_requests([("a photo", None, r)], guidance=5.0, num_inference_steps=steps)
            ours.append(timed(lambda: capture(pipe, identity, req, Path(tmp) / f"s{r}.zarr", config=config)))
            (pw, pc), (ow, oc) = plain[-1], ours[-1]
            print(f"| pair {r} | {pw:.2f} | {ow:.2f} | {ow / pw:.3f} | {pc:.1f} | {oc:.1f} | {oc / pc:.3f} |",
                  flush=True)
        from ovstore.store import open_store

        layout = open_store(Path(tmp) / "s0.zarr").layout
        (pw, pc), (ow, oc) = (min(x[0] for x in plain), min(x[1] for x in plain)), \
            (min(x[0] for x in ours), min(x[1] for x in ours))
        print(f"| best | {pw:.2f} | {ow:.2f} | {ow / pw:.3f} | {pc:.1f} | {oc:.1f} | {oc / pc:.3f} |")
        print(f"\nstored per image: {(layout.query_bytes_per_image() + layout.context_bytes_per_image()) / 1e6:.1f} MB "
              f"before compression")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--calls", type=int, default=2, help="stored UNet calls of the map store")
    parser.add_argument("--counts", type=int, nargs="+", default=[1, 100, 1000])
    parser.add_argument("--baseline-max", type=int, default=100)
    parser.add_argument("--encoder-layers", type=int, nargs="+", default=[2],
                        help="depth of the random text encoders: one number for both, or CLIP-L's and bigG's "
                             "(SDXL: 12 32)")
    parser.add_argument("--no-maps", action="store_true")
    parser.add_argument("--capture", action="store_true", help="also measure capture overhead")
    parser.add_argument("--channel-divisor", type=int, default=4)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--capture-steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--work-dir", type=Path, default=None)
    args = parser.parse_args()
    layers = tuple(args.encoder_layers * 2)[:2] if len(args.encoder_layers) == 1 else tuple(args.encoder_layers)
    if len(layers) != 2:
        parser.error("--encoder-layers takes one or two numbers")
    torch.set_num_threads(args.threads)
    bench_maps.DEVICE = torch.device(args.device)
    bytes_table()
    if not args.no_maps:
        from ovstore.analyze import load_text_encoder
        from ovstore.store import open_store

        work = args.work_dir or Path(tempfile.mkdtemp(prefix="ovstore-sdxl-"))
        encoders = make_encoder_dir(work / f"encoders-{layers[0]}-{layers[1]}", layers)
        store = open_store(make_store(work / f"sdxl-{args.calls}.zarr", encoders, args.calls))
        encoder = load_text_encoder(store.layout.model, device=args.device)
        print(f"\nMaps, SDXL-shaped store (60 layers used of 70, {args.calls} calls, latent 128², float16), text: "
              f"random CLIP-L + bigG widths (768 + 1280, hidden_states[-2]) with {layers[0]} and {layers[1]} "
              f"layers (SDXL: 12 and 32), {args.threads} thread(s), {args.device}:")
        maps_table(store, encoder, args.counts, args.baseline_max)
    if args.capture:
        capture_overhead(args.channel_divisor, args.size, args.capture_steps, args.repeats, layers)


if __name__ == "__main__":
    main()

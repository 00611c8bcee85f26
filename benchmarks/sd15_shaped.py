"""An SD-1.5-shaped store with random contents, for benchmarks at real sizes.

Real layer shapes (16 cross-attention layers: 64x64/32x32/16x16/8x8, 8 heads, head_dim
40/80/160, to_k 768 -> 320/640/1280), random queries and key projections, and a randomly
initialised text encoder of CLIP ViT-L/14's shape (hidden 768, 12 layers) saved as a local
pipeline directory, so that analysis loads it through the ordinary path.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]

# (module path, level, channels): SD 1.5's UNet2DConditionModel, block_out_channels (320, 640, 1280, 1280)
SD15_LAYERS = (
    [(f"down_blocks.{b}.attentions.{a}.transformer_blocks.0.attn2", b, c)
     for b, c in ((0, 320), (1, 640), (2, 1280)) for a in (0, 1)]
    + [("mid_block.attentions.0.transformer_blocks.0.attn2", 3, 1280)]
    + [(f"up_blocks.{b}.attentions.{a}.transformer_blocks.0.attn2", 3 - b, c)
       for b, c in ((1, 1280), (2, 640), (3, 320)) for a in (0, 1, 2)]
)


def make_text_encoder_dir(path: Path) -> Path:
    """A random CLIP ViT-L/14-shaped text encoder + the real CLIP tokenizer, as a pipeline dir."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from ovstore.models import clip_tokenizer

    if (path / "text_encoder" / "config.json").exists():
        return path
    torch.manual_seed(0)
    config = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                            max_position_embeddings=77, vocab_size=49408, projection_dim=768,
                            bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    CLIPTextModel(config).save_pretrained(path / "text_encoder")
    clip_tokenizer().save_pretrained(path / "tokenizer")
    (path / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    return path


def make_sd15_store(path: Path, encoder_dir: Path, *, n_images: int = 1, n_calls: int = 10,
                    dtype: str = "float16", seed: int = 0) -> Path:
    """Write an SD-1.5-shaped store of ``n_images`` images with ``n_calls`` stored UNet calls."""
    from ovstore.analyze import load_text_encoder
    from ovstore.store import ImageRecord, LayerInfo, ModelIdentity, StoreLayout, StoreWriter

    probe = ModelIdentity(id=str(encoder_dir), source="local", pipeline_class="StableDiffusionPipeline",
                          path=str(encoder_dir))
    encoder = load_text_encoder(probe)
    identity = ModelIdentity(id=str(encoder_dir), source="local", pipeline_class="StableDiffusionPipeline",
                             path=str(encoder_dir), text_encoder_hidden_size=768,
                             text_encoder_fingerprint=encoder.fingerprint())
    layers = []
    for name, level, channels in SD15_LAYERS:
        size = 64 >> level
        layers.append(LayerInfo(name=name, block=name.split("_")[0], level=level, height=size, width=size,
                                heads=8, head_dim=channels // 8, scale=(channels // 8) ** -0.5, key_input_dim=768))
    layout = StoreLayout(model=identity, layers=tuple(layers), height=512, width=512, latent_height=64,
                         latent_width=64, branches=("uncond",), num_unet_calls=n_calls, calls=tuple(range(n_calls)),
                         query_dtype=dtype)
    writer = StoreWriter.open(path, layout)
    rng = np.random.default_rng(seed)
    writer.write_key_projections({
        l.name: ((rng.standard_normal((l.heads * l.head_dim, 768), dtype=np.float32) / np.sqrt(768)), None)
        for l in layers
    })
    slots = writer.reserve([ImageRecord(prompt=f"random {i}", seed=i) for i in range(n_images)])
    for slot in slots:
        queries = {l.name: rng.standard_normal((1, n_calls, l.heads, l.height, l.width, l.head_dim),
                                               dtype=np.float32).astype(dtype) for l in layers}
        image = rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)
        writer.write_image(slot, image=image, queries=queries, timesteps=np.arange(n_calls)[::-1] * 20.0,
                           branch_labels=("uncond",))
        writer.mark_complete(slot)
    return path

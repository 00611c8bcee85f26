"""Toy pipeline: layout, text only through cross-attention, save/load round trip, probe."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from ovstore.toyworld.model import build_toy_pipeline, load_toy_pipeline, save_toy_pipeline  # noqa: E402
from ovstore.toyworld.probe import run_probe  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pipe():
    torch.set_num_threads(1)
    p = build_toy_pipeline(seed=0)
    p.set_progress_bar_config(disable=True)
    return p


def test_text_reaches_unet_only_through_cross_attention(pipe):
    cfg = pipe.unet.config
    assert cfg.class_embed_type is None and cfg.addition_embed_type is None and cfg.encoder_hid_dim is None
    attn2 = [n for n, _ in pipe.unet.named_modules() if n.endswith("attn2")]
    assert attn2 and any(n.startswith("down_blocks.0") for n in attn2)
    assert pipe.text_encoder.config.max_position_embeddings == 77


def test_save_is_small_and_loads_in_float32(pipe, tmp_path):
    path = save_toy_pipeline(pipe, tmp_path / "toy")
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    assert size <= 20 * 2**20
    from diffusers import StableDiffusionPipeline

    for loaded in (load_toy_pipeline(path), StableDiffusionPipeline.from_pretrained(str(path))):
        for name in ("unet", "vae", "text_encoder"):
            assert next(getattr(loaded, name).parameters()).dtype == torch.float32
    a = next(pipe.text_encoder.parameters())
    assert a.dtype == torch.float32  # saving did not touch the live pipeline


def test_probe_runs_and_reports(pipe):
    res = run_probe(pipe, ["a red circle and a blue square"], steps=2, guidance_scale=2.0)
    assert res.images.shape == (1, 32, 32, 3)
    assert res.metrics["attn_calls"] == 2 * 7
    assert set(res.word_maps[0]) == {"red", "circle", "blue", "square"}
    assert all(np.isfinite(m).all() for m in res.word_maps[0].values())

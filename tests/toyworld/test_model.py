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


def test_word_probe_reports_every_target_figure(pipe):
    from ovstore.toyworld.probe import rich_probe_scenes, run_word_probe

    scenes = rich_probe_scenes(0, per_count=2)
    res = run_word_probe(pipe, [s.caption for s in scenes], steps=2, guidance_scale=2.0)
    m = res.metrics
    assert res.images.shape == (6, 32, 32, 3)
    assert m["attn_calls"] == 2 * 6  # ovstore's default maps: mid block left out
    for key in ("mass_sot", "mass_word", "mass_filler", "mass_eot_pad"):
        assert 0 <= m[key] <= 1
    assert abs(m["mass_sot"] + m["mass_word"] + m["mass_filler"] + m["mass_eot_pad"] - 1) < 1e-5
    assert m["n_words"] + m["n_missing"] > 0
    for key in ("bare_u_iou", "bare_u_iou_2obj", "synonym_u"):  # the attributions as ovstore maps them
        assert 0 <= m[key] <= 1


def test_training_resumes_exactly(tmp_path):
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "scripts" / "train_toyworld.py"
    spec = importlib.util.spec_from_file_location("train_toyworld", script)
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    common = ["--vae-steps", "2", "--vae-batch", "4", "--batch", "4", "--probe-every", "1000", "--ckpt-every", "1",
              "--warmup", "1", "--ground-weight", "0.01", "--text-lr-scale", "0.5", "--probe-per-count", "1",
              "--probe-steps", "1", "--unet-channels", "16,16,16", "--log-every", "1",
              "--list-p", "0.5", "--partial-p", "0.5", "--unpadded-p", "0.5"]
    train.main(["--out", str(tmp_path / "a"), "--steps", "3", *common])
    train.main(["--out", str(tmp_path / "b"), "--steps", "2", *common])
    train.main(["--out", str(tmp_path / "b"), "--steps", "3", "--resume", *common])
    a = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=False)
    b = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=False)
    assert a["step"] == b["step"] == 3
    for part in ("unet", "text", "ema_unet", "ema_text"):
        for name, value in a[part].items():
            assert torch.equal(value, b[part][name]), (part, name)
    assert [h["loss"] for h in a["history"]] == [h["loss"] for h in b["history"]]
    # a resume under other settings (here a longer schedule) keeps both recipes and where each began
    assert [r["from_step"] for r in a["recipe"]] == [0]
    assert [r["from_step"] for r in b["recipe"]] == [0, 2]
    assert [r["hyperparameters"]["steps"] for r in b["recipe"]] == [2, 3]
    assert "ground" in a["history"][-1]

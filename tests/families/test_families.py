"""The family seam: registry, unsupported pipelines, format-v1 stores, --generation-context errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY_SD15

V1 = Path(__file__).parent.parent / "data" / "v1-store"


def test_registry_has_the_unet_family_and_entry_points(monkeypatch):
    import importlib.metadata as md

    from ovstore import families
    from ovstore.families import ModelFamily, available_families, get_family
    from ovstore.families.unet import UNetFamily

    assert isinstance(get_family("unet"), UNetFamily)

    class Other(UNetFamily):
        name = "other"
        pipelines = "a plug-in family"

    class EntryPoint:
        name = "other"

        def load(self):
            return Other

    monkeypatch.setattr(md, "entry_points", lambda group: [EntryPoint()] if group == "ovstore.families" else [])
    available_families.cache_clear()
    try:
        assert isinstance(available_families()["other"], ModelFamily)
        assert set(available_families()) == {"unet", "sd3", "flux", "other"}
    finally:
        available_families.cache_clear()
    with pytest.raises(Exception, match="not known to this ovstore"):
        get_family("mmdit")
    assert families.ENTRY_POINT_GROUP == "ovstore.families"


def _dit_pipeline():
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                        num_layers=1, sample_size=8, patch_size=2, num_embeds_ada_norm=10,
                                        norm_num_groups=8)
    vae = AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=8)
    return DiTPipeline(transformer=transformer, vae=vae, scheduler=DDIMScheduler())


def _kandinsky_like_pipeline():
    """A UNet2DConditionModel whose cross-attention attends image embeddings, no text encoder."""
    import torch
    from diffusers import DDPMScheduler, KandinskyV22Pipeline, UNet2DConditionModel, VQModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=8, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"), mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        encoder_hid_dim=16, encoder_hid_dim_type="image_proj", addition_embed_type="image", cross_attention_dim=32,
        attention_head_dim=8, norm_num_groups=8, resnet_time_scale_shift="scale_shift")
    movq = VQModel(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                   up_block_types=("AttnUpDecoderBlock2D", "UpDecoderBlock2D"), latent_channels=4,
                   norm_num_groups=8, num_vq_embeddings=12, vq_embed_dim=4)
    return KandinskyV22Pipeline(unet=unet, scheduler=DDPMScheduler(), movq=movq)


@pytest.mark.parametrize("build", [_dit_pipeline, _kandinsky_like_pipeline], ids=["dit", "kandinsky-like"])
def test_unsupported_pipelines_refused_naming_the_families(build, tmp_path, monkeypatch, capsys):
    from ovstore.cli import main

    pipe = build()
    pipe.save_pretrained(tmp_path / "pipe")
    monkeypatch.setattr("sys.argv", ["ovstore", "capture", str(tmp_path / "pipe"), "--prompt", "x",
                                     "--out", str(tmp_path / "o.zarr")])
    with pytest.raises(SystemExit) as exit_info:
        main()
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1, err
    assert type(pipe).__name__ in err and "supported: unet" in err and "SDXL" in err
    assert not (tmp_path / "o.zarr").exists()


def test_v1_store_opens_and_gives_the_maps_saved_at_its_creation():
    from ovstore.analyze import MapConfig, compute_maps, load_text_encoder
    from ovstore.analyze.text import check_recorded_encoder
    from ovstore.store import open_store, verify_store

    s = open_store(V1 / "store.zarr")
    assert s.format_version == 1 and s.layout.model.family == "unet" and s.layout.model.text is None
    assert s.layout.context is None and s.layout.model.text_recipe.hidden_state is None
    assert verify_store(s).ok
    encoder = load_text_encoder(s.layout.model, model=str(TINY_SD15))
    check_recorded_encoder(encoder, s.layout.model, s.path)  # the same encoder as at capture
    maps = compute_maps(s, ["a cat and a sofa", "car"], text_encoder=encoder)
    expected = np.load(V1 / "maps.npy")
    # the same engine on the same numbers; only the order of float32 layer sums may differ
    np.testing.assert_allclose(maps.values, expected, rtol=0, atol=1e-6 * np.abs(expected).max())
    cond = compute_maps(s, ["a cat and a sofa"], text_encoder=encoder, config=MapConfig(branch="cond"))
    expected = np.load(V1 / "maps_cond.npy")
    np.testing.assert_allclose(cond.values, expected, rtol=0, atol=1e-6 * np.abs(expected).max())


def test_appending_to_a_v1_store_keeps_it_v1(tiny_pipe, tmp_path):
    from ovstore.capture import CaptureConfig, build_requests, capture
    from ovstore.store import open_store

    copy = tmp_path / "v1.zarr"
    shutil.copytree(V1 / "store.zarr", copy)
    pipe, identity = tiny_pipe
    config = CaptureConfig(num_inference_steps=2, guidance=7.5, dtype="float32", branch="both", calls="0,-1")
    capture(pipe, identity, build_requests([("a bird", None, 5)], guidance=7.5, num_inference_steps=2), copy,
            config=config)
    s = open_store(copy)
    assert s.format_version == 1 and s.layout.context is None and s.complete_images() == [0, 1, 2]


def _cli(monkeypatch, capsys, *args):
    from ovstore.cli import main

    monkeypatch.setattr("sys.argv", ["ovstore", *map(str, args)])
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err.strip().splitlines()


def test_generation_context_cli_and_its_bad_combinations(golden_store, tmp_path, monkeypatch, capsys):
    code, lines = _cli(monkeypatch, capsys, "maps", golden_store, "--generation-context", "--out", tmp_path / "c.npy")
    assert code == 0, lines
    maps = np.load(tmp_path / "c.npy")
    assert maps.shape == (1, 77, 32, 32)
    # uncond branch (the store's): softmax over the 77 tokens of the encoded negative prompt ""
    np.testing.assert_allclose(maps.sum(1), 11 * 4 * 6, rtol=1e-5)
    for args, message in [
        (["-a", "cat"], "drop --attribution"),
        (["--activation", "sigmoid"], "drop --activation"),
    ]:
        code, lines = _cli(monkeypatch, capsys, "maps", golden_store, "--generation-context", *args,
                           "--out", tmp_path / "x.npy")
        assert code == 2 and len(lines) == 1 and message in lines[0], lines
    code, lines = _cli(monkeypatch, capsys, "maps", V1 / "store.zarr", "--generation-context",
                       "--out", tmp_path / "y.npy")
    assert code == 2 and len(lines) == 1 and "does not hold" in lines[0] and "recapture" in lines[0], lines


def test_img2img_pipeline_is_captured_through_its_text_to_image_twin(tmp_path, tiny_pipe):
    from diffusers import StableDiffusionImg2ImgPipeline

    from ovstore.capture import load_pipeline

    StableDiffusionImg2ImgPipeline.from_pretrained(str(TINY_SD15)).save_pretrained(tmp_path / "i2i")
    pipe, identity = load_pipeline(str(tmp_path / "i2i"))
    assert type(pipe).__name__ == "StableDiffusionPipeline" and identity.family == "unet"
    assert identity.text_encoder_fingerprint == tiny_pipe[1].text_encoder_fingerprint

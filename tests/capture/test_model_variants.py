"""Stable Diffusion 2.x-style UNets (linear projections, upcast attention, per-block heads)
and model-loading errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ovstore.analyze import compute_maps
from ovstore.capture import CaptureConfig, build_requests, capture, load_pipeline, model_identity
from ovstore.errors import ModelLoadError
from ovstore.store import open_store


@pytest.fixture(scope="module")
def sd2_style_pipe(tiny_pipe):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    base, _ = tiny_pipe
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64, 64),
        attention_head_dim=(2, 4, 8), use_linear_projection=True, upcast_attention=True, cross_attention_dim=32,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    ).eval()
    pipe = StableDiffusionPipeline(vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer,
                                   unet=unet, scheduler=base.scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe, model_identity(pipe, "sd2-style-test", source="local")


def test_sd2_style_capture_and_maps(sd2_style_pipe, tmp_path):
    pipe, identity = sd2_style_pipe
    seen = {}
    hooks = [m.to_q.register_forward_hook(lambda m, i, o, n=n: seen.setdefault(n, []).append(o[0].detach().clone()))
             for n, m in pipe.unet.named_modules() if n.endswith("attn2")]
    pipe(prompt=["a cat"], generator=[torch.Generator("cpu").manual_seed(1)], num_inference_steps=2,
         guidance_scale=7.5, output_type="np")
    for h in hooks:
        h.remove()
    out = tmp_path / "sd2.zarr"
    capture(pipe, identity, build_requests([("a cat", None, 1)], num_inference_steps=2), out,
            config=CaptureConfig(num_inference_steps=2, dtype="float32"))
    store = open_store(out)
    heads = {l.name: l.heads for l in store.layers}
    assert set(heads.values()) == {2, 4, 8}  # per-block head counts
    assert all(l.upcast_attention for l in store.layers)
    for info in store.layers:
        q = store.queries(info.name, 0)  # (step, head, y, x, ch)
        expected = torch.stack(seen[info.name]).numpy()  # (step, pixel, inner)
        got = q.transpose(0, 2, 3, 1, 4).reshape(expected.shape)
        np.testing.assert_array_equal(got, expected)
    from ovstore.analyze import TextEncoder

    encoder = TextEncoder(pipe.tokenizer, pipe.text_encoder)
    maps = compute_maps(store, "a cat and a dog", text_encoder=encoder)
    per_pixel = sum(l.heads for l in store.layers if l.block != "mid") * 3  # 3 UNet calls
    np.testing.assert_allclose(maps.sum("token").values, per_pixel, rtol=1e-5)


def test_hub_id_without_network_suggests_a_local_directory(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="local directory"):
        load_pipeline("some-org/some-model-that-is-not-cached")


def test_not_a_pipeline_directory(tmp_path):
    with pytest.raises(ModelLoadError, match="not a diffusers pipeline directory"):
        load_pipeline(str(tmp_path))

"""Fixtures of the family tests: tiny SDXL pipelines (the online golden one, and one built in
code with two text encoders of different widths) and float32 stores captured from them."""

from __future__ import annotations

from pathlib import Path

import pytest

DATA = Path(__file__).parent.parent / "data"
SDXL = DATA / "online" / "sdxl-pipeline"
TINY_SD15 = DATA / "golden" / "tiny-sd15"


@pytest.fixture(scope="session")
def sdxl_pipe():
    from ovstore.capture import load_pipeline

    return load_pipeline(str(SDXL))


def build_sdxl(path: Path, *, pad_token_2: str | None = None) -> Path:
    """A random SDXL pipeline: text_time UNet with cross-attention at two grids (one with two
    transformer layers), ``text_encoder`` 16 wide and ``text_encoder_2`` 24 wide (joined: 40).
    ``pad_token_2``: the second tokenizer pads with this token (real SDXL checkpoints: "!")."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(11)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(16, 32, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 2, 4), cross_attention_dim=40,
        norm_num_groups=8, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 16, use_linear_projection=True)
    with torch.no_grad():  # sharper attention than the random initialisation gives
        for name, module in unet.named_modules():
            if name.endswith("attn2"):
                module.to_k.weight.mul_(6.0)
    common = dict(intermediate_size=32, num_attention_heads=2, num_hidden_layers=3, vocab_size=49408,
                  max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    te1 = CLIPTextModel(CLIPTextConfig(hidden_size=16, **common))
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=24, projection_dim=16, **common))
    tok = AutoTokenizer.from_pretrained(str(TINY_SD15 / "tokenizer"))
    tok_2 = tok
    if pad_token_2 is not None:
        tok_2 = AutoTokenizer.from_pretrained(str(TINY_SD15 / "tokenizer"))
        tok_2.pad_token = pad_token_2
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8, sample_size=32)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       timestep_spacing="leading", steps_offset=1)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok_2,
                                     unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=True,
                                     add_watermarker=False)
    pipe.save_pretrained(str(path))
    return path


@pytest.fixture(scope="session")
def sdxl_code_dir(tmp_path_factory):
    return build_sdxl(tmp_path_factory.mktemp("sdxl-code") / "pipeline")


@pytest.fixture(scope="session")
def sdxl_code_pipe(sdxl_code_dir):
    from ovstore.capture import load_pipeline

    return load_pipeline(str(sdxl_code_dir))


def capture_store(pipe_and_identity, out, prompts, *, steps=3, guidance=5.0, branch="cond", dtype="float32",
                  negative=None, batch_size=1):
    from ovstore.capture import CaptureConfig, build_requests, capture

    pipe, identity = pipe_and_identity
    requests = build_requests([(p, negative, 10 + k) for k, p in enumerate(prompts)], guidance=guidance,
                              num_inference_steps=steps)
    config = CaptureConfig(num_inference_steps=steps, guidance=guidance, dtype=dtype, branch=branch,
                           batch_size=batch_size)
    capture(pipe, identity, requests, out, config=config)
    return out


@pytest.fixture(scope="session")
def sdxl_store(tmp_path_factory, sdxl_pipe):
    """Two images of the golden SDXL pipeline, float32, cond branch."""
    return capture_store(sdxl_pipe, tmp_path_factory.mktemp("sdxl") / "sdxl.zarr",
                         ["a lighthouse on a rocky cliff", "a bowl of oranges on a table"])

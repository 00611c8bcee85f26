"""SDXL on the unet family: open-vocabulary maps equal a plain per-prompt loop, generation is
unchanged by capture, and tokens, labelling and text encoders of other families behave."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import TINY_SD15, capture_store

PROMPTS = ["a red house by the sea", "a dog"]
ATTRIBUTIONS = ["a house and the sea", "dog", "a watercolor lighthouse"]


def _hooked_generation(pipe, prompt, seed, steps, guidance):
    """Queries of every attn2 at every UNet call (cond half), hooked at to_q, as a user would."""
    queries: dict[str, list[torch.Tensor]] = {}
    handles = []
    for name, module in pipe.unet.named_modules():
        if name.endswith("attn2"):
            def hook(mod, inputs, out, name=name):
                queries.setdefault(name, []).append(out[-1].detach().clone())  # [uncond, cond]: cond is last
            handles.append(module.to_q.register_forward_hook(hook))
    try:
        pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, height=32, width=32,
             generator=torch.Generator("cpu").manual_seed(seed), output_type="np")
    finally:
        for h in handles:
            h.remove()
    return queries


def _reference_maps(pipe, queries, prompt, latent=16):
    """The OVAM loop for SDXL: unpadded tokens, both encoders' hidden_states[-2] joined, to_k,
    softmax over the prompt's tokens, sums over heads and calls, bilinear to the largest grid,
    sum over down/up layers."""
    ids = torch.tensor([pipe.tokenizer(prompt)["input_ids"]])
    with torch.no_grad():
        rows = torch.cat([pipe.text_encoder(ids, output_hidden_states=True).hidden_states[-2],
                          pipe.text_encoder_2(ids, output_hidden_states=True).hidden_states[-2]], dim=-1)[0]
        modules = dict(pipe.unet.named_modules())
        total = None
        sizes = {}
        per_layer = {}
        for name, calls in queries.items():
            if name.startswith("mid_block"):
                continue
            attn = modules[name]
            heads = attn.heads
            k = attn.to_k(rows)  # (T, inner)
            k = k.view(k.shape[0], heads, -1).transpose(0, 1)  # (H, T, d)
            acc = 0
            for q in calls:  # (N, inner)
                q = q.view(q.shape[0], heads, -1).transpose(0, 1)  # (H, N, d)
                p = (q @ k.transpose(1, 2) * attn.scale).softmax(-1)  # (H, N, T)
                acc = acc + p.sum(0)
            n = acc.shape[0]
            side = int(round(n ** 0.5))
            per_layer[name] = acc.T.reshape(-1, side, side)
            sizes[name] = side
        big = max(sizes.values())
        for name, m in per_layer.items():
            if sizes[name] != big:
                m = F.interpolate(m[None], size=(big, big), mode="bilinear", align_corners=False)[0]
            total = m if total is None else total + m
    return total.numpy()


def test_sdxl_open_vocabulary_maps_equal_per_prompt_loop(sdxl_code_pipe, tmp_path):
    from ovstore.analyze import MapConfig, compute_maps

    pipe, _ = sdxl_code_pipe
    store = capture_store(sdxl_code_pipe, tmp_path / "s.zarr", PROMPTS, steps=3, guidance=5.0)
    maps = compute_maps(store, ATTRIBUTIONS, config=MapConfig(branch="cond"))
    for k, prompt in enumerate(PROMPTS):
        queries = _hooked_generation(pipe, prompt, 10 + k, 3, 5.0)
        for j, attribution in enumerate(ATTRIBUTIONS):
            expected = _reference_maps(pipe, queries, attribution)
            got = maps.isel(image=k, token=maps.prompt_index.values == j).values
            assert got.shape == expected.shape
            assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()
    # the tokens' attention differs (not uniform), so the comparison means something
    first = maps.isel(image=0, token=maps.prompt_index.values == 0).values
    assert first.std(axis=0).mean() > 0.1 * first.mean()


def test_sdxl_store_records_family_and_recipe(sdxl_store):
    from ovstore.store import open_store

    s = open_store(sdxl_store)
    m = s.layout.model
    assert s.format_version == 2 and m.family == "unet" and m.pipeline_class == "StableDiffusionXLPipeline"
    assert m.text.encoders == ("text_encoder", "text_encoder_2") and m.text.hidden_state == -2
    assert m.text.widths == (16, 32) and m.text_encoder_hidden_size == 48
    assert {(l.height, l.width) for l in s.layers} == {(16, 16), (8, 8)} and len(s.layers) == 17
    assert s.layout.context.length == 77 and s.layout.context.features == 48


def test_sdxl_images_identical_with_and_without_capture(sdxl_pipe, tmp_path):
    from ovstore.store import open_store

    pipe, _ = sdxl_pipe
    prompts = ["a lighthouse on a rocky cliff", "a bowl of oranges"]
    for negative in (None, "blurry"):
        out = capture_store(sdxl_pipe, tmp_path / f"n{negative}.zarr", prompts, steps=3, negative=negative,
                            branch="both", dtype="float16")
        s = open_store(out)
        for k, prompt in enumerate(prompts):
            plain = pipe(prompt, negative_prompt=negative, num_inference_steps=3, guidance_scale=5.0,
                         generator=torch.Generator("cpu").manual_seed(10 + k), output_type="np").images[0]
            np.testing.assert_array_equal(s.image(k), np.round(np.clip(plain, 0, 1) * 255).astype(np.uint8))
        # no negative prompt: SDXL's force_zeros_for_empty_prompt gives zero unconditional context
        uncond, _ = s.context(0, 0)
        assert (np.abs(uncond).max() == 0) == (negative is None)


def test_store_of_one_family_refused_by_another_family_encoder(sdxl_store, tiny_pipe, golden_store):
    from ovstore.analyze import compute_maps, load_text_encoder
    from ovstore.errors import InvalidInputError, ModelLoadError
    from ovstore.store import open_store

    sd15_encoder = load_text_encoder(open_store(golden_store).layout.model, model=str(TINY_SD15))
    with pytest.raises(InvalidInputError, match="captured with model family") as info:
        compute_maps(sdxl_store, "a cat", text_encoder=sd15_encoder)
    assert "\n" not in str(info.value)
    sdxl_encoder = load_text_encoder(open_store(sdxl_store).layout.model)
    assert sdxl_encoder.hidden_size == 48 and len(sdxl_encoder.components) == 2
    with pytest.raises(InvalidInputError, match="captured with model family"):
        compute_maps(golden_store, "a cat", text_encoder=sdxl_encoder)
    with pytest.raises(ModelLoadError, match="text_encoder_2"):
        compute_maps(sdxl_store, "a cat", model=str(TINY_SD15))


def test_tokenizers_that_disagree_are_refused(sdxl_store):
    from ovstore.analyze import load_text_encoder
    from ovstore.errors import InvalidInputError
    from ovstore.store import open_store

    encoder = load_text_encoder(open_store(sdxl_store).layout.model)
    tok2 = encoder.components[1][0]
    original = tok2.__class__.__call__

    class Shifted(tok2.__class__):  # a second tokenizer with another vocabulary
        def __call__(self, *args, **kwargs):
            out = original(self, *args, **kwargs)
            out["input_ids"] = [[i + 1 for i in ids] for ids in out["input_ids"]]
            return out

    tok2.__class__ = Shifted
    try:
        with pytest.raises(InvalidInputError, match="tokenized differently"):
            encoder.encode(["a cat"])
    finally:
        tok2.__class__ = Shifted.__mro__[1]


def test_learned_tokens_combine_and_label_on_sdxl(sdxl_store, tmp_path):
    from ovstore.analyze import MapConfig, compute_maps, load_text_encoder
    from ovstore.analyze.text import start_of_text_row
    from ovstore.label import LabelConfig, label_store
    from ovstore.optimize import (OptimizeConfig, TokenTask, combined_attribution, load_token, optimize_tokens,
                                  save_token, token_attribution)
    from ovstore.store import open_store
    from PIL import Image

    s = open_store(sdxl_store)
    mask = np.zeros((64, 64), np.uint8)
    mask[:, :32] = 255
    Image.fromarray(mask).save(tmp_path / "m.png")
    tasks = [TokenTask(init_word="lighthouse", images=(0,), masks=(tmp_path / "m.png",), name="tower"),
             TokenTask(init_word="cliff", images=(0,), masks=(tmp_path / "m.png",), name="rock")]
    tokens = optimize_tokens(s, tasks, config=OptimizeConfig(epochs=3))
    for t in tokens:
        assert tuple(t.embedding.shape) == (2, 48) and t.hidden_size == 48  # spans both encoders
        save_token(t, tmp_path / f"{t.name}.safetensors")
    files = [load_token(tmp_path / f"{t.name}.safetensors") for t in tokens]
    encoder = load_text_encoder(s.layout.model)
    combined = combined_attribution(files, s.layout.model, start_of_text_row(encoder))
    maps = compute_maps(s, [token_attribution(files[0], s.layout.model), combined], config=MapConfig(branch="cond"))
    assert maps.shape == (2, 2 + 3, 16, 16) and np.isfinite(maps.values).all()
    # in one softmax the three rows' maps sum to the calls x heads at every pixel
    per_pixel = maps.isel(token=maps.prompt_index.values == 1).values.sum(1)
    np.testing.assert_allclose(per_pixel, 3 * sum(l.heads for l in s.layers if l.block != "mid"), rtol=1e-4)
    result = label_store(s, tmp_path / "labels", LabelConfig(classes=("lighthouse", "oranges")),
                         scheduler="synchronous")
    assert sorted(result.labelled) == [0, 1]
    assert len(list((tmp_path / "labels" / "SegmentationClass").glob("*.png"))) == 2


@pytest.mark.parametrize("preset,n_layers", [("full", 17), ("no-finest", 12), ("thin", 11), ("thin-half-calls", 11)])
def test_sdxl_presets_and_bytes_per_image(sdxl_pipe, preset, n_layers):
    from ovstore.capture import CaptureConfig, plan_capture

    pipe, identity = sdxl_pipe
    layout, _ = plan_capture(pipe, identity, CaptureConfig(num_inference_steps=4, guidance=5.0, preset=preset))
    assert len(layout.layers) == n_layers
    if preset == "no-finest":
        assert {(l.height, l.width) for l in layout.layers} == {(8, 8)}
    if preset.startswith("thin"):
        assert all(".transformer_blocks.0." in l.name for l in layout.layers)
    calls = 2 if preset.endswith("half-calls") else 4
    assert layout.n_steps == calls
    expected = sum(l.heads * l.head_dim * l.height * l.width * 2 for l in layout.layers) * calls
    assert layout.query_bytes_per_image() == expected
    # float16 embeddings, and int64 ids: the first tokenizer's, then both tokenizers' (they may differ)
    assert layout.context.tokenizers == ("tokenizer", "tokenizer_2")
    assert layout.context_bytes_per_image() == 77 * (48 * 2 + 8 * 3)

"""Analysis reproduces the OVAM reference maps and keeps its invariants."""

from __future__ import annotations

import numpy as np
import pytest

from ovstore.analyze import MapConfig, compute_maps, load_text_encoder, split_by_prompt, word_maps
from ovstore.errors import IncompleteImageError, InvalidInputError
from ovstore.selection import LayerSelection
from ovstore.store import open_store


@pytest.fixture(scope="module")
def golden_encoder(golden_store):
    return load_text_encoder(open_store(golden_store).layout.model)


def _rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_maps_equal_golden(golden_store, golden_case, golden_encoder):
    maps = compute_maps(golden_store, golden_case["attribution"], text_encoder=golden_encoder)
    assert maps.dims == ("image", "token", "y", "x")
    assert maps.shape == golden_case["maps"].shape
    assert maps["token_str"].values.tolist() == golden_case["attribution_tokens"]
    assert maps["token_id"].values.tolist() == golden_case["attribution_token_ids"]
    assert _rel(maps.values, golden_case["maps"]) <= 1e-4
    expanded = compute_maps(golden_store, golden_case["attribution"], text_encoder=golden_encoder,
                            config=MapConfig(size=(64, 64)))
    assert _rel(expanded.values, golden_case["maps_expanded"]) <= 1e-4


def test_text_embedding_equals_golden(golden_case, golden_encoder):
    (att,) = golden_encoder.encode([golden_case["attribution"]])
    np.testing.assert_allclose(att.embedding.numpy(), golden_case["text_embedding"], atol=1e-5)


def test_token_sum_invariant(golden_store, golden_case, golden_encoder):
    maps = compute_maps(golden_store, ["a cat and a sofa", "a completely different sentence about dogs"],
                        text_encoder=golden_encoder)
    for part in split_by_prompt(maps):
        np.testing.assert_allclose(part.sum("token").values, golden_case["checks"]["expected_sum_over_tokens"], rtol=1e-5)


def test_float16_storage_error_is_small(tiny_pipe, tmp_path, golden_case, golden_encoder):
    from ovstore.capture import CaptureConfig, build_requests, capture

    pipe, identity = tiny_pipe
    out = tmp_path / "fp16.zarr"
    capture(pipe, identity, build_requests([(golden_case["prompt"], None, 0)], num_inference_steps=10), out,
            config=CaptureConfig(num_inference_steps=10, dtype="float16"))
    maps = compute_maps(out, golden_case["attribution"], text_encoder=golden_encoder).values
    error = _rel(maps, golden_case["maps"])
    # float16 keeps 11 significant bits; measured: 6.5e-6 of the map maximum (BENCHMARKS.md)
    assert 0 < error <= 5e-5


def _one_prompt_reference(store, encoder, prompt, image):
    """The reference computation written out plainly: one prompt, loops over layers and calls."""
    import torch
    import torch.nn.functional as F

    (att,) = encoder.encode([prompt])
    layers = [l for l in store.layers if l.block != "mid"]
    total = 0
    for l in layers:
        weight, bias = store.key_projection(l.name)
        k = F.linear(att.embedding, torch.from_numpy(weight), None if bias is None else torch.from_numpy(bias))
        k = k.view(-1, l.heads, l.head_dim).transpose(0, 1)  # (head, token, ch)
        q = torch.from_numpy(store.queries(l.name, image)).float()  # (step, head, y, x, ch)
        acc = 0
        for t in range(q.shape[0]):
            scores = q[t].reshape(l.heads, -1, l.head_dim) @ k.transpose(1, 2) * l.scale
            acc = acc + scores.softmax(-1).sum(0)  # (pixel, token)
        m = acc.T.reshape(1, -1, l.height, l.width)
        total = total + F.interpolate(m, size=(32, 32), mode="bilinear", align_corners=False)[0]
    return total.numpy()


@pytest.mark.parametrize("config", [MapConfig(), MapConfig(memory_budget=50_000, block_budget=200_000)],
                         ids=["one-pass", "small-chunks-and-blocks"])
def test_batched_prompts_equal_one_at_a_time(multi_store, config):
    prompts = ["a cat and a sofa", "dog", "a red car on a street at night", "sofa", "a b c d e f g h", "cat",
               "a photo of a dog", "a photo of a cat"]  # the last two share 5 rows: computed once
    store = open_store(multi_store)
    encoder = load_text_encoder(store.layout.model)
    batched = compute_maps(store, prompts, text_encoder=encoder, config=config)
    assert batched.sizes["image"] == 3
    for k, part in enumerate(split_by_prompt(batched)):
        assert part["prompt"].values[0] == prompts[k]
        for row, image in enumerate(batched["image"].values):
            expected = _one_prompt_reference(store, encoder, prompts[k], int(image))
            np.testing.assert_allclose(part.values[row], expected, rtol=1e-5, atol=1e-4)


def test_options_subsets_and_normalization(multi_store):
    store = open_store(multi_store)
    encoder = load_text_encoder(store.layout.model)
    full = compute_maps(store, "a cat", text_encoder=encoder, images=[0])
    low = compute_maps(store, "a cat", text_encoder=encoder, images=[0],
                       config=MapConfig(layers=LayerSelection(resolutions=((16, 16),)), steps="0:2"))
    assert low.sizes["y"] == 16 and low.attrs["steps"] == [0, 1]
    # softmax rows sum to heads per layer and step: 2 steps x 3 layers x 4 heads
    np.testing.assert_allclose(low.sum("token").values, 2 * 3 * 4, rtol=1e-5)
    mean = compute_maps(store, "a cat", text_encoder=encoder, images=[0],
                        config=MapConfig(head_reduction="mean", step_reduction="mean", layer_reduction="mean"))
    np.testing.assert_allclose(mean.sum("token").values, 1.0, rtol=1e-5)
    norm = compute_maps(store, "a cat", text_encoder=encoder, images=[0], config=MapConfig(normalize="minmax"))
    assert np.allclose(norm.values.max(axis=(-2, -1)), 1) and np.allclose(norm.values.min(axis=(-2, -1)), 0)
    with_mid = compute_maps(store, "a cat", text_encoder=encoder, images=[0],
                            config=MapConfig(layers=LayerSelection(include_mid=True)))
    assert not np.allclose(with_mid.values, full.values)


def test_word_maps_combine_subtokens(golden_store, golden_encoder):
    maps = compute_maps(golden_store, ["a photo of a cat on a sofa", "tabby kittens"], text_encoder=golden_encoder)
    words = word_maps(maps)
    assert words.dims == ("image", "word", "y", "x")
    texts = words["word_str"].values.tolist()
    assert texts[:3] == ["<|startoftext|>", "a", "photo"] and "kittens" in texts
    kitten_tokens = maps.isel(token=(maps.prompt_index == 1).values)
    tok = [t for t in kitten_tokens["token_str"].values.tolist() if t not in ("<|startoftext|>", "<|endoftext|>")]
    assert "".join(tok).replace("</w>", "") == "tabbykittens"
    np.testing.assert_allclose(words.sum("word").values, maps.sum("token").values, rtol=1e-5)


def test_bad_inputs(multi_store):
    store = open_store(multi_store)
    encoder = load_text_encoder(store.layout.model)
    with pytest.raises(InvalidInputError, match="empty"):
        compute_maps(store, [""], text_encoder=encoder)
    with pytest.raises(InvalidInputError, match="at most 77"):
        compute_maps(store, [" ".join(["cat"] * 100)], text_encoder=encoder)
    with pytest.raises(IncompleteImageError, match="out of range"):
        compute_maps(store, ["cat"], text_encoder=encoder, images=[7])
    with pytest.raises(InvalidInputError, match="matches no cross-attention layer"):
        compute_maps(store, ["cat"], text_encoder=encoder, config=MapConfig(layers=LayerSelection(patterns=("nope*",))))
    with pytest.raises(InvalidInputError, match="out of range"):
        compute_maps(store, ["cat"], text_encoder=encoder, config=MapConfig(steps="40"))
    with pytest.raises(InvalidInputError, match="branch 'cond' is not stored"):
        compute_maps(store, ["cat"], text_encoder=encoder, config=MapConfig(branch="cond"))


def test_non_square_latents(tiny_pipe, tmp_path):
    from ovstore.capture import CaptureConfig, build_requests, capture

    pipe, identity = tiny_pipe
    out = tmp_path / "wide.zarr"
    capture(pipe, identity, build_requests([("a wide landscape", None, 0)], num_inference_steps=2), out,
            config=CaptureConfig(num_inference_steps=2, height=48, width=80))
    store = open_store(out)
    assert {l.resolution for l in store.layers} == {(24, 40), (12, 20), (6, 10)}
    maps = compute_maps(store, "a landscape")
    assert maps.shape == (1, 4, 24, 40)
    np.testing.assert_allclose(maps.sum("token").values, 3 * 6 * 4, rtol=1e-5)


def test_analysis_never_imports_the_unet(multi_store):
    import subprocess
    import sys

    code = (
        "import sys, ovstore.analyze as a\n"
        f"m = a.compute_maps({str(multi_store)!r}, ['a cat', 'a sofa'], images=[0])\n"
        "assert m.shape[0] == 1\n"
        "print(sorted(k for k in sys.modules if k.startswith('diffusers')))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_non_contiguous_steps(multi_store):
    store = open_store(multi_store)
    name = store.layers[0].name
    picked = store.queries(name, 1, steps=[0, 2, 4])
    np.testing.assert_array_equal(picked, store.queries(name, 1)[[0, 2, 4]])


def test_word_maps_keep_learned_tokens_apart(golden_store, golden_encoder):
    from ovstore.analyze import Attribution

    (sentence,) = golden_encoder.encode(["a cat and a dog"])
    rows = sentence.embedding[[0, 2, 5]]  # SoT, cat, dog: stand-ins for learned rows
    combined = Attribution(label="cat*+dog*", tokens=("<|startoftext|>", "cat*", "dog*"), embedding=rows)
    maps = compute_maps(golden_store, [combined, "tabby kittens"], text_encoder=golden_encoder)
    words = word_maps(maps)
    assert words["word_str"].values.tolist()[:3] == ["<|startoftext|>", "cat*", "dog*"]
    np.testing.assert_array_equal(words.isel(word=2).values, maps.isel(token=2).values)


def test_streamed_zarr_equals_in_memory_maps(multi_store, tmp_path):
    import xarray as xr

    from ovstore.analyze import write_maps_zarr

    prompts = ["a cat and a sofa", "dog", "a red car on a street at night", "furniture"]
    config = MapConfig(block_budget=100_000)  # several blocks of prompts per image
    out = write_maps_zarr(multi_store, prompts, tmp_path / "maps.zarr", config=config)
    streamed = xr.open_zarr(out, consolidated=False)["ovam_maps"]
    expected = compute_maps(multi_store, prompts)
    assert streamed.dims == expected.dims and streamed.shape == expected.shape
    np.testing.assert_allclose(streamed.values, expected.values, rtol=1e-6, atol=1e-6)
    for name in ("prompt", "prompt_index", "token_str", "token_id", "image"):
        assert streamed[name].values.tolist() == expected[name].values.tolist()


def test_layers_in_parallel_threads_equal_one_thread(golden_store, golden_encoder):
    import torch

    prompts = ["a cat and a sofa", "a photo of a dog", "a photo of a cat", "furniture"]
    one = compute_maps(golden_store, prompts, text_encoder=golden_encoder)
    torch.set_num_threads(2)
    try:
        two = compute_maps(golden_store, prompts, text_encoder=golden_encoder)  # two layer workers
    finally:
        torch.set_num_threads(1)
    np.testing.assert_allclose(two.values, one.values, rtol=1e-6, atol=1e-6)


def test_tokenization_matches_the_wrapper_even_when_it_was_left_padding(golden_store):
    """The encoder tokenizes through the Rust tokenizer directly when it can: the same ids and
    token strings as the transformers wrapper, and the wrapper's call (no padding) whenever a
    caller left the shared tokenizer padding or truncating."""
    encoder = load_text_encoder(open_store(golden_store).layout.model)
    prompts = ["a photo of a cat, on a SOFA!!", "naïve café", "pointy", "a red circle and a blue square"]
    wrapper = encoder.tokenizer(prompts, padding=False, truncation=False, add_special_tokens=True)["input_ids"]
    expected = [(list(ids), encoder.tokenizer.convert_ids_to_tokens(ids)) for ids in wrapper]
    assert encoder.tokenize_all(prompts) == expected
    encoder.tokenizer(prompts, padding="max_length", truncation=True, max_length=encoder.max_length)
    assert encoder.tokenize_all(prompts) == expected  # unpadded all the same

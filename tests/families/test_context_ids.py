"""SDXL stores keep the token ids each of its two tokenizers gave the generation context (the
second pads with "!", id 0, in real checkpoints), and generation-context maps name both."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import build_sdxl, capture_store

PROMPTS = ["a red house by the sea", "a dog"]


@pytest.fixture(scope="module")
def pad_pipe(tmp_path_factory):
    from ovstore.capture import load_pipeline

    return load_pipeline(str(build_sdxl(tmp_path_factory.mktemp("sdxl-pad") / "pipeline", pad_token_2="!")))


@pytest.fixture(scope="module")
def pad_store(pad_pipe, tmp_path_factory):
    return capture_store(pad_pipe, tmp_path_factory.mktemp("pad") / "s.zarr", PROMPTS, steps=2, branch="both",
                         negative="blurry")


def _padded(tokenizer, text):
    return tokenizer(text, padding="max_length", max_length=tokenizer.model_max_length, truncation=True)["input_ids"]


def test_each_tokenizers_ids_are_stored_as_each_encoder_saw_them(pad_pipe, pad_store):
    from ovstore.store import open_store, verify_store

    pipe, _ = pad_pipe
    assert pipe.tokenizer.pad_token_id == 49407 and pipe.tokenizer_2.pad_token_id == 0
    s = open_store(pad_store)
    assert s.layout.context.tokenizers == ("tokenizer", "tokenizer_2")
    assert verify_store(s).ok
    for image, prompt in enumerate(PROMPTS):
        ids = s.context_tokenizer_ids(image)  # (branch, tokenizer, token)
        embeddings, first = s.context(image)
        assert ids.shape == (2, 2, 77)
        np.testing.assert_array_equal(first, ids[:, 0])  # context_token_ids: the first tokenizer's, as before
        for branch, text in enumerate(["blurry", prompt]):  # uncond: the negative prompt
            assert list(ids[branch, 0]) == _padded(pipe.tokenizer, text)
            assert list(ids[branch, 1]) == _padded(pipe.tokenizer_2, text)
            end = list(ids[branch, 0]).index(49407)
            assert (ids[branch, 0, end + 1:] == 49407).all() and (ids[branch, 1, end + 1:] == 0).all()
            # the stored ids are what each encoder saw: they give back the stored context exactly,
            # while the first tokenizer's ids in the second encoder do not
            with torch.no_grad():
                row = [torch.tensor(ids[branch, k])[None] for k in (0, 1)]
                own = torch.cat([pipe.text_encoder(row[0], output_hidden_states=True).hidden_states[-2],
                                 pipe.text_encoder_2(row[1], output_hidden_states=True).hidden_states[-2]], -1)[0]
                wrong = pipe.text_encoder_2(row[0], output_hidden_states=True).hidden_states[-2][0]
            np.testing.assert_allclose(embeddings[branch], own.numpy(), rtol=0, atol=1e-5)
            assert np.abs(embeddings[branch][:, 16:] - wrong.numpy()).max() > 1e-3


def test_generation_context_maps_name_the_tokens_of_both_tokenizers(pad_pipe, pad_store, tmp_path):
    import xarray as xr

    from ovstore.analyze import MapConfig, compute_context_maps, write_context_maps_zarr
    from ovstore.store import open_store

    s = open_store(pad_store)
    maps = compute_context_maps(s, config=MapConfig(branch="cond"))
    assert maps.attrs["context_tokenizers"] == ["tokenizer", "tokenizer_2"]
    for image in range(2):
        ids = s.context_tokenizer_ids(image, 1)
        np.testing.assert_array_equal(maps.token_id.values[image], ids[0])
        np.testing.assert_array_equal(maps.token_id_2.values[image], ids[1])
        end = list(ids[0]).index(49407)
        assert set(maps.token_str.values[image, end:]) == {"<|endoftext|>"}
        assert maps.token_str_2.values[image, end] == "<|endoftext|>"
        assert set(maps.token_str_2.values[image, end + 1:]) == {"!"}
        np.testing.assert_array_equal(maps.token_str.values[image, :end], maps.token_str_2.values[image, :end])
    write_context_maps_zarr(s, tmp_path / "c.zarr", config=MapConfig(branch="cond"), block_images=1)
    streamed = xr.open_zarr(tmp_path / "c.zarr", consolidated=False)["ovam_maps"]
    for name in ("token_id", "token_str", "token_id_2", "token_str_2"):
        assert streamed[name].dims == ("image", "token")
        np.testing.assert_array_equal(streamed[name].values, maps[name].values)
    np.testing.assert_array_equal(streamed.values, maps.values)


def test_merge_keeps_both_tokenizers_ids(pad_store, tmp_path):
    from ovstore.store import merge_stores, open_store

    merge_stores(tmp_path / "m.zarr", [pad_store])
    a, b = open_store(pad_store), open_store(tmp_path / "m.zarr")
    assert b.layout.context == a.layout.context
    for image in range(2):
        np.testing.assert_array_equal(a.context_tokenizer_ids(image), b.context_tokenizer_ids(image))


def test_store_with_the_first_tokenizers_ids_only_still_opens_and_maps(pad_store, tmp_path):
    """A store written before the per-tokenizer ids (no ``tokenizers`` in its context record,
    no ``context_tokenizer_ids`` array) opens, verifies and maps with the first tokenizer's."""
    import shutil

    import zarr

    from ovstore.analyze import MapConfig, compute_context_maps
    from ovstore.store import format as fmt
    from ovstore.store import open_store, verify_store

    old = tmp_path / "old.zarr"
    shutil.copytree(pad_store, old)
    shutil.rmtree(old / fmt.CONTEXT_TOKENIZER_IDS)
    root = zarr.open_group(old, mode="r+")
    meta = json.loads(json.dumps(dict(root.attrs["ovstore"])))
    del meta["layout"]["context"]["tokenizers"]
    meta[fmt.LAYOUT_CHECKSUM] = fmt.layout_checksum(meta["layout"])
    root.attrs["ovstore"] = meta
    s = open_store(old)
    assert s.layout.context.tokenizers == () and not s.layout.context.per_tokenizer
    assert verify_store(s).ok
    assert s.context_tokenizer_ids(0).shape == (2, 1, 77)
    maps = compute_context_maps(s, config=MapConfig(branch="cond"))
    assert maps.attrs["context_tokenizers"] == ["tokenizer"] and "token_id_2" not in maps.coords
    fresh = compute_context_maps(pad_store, config=MapConfig(branch="cond"))
    np.testing.assert_array_equal(maps.values, fresh.values)
    np.testing.assert_array_equal(maps.token_str.values, fresh.token_str.values)

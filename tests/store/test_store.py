"""Store format: metadata round-trip, completion markers, interruption, bad stores."""

from __future__ import annotations

import json

import numpy as np
import pytest
import zarr

from ovstore.capture import CaptureConfig, build_requests, capture, resume
from ovstore.errors import IncompatibleStoreError, IncompleteImageError, StoreFormatError
from ovstore.store import StoreWriter, open_store
from ovstore.store import format as fmt


def test_metadata_round_trip(multi_store, tiny_pipe):
    store = open_store(multi_store)
    _, identity = tiny_pipe
    layout = store.layout
    assert layout.model == identity
    assert fmt.StoreLayout.from_json(json.loads(json.dumps(layout.to_json()))) == layout
    assert store.meta["format_version"] == fmt.FORMAT_VERSION
    assert {"zarr", "torch", "diffusers", "ovstore"} <= set(store.meta["created_with"])
    assert layout.extra["scheduler"] == "PNDMScheduler"
    records = [store.record(i) for i in range(3)]
    assert [r.prompt for r in records] == ["a cat on a sofa", "a red car", "a dog in a park"]
    assert [r.seed for r in records] == [7, 8, 42]
    assert [r.negative_prompt for r in records] == ["", "blurry", ""]
    assert all(r.num_inference_steps == 4 and r.guidance == 7.5 for r in records)
    import copy

    scheduler = copy.deepcopy(tiny_pipe[0].scheduler)
    scheduler.set_timesteps(4)  # PNDM: 4 steps make 5 UNet calls
    assert store.timesteps(0).tolist() == scheduler.timesteps.tolist() == [751, 501, 501, 251, 1]
    w, b = store.key_projection(layout.layers[0].name)
    assert w.shape == (layout.layers[0].heads * layout.layers[0].head_dim, identity.text_encoder_hidden_size)
    assert not b.any()  # SD has no to_k bias; stored as zeros


def test_views_are_lazy_and_named(multi_store):
    store = open_store(multi_store)
    info = store.layers[0]
    view = store.query_view(info.name)
    assert view.dims == ("image", "branch", "step", "head", "y", "x", "channel")
    assert view.shape == (3, 1, 5, info.heads, info.height, info.width, info.head_dim)
    assert hasattr(view.data, "dask")
    np.testing.assert_array_equal(view.isel(image=2, branch=0).values, store.queries(info.name, 2))
    ds = store.to_dataset()
    assert ds["prompt"].values.tolist()[1] == "a red car"
    assert ds["images"].shape == (3, 64, 64, 3)


def test_append_and_incompatible_append(tiny_pipe, tmp_path):
    pipe, identity = tiny_pipe
    out = tmp_path / "s.zarr"
    config = CaptureConfig(num_inference_steps=2)
    capture(pipe, identity, build_requests([("a cat", None, None)], num_inference_steps=2), out, config=config)
    reader = open_store(out)  # stays open while the store grows
    layer = reader.layers[0].name
    first = reader.queries(layer, 0)
    with pytest.raises(IncompleteImageError, match="out of range"):
        reader.queries(layer, 1)
    capture(pipe, identity, build_requests([("a dog", None, None)], seed=5, num_inference_steps=2), out, config=config)
    store = open_store(out)
    assert store.complete_images() == [0, 1] and store.record(1).prompt == "a dog"
    np.testing.assert_array_equal(reader.queries(layer, 0), first)
    np.testing.assert_array_equal(reader.queries(layer, 1), store.queries(layer, 1))  # the appended image
    assert reader.query_view(layer).sizes["image"] == 2
    with pytest.raises(IncompatibleStoreError, match="num_unet_calls"):
        capture(pipe, identity, build_requests([("x", None, None)], num_inference_steps=3), out,
                config=CaptureConfig(num_inference_steps=3))
    assert open_store(out).n_images == 2  # refused append changed nothing


def test_interrupted_capture_keeps_complete_images_and_resumes(tiny_pipe, tmp_path, monkeypatch):
    pipe, identity = tiny_pipe
    out = tmp_path / "crash.zarr"
    config = CaptureConfig(num_inference_steps=2)
    requests = build_requests([("a cat", None, None), ("a dog", None, None), ("a bird", None, None)],
                              seed=3, num_inference_steps=2)
    original = StoreWriter.write_image

    def crash_on_second(self, slot, **kwargs):
        if slot == 1:
            # half of the image's data is written, then the process "dies"
            layer = self.store.layout.layers[0].name
            self._root[fmt.LAYERS_GROUP][layer][fmt.QUERIES][slot] = kwargs["queries"][layer]
            raise RuntimeError("simulated crash")
        return original(self, slot, **kwargs)

    monkeypatch.setattr(StoreWriter, "write_image", crash_on_second)
    with pytest.raises(RuntimeError, match="simulated crash"):
        capture(pipe, identity, requests, out, config=config)
    monkeypatch.setattr(StoreWriter, "write_image", original)

    store = open_store(out)
    assert store.n_images == 3
    assert store.complete_images() == [0]
    assert store.incomplete_images() == [1, 2]
    with pytest.raises(IncompleteImageError, match="incomplete"):
        store.image(1)
    before = store.queries(store.layers[0].name, 0)

    resume(pipe, identity, out, config=config)
    with_resume = open_store(out)
    # a reader opened before the resume sees the images completed since
    np.testing.assert_array_equal(store.queries(store.layers[0].name, 1),
                                  with_resume.queries(store.layers[0].name, 1))
    store = with_resume
    assert store.complete_images() == [0, 1, 2]
    np.testing.assert_array_equal(store.queries(store.layers[0].name, 0), before)
    # the resumed images equal an uninterrupted capture
    clean = tmp_path / "clean.zarr"
    capture(pipe, identity, requests, clean, config=config)
    ref = open_store(clean)
    for i in range(3):
        np.testing.assert_array_equal(store.image(i), ref.image(i))
        for info in store.layers:
            np.testing.assert_array_equal(store.queries(info.name, i), ref.queries(info.name, i))


def test_not_a_store_and_newer_version(tmp_path, multi_store):
    with pytest.raises(StoreFormatError, match="does not exist"):
        open_store(tmp_path / "missing.zarr")
    (tmp_path / "empty").mkdir()
    with pytest.raises(StoreFormatError, match="not an ovstore store"):
        open_store(tmp_path / "empty")
    zarr.open_group(tmp_path / "other.zarr", mode="w")
    with pytest.raises(StoreFormatError, match="not an ovstore store"):
        open_store(tmp_path / "other.zarr")
    import shutil

    copy = tmp_path / "future.zarr"
    shutil.copytree(multi_store, copy)
    group = zarr.open_group(copy, mode="r+")
    meta = dict(group.attrs["ovstore"])
    meta["format_version"] = 99
    group.attrs["ovstore"] = meta
    with pytest.raises(StoreFormatError, match="version 99, newer than this ovstore reads.*upgrade ovstore"):
        open_store(copy)


def test_corrupted_chunk_is_detected(multi_store, tmp_path):
    import shutil

    copy = tmp_path / "corrupt.zarr"
    shutil.copytree(multi_store, copy)
    store = open_store(copy)
    layer = store.layers[0].name
    shard = next((copy / fmt.LAYERS_GROUP / layer / fmt.QUERIES / "c").rglob("*"), None)
    files = sorted(p for p in (copy / fmt.LAYERS_GROUP / layer / fmt.QUERIES).rglob("*") if p.is_file() and p.name != "zarr.json")
    assert shard is not None and files
    data = bytearray(files[0].read_bytes())
    data[len(data) // 3] ^= 0xFF
    files[0].write_bytes(bytes(data))
    from ovstore.errors import StoreError

    with pytest.raises(StoreError, match="corrupted"):
        open_store(copy).queries(layer, 0)


def test_inner_chunks_hold_as_many_calls_as_fit_a_mebibyte(multi_store):
    """Small layers keep all calls in one inner chunk (one decode per image and layer); step
    subsets still read exactly their calls."""
    store = open_store(multi_store)
    calls = store.layout.n_steps
    for info in store.layers:
        arr = zarr.open_array(multi_store / fmt.LAYERS_GROUP / info.name / fmt.QUERIES, mode="r")
        k = fmt.query_chunk_steps(info, calls, store.layout.query_dtype)
        assert arr.chunks[2] == k and calls % k == 0 and arr.shards[2] == calls
        full = store.queries(info.name, 1)
        np.testing.assert_array_equal(store.queries(info.name, 1, steps=[1, 2, 4]), full[[1, 2, 4]])
    big = fmt.LayerInfo(name="l", block="up", level=0, height=64, width=64, heads=8, head_dim=40, scale=1.0,
                        key_input_dim=768)
    small = fmt.LayerInfo(name="s", block="mid", level=3, height=8, width=8, heads=8, head_dim=160, scale=1.0,
                          key_input_dim=768)
    assert fmt.query_chunk_steps(big, 50, "float16") == 1  # 2.6 MB per call: a chunk per call
    assert fmt.query_chunk_steps(small, 50, "float16") == 5  # 164 KB per call: 5 calls divide 50
    assert fmt.query_chunk_steps(small, 51, "float16") == 3  # the largest divisor that fits
    assert fmt.query_chunk_steps(small, 53, "float16") == 1  # a prime number of calls

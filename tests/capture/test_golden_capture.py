"""Capture reproduces the reference's queries and image and does not change generation."""

from __future__ import annotations

import numpy as np
import torch

from ovstore.capture import CaptureConfig, QueryRecorder, build_requests, capture, cross_attention_layers
from ovstore.store import open_store


def test_queries_and_image_equal_golden(golden_store, golden_case):
    store = open_store(golden_store)
    assert store.complete_images() == [0]
    for name, expected in golden_case["queries"].items():
        q = store.queries(name, 0)
        t, h, y, x, d = q.shape
        # float32 matmul kernels differ between CPU generations: 1e-5 of the layer's largest value
        np.testing.assert_allclose(q.reshape(t, h, y * x, d), expected, rtol=0, atol=1e-5 * np.abs(expected).max())
    # the same rounding may move a pixel across a uint8 boundary: at most 1 level, on at most 0.1 % of values
    diff = np.abs(store.image(0).astype(int) - golden_case["image"].astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() <= 1e-3, (diff.max(), (diff > 0).mean())
    assert store.layout.num_unet_calls == golden_case["unet_calls"] == len(store.timesteps(0))
    assert store.branch_labels(0) == ("uncond",)


def test_layer_table_matches_reference(golden_store, golden_case):
    layers = {l.name: l for l in open_store(golden_store).layers}
    for ref in golden_case["layers"]:
        info = layers[ref["module_path"]]
        assert (info.height, info.width) == tuple(ref["resolution"])
        assert (info.heads, info.head_dim) == (ref["heads"], ref["head_dim"])
        assert info.scale == ref["scale"]
    assert "mid_block.attentions.0.transformer_blocks.0.attn2" in layers  # captured, unused by default


def _generate(pipe, prompts, seeds, guidance=7.5):
    out = pipe(prompt=prompts, generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
               num_inference_steps=3, guidance_scale=guidance, output_type="np")
    return out.images


def test_images_identical_with_and_without_capture(tiny_pipe):
    pipe, _ = tiny_pipe
    layers = cross_attention_layers(pipe.unet, 32, 32)
    plain = _generate(pipe, ["a cat", "a dog"], [1, 2])
    recorder = QueryRecorder(pipe.unet, layers, calls=range(4), branches=("uncond", "cond"))
    with recorder:
        recorder.start_batch(2)
        hooked = _generate(pipe, ["a cat", "a dog"], [1, 2])
    assert recorder.result.n_calls == 4 and len(recorder.result.queries[layers[0][0].name]) == 4
    np.testing.assert_array_equal(plain, hooked)
    after = _generate(pipe, ["a cat", "a dog"], [1, 2])  # hooks removed on exit
    np.testing.assert_array_equal(plain, after)
    assert not pipe.unet._forward_pre_hooks and not layers[0][1].to_q._forward_hooks


def _manual_queries(pipe, prompt, seed, guidance):
    """Reference: the to_q output of every call, split by guidance half, without ovstore."""
    name, module = next((n, m) for n, m in pipe.unet.named_modules() if n.endswith("attn2"))
    seen = []
    handle = module.to_q.register_forward_hook(lambda m, i, o: seen.append(o.detach().clone()))
    try:
        _generate(pipe, [prompt], [seed], guidance)
    finally:
        handle.remove()
    return name, module, torch.stack(seen)  # (calls, batch, pixels, inner)


def _stored(store, name):
    info = store.layout.layer(name)
    q = torch.from_numpy(store._queries_array(name)[0])  # (branch, step, head, y, x, ch)
    nb, t = q.shape[:2]
    return q.permute(0, 1, 3, 4, 2, 5).reshape(nb, t, info.height * info.width, info.heads * info.head_dim)


def test_branches_store_the_right_half(tiny_pipe, tmp_path):
    pipe, identity = tiny_pipe
    name, _, full = _manual_queries(pipe, "a cat", 3, 7.5)
    req = build_requests([("a cat", None, 3)], num_inference_steps=3)
    for branch, expected in [("uncond", [full[:, 0]]), ("cond", [full[:, 1]]), ("both", [full[:, 0], full[:, 1]])]:
        out = tmp_path / f"{branch}.zarr"
        capture(pipe, identity, req, out, config=CaptureConfig(num_inference_steps=3, branch=branch, dtype="float32"))
        store = open_store(out)
        got = _stored(store, name)
        assert store.layout.branches == {"uncond": ("uncond",), "cond": ("cond",), "both": ("uncond", "cond")}[branch]
        for k, exp in enumerate(expected):
            torch.testing.assert_close(got[k], exp, rtol=0, atol=0)


def test_no_guidance_stores_the_single_half(tiny_pipe, tmp_path):
    pipe, identity = tiny_pipe
    name, _, full = _manual_queries(pipe, "a cat", 3, 1.0)
    assert full.shape[1] == 1
    out = tmp_path / "nocfg.zarr"
    req = build_requests([("a cat", None, 3)], guidance=1.0, num_inference_steps=3)
    capture(pipe, identity, req, out, config=CaptureConfig(num_inference_steps=3, guidance=1.0, dtype="float32"))
    store = open_store(out)
    assert store.layout.branches == ("cond",) and store.branch_labels(0) == ("cond",)
    torch.testing.assert_close(_stored(store, name)[0], full[:, 0], rtol=0, atol=0)


def test_batched_capture_equals_single(tiny_pipe, tmp_path, multi_store):
    pipe, identity = tiny_pipe
    out = tmp_path / "single.zarr"
    req = build_requests([("a red car", "blurry", None)], seed=8, num_inference_steps=4)
    capture(pipe, identity, req, out, config=CaptureConfig(num_inference_steps=4))
    single, multi = open_store(out), open_store(multi_store)
    assert multi.record(1).seed == 8 and multi.record(2).seed == 42 and multi.record(1).negative_prompt == "blurry"
    # A batch of two changes the float32 summation order of the UNet's matrix products, so
    # pixels may round to the neighbouring grey level; anything more is a slot or seed mix-up.
    diff = np.abs(single.image(0).astype(int) - multi.image(1).astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3
    for info in single.layers:
        np.testing.assert_allclose(single.queries(info.name, 0), multi.queries(info.name, 1), atol=2e-3)


def test_call_selection_and_layer_selection(tiny_pipe, tmp_path):
    from ovstore.selection import LayerSelection

    pipe, identity = tiny_pipe
    out = tmp_path / "subset.zarr"
    config = CaptureConfig(num_inference_steps=4, calls="0,2:5", layers=LayerSelection(resolutions=((16, 16),)))
    capture(pipe, identity, build_requests([("a cat", None, None)], num_inference_steps=4), out, config=config)
    store = open_store(out)
    assert store.layout.calls == (0, 2, 3, 4)
    assert {l.resolution for l in store.layers} == {(16, 16)}
    assert len(store.timesteps(0)) == 4 and store.queries(store.layers[0].name, 0).shape[0] == 4


def test_storage_presets(tiny_pipe, tmp_path):
    import pytest

    from ovstore.errors import InvalidInputError

    pipe, identity = tiny_pipe
    out = tmp_path / "compact.zarr"
    capture(pipe, identity, build_requests([("a cat", None, None)], num_inference_steps=4), out,
            config=CaptureConfig(num_inference_steps=4, preset="no-finest-half-calls"))
    store = open_store(out)
    assert store.layout.calls == (0, 2, 4) and store.layout.extra["preset"] == "no-finest-half-calls"
    assert {l.resolution for l in store.layers} == {(16, 16), (8, 8)}  # the 32x32 layers are dropped
    with pytest.raises(InvalidInputError, match="chooses the UNet calls"):
        CaptureConfig(preset="half-calls", calls="0:2")
    with pytest.raises(InvalidInputError, match="--preset"):
        CaptureConfig(preset="tiny")

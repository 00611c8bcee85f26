"""SD3 on the sd3 (MM-DiT) family, on the tiny public golden pipeline: generation-context maps
equal the hooked attention, the recomputed text stream equals the model's at every block,
open-vocabulary maps equal a loop over the transformer's own modules, a word batched with many
others gives its map alone, and capture does not change the image."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import DATA

SD3 = DATA / "online" / "sd3"
PIPELINE = SD3 / "pipeline"
CASE = SD3 / "cases" / "sd3-cfg"


@pytest.fixture(scope="module")
def case():
    return json.loads((CASE / "case.json").read_text())


@pytest.fixture(scope="module")
def sd3_pipe():
    from ovstore.capture import load_pipeline

    return load_pipeline(str(PIPELINE))


def _capture(pipe_and_identity, out, case, **overrides):
    from ovstore.capture import CaptureConfig, build_requests, capture

    pipe, identity = pipe_and_identity
    requests = build_requests([(case["prompt"], None, case["seed"])], guidance=case["guidance_scale"],
                              num_inference_steps=case["steps"])
    settings = dict(num_inference_steps=case["steps"], guidance=case["guidance_scale"], dtype="float32",
                    branch="cond", height=case["height"], width=case["width"],
                    max_sequence_length=case["max_sequence_length"]) | overrides
    capture(pipe, identity, requests, out, config=CaptureConfig(**settings))
    return out


@pytest.fixture(scope="module")
def sd3_store(tmp_path_factory, sd3_pipe, case):
    return _capture(sd3_pipe, tmp_path_factory.mktemp("sd3") / "sd3.zarr", case)


def _hooked_generation(pipe, case):
    """Per call and block, the cond half of what each joint block received (text stream,
    temb) and its attention's image keys/values and text keys, hooked in the real modules."""
    transformer = pipe.transformer
    calls: list[dict] = []
    handles = []

    def on_call(module, args, kwargs):
        calls.append({"stream": [], "temb": None, "k": [], "v": [], "text_k": []})

    def on_block(module, args, kwargs):
        ehs = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        temb = kwargs.get("temb", args[2] if len(args) > 2 else None)
        calls[-1]["stream"].append(ehs[-1].detach().clone())
        calls[-1]["temb"] = temb[-1].detach().clone()

    handles.append(transformer.register_forward_pre_hook(on_call, with_kwargs=True))
    for block in transformer.transformer_blocks:
        handles.append(block.register_forward_pre_hook(on_block, with_kwargs=True))
        handles.append(block.attn.norm_k.register_forward_hook(
            lambda m, i, o: calls[-1]["k"].append(o[-1].detach().clone())))
        handles.append(block.attn.to_v.register_forward_hook(
            lambda m, i, o: calls[-1]["v"].append(o[-1].detach().clone())))
        handles.append(block.attn.norm_added_k.register_forward_hook(
            lambda m, i, o: calls[-1]["text_k"].append(o[-1].detach().clone())))
    try:
        out = pipe(case["prompt"], negative_prompt=None, num_inference_steps=case["steps"],
                   guidance_scale=case["guidance_scale"], height=case["height"], width=case["width"],
                   max_sequence_length=case["max_sequence_length"],
                   generator=torch.Generator("cpu").manual_seed(case["seed"]), output_type="np")
    finally:
        for h in handles:
            h.remove()
    return calls, out.images[0]


def test_generation_context_maps_equal_golden(sd3_store, case):
    from ovstore.analyze import MapConfig
    from ovstore.analyze.context import compute_context_maps
    from ovstore.selection import LayerSelection
    from ovstore.store import open_store

    store = open_store(sd3_store)
    assert store.layout.model.family == "sd3"
    assert list(store.context(0, 0)[1]) == case["context_token_ids"]
    golden = np.load(CASE / "maps.npy")
    result = compute_context_maps(store, config=MapConfig(branch="cond"))
    assert list(result["token_str"].values[0]) == case["context_tokens"]  # CLIP then T5 pieces
    maps = result.values[0]
    assert maps.shape == golden.shape == (109, 16, 16)
    assert np.abs(maps - golden).max() <= 1e-4 * np.abs(golden).max()
    # every pixel's token sum is calls x heads x blocks: the softmax runs over all 109 tokens
    np.testing.assert_allclose(maps.sum(0), case["token_sum_per_pixel"]["value"], rtol=1e-5)
    per_layer = np.load(CASE / "per_layer.npz")
    for name in ("transformer_blocks.0.attn", "transformer_blocks.2.attn"):  # the last block needs the first two
        one = compute_context_maps(store, config=MapConfig(branch="cond", layers=LayerSelection(patterns=(name,))))
        assert np.abs(one.values[0] - per_layer[name]).max() <= 1e-4 * np.abs(per_layer[name]).max()


def test_capture_keeps_the_image(sd3_pipe, sd3_store, case):
    from PIL import Image

    from ovstore.store import open_store

    pipe, _ = sd3_pipe
    _, plain = _hooked_generation(pipe, case)
    stored = open_store(sd3_store).image(0)
    assert np.array_equal(stored, np.round(np.clip(plain, 0, 1) * 255).astype(np.uint8))
    assert np.array_equal(stored, np.asarray(Image.open(CASE / "image.png")))


def test_recomputed_text_stream_equals_hooked(sd3_pipe, sd3_store, case):
    from ovstore.families.mmdit import TextStream
    from ovstore.store import format as fmt
    from ovstore.store import open_store

    pipe, _ = sd3_pipe
    calls, _ = _hooked_generation(pipe, case)
    store = open_store(sd3_store)
    stream = TextStream(store.weights(), store.layout.layers)
    rows = torch.from_numpy(store.context(0, 0)[0])[None]
    assert len(calls) == store.layout.n_steps == 5
    for s, call in enumerate(calls):
        temb = torch.from_numpy(store.conditioning(0, 0)[s])
        torch.testing.assert_close(temb, call["temb"], rtol=0, atol=1e-6)
        kv = {}
        for info in store.layout.layers:
            k = store.layer_array(info.name, fmt.IMAGE_KEYS, 0, steps=[s])[0]
            v = store.layer_array(info.name, fmt.IMAGE_VALUES, 0, steps=[s])[0]
            i = int(info.name.split(".")[1])
            torch.testing.assert_close(torch.from_numpy(k).flatten(1, 2), call["k"][i], rtol=0, atol=1e-6)
            kv[info.name] = (torch.from_numpy(k).flatten(1, 2), torch.from_numpy(v).flatten(1, 2))
        hidden: list = []
        keys = stream.keys(rows, temb, kv, until=2, hidden=hidden)
        for i in range(3):
            real = call["stream"][i]
            scale = real.abs().max()
            assert (hidden[i][0] - real).abs().max() <= 1e-5 * scale, f"call {s} block {i}"
            text_k = keys[f"transformer_blocks.{i}.attn"][0]
            assert (text_k - call["text_k"][i]).abs().max() <= 1e-5 * call["text_k"][i].abs().max()


def _module_stream_maps(pipe, calls, rows):
    """An attribution's map by the transformer's own modules: its one-way text stream (the
    hooked image keys/values of each block, its own keys/values), image queries against its
    keys, softmax over its tokens, summed over heads, calls and blocks."""
    transformer = pipe.transformer
    total = 0
    with torch.no_grad():
        for call, queries in calls:
            x = transformer.context_embedder(rows[None])
            temb = call["temb"][None]
            for i, block in enumerate(transformer.transformer_blocks):
                attn = block.attn
                heads = attn.heads
                if block.context_pre_only:
                    n = block.norm1_context(x, temb)
                else:
                    n, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1_context(x, emb=temb)
                split = lambda t: t.view(1, -1, heads, t.shape[-1] // heads).transpose(1, 2)
                q = attn.norm_added_q(split(attn.add_q_proj(n)))
                k = attn.norm_added_k(split(attn.add_k_proj(n)))
                v = split(attn.add_v_proj(n))
                qi = queries[i]  # (head, pixel, channel)
                total = total + (qi @ k[0].transpose(1, 2) * attn.scale).softmax(-1).sum(0)
                if block.context_pre_only:
                    break
                image_k, image_v = call["k"][i][None], split(call["v"][i][None])
                o = F.scaled_dot_product_attention(q, torch.cat([image_k, k], 2), torch.cat([image_v, v], 2))
                o = attn.to_add_out(o.transpose(1, 2).reshape(1, -1, heads * q.shape[-1]))
                x = x + gate_msa.unsqueeze(1) * o
                n2 = block.norm2_context(x) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
                x = x + gate_mlp.unsqueeze(1) * block.ff_context(n2)
    return total.T.reshape(-1, 16, 16).numpy()


def test_open_vocabulary_maps_equal_module_loop_and_batching(sd3_pipe, sd3_store, case):
    from ovstore.analyze import MapConfig, compute_maps
    from ovstore.analyze.maps import prepare_attributions
    from ovstore.store import open_store

    pipe, _ = sd3_pipe
    store = open_store(sd3_store)
    hooked, _ = _hooked_generation(pipe, case)
    queries = []
    for s in range(store.layout.n_steps):
        queries.append([torch.from_numpy(store.queries(l.name, 0, steps=[s])[0]).flatten(1, 2)
                        for l in store.layout.layers])
    words = ["umbrella", "a blue umbrella", "robot"]
    atts = prepare_attributions(store, words)
    assert atts[0].n_tokens == 3 + 2  # CLIP start, word, end; T5 word, end
    alone = compute_maps(store, words, config=MapConfig(branch="cond"))
    for k, att in enumerate(atts):
        expected = _module_stream_maps(pipe, list(zip(hooked, queries)), att.embedding)
        got = alone.values[0][alone.prompt_index.values == k]
        assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()
        np.testing.assert_allclose(got.sum(0), 5 * 4 * 3, rtol=1e-5)  # softmax over its own tokens
    # "umbrella" among many other prompts of every length
    others = ["rain", "a small robot", "sky", "a red house by the sea", "water", "a cat"] * 20
    many = compute_maps(store, others[:60] + ["umbrella"] + others[60:], config=MapConfig(branch="cond"))
    mine = many.values[0][many.prompt_index.values == 60]
    np.testing.assert_allclose(mine, alone.values[0][alone.prompt_index.values == 0], rtol=1e-5, atol=1e-6)


def test_sd3_bad_inputs(sd3_pipe, sd3_store, case, tmp_path):
    from ovstore.capture import CaptureConfig, plan_capture
    from ovstore.errors import InvalidInputError
    from ovstore.selection import LayerSelection
    from ovstore.store import format as fmt
    from ovstore.store import open_store

    pipe, identity = sd3_pipe
    # a preset that drops a block the later blocks' text stream needs
    with pytest.raises(InvalidInputError, match="first N blocks"):
        plan_capture(pipe, identity, CaptureConfig(num_inference_steps=2, guidance=5.0, height=64, width=64,
                                                   layers=LayerSelection(patterns=("transformer_blocks.2.attn",))))
    # the first blocks are fine
    layout, _ = plan_capture(pipe, identity, CaptureConfig(
        num_inference_steps=2, guidance=5.0, height=64, width=64, max_sequence_length=8,
        layers=LayerSelection(patterns=("transformer_blocks.0.attn",))))
    assert [l.name for l in layout.layers] == ["transformer_blocks.0.attn"]
    assert layout.context.length == 77 + 8 and layout.context.features == 48
    store = open_store(sd3_store)
    with pytest.raises(InvalidInputError, match="holds no"):
        store.layer_array("transformer_blocks.0.attn", "image_things", 0)
    assert set(store.layout.layer_arrays) == {fmt.IMAGE_KEYS, fmt.IMAGE_VALUES}


def test_max_sequence_length_is_refused_for_unet(tmp_path):
    from ovstore.capture import CaptureConfig, plan_capture, load_pipeline
    from ovstore.errors import InvalidInputError

    from conftest import TINY_SD15

    pipe, identity = load_pipeline(str(TINY_SD15))
    with pytest.raises(InvalidInputError, match="max-sequence-length"):
        plan_capture(pipe, identity, CaptureConfig(num_inference_steps=2, max_sequence_length=32))


def test_cli_capture_and_maps_on_sd3(tmp_path):
    """The command line end to end: --max-sequence-length is recorded, the bytes are printed
    before capture, and both attribution and generation-context maps come out."""
    from typer.testing import CliRunner

    from ovstore.cli import app
    from ovstore.store import open_store

    runner = CliRunner()
    out = tmp_path / "cli.zarr"
    result = runner.invoke(app, ["capture", str(PIPELINE), "--prompt", "a robot in the rain", "--steps", "2",
                                 "--guidance", "4", "--height", "64", "--width", "64", "--branch", "cond",
                                 "--max-sequence-length", "16", "--dtype", "float32", "--out", str(out)])
    assert result.exit_code == 0, result.output
    printed = " ".join(result.output.split())
    assert "per image" in printed and "image keys/values and temb" in printed
    store = open_store(out)
    assert store.layout.context.length == 77 + 16 and store.layout.extra["max_sequence_length"] == 16
    result = runner.invoke(app, ["maps", str(out), "--attribution", "umbrella", "--out", str(tmp_path / "m.npy")])
    assert result.exit_code == 0, result.output
    maps = np.load(tmp_path / "m.npy")
    assert maps.shape[-2:] == (16, 16) and np.isfinite(maps).all()
    result = runner.invoke(app, ["maps", str(out), "--generation-context", "--out", str(tmp_path / "c.npy")])
    assert result.exit_code == 0, result.output
    context = np.load(tmp_path / "c.npy")
    np.testing.assert_allclose(context.reshape(-1, 16, 16).sum(0), 2 * 4 * 3, rtol=1e-5)
    # resuming with the store's settings keeps the T5 length
    result = runner.invoke(app, ["capture", "--resume", "--prompt", "a robot in the rain", "--prompt", "a cat",
                                 "--steps", "2", "--guidance", "4", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert open_store(out).complete_images() == [0, 1]


def test_verify_and_merge_know_the_mmdit_arrays(sd3_store, tmp_path):
    import shutil

    import zarr

    from ovstore.analyze import MapConfig
    from ovstore.analyze.context import compute_context_maps
    from ovstore.store import merge_stores, open_store, verify_store

    merged = tmp_path / "merged.zarr"
    result = merge_stores(merged, [sd3_store])
    assert result.added == 1
    assert verify_store(open_store(merged)).ok
    a = compute_context_maps(sd3_store, config=MapConfig(branch="cond")).values
    b = compute_context_maps(merged, config=MapConfig(branch="cond")).values
    np.testing.assert_array_equal(a, b)
    # damage: an image-values chunk removed, a stored weight edited
    damaged = tmp_path / "damaged.zarr"
    shutil.copytree(merged, damaged)
    values = damaged / "layers" / "transformer_blocks.1.attn" / "image_values" / "c"
    shutil.rmtree(values)
    root = zarr.open_group(damaged, mode="r+")
    weight = root["weights/transformer_blocks.0.ff_context.net.2.weight"]
    weight[0, 0] = float(weight[0, 0]) + 1.0
    report = verify_store(open_store(damaged))
    found = {(p.image, p.array, p.kind) for p in report.problems}
    assert (0, "transformer_blocks.1.attn image_values", "missing") in found
    assert any("ff_context.net.2.weight" in a and k == "checksum mismatch" for _, a, k in found)
    with pytest.raises(Exception, match="image values is missing"):
        open_store(damaged).layer_array("transformer_blocks.1.attn", "image_values", 0)


# ---------------------------------------------------------------- output-space maps (ConceptAttention)


@pytest.fixture(scope="module")
def sd3_output_store(tmp_path_factory, sd3_pipe, case):
    return _capture(sd3_pipe, tmp_path_factory.mktemp("sd3out") / "sd3.zarr", case, image_outputs=True)


def _hooked_outputs(pipe, case):
    """Per call and joint block, the cond half of the processor's attention outputs before the
    output projections: the image rows (what enters ``to_out[0]``) and the text rows (what
    enters ``to_add_out``; the last block, ``context_pre_only``, has none, so its text output is
    the processor's attention of its hooked text queries over its hooked keys and values)."""
    transformer = pipe.transformer
    calls: list[dict] = []
    handles = [transformer.register_forward_pre_hook(
        lambda m, a, kw: calls.append({"image": [], "text": [], "q": [], "k": [], "tk": [], "v": [], "tv": []}),
        with_kwargs=True)]
    for block in transformer.transformer_blocks:
        attn = block.attn
        grab = lambda key: (lambda m, i, o: calls[-1][key].append(o[-1].detach().clone()))
        handles.append(attn.to_out[0].register_forward_pre_hook(
            lambda m, i: calls[-1]["image"].append(i[0][-1].detach().clone())))
        if attn.to_add_out is not None:
            handles.append(attn.to_add_out.register_forward_pre_hook(
                lambda m, i: calls[-1]["text"].append(i[0][-1].detach().clone())))
        handles += [attn.norm_added_q.register_forward_hook(grab("q")), attn.norm_k.register_forward_hook(grab("k")),
                    attn.norm_added_k.register_forward_hook(grab("tk")), attn.to_v.register_forward_hook(grab("v")),
                    attn.add_v_proj.register_forward_hook(grab("tv"))]
    try:
        pipe(case["prompt"], negative_prompt=None, num_inference_steps=case["steps"],
             guidance_scale=case["guidance_scale"], height=case["height"], width=case["width"],
             max_sequence_length=case["max_sequence_length"],
             generator=torch.Generator("cpu").manual_seed(case["seed"]), output_type="np")
    finally:
        for h in handles:
            h.remove()
    heads = transformer.transformer_blocks[0].attn.heads
    split = lambda t: t.view(t.shape[0], heads, -1).transpose(0, 1)  # (token, width) -> (head, token, ch)
    for call in calls:
        for i in range(len(call["text"]), len(transformer.transformer_blocks)):  # context_pre_only blocks
            o = F.scaled_dot_product_attention(call["q"][i], torch.cat([call["k"][i], call["tk"][i]], 1),
                                               torch.cat([split(call["v"][i]), split(call["tv"][i])], 1))
            call["text"].append(o.transpose(0, 1).reshape(o.shape[1], -1))
    return calls


def _output_space_reference(calls, blocks):
    """ConceptAttention's output-space map of the text stream: per call and block, image
    attention outputs · text attention outputs, softmax over the text tokens, summed."""
    total = 0
    for call in calls:
        for i in blocks:
            total = total + (call["image"][i] @ call["text"][i].T).softmax(-1)
    return total.T.reshape(-1, 16, 16).numpy()


def test_output_space_maps_equal_hooked_outputs(sd3_pipe, sd3_output_store, case):
    from ovstore.analyze import MapConfig
    from ovstore.analyze.context import compute_context_maps
    from ovstore.selection import LayerSelection
    from ovstore.store import format as fmt
    from ovstore.store import open_store

    pipe, _ = sd3_pipe
    calls = _hooked_outputs(pipe, case)
    store = open_store(sd3_output_store)
    assert fmt.IMAGE_OUTPUTS in store.layout.layer_arrays
    for s, call in enumerate(calls):  # the stored image outputs are the processor's
        for i, info in enumerate(store.layout.layers):
            stored = torch.from_numpy(store.layer_array(info.name, fmt.IMAGE_OUTPUTS, 0, steps=[s])[0])
            torch.testing.assert_close(stored.permute(1, 2, 0, 3).reshape(256, -1), call["image"][i], rtol=0,
                                       atol=1e-6)
    result = compute_context_maps(store, config=MapConfig(branch="cond", space="output"))
    assert result.attrs["space"] == "output"
    expected = _output_space_reference(calls, range(3))
    got = result.values[0]
    assert got.shape == expected.shape == (109, 16, 16)
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()
    np.testing.assert_allclose(got.sum(0), 5 * 3, rtol=1e-5)  # one softmax per call and block, no heads
    one = compute_context_maps(store, config=MapConfig(branch="cond", space="output",
                                                       layers=LayerSelection(patterns=("transformer_blocks.1.attn",))))
    ref = _output_space_reference(calls, [1])
    assert np.abs(one.values[0] - ref).max() <= 1e-4 * np.abs(ref).max()
    # attention space is unchanged by the extra array, and the two spaces differ
    attention = compute_context_maps(store, config=MapConfig(branch="cond")).values[0]
    assert np.abs(attention - np.load(CASE / "maps.npy")).max() <= 1e-4 * np.abs(attention).max()
    assert not np.allclose(attention / (5 * 4 * 3), got / (5 * 3), atol=1e-3)


def test_output_space_open_vocabulary_is_batching_invariant(sd3_output_store):
    from ovstore.analyze import MapConfig, compute_maps

    config = MapConfig(branch="cond", space="output")
    alone = compute_maps(sd3_output_store, ["umbrella", "a blue umbrella"], config=config)
    np.testing.assert_allclose(alone.values[0].sum(0), 2 * 5 * 3, rtol=1e-5)  # each prompt: its own softmax
    others = ["rain", "a small robot", "sky", "a red house by the sea", "water", "a cat"] * 20
    many = compute_maps(sd3_output_store, others[:60] + ["a blue umbrella"] + others[60:], config=config)
    mine = many.values[0][many.prompt_index.values == 60]
    np.testing.assert_allclose(mine, alone.values[0][alone.prompt_index.values == 1], rtol=1e-5, atol=1e-6)


def test_output_space_bad_inputs(sd3_pipe, sd3_store, sd3_output_store, tmp_path):
    from ovstore.analyze import MapConfig, compute_maps
    from ovstore.capture import CaptureConfig, build_requests, capture, plan_capture, load_pipeline
    from ovstore.errors import InvalidInputError

    from conftest import TINY_SD15

    with pytest.raises(InvalidInputError, match="capture it again with --image-outputs"):
        compute_maps(sd3_store, ["umbrella"], config=MapConfig(branch="cond", space="output"))
    with pytest.raises(InvalidInputError, match="--space 'outputs' is not one of attention, output"):
        MapConfig(space="outputs")
    pipe, identity = load_pipeline(str(TINY_SD15))
    with pytest.raises(InvalidInputError, match="--image-outputs applies to MM-DiT"):
        plan_capture(pipe, identity, CaptureConfig(num_inference_steps=2, image_outputs=True))
    unet_store = tmp_path / "unet.zarr"
    capture(pipe, identity, build_requests([("a cat", None, 0)], guidance=1.0, num_inference_steps=1), unet_store,
            config=CaptureConfig(num_inference_steps=1, guidance=1.0))
    with pytest.raises(InvalidInputError, match="applies to MM-DiT stores .* is a unet store: use --space attention"):
        compute_maps(unet_store, ["cat"], config=MapConfig(space="output"))
    from ovstore.store import open_store

    # the extra array is in the bytes the capture prints
    small, large = open_store(sd3_store).layout, open_store(sd3_output_store).layout
    one_array = sum(l.query_bytes_per_call("float32") for l in small.layers) * small.n_steps * len(small.branches)
    assert large.query_bytes_per_image() - small.query_bytes_per_image() == one_array  # as big as the image keys


def test_cli_image_outputs_and_space_output(tmp_path):
    """capture --image-outputs prints the extra array in its bytes line and is kept when the
    store is appended to without it; maps --space output reads it."""
    from typer.testing import CliRunner

    from ovstore.cli import app
    from ovstore.store import format as fmt
    from ovstore.store import open_store

    runner = CliRunner()
    out = tmp_path / "cli.zarr"
    common = ["--steps", "2", "--guidance", "4", "--height", "64", "--width", "64", "--branch", "cond",
              "--max-sequence-length", "8", "--out", str(out)]
    result = runner.invoke(app, ["capture", str(PIPELINE), "--prompt", "a robot", "--image-outputs", *common])
    assert result.exit_code == 0, result.output
    assert "image keys/values, outputs and temb" in " ".join(result.output.split())
    result = runner.invoke(app, ["capture", "--prompt", "a cat", "--out", str(out)])  # appended: the store's settings
    assert result.exit_code == 0, result.output
    store = open_store(out)
    assert fmt.IMAGE_OUTPUTS in store.layout.layer_arrays and store.complete_images() == [0, 1]
    result = runner.invoke(app, ["maps", str(out), "--attribution", "a cat", "--space", "output",
                                 "--out", str(tmp_path / "m.zarr")])
    assert result.exit_code == 0, result.output
    import xarray as xr

    ds = xr.open_zarr(tmp_path / "m.zarr")
    assert ds.attrs["space"] == "output"
    np.testing.assert_allclose(ds["ovam_maps"].values.sum(1), 2 * 3, rtol=1e-5)  # calls x blocks, softmax over the tokens

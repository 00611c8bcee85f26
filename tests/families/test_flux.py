"""FLUX on the flux family, on the tiny public golden pipeline: generation-context maps equal
the hooked attention of both public cases (embedded guidance; true CFG), the recomputed text
stream equals the model's at every double block, the text rows' rotation is the identity,
open-vocabulary maps equal a loop over the transformer's own modules, a word batched with many
others gives its map alone, capture does not change the image, a fused qkv stores the same,
and bad inputs get one line."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import DATA

FLUX = DATA / "online" / "flux"
PIPELINE = FLUX / "pipeline"
CASES = ("flux-guidance", "flux-truecfg")


def _case(name):
    return json.loads((FLUX / "cases" / name / "case.json").read_text())


@pytest.fixture(scope="module")
def flux_pipe():
    from ovstore.capture import load_pipeline

    return load_pipeline(str(PIPELINE))


def _config(case, **overrides):
    from ovstore.capture import CaptureConfig

    true_cfg = case.get("true_cfg_scale", 1.0)
    settings = dict(num_inference_steps=case["steps"], guidance=case["guidance_scale"], dtype="float32",
                    branch="cond", height=case["height"], width=case["width"],
                    max_sequence_length=case["max_sequence_length"],
                    true_cfg_scale=true_cfg if true_cfg > 1 else None) | overrides
    return CaptureConfig(**settings)


def _capture(pipe_and_identity, out, case, **overrides):
    from ovstore.capture import build_requests, capture

    pipe, identity = pipe_and_identity
    requests = build_requests([(case["prompt"], case.get("negative_prompt"), case["seed"])],
                              guidance=case["guidance_scale"], num_inference_steps=case["steps"])
    capture(pipe, identity, requests, out, config=_config(case, **overrides))
    return out


@pytest.fixture(scope="module")
def flux_stores(tmp_path_factory, flux_pipe):
    root = tmp_path_factory.mktemp("flux")
    return {name: _capture(flux_pipe, root / f"{name}.zarr", _case(name)) for name in CASES}


def _hooked_generation(pipe, case, monkeypatch=None):
    """Per used call and double block: the text stream entering the block, temb, the
    processor's rotated joint queries/keys (``apply_rotary_emb`` outputs), the unrotated text
    queries/keys (``norm_added_q/k`` outputs), the image values, and the rotary embedding."""
    import diffusers.models.transformers.transformer_flux as tf

    transformer = pipe.transformer
    calls: list[dict] = []
    handles = []
    true_cfg = case.get("true_cfg_scale", 1.0) > 1

    def on_call(module, args, kwargs):
        calls.append({"stream": [], "temb": None, "rotated": [], "text_q": [], "text_k": [], "v": [],
                      "txt_ids": kwargs["txt_ids"].clone(), "single_stream": [], "single_k": []})

    def on_block(module, args, kwargs):
        calls[-1]["stream"].append(kwargs["encoder_hidden_states"][0].detach().clone())
        calls[-1]["temb"] = kwargs["temb"][0].detach().clone()

    def on_rotary(module, inputs, out):
        calls[-1]["rotary"] = tuple(t.clone() for t in out)

    real_rotary = tf.apply_rotary_emb

    def recording_rotary(x, freqs, **kwargs):
        out = real_rotary(x, freqs, **kwargs)
        if calls and len(calls[-1]["rotated"]) < 2 * len(transformer.transformer_blocks):
            calls[-1]["rotated"].append((x[0].detach().clone(), out[0].detach().clone()))
        return out

    handles.append(transformer.register_forward_pre_hook(on_call, with_kwargs=True))
    handles.append(transformer.pos_embed.register_forward_hook(on_rotary))
    for block in transformer.transformer_blocks:
        handles.append(block.register_forward_pre_hook(on_block, with_kwargs=True))
        handles.append(block.attn.norm_added_q.register_forward_hook(
            lambda m, i, o: calls[-1]["text_q"].append(o[0].detach().clone())))
        handles.append(block.attn.norm_added_k.register_forward_hook(
            lambda m, i, o: calls[-1]["text_k"].append(o[0].detach().clone())))
        handles.append(block.attn.to_v.register_forward_hook(
            lambda m, i, o: calls[-1]["v"].append(o[0].detach().clone())))
    for block in transformer.single_transformer_blocks:
        handles.append(block.register_forward_pre_hook(
            lambda m, a, kw: calls[-1]["single_stream"].append(kw["encoder_hidden_states"][0].detach().clone()),
            with_kwargs=True))
        handles.append(block.attn.norm_k.register_forward_hook(
            lambda m, i, o: calls[-1]["single_k"].append(o[0].detach().clone())))
    tf.apply_rotary_emb = recording_rotary
    try:
        out = pipe(case["prompt"], negative_prompt=case.get("negative_prompt"), num_inference_steps=case["steps"],
                   guidance_scale=case["guidance_scale"], true_cfg_scale=case.get("true_cfg_scale", 1.0),
                   height=case["height"], width=case["width"], max_sequence_length=case["max_sequence_length"],
                   generator=torch.Generator("cpu").manual_seed(case["seed"]), output_type="np")
    finally:
        tf.apply_rotary_emb = real_rotary
        for h in handles:
            h.remove()
    used = calls[::2] if true_cfg else calls  # true CFG: the prompt's call comes first in every step
    return used, out.images[0]


@pytest.mark.parametrize("name", CASES)
def test_generation_context_maps_equal_golden(flux_stores, name):
    from ovstore.analyze import MapConfig
    from ovstore.analyze.context import compute_context_maps
    from ovstore.selection import LayerSelection
    from ovstore.store import open_store

    case = _case(name)
    store = open_store(flux_stores[name])
    assert store.layout.model.family == "flux"
    assert tuple(store.layout.branches) == ("cond",) and store.layout.n_steps == case["n_calls"] == 4
    assert store.layout.extra["max_sequence_length"] == 32
    assert list(store.context(0, 0)[1]) == case["context_token_ids"]
    golden = np.load(FLUX / "cases" / name / "maps.npy")
    result = compute_context_maps(store, config=MapConfig(branch="cond"))
    assert list(result["token_str"].values[0]) == case["context_tokens"]
    maps = result.values[0]
    assert maps.shape == golden.shape == (32, 16, 16)
    assert np.abs(maps - golden).max() <= 1e-4 * np.abs(golden).max()
    np.testing.assert_allclose(maps.sum(0), case["token_sum_per_pixel"]["value"], rtol=1e-5)
    per_layer = np.load(FLUX / "cases" / name / "per_layer.npz")
    one = compute_context_maps(store, config=MapConfig(branch="cond",
                                                       layers=LayerSelection(patterns=("transformer_blocks.1.attn",))))
    golden_1 = per_layer["transformer_blocks.1.attn"]
    assert np.abs(one.values[0] - golden_1).max() <= 1e-4 * np.abs(golden_1).max()


@pytest.fixture(scope="module")
def single_stores(tmp_path_factory, flux_pipe):
    root = tmp_path_factory.mktemp("flux-single")
    return {name: _capture(flux_pipe, root / f"{name}.zarr", _case(name), single_blocks=True) for name in CASES}


@pytest.mark.parametrize("name", CASES)
def test_single_blocks_maps_equal_golden_and_their_text_stream_the_hooked(flux_pipe, single_stores, name):
    """--single-blocks: the single-stream blocks' maps equal maps_single.npy, the double
    blocks' still maps.npy, and the recomputed text stream (through every double block, then
    the single blocks) equals the hooked one entering each single block."""
    from ovstore.analyze import MapConfig
    from ovstore.analyze.context import compute_context_maps
    from ovstore.families.flux import FluxTextStream
    from ovstore.selection import LayerSelection
    from ovstore.store import format as fmt
    from ovstore.store import open_store

    pipe, _ = flux_pipe
    case = _case(name)
    store = open_store(single_stores[name])
    assert [l.block for l in store.layout.layers] == ["joint", "joint", "single", "single"]
    for pattern, golden_file in (("single_transformer_blocks.*", "maps_single.npy"), ("transformer_blocks.*", "maps.npy")):
        golden = np.load(FLUX / "cases" / name / golden_file)
        maps = compute_context_maps(store, config=MapConfig(branch="cond", layers=LayerSelection(patterns=(pattern,))))
        assert np.abs(maps.values[0] - golden).max() <= 1e-4 * np.abs(golden).max(), golden_file
    calls, _ = _hooked_generation(pipe, case)
    stream = FluxTextStream(store.weights(), store.layout.layers)
    rows = torch.from_numpy(store.context(0, 0)[0])[None]
    T = case["context_length"]
    for s, call in enumerate(calls):
        temb = torch.from_numpy(store.conditioning(0, 0)[s])
        kv = {info.name: tuple(torch.from_numpy(store.layer_array(info.name, kind, 0, steps=[s])[0]).flatten(1, 2)
                               for kind in (fmt.IMAGE_KEYS, fmt.IMAGE_VALUES)) for info in store.layout.layers}
        hidden: list = []
        keys = stream.keys(rows, temb, kv, until=3, hidden=hidden)
        for j in range(2):
            real = call["single_stream"][j]
            assert (hidden[2 + j][0] - real).abs().max() <= 1e-5 * real.abs().max(), f"call {s} single block {j}"
            text_k = keys[f"single_transformer_blocks.{j}.attn"][0].transpose(0, 1)
            real_k = call["single_k"][j][:T]
            assert (text_k - real_k).abs().max() <= 1e-5 * real_k.abs().max()


def test_single_blocks_are_off_by_default_and_flux_only(flux_stores):
    from ovstore.capture import CaptureConfig, load_pipeline, plan_capture
    from ovstore.errors import InvalidInputError
    from ovstore.store import open_store

    from conftest import TINY_SD15

    assert [l.name for l in open_store(flux_stores["flux-guidance"]).layout.layers] == [
        "transformer_blocks.0.attn", "transformer_blocks.1.attn"]
    sd, sd_identity = load_pipeline(str(TINY_SD15))
    with pytest.raises(InvalidInputError, match="single-blocks applies to FLUX"):
        plan_capture(sd, sd_identity, CaptureConfig(num_inference_steps=2, single_blocks=True))


def test_store_timesteps_are_the_shifted_schedule(flux_pipe, flux_stores):
    """The store's timesteps are FluxPipeline's resolution-shifted schedule (the transformer
    itself receives t / 1000)."""
    import copy

    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    from ovstore.store import open_store

    pipe, _ = flux_pipe
    store = open_store(flux_stores["flux-guidance"])
    scheduler = copy.deepcopy(pipe.scheduler)
    c = scheduler.config
    mu = calculate_shift(16 * 16, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / 4, 4), mu=mu)
    np.testing.assert_allclose(store.timesteps(0), scheduler.timesteps.numpy(), rtol=0, atol=1e-4)
    assert store.layout.extra["scheduler"] == "FlowMatchEulerDiscreteScheduler"


@pytest.mark.parametrize("name", CASES)
def test_capture_keeps_the_image(flux_pipe, flux_stores, name):
    from PIL import Image

    from ovstore.store import open_store

    pipe, _ = flux_pipe
    case = _case(name)
    _, plain = _hooked_generation(pipe, case)
    stored = open_store(flux_stores[name]).image(0)
    assert np.array_equal(stored, np.round(np.clip(plain, 0, 1) * 255).astype(np.uint8))
    assert np.array_equal(stored, np.asarray(Image.open(FLUX / "cases" / name / "image.png")))


@pytest.mark.parametrize("name", CASES)
def test_recomputed_text_stream_equals_hooked_and_text_rotation_is_identity(flux_pipe, flux_stores, name):
    from ovstore.families.mmdit import TextStream
    from ovstore.store import format as fmt
    from ovstore.store import open_store

    pipe, _ = flux_pipe
    case = _case(name)
    calls, _ = _hooked_generation(pipe, case)
    store = open_store(flux_stores[name])
    stream = TextStream(store.weights(), store.layout.layers)
    rows = torch.from_numpy(store.context(0, 0)[0])[None]
    T = case["context_length"]
    assert len(calls) == store.layout.n_steps == 4
    for s, call in enumerate(calls):
        # FluxPipeline's text ids are 0: cos 1 and sin 0 on the text rows, so the processor's
        # rotation leaves the text queries and keys exactly as norm_added_q/k gave them
        assert not call["txt_ids"].any()
        cos, sin = call["rotary"]
        assert torch.equal(cos[:T], torch.ones_like(cos[:T])) and torch.equal(sin[:T], torch.zeros_like(sin[:T]))
        temb = torch.from_numpy(store.conditioning(0, 0)[s])
        torch.testing.assert_close(temb, call["temb"], rtol=0, atol=1e-6)
        kv = {}
        for i, info in enumerate(store.layout.layers):
            (q_in, q_rot), (k_in, k_rot) = call["rotated"][2 * i], call["rotated"][2 * i + 1]
            assert torch.equal(q_rot[:T], call["text_q"][i]) and torch.equal(k_rot[:T], call["text_k"][i])
            assert torch.equal(q_rot[:T], q_in[:T]) and torch.equal(k_rot[:T], k_in[:T])
            q = store.queries(info.name, 0, steps=[s])[0]  # (head, y, x, channel)
            k = store.layer_array(info.name, fmt.IMAGE_KEYS, 0, steps=[s])[0]
            v = store.layer_array(info.name, fmt.IMAGE_VALUES, 0, steps=[s])[0]
            # the stored image rows are the processor's rotated ones, bit for bit
            assert torch.equal(torch.from_numpy(q).flatten(1, 2), q_rot[T:].transpose(0, 1))
            assert torch.equal(torch.from_numpy(k).flatten(1, 2), k_rot[T:].transpose(0, 1))
            h = info.heads
            torch.testing.assert_close(torch.from_numpy(v).flatten(1, 2),
                                       call["v"][i].view(-1, h, info.head_dim).transpose(0, 1), rtol=0, atol=0)
            kv[info.name] = (torch.from_numpy(k).flatten(1, 2), torch.from_numpy(v).flatten(1, 2))
        hidden: list = []
        keys = stream.keys(rows, temb, kv, until=len(store.layout.layers) - 1, hidden=hidden)
        for i in range(len(store.layout.layers)):
            real = call["stream"][i]
            assert (hidden[i][0] - real).abs().max() <= 1e-5 * real.abs().max(), f"call {s} block {i}"
            text_k = keys[f"transformer_blocks.{i}.attn"][0].transpose(0, 1)  # (token, head, channel)
            assert (text_k - call["text_k"][i]).abs().max() <= 1e-5 * call["text_k"][i].abs().max()


def _module_stream_maps(pipe, store, temb_per_call, rows):
    """An attribution's map by the transformer's own modules: its one-way text stream through
    the double blocks (the stored rotated image keys and values, its own keys and values),
    the stored rotated image queries against its keys, softmax over its tokens, summed over
    heads, calls and double blocks."""
    from ovstore.store import format as fmt

    transformer = pipe.transformer
    total = 0
    with torch.no_grad():
        for s, temb in enumerate(temb_per_call):
            x = transformer.context_embedder(rows[None])
            temb = temb[None]
            for i, block in enumerate(transformer.transformer_blocks):
                attn = block.attn
                name = f"transformer_blocks.{i}.attn"
                n, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1_context(x, emb=temb)
                split = lambda t: t.unflatten(-1, (attn.heads, attn.head_dim))  # (1, token, head, ch)
                q = attn.norm_added_q(split(attn.add_q_proj(n))).transpose(1, 2)
                k = attn.norm_added_k(split(attn.add_k_proj(n))).transpose(1, 2)
                v = split(attn.add_v_proj(n)).transpose(1, 2)
                qi = torch.from_numpy(store.queries(name, 0, steps=[s])[0]).flatten(1, 2)
                ki = torch.from_numpy(store.layer_array(name, fmt.IMAGE_KEYS, 0, steps=[s])[0]).flatten(1, 2)
                vi = torch.from_numpy(store.layer_array(name, fmt.IMAGE_VALUES, 0, steps=[s])[0]).flatten(1, 2)
                total = total + (qi @ k[0].transpose(1, 2) * attn.head_dim ** -0.5).softmax(-1).sum(0)
                o = F.scaled_dot_product_attention(q, torch.cat([k, ki[None]], 2), torch.cat([v, vi[None]], 2))
                o = attn.to_add_out(o.transpose(1, 2).flatten(2))
                x = x + gate_msa.unsqueeze(1) * o
                n2 = block.norm2_context(x) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
                x = x + gate_mlp.unsqueeze(1) * block.ff_context(n2)
    return total.T.reshape(-1, 16, 16).numpy()


def test_open_vocabulary_maps_equal_module_loop_and_batching(flux_pipe, flux_stores):
    from ovstore.analyze import MapConfig, compute_maps
    from ovstore.analyze.maps import prepare_attributions
    from ovstore.store import open_store

    pipe, _ = flux_pipe
    store = open_store(flux_stores["flux-guidance"])
    tembs = [torch.from_numpy(store.conditioning(0, 0)[s]) for s in range(store.layout.n_steps)]
    words = ["bicycle", "an old bicycle", "wall"]
    atts = prepare_attributions(store, words)
    assert atts[0].n_tokens == 2  # T5: the word and its end token
    alone = compute_maps(store, words, config=MapConfig(branch="cond"))
    for k, att in enumerate(atts):
        expected = _module_stream_maps(pipe, store, tembs, att.embedding)
        got = alone.values[0][alone.prompt_index.values == k]
        assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()
        np.testing.assert_allclose(got.sum(0), 4 * 2 * 2, rtol=1e-5)  # calls x heads x blocks
    others = ["brick", "an old wall", "sky", "a red house by the sea", "water", "a cat"] * 20
    many = compute_maps(store, others[:60] + ["bicycle"] + others[60:], config=MapConfig(branch="cond"))
    mine = many.values[0][many.prompt_index.values == 60]
    np.testing.assert_allclose(mine, alone.values[0][alone.prompt_index.values == 0], rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # the default suite's budget; run with -m slow
def test_fused_qkv_stores_the_same(single_stores, tmp_path):
    """diffusers' fuse_qkv_projections: values come from to_qkv, the text-side weights from
    the split of to_added_qkv (single blocks: of to_qkv); the store equals the unfused one and
    gives the golden maps."""
    from ovstore.analyze import MapConfig
    from ovstore.analyze.context import compute_context_maps
    from ovstore.capture import load_pipeline
    from ovstore.selection import LayerSelection
    from ovstore.store import format as fmt
    from ovstore.store import open_store

    pipe, identity = load_pipeline(str(PIPELINE))
    pipe.transformer.fuse_qkv_projections()
    with torch.no_grad():  # the split weights are no longer used: make them wrong to prove it
        for block in pipe.transformer.transformer_blocks:
            block.attn.add_k_proj.weight.mul_(2.0)
            block.attn.to_v.weight.mul_(2.0)
        for block in pipe.transformer.single_transformer_blocks:
            block.attn.to_k.weight.mul_(2.0)
            block.attn.to_v.weight.mul_(2.0)
    case = _case("flux-guidance")
    fused = open_store(_capture((pipe, identity), tmp_path / "fused.zarr", case, single_blocks=True))
    plain = open_store(single_stores["flux-guidance"])
    assert [l.name for l in fused.layout.layers] == [l.name for l in plain.layout.layers]
    for info in plain.layout.layers:
        for kind in (fmt.IMAGE_KEYS, fmt.IMAGE_VALUES):
            np.testing.assert_allclose(fused.layer_array(info.name, kind, 0), plain.layer_array(info.name, kind, 0),
                                       rtol=1e-5, atol=1e-6)
    assert set(fused.weights()) == set(plain.weights())
    for name, w in plain.weights().items():
        np.testing.assert_allclose(fused.weights()[name], w, rtol=1e-6, atol=1e-7, err_msg=name)
    for pattern, golden_file in (("transformer_blocks.*", "maps.npy"), ("single_transformer_blocks.*", "maps_single.npy")):
        golden = np.load(FLUX / "cases" / "flux-guidance" / golden_file)
        maps = compute_context_maps(fused, config=MapConfig(branch="cond", layers=LayerSelection(patterns=(pattern,))))
        assert np.abs(maps.values[0] - golden).max() <= 1e-4 * np.abs(golden).max(), golden_file


def test_true_cfg_both_branches(flux_pipe, flux_stores, tmp_path):
    """--branch both under true CFG: the prompt's calls are cond, the negative prompt's uncond;
    the cond half equals the cond-only store and the uncond context is the negative prompt."""
    from ovstore.analyze import MapConfig
    from ovstore.analyze.context import compute_context_maps
    from ovstore.store import format as fmt
    from ovstore.store import open_store

    pipe, _ = flux_pipe
    case = _case("flux-truecfg")
    both = open_store(_capture(flux_pipe, tmp_path / "both.zarr", case, branch="both"))
    cond = open_store(flux_stores["flux-truecfg"])
    assert tuple(both.layout.branches) == ("uncond", "cond") and both.layout.n_steps == 4
    name = "transformer_blocks.1.attn"
    np.testing.assert_array_equal(both.queries(name, 0, branch=1), cond.queries(name, 0, branch=0))
    np.testing.assert_array_equal(both.layer_array(name, fmt.IMAGE_VALUES, 0, branch=1),
                                  cond.layer_array(name, fmt.IMAGE_VALUES, 0, branch=0))
    negative = pipe.tokenizer_2([case["negative_prompt"]], padding="max_length", max_length=32)["input_ids"][0]
    assert list(both.context(0, 0)[1]) == list(negative)
    with torch.no_grad():  # the uncond context is the negative prompt's T5 encoding, as the pipeline made it
        expected = pipe._get_t5_prompt_embeds(case["negative_prompt"], max_sequence_length=32)[0]
    np.testing.assert_allclose(both.context(0, 0)[0], expected.numpy(), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(both.context(0, 1)[0], cond.context(0, 0)[0])
    assert not np.array_equal(both.queries(name, 0, branch=0), both.queries(name, 0, branch=1))
    a = compute_context_maps(both, config=MapConfig(branch="cond")).values[0]
    b = compute_context_maps(cond, config=MapConfig(branch="cond")).values[0]
    np.testing.assert_array_equal(a, b)
    u = compute_context_maps(both, config=MapConfig(branch="uncond")).values[0]
    np.testing.assert_allclose(u.sum(0), 4 * 2 * 2, rtol=1e-5)


def test_flux_bad_inputs(flux_pipe, flux_stores, tmp_path):
    from ovstore.analyze import MapConfig, compute_maps
    from ovstore.capture import CaptureConfig, build_requests, capture, load_pipeline, plan_capture
    from ovstore.errors import InvalidInputError, ModelLoadError, StoreError

    from conftest import TINY_SD15

    pipe, identity = flux_pipe
    case = _case("flux-truecfg")

    def run(prompt_negative, **config):
        requests = build_requests([(case["prompt"], prompt_negative, 1)], guidance=3.5, num_inference_steps=2)
        settings = dict(num_inference_steps=2, guidance=3.5, height=64, width=64, max_sequence_length=8) | config
        capture(pipe, identity, requests, tmp_path / "bad.zarr", config=CaptureConfig(**settings))

    with pytest.raises(InvalidInputError, match="would ignore --true-cfg-scale"):
        run(None, true_cfg_scale=4.0, branch="cond")
    with pytest.raises(InvalidInputError, match="ignores without true"):
        run("blurry", branch="cond")
    with pytest.raises(InvalidInputError, match="--branch both needs FLUX's true"):
        run(None, branch="both")
    with pytest.raises(InvalidInputError, match="at most 512"):
        run(None, max_sequence_length=600, branch="cond")
    assert not (tmp_path / "bad.zarr").exists()
    # a preset that drops the first block, which the second block's text stream needs
    from ovstore.selection import LayerSelection

    with pytest.raises(InvalidInputError, match="first N blocks"):
        plan_capture(pipe, identity, CaptureConfig(num_inference_steps=2, guidance=3.5, height=64, width=64,
                                                   layers=LayerSelection(patterns=("transformer_blocks.1.attn",))))
    # FLUX's option on another family
    sd, sd_identity = load_pipeline(str(TINY_SD15))
    with pytest.raises(InvalidInputError, match="true-cfg-scale applies to FLUX"):
        plan_capture(sd, sd_identity, CaptureConfig(num_inference_steps=2, true_cfg_scale=4.0))
    # a pipeline directory without the T5 encoder the store's recipe needs
    partial = tmp_path / "no-t5"
    shutil.copytree(PIPELINE, partial, ignore=shutil.ignore_patterns("text_encoder_2"))
    with pytest.raises(ModelLoadError, match="no text_encoder_2/ folder"):
        compute_maps(flux_stores["flux-guidance"], ["bicycle"], model=str(partial))
    # a store whose image values were lost
    damaged = tmp_path / "damaged.zarr"
    shutil.copytree(flux_stores["flux-guidance"], damaged)
    shutil.rmtree(damaged / "layers" / "transformer_blocks.0.attn" / "image_values" / "c")
    with pytest.raises(StoreError, match="image values is missing"):
        compute_maps(damaged, ["bicycle"], config=MapConfig(branch="cond"))


def test_cli_capture_and_maps_on_flux(tmp_path, monkeypatch, capsys):
    """The command line end to end with true CFG: options recorded, bytes printed, attribution
    and generation-context maps, and a resume that keeps the store's FLUX settings."""
    from typer.testing import CliRunner

    from ovstore.cli import app
    from ovstore.store import open_store

    runner = CliRunner()
    out = tmp_path / "cli.zarr"
    result = runner.invoke(app, ["capture", str(PIPELINE), "--prompt", "a cup of coffee", "--negative-prompt",
                                 "blurry", "--steps", "2", "--guidance", "3.5", "--true-cfg-scale", "4",
                                 "--height", "64", "--width", "64", "--branch", "cond", "--max-sequence-length", "16",
                                 "--dtype", "float32", "--out", str(out)])
    assert result.exit_code == 0, result.output
    printed = " ".join(result.output.split())
    assert "per image" in printed and "image keys/values and temb" in printed
    store = open_store(out)
    assert store.layout.context.length == 16 and store.layout.extra["max_sequence_length"] == 16
    assert store.layout.extra["true_cfg_scale"] == 4.0 and store.layout.extra["guidance"] == 3.5
    result = runner.invoke(app, ["maps", str(out), "--attribution", "coffee", "--out", str(tmp_path / "m.npy"),
                                 "--png", str(tmp_path / "png")])
    assert result.exit_code == 0, result.output
    maps = np.load(tmp_path / "m.npy")
    assert maps.shape[-2:] == (16, 16) and np.isfinite(maps).all()
    assert any(p.name.endswith("_coffee_s.png") for p in (tmp_path / "png").iterdir())
    result = runner.invoke(app, ["maps", str(out), "--generation-context", "--out", str(tmp_path / "c.npy")])
    assert result.exit_code == 0, result.output
    context = np.load(tmp_path / "c.npy")
    np.testing.assert_allclose(context.reshape(-1, 16, 16).sum(0), 2 * 2 * 2, rtol=1e-5)
    result = runner.invoke(app, ["capture", "--resume", "--prompt", "a cup of coffee", "--prompt", "a book",
                                 "--negative-prompt", "blurry", "--steps", "2", "--guidance", "3.5", "--out", str(out)])
    assert result.exit_code == 0, result.output
    store = open_store(out)
    assert store.complete_images() == [0, 1] and store.layout.extra["true_cfg_scale"] == 4.0
    # an append with another true CFG scale would mix two recipes in one store
    result = runner.invoke(app, ["capture", "--prompt", "a lamp", "--negative-prompt", "blurry",
                                 "--true-cfg-scale", "2", "--out", str(out)])
    assert result.exit_code != 0 and "true_cfg_scale: store has 4.0, this capture has 2.0" in str(result.exception)
    assert open_store(out).n_images == 2
    from ovstore.store import verify_store

    assert verify_store(open_store(out)).ok
    # one line, exit 2, nothing written: true CFG without a negative prompt
    from ovstore.cli import main

    monkeypatch.setattr("sys.argv", ["ovstore", "capture", str(PIPELINE), "--prompt", "a cup", "--steps", "2",
                                     "--true-cfg-scale", "4", "--height", "64", "--width", "64",
                                     "--out", str(tmp_path / "x.zarr")])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main()
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and "would ignore --true-cfg-scale" in err[0], err
    assert not (tmp_path / "x.zarr").exists()


def test_nonzero_text_ids_are_refused(flux_pipe, tmp_path):
    """A transformer call with text position ids other than 0 would rotate the text rows,
    which the recomputed stream does not do: capture stops with one line."""
    from ovstore.errors import InvalidInputError

    pipe, identity = flux_pipe

    def shifted_text_ids(module, args, kwargs):
        kwargs["txt_ids"] = kwargs["txt_ids"] + 1
        return args, kwargs

    handle = pipe.transformer.register_forward_pre_hook(shifted_text_ids, with_kwargs=True)
    try:
        with pytest.raises(InvalidInputError, match="non-zero text position ids"):
            _capture((pipe, identity), tmp_path / "s.zarr", _case("flux-guidance"))
    finally:
        handle.remove()


def test_token_optimization_on_flux_is_the_analysis_map(flux_stores):
    """A token learned on a FLUX store: its T5 rows enter the text stream, which is recomputed
    differentiably through the stored double blocks; the loss falls, the token beats its init
    word on the annotated image, and compute_maps later gives the map that was optimised."""
    from ovstore.analyze import MapConfig, MapPlan, compute_maps
    from ovstore.optimize import OptimizeConfig, TokenTask, optimize_tokens, token_attribution
    from ovstore.optimize.trainer import _Forward
    from ovstore.store import open_store

    store = open_store(flux_stores["flux-guidance"])
    mask = np.zeros((64, 64), bool)
    mask[:32, :32] = True
    (token,) = optimize_tokens(store, [TokenTask("bicycle", (0,), (mask,))], config=OptimizeConfig(epochs=30))
    assert token.family == "flux"
    assert token.training["train_iou"] > token.training["plain_word_iou"], token.training
    forward = _Forward(MapPlan(store, OptimizeConfig().maps), [0], (64, 64))
    rows = token.embedding[None].clone().requires_grad_(True)
    seen = forward(rows)
    analysed = compute_maps(store, [token_attribution(token, store.layout.model)], images=[0],
                            config=MapConfig(size=(64, 64))).values
    np.testing.assert_allclose(seen[:, 0].detach().numpy(), analysed, rtol=1e-5, atol=1e-6)
    seen[0, 0, 1][torch.from_numpy(mask)].sum().backward()
    assert rows.grad is not None and torch.isfinite(rows.grad).all() and rows.grad.abs().sum() > 0


# ---------------------------------------------------------------- output-space maps (ConceptAttention)


def _hooked_outputs(pipe, case):
    """Per used call, each block's attention outputs before the output projections: the image
    rows and the text rows, double blocks (what enters ``to_out[0]`` and ``to_add_out``) then
    single blocks (their attention's joint output, text rows first)."""
    transformer = pipe.transformer
    calls: list[dict] = []
    handles = [transformer.register_forward_pre_hook(lambda m, a, kw: calls.append({"image": [], "text": []}),
                                                     with_kwargs=True)]
    for block in transformer.transformer_blocks:
        handles.append(block.attn.to_out[0].register_forward_pre_hook(
            lambda m, i: calls[-1]["image"].append(i[0][0].detach().clone())))
        handles.append(block.attn.to_add_out.register_forward_pre_hook(
            lambda m, i: calls[-1]["text"].append(i[0][0].detach().clone())))
    text_len = case["max_sequence_length"]

    def on_single(module, inputs, out):
        calls[-1]["image"].append(out[0, text_len:].detach().clone())
        calls[-1]["text"].append(out[0, :text_len].detach().clone())

    for block in transformer.single_transformer_blocks:
        handles.append(block.attn.register_forward_hook(on_single))
    try:
        pipe(case["prompt"], negative_prompt=case.get("negative_prompt"), num_inference_steps=case["steps"],
             guidance_scale=case["guidance_scale"], true_cfg_scale=case.get("true_cfg_scale", 1.0),
             height=case["height"], width=case["width"], max_sequence_length=case["max_sequence_length"],
             generator=torch.Generator("cpu").manual_seed(case["seed"]), output_type="np")
    finally:
        for h in handles:
            h.remove()
    return calls[::2] if case.get("true_cfg_scale", 1.0) > 1 else calls


def _output_space_reference(calls, blocks):
    """Per call and block: image attention outputs · text attention outputs, softmax over the
    text tokens, summed over calls and blocks."""
    total = 0
    for call in calls:
        for i in blocks:
            total = total + (call["image"][i] @ call["text"][i].T).softmax(-1)
    return total.T.reshape(-1, 16, 16).numpy()


@pytest.mark.parametrize("name", CASES)
def test_output_space_maps_equal_hooked_outputs(flux_pipe, tmp_path, name):
    from ovstore.analyze import MapConfig
    from ovstore.analyze.context import compute_context_maps
    from ovstore.store import format as fmt
    from ovstore.store import open_store

    pipe, _ = flux_pipe
    case = _case(name)
    single = name == "flux-guidance"  # the single-stream blocks' outputs too, on one case
    path = _capture(flux_pipe, tmp_path / "out.zarr", case, image_outputs=True, single_blocks=single)
    store = open_store(path)
    calls = _hooked_outputs(pipe, case)
    n_blocks = len(store.layout.layers)
    assert n_blocks == (2 + len(pipe.transformer.single_transformer_blocks) if single else 2)
    assert fmt.IMAGE_OUTPUTS in store.layout.layer_arrays and len(calls) == store.layout.n_steps == 4
    for s, call in enumerate(calls):
        for i, info in enumerate(store.layout.layers):
            stored = torch.from_numpy(store.layer_array(info.name, fmt.IMAGE_OUTPUTS, 0, steps=[s])[0])
            torch.testing.assert_close(stored.permute(1, 2, 0, 3).reshape(256, -1), call["image"][i], rtol=0,
                                       atol=1e-6)
    got = compute_context_maps(store, config=MapConfig(branch="cond", space="output")).values[0]
    expected = _output_space_reference(calls, range(n_blocks))
    assert got.shape == expected.shape == (32, 16, 16)
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()
    np.testing.assert_allclose(got.sum(0), 4 * n_blocks, rtol=1e-5)
    # the attention-space maps of the same store are still the golden ones
    if not single:
        attention = compute_context_maps(store, config=MapConfig(branch="cond")).values[0]
        golden = np.load(FLUX / "cases" / name / "maps.npy")
        assert np.abs(attention - golden).max() <= 1e-4 * np.abs(golden).max()


def test_output_space_open_vocabulary_batching_and_cli(flux_pipe, flux_stores, tmp_path, monkeypatch, capsys):
    from typer.testing import CliRunner

    from ovstore.analyze import MapConfig, compute_maps
    from ovstore.cli import app

    path = _capture(flux_pipe, tmp_path / "out.zarr", _case("flux-guidance"), image_outputs=True)
    config = MapConfig(branch="cond", space="output")
    alone = compute_maps(path, ["bicycle", "an old bicycle"], config=config)
    np.testing.assert_allclose(alone.values[0].sum(0), 2 * 4 * 2, rtol=1e-5)
    others = ["brick", "an old wall", "sky", "a red house by the sea", "water", "a cat"] * 20
    many = compute_maps(path, others[:60] + ["an old bicycle"] + others[60:], config=config)
    mine = many.values[0][many.prompt_index.values == 60]
    np.testing.assert_allclose(mine, alone.values[0][alone.prompt_index.values == 1], rtol=1e-5, atol=1e-6)
    runner = CliRunner()
    result = runner.invoke(app, ["maps", str(path), "--attribution", "bicycle", "--space", "output",
                                 "--out", str(tmp_path / "m.npy")])
    assert result.exit_code == 0, result.output
    np.testing.assert_allclose(np.load(tmp_path / "m.npy")[0], alone.values[0][alone.prompt_index.values == 0],
                               rtol=1e-5, atol=1e-6)
    # a store captured without the image outputs: one line naming the capture option
    from ovstore.cli import main

    monkeypatch.setattr("sys.argv", ["ovstore", "maps", str(flux_stores["flux-guidance"]), "--attribution", "bicycle",
                                     "--space", "output", "--out", str(tmp_path / "n.npy")])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main()
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and "capture it again with --image-outputs" in err[0], err
    assert not (tmp_path / "n.npy").exists()


def test_cli_label_and_evaluate_on_flux(flux_pipe, flux_stores, tmp_path):
    """``ovstore label`` and ``evaluate`` on FLUX stores (as on SD3, tests/optimize/test_mmdit_tokens.py),
    in both map spaces: the extra image-outputs array leaves attention-space labels bit for bit
    the same, ``--space output`` is recorded in the labelling's settings, and the viewer's
    service serves the same output-space maps and commands."""
    import json

    from PIL import Image
    from typer.testing import CliRunner

    from ovstore.analyze import MapConfig, compute_maps
    from ovstore.cli import app
    from ovstore.serve.service import MapService

    runner = CliRunner()
    plain = flux_stores["flux-guidance"]
    with_outputs = _capture(flux_pipe, tmp_path / "out.zarr", _case("flux-guidance"), image_outputs=True)
    classes = ["--classes", "bicycle,wall", "--scheduler", "synchronous"]
    runs = {"plain": [str(plain)], "outputs": [str(with_outputs)], "space": [str(with_outputs), "--space", "output"]}
    for name, args in runs.items():
        result = runner.invoke(app, ["label", args[0], *classes, *args[1:], "--out", str(tmp_path / name)])
        assert result.exit_code == 0, result.output
    labels = {name: [np.asarray(Image.open(p)) for p in sorted((tmp_path / name / "SegmentationClass").glob("*.png"))]
              for name in runs}
    assert len(labels["plain"]) == 1 and labels["plain"][0].shape == (64, 64)
    assert all(np.array_equal(a, b) for a, b in zip(labels["plain"], labels["outputs"]))
    settings = {name: json.loads((tmp_path / name / "ovstore-label.json").read_text())["config"] for name in runs}
    assert settings["space"]["space"] == "output" and "space" not in settings["plain"]
    for name in ("plain", "space"):
        result = runner.invoke(app, ["evaluate", str(tmp_path / name), str(tmp_path / "outputs"),
                                     "--out", str(tmp_path / f"report-{name}")])
        assert result.exit_code == 0, result.output
        report = json.loads((tmp_path / f"report-{name}" / "report.json").read_text())
        assert report["classes"] == ["background", "bicycle", "wall"] and 0 <= report["miou"] <= 1
        if name == "plain":  # the same labels: every class present is matched exactly
            assert report["miou"] == pytest.approx(1.0)
    service = MapService(with_outputs, space="output")
    served = service.maps("bicycle", [0])
    expected = compute_maps(with_outputs, ["bicycle"], config=MapConfig(space="output")).values
    np.testing.assert_allclose(served.maps, expected, rtol=1e-5, atol=1e-6)
    assert "--space output" in service.maps_command("bicycle", [0])
    assert "--space output" in service.label_command(service.label_config("bicycle,wall"), [0])


def test_two_interleaved_captures_keep_their_own_rotary_state(flux_pipe, tmp_path):
    """Two captures in one process, of two pipelines at two sizes (rotary embeddings of 16x16
    and 8x8 image rows): the first is paused inside its first transformer call, after its
    rotary embedding was computed, while the second runs whole; both stores equal the same
    captures run one after the other (the rotary state belongs to each capture, not to the
    shared family object)."""
    import threading

    from ovstore.capture import load_pipeline
    from ovstore.families import get_family
    from ovstore.store import format as fmt
    from ovstore.store import open_store

    case = _case("flux-guidance")
    small = dict(case, height=32, width=32, steps=2)
    other = load_pipeline(str(PIPELINE))
    alone = {"a": _capture(flux_pipe, tmp_path / "a.zarr", case), "b": _capture(other, tmp_path / "b.zarr", small)}
    paused, resume, errors = threading.Event(), threading.Event(), []
    block = flux_pipe[0].transformer.transformer_blocks[0]

    def pause_once(module, args, kwargs):
        if not paused.is_set():
            paused.set()
            assert resume.wait(timeout=300)

    handle = block.register_forward_pre_hook(pause_once, with_kwargs=True)

    def first():
        try:
            _capture(flux_pipe, tmp_path / "a2.zarr", case)
        except BaseException as exc:  # handed to the test thread
            errors.append(exc)

    thread = threading.Thread(target=first)
    try:
        thread.start()
        assert paused.wait(timeout=300)
        _capture(other, tmp_path / "b2.zarr", small)  # while the first is inside a transformer call
    finally:
        resume.set()
        thread.join(timeout=300)
        handle.remove()
    assert not errors, errors
    for name, again in (("a", tmp_path / "a2.zarr"), ("b", tmp_path / "b2.zarr")):
        x, y = open_store(alone[name]), open_store(again)
        assert x.layout.n_steps == y.layout.n_steps and x.layout.layers[0].height == (16 if name == "a" else 8)
        for info in x.layout.layers:
            for kind in ("queries", fmt.IMAGE_KEYS, fmt.IMAGE_VALUES):
                np.testing.assert_array_equal(x.layer_array(info.name, kind, 0), y.layer_array(info.name, kind, 0))
        np.testing.assert_array_equal(x.image(0), y.image(0))
    assert get_family("flux")._call is None  # the registered family holds no capture's state

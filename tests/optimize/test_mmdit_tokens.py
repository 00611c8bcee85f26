"""Token optimization on MM-DiT (SD3) stores: the learned rows are text-stream inputs (rows
``context_embedder`` takes), the stream is recomputed differentiably through the stored blocks
for every image and stored call, and the map analysis later gives a learned token is the map
that was optimised. Labelling with the token, ``maps --png`` and evaluation run on the store."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ovstore.analyze import Attribution, MapConfig, MapPlan, compute_maps
from ovstore.errors import InvalidInputError
from ovstore.optimize import (
    OptimizeConfig, TokenTask, initial_rows, load_token, mask_iou, optimize_tokens, save_token, token_attribution,
)
from ovstore.store import open_store

PIPELINE = Path(__file__).parent.parent / "data" / "online" / "sd3" / "pipeline"
PROMPTS = ["a small robot holding a blue umbrella", "a cat on a red sofa"]
EPOCHS = 40


def corner_mask() -> np.ndarray:
    mask = np.zeros((64, 64), bool)
    mask[:32, :32] = True
    return mask


@pytest.fixture(scope="module")
def sd3_pipe():
    from ovstore.capture import load_pipeline

    return load_pipeline(str(PIPELINE))


@pytest.fixture(scope="module")
def sd3_store(sd3_pipe, tmp_path_factory):
    """Two images of the tiny SD3 pipeline, float32, cond branch, three stored calls."""
    from ovstore.capture import CaptureConfig, build_requests, capture

    pipe, identity = sd3_pipe
    out = tmp_path_factory.mktemp("sd3-opt") / "sd3.zarr"
    requests = build_requests([(p, None, 3 + k) for k, p in enumerate(PROMPTS)], guidance=5.0, num_inference_steps=3)
    capture(pipe, identity, requests, out, config=CaptureConfig(
        num_inference_steps=3, guidance=5.0, dtype="float32", branch="cond", height=64, width=64,
        max_sequence_length=8))
    return out


@pytest.fixture(scope="module")
def encoder(sd3_store):
    from ovstore.analyze import load_text_encoder

    return load_text_encoder(open_store(sd3_store).layout.model)


@pytest.fixture(scope="module")
def trained(sd3_store, encoder):
    losses = []
    (token,) = optimize_tokens(sd3_store, [TokenTask("robot", (0,), (corner_mask(),))],
                               config=OptimizeConfig(epochs=EPOCHS), text_encoder=encoder,
                               progress=lambda e, l: losses.append(l[0]))
    return token, losses


def test_loss_decreases_and_the_token_beats_the_init_word(trained, sd3_store, encoder):
    token, losses = trained
    assert len(losses) == EPOCHS and np.isfinite(losses).all()
    assert token.training["best_loss"] == min(losses) < losses[0] - 0.05
    assert token.family == "sd3" and token.embedding.shape == (2, 48)  # rows of the joined CLIP+T5 width
    # measured again through the analysis: the learned token's map overlaps the mask better than
    # the map of the rows it started from
    store = open_store(sd3_store)
    init = initial_rows(encoder, "robot", OptimizeConfig().context)
    start = Attribution(label="robot-init", tokens=("<|startoftext|>", "robot"), embedding=init)
    maps = compute_maps(store, [token_attribution(token, store.layout.model), start], images=[0],
                        config=MapConfig(size=(64, 64)))
    mask = torch.from_numpy(corner_mask())[None]
    learned_iou = mask_iou(torch.from_numpy(maps.values[:, 1]), mask)
    init_iou = mask_iou(torch.from_numpy(maps.values[:, 3]), mask)
    assert learned_iou > init_iou + 0.1
    assert learned_iou == pytest.approx(token.training["train_iou"], abs=1e-6)
    assert init_iou == pytest.approx(token.training["plain_word_iou"], abs=1e-6)


def test_the_analysis_map_is_the_optimised_map(trained, sd3_store):
    """compute_maps with the token equals the optimiser's forward (keys recomputed from the
    cached image keys/values there, from the store here), on the trained and a held-out image;
    and the forward is differentiable in the rows."""
    from ovstore.optimize.trainer import _Forward

    token, _ = trained
    store = open_store(sd3_store)
    forward = _Forward(MapPlan(store, OptimizeConfig().maps), [0, 1], (64, 64))
    rows = token.embedding[None].clone().requires_grad_(True)
    seen = forward(rows)  # (image, class, 2, H, W)
    analysed = compute_maps(store, [token_attribution(token, store.layout.model)], images=[0, 1],
                            config=MapConfig(size=(64, 64))).values
    np.testing.assert_allclose(seen[:, 0].detach().numpy(), analysed, rtol=1e-5, atol=1e-6)
    # the class share of every pixel: softmax over the two rows, summed over 4 heads x 3 calls x 3 blocks
    np.testing.assert_allclose(analysed.sum(1), 4 * 3 * 3, rtol=1e-5)
    seen[0, 0, 1][torch.from_numpy(corner_mask())].sum().backward()
    assert rows.grad is not None and torch.isfinite(rows.grad).all() and rows.grad.abs().sum() > 0


def test_classes_trained_together_each_have_their_own_stream(sd3_store, encoder):
    """Several classes in one run are separate two-row streams of one batch: each learns what
    it learns alone (a stream that saw another class's rows would not)."""
    store = open_store(sd3_store)
    a = TokenTask("robot", (0,), (corner_mask(),))
    b = TokenTask("cat", (1,), (~corner_mask(),))
    config = OptimizeConfig(epochs=10)
    joint = optimize_tokens(store, [a, b], config=config, text_encoder=encoder)
    alone = [optimize_tokens(store, [t], config=config, text_encoder=encoder)[0] for t in (a, b)]
    for j, s in zip(joint, alone):
        torch.testing.assert_close(j.embedding, s.embedding, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(joint[0].embedding, joint[1].embedding)


def test_training_data_larger_than_memory_is_refused_before_reading(sd3_store, encoder, monkeypatch):
    import ovstore.inputs

    monkeypatch.setattr(ovstore.inputs, "available_memory", lambda: 10_000)
    with pytest.raises(InvalidInputError, match=r"image keys and values of 1 training image.*--calls") as err:
        optimize_tokens(sd3_store, [TokenTask("robot", (0,), (corner_mask(),))], config=OptimizeConfig(epochs=1),
                        text_encoder=encoder)
    assert "\n" not in str(err.value)


def test_token_file_round_trips_and_is_refused_elsewhere(trained, sd3_store, golden_store, tmp_path):
    token, _ = trained
    path = save_token(token, tmp_path / "robot.safetensors")
    loaded = load_token(path)
    assert loaded.family == "sd3" and loaded.hidden_size == 48 and loaded.training == token.training
    store = open_store(sd3_store)
    a = compute_maps(store, [token_attribution(token, store.layout.model)], images=[0])
    b = compute_maps(store, [token_attribution(loaded, store.layout.model)], images=[0])
    np.testing.assert_array_equal(a.values, b.values)
    # a UNet store: another family
    with pytest.raises(InvalidInputError, match="of family sd3.*of family unet") as err:
        token_attribution(loaded, open_store(golden_store).layout.model)
    assert "\n" not in str(err.value)
    # an SD3 store of another model (other text encoders): the fingerprints differ
    other = dataclasses.replace(store.layout.model, text_encoder_fingerprint="0" * 16, id="other/sd3")
    with pytest.raises(InvalidInputError, match="was learned for model") as err:
        token_attribution(loaded, other)
    assert "\n" not in str(err.value)


def test_cli_optimize_label_evaluate_and_png_on_sd3(sd3_store, tmp_path):
    """The command line end to end on an SD3 store: optimize, maps --token --png, label with the
    learned token (and with words only), evaluate the two labellings against each other."""
    from typer.testing import CliRunner

    from ovstore.cli import app

    runner = CliRunner()
    Image.fromarray(corner_mask().astype(np.uint8) * 255).save(tmp_path / "mask.png")
    token_path = tmp_path / "robot.safetensors"
    result = runner.invoke(app, ["optimize", str(sd3_store), "--image", "0", "--mask", str(tmp_path / "mask.png"),
                                 "--init", "robot", "--epochs", "5", "--out", str(token_path)])
    assert result.exit_code == 0, result.output
    assert "training IoU" in result.output and load_token(token_path).family == "sd3"
    result = runner.invoke(app, ["maps", str(sd3_store), "--token", str(token_path), "--out", str(tmp_path / "t.npy"),
                                 "--png", str(tmp_path / "png")])
    assert result.exit_code == 0, result.output
    maps = np.load(tmp_path / "t.npy")
    assert maps.shape == (2, 2, 16, 16) and np.isfinite(maps).all()
    pngs = sorted((tmp_path / "png").rglob("*.png"))
    assert pngs and all(Image.open(p).size[0] > 0 for p in pngs)
    result = runner.invoke(app, ["maps", str(sd3_store), "-a", "a robot", "-a", "cat", "--out",
                                 str(tmp_path / "w.zarr"), "--png", str(tmp_path / "words")])
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "words").rglob("*.png"))) >= 4  # per image and prompt: a sheet and its words
    base = ["label", str(sd3_store), "--classes", "robot,cat", "--scheduler", "synchronous"]
    result = runner.invoke(app, [*base, "--token", str(token_path), "--out", str(tmp_path / "with-token")])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, [*base, "--out", str(tmp_path / "words-only")])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, [*base, "--token", str(token_path), "--mode", "compete",
                                 "--out", str(tmp_path / "compete")])
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "compete" / "SegmentationClass").glob("*.png"))) == 2
    config = json.loads((tmp_path / "with-token" / "ovstore-label.json").read_text())["config"]
    assert config["tokens"] == {"robot": str(token_path)}
    labels = sorted((tmp_path / "with-token" / "SegmentationClass").glob("*.png"))
    assert len(labels) == 2 and all(np.asarray(Image.open(p)).shape == (64, 64) for p in labels)
    result = runner.invoke(app, ["evaluate", str(tmp_path / "with-token"), str(tmp_path / "words-only"),
                                 "--out", str(tmp_path / "report")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["classes"] == ["background", "robot", "cat"] and 0 <= report["miou"] <= 1
    # a UNet token on the SD3 store: refused with one line (cli.main prints it and exits 2)
    other = tmp_path / "unet.safetensors"
    save_token(dataclasses.replace(load_token(token_path), family="unet", model_id="tiny/unet"), other)
    result = runner.invoke(app, ["maps", str(sd3_store), "--token", str(other), "--out", str(tmp_path / "x.npy")])
    assert isinstance(result.exception, InvalidInputError), result.output
    assert "of family unet" in str(result.exception) and "\n" not in str(result.exception)
    assert not (tmp_path / "x.npy").exists()

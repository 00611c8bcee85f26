"""Token optimization from stored queries: it learns, round-trips, transfers and refuses
tokens of other models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ovstore.analyze import compute_maps, load_text_encoder
from ovstore.errors import InvalidInputError
from ovstore.optimize import (
    OptimizeConfig, TokenTask, combined_attribution, load_mask, load_token, optimize_tokens, save_token,
    token_attribution,
)
from ovstore.store import open_store


def square_mask(top=10, left=5, size=30):
    mask = np.zeros((64, 64), bool)
    mask[top:top + size, left:left + size] = True
    return mask


@pytest.fixture(scope="module")
def trained(golden_store):
    losses = []
    (token,) = optimize_tokens(golden_store, [TokenTask("cat", (0,), (square_mask(),))],
                               config=OptimizeConfig(epochs=80), progress=lambda e, l: losses.append(l[0]))
    return token, losses


def test_optimization_lowers_loss_and_beats_the_plain_word(trained):
    token, losses = trained
    assert len(losses) == 80
    assert token.training["best_loss"] == min(losses) < losses[0] - 0.05
    assert token.training["train_iou"] > token.training["plain_word_iou"] + 0.05
    assert token.embedding.shape == (2, 32)


def test_saved_token_round_trips_and_gives_identical_maps(trained, golden_store, tmp_path):
    token, _ = trained
    path = save_token(token, tmp_path / "cat.safetensors")
    loaded = load_token(path)
    assert loaded.hyperparameters == token.hyperparameters
    assert loaded.hyperparameters["lr"] == 100.0 and loaded.hyperparameters["lr_step"] == 120
    assert loaded.hyperparameters["lr_gamma"] == 0.7 and loaded.hyperparameters["epochs"] == 80
    assert loaded.training == token.training and loaded.init_word == "cat"
    identity = open_store(golden_store).layout.model
    before = compute_maps(golden_store, [token_attribution(token, identity)])
    after = compute_maps(golden_store, [token_attribution(loaded, identity)])
    np.testing.assert_array_equal(before.values, after.values)
    assert before.shape == (1, 2, 32, 32)
    assert before["token_str"].values.tolist() == ["<|startoftext|>", "cat*"]


def test_token_of_another_model_is_refused(trained, multi_store, tmp_path):
    from ovstore.capture import CaptureConfig, build_requests, capture, load_pipeline

    token, _ = trained
    pipe, identity = load_pipeline(None)  # the built-in model: same hidden size, other weights
    other = tmp_path / "builtin.zarr"
    capture(pipe, identity, build_requests([("a cat", None, None)], num_inference_steps=2), other,
            config=CaptureConfig(num_inference_steps=2))
    with pytest.raises(InvalidInputError, match="was learned for model"):
        token_attribution(token, open_store(other).layout.model)


def test_multi_image_training_and_transfer_to_another_image(multi_store):
    store = open_store(multi_store)
    task = TokenTask("dog", (0, 2), (square_mask(5, 5, 20), square_mask(30, 30, 25)), name="thing")
    losses = []
    (token,) = optimize_tokens(store, [task], config=OptimizeConfig(epochs=40),
                               progress=lambda e, l: losses.append(l[0]))
    assert token.training["images"] == [0, 2] and token.name == "thing"
    assert min(losses) < losses[0]
    maps = compute_maps(store, [token_attribution(token, store.layout.model)], images=[1])  # held out
    assert maps.shape == (1, 2, 32, 32)
    np.testing.assert_allclose(maps.sum("token").values, 5 * 4 * 6, rtol=1e-5)  # calls x heads x layers


def test_several_classes_in_one_run_equal_separate_runs(multi_store):
    store = open_store(multi_store)
    encoder = load_text_encoder(store.layout.model)
    a = TokenTask("cat", (0,), (square_mask(),))
    b = TokenTask("sofa", (1,), (square_mask(30, 20, 20),))
    config = OptimizeConfig(epochs=15)
    joint = optimize_tokens(store, [a, b], config=config, text_encoder=encoder)
    alone = [optimize_tokens(store, [t], config=config, text_encoder=encoder)[0] for t in (a, b)]
    for j, s in zip(joint, alone):
        torch.testing.assert_close(j.embedding, s.embedding, rtol=1e-4, atol=1e-3)
    combined = combined_attribution(joint, store.layout.model)
    maps = compute_maps(store, [combined], images=[0])
    assert maps["token_str"].values.tolist() == ["<|startoftext|>", "cat*", "sofa*"]
    # with the text encoder's start-of-text row the classes compete whatever their order
    from ovstore.analyze.text import start_of_text_row

    sot = start_of_text_row(encoder)
    ab = compute_maps(store, [combined_attribution(joint, store.layout.model, sot)], images=[0], text_encoder=encoder)
    ba = compute_maps(store, [combined_attribution(joint[::-1], store.layout.model, sot)], images=[0],
                      text_encoder=encoder)
    np.testing.assert_allclose(ab.values[0, [0, 1, 2]], ba.values[0, [0, 2, 1]], rtol=1e-5, atol=1e-5)


def test_bad_masks(tmp_path):
    with pytest.raises(InvalidInputError, match="does not exist"):
        load_mask(tmp_path / "missing.png", (64, 64))
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(InvalidInputError, match="not a readable image"):
        load_mask(tmp_path / "bad.png", (64, 64))
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(tmp_path / "empty.png")
    with pytest.raises(InvalidInputError, match="empty"):
        load_mask(tmp_path / "empty.png", (64, 64))
    big = np.zeros((128, 128, 3), np.uint8)
    big[:64, :64] = 255
    Image.fromarray(big).save(tmp_path / "rgb.png")
    mask = load_mask(tmp_path / "rgb.png", (64, 64))
    assert mask.shape == (64, 64) and mask[:32, :32].all() and not mask[32:, :].any()
    with pytest.raises(InvalidInputError, match="one --mask per --image"):
        TokenTask("cat", (0, 1), (mask,))


def test_masks_of_any_encoding_and_scale(tmp_path):
    soft = np.zeros((64, 64), np.uint8)
    soft[10:40, 10:40] = 255
    soft[8:42, 8:10] = 40  # an anti-aliased fringe: not the object
    Image.fromarray(soft).save(tmp_path / "soft.png")
    mask = load_mask(tmp_path / "soft.png", (64, 64))
    assert mask[10:40, 10:40].all() and not mask[:, 8:10].any() and mask.sum() == 900
    Image.fromarray((soft == 255).astype(np.uint8)).save(tmp_path / "ones.png")  # 0/1 values
    np.testing.assert_array_equal(load_mask(tmp_path / "ones.png", (64, 64)), mask)
    half = load_mask(tmp_path / "soft.png", (32, 32))  # any scale of the image's shape
    assert half.shape == (32, 32) and half[6:19, 6:19].all()


def test_cli_optimize_and_maps_with_tokens(golden_store, tmp_path):
    from typer.testing import CliRunner

    from ovstore.cli import app

    Image.fromarray(square_mask().astype(np.uint8) * 255).save(tmp_path / "mask.png")
    runner = CliRunner()
    for word in ("cat", "sofa"):
        result = runner.invoke(app, ["optimize", str(golden_store), "--image", "0", "--mask", str(tmp_path / "mask.png"),
                                     "--init", word, "--epochs", "5", "--out", str(tmp_path / f"{word}.safetensors")])
        assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["maps", str(golden_store), "--token", str(tmp_path / "cat.safetensors"),
                                 "--out", str(tmp_path / "cat.npy")])
    assert result.exit_code == 0, result.output
    assert np.load(tmp_path / "cat.npy").shape == (1, 2, 32, 32)
    result = runner.invoke(app, ["maps", str(golden_store), "--token", str(tmp_path / "cat.safetensors"),
                                 "--token", str(tmp_path / "sofa.safetensors"), "--combine-tokens",
                                 "--out", str(tmp_path / "both.npy")])
    assert result.exit_code == 0, result.output
    assert np.load(tmp_path / "both.npy").shape == (1, 3, 32, 32)


def test_cli_tasks_file_trains_several_classes_in_one_run(golden_store, tmp_path):
    import json

    from typer.testing import CliRunner

    from ovstore.cli import app

    Image.fromarray(square_mask().astype(np.uint8) * 255).save(tmp_path / "a.png")
    Image.fromarray(square_mask(30, 20, 20).astype(np.uint8) * 255).save(tmp_path / "b.png")
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text(json.dumps({"init": "cat", "images": [0], "masks": ["a.png"]}) + "\n"
                     + json.dumps({"init": "sofa", "images": [0], "masks": ["b.png"], "name": "couch"}) + "\n")
    runner = CliRunner()
    result = runner.invoke(app, ["optimize", str(golden_store), "--tasks-file", str(tasks), "--epochs", "3",
                                 "--out", str(tmp_path / "tokens")])
    assert result.exit_code == 0, result.output
    cat, couch = load_token(tmp_path / "tokens" / "cat.safetensors"), load_token(tmp_path / "tokens" / "couch.safetensors")
    assert (cat.init_word, couch.init_word, couch.name) == ("cat", "sofa", "couch")
    tasks.write_text(json.dumps({"init": "cat", "images": [0], "masks": ["a.png"]}) + "\n{not json}\n")
    result = runner.invoke(app, ["optimize", str(golden_store), "--tasks-file", str(tasks), "--out", str(tmp_path / "t2")])
    assert result.exit_code != 0 and "line 2" in str(result.exception)
    assert not (tmp_path / "t2").exists()

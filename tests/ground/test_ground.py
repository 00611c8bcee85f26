"""Grounding heads (ovstore.ground): training on a tiny toy-world store, head files, refusal on
another model's store, apply in-process and on Dask, resumable training, bad input."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ovstore.errors import InvalidInputError
from ovstore.ground import (
    FeatureReader, TrainConfig, apply_head, checkpoint_path, ground_maps, head_selection, load_head, train_head,
)
from ovstore.label import evaluate_dirs
from ovstore.label.voc import write_label_tree
from ovstore.store import open_store
from ovstore.toyworld import quality as q

SHAPES = ("circle", "square", "triangle")


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """Six toy-world generations (10 steps; circles, squares and a triangle) and their exact masks as a VOC label tree."""
    root = tmp_path_factory.mktemp("ground-toy")
    scenes = q.quality_scenes(5, 2)
    store = q.capture_captions([s.caption for s in scenes], root / "toy.zarr", seed=500, steps=10)
    images = store.complete_images()
    gt = write_label_tree(root / "gt", SHAPES, {i: q.label_truth(q.image_truth(store, i)) for i in images})
    return store, gt, root


@pytest.fixture(scope="module")
def encoder(toy):
    from ovstore.analyze import load_text_encoder

    return load_text_encoder(toy[0].layout.model)


@pytest.fixture(scope="module")
def overfit(toy, encoder):
    """A head of attention features only (``image=False``) trained on every image (no
    validation), full batches, until it fits."""
    store, gt, root = toy
    losses = []
    result = train_head([store], [gt], root / "overfit.safetensors", classes=["circle", "square"],
                        config=TrainConfig(epochs=150, val_fraction=0.0, patience=1000, batch_size=64, image=False),
                        text_encoder=encoder, progress=lambda r: losses.append(r.train_loss))
    return result, losses


def test_a_head_overfits_a_tiny_store(overfit, toy):
    result, losses = overfit
    assert len(losses) == 150
    assert losses[-1] < 0.25 * losses[0]
    training = result.head.training
    assert training["train_iou"] > 0.8  # sigmoid > 0.5 against the exact masks of its training images
    assert 20_000 < training["parameters"] < 1_000_000
    # what the file records: model identity, layers, calls, classes, provenance
    store = toy[0]
    assert result.head.model["id"] == "ovstore/toy-shapes"
    assert result.head.model["text_encoder_fingerprint"] == store.layout.model.text_encoder_fingerprint
    assert [l.name for l in result.head.spec.layers] == [l.name for l in store.layers]
    assert result.head.calls == tuple(range(store.layout.n_steps))
    assert result.head.classes_seen == ("circle", "square")
    assert training["stores"] == [str(store.path.resolve())]
    assert training["mask_sources"] == ["masks"]
    assert not checkpoint_path(result.path).exists()  # removed once the head is written
    # the threshold `ground apply` takes by default: the best of the sweep (training split: no validation here)
    from ovstore.ground.train import THRESHOLD_GRID

    sweep = {float(t): v for t, v in training["threshold_sweep"].items()}
    assert sorted(sweep) == list(THRESHOLD_GRID) and training["threshold_split"] == "training"
    assert training["validation_threshold"] == max(sweep, key=sweep.get)
    assert sweep[0.5] == pytest.approx(training["train_iou"], abs=1e-6)  # the sweep's 0.5 is the recorded IoU


def test_save_load_round_trip_gives_identical_outputs(overfit, toy, encoder):
    result, _ = overfit
    store = toy[0]
    loaded = load_head(result.path)
    assert loaded.spec == result.head.spec and loaded.classes_seen == result.head.classes_seen
    for k, v in result.head.state.items():
        assert torch.equal(loaded.state[k], v)
    a = ground_maps(store, result.head, SHAPES, text_encoder=encoder)
    b = ground_maps(store, loaded, SHAPES, text_encoder=encoder)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (6, 3, 32, 32) and 0.0 <= a.min() and a.max() <= 1.0
    # the trained head marks its seen classes' objects: high inside, low outside
    gt = toy[1]
    labels = np.stack([np.asarray(__import__("PIL.Image").Image.open(gt / "SegmentationClass" / f"{i:05d}.png"))
                       for i in store.complete_images()])
    for c in (0, 1):
        inside = a[:, c][labels == c + 1]
        outside = a[:, c][(labels != c + 1) & (labels != 255)]
        assert inside.mean() > 0.6 and outside.mean() < 0.1


def test_a_head_that_reads_the_image_fits_round_trips_and_depends_on_the_pixels(toy, encoder, tmp_path):
    """``TrainConfig(image=True)``: the stored image is an input at full resolution; the head
    file records it, and a head file without the field (written before) reads as image-free."""
    from ovstore.ground.model import GroundHead, HeadSpec

    store, gt, _ = toy
    losses = []
    result = train_head([store], [gt], tmp_path / "image.safetensors", classes=["circle", "square"],
                        config=TrainConfig(epochs=150, val_fraction=0.0, patience=1000, batch_size=64, image=True),
                        text_encoder=encoder, progress=lambda r: losses.append(r.train_loss))
    assert result.head.spec.image_channels == 3
    assert losses[-1] < 0.3 * losses[0] and result.head.training["train_iou"] > 0.8
    loaded = load_head(result.path)
    assert loaded.spec == result.head.spec
    a = ground_maps(store, loaded, SHAPES, text_encoder=encoder)
    np.testing.assert_array_equal(a, ground_maps(store, result.head, SHAPES, text_encoder=encoder))
    # the pixels matter: the same features with the image's colours inverted give other masks
    selection = head_selection(loaded, store)
    reader = FeatureReader(store, selection, 0, image=True)
    feats = [torch.from_numpy(f)[None] for f in reader(0)]
    assert feats[-1].shape == (1, 3, 32, 32) and -1.0 <= float(feats[-1].min()) and float(feats[-1].max()) <= 1.0
    module = loaded.build("cpu")
    module.attach_keys(reader.projections())
    rows = torch.stack([encoder_rows for encoder_rows in [
        __import__("ovstore.ground.data", fromlist=["class_rows"]).class_rows(encoder, ["circle"])["circle"]]])
    with torch.no_grad():
        plain = module(feats, rows)
        inverted = module([*feats[:-1], -feats[-1]], rows)
    assert float((plain - inverted).abs().max()) > 0.5
    with pytest.raises(ValueError, match="and the image"):
        module(feats[:-1], rows)
    old = loaded.spec.to_json()
    del old["image_channels"]
    assert HeadSpec.from_json(old).image_channels == 0
    assert GroundHead(HeadSpec.from_json(old)).parameter_count() < module.parameter_count()


def test_class_text_from_the_prompt_or_the_template(overfit, encoder):
    from ovstore.ground import ClassText

    assert overfit[0].head.text == "prompt"  # the default, recorded in the head file
    text = ClassText(encoder, ["circle", "triangle"], source="prompt", class_words={"circle": ["disc"]})
    template = ClassText(encoder, ["circle", "triangle"], source="template")
    prompt = "a red disc and a yellow disc"
    # the class named in the prompt (by a class word) takes its rows there; the other its template rows
    assert not torch.equal(text.rows(prompt, "circle"), template.rows(prompt, "circle"))
    assert torch.equal(text.rows(prompt, "triangle"), template.rows(prompt, "triangle"))
    (att,) = encoder.encode([prompt])
    cols = [k for k, t in enumerate(att.tokens) if t == "disc</w>"]
    assert len(cols) == 2
    torch.testing.assert_close(text.rows(prompt, "circle")[1], att.embedding[cols].float().mean(0))
    with pytest.raises(InvalidInputError, match="--text 'caption'"):
        ClassText(encoder, ["circle"], source="caption")


def test_bounded_feature_cache_reads_again_and_gives_the_same(overfit, toy, encoder):
    result, _ = overfit
    store = toy[0]
    selection = head_selection(result.head, store)
    none = FeatureReader(store, selection, cache_bytes=0)
    one = FeatureReader(store, selection, cache_bytes=FeatureReader(store, selection).bytes_per_image)
    for image in (0, 1, 0, 1, 1):
        for a, b in zip(none(image), one(image)):
            np.testing.assert_array_equal(a, b)
    assert none.reads == 5 and one.reads == 4  # nothing kept / only the last image kept
    np.testing.assert_array_equal(ground_maps(store, result.head, SHAPES, text_encoder=encoder, cache_bytes=0),
                                  ground_maps(store, result.head, SHAPES, text_encoder=encoder, cache_bytes=2**30))


def _cli(args, capsys, monkeypatch) -> tuple[int, str, str]:
    """``ovstore ARGS`` in this process (the console entry point: one-line errors, exit status)."""
    from ovstore.cli import main

    monkeypatch.setattr(sys, "argv", ["ovstore", *map(str, args)])
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_refused_on_another_models_store(overfit, toy, multi_store, tmp_path, capsys, monkeypatch):
    result, _ = overfit
    with pytest.raises(InvalidInputError) as info:
        ground_maps(multi_store, result.path, ["cat"])
    message = str(info.value)
    assert "\n" not in message and "ovstore/toy-shapes" in message and "train a head on stores of this model" in message
    out = tmp_path / "out"
    code, _, err = _cli(["ground", "apply", multi_store, "--head", result.path, "--classes", "cat", "--out", out],
                        capsys, monkeypatch)
    assert code == 2
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "trained on stores of model" in lines[0]
    assert not out.exists()
    # the same model, but a store without the head's layers or calls
    from dataclasses import replace

    from ovstore.ground import check_head_store

    store = toy[0]
    renamed = replace(result.head, spec=replace(result.head.spec, layers=(
        replace(result.head.spec.layers[0], name="up_blocks.9.attn2"), *result.head.spec.layers[1:])))
    with pytest.raises(InvalidInputError, match="reads layer up_blocks.9.attn2"):
        check_head_store(renamed, store)
    with pytest.raises(InvalidInputError, match="reads stored calls"):
        check_head_store(replace(result.head, calls=(0, 99)), store)


def test_apply_on_dask_equals_in_process_and_evaluates(overfit, toy, tmp_path):
    result, _ = overfit
    store, gt, _ = toy
    inproc = apply_head(store, result.path, SHAPES, tmp_path / "sync", scheduler="synchronous", partition_size=3)
    dask = apply_head(store, result.path, SHAPES, tmp_path / "dask", scheduler=None, workers=1, partition_size=3)
    assert inproc.labelled == dask.labelled == tuple(store.complete_images())
    for png in sorted((tmp_path / "sync" / "SegmentationClass").glob("*.png")):
        assert png.read_bytes() == (tmp_path / "dask" / "SegmentationClass" / png.name).read_bytes()
    coco = [json.loads((tmp_path / d / "annotations.json").read_text()) for d in ("sync", "dask")]
    assert coco[0]["annotations"] == coco[1]["annotations"] and coco[0]["categories"] == coco[1]["categories"]
    report = evaluate_dirs(tmp_path / "sync", gt)  # `ovstore evaluate` reads the layout
    assert report.iou[1] > 0.7 and report.iou[2] > 0.5  # seen classes, on the training images (triangle competes)
    again = apply_head(store, result.path, SHAPES, tmp_path / "sync", scheduler="synchronous")  # resumes: all done
    assert again.labelled == () and again.skipped == inproc.labelled
    # no --threshold: the head's calibrated one, recorded with the output's settings
    settings = json.loads((tmp_path / "sync" / "ovstore-ground.json").read_text())
    assert settings["threshold"] == result.head.training["validation_threshold"]
    fixed = apply_head(store, result.path, SHAPES, tmp_path / "fixed", scheduler="synchronous", threshold=0.5)
    assert json.loads((tmp_path / "fixed" / "ovstore-ground.json").read_text())["threshold"] == 0.5
    assert fixed.labelled == inproc.labelled
    with pytest.raises(InvalidInputError, match="another head, classes or settings"):
        apply_head(store, result.path, ("circle",), tmp_path / "sync", scheduler="synchronous")


def test_training_resumes_after_an_interruption_to_the_same_head(toy, encoder, tmp_path):
    store, gt, _ = toy
    config = TrainConfig(epochs=4, val_fraction=0.25, patience=10, batch_size=4)

    def stop_after_two(report):
        if report.epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_head([store], [gt], tmp_path / "a.safetensors", config=config, text_encoder=encoder,
                   progress=stop_after_two)
    assert checkpoint_path(tmp_path / "a.safetensors").exists() and not (tmp_path / "a.safetensors").exists()
    epochs = []
    resumed = train_head([store], [gt], tmp_path / "a.safetensors", config=config, text_encoder=encoder,
                         progress=lambda r: epochs.append(r.epoch))
    assert resumed.resumed_from == 2 and epochs == [2, 3]
    straight = train_head([store], [gt], tmp_path / "b.safetensors", config=config, text_encoder=encoder)
    for k, v in straight.head.state.items():
        assert torch.equal(resumed.head.state[k], v), k
    assert resumed.head.training["history"] == straight.head.training["history"]
    assert resumed.head.training["images"] == {"train": 4, "validation": 2}
    # a checkpoint of other settings is not resumed by another command
    with pytest.raises(KeyboardInterrupt):
        train_head([store], [gt], tmp_path / "c.safetensors", config=config, text_encoder=encoder,
                   progress=stop_after_two)
    with pytest.raises(InvalidInputError, match="belongs to a training with other"):
        train_head([store], [gt], tmp_path / "c.safetensors", classes=["circle"], config=config, text_encoder=encoder)


def test_bad_ground_inputs_are_one_line_errors(overfit, toy, encoder, tmp_path):
    result, _ = overfit
    store, gt, _ = toy
    cases = [
        (lambda: train_head([store], [gt, gt], tmp_path / "h.safetensors", text_encoder=encoder),
         "1 store(s) but 2 --labels folder(s)"),
        (lambda: train_head([store], [gt], tmp_path / "h.safetensors", classes=["dog"], text_encoder=encoder),
         "--classes dog: no --labels folder names it"),
        (lambda: train_head([store], [tmp_path], tmp_path / "h.safetensors", text_encoder=encoder),
         "has no labelmap.txt"),
        (lambda: train_head([store], [gt], tmp_path / "h.pt", text_encoder=encoder), "must end in .safetensors"),
        (lambda: train_head([store], [gt], result.path, text_encoder=encoder), "add --overwrite"),
        (lambda: train_head([store], [gt], gt / "labelmap.txt", text_encoder=encoder), "must end in .safetensors"),
        (lambda: TrainConfig(val_fraction=1.0), "--val-fraction 1.0"),
        (lambda: TrainConfig(epochs=0), "--epochs"),
        (lambda: ground_maps(store, gt / "labelmap.txt", ["circle"]), "not a readable safetensors head file"),
        (lambda: ground_maps(store, tmp_path / "none.safetensors", ["circle"]), "does not exist"),
        (lambda: ground_maps(store, result.path, []), "no class word"),
        (lambda: apply_head(store, result.path, ["circle"], tmp_path / "o", threshold=1.5), "--threshold 1.5"),
    ]
    for call, expected in cases:
        with pytest.raises(InvalidInputError) as info:
            call()
        assert expected in str(info.value) and "\n" not in str(info.value), (expected, str(info.value))
    assert not (tmp_path / "h.safetensors").exists() and not (tmp_path / "o").exists()
    # an MM-DiT store (its keys depend on the image: no fixed to_k to read)
    from types import SimpleNamespace

    from ovstore.ground import select_layers

    mmdit = SimpleNamespace(path=Path("sd3.zarr"), layout=SimpleNamespace(layer_arrays=("image_keys",),
                                                                          model=SimpleNamespace(family="sd3")))
    with pytest.raises(InvalidInputError, match="reads UNet cross-attention stores"):
        select_layers(mmdit)
    # a label PNG of another aspect ratio
    bad = write_label_tree(tmp_path / "bad", SHAPES, {0: np.zeros((16, 32), np.uint8)})
    with pytest.raises(InvalidInputError, match="another aspect ratio"):
        train_head([store], [bad], tmp_path / "h.safetensors", text_encoder=encoder)


def test_cli_train_apply_and_maps_head(toy, tmp_path, capsys, monkeypatch):
    store, gt, _ = toy
    head = tmp_path / "cli.safetensors"
    run = lambda *a: _cli(a, capsys, monkeypatch)  # noqa: E731
    code, _, err = run("ground", "train", store.path, "--labels", gt, "--classes", "circle,square", "--out", head,
                       "--epochs", "2", "--val-fraction", "0.25")
    assert code == 0, err
    assert "classes seen: circle, square" in err and head.exists()
    code, _, err = run("ground", "apply", store.path, "--head", head, "--classes", "circle,square,triangle", "--out",
                       tmp_path / "ds", "--scheduler", "synchronous")
    assert code == 0, err
    assert len(list((tmp_path / "ds" / "SegmentationClass").glob("*.png"))) == 6
    code, out, _ = run("evaluate", tmp_path / "ds", gt)
    assert code == 0 and "triangle" in out
    code, _, err = run("maps", store.path, "-a", "circle", "-a", "a red square", "--out", tmp_path / "m.zarr",
                       "--head", head)
    assert code == 0, err
    maps = np.load(tmp_path / "m.head.npy")
    assert maps.shape == (6, 2, 32, 32) and maps.dtype == np.float32
    # a bad head file is refused before any map is computed or written
    code, _, err = run("maps", store.path, "-a", "circle", "--out", tmp_path / "m2.npy", "--head", gt / "labelmap.txt")
    assert code == 2 and "not a readable safetensors head file" in err and not (tmp_path / "m2.npy").exists()
    code, _, err = run("ground", "train", store.path, "--labels", gt, "--out", head)
    assert code == 2 and err.strip().startswith("error:") and len(err.strip().splitlines()) == 1


def _brightness_labels(store, root: Path) -> Path:
    """Masks that need no model: 'bright' where a pixel is brighter than the image's median."""
    labels = {}
    for i in store.complete_images():
        grey = store.image(i).astype(np.float32).mean(-1)
        labels[i] = (grey > np.median(grey)).astype(np.uint8)
    return write_label_tree(root, ("bright",), labels)


def test_sd15_sd2_and_sdxl_stores(multi_store, tiny_pipe, tmp_path):
    from ovstore.analyze import TextEncoder
    from ovstore.capture import CaptureConfig, build_requests, capture, load_pipeline

    sdxl = tmp_path / "sdxl.zarr"
    sdxl_pipe = load_pipeline(str(Path(__file__).parents[1] / "data" / "online" / "sdxl-pipeline"))
    capture(*sdxl_pipe, build_requests([("a lighthouse", None, 1), ("a bowl of oranges", None, 2)],
                                       num_inference_steps=2, guidance=5.0), sdxl,
            config=CaptureConfig(num_inference_steps=2, guidance=5.0, branch="cond", dtype="float32"))
    pipe, _ = tiny_pipe
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from ovstore.capture import model_identity

    torch.manual_seed(0)
    unet = UNet2DConditionModel(  # SD 2.x style: linear projections, upcast attention, per-block heads
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64, 64),
        attention_head_dim=(2, 4, 8), use_linear_projection=True, upcast_attention=True, cross_attention_dim=32,
        down_block_types=("CrossAttnDownBlock2D",) * 3, up_block_types=("CrossAttnUpBlock2D",) * 3).eval()
    sd2 = StableDiffusionPipeline(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=unet,
                                  scheduler=pipe.scheduler, safety_checker=None, feature_extractor=None,
                                  requires_safety_checker=False)
    sd2.set_progress_bar_config(disable=True)
    sd2_store = tmp_path / "sd2.zarr"
    capture(sd2, model_identity(sd2, "sd2-style-test", source="local"),
            build_requests([("a cat", None, 1), ("a dog", None, 2)], num_inference_steps=2), sd2_store,
            config=CaptureConfig(num_inference_steps=2, dtype="float32"))
    sd2_encoder = TextEncoder(pipe.tokenizer, pipe.text_encoder)
    for name, path, text_encoder in (("sd15", multi_store, None), ("sd2", sd2_store, sd2_encoder),
                                     ("sdxl", sdxl, None)):
        store = open_store(path)
        labels = _brightness_labels(store, tmp_path / f"{name}-labels")
        result = train_head([store], [labels], tmp_path / f"{name}.safetensors", text_encoder=text_encoder,
                            config=TrainConfig(epochs=2, val_fraction=0.0, batch_size=2))
        history = result.head.training["history"]
        assert len(history) == 2 and all(np.isfinite(h[1]) for h in history), name
        assert [l.name for l in result.head.spec.layers] == [l.name for l in store.layers]
        maps = ground_maps(store, result.path, ["bright", "tree"], text_encoder=text_encoder)
        assert maps.shape == (len(store.complete_images()), 2, store.layout.height, store.layout.width), name
        assert np.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1
    # a head of one family's store is refused on another's
    with pytest.raises(InvalidInputError, match="trained on stores of model"):
        ground_maps(multi_store, tmp_path / "sdxl.safetensors", ["bright"])

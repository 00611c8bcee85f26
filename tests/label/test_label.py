"""Labelling a store: VOC and COCO outputs, resumption, Dask clusters, tokens, evaluation."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from ovstore.errors import InvalidInputError
from ovstore.label import LabelConfig, evaluate_dirs, evaluate_masks, label_store

torch.set_num_threads(1)

CLASSES = ("cat", "sofa", "car", "dog")
CONFIG = LabelConfig(classes=CLASSES, threshold=0.6)


def _outputs(root):
    pngs = {p.name: np.asarray(Image.open(p)) for p in sorted((root / "SegmentationClass").glob("*.png"))}
    coco = json.loads((root / "annotations.json").read_text())
    return pngs, coco


def _assert_same_dataset(out, reference):
    ref_pngs, ref_coco = _outputs(reference)
    pngs, coco = _outputs(out)
    assert pngs.keys() == ref_pngs.keys()
    for name in pngs:
        np.testing.assert_array_equal(pngs[name], ref_pngs[name])
    assert coco["annotations"] == ref_coco["annotations"]
    assert [i["id"] for i in coco["images"]] == [i["id"] for i in ref_coco["images"]]


@pytest.fixture(scope="module")
def labelled(multi_store, tmp_path_factory):
    out = tmp_path_factory.mktemp("label") / "dataset"
    result = label_store(multi_store, out, CONFIG, scheduler="synchronous", partition_size=2, write_maps=True)
    return out, result


def test_voc_tree_and_coco_round_trip(labelled):
    from pycocotools.coco import COCO

    out, result = labelled
    assert result.labelled == (0, 1, 2)
    pngs, _ = _outputs(out)
    assert sorted(pngs) == ["00000.png", "00001.png", "00002.png"]
    for name in pngs:
        image = Image.open(out / "SegmentationClass" / name)
        assert image.mode == "P" and image.size == (64, 64)
        palette = image.getpalette()
        assert palette[:6] == [0, 0, 0, 128, 0, 0] and palette[765:768] == [224, 224, 192]  # VOC; 255 = ignore
        assert set(np.unique(pngs[name])) <= {0, 1, 2, 3, 4}
        assert (out / "JPEGImages" / name.replace(".png", ".jpg")).exists()
    assert sorted(p.name for p in (out / "JPEGImages").iterdir()) == ["00000.jpg", "00001.jpg", "00002.jpg"]
    assert (out / "labelmap.txt").read_text().splitlines()[1:3] == ["background:0,0,0::", "cat:128,0,0::"]
    assert (out / "ImageSets" / "Segmentation" / "train.txt").read_text().split() == ["00000", "00001", "00002"]
    coco = COCO(str(out / "annotations.json"))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(CLASSES)
    n_annotations = 0
    for image_id in (0, 1, 2):
        labels = pngs[f"{image_id:05d}.png"]
        info = coco.loadImgs(image_id)[0]
        assert info["ovstore"]["image_index"] == image_id and info["ovstore"]["classes"] == list(CLASSES)
        assert info["ovstore"]["thresholds"]["cat"] == 0.6 and "seed" in info["ovstore"]
        assert info["ovstore"]["normalize"] == "minmax"
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=image_id)):
            np.testing.assert_array_equal(coco.annToMask(ann), labels == ann["category_id"])
            n_annotations += 1
        present = set(np.unique(labels)) - {0}
        assert len(coco.getAnnIds(imgIds=image_id)) == len(present)
    assert n_annotations > 0
    import zarr

    maps = zarr.open_array(out / "maps.zarr", mode="r")
    assert maps.shape == (3, 4, 64, 64) and not np.isnan(maps[:]).any()
    assert np.nanmax(maps[0]) == 1.0 and np.nanmin(maps[0]) == 0.0  # min-max normalised


KILLER = textwrap.dedent("""
    import os, signal, sys
    import torch
    torch.set_num_threads(1)
    from ovstore.label import LabelConfig, label_store, voc
    real = os.replace
    def replace(src, dst):
        if str(dst).endswith("00001.png"):  # the temporary is complete: die before the rename
            os.kill(os.getpid(), signal.SIGKILL)
        real(src, dst)
    voc.os.replace = replace
    label_store(sys.argv[1], sys.argv[2], LabelConfig(classes=("cat", "sofa", "car", "dog"), threshold=0.6),
                scheduler="synchronous", partition_size=1)
""")


def test_sigkilled_run_resumes_without_recomputing(multi_store, tmp_path, labelled):
    out = tmp_path / "resume"
    proc = subprocess.run([sys.executable, "-c", KILLER, str(multi_store), str(out)], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    # killed between writing image 1's label PNG and renaming it into place
    partials = [p.name for p in (out / "SegmentationClass").iterdir() if p.name.endswith(".partial")]
    assert len(partials) == 1 and partials[0].startswith(".00001.png.")
    assert [p.name for p in (out / "SegmentationClass").glob("*.png")] == ["00000.png"]
    assert sorted(p.name for p in (out / "JPEGImages").glob("*.jpg")) == ["00000.jpg", "00001.jpg"]
    assert sorted(p.name for p in (out / "records").iterdir()) == ["00000.json"]
    first = (out / "records" / "00000.json").stat().st_mtime_ns
    result = label_store(multi_store, out, CONFIG, scheduler="synchronous", partition_size=1)
    assert result.skipped == (0,) and result.labelled == (1, 2)
    assert (out / "records" / "00000.json").stat().st_mtime_ns == first  # not recomputed
    assert not [p for p in out.rglob("*") if ".partial" in p.name]  # stale temporaries removed
    _assert_same_dataset(out, labelled[0])
    with pytest.raises(InvalidInputError, match="other settings"):
        label_store(multi_store, out, LabelConfig(classes=CLASSES, threshold=0.5), scheduler="synchronous")


def test_subset_runs_keep_earlier_images_and_fill_maps(multi_store, tmp_path, labelled):
    import zarr

    out = tmp_path / "subsets"
    label_store(multi_store, out, CONFIG, images=[0, 1], scheduler="synchronous")
    second = label_store(multi_store, out, CONFIG, images=[2], scheduler="synchronous")
    assert second.labelled == (2,)
    _assert_same_dataset(out, labelled[0])  # images 0 and 1 are still in annotations.json
    assert (out / "ImageSets" / "Segmentation" / "train.txt").read_text().split() == ["00000", "00001", "00002"]
    # maps asked for after the images were finished: added, labels untouched, no NaN holes
    png_time = (out / "SegmentationClass" / "00000.png").stat().st_mtime_ns
    filled = label_store(multi_store, out, CONFIG, images=[0, 2], scheduler="synchronous", write_maps=True)
    assert filled.labelled == () and filled.maps_filled == (0, 2)
    maps = zarr.open_array(out / "maps.zarr", mode="r")
    reference = zarr.open_array(labelled[0] / "maps.zarr", mode="r")
    np.testing.assert_array_equal(maps[0], reference[0])
    np.testing.assert_array_equal(maps[2], reference[2])
    assert np.isnan(maps[1]).all()  # not asked for
    assert (out / "SegmentationClass" / "00000.png").stat().st_mtime_ns == png_time
    assert label_store(multi_store, out, CONFIG, scheduler="synchronous", write_maps=True).maps_filled == (1,)
    assert not np.isnan(zarr.open_array(out / "maps.zarr", mode="r")[:]).any()
    _assert_same_dataset(out, labelled[0])


def test_maps_zarr_whose_creation_was_killed_is_recreated(multi_store, tmp_path, labelled):
    import zarr

    from ovstore.outputs import write_marker

    out = tmp_path / "killed-maps"
    (out / "maps.zarr" / "c").mkdir(parents=True)  # killed before the array's zarr.json was written
    write_marker(out, "label")  # written first by every labelling run
    label_store(multi_store, out, CONFIG, images=[1], scheduler="synchronous", write_maps=True)
    maps = zarr.open_array(out / "maps.zarr", mode="r")
    np.testing.assert_array_equal(maps[1], zarr.open_array(labelled[0] / "maps.zarr", mode="r")[1])


def test_text_encoder_of_another_model_is_refused_before_writing(multi_store, tmp_path, monkeypatch):
    from ovstore.label import dataset

    class Other:
        def fingerprint(self):
            return "not-the-recorded-one"

    monkeypatch.setattr(dataset, "_encoder", lambda *args: Other())
    with pytest.raises(InvalidInputError, match="fingerprints differ"):
        label_store(multi_store, tmp_path / "out", CONFIG, scheduler="synchronous")
    assert not (tmp_path / "out").exists()


def test_distributed_cluster_address_equals_local_run(multi_store, tmp_path, labelled, dask_client):
    out = tmp_path / "dask"
    result = label_store(multi_store, out, CONFIG, scheduler=dask_client.scheduler.address, partition_size=1)
    assert result.labelled == (0, 1, 2)
    _assert_same_dataset(out, labelled[0])


@pytest.mark.slow
def test_default_local_cluster_equals_local_run(multi_store, tmp_path, labelled):
    out = tmp_path / "default-cluster"
    result = label_store(multi_store, out, CONFIG, workers=2, partition_size=1)
    assert result.labelled == (0, 1, 2)
    _assert_same_dataset(out, labelled[0])


def test_compete_mode_and_prompt_classes(multi_store, tmp_path):
    out = tmp_path / "compete"
    label_store(multi_store, out, LabelConfig(classes=CLASSES, mode="compete", prompt_classes_only=True),
                scheduler="synchronous")
    pngs, coco = _outputs(out)
    # image 0 is "a cat on a sofa": only cat (1) and sofa (2) may appear
    assert set(np.unique(pngs["00000.png"])) <= {0, 1, 2}
    assert set(np.unique(pngs["00001.png"])) <= {0, 3}  # "a red car"
    assert coco["images"][0]["ovstore"]["classes"] == ["cat", "sofa"]


@pytest.fixture(scope="module")
def cat_token(multi_store, tmp_path_factory):
    from ovstore.optimize import OptimizeConfig, TokenTask, optimize_tokens, save_token

    mask = np.zeros((64, 64), bool)
    mask[8:40, 8:40] = True
    (token,) = optimize_tokens(multi_store, [TokenTask("cat", (0,), (mask,))], config=OptimizeConfig(epochs=3))
    return save_token(token, tmp_path_factory.mktemp("token") / "cat.safetensors")


@pytest.mark.parametrize("mode", ["separate", "compete"])
def test_learned_token_file(multi_store, tmp_path, cat_token, mode):
    from ovstore.label.class_maps import class_attributions, class_maps
    from ovstore.label.dataset import _encoder
    from ovstore.store import open_store

    store = open_store(multi_store)
    words = LabelConfig(classes=("cat", "sofa"), mode=mode)
    with_token = LabelConfig(classes=("cat", "sofa"), mode=mode, tokens={"cat": cat_token})
    encoder = _encoder(json.dumps(store.layout.model.to_json(), sort_keys=True), None, "cpu")

    def maps(config):
        return class_maps(store, [0, 1], class_attributions(store, config, encoder), size=(64, 64))

    plain, learned = maps(words), maps(with_token)
    assert not np.allclose(plain[:, 0], learned[:, 0])  # the token, not the word, gives the cat map
    if mode == "separate":
        np.testing.assert_allclose(plain[:, 1], learned[:, 1], atol=1e-5)  # the sofa map is untouched
    else:  # one softmax; the start-of-text row is the encoder's, so the class order does not matter
        swapped = maps(LabelConfig(classes=("sofa", "cat"), mode=mode, tokens={"cat": cat_token}))
        np.testing.assert_allclose(swapped[:, ::-1], learned, atol=1e-5)
    out = tmp_path / mode
    result = label_store(store, out, with_token, images=[0, 1], scheduler="synchronous")
    assert result.labelled == (0, 1)
    info = json.loads((out / "annotations.json").read_text())["images"][0]["ovstore"]
    assert info["token_files"] == {"cat": str(cat_token)}
    settings = json.loads((out / "ovstore-label.json").read_text())
    assert settings["config"]["tokens"] == {"cat": str(cat_token)} and settings["config"]["mode"] == mode


def test_evaluation_equals_hand_computed_values(tmp_path):
    gt = np.array([[0, 0, 1, 1],
                   [0, 0, 1, 1],
                   [2, 2, 255, 255],
                   [2, 2, 0, 0]], np.uint8)
    pred = np.array([[0, 1, 1, 1],
                     [0, 0, 1, 0],
                     [2, 0, 1, 2],
                     [2, 2, 2, 0]], np.uint8)
    report = evaluate_masks([pred, pred], [gt, gt], ["background", "cat", "dog"])
    # per image (255 ignored): bg TP 4 of 6 GT, FP 2 (cat and dog pixels predicted 0), FN 2;
    # cat TP 3 of 4, FP 1, FN 1; dog TP 3 of 4, FP 1, FN 1. Two identical images double I and U.
    np.testing.assert_allclose(report.iou, [8 / 16, 6 / 10, 6 / 10])
    np.testing.assert_allclose(report.precision, [8 / 12, 6 / 8, 6 / 8])
    np.testing.assert_allclose(report.recall, [8 / 12, 6 / 8, 6 / 8])
    assert report.miou == pytest.approx((0.5 + 0.6 + 0.6) / 3)
    assert report.miou_foreground == pytest.approx(0.6)
    assert report.confusion[1].tolist() == [2, 6, 0, 0]
    markdown = report.to_markdown()
    assert "| ground truth \\ predicted | background | cat | dog | other |" in markdown
    assert "| cat | 2 | 6 | 0 | 0 |" in markdown and "| background | 8 | 2 | 2 | 0 |" in markdown
    for folder, array in (("pred", pred), ("gt", gt)):
        (tmp_path / folder).mkdir()
        Image.fromarray(array, mode="L").save(tmp_path / folder / "00000.png")
    (tmp_path / "gt" / "labelmap.txt").write_text("background:0,0,0::\ncat:1,1,1::\ndog:2,2,2::\n")
    from_dirs = evaluate_dirs(tmp_path / "pred", tmp_path / "gt")
    np.testing.assert_allclose(from_dirs.iou, [0.5, 0.6, 0.6])
    assert from_dirs.classes == ["background", "cat", "dog"]
    # the prediction's label map must mean the same classes as the ground truth's
    (tmp_path / "pred" / "labelmap.txt").write_text("background:0,0,0::\ndog:1,1,1::\ncat:2,2,2::\n")
    with pytest.raises(InvalidInputError, match="label maps disagree"):
        evaluate_dirs(tmp_path / "pred", tmp_path / "gt")
    with pytest.raises(InvalidInputError, match="disagree"):
        evaluate_dirs(tmp_path / "pred", tmp_path / "gt", classes=["background", "cat", "dog"])
    (tmp_path / "pred" / "labelmap.txt").unlink()
    (tmp_path / "gt" / "labelmap.txt").unlink()
    named = evaluate_dirs(tmp_path / "pred", tmp_path / "gt", classes=["background", "cat", "dog"])
    assert named.classes == ["background", "cat", "dog"]
    assert evaluate_dirs(tmp_path / "pred", tmp_path / "gt").classes == ["background", "1", "2"]


def test_cli_label_and_evaluate(multi_store, tmp_path):
    from scipy import ndimage
    from typer.testing import CliRunner

    from ovstore.cli import app

    runner = CliRunner()
    base = ["label", str(multi_store), "--classes", "cat,sofa", "--scheduler", "synchronous"]
    result = runner.invoke(app, [*base, "--out", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, [*base, "--out", str(tmp_path / "b"), "--min-component", "20",
                                 "--class-threshold", "cat=0.8"])
    assert result.exit_code == 0, result.output
    a, _ = _outputs(tmp_path / "a")
    b, coco = _outputs(tmp_path / "b")
    assert sum((a[n] == 1).sum() for n in a) > sum((b[n] == 1).sum() for n in b)  # cat=0.8 shrank cat

    def smallest_region(labels):
        sizes = [np.bincount(ndimage.label(labels == v)[0].ravel())[1:] for v in (1, 2) if (labels == v).any()]
        return min((s.min() for s in sizes), default=np.inf)

    assert min(smallest_region(x) for x in a.values()) < 20  # there was something to remove
    assert min(smallest_region(x) for x in b.values()) >= 20  # and it is gone
    info = coco["images"][0]["ovstore"]
    assert info["thresholds"] == {"cat": 0.8, "sofa": 0.6} and info["refinements"]["min_component"] == 20
    config = json.loads((tmp_path / "b" / "ovstore-label.json").read_text())["config"]
    assert config["class_thresholds"] == {"cat": 0.8} and config["min_component"] == 20
    result = runner.invoke(app, ["evaluate", str(tmp_path / "b"), str(tmp_path / "a"), "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert 0 < report["miou"] < 1 and report["classes"] == ["background", "cat", "sofa"]
    assert "Confusion matrix" in (tmp_path / "r" / "report.md").read_text() and (tmp_path / "r" / "report.png").exists()
    pred_only = tmp_path / "pred_only"
    pred_only.mkdir()
    for name in b:
        os.link(tmp_path / "b" / "SegmentationClass" / name, pred_only / name)
    result = runner.invoke(app, ["evaluate", str(pred_only), str(tmp_path / "a"), "--classes", "cat,sofa"])
    assert result.exit_code == 0 and f"{report['miou']:.4f}" in result.output, result.output


@pytest.mark.parametrize("mode", ["separate", "compete"])
def test_class_maps_are_summed_before_resizing_without_changing_them(multi_store, mode):
    """Class maps resized after summing their tokens (the fast path) equal every token's map
    resized to the image size and then summed; classes encoded in one batch equal one at a time."""
    from ovstore.analyze import MapConfig, compute_maps, load_text_encoder
    from ovstore.analyze.text import word_in_context, words_in_context
    from ovstore.label.class_maps import class_attributions, class_maps
    from ovstore.label.refine import normalize_maps
    from ovstore.store import open_store

    store = open_store(multi_store)
    encoder = load_text_encoder(store.layout.model)
    config = LabelConfig(classes=("cat", "sofa", "car"), mode=mode, prompt_template="a photo of a {}")
    attributions = class_attributions(store, config, encoder)
    full = compute_maps(store, list(attributions.attributions), images=[0, 2], config=MapConfig(size=(64, 64))).values
    expected = np.stack([full[:, list(cols)].sum(axis=1) for cols in attributions.columns], axis=1)
    for how in ("minmax", "max"):
        got = class_maps(store, [0, 2], attributions, size=(64, 64), normalize=how)
        assert got.shape == (2, 3, 64, 64)
        np.testing.assert_allclose(got, normalize_maps(expected, how), rtol=0, atol=1e-5)
    for (att, cols), word in zip(words_in_context(encoder, config.classes, config.prompt_template), config.classes):
        one, one_cols = word_in_context(encoder, word, config.prompt_template)
        assert cols == one_cols and att.tokens == one.tokens
        torch.testing.assert_close(att.embedding, one.embedding, rtol=1e-5, atol=1e-5)


def test_prompt_word_columns_find_words_of_either_tokenizer():
    from ovstore.label.class_maps import prompt_word_columns

    clip = ["<|startoftext|>", "a</w>", "red</w>", "pyra", "mid</w>", "and</w>", "two</w>", "balls</w>",
            "traffic</w>", "light</w>", "<|endoftext|>"]
    assert prompt_word_columns(clip, ["pyramid"]) == [3, 4]
    assert prompt_word_columns(clip, ["ball"]) == [7]  # plural
    assert prompt_word_columns(clip, ["traffic light"]) == [8, 9]
    assert prompt_word_columns(clip, ["light", "red"]) == [2, 9]
    assert prompt_word_columns(clip, ["mid", "pyr"]) == []  # whole words only
    t5 = ["\u2581a", "\u2581py", "ra", "mid", "\u2581ball", "</s>", "<pad>"]
    assert prompt_word_columns(t5, ["pyramid"]) == [1, 2, 3] and prompt_word_columns(t5, ["ball"]) == [4]


def test_maps_from_the_prompt_are_the_prompt_words_maps(multi_store, tmp_path):
    """--maps-from prompt: a class named in an image's prompt takes that word's map in the prompt
    (the prompt's own softmax, as `ovstore maps` computes it); other classes stay empty."""
    from ovstore.analyze import MapConfig, compute_maps, load_text_encoder, resize_maps
    from ovstore.label.class_maps import label_class_maps
    from ovstore.label.refine import normalize_maps
    from ovstore.store import open_store

    store = open_store(multi_store)
    config = LabelConfig(classes=("cat", "sofa", "car", "puppy"), maps_from="prompt", class_words={"puppy": ["dog"]},
                         prompt_classes_only=True, threshold=0.5)
    encoder = load_text_encoder(store.layout.model)
    maps = label_class_maps(store, [0, 1, 2], config, encoder, size=(64, 64))
    assert maps.shape == (3, 4, 64, 64)
    own = compute_maps(store, ["a cat on a sofa"], images=[0], config=MapConfig())
    tokens = [str(t) for t in own["token_str"].values]
    for c, word in ((0, "cat</w>"), (1, "sofa</w>")):
        expected = normalize_maps(resize_maps(torch.from_numpy(own.values[:, [tokens.index(word)]]), (64, 64)).numpy())
        np.testing.assert_allclose(maps[0, c], expected[0, 0], atol=1e-6)
    assert not maps[0, 2:].any() and not maps[1, [0, 1, 3]].any() and maps[1, 2].any()
    assert maps[2, 3].any() and not maps[2, :3].any()  # "a dog in a park" names puppy by its class word
    out = tmp_path / "prompt"
    label_store(multi_store, out, config, scheduler="synchronous", model_defaults=False)
    pngs, coco = _outputs(out)
    assert set(np.unique(pngs["00001.png"])) <= {0, 3} and set(np.unique(pngs["00002.png"])) <= {0, 4}
    assert coco["images"][0]["ovstore"]["settings"]["maps_from"] == {"value": "prompt", "source": "user"}
    with pytest.raises(InvalidInputError, match="--maps-from 'caption' is not one of template, prompt"):
        LabelConfig(classes=("cat",), maps_from="caption")


def test_out_in_a_folder_that_does_not_exist_yet(multi_store, tmp_path):
    out = tmp_path / "new" / "deeper" / "labels"
    result = label_store(multi_store, out, CONFIG, images=[0], scheduler="synchronous")
    assert result.labelled == (0,) and (out / "annotations.json").exists()

"""Labelling a store: VOC and COCO outputs, resumption, Dask clusters, refinements, evaluation."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from ovstore.errors import InvalidInputError
from ovstore.label import (
    LabelConfig, adaptive_threshold, classes_in_prompt, evaluate_dirs, evaluate_masks, label_mask, label_store,
    remove_small_components,
)
from ovstore.label import dataset as dataset_module

CLASSES = ("cat", "sofa", "car", "dog")


def _outputs(root):
    pngs = {p.name: np.asarray(Image.open(p)) for p in sorted((root / "SegmentationClass").glob("*.png"))}
    coco = json.loads((root / "annotations.json").read_text())
    return pngs, coco


@pytest.fixture(scope="module")
def labelled(multi_store, tmp_path_factory):
    out = tmp_path_factory.mktemp("label") / "dataset"
    result = label_store(multi_store, out, LabelConfig(classes=CLASSES, threshold=0.6), scheduler="synchronous",
                         partition_size=2, write_maps=True)
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
        assert set(np.unique(pngs[name])) <= {0, 1, 2, 3, 4}
        assert (out / "JPEGImages" / name.replace(".png", ".jpg")).exists()
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
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=image_id)):
            np.testing.assert_array_equal(coco.annToMask(ann), labels == ann["category_id"])
            n_annotations += 1
        present = set(np.unique(labels)) - {0}
        assert len(coco.getAnnIds(imgIds=image_id)) == len(present)
    assert n_annotations > 0
    import zarr

    maps = zarr.open_array(out / "maps.zarr", mode="r")
    assert maps.shape == (3, 4, 64, 64) and np.nanmax(maps[0]) == 1.0


def test_interrupted_run_resumes_without_recomputing(multi_store, tmp_path, monkeypatch, labelled):
    out = tmp_path / "resume"
    config = LabelConfig(classes=CLASSES, threshold=0.6)
    original = dataset_module.voc.rle_annotations

    def crash(labels, image_id, n):
        if image_id == 1:
            raise RuntimeError("killed")
        return original(labels, image_id, n)

    monkeypatch.setattr(dataset_module.voc, "rle_annotations", crash)
    with pytest.raises(RuntimeError, match="killed"):
        label_store(multi_store, out, config, scheduler="synchronous", partition_size=1)
    monkeypatch.setattr(dataset_module.voc, "rle_annotations", original)
    assert sorted(p.name for p in (out / "records").iterdir()) == ["00000.json"]
    assert not [p for p in out.rglob("*") if ".partial" in p.name]
    first = (out / "records" / "00000.json").stat().st_mtime_ns
    result = label_store(multi_store, out, config, scheduler="synchronous", partition_size=1)
    assert result.skipped == (0,) and result.labelled == (1, 2)
    assert (out / "records" / "00000.json").stat().st_mtime_ns == first
    reference, _ = labelled
    ref_pngs, ref_coco = _outputs(reference)
    pngs, coco = _outputs(out)
    assert pngs.keys() == ref_pngs.keys()
    for name in pngs:
        np.testing.assert_array_equal(pngs[name], ref_pngs[name])
    assert coco["annotations"] == ref_coco["annotations"]
    with pytest.raises(InvalidInputError, match="other settings"):
        label_store(multi_store, out, LabelConfig(classes=CLASSES, threshold=0.5), scheduler="synchronous")


def test_distributed_local_cluster_equals_local_run(multi_store, tmp_path, labelled):
    from distributed import Client, LocalCluster

    out = tmp_path / "dask"
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        result = label_store(multi_store, out, LabelConfig(classes=CLASSES, threshold=0.6), scheduler=client,
                             partition_size=1)
    assert result.labelled == (0, 1, 2)
    reference, _ = labelled
    ref_pngs, ref_coco = _outputs(reference)
    pngs, coco = _outputs(out)
    for name in ref_pngs:
        np.testing.assert_array_equal(pngs[name], ref_pngs[name])
    assert coco["annotations"] == ref_coco["annotations"]


def test_compete_mode_and_prompt_classes(multi_store, tmp_path):
    out = tmp_path / "compete"
    label_store(multi_store, out, LabelConfig(classes=CLASSES, mode="compete", prompt_classes_only=True),
                scheduler="synchronous")
    pngs, coco = _outputs(out)
    # image 0 is "a cat on a sofa": only cat (1) and sofa (2) may appear
    assert set(np.unique(pngs["00000.png"])) <= {0, 1, 2}
    assert set(np.unique(pngs["00001.png"])) <= {0, 3}  # "a red car"
    assert coco["images"][0]["ovstore"]["classes"] == ["cat", "sofa"]


def test_refinements():
    norm = np.zeros((2, 8, 8), np.float32)
    norm[0, :4] = 0.9
    norm[1, 2:6] = 0.7
    labels = label_mask(norm, [0.5, 0.5], [True, True])
    assert (labels[:4] == 1).all() and (labels[4:6] == 2).all() and (labels[6:] == 0).all()
    only_second = label_mask(norm, [0.5, 0.5], [False, True])
    assert (only_second[2:6] == 2).all() and (only_second[:2] == 0).all() and (only_second[6:] == 0).all()
    speck = labels.copy()
    speck[7, 7] = 2
    cleaned = remove_small_components(speck, 3)
    assert cleaned[7, 7] == 0 and (cleaned[:6] == labels[:6]).all()
    ramp = np.tile(np.linspace(0, 1, 100, dtype=np.float32), (10, 1))
    step = np.where(ramp > 0.52, 1.0, 0.1).astype(np.float32)  # stable from 0.15 to 0.95
    assert adaptive_threshold(step, (0.2, 0.3, 0.4, 0.5, 0.6)) == 0.2
    assert classes_in_prompt("Two cats on a Sofa", ["cat", "sofa", "dog"]) == [True, True, False]
    with pytest.raises(InvalidInputError, match="duplicates"):
        LabelConfig(classes=("cat", "cat"))
    with pytest.raises(InvalidInputError, match="between 0 and 1"):
        LabelConfig(classes=("cat",), threshold=1.5)


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
    for folder, array in (("pred", pred), ("gt", gt)):
        (tmp_path / folder).mkdir()
        Image.fromarray(array, mode="L").save(tmp_path / folder / "00000.png")
    (tmp_path / "gt" / "labelmap.txt").write_text("background:0,0,0::\ncat:1,1,1::\ndog:2,2,2::\n")
    from_dirs = evaluate_dirs(tmp_path / "pred", tmp_path / "gt")
    np.testing.assert_allclose(from_dirs.iou, [0.5, 0.6, 0.6])
    assert from_dirs.classes == ["background", "cat", "dog"]


def test_cli_label_and_evaluate(multi_store, tmp_path):
    from typer.testing import CliRunner

    from ovstore.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["label", str(multi_store), "--classes", "cat,sofa", "--out", str(tmp_path / "a"),
                                 "--scheduler", "synchronous", "--min-component", "4", "--class-threshold", "cat=0.7"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["evaluate", str(tmp_path / "a"), str(tmp_path / "a"), "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["miou"] == 1.0 and (tmp_path / "r" / "report.png").exists()

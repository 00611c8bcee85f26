"""Stored data holding NaN or Inf (written by other software; ``ovstore verify`` reports it)
never becomes NaN maps: one line naming the image and the layer, or, with ``--skip-damaged``,
the image left out like a damaged one."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import zarr

from reliability_helpers import digest, run_cli
from test_outputs import ok


def poisoned_copy(source, path, value: float, image: int = 1, layer_index: int = 2) -> str:
    """Copy ``source`` to ``path`` with one query of ``image`` set to ``value`` (checksums
    updated as other software would not: only ``verify``'s finiteness check sees it)."""
    from ovstore.store import open_store

    shutil.copytree(source, path)
    layer = open_store(path).layers[layer_index].name
    queries = zarr.open_array(path / "layers" / layer / "queries", mode="r+")
    data = np.asarray(queries[image])
    data[0, 0, 0, 3, 5, 0] = value
    queries[image] = data
    return layer


@pytest.fixture(scope="module")
def nan_store(multi_store, tmp_path_factory):
    path = tmp_path_factory.mktemp("nonfinite") / "nan.zarr"
    return path, poisoned_copy(multi_store, path, np.nan)


@pytest.mark.parametrize("value,suffix", [(np.nan, ".npy"), (np.inf, ".zarr"), (-np.inf, ".npy")],
                         ids=["NaN", "Inf", "-Inf"])
def test_maps_over_non_finite_queries_refused_naming_image_and_layer(multi_store, monkeypatch, capsys, tmp_path,
                                                                     value, suffix):
    store = tmp_path / "store.zarr"
    layer = poisoned_copy(multi_store, store, value)
    before = digest(tmp_path)
    line = run_cli(monkeypatch, capsys, "maps", store, "-a", "a cat", "--out", tmp_path / f"m{suffix}")
    assert f"image 1, layer {layer}: the stored queries hold NaN or Inf" in line, line
    assert f"ovstore verify {store}" in line and "--skip-damaged" in line and "nothing was written" in line, line
    assert line.count("--skip-damaged") == 1, line
    assert digest(tmp_path) == before  # no output, no temporary, the store unchanged


def test_skip_damaged_leaves_out_non_finite_images(nan_store, monkeypatch, capsys, tmp_path):
    store, _ = nan_store
    before = digest(store)
    err = ok(monkeypatch, capsys, "maps", store, "-a", "a cat", "--out", tmp_path / "m.zarr", "--skip-damaged")
    assert "skipping 1 damaged images: [1]" in err, err
    import xarray as xr

    ds = xr.open_zarr(tmp_path / "m.zarr", consolidated=False)
    assert ds["image"].values.tolist() == [0, 2] and ds.attrs["skipped_damaged_images"] == [1]
    assert np.isfinite(ds["ovam_maps"].values).all()
    err = ok(monkeypatch, capsys, "label", store, "--classes", "cat", "--out", tmp_path / "lab", "--scheduler",
             "synchronous", "--skip-damaged")
    assert "skipped 1 damaged images: [1]" in err, err
    coco = json.loads((tmp_path / "lab" / "annotations.json").read_text())
    assert [i["id"] for i in coco["images"]] == [0, 2] and coco["info"]["skipped_damaged_images"] == [1]
    assert digest(store) == before


def test_label_over_non_finite_queries_is_one_line(nan_store, monkeypatch, capsys, tmp_path):
    store, layer = nan_store
    line = run_cli(monkeypatch, capsys, "label", store, "--classes", "cat", "--out", tmp_path / "lab",
                   "--scheduler", "synchronous", "--partition-size", "1")
    assert f"image 1, layer {layer}" in line and "--skip-damaged" in line, line
    assert "labelled 1 of 3 images" in line, line  # what was kept before the damaged image


def test_non_finite_key_projection_is_refused(multi_store, monkeypatch, capsys, tmp_path):
    from ovstore.store import open_store

    store = tmp_path / "store.zarr"
    shutil.copytree(multi_store, store)
    layer = open_store(store).layers[0].name
    weight = zarr.open_array(store / "layers" / layer / "to_k_weight", mode="r+")
    data = np.asarray(weight[...])
    data[0, 0] = np.nan
    weight[...] = data
    before = digest(tmp_path)
    line = run_cli(monkeypatch, capsys, "maps", store, "-a", "a cat", "--out", tmp_path / "m.npy")
    assert f"layer {layer}: the stored key projection holds NaN or Inf" in line and "ovstore verify" in line, line
    assert digest(tmp_path) == before

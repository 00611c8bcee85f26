"""Analysis refuses what it cannot use with one clear error, before doing any work."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
import zarr

from ovstore.analyze import compute_maps
from ovstore.errors import InvalidInputError, StoreError
from ovstore.store import format as fmt
from ovstore.store import open_store


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda_is_refused(multi_store):
    with pytest.raises(InvalidInputError, match="no CUDA device.*--device cpu"):
        compute_maps(multi_store, "a cat", device="cuda")
    with pytest.raises(InvalidInputError, match="not a torch device"):
        compute_maps(multi_store, "a cat", device="gpu0")


def test_non_finite_stored_queries_are_refused(multi_store, tmp_path):
    copy = tmp_path / "nan.zarr"
    shutil.copytree(multi_store, copy)
    layer = open_store(copy).layers[0].name
    queries = zarr.open_array(copy / "layers" / layer / "queries", mode="r+")
    poisoned = np.asarray(queries[1])
    poisoned[0, 0, 0, 0, 0, 0] = np.inf
    queries[1] = poisoned
    with pytest.raises(StoreError, match=f"image 1, layer {layer}.*NaN or Inf"):
        compute_maps(copy, "a cat")
    assert compute_maps(copy, "a cat", images=[0, 2]).notnull().all()


def test_overlay_folder_that_is_a_file_is_refused(multi_store, tmp_path):
    from ovstore.analyze import write_overlays

    target = tmp_path / "overlays"
    target.write_text("not a folder")
    maps = compute_maps(multi_store, "a cat", images=[0])
    with pytest.raises(InvalidInputError, match="is a file"):
        write_overlays(maps, open_store(multi_store).image, target)
    assert target.read_text() == "not a folder"


def test_text_encoder_that_is_not_the_recorded_one_is_refused(multi_store, tmp_path):
    copy = tmp_path / "replaced.zarr"
    shutil.copytree(multi_store, copy)
    group = zarr.open_group(copy, mode="r+")
    meta = group.attrs["ovstore"]
    meta["layout"]["model"]["text_encoder_fingerprint"] = "0" * 64  # as if the model changed on disk
    meta[fmt.LAYOUT_CHECKSUM] = fmt.layout_checksum(meta["layout"])  # a consistent record, not damage
    group.attrs["ovstore"] = meta
    with pytest.raises(InvalidInputError, match="fingerprints differ.*--model"):
        compute_maps(copy, "a cat")
    model = open_store(copy).layout.model.path  # chosen deliberately: allowed
    assert compute_maps(copy, "a cat", model=model, images=[0]).shape[0] == 1

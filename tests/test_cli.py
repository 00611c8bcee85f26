"""Command-line smoke tests on the embedded default model (offline)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import xarray as xr
from typer.testing import CliRunner

from ovstore.cli import app
from ovstore.store import open_store

from pathlib import Path

TINY_SD15 = Path(__file__).parent / "data" / "golden" / "tiny-sd15"

runner = CliRunner()


@pytest.fixture(scope="module")
def cli_store(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    prompts = folder / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "a dog in a park", "seed": 11}) + "\n# comment\n"
                       + "a bird on a branch\n")
    out = folder / "caps.zarr"
    result = runner.invoke(app, ["capture", "--prompt", "a cat on a sofa", "--prompts-file", str(prompts),
                                 "--steps", "3", "--seed", "5", "--batch-size", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


def test_capture_records_prompts_and_seeds(cli_store):
    store = open_store(cli_store)
    assert store.complete_images() == [0, 1, 2]
    assert [store.record(i).prompt for i in range(3)] == ["a cat on a sofa", "a dog in a park", "a bird on a branch"]
    assert [store.record(i).seed for i in range(3)] == [5, 11, 7]
    assert store.layout.model.source == "builtin" and store.layout.model.id == "ovstore/toy-shapes"
    assert any(l.block == "mid" for l in store.layers)  # default: every cross-attention layer


def test_info(cli_store):
    result = runner.invoke(app, ["info", str(cli_store)])
    assert result.exit_code == 0, result.output
    assert "3 complete" in result.output and "ovstore/toy-shapes" in result.output


def test_images(cli_store, tmp_path):
    result = runner.invoke(app, ["images", str(cli_store), "--out", str(tmp_path / "png")])
    assert result.exit_code == 0, result.output
    from PIL import Image

    first = np.asarray(Image.open(tmp_path / "png" / "00000.png"))
    np.testing.assert_array_equal(first, open_store(cli_store).image(0))
    assert sorted(p.name for p in (tmp_path / "png").iterdir()) == ["00000.png", "00001.png", "00002.png"]
    assert first.shape == (32, 32, 3)


def test_maps_npy_png_and_zarr(cli_store, tmp_path):
    out = tmp_path / "maps.npy"
    result = runner.invoke(app, ["maps", str(cli_store), "-a", "a cat and a sofa", "--image", "0", "--image", "2",
                                 "--out", str(out), "--png", str(tmp_path / "png"), "--size", "64", "64"])
    assert result.exit_code == 0, result.output
    maps = np.load(out)
    assert maps.shape == (2, 7, 64, 64) and maps.dtype == np.float32
    assert (tmp_path / "png" / "00002_p000_t02_cat.png").exists()
    assert (tmp_path / "png" / "00000_p000.png").exists()

    zout = tmp_path / "maps.zarr"
    result = runner.invoke(app, ["maps", str(cli_store), "-a", "a cat", "-a", "furniture", "--out", str(zout)])
    assert result.exit_code == 0, result.output
    ds = xr.open_zarr(zout, consolidated=False)
    assert ds["ovam_maps"].dims == ("image", "token", "y", "x")
    assert ds["ovam_maps"].shape == (3, 7, 16, 16)  # the toy model's largest layers are 16x16
    assert ds["prompt"].values.tolist().count("furniture") == 3
    from ovstore.analyze import compute_maps

    expected = compute_maps(cli_store, ["a cat", "furniture"])
    np.testing.assert_array_equal(ds["ovam_maps"].values, expected.values)
    assert ds["token_str"].values.tolist() == expected["token_str"].values.tolist()
    assert ds.attrs["layers"] == expected.attrs["layers"] and not (tmp_path / "maps.zarr.partial").exists()


def test_errors_are_one_line(tmp_path):
    """The installed entry point prints one line and exits 2 (the whole table of bad inputs is
    exercised in-process by tests/reliability/test_bad_input.py)."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "ovstore.cli", "maps", str(tmp_path / "nope.zarr"), "-a", "cat"],
                          capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert "does not exist" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr

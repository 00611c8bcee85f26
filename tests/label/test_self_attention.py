"""Self-attention refinements: each equals a plain reimplementation; the options parse and teach."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from ovstore.errors import InvalidInputError
from ovstore.analyze.self_attention import (
    Refinement, entropy_reduced, iseg, ovam, parse_refinement, propagate, refine_maps, resample,
)


def _stochastic(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    a = np.exp(rng.normal(size=(n, n)) * 2)
    return (a / a.sum(axis=1, keepdims=True)).astype(np.float32)


def _plain_propagate(ca: np.ndarray, sa: np.ndarray, k: int) -> np.ndarray:
    h, w = ca.shape
    flat = [float(v) for v in ca.reshape(-1)]
    for _ in range(k):
        flat = [sum(sa[i][j] * flat[j] for j in range(h * w)) for i in range(h * w)]
    return np.array(flat).reshape(h, w)


def test_propagate_is_sa_to_the_k_times_the_map():
    sa = _stochastic(12, 0)
    maps = np.random.default_rng(1).random((2, 3, 4)).astype(np.float32)
    for k in (1, 2, 3):
        got = propagate(maps, sa, k=k)
        assert isinstance(got, np.ndarray) and got.shape == maps.shape
        for c in range(2):
            np.testing.assert_allclose(got[c], _plain_propagate(maps[c], sa, k), rtol=1e-5, atol=1e-6)
    # torch in, torch out; a constant map stays constant (rows sum to 1)
    out = propagate(torch.ones(3, 4), torch.from_numpy(sa), k=4)
    assert isinstance(out, torch.Tensor) and torch.allclose(out, torch.ones(3, 4), atol=1e-5)


def test_propagation_with_restart_blends_the_max_normalised_maps():
    sa = _stochastic(12, 5)
    maps = np.random.default_rng(4).random((2, 3, 4)).astype(np.float32) * np.array([1.0, 7.0])[:, None, None]
    for k in (1, 2):
        full = propagate(maps, sa, k=k)
        np.testing.assert_array_equal(propagate(maps, sa, k=k, mix=1.0), full)  # 1: SA^k·CA as before
        for mix in (0.0, 0.5):
            got = propagate(maps, sa, k=k, mix=mix)
            for c in range(2):
                expected = (1 - mix) * maps[c] / maps[c].max() + mix * full[c] / full[c].max()
                np.testing.assert_allclose(got[c], expected, rtol=1e-5, atol=1e-6)
    assert np.isclose(propagate(maps, sa, mix=0.5).max(), 1.0, atol=0.5) and propagate(maps, sa, mix=0.5).max() <= 1


def test_ovam_weighting_equals_the_papers_recipe():
    sa = _stochastic(12, 2)
    maps = np.random.default_rng(3).random((2, 3, 4)).astype(np.float32)
    received = [sum(sa[i][j] for i in range(12)) for j in range(12)]  # attention each pixel receives
    lo, hi = min(received), max(received)
    for min_sa in (0.0, 0.85):
        weight = np.array([(r - lo) / (hi - lo) * (1 - min_sa) + min_sa for r in received]).reshape(3, 4)
        got = ovam(maps, sa, min_sa=min_sa)
        for c in range(2):
            np.testing.assert_allclose(got[c], maps[c] / maps[c].max() * weight, rtol=1e-5, atol=1e-6)
    assert np.isclose(ovam(maps, sa, min_sa=0.85).max(), 1.0, atol=0.16)  # at most the normalised peak


def test_entropy_reduced_is_one_descent_step_on_the_row_entropy():
    sa = _stochastic(9, 4)
    step = 0.02
    got = entropy_reduced(sa, step)
    for i in range(9):
        row = [max(a + step * (math.log(a) + 1.0), 0.0) for a in sa[i]]
        total = sum(row)
        np.testing.assert_allclose(got[i], [r / total for r in row], rtol=1e-4, atol=1e-6)

    def entropy(m):
        return float(-(m * np.log(np.clip(m, 1e-30, None))).sum())

    assert entropy(got) < entropy(sa)  # what the step is for
    default = entropy_reduced(sa)  # step 1/(N (ln N - 1)) removes about the below-uniform entries
    assert (default == 0).any() and np.allclose(default.sum(axis=1), 1.0, atol=1e-5)


def test_iseg_iterates_propagation_through_the_entropy_reduced_matrix():
    sa = _stochastic(12, 5)
    maps = np.random.default_rng(6).random((3, 4)).astype(np.float32)
    reduced = entropy_reduced(sa, 0.01)
    np.testing.assert_allclose(iseg(maps, sa, iterations=4, step=0.01), _plain_propagate(maps, reduced, 4),
                               rtol=1e-4, atol=1e-6)


def test_refine_maps_resamples_to_the_self_attention_grid_and_back():
    sa = _stochastic(16, 7)
    maps = torch.rand(2, 8, 8)
    r = Refinement("propagate", (("k", 2),))
    got = refine_maps(maps, sa, (4, 4), r)
    on_grid = torch.nn.functional.interpolate(maps[:, None], size=(4, 4), mode="area")[:, 0]
    refined = torch.from_numpy(_plain_propagate(on_grid[0].numpy(), sa, 2)).float()
    back = torch.nn.functional.interpolate(refined[None, None], size=(8, 8), mode="bilinear",
                                           align_corners=False)[0, 0]
    assert got.shape == (2, 8, 8)
    torch.testing.assert_close(got[0], back, rtol=1e-4, atol=1e-5)
    assert resample(maps, (8, 8)) is maps
    torch.testing.assert_close(r.apply(maps, sa), got)


def test_parse_refinement():
    assert parse_refinement(None) is None and parse_refinement("none") is None
    plain = parse_refinement("self-attention")
    assert plain.method == "propagate" and dict(plain.params) == {"k": 1, "mix": 1.0}
    assert parse_refinement("self-attention:propagate,k=2,mix=0.5").spec == "self-attention:propagate,k=2,mix=0.5"
    r = parse_refinement("self-attention:iseg,iterations=5,res=16")
    assert r.describe() == {"method": "iseg", "iterations": 5, "step": 0.0, "resolution": 16}
    assert parse_refinement(r.spec) == r and parse_refinement("self-attention:ovam,min_sa=0.9").params == (
        ("min_sa", 0.9),)


@pytest.mark.parametrize("text, message", [
    ("crf", "write --refine self-attention"),
    ("self-attention:blur", "unknown method 'blur'"),
    ("self-attention:propagate,q=2", "not a parameter of propagate"),
    ("self-attention:propagate,k=0", "whole number 1..100"),
    ("self-attention:propagate,k=x", "not a number"),
    ("self-attention:ovam,min_sa=2", "min_sa must lie in"),
    ("self-attention:propagate,mix=1.5", "mix must lie in"),
])
def test_bad_refine_options_are_one_line_errors(text, message):
    with pytest.raises(InvalidInputError, match=message) as info:
        parse_refinement(text)
    assert "\n" not in str(info.value)


def test_a_matrix_of_another_grid_is_refused():
    with pytest.raises(InvalidInputError, match="resample the maps"):
        propagate(np.ones((3, 3)), np.eye(4))


# ---------------------------------------------------------------------- maps and label, on a tiny store
from typer.testing import CliRunner  # noqa: E402

from ovstore.cli import app  # noqa: E402

runner = CliRunner()
PROMPTS = ["a red circle on a blue square", "a green triangle"]


@pytest.fixture(scope="module")
def sa_store(tmp_path_factory):
    out = tmp_path_factory.mktemp("sa") / "sa.zarr"
    result = runner.invoke(app, ["capture", *sum((["--prompt", p] for p in PROMPTS), []), "--steps", "3",
                                 "--self-attention", "8,16", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def plain_store(tmp_path_factory):
    out = tmp_path_factory.mktemp("plain") / "plain.zarr"
    assert runner.invoke(app, ["capture", "--prompt", PROMPTS[0], "--steps", "2", "--out", str(out)]).exit_code == 0
    return out


def test_info_names_the_stored_self_attention(sa_store):
    result = runner.invoke(app, ["info", str(sa_store)])
    assert result.exit_code == 0 and "self-attention matrices: 8x8, 16x16" in result.output


def test_compute_maps_refined_equals_refining_the_plain_maps(sa_store):
    from ovstore.analyze import MapConfig, compute_maps
    from ovstore.store import open_store

    store = open_store(sa_store)
    plain = compute_maps(store, ["circle"], config=MapConfig())
    for spec in ("self-attention:propagate,k=2", "self-attention:ovam", "self-attention:iseg,res=8"):
        refined = compute_maps(store, ["circle"], config=MapConfig(refine=spec))
        r = parse_refinement(spec)
        assert refined.attrs["refine"] == r.spec
        for k, image in enumerate(plain["image"].values):
            sa = store.self_attention(int(image), r.resolution)
            expected = r.apply(torch.from_numpy(plain.values[k]), sa).numpy()
            np.testing.assert_allclose(refined.values[k], expected, rtol=1e-4, atol=1e-6)
        assert not np.allclose(refined.values, plain.values)


def test_cli_maps_with_refine_writes_refined_maps_and_records_it(sa_store, tmp_path):
    out = tmp_path / "m.zarr"
    result = runner.invoke(app, ["maps", str(sa_store), "-a", "circle", "-a", "square", "--out", str(out),
                                 "--refine", "self-attention:propagate,k=2", "--normalize", "max"])
    assert result.exit_code == 0, result.output
    import xarray as xr

    ds = xr.open_zarr(out, consolidated=False)
    maps = ds["ovam_maps"]
    assert ds.attrs["refine"] == "self-attention:propagate,k=2,mix=1"
    assert float(maps.max()) == pytest.approx(1.0, abs=1e-3)
    help_text = runner.invoke(app, ["maps", "--help"], env={"COLUMNS": "200"}).output
    assert "--refine" in help_text and "propagate" in help_text and "iseg" in help_text


def test_cli_label_with_refine_adaptive_and_crf_records_the_refinement(sa_store, tmp_path):
    pytest.importorskip("pydensecrf.densecrf")
    out = tmp_path / "ds"
    result = runner.invoke(app, ["label", str(sa_store), "--classes", "circle,square,triangle", "--out", str(out),
                                 "--refine", "self-attention:iseg,iterations=2", "--adaptive", "--crf",
                                 "--scheduler", "synchronous"])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "records" / "00000.json").read_text())["image"]["ovstore"]
    assert record["refinements"]["self_attention"] == {"method": "iseg", "iterations": 2, "step": 0.0,
                                                       "resolution": None}
    assert record["refinements"]["crf"] and record["refinements"]["adaptive"]
    settings = json.loads((out / "ovstore-label.json").read_text())
    assert settings["config"]["refine"]["method"] == "iseg"


def test_label_maps_refined_equal_refining_the_class_maps(sa_store):
    from ovstore.analyze import load_text_encoder, resize_maps
    from ovstore.label import LabelConfig
    from ovstore.label.class_maps import label_class_maps
    from ovstore.label.refine import normalize_maps
    from ovstore.store import open_store

    store = open_store(sa_store)
    encoder = load_text_encoder(store.layout.model)
    size = (store.layout.height, store.layout.width)
    config = LabelConfig(classes=("circle", "triangle"))
    spec = "self-attention:propagate,k=3"
    refined = label_class_maps(store, [0, 1], replace_refine(config, spec), encoder, size=size)
    # the same class maps without refinement, left un-normalised at the latent grid
    from ovstore.label.class_maps import class_attributions
    from ovstore.analyze import MapConfig, compute_maps

    atts = class_attributions(store, config, encoder)
    raw = compute_maps(store, list(atts.attributions), images=[0, 1], config=MapConfig()).values
    summed = np.stack([raw[:, list(c)].sum(axis=1) for c in atts.columns], axis=1)
    r = parse_refinement(spec)
    by_hand = torch.stack([r.apply(torch.from_numpy(summed[k]), store.self_attention(k)) for k in range(2)])
    expected = normalize_maps(resize_maps(by_hand, size).numpy(), "minmax")
    np.testing.assert_allclose(refined, expected, atol=1e-5)


def replace_refine(config, spec):
    from dataclasses import replace

    return replace(config, refine=spec)


def _main(monkeypatch, capsys, *args) -> tuple[int, str]:
    """``ovstore ARGS`` through the console entry point: exit status and what it printed."""
    import sys

    from ovstore.cli import main

    monkeypatch.setattr(sys, "argv", ["ovstore", *map(str, args)])
    monkeypatch.setenv("COLUMNS", "400")  # one-line errors stay on one line
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code or 0
    captured = capsys.readouterr()
    return code, (captured.out + captured.err).strip()


def test_refining_a_store_without_self_attention_names_the_capture_option(plain_store, tmp_path, monkeypatch,
                                                                         capsys):
    for args in (["maps", plain_store, "-a", "circle", "--out", tmp_path / "m.npy"],
                 ["label", plain_store, "--classes", "circle", "--out", tmp_path / "ds", "--scheduler",
                  "synchronous"]):
        code, output = _main(monkeypatch, capsys, *args, "--refine", "self-attention")
        line = output.splitlines()[-1]  # label first says which model defaults it takes
        assert code == 2 and line.startswith("error:") and "--self-attention RES" in line
    assert not (tmp_path / "m.npy").exists() and not (tmp_path / "ds").exists()


def test_cli_bad_refine_is_one_line(sa_store, tmp_path, monkeypatch, capsys):
    for spec, message in (("self-attention:blur", "unknown method 'blur'"),
                          ("self-attention:propagate,res=32", "not 32x32")):
        code, line = _main(monkeypatch, capsys, "maps", sa_store, "-a", "circle", "--out", tmp_path / "m.npy",
                           "--refine", spec)
        assert code == 2 and line.startswith("error:") and message in line and "\n" not in line
    assert not (tmp_path / "m.npy").exists()

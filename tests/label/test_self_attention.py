"""Self-attention refinements: each equals a plain reimplementation; the options parse and teach."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ovstore.errors import InvalidInputError
from ovstore.label.self_attention import (
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
    assert plain.method == "propagate" and dict(plain.params) == {"k": 1}
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
])
def test_bad_refine_options_are_one_line_errors(text, message):
    with pytest.raises(InvalidInputError, match=message) as info:
        parse_refinement(text)
    assert "\n" not in str(info.value)


def test_a_matrix_of_another_grid_is_refused():
    with pytest.raises(InvalidInputError, match="resample the maps"):
        propagate(np.ones((3, 3)), np.eye(4))

"""The batched engine against a naive per-prompt softmax, on both softmax paths."""

from __future__ import annotations

import pytest
import torch

from ovstore.analyze.engine import TokenBuckets, layer_keys, layer_token_maps, prepare_queries
from ovstore.store.format import LayerInfo

INFO = LayerInfo(name="l", block="up", level=0, height=4, width=6, heads=3, head_dim=5, scale=5 ** -0.5,
                 key_input_dim=7)


def naive(queries, embedding, weight, offsets):
    out = []
    for a, b in zip(offsets[:-1], offsets[1:]):
        k = (embedding[a:b] @ weight.T).view(b - a, INFO.heads, INFO.head_dim)
        s = torch.einsum("thpc,nhc->thpn", queries, k) * INFO.scale
        out.append(s.softmax(-1).sum((0, 1)).T)
    return torch.cat(out)


@pytest.mark.parametrize("magnitude", [1.0, 40.0])  # 40: scores beyond the safe-exp bound
def test_engine_matches_naive_softmax(magnitude):
    g = torch.Generator().manual_seed(0)
    queries = torch.randn(3, INFO.heads, 24, INFO.head_dim, generator=g) * magnitude
    lengths = [3, 5, 3, 2, 5, 5]
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    embedding = torch.randn(offsets[-1], 7, generator=g)
    weight = torch.randn(INFO.heads * INFO.head_dim, 7, generator=g)
    keys = layer_keys(embedding, weight, None, INFO)
    buckets = TokenBuckets.from_offsets(offsets)
    expected = naive(queries, embedding, weight, offsets)
    assert torch.isfinite(expected).all()
    for budget in (1, 10_000, 2**30):  # one prompt per chunk up to all at once
        got = layer_token_maps(prepare_queries(queries), keys, buckets, memory_budget=budget)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
    # the differentiable path (token optimization) gives the same maps
    keys_grad = keys.clone().requires_grad_(True)
    got = layer_token_maps(prepare_queries(queries), keys_grad, buckets)
    torch.testing.assert_close(got.detach(), expected, rtol=1e-5, atol=1e-4)
    got.sum().backward()
    assert keys_grad.grad is not None and torch.isfinite(keys_grad.grad).all()


@pytest.mark.parametrize("budget", [1, 3000, 2**30])  # one prompt per chunk, a few, all at once
def test_shared_beginnings_are_computed_once_and_change_nothing(budget):
    """Prompts whose first rows are identical (a causal encoder's common beginning) take the
    shared-prefix path: the same maps as the naive per-prompt softmax."""
    g = torch.Generator().manual_seed(1)
    queries = torch.randn(3, INFO.heads, 24, INFO.head_dim, generator=g)
    template = torch.randn(3, 7, generator=g)  # rows 0-2 shared by the 5-token prompts
    embedding, offsets, keys_of_rows = [], [0], []
    for k, n in enumerate([5, 5, 2, 5, 3, 5]):
        rows = torch.randn(n, 7, generator=g)
        keys = [(k, i) for i in range(n)]
        if n == 5:
            rows[:3] = template
            keys[:3] = [("template", i) for i in range(3)]
        embedding.append(rows)
        keys_of_rows += keys
        offsets.append(offsets[-1] + n)
    embedding = torch.cat(embedding)
    weight = torch.randn(INFO.heads * INFO.head_dim, 7, generator=g)
    keys = layer_keys(embedding, weight, None, INFO)
    buckets = TokenBuckets.from_offsets(offsets, keys_of_rows)
    five = next((start, stop) for n, start, stop in buckets.groups if n == 5)
    assert buckets.shared_prefix(*five, 5) == 3
    expected = naive(queries, embedding, weight, offsets)
    got = layer_token_maps(prepare_queries(queries), keys, buckets, memory_budget=budget)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)


def test_prompts_of_several_templates_form_runs_that_share_their_template():
    """Equal-length prompts from two templates (plus unrelated ones) are split into one group
    per template, each computing its template's rows once: still the naive maps."""
    g = torch.Generator().manual_seed(2)
    queries = torch.randn(2, INFO.heads, 24, INFO.head_dim, generator=g)
    templates = {name: torch.randn(3, 7, generator=g) for name in ("photo", "painting")}
    embedding, offsets, keys_of_rows = [], [0], []
    kinds = ["photo", "painting"] * 8 + [None] * 3
    for k, kind in enumerate(kinds):
        rows = torch.randn(5, 7, generator=g)
        keys = [(k, i) for i in range(5)]
        if kind is not None:
            rows[:3] = templates[kind]
            keys[:3] = [(kind, i) for i in range(3)]
        embedding.append(rows)
        keys_of_rows += keys
        offsets.append(offsets[-1] + 5)
    embedding = torch.cat(embedding)
    weight = torch.randn(INFO.heads * INFO.head_dim, 7, generator=g)
    keys = layer_keys(embedding, weight, None, INFO)
    buckets = TokenBuckets.from_offsets(offsets, keys_of_rows)
    prefixes = sorted(buckets.shared_prefix(start, stop, n) for n, start, stop in buckets.groups)
    assert len(buckets.groups) == 3 and prefixes == [0, 3, 3]
    assert sorted(buckets.order.tolist()) == list(range(offsets[-1]))
    expected = naive(queries, embedding, weight, offsets)
    for budget in (1, 2**30):
        got = layer_token_maps(prepare_queries(queries), keys, buckets, memory_budget=budget)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)

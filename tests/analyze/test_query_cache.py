"""The process-wide cache of prepared queries: a second `compute_maps` on the same open store
and image reads nothing from the store and gives the same maps; another store object, other
layers or steps, or `cache=False` read again; a collected store's entries are dropped."""

from __future__ import annotations

import gc
import os

import numpy as np
import pytest
import torch


@pytest.fixture
def counting(monkeypatch):
    """Counts of queries and key projections read from stores, by (image or layer)."""
    from ovstore.store.reader import Store

    reads = {"queries": 0, "projections": 0}
    queries, projection = Store.queries, Store.key_projection

    def counted_queries(self, *args, **kwargs):
        reads["queries"] += 1
        return queries(self, *args, **kwargs)

    def counted_projection(self, *args, **kwargs):
        reads["projections"] += 1
        return projection(self, *args, **kwargs)

    monkeypatch.setattr(Store, "queries", counted_queries)
    monkeypatch.setattr(Store, "key_projection", counted_projection)
    return reads


@pytest.fixture
def fresh_cache():
    from ovstore.analyze import set_query_cache

    set_query_cache(0)
    set_query_cache(256)
    yield
    set_query_cache(0)
    set_query_cache(1024)


def test_a_second_call_on_the_same_store_reads_nothing_and_equals_the_first(multi_store, counting, fresh_cache):
    from ovstore.analyze import MapConfig, compute_maps, shared_query_cache
    from ovstore.store import open_store

    torch.set_num_threads(1)
    store = open_store(multi_store)
    first = compute_maps(store, ["a cat on a sofa"], images=[0, 2])
    n_layers = len(first.attrs["layers"])
    assert counting == {"queries": 2 * n_layers, "projections": n_layers}
    again = compute_maps(store, ["furniture", "a cat on a sofa"], images=[2, 0])
    assert counting == {"queries": 2 * n_layers, "projections": n_layers}  # nothing read
    assert shared_query_cache().hits >= 2
    np.testing.assert_array_equal(again.values[[1, 0]][:, -first.sizes["token"]:], first.values)
    uncached = compute_maps(store, ["a cat on a sofa"], images=[0, 2], cache=False)
    assert counting["queries"] == 4 * n_layers
    np.testing.assert_array_equal(uncached.values, first.values)
    # other steps are other prepared queries: read, and not mistaken for the cached ones
    steps = compute_maps(store, ["a cat on a sofa"], images=[0], config=MapConfig(steps="0:2"))
    assert counting["queries"] == 5 * n_layers
    assert not np.array_equal(steps.values[0], first.values[0])


def test_another_store_object_reads_again_and_a_collected_one_leaves_nothing(multi_store, counting, fresh_cache):
    from ovstore.analyze import compute_maps, shared_query_cache
    from ovstore.store import open_store

    torch.set_num_threads(1)
    one = open_store(multi_store)
    maps = compute_maps(one, ["a red car"], images=[1]).values
    n_layers = counting["projections"]
    other = open_store(multi_store)  # re-opened (the store may have been replaced on disk): read afresh
    np.testing.assert_array_equal(compute_maps(other, ["a red car"], images=[1]).values, maps)
    assert counting == {"queries": 2 * n_layers, "projections": 2 * n_layers}
    assert len(shared_query_cache()) == 2
    del one, other
    gc.collect()
    assert len(shared_query_cache()) == 0


def test_a_cache_of_zero_bytes_keeps_nothing(multi_store, counting):
    from ovstore.analyze import compute_maps, set_query_cache, shared_query_cache
    from ovstore.store import open_store

    torch.set_num_threads(1)
    set_query_cache(0)
    try:
        store = open_store(multi_store)
        compute_maps(store, ["a red car"], images=[1])
        compute_maps(store, ["a red car"], images=[1])
        assert counting["queries"] == 2 * counting["projections"]  # each call read the image again
        assert len(shared_query_cache()) == 0
    finally:
        set_query_cache(1024)
    with pytest.raises(ValueError, match=">= 0 MiB"):
        set_query_cache(-1)


def test_read_ahead_is_taken_once_and_only_for_its_image(multi_store, counting):
    """`MapPlan.start_reading` (compute_maps reads the first image while the prompts are
    encoded): the next read of that image takes it; a read of another image reads that one."""
    from ovstore.analyze import MapConfig
    from ovstore.analyze.maps import MapPlan
    from ovstore.store import open_store

    store = open_store(multi_store)
    plan = MapPlan(store, MapConfig())
    direct = {i: plan.read_store(i) for i in (0, 1)}
    before = counting["queries"]
    plan.start_reading(0)
    early = plan.read(0)
    assert counting["queries"] - before == len(plan.layers)  # read once, in the background
    assert all(torch.equal(early[n].data, direct[0][n].data) for n in early)
    plan.start_reading(0)
    other = plan.read(1)
    assert all(torch.equal(other[n].data, direct[1][n].data) for n in other)
    again = plan.read(0)  # the abandoned read ahead is not reused
    assert all(torch.equal(again[n].data, direct[0][n].data) for n in again)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_computes_maps(multi_store):
    """The read-ahead and kernel thread pools made before a fork are not used in the child (their
    threads do not exist there): maps in a forked child finish and equal the parent's."""
    import time

    from ovstore.analyze import compute_maps, kernel

    expected = compute_maps(multi_store, ["a cat", "sofa"], images=[0], cache=False).values
    kernel._workers()  # the kernel's pool exists too
    out = os.path.join(os.path.dirname(multi_store), f"forked-{os.getpid()}.npy")
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            np.save(out, compute_maps(multi_store, ["a cat", "sofa"], images=[0], cache=False).values)
            code = 0
        finally:
            os._exit(code)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.1)
    else:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        pytest.fail("the forked child hung")
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    np.testing.assert_array_equal(np.load(out), expected)

"""Deterministic SIGKILLs inside zarr's writes (store creation, key projections, reserve,
mid-shard, completion marker, merge): after each, the store opens (or does not exist yet),
complete images are bit-identical to an uninterrupted run, and the documented resume
command finishes exactly the missing ones.

Each kill runs the real CLI in a forked child of this process (which has torch and the
pipeline code already imported), so a kill point costs a second or two instead of a fresh
interpreter's start-up.
"""

from __future__ import annotations

import importlib.util
import os
import signal
from pathlib import Path

import numpy as np
import pytest

from ovstore.store import open_store, verify_store

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("fault_injection", ROOT / "scripts" / "fault_injection.py")
faults = importlib.util.module_from_spec(spec)
spec.loader.exec_module(faults)

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")


@pytest.fixture(scope="module")
def kill_setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("killpoints")
    prompts = folder / "prompts.txt"
    prompts.write_text("a cat on a sofa\na red car\na dog in a park\n")
    ref = folder / "reference.zarr"
    faults.run_cli(*faults.capture_args(ref, prompts, 2))
    return prompts, open_store(ref)


@pytest.mark.parametrize("point", list(faults.KILL_POINTS))
def test_kill_point_then_documented_resume(point, kill_setup, tmp_path):
    prompts, reference = kill_setup
    left = faults.kill_point_trial(point, tmp_path, prompts, reference)
    if point.startswith("create"):
        assert not left["store"]  # a half-built store never appears under the store's name
    elif point.startswith("reserve"):
        assert left["store"] and left["lock"] and left["complete"] == []  # a stale lock, removed by the resume
    else:
        assert left["complete"] == [0]  # image 0 complete and intact, image 1 interrupted
    if point == "mid-shard":
        assert any("/queries/c/1/" in p for p in left["partial"])  # a real mid-chunk kill


def test_killed_merge_is_finished_by_running_it_again(kill_setup, tmp_path):
    prompts, reference = kill_setup
    other = tmp_path / "other.zarr"  # one image in common with the reference (same request)
    (tmp_path / "other.jsonl").write_text('{"prompt": "a red car", "seed": 1}\n{"prompt": "a bird on a branch", "seed": 5}\n')
    faults.run_cli(*faults.capture_args(other, tmp_path / "other.jsonl", 2))
    out = tmp_path / "merged.zarr"
    args = ("merge", "--out", out, reference.path, other)
    status = faults.killed_run(lambda: faults.run_cli(*args),
                               r"/merged\.zarr/layers/up_blocks[^/]*/queries/c/2/", 1, True)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    store = open_store(out)
    assert store.complete_images() == [0, 1] and store.incomplete_images() == [2]
    assert verify_store(store).ok
    faults.run_cli(*args)  # the same command again fills slot 2 instead of adding one
    store = open_store(out)
    assert store.n_images == 4  # 3 from the reference, 1 new from the other store
    prompts_in = [store.record(i).prompt for i in range(store.n_images)]
    assert prompts_in == ["a cat on a sofa", "a red car", "a dog in a park", "a bird on a branch"]
    assert store.complete_images() == [0, 1, 2, 3]
    for i in range(3):
        np.testing.assert_array_equal(store.image(i), reference.image(i))
        for layer in store.layers:
            np.testing.assert_array_equal(store.queries(layer.name, i, branch=None),
                                          reference.queries(layer.name, i, branch=None))
    np.testing.assert_array_equal(store.image(3), open_store(other).image(1))
    # the advice after an interruption is resume-safe too: nothing left to resume
    faults.run_cli("capture", "--resume", "--out", out)
    assert open_store(out).n_images == 4


def test_killed_merge_into_a_new_store_leaves_nothing(kill_setup, tmp_path):
    _, reference = kill_setup
    out = tmp_path / "new.zarr"
    status = faults.killed_run(lambda: faults.run_cli("merge", "--out", out, reference.path),
                               faults._creating("new.zarr") + r"/layers/[^/]+/to_k_weight/c/", 2, True)
    assert os.WIFSIGNALED(status)
    assert not out.exists()
    faults.run_cli("merge", "--out", out, reference.path)
    assert open_store(out).complete_images() == [0, 1, 2]
    assert not [p for p in tmp_path.iterdir() if ".creating-" in p.name]

"""ovstore.capture.run_capture / prepare_capture: every behaviour of `ovstore capture` from Python."""

from __future__ import annotations

import numpy as np
import pytest

from ovstore.capture import job as job_module
from ovstore.capture import parse_worker, prepare_capture, run_capture
from ovstore.errors import InvalidInputError, StoreFormatError
from ovstore.store import open_store

PROMPTS = ["a red circle", "a blue square", "a green triangle"]


def _queries(store, image):
    layer = store.layers[0].name
    return np.asarray(store.queries(layer, image, branch=None))


def test_reserve_then_workers_resume_equals_one_capture(tmp_path):
    direct = run_capture(prompts=PROMPTS, steps=2, seed=3, out=tmp_path / "direct.zarr")
    assert direct.images == (0, 1, 2)

    shared = tmp_path / "shared.zarr"
    reserved = run_capture(prompts=PROMPTS, steps=2, seed=3, out=shared, reserve_only=True)
    assert reserved.images == (0, 1, 2) and open_store(shared).complete_images() == []
    first = run_capture(out=shared, resume=True, worker="0/2")  # the store's model and settings
    second = run_capture(out=shared, resume=True, worker=(1, 2))
    assert sorted(first.images + second.images) == [0, 1, 2]
    assert set(first.images) == {0, 2}

    a, b = open_store(tmp_path / "direct.zarr"), open_store(shared)
    assert b.complete_images() == [0, 1, 2] and b.layout.n_steps == a.layout.n_steps
    for i in range(3):
        assert b.record(i).prompt == PROMPTS[i] and b.record(i).seed == 3 + i
        np.testing.assert_array_equal(_queries(a, i), _queries(b, i))


def test_append_takes_the_stores_settings_and_nothing_to_resume_loads_no_model(tmp_path, monkeypatch):
    out = tmp_path / "caps.zarr"
    run_capture(prompts=PROMPTS[:1], steps=2, branch="cond", out=out)
    appended = run_capture(prompts=PROMPTS[1:2], out=out)
    store = open_store(out)
    assert appended.images == (1,) and store.complete_images() == [0, 1]
    assert list(store.layout.branches) == ["cond"] and store.layout.n_steps == 2  # not the defaults (50 steps, uncond)

    def no_model(*args, **kwargs):
        raise AssertionError("a resume with nothing to do must not load a model")

    monkeypatch.setattr(job_module, "load_pipeline", no_model)
    job = prepare_capture(out=out, resume=True)
    assert job.nothing_to_resume
    assert job.nothing_message() == f"nothing to resume: {out} has no incomplete image (2 complete of 2)"
    assert run_capture(out=out, resume=True).images == ()


@pytest.mark.parametrize("options, message", [
    (dict(resume=True, reserve_only=True, prompts=["x"]), "cannot be combined with --resume"),
    (dict(worker="0/2", prompts=["x"]), "add --resume"),
    (dict(resume=True, worker="0/2", prompts=["x"]), "record the prompts first"),
    (dict(), "no prompt given"),
])
def test_option_conflicts_are_refused_before_any_work(tmp_path, options, message):
    with pytest.raises(InvalidInputError, match=message):
        prepare_capture(out=tmp_path / "caps.zarr", **options)
    assert not (tmp_path / "caps.zarr").exists()


def test_resume_of_a_missing_store(tmp_path):
    with pytest.raises(StoreFormatError, match="nothing to resume"):
        prepare_capture(out=tmp_path / "missing.zarr", resume=True)


@pytest.mark.parametrize("bad", ["2/2", "1", "a/b", "-1/2", (3, 2)])
def test_parse_worker_refuses(bad):
    with pytest.raises(InvalidInputError, match="0 <= K < N"):
        parse_worker(bad)


def test_parse_worker():
    assert parse_worker("1/4") == (1, 4) and parse_worker((0, 1)) == (0, 1) and parse_worker(None) is None

"""`ovstore capture --scheduler`: slots reserved once, filled by Dask workers. On a LocalCluster
of two CPU workers, one of them killed mid-run, every slot is filled once and the store equals a
single-process capture."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest
from conftest import TINY_SD15

PROMPTS = ["a cat on a sofa", "a red car", "a dog in a park", "a blue bird", "a green apple"]


def _cluster_capture(tmp_path, prompts, client, *, kill: bool) -> None:
    from ovstore.capture import capture_on_cluster, prepare_capture, run_capture
    from ovstore.store import open_store, verify_store

    options = dict(prompts=prompts, steps=2, seed=11)
    run_capture(str(TINY_SD15), out=tmp_path / "single.zarr", **options)
    job = prepare_capture(str(TINY_SD15), out=tmp_path / "cluster.zarr", **options)
    seen: list[int] = []
    pids = list(client.run(os.getpid).values())

    def kill_a_worker_after_the_first_slot(slot: int) -> None:
        if kill and not seen:  # the other worker is generating a slot now, or about to
            os.kill(pids[1], signal.SIGKILL)
        seen.append(slot)

    result = capture_on_cluster(job, scheduler=client, slots_per_task=1, progress=kill_a_worker_after_the_first_slot)
    assert sorted(seen) == list(range(len(prompts))) and result.images == tuple(range(len(prompts)))
    one, many = open_store(tmp_path / "single.zarr"), open_store(tmp_path / "cluster.zarr")
    assert many.n_images == len(prompts) and many.complete_images() == list(range(len(prompts)))
    assert verify_store(many).ok
    assert many.records() == one.records()
    for image in range(len(prompts)):
        np.testing.assert_array_equal(many.image(image), one.image(image))
        for layer in one.layers:
            np.testing.assert_array_equal(many.queries(layer.name, image), one.queries(layer.name, image))


def test_a_local_cluster_of_two_workers_fills_every_slot_once_as_one_process_does(tmp_path, dask_client):
    _cluster_capture(tmp_path, PROMPTS[:3], dask_client, kill=False)


@pytest.mark.slow
def test_a_worker_killed_mid_capture_loses_nothing(tmp_path, dask_client):
    _cluster_capture(tmp_path, PROMPTS, dask_client, kill=True)


def test_cli_capture_scheduler_options(tmp_path, monkeypatch, capsys):
    import sys

    from ovstore.cli import main

    for args, expected in (
        (["--workers", "2"], "--workers and --slots-per-task belong to --scheduler"),
        (["--scheduler", "local", "--reserve-only"], "--scheduler fills the slots itself"),
        (["--scheduler", "tcp://"], "is not a scheduler address"),
    ):
        monkeypatch.setattr(sys, "argv", ["ovstore", "capture", str(TINY_SD15), "-p", "a cat", "--steps", "2",
                                          "--out", str(tmp_path / "s.zarr"), *args])
        with pytest.raises(SystemExit) as exit_info:
            main()
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2 and err.startswith("error: ") and "\n" not in err, err
        assert expected in err
        assert not (tmp_path / "s.zarr").exists()


def test_a_local_cluster_is_not_offered_gpus(tmp_path):
    from ovstore.capture import capture_on_cluster, prepare_capture
    from ovstore.errors import InvalidInputError

    job = prepare_capture(str(TINY_SD15), prompts=["a cat"], steps=2, out=tmp_path / "s.zarr", device="cuda")
    with pytest.raises(InvalidInputError, match="--scheduler local starts CPU workers"):
        capture_on_cluster(job, scheduler="local")
    assert not (tmp_path / "s.zarr").exists()


def test_real_image_captures_are_not_sent_to_a_cluster(tmp_path):
    from PIL import Image

    from ovstore.capture import capture_on_cluster, prepare_capture
    from ovstore.errors import InvalidInputError

    Image.new("RGB", (64, 64), (200, 30, 30)).save(tmp_path / "red.png")
    (tmp_path / "images.jsonl").write_text('{"image": "red.png", "prompt": "a red square"}\n')
    job = prepare_capture(str(TINY_SD15), images_file=tmp_path / "images.jsonl", strength=0.5, steps=2,
                          out=tmp_path / "s.zarr")
    with pytest.raises(InvalidInputError, match="real-image captures .* run in one process"):
        capture_on_cluster(job, scheduler="local")
    assert not (tmp_path / "s.zarr").exists()

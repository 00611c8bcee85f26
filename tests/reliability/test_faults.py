"""Crash safety, integrity, several writers, disk errors."""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ovstore.capture import CaptureConfig, build_requests, capture
from ovstore.errors import StoreError
from ovstore.store import merge_stores, open_store, verify_store
from ovstore.store import format as fmt

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("fault_injection", ROOT / "scripts" / "fault_injection.py")
faults = importlib.util.module_from_spec(spec)
spec.loader.exec_module(faults)


def test_sigkilled_captures_keep_complete_images_and_resume(tmp_path):
    summary = faults.run(tmp_path, trials=4, images=6, steps=3, seed=1, log=lambda *_: None)
    assert summary["kills"] >= 1


@pytest.mark.slow
def test_sigkilled_captures_20_trials(tmp_path):
    summary = faults.run(tmp_path, trials=20, images=8, steps=3, seed=2, log=lambda *_: None)
    assert summary["kills"] >= 10 and summary["interrupted_with_partial_progress"] >= 3


def test_concurrent_workers_fill_disjoint_slots(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(f"object {i}" for i in range(5)) + "\n")
    ref, out = tmp_path / "ref.zarr", tmp_path / "shared.zarr"
    subprocess.run(faults.capture_command(ref, prompts, 2, False), env=faults.ENV, check=True, capture_output=True)
    subprocess.run(faults._cli("capture", str(faults.TINY), "--prompts-file", str(prompts), "--steps", "2",
                               "--out", str(out), "--reserve-only"), env=faults.ENV, check=True, capture_output=True)
    assert open_store(out).incomplete_images() == [0, 1, 2, 3, 4]
    workers = [subprocess.Popen(faults._cli("capture", str(faults.TINY), "--resume", "--worker", f"{k}/2",
                                            "--steps", "2", "--out", str(out)), env=faults.ENV,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for k in range(2)]
    for w in workers:
        assert w.wait(timeout=300) == 0, w.stderr.read()
    store, reference = open_store(out), open_store(ref)
    assert store.n_images == 5 and store.complete_images() == [0, 1, 2, 3, 4]
    for i in range(5):
        np.testing.assert_array_equal(store.image(i), reference.image(i))
        for layer in store.layers:
            np.testing.assert_array_equal(store.queries(layer.name, i), reference.queries(layer.name, i))


def test_merge_without_loss_or_duplicates(tiny_pipe, tmp_path):
    pipe, identity = tiny_pipe
    config = CaptureConfig(num_inference_steps=2)
    a, b, merged = tmp_path / "a.zarr", tmp_path / "b.zarr", tmp_path / "merged.zarr"
    capture(pipe, identity, build_requests([("a cat", None, 1), ("a dog", None, 2)], num_inference_steps=2), a, config=config)
    capture(pipe, identity, build_requests([("a dog", None, 2), ("a bird", None, 3)], num_inference_steps=2), b, config=config)
    first = merge_stores(merged, [a, b])
    assert (first.added, first.duplicates) == (3, 1)
    again = merge_stores(merged, [a, b])
    assert (again.added, again.duplicates) == (0, 4)
    store = open_store(merged)
    assert [store.record(i).prompt for i in store.complete_images()] == ["a cat", "a dog", "a bird"]
    np.testing.assert_array_equal(store.image(2), open_store(b).image(1))
    layer = store.layers[0].name
    np.testing.assert_array_equal(store.queries(layer, 0), open_store(a).queries(layer, 0))


def test_flipped_byte_and_missing_shard_are_reported(multi_store, tmp_path):
    copy = tmp_path / "damaged.zarr"
    shutil.copytree(multi_store, copy)
    store = open_store(copy)
    layer = store.layers[2].name
    shard = copy / fmt.LAYERS_GROUP / layer / fmt.QUERIES / "c" / "1" / "0" / "0" / "0" / "0" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[100] ^= 0x01
    shard.write_bytes(bytes(data))
    (copy / fmt.LAYERS_GROUP / store.layers[0].name / fmt.QUERIES / "c" / "2" / "0" / "0" / "0" / "0" / "0" / "0").unlink()
    report = verify_store(open_store(copy))
    assert report.damaged_images == [1, 2]
    kinds = {(p.image, p.array, p.kind) for p in report.problems}
    assert (1, layer, "corrupt") in kinds and (2, store.layers[0].name, "missing") in kinds
    with pytest.raises(StoreError, match="corrupted"):
        open_store(copy).queries(layer, 1)
    with pytest.raises(StoreError, match="missing"):
        open_store(copy).queries(store.layers[0].name, 2)
    assert verify_store(open_store(multi_store)).ok
    proc = subprocess.run(faults._cli("verify", str(copy)), capture_output=True, text=True, env=faults.ENV)
    assert proc.returncode == 1 and "image 1" in proc.stderr and "2 damaged images" in proc.stderr


def test_disk_full_gives_a_clear_error_and_a_valid_store(tiny_pipe, tmp_path, monkeypatch):
    from zarr.storage import _local

    pipe, identity = tiny_pipe
    out = tmp_path / "full.zarr"
    requests = build_requests([("a cat", None, 1), ("a dog", None, 2)], num_inference_steps=2)
    original = _local._put

    def put(path, value, exclusive=False):
        if "/queries/c/1/" in str(path):  # the disk fills up while image 1 is written
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(path, value, exclusive=exclusive)

    monkeypatch.setattr(_local, "_put", put)
    with pytest.raises(StoreError, match="disk is full"):
        capture(pipe, identity, requests, out, config=CaptureConfig(num_inference_steps=2))
    monkeypatch.setattr(_local, "_put", original)
    store = open_store(out)
    assert store.complete_images() == [0] and store.incomplete_images() == [1]
    assert verify_store(store).ok


def test_killed_label_run_resumes(multi_store, tmp_path):
    out = tmp_path / "labels"
    args = faults._cli("label", str(multi_store), "--classes", "cat,sofa,car", "--out", str(out),
                       "--scheduler", "synchronous", "--partition-size", "1")
    rng = random.Random(3)
    for trial in range(3):
        proc = subprocess.Popen(args, env=faults.ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            proc.wait(timeout=rng.uniform(4.0, 9.0))
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        for record in (out / "records").glob("*.json") if (out / "records").exists() else []:
            data = json.loads(record.read_text())  # finished records are whole JSON
            png = out / "SegmentationClass" / record.name.replace(".json", ".png")
            assert png.exists() and data["image"]["id"] == int(record.stem)
    subprocess.run(args, env=faults.ENV, check=True, capture_output=True)
    reference = tmp_path / "reference"
    subprocess.run(faults._cli("label", str(multi_store), "--classes", "cat,sofa,car", "--out", str(reference),
                               "--scheduler", "synchronous"), env=faults.ENV, check=True, capture_output=True)
    from PIL import Image

    for png in sorted((reference / "SegmentationClass").glob("*.png")):
        np.testing.assert_array_equal(np.asarray(Image.open(out / "SegmentationClass" / png.name)),
                                      np.asarray(Image.open(png)))
    assert not [p for p in out.rglob("*") if ".partial" in p.name]
    assert json.loads((out / "annotations.json").read_text())["annotations"] == \
        json.loads((reference / "annotations.json").read_text())["annotations"]

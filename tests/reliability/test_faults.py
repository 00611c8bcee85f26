"""Crash safety, integrity, several writers, disk errors."""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
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


@pytest.mark.slow
def test_sigkilled_captures_keep_complete_images_and_resume(tmp_path):
    """Real `ovstore capture` processes killed right after a random number of complete images.
    Slow (two minutes of interpreter starts); the default suite kills capture deterministically
    inside every kind of write instead (test_kill_points.py)."""
    summary = faults.run(tmp_path, trials=2, images=5, steps=2, seed=1, log=lambda *_: None, progress_share=1.0)
    assert summary["kills"] >= 1 and summary["interrupted_with_partial_progress"] >= 1, summary


@pytest.mark.slow
def test_sigkilled_captures_20_trials(tmp_path):
    summary = faults.run(tmp_path, trials=20, images=8, steps=3, seed=2, log=lambda *_: None)
    assert summary["kills"] >= 10 and summary["interrupted_with_partial_progress"] >= 5, summary


@pytest.mark.slow
def test_sigkilled_label_runs_20_trials(tmp_path):
    """Real `ovstore label` processes killed at random: finished images always equal an
    uninterrupted run's, and the same command completes an identical output."""
    summary = faults.run_label(tmp_path, trials=20, images=32, steps=2, seed=0, log=lambda *_: None)
    assert summary["kills"] >= 10 and summary["kills_after_new_progress"] >= 3, summary


def test_concurrent_workers_fill_disjoint_slots(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(f"object {i}" for i in range(5)) + "\n")
    ref, out = tmp_path / "ref.zarr", tmp_path / "shared.zarr"
    faults.run_cli(*faults.capture_args(ref, prompts, 2))
    faults.run_cli(*faults.capture_args(out, prompts, 2), "--reserve-only")
    assert open_store(out).incomplete_images() == [0, 1, 2, 3, 4]
    # two concurrent processes (forked: no interpreter start-up); they take model and settings
    # from the store
    workers = []
    for k in range(2):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                faults.run_cli("capture", "--resume", "--worker", f"{k}/2", "--out", out)
                code = 0
            finally:
                os._exit(code)
        workers.append(pid)
    for pid in workers:
        assert os.waitpid(pid, 0)[1] == 0
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


@pytest.mark.parametrize("code,message", [(errno.ENOSPC, "disk is full"), (errno.EROFS, "read-only"),
                                          (errno.EACCES, "permission denied")])
def test_disk_full_gives_a_clear_error_and_a_valid_store(tiny_pipe, tmp_path, monkeypatch, code, message):
    from zarr.storage import _local

    pipe, identity = tiny_pipe
    out = tmp_path / "full.zarr"
    requests = build_requests([("a cat", None, 1), ("a dog", None, 2)], num_inference_steps=2)
    original = _local._put

    def put(path, value, exclusive=False):
        if "/queries/c/1/" in str(path):  # the disk fills up while image 1 is written
            raise OSError(code, os.strerror(code))
        return original(path, value, exclusive=exclusive)

    monkeypatch.setattr(_local, "_put", put)
    with pytest.raises(StoreError, match=message):
        capture(pipe, identity, requests, out, config=CaptureConfig(num_inference_steps=2))
    monkeypatch.setattr(_local, "_put", original)
    store = open_store(out)
    assert store.complete_images() == [0] and store.incomplete_images() == [1]
    assert verify_store(store).ok


def _kill_at_replace(pattern: str):
    """In a forked child: SIGKILL at the first os.replace onto a path matching ``pattern``
    (the atomic rename that publishes a label output)."""
    import re

    original = os.replace

    def replace(src, dst, *args, **kwargs):
        if re.search(pattern, str(dst)):
            os.kill(os.getpid(), signal.SIGKILL)
        return original(src, dst, *args, **kwargs)

    os.replace = replace


@pytest.fixture(scope="module")
def label_reference(multi_store, tmp_path_factory):
    out = tmp_path_factory.mktemp("labelref") / "reference"
    args = ("label", multi_store, "--classes", "cat,sofa,car", "--out", out, "--scheduler", "synchronous",
            "--partition-size", "1")
    faults.run_cli(*args)
    return args, out


@pytest.mark.parametrize("point", [r"records/00001\.json$", r"annotations\.json$"])
def test_killed_label_run_resumes(label_reference, tmp_path, point):
    """A label run killed while publishing image 1's record (or the COCO file) keeps every
    finished image whole; the same command finishes the rest, equal to an uninterrupted run."""
    from PIL import Image

    args, reference = label_reference
    out = tmp_path / "labels"
    args = tuple(out if a == reference else a for a in args)

    def run():
        _kill_at_replace(point)
        faults.run_cli(*args)

    pid = os.fork()
    if pid == 0:
        try:
            run()
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status), "the kill point was not reached"
    finished = sorted(p.stem for p in (out / "records").glob("*.json"))
    assert finished == (["00000"] if "records" in point else ["00000", "00001", "00002"])  # partial progress
    for stem in finished:  # finished records are whole JSON, with their PNG
        assert json.loads((out / "records" / f"{stem}.json").read_text())["image"]["id"] == int(stem)
        assert (out / "SegmentationClass" / f"{stem}.png").exists()
    faults.run_cli(*args)  # the same command resumes
    for png in sorted((reference / "SegmentationClass").glob("*.png")):
        np.testing.assert_array_equal(np.asarray(Image.open(out / "SegmentationClass" / png.name)),
                                      np.asarray(Image.open(png)))
    assert not [p for p in out.rglob("*") if ".partial" in p.name]
    assert json.loads((out / "annotations.json").read_text())["annotations"] == \
        json.loads((reference / "annotations.json").read_text())["annotations"]


def test_label_killed_while_creating_maps_zarr_resumes(multi_store, tmp_path):
    out = tmp_path / "labm"
    args = ("label", multi_store, "--classes", "cat", "--out", out, "--scheduler", "synchronous", "--write-maps")
    status = faults.killed_run(lambda: faults.run_cli(*args), r"labm/maps\.zarr/zarr\.json$", 1, True)
    assert os.WIFSIGNALED(status)
    faults.run_cli(*args)
    assert sorted(p.stem for p in (out / "records").glob("*.json")) == ["00000", "00001", "00002"]


def _failing_put(monkeypatch, match: str, code: int) -> None:
    """Make every zarr write whose path contains ``match`` fail with ``code``."""
    from zarr.storage import _local

    original = _local._put

    def put(path, value, exclusive=False):
        if match in str(path):
            raise OSError(code, os.strerror(code), str(path))
        return original(path, value, exclusive=exclusive)

    monkeypatch.setattr(_local, "_put", put)


@pytest.mark.parametrize("code,message", [(errno.ENOSPC, "disk is full"), (errno.EROFS, "read-only")])
def test_disk_full_while_creating_a_store_leaves_nothing(tiny_pipe, small_store, tmp_path, monkeypatch, capsys,
                                                        code, message):
    pipe, identity = tiny_pipe
    out = tmp_path / "new.zarr"
    _failing_put(monkeypatch, "/layers/", code)  # half-way through building the store
    with pytest.raises(StoreError, match=f"cannot create store .*{message}.*nothing was created"):
        capture(pipe, identity, build_requests([("a cat", None, 1)], num_inference_steps=2), out,
                config=CaptureConfig(num_inference_steps=2))
    assert sorted(tmp_path.iterdir()) == []  # no store, no half-built hidden directory
    # the CLI says so in one line (exit 2), for merge too
    for args in (faults.capture_args(out, _prompts(tmp_path), 2), ["merge", "--out", str(out), str(small_store)]):
        monkeypatch.setattr(sys, "argv", ["ovstore", *args])
        with pytest.raises(SystemExit) as exit_info:
            from ovstore.cli import main

            main()
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and message in err[-1] and "Traceback" not in "".join(err), err
        assert not out.exists() and not [p for p in tmp_path.iterdir() if ".creating-" in p.name]


def _prompts(folder: Path) -> Path:
    path = folder.parent / f"{folder.name}-prompts.txt"
    path.write_text("a cat\n")
    return path


@pytest.fixture(scope="module")
def small_store(tmp_path_factory, tiny_pipe) -> Path:
    """A tiny complete store (a merge source)."""
    path = tmp_path_factory.mktemp("small") / "small.zarr"
    capture(*tiny_pipe, build_requests([("a cat", None, 1)], num_inference_steps=2), path,
            config=CaptureConfig(num_inference_steps=2))
    return path


def test_disk_full_during_merge_gives_the_merge_advice(small_store, tmp_path, monkeypatch):
    out = tmp_path / "merged.zarr"
    _failing_put(monkeypatch, "merged.zarr/images/c/0", errno.ENOSPC)
    with pytest.raises(StoreError, match="disk is full.*re-run the same `ovstore merge`"):
        merge_stores(out, [small_store])
    monkeypatch.undo()
    store = open_store(out)
    assert store.incomplete_images() == [0] and verify_store(store).ok
    assert merge_stores(out, [small_store]).added == 1  # fills slot 0 rather than adding one
    assert open_store(out).n_images == 1 and open_store(out).complete_images() == [0]


def test_concurrent_reserves_get_disjoint_slots(multi_store, tmp_path):
    """Processes appending to one store at once (the reserve step) never share a slot."""
    from ovstore.store import StoreWriter
    from ovstore.store.format import ImageRecord

    out = tmp_path / "shared.zarr"  # created by whichever process gets there first
    source = open_store(multi_store)
    layout = source.layout
    keys = {l.name: source.key_projection(l.name) for l in layout.layers}
    children = []
    for k in range(3):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                writer = StoreWriter.open(out, layout, key_projections=keys)
                for r in range(4):
                    writer.reserve([ImageRecord(prompt=f"writer {k} request {r} image {j}", seed=j) for j in range(2)])
                code = 0
            finally:
                os._exit(code)
        children.append(pid)
    assert all(os.waitpid(pid, 0)[1] == 0 for pid in children)
    store = open_store(out)
    prompts = [store.record(i).prompt for i in range(store.n_images)]
    assert store.n_images == 3 * 4 * 2 and len(set(prompts)) == len(prompts)  # nothing lost or overwritten
    for k in range(3):  # each reserve's slots are contiguous and in order
        mine = [prompts.index(f"writer {k} request {r} image {j}") for r in range(4) for j in range(2)]
        assert all(mine[2 * r + 1] == mine[2 * r] + 1 for r in range(4))
    assert not (out / ".ovstore.lock").exists() and verify_store(store).ok
    assert not [p for p in tmp_path.iterdir() if ".creating-" in p.name]


def test_store_lock_of_a_live_process_and_a_stale_one(multi_store, tmp_path, monkeypatch):
    import socket

    from ovstore.errors import StoreLockedError
    from ovstore.store import StoreWriter, writer as writer_module
    from ovstore.store.format import ImageRecord

    out = tmp_path / "locked.zarr"
    shutil.copytree(multi_store, out)
    writer = StoreWriter.open(out, open_store(out).layout)
    lock = out / ".ovstore.lock"
    lock.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": "now"}))
    monkeypatch.setattr(writer_module, "LOCK_TIMEOUT", 0.3)
    with pytest.raises(StoreLockedError, match=f"locked by process {os.getpid()}.*delete"):
        writer.reserve([ImageRecord(prompt="x")])
    assert open_store(out).n_images == 3
    # a lock whose process is gone (killed during a reserve) is removed
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "since": "then"}))
    assert writer.reserve([ImageRecord(prompt="x")]) == [3]
    assert not lock.exists()


def test_records_never_contradict_the_generation(tiny_pipe, tmp_path):
    from ovstore.errors import InvalidInputError

    pipe, identity = tiny_pipe
    out = tmp_path / "r.zarr"
    with pytest.raises(InvalidInputError, match="asks for 50 steps and guidance 7.5"):
        capture(pipe, identity, build_requests([("a cat", None, 0)]), out,
                config=CaptureConfig(num_inference_steps=2, guidance=1.0))
    assert not out.exists()
    # resume generates each image with its recorded steps and guidance, whatever the config says
    requests = build_requests([("a cat", None, 0), ("a dog", None, 1)], guidance=5.0, num_inference_steps=3)
    config = CaptureConfig(num_inference_steps=3, guidance=5.0, dtype="float32")
    capture(pipe, identity, requests, out, config=config, reserve_only=True)
    from ovstore.capture import resume

    resume(pipe, identity, out)  # no config: everything comes from the store
    ref = tmp_path / "ref.zarr"
    capture(pipe, identity, requests, ref, config=config)
    a, b = open_store(out), open_store(ref)
    assert a.complete_images() == [0, 1] and a.layout.query_dtype == "float32"
    for i in range(2):
        assert a.record(i) == b.record(i) and a.record(i).guidance == 5.0
        np.testing.assert_array_equal(a.image(i), b.image(i))
        np.testing.assert_array_equal(a.queries(a.layers[0].name, i), b.queries(b.layers[0].name, i))


def test_resume_cli_takes_model_and_settings_from_the_store(tmp_path):
    """`ovstore capture --resume --out STORE` alone finishes a store captured with non-default
    settings; with the original prompts it is idempotent."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\na dog\n")
    out, ref = tmp_path / "s.zarr", tmp_path / "ref.zarr"
    settings = ["--steps", "3", "--guidance", "4", "--dtype", "float32", "--resolution", "16", "--calls", "0,-1"]
    faults.run_cli(*faults.capture_args(ref, prompts, 2), *settings)
    faults.run_cli(*faults.capture_args(out, prompts, 2), *settings, "--reserve-only")
    faults.run_cli("capture", "--resume", "--out", out)
    a, b = open_store(out), open_store(ref)
    assert a.complete_images() == [0, 1] and a.layout == b.layout
    for i in range(2):
        assert a.record(i) == b.record(i)
        np.testing.assert_array_equal(a.image(i), b.image(i))
    # the same command plus --resume: nothing to do, nothing added
    faults.run_cli(*faults.capture_args(out, prompts, 2), *settings, "--resume")
    assert open_store(out).n_images == 2
    # a new prompt with --resume is appended with the store's settings
    prompts.write_text("a cat\na dog\na bird\n")
    faults.run_cli("capture", "--prompts-file", prompts, "--out", out, "--resume")
    s = open_store(out)
    assert s.n_images == 3 and s.complete_images() == [0, 1, 2] and s.record(2).num_inference_steps == 3

"""Outputs, write errors and partial work (docs/errors.md, last section): every command's
``--out`` follows ovstore.outputs; a refused or failed write is one line with a non-zero exit,
leaves the inputs byte-identical and leaves nothing behind."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr
from PIL import Image

from ovstore import outputs
from ovstore.cli import main
from ovstore.errors import InvalidInputError, OutputError
from reliability_helpers import digest, run_cli


def leftovers(root: Path) -> list[str]:
    """Temporaries and lock files of ovstore's writers under ``root``."""
    return sorted(str(p.relative_to(root)) for p in root.rglob(".*")
                  if p.name.endswith(".partial") or p.name.endswith(".ovstore-lock"))


def ok(monkeypatch, capsys, *args) -> str:
    monkeypatch.setattr(sys, "argv", ["ovstore", *map(str, args)])
    try:
        main()
    except SystemExit as exc:
        assert exc.code in (0, None), capsys.readouterr().err
    return capsys.readouterr().err


@pytest.fixture(scope="module")
def root(tmp_path_factory, multi_store):
    """A store, a second capture store, and outputs of every command written once."""
    from ovstore.cli import main as _  # noqa: F401

    root = tmp_path_factory.mktemp("outputs")
    shutil.copytree(multi_store, root / "store.zarr")
    shutil.copytree(multi_store, root / "other.zarr")
    (root / "foreign").mkdir()
    (root / "foreign" / "notes.txt").write_text("somebody's data\n")
    (root / "foreign.zarr").mkdir()
    (root / "foreign.zarr" / "notes.txt").write_text("somebody else's data\n")
    (root / "a_file.txt").write_text("not a folder\n")
    np.save(root / "ints.npy", np.arange(6, dtype=np.int32))
    from safetensors.numpy import save_file

    save_file({"x": np.zeros(3, np.float32)}, str(root / "plain.safetensors"))
    mask = np.zeros((64, 64), np.uint8)
    mask[10:30, 10:30] = 255
    (root / "masks").mkdir()
    Image.fromarray(mask).save(root / "masks" / "cat0.png")
    (root / "masks" / "tasks.jsonl").write_text('{"init": "cat", "images": [0], "masks": ["cat0.png"]}\n')
    (root / "gt").mkdir()
    (root / "pred").mkdir()
    Image.fromarray((mask > 0).astype(np.uint8)).save(root / "gt" / "00000.png")
    Image.fromarray((mask > 0).astype(np.uint8)).save(root / "pred" / "00000.png")
    return root


@pytest.fixture(scope="module")
def written(root):
    """Outputs of this version of every command, for the replace cases."""
    import pytest as _pytest

    mp = _pytest.MonkeyPatch()
    store = root / "store.zarr"
    for args in (["maps", store, "-a", "a cat", "--out", root / "maps.npy", "--png", root / "overlays"],
                 ["maps", store, "-a", "a cat", "-a", "a dog", "--out", root / "maps.zarr"],
                 ["optimize", store, "--image", "0", "--mask", root / "masks" / "cat0.png", "--init", "cat",
                  "--epochs", "2", "--out", root / "cat.safetensors"],
                 ["evaluate", root / "pred", root / "gt", "--out", root / "report"],
                 ["images", store, "--out", root / "images"],
                 ["label", store, "--classes", "cat", "--out", root / "labels", "--scheduler", "synchronous"]):
        mp.setattr(sys, "argv", ["ovstore", *map(str, args)])
        try:
            main()
        except SystemExit as exc:
            assert exc.code in (0, None), args
    mp.undo()
    return root


MASK = "{root}/masks/cat0.png"
OPT = ["optimize", "{store}", "--image", "0", "--mask", MASK, "--init", "cat", "--epochs", "2"]

REFUSED = [
    ("maps --out the store itself", ["maps", "{store}", "-a", "cat", "--out", "{store}"], "an input of this command"),
    ("maps --out another capture store", ["maps", "{store}", "-a", "cat", "-a", "dog", "--out", "{root}/other.zarr", "--overwrite"], "is a capture store"),
    ("maps --out inside the store", ["maps", "{store}", "-a", "cat", "--out", "{store}/maps.npy"], "is inside"),
    ("maps --out a folder it did not write", ["maps", "{store}", "-a", "cat", "-a", "dog", "--out", "{root}/foreign", "--overwrite"], "use a .npy"),
    ("maps --out X.zarr that is a foreign folder", ["maps", "{store}", "-a", "cat", "-a", "dog", "--out", "{root}/foreign.zarr", "--overwrite"], "did not write"),
    ("maps --out existing maps without --overwrite", ["maps", "{store}", "-a", "cat", "--out", "{root}/maps.npy"], "add --overwrite"),
    ("maps --out existing maps.zarr without --overwrite", ["maps", "{store}", "-a", "cat", "--out", "{root}/maps.zarr"], "add --overwrite"),
    ("maps --out a .npy that is not maps", ["maps", "{store}", "-a", "cat", "--out", "{root}/ints.npy", "--overwrite"], "did not write"),
    ("maps --out under a file", ["maps", "{store}", "-a", "cat", "--out", "{root}/a_file.txt/m.npy"], "is a file, not a folder"),
    ("maps --png naming a file", ["maps", "{store}", "-a", "cat", "--out", "{root}/new.npy", "--png", "{root}/a_file.txt"], "is a file"),
    ("maps --png inside the store", ["maps", "{store}", "-a", "cat", "--out", "{root}/new.npy", "--png", "{store}/png"], "is inside"),
    ("maps --png a foreign folder", ["maps", "{store}", "-a", "cat", "--out", "{root}/new.npy", "--png", "{root}/foreign", "--overwrite"], "did not write"),
    ("maps --png existing overlays without --overwrite", ["maps", "{store}", "-a", "cat", "--out", "{root}/new.npy", "--png", "{root}/overlays"], "add --overwrite"),
    ("maps --png over the maps just written", ["maps", "{store}", "-a", "cat", "-a", "dog", "--out", "{root}/maps.zarr", "--png", "{root}/maps.zarr", "--overwrite"], "an input"),
    ("optimize --out existing token without --overwrite", [*OPT, "--out", "{root}/cat.safetensors"], "add --overwrite"),
    ("optimize --out a safetensors file that is not a token", [*OPT, "--out", "{root}/plain.safetensors", "--overwrite"], "did not write"),
    ("optimize --out the mask folder", ["optimize", "{store}", "--tasks-file", "{root}/masks/tasks.jsonl", "--out", "{root}/masks"], "contains {root}/masks/tasks.jsonl"),
    ("optimize --out a capture store", ["optimize", "{store}", "--tasks-file", "{root}/masks/tasks.jsonl", "--out", "{root}/other.zarr", "--overwrite"], "capture store"),
    ("label --out the store", ["label", "{store}", "--classes", "cat", "--out", "{store}"], "an input"),
    ("label --out a file", ["label", "{store}", "--classes", "cat", "--out", "{root}/a_file.txt"], "is a file"),
    ("label --out a folder it did not write", ["label", "{store}", "--classes", "cat", "--out", "{root}/foreign"], "did not write"),
    ("label --out another capture store", ["label", "{store}", "--classes", "cat", "--out", "{root}/other.zarr"], "capture store"),
    ("label --out inside the store", ["label", "{store}", "--classes", "cat", "--out", "{store}/labels"], "is inside"),
    ("evaluate --out a folder it did not write", ["evaluate", "{root}/pred", "{root}/gt", "--out", "{root}/foreign", "--overwrite"], "did not write"),
    ("evaluate --out the prediction folder", ["evaluate", "{root}/pred", "{root}/gt", "--out", "{root}/pred"], "an input"),
    ("evaluate --out an existing report without --overwrite", ["evaluate", "{root}/pred", "{root}/gt", "--out", "{root}/report"], "add --overwrite"),
    ("images --out a folder it did not write", ["images", "{store}", "--out", "{root}/foreign", "--overwrite"], "did not write"),
    ("images --out existing images without --overwrite", ["images", "{store}", "--out", "{root}/images"], "add --overwrite"),
    ("images --out the store", ["images", "{store}", "--out", "{store}"], "an input"),
    ("demo --out a capture store", ["demo", "--out", "{store}"], "capture store"),
    ("demo --out a folder it did not write", ["demo", "--out", "{root}/foreign"], "did not write"),
    ("demo --out a file", ["demo", "--out", "{root}/a_file.txt"], "is a file"),
]


@pytest.mark.parametrize("what,args,message", REFUSED, ids=[c[0] for c in REFUSED])
def test_refused_outputs(written, monkeypatch, capsys, what, args, message):
    root = written
    before = digest(root)
    line = run_cli(monkeypatch, capsys, *[a.format(root=root, store=root / "store.zarr") for a in args])
    assert message.format(root=root) in line, line
    assert digest(root) == before and leftovers(root) == []


def test_the_same_command_with_overwrite_replaces_only_its_own_output(written, monkeypatch, capsys, tmp_path):
    root = tmp_path / "r"
    shutil.copytree(written, root)
    store = root / "store.zarr"
    before = digest(store)
    ok(monkeypatch, capsys, "maps", store, "-a", "a dog", "--out", root / "maps.npy", "--png", root / "overlays",
       "--overwrite")
    assert np.load(root / "maps.npy").shape[1] == 4  # [SoT, a, dog, EoT]
    assert sorted(p.name for p in (root / "overlays").glob("*_dog.png"))
    assert not list((root / "overlays").glob("*_cat.png"))  # replaced, not mixed with the old overlays
    ok(monkeypatch, capsys, "evaluate", root / "pred", root / "gt", "--out", root / "report", "--overwrite")
    ok(monkeypatch, capsys, "images", store, "--out", root / "images", "--overwrite")
    assert digest(store) == before and leftovers(root) == []


# ---------------------------------------------------------------------- write errors
def _raise(code: int):
    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code), "injected")
    return fail


ERRNOS = [(errno.ENOSPC, "disk is full", "Free space"), (errno.EACCES, "permission denied", "permissions"),
          (errno.EROFS, "read-only", "writable file system"), (errno.EFBIG, "too large", "large files"),
          (errno.ENOTDIR, "in the way", "Move the file")]


@pytest.mark.parametrize("code,reason,fix", ERRNOS, ids=[errno.errorcode[c[0]] for c in ERRNOS])
def test_write_errors_of_maps(written, monkeypatch, capsys, tmp_path, code, reason, fix):
    """.npy, .zarr and --png: one line naming the path, the reason and the fix; an earlier
    output is kept unchanged; nothing is left behind."""
    root = tmp_path / "r"
    shutil.copytree(written, root)
    store = root / "store.zarr"
    before = digest(root)
    with monkeypatch.context() as m:
        m.setattr(np, "save", _raise(code))
        line = run_cli(m, capsys, "maps", store, "-a", "a dog", "--out", root / "maps.npy", "--overwrite")
    assert f"cannot write {root / 'maps.npy'}" in line and reason in line and fix in line, line
    from zarr.storage import _local

    original = _local._put

    def put(path, value, exclusive=False):
        if "/ovam_maps/c/" in str(path):
            raise OSError(code, os.strerror(code), str(path))
        return original(path, value, exclusive=exclusive)

    with monkeypatch.context() as m:
        m.setattr(_local, "_put", put)
        line = run_cli(m, capsys, "maps", store, "-a", "a", "-a", "dog", "--out", root / "maps.zarr", "--overwrite")
    assert f"cannot write {root / 'maps.zarr'}" in line and reason in line and "unchanged" in line, line
    assert digest(root) == before and leftovers(root) == []
    # overlays: the maps are written, the overlays' folder keeps its old content
    from PIL import Image as PILImage

    with monkeypatch.context() as m:
        m.setattr(PILImage.Image, "save", _raise(code))
        m.setattr(sys, "argv", ["ovstore", "maps", str(store), "-a", "a dog", "--out", str(root / "new.npy"),
                                "--png", str(root / "overlays"), "--overwrite"])
        with pytest.raises(SystemExit) as exit_info:
            main()
    err = capsys.readouterr().err.strip().splitlines()  # the maps' "wrote ..." line, then the error
    assert exit_info.value.code == 2 and len(err) == 2 and "Traceback" not in "".join(err), err
    assert "maps in" in err[1] and "are complete" in err[1] and reason in err[1], err
    assert (root / "new.npy").exists() and leftovers(root) == []
    (root / "new.npy").unlink()
    assert digest(root) == before


@pytest.mark.parametrize("code,reason,fix", ERRNOS[:3], ids=[errno.errorcode[c[0]] for c in ERRNOS[:3]])
def test_a_trained_token_is_never_lost(written, monkeypatch, capsys, tmp_path, code, reason, fix):
    from ovstore.optimize import load_token, tokens

    root = tmp_path / "r"
    shutil.copytree(written, root)
    (root / "tokens").mkdir()
    store = root / "store.zarr"
    original = tokens._write_file

    def write(token, path):
        if "rescued" not in str(path):
            raise OSError(code, os.strerror(code), str(path))
        return original(token, path)

    before = digest(store)
    monkeypatch.setattr(tokens, "_write_file", write)
    line = run_cli(monkeypatch, capsys, *[a.format(root=root, store=store) for a in OPT],
                   "--out", root / "tokens" / "cat.safetensors")
    assert f"cannot write {root / 'tokens' / 'cat.safetensors'}:" in line and reason in line and "nothing is lost" in line
    rescued = sorted(root.glob("cat.rescued-*.safetensors"))  # next to the store
    assert len(rescued) == 1 and str(rescued[0]) in line
    assert load_token(rescued[0]).name == "cat" and load_token(rescued[0]).training["best_loss"] > 0
    assert not list((root / "tokens").iterdir()) and leftovers(root) == [] and digest(store) == before


def test_a_token_goes_to_the_temp_folder_when_the_stores_folder_fails_too(written, monkeypatch, capsys, tmp_path):
    from ovstore.optimize import tokens

    root = tmp_path / "r"
    shutil.copytree(written, root)
    spare = tmp_path / "system-tmp"
    spare.mkdir()
    original = tokens._write_file

    def write(token, path):
        if not str(path).startswith(str(spare)):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return original(token, path)

    monkeypatch.setattr(tokens, "_write_file", write)
    monkeypatch.setattr("tempfile.gettempdir", lambda: str(spare))
    line = run_cli(monkeypatch, capsys, "optimize", root / "store.zarr", "--tasks-file", root / "masks" / "tasks.jsonl",
                   "--epochs", "2", "--out", root / "tokens")
    assert "disk is full" in line and str(spare) in line, line
    assert len(list(spare.glob("cat.rescued-*.safetensors"))) == 1 and not (root / "tokens").exists()
    assert leftovers(root) == []


@pytest.mark.parametrize("code,reason,fix", ERRNOS[:3], ids=[errno.errorcode[c[0]] for c in ERRNOS[:3]])
def test_write_errors_of_evaluate_and_images(written, monkeypatch, capsys, tmp_path, code, reason, fix):
    from PIL import Image as PILImage

    from ovstore.label.evaluate import EvaluationReport

    root = tmp_path / "r"
    shutil.copytree(written, root)
    before = digest(root)
    with monkeypatch.context() as m:
        m.setattr(EvaluationReport, "plot", _raise(code))
        line = run_cli(m, capsys, "evaluate", root / "pred", root / "gt", "--out", root / "report", "--overwrite")
    assert f"cannot write {root / 'report'}:" in line and reason in line and fix in line, line
    with monkeypatch.context() as m:
        m.setattr(PILImage.Image, "save", _raise(code))
        line = run_cli(m, capsys, "images", root / "store.zarr", "--out", root / "images", "--overwrite")
    assert f"cannot write {root / 'images'}:" in line and reason in line, line
    assert digest(root) == before and leftovers(root) == []


@pytest.mark.slow  # the default suite's budget; run with -m slow
def test_file_too_large_for_real(written, tmp_path):
    """A real EFBIG: the file size limit of the process (RLIMIT_FSIZE) is below the maps' size."""
    import resource

    root = tmp_path / "r"
    shutil.copytree(written, root)
    before = digest(root)

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (8000, 8000))

    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run([sys.executable, "-m", "ovstore.cli", "maps", str(root / "store.zarr"), "-a", "a dog",
                           "--out", str(root / "maps.npy"), "--overwrite"], capture_output=True, text=True,
                          preexec_fn=limit, env=env)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "too large" in lines[0], proc.stderr
    assert digest(root) == before and leftovers(root) == []


def test_a_directory_in_the_way_inside_a_labelling(written, monkeypatch, capsys, tmp_path):
    """A real ENOTDIR/EEXIST: a file where the labelling's records folder should be."""
    out = tmp_path / "labels"
    shutil.copytree(written / "labels", out)
    shutil.rmtree(out / "records")
    (out / "records").write_text("in the way")
    store = written / "store.zarr"
    before, store_before = digest(out), digest(store)
    line = run_cli(monkeypatch, capsys, "label", store, "--classes", "cat", "--out", out, "--scheduler", "synchronous")
    assert f"cannot write {out}" in line and "in the way" in line and "resume" in line, line
    assert digest(out) == before and digest(store) == store_before and leftovers(tmp_path) == []


@pytest.mark.parametrize("code,reason", [(errno.ENOSPC, "disk is full"), (errno.EROFS, "read-only")])
def test_label_write_error_says_what_was_kept(multi_store, monkeypatch, capsys, tmp_path, code, reason):
    from ovstore.label import voc

    out = tmp_path / "labels"
    original = voc.write_label_png

    def write(path, labels):
        if path.name == "00001.png":
            raise OSError(code, os.strerror(code), str(path))
        return original(path, labels)

    monkeypatch.setattr(voc, "write_label_png", write)
    before = digest(multi_store)
    line = run_cli(monkeypatch, capsys, "label", multi_store, "--classes", "cat", "--out", out,
                   "--scheduler", "synchronous", "--partition-size", "1")
    assert reason in line and "labelled 1 of 3 images" in line and "not done: [1, 2]" in line, line
    assert sorted(p.name for p in (out / "records").iterdir()) == ["00000.json"]  # earlier work kept
    assert digest(multi_store) == before and leftovers(tmp_path) == []
    monkeypatch.setattr(voc, "write_label_png", original)
    ok(monkeypatch, capsys, "label", multi_store, "--classes", "cat", "--out", out, "--scheduler", "synchronous")
    assert len(list((out / "records").iterdir())) == 3


def test_interrupted_label_lists_what_was_done(multi_store, monkeypatch, capsys, tmp_path):
    from ovstore.label import voc

    out = tmp_path / "labels"
    original = voc.write_label_png

    def write(path, labels):
        if path.name == "00002.png":
            raise KeyboardInterrupt
        return original(path, labels)

    monkeypatch.setattr(voc, "write_label_png", write)
    monkeypatch.setattr(sys, "argv", ["ovstore", "label", str(multi_store), "--classes", "cat", "--out", str(out),
                                      "--scheduler", "synchronous", "--partition-size", "1"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 130 and len(err) == 1, err
    assert "labelled 2 of 3 images" in err[0] and "not done: [2]" in err[0] and "resume" in err[0], err
    assert leftovers(tmp_path) == []


def test_concurrent_label_runs_into_one_folder_refuse(multi_store, monkeypatch, capsys, tmp_path):
    out = tmp_path / "labels"
    with outputs.held_lock(out, wait=None, what="labelling"):
        line = run_cli(monkeypatch, capsys, "label", multi_store, "--classes", "cat", "--out", out,
                       "--scheduler", "synchronous")
    assert "is being written by process" in line and "wait for it" in line, line
    assert not out.exists() and leftovers(tmp_path) == []


# ---------------------------------------------------------------------- damaged images
@pytest.fixture(scope="module")
def damaged_store(multi_store, tmp_path_factory):
    from ovstore.store import format as fmt
    from ovstore.store import open_store

    path = tmp_path_factory.mktemp("damaged") / "damaged.zarr"
    shutil.copytree(multi_store, path)
    layer = open_store(path).layers[1].name
    shard = path / fmt.LAYERS_GROUP / layer / fmt.QUERIES / "c" / "1" / "0" / "0" / "0" / "0" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[100] ^= 0x01
    shard.write_bytes(bytes(data))
    return path


def test_maps_with_a_damaged_image(damaged_store, monkeypatch, capsys, tmp_path):
    before = digest(damaged_store)
    line = run_cli(monkeypatch, capsys, "maps", damaged_store, "-a", "a cat", "-a", "a dog",
                   "--out", tmp_path / "m.zarr")
    assert "corrupted" in line and "--skip-damaged" in line and not (tmp_path / "m.zarr").exists(), line
    err = ok(monkeypatch, capsys, "maps", damaged_store, "-a", "a cat", "-a", "a dog", "--out", tmp_path / "m.zarr",
             "--skip-damaged")
    assert "skipping 1 damaged images: [1]" in err
    import xarray as xr

    ds = xr.open_zarr(tmp_path / "m.zarr", consolidated=False)
    assert ds["image"].values.tolist() == [0, 2] and ds.attrs["skipped_damaged_images"] == [1]
    assert digest(damaged_store) == before and leftovers(tmp_path) == []


def test_label_with_a_damaged_image(damaged_store, monkeypatch, capsys, tmp_path):
    out = tmp_path / "labels"
    before = digest(damaged_store)
    err = ok(monkeypatch, capsys, "label", damaged_store, "--classes", "cat", "--out", out, "--scheduler",
             "synchronous", "--skip-damaged")
    assert "skipped 1 damaged images: [1]" in err
    coco = json.loads((out / "annotations.json").read_text())
    assert [i["id"] for i in coco["images"]] == [0, 2] and coco["info"]["skipped_damaged_images"] == [1]
    assert sorted(p.name for p in (out / "records").iterdir()) == ["00000.json", "00002.json"]
    assert digest(damaged_store) == before and leftovers(tmp_path) == []


def test_label_paths_reach_the_workers_absolute(multi_store, monkeypatch, tmp_path):
    """Relative --out, store and token paths are made absolute before they reach Dask tasks
    (workers of a remote cluster run in other folders)."""
    from ovstore.label import LabelConfig, dataset, label_store

    monkeypatch.chdir(multi_store.parent)
    seen = []
    original = dataset.label_partition

    def spy(store_path, out, config, images, **kwargs):
        seen.append((store_path, out))
        monkeypatch.chdir("/")  # a worker in another folder
        return original(store_path, out, config, images, **kwargs)

    monkeypatch.setattr(dataset, "label_partition", spy)
    result = label_store(multi_store.name, "labels-rel", LabelConfig(classes=("cat",)), scheduler="synchronous")
    assert seen and all(Path(s).is_absolute() and Path(o).is_absolute() for s, o in seen)
    assert len(result.labelled) == 3 and (multi_store.parent / "labels-rel" / "annotations.json").exists()
    shutil.rmtree(multi_store.parent / "labels-rel")


# ---------------------------------------------------------------------- the module itself
def test_stale_temporaries_of_killed_writers_are_removed(tmp_path):
    target = tmp_path / "maps.npy"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = outputs._host()
    stale = tmp_path / f".maps.npy.{host}-{dead.pid}-0123abcd.partial"
    stale.write_bytes(b"half")
    live = tmp_path / f".maps.npy.{host}-{os.getpid()}-0123abcd.partial"
    live.write_bytes(b"being written")
    assert outputs.remove_stale_temporaries(target) == [stale]
    assert live.exists() and not stale.exists()


def test_an_old_output_set_aside_by_a_killed_replacement_is_put_back(tmp_path):
    target = tmp_path / "report"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    old = tmp_path / f".report.{outputs._host()}-{dead.pid}-0123abcd.old.partial"
    old.mkdir()
    (old / "report.json").write_text("{}")
    outputs.remove_stale_temporaries(target)
    assert (target / "report.json").read_text() == "{}" and not old.exists()


def test_directory_replacement_without_renameat2(tmp_path, monkeypatch):
    """Where the atomic exchange is unavailable the two-rename fallback still publishes."""
    monkeypatch.setattr(outputs, "_exchange", lambda a, b: False)
    target = outputs.open_output(tmp_path / "out", "evaluate", kind="dir")
    for text in ("old", "new"):
        target = outputs.open_output(tmp_path / "out", "evaluate", kind="dir", overwrite=True)
        with target.writing() as tmp:
            (tmp / "report.md").write_text(text)
    assert (tmp_path / "out" / "report.md").read_text() == "new" and leftovers(tmp_path) == []


def test_a_capture_store_put_there_meanwhile_is_not_replaced(multi_store, tmp_path):
    target = outputs.open_output(tmp_path / "m.zarr", "maps", kind="dir")
    with pytest.raises(InvalidInputError, match="capture store"):
        with target.writing() as tmp:
            (tmp / "x").write_text("x")
            shutil.copytree(multi_store, tmp_path / "m.zarr")  # another process, meanwhile
    assert (tmp_path / "m.zarr" / "zarr.json").exists() and leftovers(tmp_path) == []


def test_write_error_messages_name_path_reason_and_fix():
    for code, reason, fix in ERRNOS:
        err = outputs.write_error("/x/maps.npy", OSError(code, os.strerror(code)))
        assert isinstance(err, OutputError)
        text = str(err)
        assert text.startswith("cannot write /x/maps.npy: ") and reason in text and fix in text, text
        assert "\n" not in text


# ---------------------------------------------------------------------- demo
def _interrupt(store_path: Path, keep: int) -> None:
    """Mark every image after the first ``keep`` incomplete, as a capture killed there leaves it."""
    from ovstore.store import format as fmt

    zarr.open_array(store_path / fmt.STATUS, mode="r+")[keep:] = fmt.STATUS_RESERVED


def test_demo_captures_of_an_interrupted_run_are_finished(tmp_path):
    """The demo's store after a capture killed at 2 of 6 images is finished before anything
    is reported (the whole demo: the slow test below); a store of other prompts is refused."""
    from ovstore.demo import CAPTIONS, _captures
    from ovstore.store import format as fmt

    path = tmp_path / "demo" / "captures.zarr"
    logs = []
    _captures(path, device="cpu", steps=2, guidance=5.0, log=logs.append)
    first = {i: open_store_image(path, i) for i in range(2)}
    _interrupt(path, 2)
    _captures(path, device="cpu", steps=2, guidance=5.0, log=logs.append)
    assert logs == ["capturing 6 of 6 generations of the embedded toy-world model ...",
                    "capturing 4 of 6 generations of the embedded toy-world model ..."]
    from ovstore.store import open_store

    store = open_store(path)
    assert store.complete_images() == list(range(len(CAPTIONS))) and store.n_images == len(CAPTIONS)
    assert all(np.array_equal(store.image(i), first[i]) for i in range(2))  # kept, not recaptured
    zarr.open_array(path / fmt.PROMPT, mode="r+")[0] = "a purple cow"
    before = digest(path)
    with pytest.raises(InvalidInputError, match="other captures than the demo's"):
        _captures(path, device="cpu", steps=2, guidance=5.0, log=logs.append)
    assert digest(path) == before


def open_store_image(path: Path, i: int) -> np.ndarray:
    from ovstore.store import open_store

    return open_store(path).image(i)


@pytest.mark.slow
def test_demo_finishes_an_interrupted_folder(tmp_path):
    """A demo folder whose capture stopped after 2 of 6 images: the next `ovstore demo` reports
    on all 6, and rebuilds the parts that are missing."""
    from ovstore.demo import CAPTIONS, run_demo
    from ovstore.store import open_store

    out = tmp_path / "demo"
    run_demo(out, epochs=5, log=lambda m: None)
    _interrupt(out / "captures.zarr", 2)
    (out / "report.md").unlink()
    shutil.rmtree(out / "token")
    (out / "prompt_words" / "00005_p000.png").unlink()
    logs = []
    run_demo(out, epochs=5, log=logs.append)
    assert any("capturing 4 of 6" in m for m in logs), logs
    assert open_store(out / "captures.zarr").complete_images() == list(range(len(CAPTIONS)))
    assert f"{len(CAPTIONS)} images" in (out / "report.md").read_text()
    assert (out / "prompt_words" / "00005_p000.png").exists() and (out / "token").is_dir()
    assert leftovers(tmp_path) == []


@pytest.mark.slow  # the default suite's budget; run with -m slow
def test_sigkilled_output_commands_rerun_identically(tmp_path):
    """scripts/fault_injection.py --outputs, one trial of `maps` (.zarr + --png); all four
    commands with more trials: the slow test below."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("fault_injection", Path(__file__).resolve().parents[2] / "scripts"
                                                  / "fault_injection.py")
    faults = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(faults)
    summary = faults.run_outputs(tmp_path, "maps", trials=1, seed=1, log=lambda *_: None)
    assert summary["identical_after_rerun"] == 1, summary


@pytest.mark.slow
@pytest.mark.parametrize("command", ["maps", "maps-npy", "optimize", "evaluate"])
def test_sigkilled_output_commands_8_trials(tmp_path, command):
    import importlib.util

    spec = importlib.util.spec_from_file_location("fault_injection", Path(__file__).resolve().parents[2] / "scripts"
                                                  / "fault_injection.py")
    faults = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(faults)
    summary = faults.run_outputs(tmp_path, command, trials=8, seed=2, log=lambda *_: None)
    assert summary["kills"] >= 4 and summary["identical_after_rerun"] == 8, summary

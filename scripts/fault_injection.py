"""Fault injection: kill `ovstore capture` (SIGKILL) and check the store.

After every kill the store must open (or not exist yet); every image marked complete must be
bit-identical (image, queries of every branch, request, timesteps) to the same image of an
uninterrupted run; the rest must be reported incomplete; `ovstore verify` must find no
damage; and the same command with `--resume` must finish exactly the missing images.

Two modes:

* random (default): ``--trials`` kills of a real `ovstore capture` process, either at a
  random time (start-up, model loading, store creation, generation) or right after a random
  number of images completed (so most kills interrupt a capture with partial progress).
* ``--kill-points``: deterministic kills inside zarr's writes (store creation, key
  projections, reserve, mid-shard with half a temporary file written, completion marker,
  merge), each followed by the documented resume command.
* ``--label``: the same random kills of `ovstore label` on a complete store: after each kill
  every finished image (its record) has a whole record and a label PNG equal to an
  uninterrupted run's, no temporary file counts as finished, and the same command resumes;
  the finished output equals the uninterrupted one (PNGs, records, COCO JSON).

    python scripts/fault_injection.py --trials 20 [--images 8] [--seed 0]
    python scripts/fault_injection.py --kill-points
    python scripts/fault_injection.py --label --trials 20 --images 32
    python scripts/fault_injection.py --outputs [maps maps-npy optimize evaluate] --trials 6

* ``--outputs``: random kills of `ovstore maps` (.zarr with --png, and .npy), `optimize` and
  `evaluate`, each followed by the same command: every output is absent or complete after
  the kill, equal to an uninterrupted run's after the re-run, with no temporary left.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "data" / "golden" / "tiny-sd15"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "ovstore.cli", *args]


def capture_args(out: Path, prompts: Path, steps: int) -> list[str]:
    # batch size 1: a resume batches the remaining images differently, and batched
    # convolutions may round differently (bit-identity holds for batch size 1)
    return ["capture", str(TINY), "--prompts-file", str(prompts), "--steps", str(steps), "--out", str(out)]


def capture_command(out: Path, prompts: Path, steps: int, resume: bool) -> list[str]:
    """The capture command; with ``resume`` the same command plus ``--resume``."""
    return _cli(*capture_args(out, prompts, steps), *(["--resume"] if resume else []))


def check_against(store_path: Path, reference) -> tuple[list[int], list[int]]:
    """Open after a kill: complete images must equal the reference bit for bit, slot by slot
    (requests are reserved in order, so slot i holds the i-th prompt)."""
    from ovstore.store import open_store, verify_store

    store = open_store(store_path)
    complete = store.complete_images()
    for i in complete:
        assert store.record(i) == reference.record(i), f"request of image {i} differs"
        assert np.array_equal(store.image(i), reference.image(i)), f"image {i} differs"
        assert np.array_equal(store.timesteps(i), reference.timesteps(i)), f"timesteps of image {i} differ"
        assert store.branch_labels(i) == reference.branch_labels(i), f"branch labels of image {i} differ"
        for layer in store.layers:
            assert np.array_equal(store.queries(layer.name, i, branch=None),
                                  reference.queries(layer.name, i, branch=None)), (i, layer.name)
    for i in store.incomplete_images():  # incomplete slots keep their request for --resume
        assert store.record(i) == reference.record(i), f"request of incomplete slot {i} differs"
    report = verify_store(store)
    assert report.ok, [str(p) for p in report.problems]
    return complete, store.incomplete_images()


def _complete_markers(target: Path) -> int:
    """Completion markers written so far (status chunks exist only for complete images)."""
    folder = target / "status" / "c"
    try:
        return sum(1 for p in folder.iterdir() if not p.name.endswith(".partial"))
    except OSError:
        return 0


def _kill_when(proc: subprocess.Popen, done: Callable[[], int], rng: random.Random, images: int,
               by_progress: bool, *, poll: float = 0.02, extra_max: float = 0.3,
               delays: tuple[float, float] = (2.0, 9.0), most: int | None = None) -> tuple[bool, str]:
    """Wait, then SIGKILL ``proc``: at a random time, or once ``done()`` (items finished) reaches
    a random count (plus a random fraction of the next item). Returns (killed, description)."""
    if by_progress:
        k = rng.randint(1, max(1, most if most is not None else images // 2))
        extra = rng.uniform(0.0, extra_max)
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:
            if done() >= k:
                time.sleep(extra)
                break
            time.sleep(poll)
        what = f"after {k} finished items + {extra:.2f}s"
    else:
        delay = rng.uniform(*delays)
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            pass
        what = f"after {delay:.1f}s"
    if proc.poll() is not None:
        return False, "finished"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return True, f"killed {what}"


def run(workdir: Path, trials: int, images: int = 8, steps: int = 3, seed: int = 0, log=print,
        progress_share: float = 0.5) -> dict:
    """Run ``trials`` killed captures (a round restarts when its store completes).

    ``progress_share`` of the kills are triggered by progress (after a random number of
    complete images), the others at a random time.
    """
    from ovstore.store import open_store

    rng = random.Random(seed)
    workdir.mkdir(parents=True, exist_ok=True)
    prompts = workdir / "prompts.txt"
    prompts.write_text("\n".join(f"a photo of object number {i}" for i in range(images)) + "\n")
    ref_path = workdir / "reference.zarr"
    if not ref_path.exists():  # in this process (one torch thread, like the killed ones)
        run_cli(*capture_args(ref_path, prompts, steps))
    reference = open_store(ref_path)
    round_no, resume, kills, interrupted, mid_write = 0, False, 0, 0, 0
    target = workdir / f"crash-{round_no}.zarr"
    for trial in range(trials):
        before = set(workdir.rglob("*.partial"))
        log_path = workdir / f"trial-{trial}.log"
        with open(log_path, "wb") as err:  # a file, not a pipe: a full pipe would stall the process
            proc = subprocess.Popen(capture_command(target, prompts, steps, resume), env=ENV,
                                    stdout=subprocess.DEVNULL, stderr=err)
            killed, what = _kill_when(proc, lambda: _complete_markers(target), rng, images,
                                          rng.random() < progress_share)
        if not killed:
            assert proc.returncode == 0, log_path.read_text(errors="replace")[-2000:]
        kills += killed
        partial = sorted(set(workdir.rglob("*.partial")) - before)  # left by this kill
        mid_write += bool(killed and partial)
        resume = True  # from now on: the same command with --resume
        if not (target / "zarr.json").exists():
            log(f"trial {trial}: {what} before the store existed")
            continue
        complete, incomplete = check_against(target, reference)
        if incomplete and complete:
            interrupted += 1
        log(f"trial {trial}: {what}; complete {complete}, incomplete {incomplete}"
            + (f"; {len(partial)} temporary files of interrupted writes" if partial else ""))
        if not incomplete and len(complete) == images:
            round_no += 1
            target = workdir / f"crash-{round_no}.zarr"
            resume = False
    # finish the last round with the same command plus --resume (in this process: faster)
    run_cli(*capture_args(target, prompts, steps), "--resume")
    complete, incomplete = check_against(target, reference)
    assert not incomplete and complete == list(range(images)), (complete, incomplete)
    assert open_store(target).n_images == images  # nothing lost, nothing duplicated
    return {"trials": trials, "kills": kills, "interrupted_with_partial_progress": interrupted,
            "kills_with_temporary_files": mid_write, "rounds": round_no + 1}


# ---------------------------------------------------------------------- label runs
LABEL_CLASSES = "cat,sofa,car,dog"


def label_command(store: Path, out: Path) -> list[str]:
    """One image per task, so that a kill lands between, inside or after images' publication."""
    return _cli("label", str(store), "--classes", LABEL_CLASSES, "--out", str(out), "--scheduler", "synchronous",
                "--partition-size", "1", "--write-maps")


def _finished_records(out: Path) -> int:
    try:
        return sum(1 for p in (out / "records").iterdir() if p.suffix == ".json")
    except OSError:
        return 0


def check_label_output(out: Path, reference: Path) -> list[str]:
    """After a kill: every published record is whole JSON with its PNG equal to the reference's."""
    import json

    from PIL import Image

    finished = sorted(p.stem for p in (out / "records").glob("*.json")) if (out / "records").is_dir() else []
    for stem in finished:
        record = json.loads((out / "records" / f"{stem}.json").read_text())
        assert record == json.loads((reference / "records" / f"{stem}.json").read_text()), f"record {stem} differs"
        png = np.asarray(Image.open(out / "SegmentationClass" / f"{stem}.png"))
        assert np.array_equal(png, np.asarray(Image.open(reference / "SegmentationClass" / f"{stem}.png"))), stem
    return finished


def check_label_finished(out: Path, reference: Path) -> None:
    import json

    from PIL import Image

    names = sorted(p.name for p in (reference / "SegmentationClass").glob("*.png"))
    assert sorted(p.name for p in (out / "SegmentationClass").glob("*.png")) == names
    for name in names:
        assert np.array_equal(np.asarray(Image.open(out / "SegmentationClass" / name)),
                              np.asarray(Image.open(reference / "SegmentationClass" / name))), name
    ours, ref = (json.loads((d / "annotations.json").read_text()) for d in (out, reference))
    assert ours["annotations"] == ref["annotations"] and ours["images"] == ref["images"]
    assert not [p for p in out.rglob("*") if ".partial" in p.name], "temporary files were left"


def run_label(workdir: Path, trials: int, images: int = 8, steps: int = 3, seed: int = 0, log=print) -> dict:
    """``trials`` random SIGKILLs of `ovstore label` (half by progress, half at a random time)."""
    rng = random.Random(seed)
    workdir.mkdir(parents=True, exist_ok=True)
    prompts = workdir / "prompts.txt"
    prompts.write_text("\n".join(f"a cat on a sofa number {i}" for i in range(images)) + "\n")
    store = workdir / "store.zarr"
    if not store.exists():
        run_cli(*capture_args(store, prompts, steps))
    reference = workdir / "label-reference"
    if not (reference / "annotations.json").exists():
        subprocess.run(label_command(store, reference), env=ENV, check=True, capture_output=True)
    round_no, kills, partial_progress = 0, 0, 0
    out = workdir / f"label-{round_no}"
    for trial in range(trials):
        before = _finished_records(out)
        log_path = workdir / f"label-trial-{trial}.log"
        with open(log_path, "wb") as err:
            proc = subprocess.Popen(label_command(store, out), env=ENV, stdout=subprocess.DEVNULL, stderr=err)
            # an image is labelled in tens of milliseconds: poll often, add little; by progress means
            # after k more images than the previous (killed) run left, so the kill lands mid-run
            left = images - before
            killed, what = _kill_when(proc, lambda: _finished_records(out) - before, rng, images,
                                      left > 1 and rng.random() < 0.5, poll=0.001, extra_max=0.03,
                                      delays=(1.0, 8.0), most=left - 1)
        if not killed:
            assert proc.returncode == 0, log_path.read_text(errors="replace")[-2000:]
        kills += killed
        finished = check_label_output(out, reference)
        partial_progress += bool(killed and before < len(finished) < images)  # killed mid-run
        log(f"label trial {trial}: {what}; {len(finished)} of {images} "
            "images finished")
        if not killed:
            check_label_finished(out, reference)
            round_no += 1
            out = workdir / f"label-{round_no}"
    subprocess.run(label_command(store, out), env=ENV, check=True, capture_output=True)  # the same command
    check_label_finished(out, reference)
    return {"trials": trials, "kills": kills, "kills_after_new_progress": partial_progress,
            "rounds": round_no + 1}


# ---------------------------------------------------------------------- maps, optimize, evaluate
OUTPUT_COMMANDS = ("maps", "maps-npy", "optimize", "evaluate")


def output_command(name: str, data: Path, out: Path) -> tuple[list[str], list[Path]]:
    """The command ``name`` writing under ``out`` (with --overwrite: the same command is re-run
    after a kill whatever the kill left), and the outputs it writes."""
    store = data / "store.zarr"
    if name == "maps":
        return _cli("maps", str(store), "-a", "a cat on a sofa", "-a", "furniture", "--out", str(out / "maps.zarr"),
                    "--png", str(out / "png"), "--overwrite"), [out / "maps.zarr", out / "png"]
    if name == "maps-npy":
        return _cli("maps", str(store), "-a", "a red car", "--out", str(out / "maps.npy"), "--overwrite"), \
            [out / "maps.npy"]
    if name == "optimize":
        return _cli("optimize", str(store), "--image", "0", "--mask", str(data / "mask.png"), "--init", "cat",
                    "--epochs", "40", "--out", str(out / "cat.safetensors"), "--overwrite"), [out / "cat.safetensors"]
    if name == "evaluate":
        return _cli("evaluate", str(data / "labels"), str(data / "gt"), "--out", str(out / "report"),
                    "--overwrite"), [out / "report"]
    raise ValueError(name)


def same_output(path: Path, reference: Path) -> bool:
    """Equal content: arrays of a Zarr output, pixels of PNGs, bytes of every other file;
    the hidden marker (it holds the writing time) is left out."""
    import zarr
    from PIL import Image

    if path.is_file() != reference.is_file() or path.is_dir() != reference.is_dir():
        return False
    if path.suffix == ".safetensors":
        from ovstore.optimize import load_token

        a, b = load_token(path), load_token(reference)
        return a.metadata() == b.metadata() and bool((a.embedding == b.embedding).all())
    if path.is_file():
        return path.read_bytes() == reference.read_bytes()
    if (path / "zarr.json").exists():
        ga, gb = zarr.open_group(path, mode="r"), zarr.open_group(reference, mode="r")
        if dict(ga.attrs) != dict(gb.attrs) or sorted(ga.array_keys()) != sorted(gb.array_keys()):
            return False
        return all(np.array_equal(ga[k][...], gb[k][...]) for k in ga.array_keys())
    names = sorted(p.name for p in path.iterdir() if not p.name.startswith("."))
    if names != sorted(p.name for p in reference.iterdir() if not p.name.startswith(".")):
        return False
    for name in names:
        if name.endswith(".png"):
            if not np.array_equal(np.asarray(Image.open(path / name)), np.asarray(Image.open(reference / name))):
                return False
        elif (path / name).read_bytes() != (reference / name).read_bytes():
            return False
    return True


def _leftovers(folder: Path) -> list[Path]:
    """Temporaries and locks under ``folder``; listed again when a running writer renamed a
    temporary folder away while it was being walked (polled during a run)."""
    while True:
        try:
            return [p for p in folder.rglob(".*") if p.name.endswith(".partial") or p.name.endswith(".ovstore-lock")]
        except FileNotFoundError:
            continue


def prepare_output_data(data: Path, steps: int = 2) -> None:
    """A store of three images, a mask, and a labelling with its 'ground truth' (a copy with
    a band of pixels changed) for `evaluate`."""
    from PIL import Image

    data.mkdir(parents=True, exist_ok=True)
    prompts = data / "prompts.txt"
    prompts.write_text("a cat on a sofa\na red car\na dog in a park\n")
    store = data / "store.zarr"
    if not store.exists():
        run_cli(*capture_args(store, prompts, steps))
    mask = np.zeros((64, 64), np.uint8)
    mask[8:40, 12:44] = 255
    Image.fromarray(mask).save(data / "mask.png")
    if not (data / "labels" / "annotations.json").exists():
        run_cli("label", store, "--classes", "cat,sofa,car,dog", "--out", data / "labels", "--scheduler", "synchronous")
    gt = data / "gt"
    gt.mkdir(exist_ok=True)
    for png in sorted((data / "labels" / "SegmentationClass").glob("*.png")):
        labels = np.asarray(Image.open(png)).copy()
        labels[:, :10] = 1
        Image.fromarray(labels).save(gt / png.name)


def run_outputs(workdir: Path, command: str, trials: int, seed: int = 0, log=print) -> dict:
    """``trials`` SIGKILLs of ``command`` (see OUTPUT_COMMANDS) at random points, each followed
    by the same command: after the kill each output is absent or complete (equal to an
    uninterrupted run's), after the re-run it is equal, and nothing is left behind.

    Half of the kills are timed by progress (right after a temporary of the output appears,
    plus a random fraction of a second), the others at a random time of the run.
    """
    rng = random.Random(seed)
    data = workdir / "data"
    prepare_output_data(data)
    reference = workdir / f"{command}-reference"
    args, ref_outputs = output_command(command, data, reference)
    if not all(p.exists() for p in ref_outputs):
        reference.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        subprocess.run(args, env=ENV, check=True, capture_output=True)
        (reference / "seconds").write_text(f"{time.monotonic() - started:.2f}")
    duration = float((reference / "seconds").read_text())
    points = {"before any output was written": 0, "while a temporary was written": 0,
              "after an output was published": 0}
    kills = identical = 0
    out = workdir / f"{command}-trials"
    out.mkdir(parents=True, exist_ok=True)
    args, targets = output_command(command, data, out)
    for trial in range(trials):
        for target in targets:  # each trial starts from a missing output or a complete one
            assert not target.exists() or same_output(target, reference / target.name), target
        mtimes = {t: t.stat().st_mtime_ns if t.exists() else None for t in targets}
        log_path = workdir / f"{command}-trial-{trial}.log"
        with open(log_path, "wb") as err:
            proc = subprocess.Popen(args, env=ENV, stdout=subprocess.DEVNULL, stderr=err)
            killed, what = _kill_when(proc, lambda: len(_leftovers(out)), rng, 1, rng.random() < 0.5, poll=0.002,
                                      extra_max=0.4, delays=(0.5, duration * 1.1), most=1)
        if not killed:
            assert proc.returncode == 0, log_path.read_text(errors="replace")[-2000:]
        kills += killed
        if killed:
            if _leftovers(out):
                points["while a temporary was written"] += 1
            elif any(t.exists() and t.stat().st_mtime_ns != mtimes[t] for t in targets):
                points["after an output was published"] += 1
            else:
                points["before any output was written"] += 1
        for target in targets:  # never a mix: absent, or complete and equal to the reference
            assert not target.exists() or same_output(target, reference / target.name), (trial, target)
        rerun = subprocess.run(args, env=ENV, capture_output=True, text=True)  # the same command again
        assert rerun.returncode == 0, rerun.stderr[-2000:]
        same = all(same_output(t, reference / t.name) for t in targets)
        assert same, f"trial {trial}: the re-run differs from an uninterrupted run"
        assert not _leftovers(out), _leftovers(out)
        identical += same
        log(f"{command} trial {trial}: {what}; re-run identical: {same}")
    return {"command": command, "trials": trials, "kills": kills, **points, "identical_after_rerun": identical}


# ---------------------------------------------------------------------- deterministic kill points
def _creating(name: str) -> str:
    return re.escape(f".{name}.creating-") + r"[^/]+"


#: name -> (regular expression over the written path, given the store's file name; N-th match;
#: write half of the temporary file first). Each is a point inside a real zarr write.
KILL_POINTS: dict[str, tuple[Callable[[str], str], int, bool]] = {
    "create-root-metadata": (lambda n: _creating(n) + r"/zarr\.json$", 1, True),
    "create-to_k": (lambda n: _creating(n) + r"/layers/[^/]+/to_k_weight/c/", 3, True),
    "reserve-records": (lambda n: "/" + re.escape(n) + r"/prompt/c/", 2, True),
    "reserve-status": (lambda n: "/" + re.escape(n) + r"/status/zarr\.json$", 1, True),
    "mid-shard": (lambda n: "/" + re.escape(n) + r"/layers/up_blocks[^/]*/queries/c/1/", 1, True),
    "image-chunk": (lambda n: "/" + re.escape(n) + r"/images/c/1/", 1, True),
    "mark-complete": (lambda n: "/" + re.escape(n) + r"/status/c/1$", 1, False),
}


def install_kill(pattern: str, nth: int = 1, half: bool = False) -> None:
    """SIGKILL this process at the ``nth`` zarr write whose path matches ``pattern``; with
    ``half``, first write half of the bytes into the temporary file, as a write cut short."""
    from zarr.storage import _local

    original = _local._put
    count = [0]

    def put(path, value, exclusive=False):
        if re.search(pattern, str(path)):
            count[0] += 1
            if count[0] == nth:
                if half:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    data = bytes(value.as_buffer_like())
                    with open(path.with_suffix(".killed.partial"), "wb") as f:
                        f.write(data[: len(data) // 2])
                        f.flush()
                os.kill(os.getpid(), signal.SIGKILL)
        return original(path, value, exclusive=exclusive)

    _local._put = put


def killed_run(fn: Callable[[], object], pattern: str, nth: int = 1, half: bool = False) -> int:
    """Run ``fn`` in a forked child that is SIGKILLed at the kill point; returns the child's
    wait status (check it with ``os.WIFSIGNALED``: the point was reached)."""
    pid = os.fork()
    if pid == 0:  # child
        code = 1
        try:
            install_kill(pattern, nth, half)
            fn()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return status


def run_cli(*args: str) -> None:
    """``ovstore ARGS`` in this process; raises on a non-zero exit."""
    from ovstore.cli import main

    saved = sys.argv
    sys.argv = ["ovstore", *map(str, args)]
    try:
        main()
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise RuntimeError(f"ovstore {' '.join(map(str, args))} exited with {exc.code}") from None
    finally:
        sys.argv = saved


def kill_point_trial(name: str, workdir: Path, prompts: Path, reference, steps: int = 2) -> dict:
    """Kill a capture at the named point, check what is left, resume with the documented
    command, and check the finished store against ``reference``."""
    from ovstore.store import open_store

    make_pattern, nth, half = KILL_POINTS[name]
    out = workdir / f"{name}.zarr"
    args = capture_args(out, prompts, steps)
    status = killed_run(lambda: run_cli(*args), make_pattern(out.name), nth, half)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, f"{name}: the kill point was not reached"
    left = {"partial": sorted(str(p.relative_to(workdir)) for p in workdir.rglob("*.partial")),
            "lock": (out / ".ovstore.lock").exists(), "store": (out / "zarr.json").exists()}
    if half:
        assert left["partial"], f"{name}: no half-written temporary file"
    complete: list[int] = []
    if left["store"]:
        complete, _ = check_against(out, reference)
    left["complete"] = complete
    # the documented resume: `--resume --out STORE` once the store holds the requests,
    # otherwise the same command with --resume
    n = reference.n_images
    if left["store"] and open_store(out).n_images == n:
        run_cli("capture", "--resume", "--out", out)
    else:
        run_cli(*args, "--resume")
    final, incomplete = check_against(out, reference)
    assert final == list(range(n)) and not incomplete, (name, final, incomplete)
    assert open_store(out).n_images == n, f"{name}: slots were duplicated"
    assert not (out / ".ovstore.lock").exists(), f"{name}: a lock file was left"
    assert not [p for p in workdir.iterdir() if ".creating-" in p.name], f"{name}: a half-built store was left"
    return left


def run_kill_points(workdir: Path, log=print, steps: int = 2) -> dict:
    from ovstore.store import open_store

    workdir.mkdir(parents=True, exist_ok=True)
    prompts = workdir / "prompts.txt"
    prompts.write_text("a cat on a sofa\na red car\na dog in a park\n")
    ref = workdir / "reference.zarr"
    if not ref.exists():
        run_cli(*capture_args(ref, prompts, steps))
    results = {}
    for name in KILL_POINTS:
        point_dir = workdir / name
        shutil.rmtree(point_dir, ignore_errors=True)
        point_dir.mkdir()
        results[name] = kill_point_trial(name, point_dir, prompts, open_store(ref), steps)
        log(f"{name}: {results[name]}")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kill-points", action="store_true", help="run the deterministic kill points instead")
    parser.add_argument("--label", action="store_true", help="kill `ovstore label` runs instead of captures")
    parser.add_argument("--outputs", nargs="*", choices=OUTPUT_COMMANDS, default=None,
                        help="kill runs of these output-writing commands instead (default with no names: all)")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    workdir = args.workdir or Path(os.environ.get("TMPDIR", "/tmp")) / f"ovstore-faults-{int(time.time())}"
    import torch

    torch.set_num_threads(1)  # as the killed processes (OMP_NUM_THREADS=1): same rounding
    if args.kill_points:
        print(run_kill_points(workdir))
        return
    if args.label:
        print(run_label(workdir, args.trials, args.images, args.steps, args.seed))
        return
    if args.outputs is not None:
        for command in args.outputs or OUTPUT_COMMANDS:
            print(run_outputs(workdir, command, args.trials, args.seed))
        return
    summary = run(workdir, args.trials, args.images, args.steps, args.seed)
    print(summary)


if __name__ == "__main__":
    main()

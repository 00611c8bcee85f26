"""Fault injection: kill `ovstore capture` (SIGKILL) at random points and check the store.

After every kill the store must open; every image marked complete must be bit-identical to
the same image of an uninterrupted run; the rest must be reported incomplete; and
`ovstore capture --resume` (the same command) must finish exactly the missing images.

    python scripts/fault_injection.py --trials 20 [--images 8] [--seed 0]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "data" / "golden" / "tiny-sd15"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "ovstore.cli", *args]


def capture_command(out: Path, prompts: Path, steps: int, resume: bool) -> list[str]:
    # batch size 1: batched convolutions may round differently, and a resume batches differently
    base = ["capture", str(TINY), "--out", str(out), "--steps", str(steps)]
    return _cli(*base, "--resume") if resume else _cli(*base, "--prompts-file", str(prompts))


def check_against(store_path: Path, reference) -> tuple[list[int], list[int]]:
    """Open after a kill: complete images must equal the reference bit for bit."""
    from ovstore.store import open_store, verify_store

    store = open_store(store_path)
    complete = store.complete_images()
    for i in complete:
        assert np.array_equal(store.image(i), reference.image(i)), f"image {i} differs"
        for layer in store.layers:
            assert np.array_equal(store.queries(layer.name, i), reference.queries(layer.name, i)), (i, layer.name)
    report = verify_store(store)
    assert report.ok, [str(p) for p in report.problems]
    return complete, store.incomplete_images()


def run(workdir: Path, trials: int, images: int = 8, steps: int = 3, seed: int = 0, log=print) -> dict:
    """Run ``trials`` killed captures (rounds restart when a store completes)."""
    from ovstore.store import open_store

    rng = random.Random(seed)
    workdir.mkdir(parents=True, exist_ok=True)
    prompts = workdir / "prompts.txt"
    prompts.write_text("\n".join(f"a photo of object number {i}" for i in range(images)) + "\n")
    ref_path = workdir / "reference.zarr"
    if not ref_path.exists():
        subprocess.run(capture_command(ref_path, prompts, steps, False), env=ENV, check=True, capture_output=True)
    reference = open_store(ref_path)
    round_no, resume, kills, interrupted = 0, False, 0, 0
    target = workdir / f"crash-{round_no}.zarr"
    for trial in range(trials):
        proc = subprocess.Popen(capture_command(target, prompts, steps, resume), env=ENV,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # startup (imports, model load) takes a few seconds; kill anywhere in start-up or capture
        delay = rng.uniform(2.0, 9.0)
        try:
            proc.wait(timeout=delay)
            finished = True
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            finished = False
            kills += 1
        if not target.exists() or not (target / "zarr.json").exists():
            log(f"trial {trial}: killed after {delay:.1f}s before the store existed")
            shutil.rmtree(target, ignore_errors=True)
            resume = False
            continue
        complete, incomplete = check_against(target, reference)
        if incomplete and complete:
            interrupted += 1
        log(f"trial {trial}: {'finished' if finished else f'killed after {delay:.1f}s'}; "
            f"complete {complete}, incomplete {incomplete}")
        resume = True
        if not incomplete and len(complete) == images:
            round_no += 1
            target = workdir / f"crash-{round_no}.zarr"
            resume = False
    # finish the last round with the same resume command
    if target.exists():
        subprocess.run(capture_command(target, prompts, steps, True), env=ENV, check=True, capture_output=True)
        complete, incomplete = check_against(target, reference)
        assert not incomplete and complete == list(range(images)), (complete, incomplete)
        assert open_store(target).n_images == images  # nothing lost, nothing duplicated
    return {"trials": trials, "kills": kills, "interrupted_with_partial_progress": interrupted,
            "rounds": round_no + 1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    workdir = args.workdir or Path(os.environ.get("TMPDIR", "/tmp")) / f"ovstore-faults-{int(time.time())}"
    summary = run(workdir, args.trials, args.images, args.steps, args.seed)
    print(summary)


if __name__ == "__main__":
    main()

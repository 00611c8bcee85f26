"""Property tests of the output discipline (ovstore.outputs): random interleavings of two
writers of one output, one of them SIGKILLed at a random point, leave the old or a new
complete output, never a mix of two writers and never nothing; the next writer removes
what the killed one left."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ovstore import outputs

ROOT = Path(__file__).resolve().parents[2]
N_FILES = 4

#: A writer of generation GEN: a folder of N_FILES files (or one float32 .npy file) holding
#: GEN, with a pause of PAUSE seconds between files, so that kills land at every stage.
WRITER = textwrap.dedent(f"""
    import sys, time
    import numpy as np
    from ovstore import outputs
    target, kind, gen, pause = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    out = outputs.open_output(target, "evaluate" if kind == "dir" else "maps", kind=kind, overwrite=True)
    with out.writing() as tmp:
        if kind == "dir":
            for k in range({N_FILES}):
                (tmp / f"part{{k}}.txt").write_text(str(gen) * 1000)
                time.sleep(pause)
        else:
            with open(tmp, "wb") as f:
                for k in range({N_FILES}):
                    if k == 0:
                        np.lib.format.write_array_header_1_0(f, {{"descr": "<f4", "fortran_order": False,
                                                                "shape": (1, 1, {N_FILES}, 1000)}})
                    f.write(np.full(1000, gen, np.float32).tobytes())
                    f.flush()
                    time.sleep(pause)
    print("published", flush=True)
""")


def generations(target: Path, kind: str) -> set[int]:
    """The generations found in the output: one, if it is whole."""
    if kind == "dir":
        names = sorted(p.name for p in target.iterdir() if not p.name.startswith("."))
        assert names == [f"part{k}.txt" for k in range(N_FILES)], names  # never a partial folder
        return {int(p.read_text()[0]) for p in target.glob("part*.txt")}
    data = np.load(target)
    assert data.shape == (1, 1, N_FILES, 1000)  # never a short file
    return {int(v) for v in np.unique(data)}


def _start(target: Path, kind: str, gen: int, pause: float) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.Popen([sys.executable, "-c", WRITER, str(target), kind, str(gen), str(pause)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def interleave(folder: Path, kind: str, start_b: float, kill_at: float, victim: int, pauses: tuple[float, float]):
    """Old output (generation 1), writers 2 and 3 (3 starting ``start_b`` s later); ``victim``
    (0: writer 2, 1: writer 3) is SIGKILLed ``kill_at`` s after the start."""
    target = folder / ("out" if kind == "dir" else "out.npy")
    first = _start(target, kind, 1, 0.0)
    assert first.wait(timeout=60) == 0, first.stderr.read()
    writers = [_start(target, kind, 2, pauses[0])]
    time.sleep(start_b)
    writers.append(_start(target, kind, 3, pauses[1]))
    time.sleep(max(0.0, kill_at - start_b))
    killed = writers[victim].poll() is None
    if killed:
        os.kill(writers[victim].pid, signal.SIGKILL)
    writers[victim].wait()
    survivor = writers[1 - victim]
    assert survivor.wait(timeout=60) == 0, survivor.stderr.read()
    found = generations(target, kind)
    assert len(found) == 1, f"a mix of writers: {found}"
    (gen,) = found
    # the survivor published after the old output existed: the output is never the old one;
    # it is the survivor's, or the victim's if the victim published later (last one wins)
    assert gen in {2, 3}, gen
    # the next writer of the target removes what the killed one left (temporaries, lock)
    out = outputs.open_output(target, "evaluate" if kind == "dir" else "maps", kind=kind, overwrite=True)
    with out.writing() as tmp:
        if kind == "dir":
            for k in range(N_FILES):
                (tmp / f"part{k}.txt").write_text("4" * 1000)
        else:
            with open(tmp, "wb") as f:  # np.save(path) would append ".npy" to the temporary's name
                np.save(f, np.full((1, 1, N_FILES, 1000), 4, np.float32))
    assert generations(target, kind) == {4}
    left = sorted(p.name for p in folder.iterdir() if p.name.startswith("."))
    assert left == [], left
    return gen, killed


def _property(tmp_path_factory, kind, start_b, kill_at, victim, pauses):
    folder = tmp_path_factory.mktemp("interleave")
    interleave(folder, kind, start_b, kill_at, victim, pauses)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(["dir", "file"]), start_b=st.floats(0.0, 0.3), kill_at=st.floats(0.0, 0.9),
       victim=st.integers(0, 1), pauses=st.tuples(st.floats(0.0, 0.08), st.floats(0.0, 0.08)))
def test_two_writers_and_a_sigkill_leave_one_complete_output(tmp_path_factory, kind, start_b, kill_at, victim, pauses):
    _property(tmp_path_factory, kind, start_b, kill_at, victim, pauses)


@pytest.mark.slow
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(["dir", "file"]), start_b=st.floats(0.0, 0.5), kill_at=st.floats(0.0, 1.5),
       victim=st.integers(0, 1), pauses=st.tuples(st.floats(0.0, 0.15), st.floats(0.0, 0.15)))
def test_two_writers_and_a_sigkill_many_interleavings(tmp_path_factory, kind, start_b, kill_at, victim, pauses):
    _property(tmp_path_factory, kind, start_b, kill_at, victim, pauses)


def test_a_kill_between_the_renames_of_the_fallback_loses_nothing(tmp_path, monkeypatch):
    """Without renameat2, a writer killed after setting the old output aside (before putting
    the new one in place) leaves the old one under a temporary name; the next writer puts it
    back instead of deleting it."""
    target = tmp_path / "out"
    out = outputs.open_output(target, "evaluate", kind="dir")
    with out.writing() as tmp:
        (tmp / "report.md").write_text("old")
    pid = os.fork()
    if pid == 0:  # the killed writer
        try:
            outputs._exchange = lambda a, b: False
            real_rename = os.rename

            def rename(src, dst):
                real_rename(src, dst)
                if ".old" in str(dst):
                    os.kill(os.getpid(), signal.SIGKILL)

            os.rename = rename
            w = outputs.open_output(target, "evaluate", kind="dir", overwrite=True)
            with w.writing() as tmp:
                (tmp / "report.md").write_text("new")
        finally:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status)
    assert not target.exists()  # killed between the two renames
    outputs.remove_stale_temporaries(target)
    assert (target / "report.md").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".partial")] == []

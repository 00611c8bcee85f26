"""`ovstore maps --scheduler`: maps as a resumable job over Dask workers. Its output is the
in-process output byte for byte, on a LocalCluster of processes, after the whole job was
killed and re-run, and after one worker was killed mid-job."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pytest

PROMPTS = ["a cat on a sofa", "a red car", "furniture", "a dog in a park with a ball", "sofa", "animal", "vehicle"]


def tree_bytes(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def reference(multi_store, tmp_path_factory) -> dict[str, bytes]:
    """The in-process streaming writer's output, file by file."""
    from ovstore.analyze import write_maps_zarr

    out = tmp_path_factory.mktemp("reference") / "maps.zarr"
    write_maps_zarr(multi_store, PROMPTS, out)
    return tree_bytes(out)


@pytest.fixture
def client(dask_client):
    """The session's LocalCluster of two worker processes (what `--scheduler local --workers 2` starts)."""
    return dask_client


def test_local_cluster_of_processes_writes_the_in_process_maps_byte_for_byte(multi_store, reference, tmp_path,
                                                                            client):
    import xarray as xr

    from ovstore.analyze import compute_maps, write_maps_job

    seen: list[int] = []
    out = write_maps_job(multi_store, PROMPTS, tmp_path / "maps.zarr", scheduler=client,
                         partition_size=1, progress=seen.append)
    assert sorted(seen) == [0, 1, 2]
    assert tree_bytes(out) == reference
    assert not any(p.name.endswith(".maps-job") for p in tmp_path.iterdir())  # published, job folder gone
    values = xr.open_zarr(out, consolidated=False)["ovam_maps"].values
    np.testing.assert_array_equal(values, compute_maps(multi_store, PROMPTS).values)


def test_a_job_killed_after_one_partition_resumes_to_identical_output(multi_store, reference, tmp_path, monkeypatch):
    from ovstore.analyze import jobs, write_maps_job

    out = tmp_path / "maps.zarr"

    def die_after_first(image: int) -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    pid = os.fork()
    if pid == 0:  # the job, killed as its first partition is reported done
        try:
            write_maps_job(multi_store, PROMPTS, out, scheduler="synchronous", partition_size=1,
                           progress=die_after_first)
        finally:
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    job = jobs.job_folder(out)
    assert not out.exists() and sorted(p.name for p in (job / "done").iterdir()) == ["000000.json"]

    computed: list[list[int]] = []
    original = jobs.map_partition

    def counting(*args, **kwargs):
        computed.append(kwargs["images"])
        return original(*args, **kwargs)

    monkeypatch.setattr(jobs, "map_partition", counting)
    seen: list[int] = []
    write_maps_job(multi_store, PROMPTS, out, scheduler="synchronous", partition_size=1, progress=seen.append)
    assert computed == [[1], [2]]  # the finished partition is not computed again
    assert seen == [0, 1, 2]
    assert tree_bytes(out) == reference and not job.exists()


def test_a_worker_killed_mid_job_loses_nothing(multi_store, tmp_path, client):
    from ovstore.analyze import write_maps_job, write_maps_zarr

    pids = list(client.run(os.getpid).values())
    killed: list[int] = []

    def kill_a_worker(image: int) -> None:
        if not killed:  # after the first partition: the other worker is busy with the next
            killed.append(pids[0])
            os.kill(pids[0], signal.SIGKILL)

    prompts = PROMPTS * 12
    out = write_maps_job(multi_store, prompts, tmp_path / "maps.zarr", scheduler=client, partition_size=1,
                         progress=kill_a_worker)
    assert killed
    assert tree_bytes(out) == tree_bytes(write_maps_zarr(multi_store, prompts, tmp_path / "again.zarr"))


def test_a_job_of_other_settings_beside_out_is_replaced(multi_store, reference, tmp_path):
    from ovstore.analyze import jobs, write_maps_job

    out = tmp_path / "maps.zarr"
    job = jobs.job_folder(out)
    (job / "done").mkdir(parents=True)
    (job / "job.json").write_text('{"images": [0]}')
    (job / "done" / "000000.json").write_text("{}")  # would skip partition 0 if it were believed
    write_maps_job(multi_store, PROMPTS, out, scheduler="synchronous", partition_size=1)
    assert tree_bytes(out) == reference


def test_cli_maps_on_a_scheduler(multi_store, reference, tmp_path, monkeypatch, capsys):
    import sys

    from ovstore.cli import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "maps.zarr"
    monkeypatch.setattr(sys, "argv", ["ovstore", "maps", str(multi_store), "--attributions-file", str(prompts),
                                      "--out", str(out), "--scheduler", "synchronous", "--partition-size", "2"])
    main()
    assert "wrote maps (3, " in capsys.readouterr().err
    written = tree_bytes(out)
    # the prompts' file lines are recorded (prompt_line): the same maps, other coordinates
    import xarray as xr

    ours = xr.open_zarr(out, consolidated=False)["ovam_maps"]
    assert list(ours["prompt_line"].values[:1]) == [1]
    assert written.keys() - reference.keys() == {"prompt_line/zarr.json", "prompt_line/c/0"}
    assert written["ovam_maps/c/0/0/0/0"] == reference["ovam_maps/c/0/0/0/0"]
    for out_name, address, expected in (("m.npy", "local", ".zarr"), ("m.zarr", "tcp://nowhere", "tcp://nowhere")):
        monkeypatch.setattr(sys, "argv", ["ovstore", "maps", str(multi_store), "-a", "a cat",
                                          "--out", str(tmp_path / out_name), "--scheduler", address])
        with pytest.raises(SystemExit) as exit_info:
            main()
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2 and err.startswith("error: ") and "\n" not in err, err
        assert "--scheduler" in err and expected in err
        assert not (tmp_path / out_name).exists()

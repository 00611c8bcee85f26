"""Maps as a resumable job over Dask workers: images partitioned, each partition computed by a
worker that opens the store by path and writes its own blocks of one shared Zarr output.

The job lives in a hidden folder beside ``--out`` (``.NAME.maps-job``): ``job.json`` (what
the job computes; a re-run of the same command continues it), the output dataset being filled
(``maps.zarr``, the same template and chunks as :func:`~ovstore.analyze.write_maps_zarr`), and
one marker per finished partition under ``done/``, written by the worker after its blocks.
A partition's images own whole chunks (chunks are one image × tokens), so workers never write
the same chunk; a killed worker's partition is computed again (by Dask on another worker, or by
the next run) and overwrites exactly its own chunks: the result is byte-identical to an
uninterrupted run, and to the in-process :func:`~ovstore.analyze.write_maps_zarr`. When every
partition is done the dataset is published at ``--out`` and the job folder removed.
"""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .._version import __version__
from ..outputs import held_lock, open_output, os_errors, write_json_atomic
from ..store import Store, open_store
from .config import MapConfig
from .text import Attribution, TextEncoder

__all__ = ["DEFAULT_PARTITION_SIZE", "job_folder", "map_partition", "write_maps_job"]

#: Images per Dask task: big enough that a task's start (opening the store, preparing the
#: plan) is small beside its maps, small enough to spread a store over many workers.
DEFAULT_PARTITION_SIZE = 4

_JOB = "job.json"
_DATA = "maps.zarr"
_DONE = "done"


def job_folder(out: str | Path) -> Path:
    """The hidden folder beside ``out`` where a maps job keeps its state until published."""
    out = Path(out)
    return out.with_name(f".{out.name}.maps-job")


def write_maps_job(
    store: Store | str | Path,
    attributions: Sequence[str | Attribution] | str,
    out: str | Path,
    *,
    images: Sequence[int] | None = None,
    config: MapConfig | None = None,
    text_encoder: TextEncoder | None = None,
    model: str | None = None,
    device: str = "cpu",
    scheduler: Any = "local",
    workers: int | None = None,
    partition_size: int = DEFAULT_PARTITION_SIZE,
    progress: Callable[[int], None] | None = None,
    overwrite: bool = False,
    inputs: Sequence[str | Path] = (),
    skipped_damaged: Sequence[int] = (),
) -> Path:
    """:func:`~ovstore.analyze.write_maps_zarr` as a resumable job on Dask workers.

    ``scheduler``: ``"local"`` (a LocalCluster of ``workers`` processes), a scheduler address
    (``tcp://HOST:8786``; its workers must see the store's path and ``out``'s folder), a
    ``distributed.Client``, or ``"synchronous"`` (the partitions one after the other in this
    process, still resumable). The attributions are encoded once here and sent to the workers.
    Interrupted, the same call continues: finished partitions are skipped. ``progress`` is
    called with each image index as its partition finishes (earlier runs' images first).
    """
    from ..cluster import check_scheduler_address
    from ..inputs import check_int
    from .export import maps_template
    from .maps import prepare_run

    check_int(partition_size, "--partition-size", 1, 1 << 20)
    if workers is not None:
        check_int(workers, "--workers", 1, 4096)
    if isinstance(scheduler, str) and scheduler not in ("local", "synchronous"):
        scheduler = check_scheduler_address(scheduler)
    store, images, atts, plan = prepare_run(store, attributions, images=images, config=config,
                                            text_encoder=text_encoder, model=model, device=device)
    target = open_output(out, "maps", kind="dir", inputs=[store.path, *inputs], overwrite=overwrite)
    job = job_folder(target.path)
    config = plan.config
    partitions = [images[k:k + partition_size] for k in range(0, len(images), partition_size)]
    description = {
        "ovstore_version": __version__, "store": str(store.path.resolve()), "images": [int(i) for i in images],
        "partition_size": int(partition_size), "config": repr(config), "device": device,
        "skipped_damaged": [int(i) for i in skipped_damaged], "attributions": _attributions_digest(atts),
    }
    kept = f"the finished partitions are kept in {job.name}; run the same command again to continue"
    with os_errors(target.path, kept=kept), held_lock(job, wait=None, what="maps job"):
        data = _open_job(job, description, lambda path: maps_template(store, images, atts, plan, skipped_damaged)
                         .to_zarr(path, mode="w", zarr_format=3, consolidated=False, compute=False))
        done = {int(p.stem) for p in (job / _DONE).glob("*.json") if p.stem.isdigit()}
        if progress is not None:
            for k in sorted(done):
                for image in partitions[k]:
                    progress(image)
        todo = [k for k in range(len(partitions)) if k not in done]
        positions = {int(image): p for p, image in enumerate(images)}
        task = functools.partial(map_partition, str(store.path.resolve()), str(data), config=config,
                                 model=model, device=device, job=str(job))
        _run(task, todo, partitions, positions, atts, scheduler=scheduler, workers=workers, progress=progress)
        with held_lock(target.path):
            target.check()  # again: another process may have put something there meanwhile
            target.publish_dir(data)
        shutil.rmtree(job, ignore_errors=True)
    return target.path


def _run(task: Callable, todo: Sequence[int], partitions: Sequence[Sequence[int]], positions: dict[int, int],
         atts: Sequence[Attribution], *, scheduler: Any, workers: int | None,
         progress: Callable[[int], None] | None) -> None:
    """Every partition of ``todo`` computed: in this process, or as Dask tasks (retried by Dask
    on another worker when a worker dies)."""
    def arguments(k: int) -> dict[str, Any]:
        return {"index": k, "images": [int(i) for i in partitions[k]],
                "positions": [positions[int(i)] for i in partitions[k]]}

    if not todo:
        return
    if scheduler == "synchronous":
        for k in todo:
            for image in task(attributions=atts, **arguments(k)):
                if progress is not None:
                    progress(image)
        return
    from distributed import as_completed

    from ..cluster import dask_client

    client, close = dask_client(scheduler, workers)
    try:
        shared = client.scatter(list(atts), broadcast=True)  # encoded once, sent once per worker
        futures = [client.submit(task, attributions=shared, pure=False, **arguments(k)) for k in todo]
        for future in as_completed(futures):
            for image in future.result():
                if progress is not None:
                    progress(image)
    finally:
        close()


def map_partition(store_path: str, data_path: str, *, attributions: Sequence[Attribution], index: int,
                  images: Sequence[int], positions: Sequence[int], config: MapConfig, model: str | None,
                  device: str, job: str) -> list[int]:
    """Maps of ``images`` (their rows ``positions`` of the output) into the job's dataset, then
    the partition's done marker; runs on a Dask worker. Returns the images."""
    import zarr

    from .export import write_block_budget
    from .maps import iter_map_blocks

    plan = _plan(store_path, config, device)
    array = zarr.open_array(str(Path(data_path) / "ovam_maps"), mode="r+")
    rows = dict(zip(images, positions))
    for block in iter_map_blocks(plan, list(images), list(attributions),
                                 block_budget=write_block_budget(plan)):
        array[rows[block.image], block.tokens] = block.maps.detach().cpu().numpy()
    write_json_atomic(Path(job) / _DONE / f"{index:06d}.json", {"images": [int(i) for i in images]})
    return list(images)


@functools.lru_cache(maxsize=2)
def _plan(store_path: str, config: MapConfig, device: str):
    """One prepared plan per worker process, store and settings, reused across partitions."""
    from .maps import MapPlan

    return MapPlan(open_store(store_path), config, device=device)


def _attributions_digest(atts: Sequence[Attribution]) -> str:
    """SHA-256 of what the attributions are: labels, tokens and embedding bytes."""
    digest = hashlib.sha256()
    for att in atts:
        digest.update(json.dumps([att.label, list(att.tokens), att.line]).encode())
        digest.update(np.ascontiguousarray(att.embedding.detach().cpu().float().numpy()).tobytes())
    return digest.hexdigest()


def _open_job(job: Path, description: dict[str, Any], create: Callable[[Path], Any]) -> Path:
    """The job's dataset: continued when ``job.json`` describes this same job, else made anew
    (a job of other settings left beside ``out`` by an interrupted run is replaced)."""

    path = job / _JOB
    if path.exists():
        try:
            same = json.loads(path.read_text()) == description
        except (OSError, ValueError):
            same = False
        if same and (job / _DATA / "zarr.json").exists():
            return job / _DATA
    if job.exists():
        shutil.rmtree(job)
    (job / _DONE).mkdir(parents=True)
    create(job / _DATA)
    write_json_atomic(path, description)  # last: a job folder without it is made anew
    return job / _DATA

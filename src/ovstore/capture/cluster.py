"""Capture on a Dask cluster: the slots are reserved once, here, then filled by workers (one per
GPU), each task finishing a group of slots as ``--resume`` does.

It is the ``--reserve-only`` + ``--resume --worker K/N`` recipe with a scheduler instead of
hand-started processes: slot writes are crash-safe and a slot is complete only when its last
write is committed, so a worker killed mid-task leaves incomplete slots that Dask's retry of
the task (on another worker) finishes; a slot is never generated twice once complete. GPU
workers are started with ``dask worker ADDRESS --resources GPU=1`` (one per GPU, each with its
own ``CUDA_VISIBLE_DEVICES``, or ``dask cuda worker``); with ``--device cuda`` every task asks
for ``GPU=1``, so one runs per GPU.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..errors import InvalidInputError
from .config import CaptureConfig
from .job import CaptureJob
from .runner import CaptureResult, match_requests

__all__ = ["capture_on_cluster", "fill_slots"]


def capture_on_cluster(job: CaptureJob, *, scheduler: Any = "local", workers: int | None = None,
                       slots_per_task: int | None = None,
                       progress: Callable[[int], None] | None = None) -> CaptureResult:
    """Run a checked, loaded :class:`~ovstore.capture.CaptureJob` on Dask workers.

    New prompts are reserved as slots in this process (which has loaded the pipeline for
    :meth:`CaptureJob.load`); a resume takes the store's incomplete slots (of the given
    prompts, when given). The slots are split into tasks of ``slots_per_task`` (default: twice
    the batch size) that the workers fill. ``scheduler``: ``"local"`` (a LocalCluster of
    ``workers`` CPU processes), a scheduler address, or a ``distributed.Client``; its workers
    must see the store (and a model given by path) under the same path. ``progress`` is called
    with each slot as its task finishes.
    """
    from ..cluster import check_scheduler_address, dask_client
    from ..inputs import check_int
    from ..store import open_store

    if job.reserve_only or job.worker is not None:
        raise InvalidInputError("--scheduler fills the slots itself; leave out --reserve-only and --worker")
    if job.real_images is not None:
        raise InvalidInputError("real-image captures (--images-file, or a real-image store) run in one process; "
                                "leave out --scheduler")
    if isinstance(scheduler, str) and scheduler != "local":
        scheduler = check_scheduler_address(scheduler)
    cuda = job.device.startswith("cuda")
    if cuda and scheduler == "local":
        raise InvalidInputError("--scheduler local starts CPU workers; for GPUs start one `dask worker ADDRESS "
                                "--resources GPU=1` per GPU (or `dask cuda worker ADDRESS`) and pass the address")
    batch = job.config.batch_size
    size = check_int(slots_per_task if slots_per_task is not None else 2 * batch, "--slots-per-task", 1, 1 << 20)
    if workers is not None:
        check_int(workers, "--workers", 1, 4096)
    if job.nothing_to_resume:
        return job.run()
    if job.pipe is None:
        job.load()
    out = job.out.resolve()
    from distributed import as_completed

    client, close = dask_client(scheduler, workers)  # connected before any slot is reserved
    try:
        if job.resume:
            todo, new, done = match_requests(open_store(out), job.requests)
            if new:  # prompts of the original command the store does not hold yet
                todo += list(replace(job, resume=False, reserve_only=True, requests=list(new)).run().images)
        else:
            todo, done = list(replace(job, reserve_only=True).run().images), []
        task = functools.partial(fill_slots, str(out), model=job.model, revision=job.revision,
                                 torch_dtype=job.torch_dtype, device=job.device, batch_size=batch)
        extra = {"resources": {"GPU": 1}} if cuda else {}
        futures = [client.submit(task, todo[k:k + size], pure=False, **extra) for k in range(0, len(todo), size)]
        filled: list[int] = []
        for future in as_completed(futures):
            for slot in future.result():
                filled.append(slot)
                if progress is not None:
                    progress(slot)
    finally:
        close()
    store = open_store(out)
    return CaptureResult(store=out, images=tuple(sorted(filled)), layout=store.layout, already_complete=tuple(done))


def fill_slots(store_path: str, slots: Sequence[int], *, model: str | None, revision: str | None,
               torch_dtype: str, device: str, batch_size: int) -> list[int]:
    """Generate the incomplete ones of ``slots`` into the store (a Dask task); returns every
    slot of ``slots`` now complete by this task or an earlier try of it."""
    from .runner import resume

    pipe, identity = _pipeline(store_path, model, revision, torch_dtype, device)
    result = resume(pipe, identity, Path(store_path), config=CaptureConfig(batch_size=batch_size), slots=slots)
    return sorted({*result.images, *result.already_complete})


@functools.lru_cache(maxsize=1)
def _pipeline(store_path: str, model: str | None, revision: str | None, torch_dtype: str, device: str):
    """One loaded pipeline per worker process (the store's recorded model unless ``model``)."""
    from ..store import open_store
    from .continuation import recorded_model
    from .pipeline import load_pipeline

    if model is None:
        model, revision = recorded_model(open_store(store_path), revision)
    return load_pipeline(model, torch_dtype=torch_dtype, device=device, revision=revision)

"""Labelling a whole store into a segmentation dataset, partitioned over images with Dask.

Each partition opens the store, encodes the class attributions once and writes its images'
outputs; an image counts as finished only when its record (``records/00000.json``) exists,
and that record is written last, atomically. Every file is written to a hidden
``.NAME.<writer>.partial`` beside it and renamed into place, so a killed run never leaves a
half-written file under a real name, and the temporaries never match ``*.png``/``*.jpg``;
those a killed run leaves are deleted when the next run starts. Re-running the same command
skips finished images, so an interrupted run resumes where it stopped. The COCO file and the
image lists are assembled, atomically, from every finished record in the folder at the end
(so a run over a subset of images never drops images labelled earlier).
"""

from __future__ import annotations

import functools
import json
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from .._version import __version__
from ..analyze import check_recorded_encoder
from ..devices import check_device
from ..errors import OutputError, OvstoreError
from ..inputs import check_int
from ..outputs import held_lock, open_output, os_errors
from ..partial import RunInterrupted, progress_note
from ..store import Store, analysis_defaults, open_store
from . import voc
from .config import LabelConfig
from .refine import adaptive_threshold, classes_in_prompt, dense_crf, label_mask, remove_small_components, require_crf

__all__ = ["label_store", "LabelResult", "label_partition", "image_labels"]

SETTINGS = "ovstore-label.json"
MAPS = "maps.zarr"


@dataclass(frozen=True)
class LabelResult:
    """What a labelling run produced.

    ``labelled``: images labelled by this run; ``skipped``: chosen images already finished;
    ``maps_filled``: finished images whose float maps this run added (``write_maps``);
    ``damaged``: images left out because their stored data is damaged (``skip_damaged``).
    """

    out: Path
    labelled: tuple[int, ...]
    skipped: tuple[int, ...]
    coco: Path
    maps_filled: tuple[int, ...] = ()
    damaged: tuple[int, ...] = ()


@functools.lru_cache(maxsize=4)
def _encoder(identity_json: str, model: str | None, device: str) -> Any:
    """One text encoder per worker process and model, reused across partitions."""
    from ..analyze import load_text_encoder
    from ..store import ModelIdentity

    return load_text_encoder(ModelIdentity.from_json(json.loads(identity_json)), model=model, device=device)


def image_labels(norm: np.ndarray, rgb: np.ndarray, prompt: str,
                 config: LabelConfig) -> tuple[np.ndarray, list[float], list[bool]]:
    """One image's label mask from its normalised class maps ``(class, H, W)``, every refinement
    of ``config`` applied; also the thresholds used and the classes allowed."""
    n = len(config.classes)
    allowed = (classes_in_prompt(prompt, config.classes, config.class_words) if config.prompt_classes_only
               else [True] * n)
    if config.adaptive:
        thresholds = [adaptive_threshold(norm[c], config.sweep) for c in range(n)]
    else:
        thresholds = [config.threshold_of(c) for c in config.classes]
    if config.crf:
        labels = dense_crf(rgb, norm, thresholds, allowed)
    else:
        labels = label_mask(norm, thresholds, allowed)
    return remove_small_components(labels, config.min_component), thresholds, allowed


def label_partition(store_path: str, out: str, config: LabelConfig, images: Sequence[int], *,
                    model: str | None = None, device: str = "cpu", maps_path: str | None = None,
                    maps_only: bool = False, skip_damaged: bool = False) -> tuple[list[int], list[int]]:
    """Label ``images`` and write their outputs; runs on a Dask worker (or in-process).
    Returns the images labelled and, with ``skip_damaged``, those left out as damaged.

    ``maps_only``: the images are finished; only write their float maps to ``maps_path``
    and mark their records. Paths are absolute (workers may run in other folders).
    """
    from ..partial import find_damaged
    from .class_maps import label_class_maps

    store = open_store(store_path)
    damaged = find_damaged(store, images) if skip_damaged else []
    images = [i for i in images if i not in damaged]
    if not images:
        return [], damaged
    out_dir = Path(out)
    paths = voc.voc_paths(out_dir)
    identity = json.dumps(store.layout.model.to_json(), sort_keys=True)
    encoder = _encoder(identity, model, device)
    size = (store.layout.height, store.layout.width)
    maps = label_class_maps(store, list(images), config, encoder, size=size, device=device)
    maps_array = None
    if maps_path is not None:
        import zarr

        maps_array = zarr.open_array(maps_path, mode="r+")
    n = len(config.classes)
    for k, image in enumerate(images):
        stem = f"{image:05d}"
        norm = maps[k]
        if maps_only:
            record_path = paths["records"] / f"{stem}.json"
            record = json.loads(record_path.read_text())
            maps_array[image] = norm.astype(maps_array.dtype)
            voc.write_json_atomic(record_path, {**record, "maps": True})
            continue
        record = store.record(image)
        rgb = store.image(image)  # a real-image store's images are the sources, not the reconstructions
        labels, thresholds, allowed = image_labels(norm, rgb, record.prompt, config)
        voc.write_jpeg(paths["jpeg"] / f"{stem}.jpg", rgb)
        voc.write_label_png(paths["png"] / f"{stem}.png", labels)
        if maps_array is not None:
            maps_array[image] = norm.astype(maps_array.dtype)
        voc.write_json_atomic(paths["records"] / f"{stem}.json", {
            "image": {
                "id": int(image), "file_name": f"JPEGImages/{stem}.jpg", "height": size[0], "width": size[1],
                "ovstore": {
                    "store": str(store.path), "image_index": int(image), "prompt": record.prompt,
                    "negative_prompt": record.negative_prompt, "seed": record.seed,
                    "classes": [c for c, a in zip(config.classes, allowed) if a],
                    "thresholds": {c: float(t) for c, t in zip(config.classes, thresholds)},
                    "normalize": config.normalize, "mode": config.mode,
                    "refinements": {"adaptive": config.adaptive, "crf": config.crf,
                                    "min_component": config.min_component,
                                    "prompt_classes_only": config.prompt_classes_only}
                    | ({"self_attention": config.refine.describe()} if config.refine is not None else {}),
                    "token_files": {c: str(p) for c, p in config.tokens.items()},
                    "settings": config.provenance(),
                    "model_defaults": _model_defaults_file(store, config),
                    "ovstore_version": __version__,
                    **({"source": json.loads(record.source)} if record.source else {}),
                },
            },
            "annotations": voc.rle_annotations(labels, image, n),
            "maps": maps_array is not None,
        })
    return list(images), damaged


def _model_defaults_file(store: Store, config: LabelConfig) -> str | None:
    """The model defaults file whose values ``config`` uses (``None`` when it uses none)."""
    if "model" not in config.sources.values():
        return None
    return analysis_defaults(store).file


def label_store(
    store: Store | str | Path,
    out: str | Path,
    config: LabelConfig,
    *,
    images: Sequence[int] | None = None,
    scheduler: Any = None,
    workers: int | None = None,
    partition_size: int = 8,
    write_maps: bool = False,
    model: str | None = None,
    device: str = "cpu",
    progress: Callable[[int], None] | None = None,
    skip_damaged: bool = False,
    model_defaults: bool = True,
) -> LabelResult:
    """Label every complete image of a store (or ``images``) into ``out``.

    Parameters
    ----------
    config
        The settings; those it leaves to ovstore (``config.sources``) take the store's model
        defaults (:func:`ovstore.store.analysis_defaults`, recorded from the model's
        ``ovstore_defaults.json`` at capture) unless ``model_defaults`` is False. Each
        image's provenance records every setting and its source (``user``, ``model``,
        ``ovstore``).
    scheduler
        ``"synchronous"`` runs in this process; ``None`` starts a ``distributed``
        LocalCluster sized to the machine (``workers`` processes, one thread each); a
        string address (``tcp://host:8786``; checked and connected to before anything is
        written, see :mod:`ovstore.label.cluster`) or a ``distributed.Client`` uses that cluster.
        Its workers open the store, ``out`` and the token files by path: on a remote
        cluster these must be on a filesystem every worker sees under the same path.
    partition_size
        Images per task: memory is bounded by one partition's maps per worker.
    write_maps
        Also write the normalised float class maps to ``out/maps.zarr`` (image, class, y, x;
        float16, NaN where not written). Images finished by an earlier run without it get
        their maps added (their labels are not recomputed).
    progress
        Called with each image index as it is finished; images finished earlier first.
    skip_damaged
        Leave out images whose stored data is damaged (listed in the result and in the COCO
        file's ``info.skipped_damaged_images``); a later run tries them again.

    ``out`` follows :mod:`ovstore.outputs`: a capture store, an input, a file or a folder
    that is not a labelling is refused; one labelling run at a time per ``out``. A run that
    stops (error, Ctrl-C) says which images it kept and which remain.

    Returns
    -------
    LabelResult
        Images labelled now, images skipped as already finished, and the COCO file.
    """
    check_device(device)  # here, not on the workers after the folder was made
    check_int(partition_size, "--partition-size", 1, 1_000_000)
    if workers is not None:
        check_int(workers, "--workers", 1, 4096)
    opened = store if isinstance(store, Store) else open_store(store)
    if config.refine is not None:  # a store without self-attention: one line naming the capture option, now
        opened._self_attention_grid(config.refine.resolution)
    if model_defaults:
        config = config.with_model_defaults(analysis_defaults(opened))
    config = replace(config, tokens={k: Path(v).resolve() for k, v in config.tokens.items()})
    target = open_output(out, "label", kind="dir", inputs=[opened.path, *config.tokens.values()], resume=True)
    out = target.path  # absolute: Dask workers may run in another folder
    chosen = opened.check_images(images)
    if config.crf:
        require_crf()  # before anything is written
    connected = None
    if isinstance(scheduler, str) and scheduler not in ("synchronous", "local"):  # a mistyped or dead address: one line, now
        from ..cluster import connect_scheduler

        scheduler = connected = connect_scheduler(scheduler)
    try:
        return _label_checked(opened, out, config, chosen, scheduler=scheduler, workers=workers,
                              partition_size=partition_size, write_maps=write_maps, model=model, device=device,
                              progress=progress, skip_damaged=skip_damaged)
    finally:
        if connected is not None:
            connected.close()


def _label_checked(opened: Store, out: Path, config: LabelConfig, chosen: list[int], *, scheduler: Any,
                   workers: int | None, partition_size: int, write_maps: bool, model: str | None, device: str,
                   progress: Callable[[int], None] | None, skip_damaged: bool) -> LabelResult:
    """:func:`label_store` once its arguments are checked (and a scheduler address connected)."""
    if opened.layout.model.text_encoder_fingerprint and model is None:
        encoder = _encoder(json.dumps(opened.layout.model.to_json(), sort_keys=True), model, device)
        check_recorded_encoder(encoder, opened.layout.model, opened.path)
    store_path = opened.path.resolve()
    finished: list[int] = []  # filled as the run goes, for the summary of a run that stops
    damaged: list[int] = []
    todo: list[int] = []

    def kept() -> str:
        done = [i for i in chosen if i not in todo or i in finished] if todo else []
        return progress_note("labelled", done, [i for i in chosen if i not in done], str(out))

    then = "re-run the same command to resume"
    with os_errors(out, kept="nothing was written there", then="run the same command again"):
        out.parent.mkdir(parents=True, exist_ok=True)  # the lock file lives beside out
    with held_lock(out, wait=None, what="labelling"), os_errors(out, kept=kept, then=then):
        try:
            return _label_locked(opened, store_path, out, config, chosen, finished, damaged, todo,
                                 scheduler=scheduler, workers=workers, partition_size=partition_size,
                                 write_maps=write_maps, model=model, device=device, progress=progress,
                                 skip_damaged=skip_damaged)
        except KeyboardInterrupt:
            raise RunInterrupted(f"{kept()}; {then}") from None
        except OvstoreError as exc:
            if finished and not isinstance(exc, OutputError):
                raise type(exc)(f"{exc} ({kept()}; {then})") from exc
            raise


def _label_locked(opened: Store, store_path: Path, out: Path, config: LabelConfig, chosen: list[int],
                  finished: list[int], damaged: list[int], todo: list[int], *, scheduler: Any,
                  workers: int | None, partition_size: int, write_maps: bool, model: str | None, device: str,
                  progress: Callable[[int], None] | None, skip_damaged: bool) -> LabelResult:
    """The labelling run proper, while ``out`` is locked; fills ``finished``/``damaged``/``todo``."""
    settings = {"store": str(store_path), "config": config.describe(), "model": model}
    paths = voc.prepare_voc_output(out, "label", SETTINGS, settings, config.classes, other="other settings")
    maps_path = str(out / MAPS) if write_maps else None
    if write_maps:
        _maps_array(out / MAPS, opened, config)
    done = {i for i in chosen if (paths["records"] / f"{i:05d}.json").exists()}
    todo += [i for i in chosen if i not in done]
    fill = []
    if write_maps:  # finished earlier without --write-maps: add their maps, no NaN holes
        fill = [i for i in sorted(done)
                if not json.loads((paths["records"] / f"{i:05d}.json").read_text()).get("maps")]
    if progress:
        for image in sorted(done):
            progress(image)
    task = functools.partial(label_partition, str(store_path), str(out), config, model=model, device=device,
                             maps_path=maps_path, skip_damaged=skip_damaged)
    jobs = [(todo[k:k + partition_size], False) for k in range(0, len(todo), partition_size)]
    jobs += [(fill[k:k + partition_size], True) for k in range(0, len(fill), partition_size)]

    def report(result: tuple[list[int], list[int]], maps_only: bool) -> None:
        images, bad = result
        damaged.extend(bad)
        if not maps_only:
            finished.extend(images)
            if progress:
                for image in images:
                    progress(image)

    if jobs:
        if scheduler == "synchronous":
            for part, maps_only in jobs:
                report(task(part, maps_only=maps_only), maps_only)
        else:
            from distributed import as_completed

            from ..cluster import dask_client

            client, close = dask_client(scheduler, workers)
            try:
                futures = {client.submit(task, part, maps_only=maps_only, pure=False): maps_only
                           for part, maps_only in jobs}
                for future in as_completed(futures):
                    report(future.result(), futures[future])
            finally:
                close()
    coco = _assemble(out, config, damaged=sorted(damaged))
    return LabelResult(out=out, labelled=tuple(sorted(finished)), skipped=tuple(sorted(done)), coco=coco,
                       maps_filled=tuple(fill), damaged=tuple(sorted(damaged)))


def _maps_array(path: Path, store: Store, config: LabelConfig) -> None:
    """Create ``maps.zarr`` (NaN = not written), or grow it when the store has grown."""
    import zarr

    shape = (store.n_images, len(config.classes), store.layout.height, store.layout.width)
    if not (path / "zarr.json").exists():  # new, or a creation killed before its metadata was written
        if path.exists():
            shutil.rmtree(path)
        zarr.create_array(str(path), shape=shape, chunks=(1, *shape[1:]), dtype="float16", fill_value=np.nan,
                          dimension_names=("image", "class", "y", "x"),
                          attributes={"classes": list(config.classes), "normalize": config.normalize})
        return
    array = zarr.open_array(str(path), mode="r+")
    if array.shape[0] < shape[0]:
        array.resize(shape)


def _assemble(out: Path, config: LabelConfig, damaged: Sequence[int] = ()) -> Path:
    """COCO JSON and image lists from every finished image's record in ``out``."""
    return voc.write_coco_from_records(out, config.classes, {
        "description": "semantic segmentation labelled by ovstore (OVAM maps)", "version": __version__,
        "skipped_damaged_images": [int(i) for i in damaged], "settings": config.provenance()})

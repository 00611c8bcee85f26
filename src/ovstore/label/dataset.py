"""Labelling a whole store into a segmentation dataset, partitioned over images with Dask.

Each partition opens the store, encodes the class attributions once and writes its images'
outputs; an image counts as finished only when its record (``records/00000.json``) exists,
and that record is written last, atomically. Re-running the same command skips finished
images, so an interrupted run resumes where it stopped. The COCO file and image lists are
assembled from the records at the end.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .._version import __version__
from ..errors import InvalidInputError
from ..store.reader import Store, open_store
from . import voc
from .config import LabelConfig
from .refine import adaptive_threshold, classes_in_prompt, dense_crf, label_mask, remove_small_components

__all__ = ["label_store", "LabelResult", "label_partition"]

SETTINGS = "ovstore-label.json"


@dataclass(frozen=True)
class LabelResult:
    """What a labelling run produced."""

    out: Path
    labelled: tuple[int, ...]
    skipped: tuple[int, ...]
    coco: Path


@functools.lru_cache(maxsize=4)
def _encoder(identity_json: str, model: str | None, device: str) -> Any:
    """One text encoder per worker process and model, reused across partitions."""
    from ..analyze.text import load_text_encoder
    from ..store.format import ModelIdentity

    return load_text_encoder(ModelIdentity.from_json(json.loads(identity_json)), model=model, device=device)


def _paths(out: Path) -> dict[str, Path]:
    return {"jpeg": out / "JPEGImages", "png": out / "SegmentationClass", "sets": out / "ImageSets" / "Segmentation",
            "records": out / "records"}


def label_partition(store_path: str, out: str, config: LabelConfig, images: Sequence[int], *,
                    model: str | None = None, device: str = "cpu", maps_path: str | None = None) -> list[int]:
    """Label ``images`` and write their outputs; runs on a Dask worker (or in-process)."""
    from .class_maps import class_attributions, class_maps

    store = open_store(store_path)
    out_dir = Path(out)
    paths = _paths(out_dir)
    identity = json.dumps(store.layout.model.to_json(), sort_keys=True)
    encoder = _encoder(identity, model, device)
    attributions = class_attributions(store, config, encoder)
    size = (store.layout.height, store.layout.width)
    maps = class_maps(store, list(images), attributions, size=size, device=device)
    maps_array = None
    if maps_path is not None:
        import zarr

        maps_array = zarr.open_array(maps_path, mode="r+")
    n = len(config.classes)
    for k, image in enumerate(images):
        record = store.record(image)
        norm = maps[k]
        allowed = classes_in_prompt(record.prompt, config.classes) if config.prompt_classes_only else [True] * n
        if config.adaptive:
            thresholds = [adaptive_threshold(norm[c], config.sweep) for c in range(n)]
        else:
            thresholds = [config.threshold_of(c) for c in config.classes]
        labels = label_mask(norm, thresholds, allowed)
        rgb = store.image(image)
        if config.crf:
            labels = dense_crf(rgb, np.where(np.asarray(allowed)[:, None, None], norm, 0), labels)
        labels = remove_small_components(labels, config.min_component)
        stem = f"{image:05d}"
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
                    "thresholds": dict(zip(config.classes, thresholds)),
                    "token_files": {c: str(p) for c, p in config.tokens.items()},
                    "ovstore_version": __version__,
                },
            },
            "annotations": voc.rle_annotations(labels, image, n),
        })
    return list(images)


def _check_settings(out: Path, settings: dict[str, Any]) -> None:
    path = out / SETTINGS
    if path.exists():
        existing = json.loads(path.read_text())
        if existing != settings:
            raise InvalidInputError(
                f"{out} holds a labelling with other settings ({path.name}); re-run the same command to "
                "resume it, or choose a new --out"
            )
    else:
        voc.write_json_atomic(path, settings)


def _scheduler(scheduler: Any, workers: int | None) -> tuple[Any, Callable[[], None]]:
    """A Dask client: an existing one, one connected to an address, or a LocalCluster."""
    from distributed import Client, LocalCluster

    if isinstance(scheduler, Client):
        return scheduler, lambda: None
    if isinstance(scheduler, str):
        client = Client(scheduler)
        return client, client.close
    cluster = LocalCluster(n_workers=workers or max(1, (os.cpu_count() or 2)), threads_per_worker=1,
                           processes=True, dashboard_address=None)
    client = Client(cluster)

    def close() -> None:
        client.close()
        cluster.close()

    return client, close


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
) -> LabelResult:
    """Label every complete image of a store (or ``images``) into ``out``.

    Parameters
    ----------
    scheduler
        ``"synchronous"`` runs in this process; ``None`` starts a ``distributed``
        LocalCluster sized to the machine (``workers`` processes, one thread each); a
        string address (``tcp://host:8786``) or a ``distributed.Client`` uses that cluster.
    partition_size
        Images per task: memory is bounded by one partition's maps per worker.
    write_maps
        Also write the normalised float class maps to ``out/maps.zarr`` (image, class, y, x).

    Returns
    -------
    LabelResult
        Images labelled now, images skipped as already finished, and the COCO file.
    """
    opened = store if isinstance(store, Store) else open_store(store)
    out = Path(out)
    chosen = opened.check_images(images)
    paths = _paths(out)
    for p in paths.values():
        p.mkdir(parents=True, exist_ok=True)
    settings = {"store": str(opened.path.resolve()), "config": config.describe(), "model": model}
    _check_settings(out, settings)
    voc.write_labelmap(out / "labelmap.txt", config.classes)
    maps_path = None
    if write_maps:
        import zarr

        maps_path = str(out / "maps.zarr")
        if not (out / "maps.zarr").exists():
            zarr.create_array(maps_path, shape=(opened.n_images, len(config.classes), opened.layout.height,
                                                opened.layout.width),
                              chunks=(1, len(config.classes), opened.layout.height, opened.layout.width),
                              dtype="float16", fill_value=np.nan, dimension_names=("image", "class", "y", "x"),
                              attributes={"classes": list(config.classes)})
    done = {i for i in chosen if (paths["records"] / f"{i:05d}.json").exists()}
    todo = [i for i in chosen if i not in done]
    parts = [todo[k:k + partition_size] for k in range(0, len(todo), partition_size)]
    task = functools.partial(label_partition, str(opened.path), str(out), config, model=model, device=device,
                             maps_path=maps_path)
    if parts:
        if scheduler == "synchronous":
            for part in parts:
                for image in task(part):
                    if progress:
                        progress(image)
        else:
            from distributed import as_completed

            client, close = _scheduler(scheduler, workers)
            try:
                futures = client.map(task, parts, pure=False)
                for future in as_completed(futures):
                    for image in future.result():
                        if progress:
                            progress(image)
            finally:
                close()
    coco = _assemble(out, chosen, config)
    return LabelResult(out=out, labelled=tuple(todo), skipped=tuple(sorted(done)), coco=coco)


def _assemble(out: Path, images: Sequence[int], config: LabelConfig) -> Path:
    """COCO JSON and image lists from the finished images' records."""
    paths = _paths(out)
    coco_images, annotations = [], []
    for image in images:
        record = json.loads((paths["records"] / f"{image:05d}.json").read_text())
        coco_images.append(record["image"])
        for ann in record["annotations"]:
            annotations.append({**ann, "id": len(annotations) + 1})
    coco = {
        "info": {"description": "semantic segmentation labelled by ovstore (OVAM maps)", "version": __version__},
        "licenses": [],
        "images": coco_images,
        "annotations": annotations,
        "categories": [{"id": k + 1, "name": c, "supercategory": "object"} for k, c in enumerate(config.classes)],
    }
    path = out / "annotations.json"
    voc.write_json_atomic(path, coco)
    listing = "\n".join(f"{i:05d}" for i in images) + "\n"
    for name in ("default.txt", "train.txt"):
        (paths["sets"] / name).write_text(listing)
    return path

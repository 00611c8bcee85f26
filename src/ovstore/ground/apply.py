"""Applying a grounding head: probability maps for any class words (seen in training or not), and
a labelled dataset in ``ovstore label``'s layout (VOC tree + COCO RLE JSON), partitioned over
images with Dask as ``label`` is.

Each partition opens the store and the head file by path, encodes the class words once and writes
its images; an image is finished when its record (``records/NNNNN.json``) exists, written last and
atomically, so re-running the same command resumes.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._version import __version__
from ..devices import check_device
from ..errors import InvalidInputError
from ..inputs import check_int
from ..outputs import held_lock, open_output
from ..store import Store, open_store
from .data import ClassText, FeatureReader, Selection
from .headfile import HeadFile, check_head_store, load_head

__all__ = ["GroundResult", "apply_head", "ground_maps", "ground_partition", "head_maps_path", "head_selection",
           "write_head_maps"]

SETTINGS = "ovstore-ground.json"


def head_selection(head: HeadFile, store: Store) -> Selection:
    """The layers, calls and branch the head reads, on ``store`` (checked against it)."""
    check_head_store(head, store)
    branches = list(store.layout.branches)
    return Selection(head.spec.layers, tuple(head.calls), branches.index(head.branch), head.branch)


def _check_classes(classes: Sequence[str]) -> list[str]:
    names = [c.strip() for c in classes if c and c.strip()]
    if not names:
        raise InvalidInputError("no class word; give --classes WORD[,WORD...] (seen in training or not)")
    if len(set(names)) != len(names):
        raise InvalidInputError(f"--classes {','.join(names)} names a class twice; give each once")
    return names


def ground_maps(store: Store | str | Path, head: HeadFile | str | Path, classes: Sequence[str], *,
                images: Sequence[int] | None = None, class_words: Mapping[str, Sequence[str]] | None = None,
                text_encoder: Any | None = None, model: str | None = None, device: str = "cpu",
                cache_bytes: int = 0) -> np.ndarray:
    """Probabilities ``(image, class, H, W)`` float32 in [0, 1]: the head's sigmoid per class word
    (heads trained with ``text="prompt"`` read each class's words in the image's own prompt; the
    head's recorded class words, and ``class_words``, name classes there too).

    Refused on a store of another model, or one without the head's layers, calls or branch."""
    dev = check_device(device)
    store = store if isinstance(store, Store) else open_store(store)
    head = head if isinstance(head, HeadFile) else load_head(head)
    names = _check_classes(classes)
    selection = head_selection(head, store)
    chosen = store.check_images(images)
    if text_encoder is None:
        text_encoder = _encoder(json.dumps(store.layout.model.to_json(), sort_keys=True), model)
    words = {c: list(w) for c, w in head.class_words.items()}
    for c, extra in (class_words or {}).items():
        words[c] = list(dict.fromkeys([*words.get(c, []), *extra]))
    text = ClassText(text_encoder, names, head.template, head.text, words)
    reader = FeatureReader(store, selection, cache_bytes, image=bool(head.spec.image_channels))
    module = head.build(str(dev))
    module.attach_keys(reader.projections())
    out = np.empty((len(chosen), len(names), *head.spec.image_size), dtype=np.float32)
    with torch.no_grad():
        for k, image in enumerate(chosen):
            feats = [torch.from_numpy(f)[None].expand(len(names), *f.shape).to(dev) for f in reader(image)]
            prompt = store.record(image).prompt if head.text == "prompt" else ""
            rows = torch.stack([text.rows(prompt, c) for c in names]).to(dev)
            out[k] = torch.sigmoid(module(feats, rows)).cpu().numpy()
    return out


@functools.lru_cache(maxsize=4)
def _encoder(identity_json: str, model: str | None) -> Any:
    """One text encoder per worker process and model (reused across partitions); checked against
    the recorded one unless ``model`` chooses another."""
    from ..analyze import check_recorded_encoder, load_text_encoder
    from ..store import ModelIdentity

    identity = ModelIdentity.from_json(json.loads(identity_json))
    encoder = load_text_encoder(identity, model=model)
    if model is None:
        check_recorded_encoder(encoder, identity, identity.id)
    return encoder


@functools.lru_cache(maxsize=4)
def _head(path: str, mtime: float) -> HeadFile:
    return load_head(path)


@dataclass(frozen=True)
class GroundResult:
    """Images labelled by this run, those already finished, and the COCO file."""

    out: Path
    labelled: tuple[int, ...]
    skipped: tuple[int, ...]
    coco: Path


def image_labels(probs: np.ndarray, prompt: str, classes: Sequence[str], threshold: float,
                 prompt_classes_only: bool, class_words: Mapping[str, Sequence[str]] | None) -> tuple[np.ndarray,
                                                                                                      list[bool]]:
    """Labels ``(H, W)`` of one image from its probabilities ``(class, H, W)``: the most probable
    allowed class where it passes ``threshold``, else background."""
    from ..label import classes_in_prompt, label_mask

    allowed = (classes_in_prompt(prompt, classes, class_words) if prompt_classes_only else [True] * len(classes))
    return label_mask(probs, [threshold] * len(classes), allowed), allowed


def ground_partition(store_path: str, head_path: str, out: str, classes: Sequence[str], images: Sequence[int], *,
                     threshold: float = 0.5, prompt_classes_only: bool = False,
                     class_words: Mapping[str, Sequence[str]] | None = None, model: str | None = None,
                     device: str = "cpu") -> list[int]:
    """Label ``images`` and write their outputs (runs on a Dask worker, or in-process)."""
    from ..label import rle_annotations, voc_paths, write_jpeg, write_json_atomic, write_label_png

    store = open_store(store_path)
    head = _head(head_path, os.path.getmtime(head_path))
    encoder = _encoder(json.dumps(store.layout.model.to_json(), sort_keys=True), model)
    probs = ground_maps(store, head, classes, images=images, class_words=class_words, text_encoder=encoder,
                        device=device)
    paths = voc_paths(Path(out))
    h, w = head.spec.image_size
    for k, image in enumerate(images):
        stem = f"{image:05d}"
        record = store.record(image)
        rgb = store.image(image)
        labels, allowed = image_labels(probs[k], record.prompt, classes, threshold, prompt_classes_only, class_words)
        write_jpeg(paths["jpeg"] / f"{stem}.jpg", rgb)
        write_label_png(paths["png"] / f"{stem}.png", labels)
        write_json_atomic(paths["records"] / f"{stem}.json", {
            "image": {"id": int(image), "file_name": f"JPEGImages/{stem}.jpg", "height": h, "width": w,
                      "ovstore": {"store": str(store.path), "image_index": int(image), "prompt": record.prompt,
                                  "negative_prompt": record.negative_prompt, "seed": record.seed,
                                  "classes": [c for c, a in zip(classes, allowed) if a], "threshold": threshold,
                                  "head": head_path, "classes_seen": list(head.classes_seen),
                                  "ovstore_version": __version__}},
            "annotations": rle_annotations(labels, image, len(classes)),
        })
    return list(images)


def apply_head(
    store: Store | str | Path,
    head: str | Path,
    classes: Sequence[str],
    out: str | Path,
    *,
    threshold: float | None = None,
    prompt_classes_only: bool = False,
    class_words: Mapping[str, Sequence[str]] | None = None,
    images: Sequence[int] | None = None,
    scheduler: Any = None,
    workers: int | None = None,
    partition_size: int = 8,
    model: str | None = None,
    device: str = "cpu",
    progress: Callable[[int], None] | None = None,
) -> GroundResult:
    """Label a store's images (default: every complete one) with the head's masks for ``classes``
    into ``out`` (``ovstore label``'s layout, so ``ovstore evaluate`` scores it).

    ``scheduler``: ``"synchronous"`` (in-process), ``None`` (a LocalCluster of ``workers``
    processes), a scheduler address or a ``distributed.Client``, as :func:`ovstore.label.label_store`.
    ``prompt_classes_only``: only classes each image's prompt names (by name or ``class_words``).
    ``threshold``: the probability a pixel's class must pass; ``None`` takes the one chosen on the
    head's validation split when it was trained (``validation_threshold``; 0.5 for older heads).
    """
    check_device(device)
    check_int(partition_size, "--partition-size", 1, 1_000_000)
    if workers is not None:
        check_int(workers, "--workers", 1, 4096)
    if threshold is not None and not (0.0 < float(threshold) < 1.0):
        raise InvalidInputError(f"--threshold {threshold}: give a probability between 0 and 1, e.g. 0.5")
    names = _check_classes(classes)
    opened = store if isinstance(store, Store) else open_store(store)
    head_path = Path(head).resolve()
    loaded = load_head(head_path)
    if threshold is None:
        threshold = float(loaded.training.get("validation_threshold", 0.5))
    head_selection(loaded, opened)  # another model's store: refused before anything is written
    target = open_output(out, "ground apply", kind="dir", inputs=[opened.path, head_path], resume=True)
    out = target.path
    chosen = opened.check_images(images)
    connected = None
    if isinstance(scheduler, str) and scheduler != "synchronous":
        from ..label import connect_scheduler

        scheduler = connected = connect_scheduler(scheduler)
    words = {c: list(w) for c, w in (class_words or {}).items()}
    settings = {"store": str(opened.path.resolve()), "head": str(head_path), "classes": names,
                "threshold": float(threshold), "prompt_classes_only": bool(prompt_classes_only), "class_words": words,
                "model": model}
    try:
        out.parent.mkdir(parents=True, exist_ok=True)  # the lock file lies beside out
        with held_lock(out, wait=None, what="labelling"):
            return _apply_locked(opened, out, settings, chosen, scheduler=scheduler, workers=workers,
                                 partition_size=partition_size, device=device, progress=progress)
    finally:
        if connected is not None:
            connected.close()


def _apply_locked(store: Store, out: Path, settings: dict[str, Any], chosen: list[int], *, scheduler: Any,
                  workers: int | None, partition_size: int, device: str,
                  progress: Callable[[int], None] | None) -> GroundResult:
    from ..label import prepare_voc_output

    names = settings["classes"]
    paths = prepare_voc_output(out, "ground apply", SETTINGS, settings, names,
                               other="another head, classes or settings")
    done = [i for i in chosen if (paths["records"] / f"{i:05d}.json").exists()]
    todo = [i for i in chosen if i not in set(done)]
    for image in done if progress else ():
        progress(image)
    task = functools.partial(ground_partition, settings["store"], settings["head"], str(out), names,
                             threshold=settings["threshold"], prompt_classes_only=settings["prompt_classes_only"],
                             class_words=settings["class_words"], model=settings["model"], device=device)
    parts = [todo[k:k + partition_size] for k in range(0, len(todo), partition_size)]
    finished: list[int] = []

    def report(images: list[int]) -> None:
        finished.extend(images)
        for image in images if progress else ():
            progress(image)

    if parts:
        if scheduler == "synchronous":
            for part in parts:
                report(task(part))
        else:
            from distributed import as_completed

            client, close = _client(scheduler, workers)
            try:
                futures = [client.submit(task, part, pure=False) for part in parts]
                for future in as_completed(futures):
                    report(future.result())
            finally:
                close()
    coco = _assemble(out, names)
    return GroundResult(out, tuple(sorted(finished)), tuple(sorted(done)), coco)


def _client(scheduler: Any, workers: int | None) -> tuple[Any, Callable[[], None]]:
    """A Dask client: the one given, or a LocalCluster of one-thread worker processes."""
    from distributed import Client, LocalCluster

    if scheduler is not None:
        return scheduler, lambda: None
    cluster = LocalCluster(n_workers=workers or max(1, os.cpu_count() or 2), threads_per_worker=1, processes=True,
                           dashboard_address=None)
    client = Client(cluster)

    def close() -> None:
        client.close()
        cluster.close()

    return client, close


def _assemble(out: Path, classes: Sequence[str]) -> Path:
    """COCO JSON and image lists from every finished record in ``out``."""
    from ..label import write_coco_from_records

    return write_coco_from_records(out, classes, {
        "description": "semantic segmentation labelled by an ovstore grounding head", "version": __version__})


def head_maps_path(maps_out: str | Path) -> Path:
    """Where ``ovstore maps --head`` writes the head's probability maps: beside ``--out``."""
    maps_out = Path(maps_out)
    return maps_out.with_name(f"{maps_out.stem}.head.npy")


def write_head_maps(store: Store | str | Path, head: str | Path, phrases: Sequence[str], maps_out: str | Path, *,
                    images: Sequence[int] | None = None, model: str | None = None, device: str = "cpu",
                    overwrite: bool = False) -> tuple[Path, tuple[int, ...]]:
    """The head's probability maps of each attribution text (taken as the class phrase in the
    head's template), float32 ``(image, attribution, H, W)``, to :func:`head_maps_path`
    (``ovstore maps --head``). Returns the path and the shape."""
    from ..outputs import open_output

    store = store if isinstance(store, Store) else open_store(store)
    head_path = Path(head)
    loaded = load_head(head_path)
    path = head_maps_path(maps_out)
    target = open_output(path, "maps", kind="file", inputs=[store.path, head_path], overwrite=overwrite)
    probs = ground_maps(store, loaded, phrases, images=images, model=model, device=device)
    with target.writing() as tmp:
        with open(tmp, "wb") as f:
            np.save(f, probs)
    return target.path, tuple(probs.shape)

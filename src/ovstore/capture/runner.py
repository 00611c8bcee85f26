"""Running a pipeline over many prompts and streaming its queries into a store.

The main thread generates; a background thread writes. A bounded queue between them holds
at most one finished batch, so memory stays at about two batches of queries whatever the
number of images.
"""

from __future__ import annotations

import copy
import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InvalidInputError, StoreError
from ..selection import resolve_indices
from ..store.format import ImageRecord, StoreLayout
from ..store.writer import StoreWriter
from .config import CaptureConfig
from .layers import cross_attention_layers
from .recorder import BatchQueries, QueryRecorder

__all__ = ["capture", "plan_capture", "resume", "CaptureResult"]


@dataclass(frozen=True, slots=True)
class CaptureResult:
    """What a capture wrote."""

    store: Path
    images: tuple[int, ...]
    layout: StoreLayout


def _native_size(pipe: Any) -> tuple[int, int]:
    size = pipe.unet.config.sample_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return h * pipe.vae_scale_factor, w * pipe.vae_scale_factor


def _unet_calls(pipe: Any, steps: int) -> int:
    """UNet calls the pipeline will make (PNDM: steps + 1), from a copy of its scheduler."""
    scheduler = copy.deepcopy(pipe.scheduler)
    scheduler.set_timesteps(steps)
    return len(scheduler.timesteps)


def plan_capture(pipe: Any, identity: Any, config: CaptureConfig) -> tuple[StoreLayout, list]:
    """The store layout a capture with ``config`` produces, and the layers to hook."""
    height, width = config.height or _native_size(pipe)[0], config.width or _native_size(pipe)[1]
    factor = pipe.vae_scale_factor
    if height % factor or width % factor:
        raise InvalidInputError(f"--height/--width must be multiples of the VAE factor {factor}")
    lh, lw = height // factor, width // factor
    found = cross_attention_layers(pipe.unet, lh, lw)
    if config.skip_finest:
        found = [(info, module) for info, module in found if info.level > 0] or found
    chosen = set(config.layers.select([(info.name, info.resolution) for info, _ in found]))
    layers = [(info, module) for info, module in found if info.name in chosen]
    n_calls = _unet_calls(pipe, config.num_inference_steps)
    calls = resolve_indices(config.call_spec, n_calls, what="UNet call")
    layout = StoreLayout(
        model=identity, layers=tuple(info for info, _ in layers), height=height, width=width,
        latent_height=lh, latent_width=lw, branches=config.branches, num_unet_calls=n_calls,
        calls=tuple(calls), query_dtype=config.dtype, codec=config.codec,
        extra={"preset": config.preset, "scheduler": type(pipe.scheduler).__name__,
               "scheduler_config": dict(pipe.scheduler.config)},
    )
    return layout, layers


def _key_projections(layers: Sequence) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    out = {}
    for info, module in layers:
        w = module.to_k.weight.detach().float().cpu().numpy()
        b = module.to_k.bias
        out[info.name] = (w, None if b is None else b.detach().float().cpu().numpy())
    return out


class _BackgroundWriter:
    """Writes finished batches from a thread; errors surface in the generating thread."""

    def __init__(self, writer: StoreWriter, on_image: Callable[[int], None] | None) -> None:
        self.writer = writer
        self.on_image = on_image
        self.queue: queue.Queue = queue.Queue(maxsize=1)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="ovstore-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            if self.error is not None:
                continue
            try:
                self._write(*item)
            except BaseException as exc:  # handed to the generating thread
                self.error = exc

    def _write(self, slots: list[int], images: np.ndarray, batch: BatchQueries, labels: tuple) -> None:
        stored_timesteps = [batch.timesteps[c] for c in self.writer.store.layout.calls]
        for k, slot in enumerate(slots):
            queries = {name: t.numpy() for name, t in batch.image_queries(k).items()}
            self.writer.write_image(slot, image=images[k], queries=queries,
                                    timesteps=stored_timesteps, branch_labels=labels)
            self.writer.mark_complete(slot)
            if self.on_image is not None:
                self.on_image(slot)

    def put(self, item: tuple) -> None:
        self.raise_error()
        self.queue.put(item)

    def raise_error(self) -> None:
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()
        self.raise_error()


def capture(
    pipe: Any,
    identity: Any,
    requests: Sequence[ImageRecord],
    out: str | Path,
    *,
    config: CaptureConfig,
    progress: Callable[[int], None] | None = None,
    reserve_only: bool = False,
) -> CaptureResult:
    """Generate one image per request and store its queries, images and records.

    Parameters
    ----------
    pipe, identity
        From :func:`ovstore.capture.load_pipeline`.
    requests
        Per-image prompt, negative prompt, seed (see :func:`build_requests`).
    out
        Store directory; created, or appended to when it exists and matches.
    progress
        Called with each slot once it is complete.
    reserve_only
        Only record the requests (slots stay incomplete); several processes can then
        generate them in parallel with :func:`resume` and ``worker=(k, n)``.

    Returns
    -------
    CaptureResult
        The store path and the slots written.
    """
    layout, layers = plan_capture(pipe, identity, config)
    writer = StoreWriter.open(out, layout)
    writer.write_key_projections(_key_projections(layers))
    slots = writer.reserve(requests)
    if not reserve_only:
        _generate(pipe, layers, writer, list(zip(slots, requests)), config, progress)
    return CaptureResult(store=Path(out), images=tuple(slots), layout=writer.store.layout)


def resume(pipe: Any, identity: Any, out: str | Path, *, config: CaptureConfig,
           progress: Callable[[int], None] | None = None, worker: tuple[int, int] | None = None) -> CaptureResult:
    """Finish every incomplete image of a store from its recorded request.

    With ``worker=(k, n)`` only slots with ``slot % n == k`` are generated, so ``n``
    processes (one per GPU) can finish one store together, writing disjoint slots.
    """
    if worker is not None and not (worker[1] >= 1 and 0 <= worker[0] < worker[1]):
        raise InvalidInputError(f"--worker {worker[0]}/{worker[1]}: write K/N with 0 <= K < N")
    layout, layers = plan_capture(pipe, identity, config)
    writer = StoreWriter.open(out, layout)
    writer.write_key_projections(_key_projections(layers))
    store = writer.store
    todo = [(slot, store.record(slot)) for slot in store.incomplete_images()
            if worker is None or slot % worker[1] == worker[0]]
    for slot, record in todo:
        if (record.guidance, record.num_inference_steps) != (config.guidance, config.num_inference_steps):
            raise InvalidInputError(
                f"image {slot} was requested with guidance {record.guidance} and "
                f"{record.num_inference_steps} steps; resume with --guidance {record.guidance} "
                f"--steps {record.num_inference_steps}"
            )
    _generate(pipe, layers, writer, todo, config, progress)
    return CaptureResult(store=Path(out), images=tuple(s for s, _ in todo), layout=layout)


def _generate(pipe: Any, layers: list, writer: StoreWriter, work: list[tuple[int, ImageRecord]],
              config: CaptureConfig, progress: Callable[[int], None] | None) -> None:
    import torch

    layout = writer.store.layout
    recorder = QueryRecorder(pipe.unet, layers, calls=layout.calls, branches=layout.branches,
                             dtype=layout.query_dtype)
    background = _BackgroundWriter(writer, progress)
    try:
        with recorder:
            for start in range(0, len(work), config.batch_size):
                chunk = work[start:start + config.batch_size]
                recorder.start_batch(len(chunk))
                records = [r for _, r in chunk]
                output = pipe(
                    prompt=[r.prompt for r in records],
                    negative_prompt=[r.negative_prompt for r in records],
                    generator=[torch.Generator("cpu").manual_seed(r.seed) for r in records],
                    num_inference_steps=config.num_inference_steps,
                    guidance_scale=config.guidance,
                    height=layout.height,
                    width=layout.width,
                    output_type="np",
                )
                batch = recorder.result
                if batch.n_calls != layout.num_unet_calls:
                    raise StoreError(
                        f"the pipeline made {batch.n_calls} UNet calls, {layout.num_unet_calls} "
                        "were expected from its scheduler; this scheduler is not supported"
                    )
                images = np.round(np.clip(output.images, 0, 1) * 255).astype(np.uint8)
                background.put(([s for s, _ in chunk], images, batch, recorder.branch_labels))
    except BaseException:
        background.queue.put(None)
        background.thread.join()
        raise
    background.close()

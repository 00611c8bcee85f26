"""Running a pipeline over many prompts and streaming its queries into a store.

The main thread generates; a background thread writes. A bounded queue between them holds
at most one finished batch, so memory stays at about two batches of queries whatever the
number of images.
"""

from __future__ import annotations

import contextlib
import copy
import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InvalidInputError, StoreError, StoreFormatError
from ..inputs import check_memory, check_seed
from ..selection import resolve_indices
from ..store import STATUS_COMPLETE, ContextSpec, ImageRecord, StoreLayout, StoreWriter, open_store
from ..families import ModelFamily, family_for_pipeline
from .config import CaptureConfig, store_settings
from .recorder import BatchQueries, QueryRecorder
from .self_attention import SelfAttentionRecorder, check_self_attention_grids

__all__ = ["capture", "plan_capture", "resume", "CaptureResult", "check_requests", "match_requests"]


@dataclass(frozen=True, slots=True)
class CaptureResult:
    """What a capture wrote."""

    store: Path
    images: tuple[int, ...]
    layout: StoreLayout
    #: Requests given to :func:`resume` that were already complete (skipped).
    already_complete: tuple[int, ...] = ()


def _unet_calls(pipe: Any, steps: int) -> int:
    """UNet calls the pipeline will make per branch (PNDM: steps + 1), from its model family or
    a copy of its scheduler."""
    known = family_for_pipeline(pipe).denoiser_calls(pipe, steps)
    if known is not None:
        return int(known)
    scheduler = copy.deepcopy(pipe.scheduler)
    scheduler.set_timesteps(steps)
    return len(scheduler.timesteps)


def plan_capture(pipe: Any, identity: Any, config: CaptureConfig, *,
                 n_calls: int | None = None) -> tuple[StoreLayout, list]:
    """The store layout a capture with ``config`` produces, and the layers to hook (both as
    the pipeline's model family describes them). ``n_calls``: the denoiser calls per image
    when they are not those of a generation with the config's steps (real images: img2img
    runs only the steps after its strength's timestep)."""
    family = family_for_pipeline(pipe, getattr(identity, "id", ""))
    native = family.native_size(pipe)
    height, width = config.height or native[0], config.width or native[1]
    lh, lw = family.latent_size(pipe, height, width)
    family.check_preset(config.preset)
    found = family.default_layers(family.attention_layers(pipe, lh, lw), config)
    if config.first_blocks:
        # the first blocks only: later blocks' text streams need every block before them
        numerator, denominator = config.first_blocks
        found = found[:-(-len(found) * numerator // denominator)]
    if config.skip_finest:
        # the finest grid among the recorded layers (SD 1.x: the latent; SDXL: latent/2)
        finest = min(info.level for info, _ in found)
        found = [(info, module) for info, module in found if info.level > finest] or found
    if config.thin:
        leaders = set(family.stack_leaders([info for info, _ in found]))
        found = [(info, module) for info, module in found if info.name in leaders]
    chosen = set(config.layers.select([(info.name, info.resolution) for info, _ in found]))
    layers = [(info, module) for info, module in found if info.name in chosen]
    family.check_layers([info for info, _ in found], [info for info, _ in layers])
    options = family_options(family, config)
    if config.self_attention:  # refused here for families without it, before any store exists
        check_self_attention_grids(config.self_attention, family.self_attention_layers(pipe, lh, lw))
    n_calls = _unet_calls(pipe, config.num_inference_steps) if n_calls is None else n_calls
    calls = resolve_indices(config.call_spec, n_calls, what="UNet call")
    layout = StoreLayout(
        model=identity, layers=tuple(info for info, _ in layers), height=height, width=width,
        latent_height=lh, latent_width=lw, branches=family.stored_branches(config), num_unet_calls=n_calls,
        calls=tuple(calls), query_dtype=config.dtype, codec=config.codec,
        extra={"preset": config.preset, "scheduler": type(pipe.scheduler).__name__,
               "scheduler_config": dict(pipe.scheduler.config),
               "num_inference_steps": config.num_inference_steps, "guidance": config.guidance} | options,
        context=_context_spec(pipe, family, config.dtype, options),
        layer_arrays=family.recorded_arrays(config), conditioning=family.conditioning_width(pipe),
        self_attention=tuple(config.self_attention),
    )
    return layout, layers


def family_options(family: ModelFamily, config: CaptureConfig) -> dict[str, Any]:
    """The capture options given for ``family`` (e.g. ``max_sequence_length``), as keyword
    arguments of its pipeline; an option the family has no use for is refused."""
    options = {}
    for name, applies in (("max_sequence_length", "pipelines with a T5 text encoder (SD3, FLUX)"),
                          ("true_cfg_scale", "FLUX pipelines (true classifier-free guidance)")):
        value = getattr(config, name)
        if value is None:
            continue
        if name not in family.capture_options:
            raise InvalidInputError(f"--{name.replace('_', '-')} applies to {applies}; the {family.name} family "
                                    "has none: drop it")
        options[name] = value
    return options


def _context_spec(pipe: Any, family: ModelFamily, dtype: str, options: dict[str, Any] | None = None) -> ContextSpec:
    """Shape of the attended context: the pipeline's padded prompt length and the features
    the denoiser receives (the joined encoders' widths)."""
    per_tokenizer = family.context_tokenizer_ids(pipe, [""], **(options or {}))
    lengths = {len(ids[0]) for ids in per_tokenizer}
    if len(lengths) != 1:
        raise InvalidInputError(f"the pipeline's tokenizers pad prompts to different lengths ({sorted(lengths)}); "
                                "its text encoders' contexts cannot be joined")
    recipe = family.text_recipe(pipe)
    # one id row per tokenizer; a family whose tokenizers' rows form one joined sequence (SD3:
    # CLIP then T5) gives one row, named by no tokenizer
    named = len(per_tokenizer) > 1 or len(recipe.tokenizers) == 1
    return ContextSpec(length=lengths.pop(), features=family.context_width(pipe), dtype=dtype,
                       tokenizers=tuple(recipe.tokenizers[:len(per_tokenizer)]) if named else ())


def _key_projections(pipe: Any, layers: Sequence) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    return family_for_pipeline(pipe).key_parameters(layers)


def _stored_weights(pipe: Any, layers: Sequence) -> dict[str, np.ndarray]:
    return family_for_pipeline(pipe).stored_weights(pipe, layers)


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

    def _write(self, slots: list[int], images: np.ndarray, batch: BatchQueries, labels: tuple,
               copied: Any = None, extras: Sequence[dict[str, Any]] | None = None) -> None:
        if copied is not None:  # the asynchronous device-to-host copies of this batch are done
            copied.synchronize()
        stored_timesteps = [batch.timesteps[c] for c in self.writer.store.layout.calls]
        for k, slot in enumerate(slots):
            queries = {name: t.numpy() for name, t in batch.image_queries(k).items()}
            context = batch.image_context(k) if self.writer.store.layout.context is not None else None
            arrays = {kind: {name: t.numpy() for name, t in per_layer.items()}
                      for kind, per_layer in batch.image_arrays(k).items()}
            conditioning = batch.image_conditioning(k)
            self.writer.write_image(slot, image=images[k], queries=queries,
                                    timesteps=stored_timesteps, branch_labels=labels, context=context,
                                    layer_arrays=arrays,
                                    conditioning=None if conditioning is None else conditioning.numpy(),
                                    self_attention={g: m[k].numpy() for g, m in batch.self_attention.items()},
                                    **(extras[k] if extras else {}))
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


def check_requests(requests: Sequence[ImageRecord], config: CaptureConfig) -> None:
    """Refuse requests whose steps or guidance differ from the config's: the store records
    each request as the recipe of its image, so it must be what the pipeline runs. Seeds
    out of the generator's range are refused here, before a store is created."""
    for i, r in enumerate(requests):
        check_seed(r.seed, f"request {i} ({r.prompt[:40]!r}): seed")
        if (r.num_inference_steps, float(r.guidance)) != (config.num_inference_steps, float(config.guidance)):
            raise InvalidInputError(
                f"request {i} ({r.prompt[:40]!r}) asks for {r.num_inference_steps} steps and guidance {r.guidance}, "
                f"but the capture runs {config.num_inference_steps} steps with guidance {config.guidance}; build the "
                "requests with build_requests(..., num_inference_steps=config.num_inference_steps, "
                "guidance=config.guidance)"
            )


def check_capture_memory(layout: StoreLayout, config: CaptureConfig) -> None:
    """Refuse, before a store is created, a capture whose queries of one batch cannot be held
    in memory (a huge --height/--width, or --batch-size)."""
    check_memory(layout.query_bytes_per_image() * config.batch_size,
                 f"the queries of one batch ({config.batch_size} images of {layout.height}x{layout.width})",
                 "lower --height/--width or --batch-size, or keep fewer layers (--resolution, --preset no-finest)")


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
        Per-image prompt, negative prompt, seed (see :func:`build_requests`); their steps and
        guidance must equal the config's.
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
    check_requests(requests, config)
    family_for_pipeline(pipe, getattr(identity, "id", "")).check_requests(requests, config)
    layout, layers = plan_capture(pipe, identity, config)
    if not reserve_only:
        check_capture_memory(layout, config)
    writer = StoreWriter.open(out, layout, key_projections=_key_projections(pipe, layers),
                              weights=_stored_weights(pipe, layers))
    slots = writer.reserve(requests)
    if not reserve_only:
        _generate(pipe, layers, writer, list(zip(slots, requests)), config, progress)
    return CaptureResult(store=Path(out), images=tuple(slots), layout=writer.store.layout)


def resume(pipe: Any, identity: Any, out: str | Path, *, config: CaptureConfig | None = None,
           requests: Sequence[ImageRecord] | None = None, progress: Callable[[int], None] | None = None,
           worker: tuple[int, int] | None = None, slots: Sequence[int] | None = None) -> CaptureResult:
    """Finish the incomplete images of a store from their recorded requests.

    Settings (size, layers, calls, branches, dtype, codec) come from the store and each image
    is generated with its own recorded steps and guidance; ``config`` only supplies the batch
    size (and every setting when ``requests`` are given and the store does not exist yet).

    With ``requests`` (the prompts of the original command) this is idempotent: requests
    already complete are skipped, recorded incomplete ones are finished, and requests the
    store does not hold yet (the run died before reserving them, or before creating the
    store) are added. Without ``requests`` every incomplete slot is finished; with
    ``worker=(k, n)`` only slots with ``slot % n == k``, so ``n`` processes (one per GPU) can
    finish one store together, writing disjoint slots; with ``slots`` only the incomplete ones
    of those (how the tasks of :func:`~ovstore.capture.capture_on_cluster` share a store).
    """
    if slots is not None and requests is not None:
        raise InvalidInputError("slots finish recorded slots; give slots or requests, not both")
    if worker is not None and not (worker[1] >= 1 and 0 <= worker[0] < worker[1]):
        raise InvalidInputError(f"--worker {worker[0]}/{worker[1]}: write K/N with 0 <= K < N")
    if worker is not None and requests is not None:
        raise InvalidInputError("--worker K/N finishes recorded slots; record the prompts first with "
                                "--reserve-only, then run --resume --worker K/N without prompts")
    out = Path(out)
    if not (out / "zarr.json").is_file():
        if requests is None:
            raise StoreFormatError(
                f"store {out} does not exist, so there is nothing to resume; start the capture without --resume "
                "(or give the original prompts with --resume)"
            )
        if config is None:
            raise InvalidInputError(f"store {out} does not exist; give a CaptureConfig to create it")
        return capture(pipe, identity, requests, out, config=config, progress=progress)
    store = open_store(out)
    todo, new, done = match_requests(store, requests, worker=worker, slots=slots)
    records = store.records()
    if not todo and not new:
        return CaptureResult(store=out, images=(), layout=store.layout, already_complete=tuple(done))
    first = [records[i] for i in todo] or list(new)
    settings = store_settings(store.layout, first)
    if config is not None:
        settings["batch_size"] = config.batch_size
    run_config = CaptureConfig(**settings)
    layout, layers = plan_capture(pipe, identity, run_config)
    check_capture_memory(layout, run_config)
    writer = StoreWriter.open(out, layout, key_projections=_key_projections(pipe, layers),
                              weights=_stored_weights(pipe, layers))
    if new:
        family_for_pipeline(pipe).check_requests(new, run_config)
        for r in new:
            _check_fits(pipe, r, layout)
        todo += writer.reserve(new)
        records = writer.store.records()
    work = [(slot, records[slot]) for slot in todo]
    _generate(pipe, layers, writer, work, run_config, progress)
    return CaptureResult(store=out, images=tuple(todo), layout=writer.store.layout, already_complete=tuple(done))


def match_requests(store: Any, requests: Sequence[ImageRecord] | None, *,
                   worker: tuple[int, int] | None = None,
                   slots: Sequence[int] | None = None) -> tuple[list[int], list[ImageRecord], list[int]]:
    """What :func:`resume` would do: ``(slots to generate, requests to add, slots already
    complete)``. Requests match recorded slots as a multiset (the same request twice needs
    two slots); without requests every incomplete slot (of this worker, or among ``slots``)
    is to be generated."""
    status = store.status()
    records = store.records()
    if requests is None:
        chosen = range(len(records)) if slots is None else sorted({int(i) for i in slots})
        if slots is not None and any(not 0 <= i < len(records) for i in chosen):
            raise InvalidInputError(f"slots {list(chosen)} are not all among the store's {len(records)} slots")
        todo = [i for i in chosen if status[i] != STATUS_COMPLETE
                and (worker is None or i % worker[1] == worker[0])]
        done = [i for i in chosen if status[i] == STATUS_COMPLETE] if slots is not None else []
        return todo, [], done
    complete_of: dict[ImageRecord, list[int]] = {}
    open_of: dict[ImageRecord, list[int]] = {}
    for i, r in enumerate(records):
        (complete_of if status[i] == STATUS_COMPLETE else open_of).setdefault(r, []).append(i)
    todo, new, done = [], [], []
    for r in requests:
        if complete_of.get(r):
            done.append(complete_of[r].pop(0))
        elif open_of.get(r):
            todo.append(open_of[r].pop(0))
        else:
            new.append(r)
    return todo, new, done


def _check_fits(pipe: Any, record: ImageRecord, layout: StoreLayout) -> None:
    """A request can join a store when it makes the store's UNet calls and halves."""
    calls = _unet_calls(pipe, record.num_inference_steps)
    if calls != layout.num_unet_calls:
        raise InvalidInputError(
            f"prompt {record.prompt[:40]!r} asks for {record.num_inference_steps} steps ({calls} UNet calls); "
            f"the store holds {layout.num_unet_calls} calls per image: leave --steps out to use the store's"
        )
    if record.guidance <= 1 and tuple(layout.branches) != ("cond",) \
            and family_for_pipeline(pipe).call_order(layout.extra) is None:
        raise InvalidInputError(
            f"prompt {record.prompt[:40]!r} asks for guidance {record.guidance} (no classifier-free guidance, a "
            f"single half) but the store holds the {','.join(layout.branches)} half: leave --guidance out"
        )


def _generate(pipe: Any, layers: list, writer: StoreWriter, work: list[tuple[int, ImageRecord]],
              config: CaptureConfig, progress: Callable[[int], None] | None) -> None:
    import torch

    layout = writer.store.layout
    family = family_for_pipeline(pipe)
    recorder, attn1 = make_recorders(pipe, layers, layout)
    options = family_options(family, config)
    background = _BackgroundWriter(writer, progress)
    try:
        with recorder, attn1:
            for chunk in _batches(work, config.batch_size):
                records = [r for _, r in chunk]
                recorder.start_batch(len(chunk), context_ids=_context_ids(pipe, family, records, recorder.branches,
                                                                          options))
                if layout.self_attention:
                    attn1.start_batch()
                steps, guidance = records[0].num_inference_steps, records[0].guidance
                if _unet_calls(pipe, steps) != layout.num_unet_calls:
                    raise StoreError(
                        f"image {chunk[0][0]} was requested with {steps} steps, which make "
                        f"{_unet_calls(pipe, steps)} UNet calls; the store holds {layout.num_unet_calls}"
                    )
                output = pipe(
                    **family.pipeline_arguments([r.prompt for r in records], [r.negative_prompt for r in records]),
                    **options,
                    generator=[torch.Generator("cpu").manual_seed(r.seed) for r in records],
                    num_inference_steps=steps,
                    guidance_scale=guidance,
                    height=layout.height,
                    width=layout.width,
                    output_type="np",
                )
                batch = recorder.result
                if layout.self_attention:
                    batch.self_attention = attn1.result()
                batch.timesteps = family.call_timesteps(pipe, batch.timesteps)
                if batch.n_calls != layout.num_unet_calls:
                    raise StoreError(
                        f"the pipeline made {batch.n_calls} UNet calls, {layout.num_unet_calls} "
                        "were expected from its scheduler; this scheduler is not supported"
                    )
                images = np.round(np.clip(output.images, 0, 1) * 255).astype(np.uint8)
                background.put(([s for s, _ in chunk], images, batch, recorder.branch_labels, copied_event(pipe)))
    except BaseException:
        background.queue.put(None)
        background.thread.join()
        raise
    background.close()


def copied_event(pipe: Any) -> Any:
    """On CUDA, an event recorded after the batch's queries were copied to the host with
    ``non_blocking=True``: the writer thread waits for it before reading them. ``None`` on CPU."""
    import torch

    device = getattr(pipe, "device", None)
    if device is None or getattr(device, "type", "") != "cuda":
        return None
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    return event


def make_recorder(pipe: Any, layers: list, layout: StoreLayout) -> QueryRecorder:
    """The recorder of everything ``layout`` keeps of each denoiser call (one for generations
    and real images alike)."""
    family = family_for_pipeline(pipe)
    return QueryRecorder(family.denoiser(pipe), layers, calls=layout.calls, branches=layout.branches,
                         dtype=layout.query_dtype, family=family,
                         context_dtype=layout.context.dtype if layout.context is not None else None,
                         call_order=family.call_order(layout.extra), arrays=layout.layer_arrays)


def make_recorders(pipe: Any, layers: list, layout: StoreLayout) -> tuple[QueryRecorder, Any]:
    """:func:`make_recorder` and, beside it, the ``attn1`` recorder of the self-attention grids
    ``layout`` keeps (a null context when it keeps none); enter both around the denoising."""
    recorder = make_recorder(pipe, layers, layout)
    if not layout.self_attention:
        return recorder, contextlib.nullcontext()
    family = family_for_pipeline(pipe)
    attn1 = SelfAttentionRecorder(recorder, family.self_attention_layers(pipe, layout.latent_height,
                                                                        layout.latent_width), layout.self_attention)
    return recorder, attn1


def _context_ids(pipe: Any, family: ModelFamily, records: Sequence[ImageRecord],
                 branches: Sequence[str], options: dict[str, Any] | None = None) -> np.ndarray:
    """Token ids of each image's attended context per branch and tokenizer ``(image, branch,
    tokenizer, token)``: the negative prompt for ``uncond``, the prompt for ``cond``, as each
    of the pipeline's tokenizers encodes them."""
    texts = {"uncond": [r.negative_prompt or "" for r in records], "cond": [r.prompt for r in records]}
    per_branch = [np.asarray(family.context_tokenizer_ids(pipe, texts[b], **(options or {})),
                             dtype=np.int64).transpose(1, 0, 2)
                  for b in branches]
    return np.stack(per_branch, axis=1)


def _batch_key(r: ImageRecord) -> tuple:
    # images with and without a negative prompt are not mixed: "no negative prompt" must reach
    # the pipeline as None (SDXL's force_zeros_for_empty_prompt), which is one value per batch
    return (r.num_inference_steps, r.guidance, bool(r.negative_prompt))


def _batches(work: list[tuple[int, ImageRecord]], size: int) -> list[list[tuple[int, ImageRecord]]]:
    """Consecutive batches of at most ``size`` images sharing steps, guidance and whether they
    have a negative prompt (each image is generated exactly as its request says)."""
    batches: list[list[tuple[int, ImageRecord]]] = []
    for item in work:
        r = item[1]
        last = batches[-1] if batches else None
        if last and len(last) < size and _batch_key(last[0][1]) == _batch_key(r):
            last.append(item)
        else:
            batches.append([item])
    return batches

"""Everything ``ovstore capture`` does, as one Python API: new store, append or resume.

:func:`prepare_capture` checks the options and the existing store without loading a model;
:meth:`CaptureJob.load` loads the pipeline (the store's recorded model when none is named)
and checks it against the store; :meth:`CaptureJob.run` generates. :func:`run_capture` does
all three. The command line only parses options, calls these and prints.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InvalidInputError, StoreFormatError
from ..families import family_for_pipeline
from ..selection import LayerSelection, parse_resolution
from ..store import ImageRecord, ModelIdentity, Store, StoreLayout, open_store
from .config import CaptureConfig
from .continuation import check_continuation, continued_config, recorded_model
from .pipeline import load_pipeline
from .real_images import (
    RealImageMethod, build_image_requests, capture_real_images, plan_real_capture, read_images_file, real_image_method,
    resume_real_images,
)
from .requests import build_requests, read_prompts_file
from .runner import CaptureResult, capture, match_requests, plan_capture, resume

__all__ = ["CaptureJob", "parse_worker", "prepare_capture", "run_capture"]


def parse_worker(worker: str | tuple[int, int] | None) -> tuple[int, int] | None:
    """``"K/N"`` (or ``(K, N)``) as ``(K, N)`` with ``0 <= K < N``."""
    if worker is None:
        return None
    if isinstance(worker, tuple):
        k, n = worker
        if not (isinstance(k, int) and isinstance(n, int) and 0 <= k < n):
            raise InvalidInputError(f"--worker {worker!r}: write K/N with 0 <= K < N, e.g. 0/4")
        return k, n
    k, sep, n = worker.partition("/")
    if not (sep and k.isdigit() and n.isdigit()) or not int(k) < int(n):
        raise InvalidInputError(f"--worker {worker!r}: write K/N with 0 <= K < N, e.g. 0/4")
    return int(k), int(n)


@dataclass
class CaptureJob:
    """A checked capture, not yet run. ``nothing_to_resume`` is set (and no model is needed)
    when a resume finds every slot it would finish already complete."""

    out: Path
    config: CaptureConfig
    requests: list[ImageRecord] | None
    existing: Store | None
    resume: bool
    reserve_only: bool
    worker: tuple[int, int] | None
    model: str | None
    revision: str | None
    torch_dtype: str
    device: str
    nothing_to_resume: bool = False
    pipe: Any = field(default=None, repr=False)
    identity: ModelIdentity | None = None
    layout: StoreLayout | None = None
    #: real images (``--images-file`` with ``--strength``/``--invert``, or a real-image store resumed)
    real_images: RealImageMethod | None = None

    @property
    def action(self) -> str:
        """What :meth:`run` does to the slots it returns: reserved, finished or stored."""
        return "reserved" if self.reserve_only else ("finished" if self.resume else "stored")

    @property
    def total(self) -> int | None:
        """Images :meth:`run` will report through ``progress``, when known in advance."""
        return len(self.requests) if self.requests is not None and not self.resume else None

    def nothing_message(self) -> str:
        """The line ``ovstore capture`` prints for :attr:`nothing_to_resume`."""
        assert self.existing is not None
        return (f"nothing to resume: {self.out} has no incomplete image"
                + (" among the given prompts" if self.requests is not None else "")
                + f" ({len(self.existing.complete_images())} complete of {self.existing.n_images})")

    def load(self, pipe: Any = None, identity: ModelIdentity | None = None) -> CaptureJob:
        """Load the pipeline (or take ``pipe`` and its ``identity``), plan the layout and check
        that it continues the existing store."""
        if pipe is None:
            model_id, model_revision = self.model, self.revision
            if model_id is None and self.existing is not None:  # the store's recorded model
                model_id, model_revision = recorded_model(self.existing, self.revision)
            pipe, identity = load_pipeline(model_id, torch_dtype=self.torch_dtype, device=self.device,
                                           revision=model_revision)
        elif identity is None:
            raise InvalidInputError("pass the pipeline's identity with pipe (see ovstore.capture.model_identity)")
        if self.real_images is not None:
            layout, _ = plan_real_capture(pipe, identity, self.config, self.real_images)
        else:
            layout, _ = plan_capture(pipe, identity, self.config)
        if self.requests:  # options the pipeline would ignore for these prompts, before any output
            family_for_pipeline(pipe, identity.id).check_requests(self.requests, self.config)
        if self.existing is not None:
            check_continuation(self.existing, layout, resume=self.resume)
        self.pipe, self.identity, self.layout = pipe, identity, layout
        return self

    def run(self, progress: Callable[[int], None] | None = None) -> CaptureResult:
        """Generate (or reserve) the images; loads the pipeline first if :meth:`load` was not called."""
        if self.nothing_to_resume:
            assert self.existing is not None and self.layout is None
            return CaptureResult(store=self.out, images=(), layout=self.existing.layout)
        if self.pipe is None:
            self.load()
        if self.real_images is not None:
            if self.resume and (self.out / "zarr.json").is_file():
                return resume_real_images(self.pipe, self.identity, self.out, config=self.config,
                                          requests=self.requests, progress=progress)
            assert self.requests is not None
            return capture_real_images(self.pipe, self.identity, self.requests, self.out, config=self.config,
                                       method=self.real_images, progress=progress)
        if self.resume:
            return resume(self.pipe, self.identity, self.out, config=self.config, requests=self.requests,
                          progress=progress, worker=self.worker)
        assert self.requests is not None
        return capture(self.pipe, self.identity, self.requests, self.out, config=self.config, progress=progress,
                       reserve_only=self.reserve_only)


def prepare_capture(
    model: str | None = None,
    *,
    prompts: Sequence[str] = (),
    prompts_file: str | Path | None = None,
    out: str | Path = "captures.zarr",
    negative_prompt: str | None = None,
    seed: int = 0,
    steps: int | None = None,
    guidance: float | None = None,
    height: int | None = None,
    width: int | None = None,
    branch: str | None = None,
    dtype: str | None = None,
    layers: Sequence[str] = (),
    resolutions: Sequence[str | int] = (),
    calls: str | None = None,
    preset: str | None = None,
    batch_size: int = 1,
    codec: str | None = None,
    device: str = "cpu",
    torch_dtype: str | None = None,
    revision: str | None = None,
    resume: bool = False,
    reserve_only: bool = False,
    worker: str | tuple[int, int] | None = None,
    max_sequence_length: int | None = None,
    true_cfg_scale: float | None = None,
    single_blocks: bool = False,
    images_file: str | Path | None = None,
    strength: float | None = None,
    invert: bool = False,
    inversion_guidance: float | None = None,
    resize: str | None = None,
    convert_rgb: bool = False,
    self_attention: str | None = None,
    image_outputs: bool = False,
) -> CaptureJob:
    """Check the options of ``ovstore capture`` (same names, same defaults) against each other
    and against the store at ``out``, without loading a model.

    Settings left ``None`` are the store's when ``out`` exists, else the defaults; a store at
    ``out`` is appended to, or with ``resume`` its incomplete slots are finished (those of
    ``prompts`` when given; ``worker`` K/N takes slots with ``slot % N == K``).

    ``images_file`` (JSON lines ``{"image": ..., "prompt": ...}``) captures real images instead
    of generations, with ``strength`` (img2img) or ``invert`` (DDIM inversion; its
    ``inversion_guidance`` default 1, and ``guidance`` default 1 for a new store):
    :mod:`ovstore.capture.real_images`. ``resize`` (``"WxH"`` or ``"native"``) and
    ``convert_rgb`` (alpha composited on white) apply to the source images.
    """
    out = Path(out)
    if resume and reserve_only:
        raise InvalidInputError("--reserve-only records new prompts; it cannot be combined with --resume")
    if worker is not None and not resume:
        raise InvalidInputError("--worker K/N splits the work of --resume; add --resume")
    worker_split = parse_worker(worker)
    real_given = [name for name, value in (("--strength", strength is not None), ("--invert", invert),
                                           ("--inversion-guidance", inversion_guidance is not None),
                                           ("--resize", resize is not None), ("--convert-rgb", convert_rgb)) if value]
    if images_file is not None:
        if prompts or prompts_file is not None:
            raise InvalidInputError("--images-file captures real images, --prompt/--prompts-file generations; give one "
                                    "of them (a store holds one kind)")
        for name, value in (("--height", height), ("--width", width)):
            if value is not None:
                raise InvalidInputError(f"{name} does not apply to real images (a store takes their size); pass "
                                        "--resize WxH or --resize native")
        if reserve_only or worker is not None:
            raise InvalidInputError("--reserve-only and --worker are not supported with --images-file; capture, "
                                    "then finish an interrupted run with --resume")
        method: RealImageMethod | None = real_image_method(strength, invert, inversion_guidance)
    elif real_given:
        raise InvalidInputError(f"{', '.join(real_given)} apply to real images; add --images-file F.jsonl")
    else:
        method = None
    specs = [(p, None, None) for p in prompts]
    if prompts_file is not None:
        specs += read_prompts_file(prompts_file)
    if worker is not None and specs:
        raise InvalidInputError("--worker K/N finishes the recorded slots; record the prompts first with "
                                "--reserve-only, then run --resume --worker K/N without prompts")
    if not resume and not specs and images_file is None:
        raise InvalidInputError("no prompt given; pass --prompt TEXT (repeatable) or --prompts-file FILE")
    if out.exists() and not out.is_dir():
        raise InvalidInputError(f"--out {out} is a file; give a store directory (a new one, or a store to append to)")
    existing = None
    if (out / "zarr.json").is_file():
        existing = open_store(out)
    elif out.is_dir() and any(p.name != ".ovstore.lock" for p in out.iterdir()):
        raise InvalidInputError(f"--out {out} is a directory that is not an ovstore store; choose a new --out")
    if existing is not None and existing.is_real_images:
        if specs:
            raise InvalidInputError(f"store {out} holds real images; add images with --images-file, or capture "
                                    "generations into another --out")
        if worker is not None or reserve_only:
            raise InvalidInputError("--reserve-only and --worker are not supported for real-image stores; finish "
                                    "an interrupted run with --resume")
        if method is None:  # --resume --out STORE: the store's method
            from ..store import REAL_IMAGES

            method = RealImageMethod.from_json(existing.layout.extra[REAL_IMAGES])
    elif existing is not None and images_file is not None:
        raise InvalidInputError(f"store {out} holds generations; capture real images into a new --out")
    if resume and existing is None and not specs and images_file is None:
        raise StoreFormatError(f"store {out} does not exist, so there is nothing to resume; start the capture "
                               "without --resume (or give the original prompts with --resume)")

    given = dict(num_inference_steps=steps, guidance=guidance, height=height, width=width, branch=branch,
                 dtype=dtype, codec=codec, calls=calls, max_sequence_length=max_sequence_length,
                 true_cfg_scale=true_cfg_scale, self_attention=self_attention or None)
    selection = LayerSelection(patterns=tuple(layers), include_mid=True,
                               resolutions=tuple(parse_resolution(r) for r in resolutions))
    if single_blocks:
        given["single_blocks"] = True
    if method is not None and method.method == "invert" and existing is None and guidance is None:
        given["guidance"] = 1.0  # regenerating with guidance leaves the inverted trajectory (docs)
    if image_outputs:
        given["image_outputs"] = True
    config = continued_config(existing, given, layers=selection,
                              layers_given=bool(layers or resolutions or single_blocks), preset=preset,
                              batch_size=batch_size)
    requests = build_requests(specs, seed=seed, negative_prompt=negative_prompt, guidance=config.guidance,
                              num_inference_steps=config.num_inference_steps) if specs else None
    if images_file is not None:
        assert method is not None
        checked = build_image_requests(
            read_images_file(images_file), method, seed=seed, negative_prompt=negative_prompt,
            guidance=config.guidance, num_inference_steps=config.num_inference_steps, resize=resize,
            convert_rgb=convert_rgb, images_file=images_file,
            store_size=(existing.layout.height, existing.layout.width) if existing is not None else None)
        requests = checked.records
        if existing is None and checked.size is not None:
            config = dataclasses.replace(config, height=checked.size[0], width=checked.size[1])
    nothing = False
    if resume and existing is not None:
        todo, new, _ = match_requests(existing, requests, worker=worker_split)
        nothing = not todo and not new
    if torch_dtype is None:
        torch_dtype = existing.layout.model.torch_dtype if existing is not None else "float32"
    return CaptureJob(out=out, config=config, requests=requests, existing=existing, resume=resume,
                      reserve_only=reserve_only, worker=worker_split, model=model, revision=revision,
                      torch_dtype=torch_dtype, device=device, nothing_to_resume=nothing, real_images=method)


def run_capture(model: str | None = None, *, pipe: Any = None, identity: ModelIdentity | None = None,
                progress: Callable[[int], None] | None = None, **options: Any) -> CaptureResult:
    """``ovstore capture`` in one call: :func:`prepare_capture` with ``options``, then load
    (``pipe``/``identity`` instead of loading ``model``) and run. A resume with nothing left
    returns a result with no images, before any model is loaded."""
    job = prepare_capture(model, **options)
    if job.nothing_to_resume:
        return job.run()
    return job.load(pipe, identity).run(progress)

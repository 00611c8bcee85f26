"""Real images into the store: capture the denoiser's queries while it reconstructs a given image.

Two methods, as the field does it:

* ``strength`` (img2img, as diffusers' ``StableDiffusionImg2ImgPipeline`` /
  ``StableDiffusionXLImg2ImgPipeline``): the image is encoded with the VAE, noised to the
  timestep of strength ``S`` and denoised for the remaining ``int(steps * S)`` steps; those calls
  are recorded;
* ``invert`` (DDIM inversion): the encoded image (the mean of the VAE posterior) is run
  backwards to noise with ``DDIMInverseScheduler`` and the prompt (guidance 1 by default: with
  classifier-free guidance the inverted trajectory does not lead back to the image), then
  regenerated with DDIM from that latent; the regeneration's calls are recorded.

Each request is one line of an images file, ``{"image": "a.png", "prompt": "..."}``; the store
records per image the source's path and SHA-256, the method and its parameters (the slot's
``source`` record, written when it is reserved, so a resume reruns exactly that), the decoded
reconstruction and its error against the source (PSNR, mean absolute error). ``images`` holds
the source (resized as asked), so maps, labels and their VOC/COCO output show the real image.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InvalidInputError, StoreFormatError
from ..families import family_for_pipeline
from ..inputs import check_float, read_lines
from ..store import REAL_IMAGES, ImageRecord, StoreLayout, StoreWriter, open_store
from .config import CaptureConfig, store_settings
from .requests import line_options
from .runner import (
    CaptureResult, _BackgroundWriter, _batches, _context_ids, _key_projections, _stored_weights, check_capture_memory,
    check_requests, copied_event, family_options, make_recorders, match_requests, plan_capture,
)

__all__ = [
    "RealImageMethod", "ImageLine", "read_images_file", "parse_resize", "build_image_requests", "ImageRequests",
    "plan_real_capture", "capture_real_images", "resume_real_images", "reconstruction_error", "load_source",
    "source_record", "real_image_method",
]

METHODS = ("strength", "invert")
#: ``Image.mode`` values ``--convert-rgb`` converts (alpha is composited on white); 16-bit and
#: float images are refused either way (their conversion to 8 bits is not one obvious rule).
_CONVERTIBLE = ("L", "LA", "P", "PA", "RGBA", "RGBa", "La", "CMYK", "YCbCr", "LAB", "HSV", "1")
_KEYS = ("image", "prompt", "negative_prompt", "seed")


@dataclass(frozen=True, slots=True)
class RealImageMethod:
    """How real images are brought into the denoiser: ``strength`` (img2img) or ``invert``."""

    method: str
    strength: float | None = None
    inversion_guidance: float = 1.0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise InvalidInputError(f"real-image method {self.method!r} is not one of {', '.join(METHODS)}")
        if self.method == "strength":
            check_float(self.strength, "--strength", 0.0, 1.0, low_open=True)
        else:
            if self.strength is not None:
                raise InvalidInputError("--strength and --invert are two methods; give one of them")
            check_float(self.inversion_guidance, "--inversion-guidance", 0.0)

    def to_json(self) -> dict[str, Any]:
        if self.method == "strength":
            return {"method": "strength", "strength": float(self.strength)}  # type: ignore[arg-type]
        return {"method": "invert", "inversion_guidance": float(self.inversion_guidance),
                "inverse_scheduler": "DDIMInverseScheduler", "scheduler": "DDIMScheduler"}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RealImageMethod:
        if data.get("method") == "strength":
            return cls("strength", strength=float(data["strength"]))
        return cls("invert", inversion_guidance=float(data.get("inversion_guidance", 1.0)))

    def scheduler(self, pipe: Any) -> Any:
        """A fresh copy of the scheduler whose timesteps the recorded calls run."""
        if self.method == "invert":
            from diffusers import DDIMScheduler

            return DDIMScheduler.from_config(pipe.scheduler.config)
        return copy.deepcopy(pipe.scheduler)

    def denoiser_calls(self, pipe: Any, steps: int) -> int:
        """Denoiser calls per branch the recorded pass makes: img2img's ``get_timesteps``
        (``int(steps * strength)`` steps, times the scheduler's order), or every DDIM step."""
        scheduler = self.scheduler(pipe)
        scheduler.set_timesteps(steps)
        if self.method == "invert":
            return len(scheduler.timesteps)
        init = min(int(steps * self.strength), steps)  # type: ignore[operator]
        if init < 1:
            raise InvalidInputError(
                f"--strength {self.strength:g} with --steps {steps} runs no denoising step (int({steps} x "
                f"{self.strength:g}) = 0); raise --strength or --steps")
        start = max(steps - init, 0)
        return len(scheduler.timesteps[start * getattr(scheduler, "order", 1):])


def real_image_method(strength: float | None, invert: bool, inversion_guidance: float | None = None) -> RealImageMethod:
    """The method of ``--strength S`` / ``--invert`` (exactly one of them)."""
    if strength is not None and invert:
        raise InvalidInputError("--strength and --invert are two methods of bringing in real images; give one")
    if strength is None and not invert:
        raise InvalidInputError("--images-file needs a method: --strength S (img2img: noise to strength S in (0, 1], "
                                "denoise the rest) or --invert (DDIM inversion, then regeneration)")
    if strength is not None:
        if inversion_guidance is not None:
            raise InvalidInputError("--inversion-guidance applies to --invert; drop it")
        return RealImageMethod("strength", strength=strength)
    return RealImageMethod("invert", inversion_guidance=1.0 if inversion_guidance is None else inversion_guidance)


# ------------------------------------------------------------------ the images file
@dataclass(frozen=True, slots=True)
class ImageLine:
    """One request of an images file: the source (resolved against the file's folder)."""

    number: int
    image: Path
    prompt: str
    negative_prompt: str | None = None
    seed: int | None = None


def read_images_file(path: str | Path) -> list[ImageLine]:
    """The requests of a JSON-lines images file, ``{"image": "a.png", "prompt": "..."}`` per line
    (optional ``negative_prompt``, ``seed``); image paths are relative to the file's folder.
    Blank lines and ``#`` comments are skipped; a repeated line is an error naming both lines."""
    path = Path(path)
    lines = []
    seen: dict[tuple, int] = {}
    for line in read_lines(path, "--images-file"):
        where = f"--images-file {path}, line {line.number}"
        try:
            obj = json.loads(line.text)
        except json.JSONDecodeError as exc:
            raise InvalidInputError(f"{where}: invalid JSON ({exc.msg}); write "
                                    "{\"image\": \"path.png\", \"prompt\": \"caption\"}") from None
        if not isinstance(obj, dict):
            raise InvalidInputError(f"{where}: expected a JSON object {{\"image\": \"path.png\", \"prompt\": ...}}")
        unknown = set(obj) - set(_KEYS)
        if unknown:
            raise InvalidInputError(f"{where}: unknown keys {sorted(unknown)}; allowed: {', '.join(_KEYS)}")
        image = obj.get("image")
        if not isinstance(image, str) or not image.strip():
            raise InvalidInputError(f"{where}: \"image\" must name an image file (a path relative to the "
                                    "file's folder)")
        prompt = obj.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise InvalidInputError(f"{where}: \"prompt\" is missing or empty; give every image its caption "
                                    "(what the image shows)")
        negative, seed = line_options(obj, where)
        source = (path.parent / image).expanduser().resolve()
        key = (str(source), prompt, negative, seed)
        if key in seen:
            raise InvalidInputError(f"{where} repeats line {seen[key]} (the same image and prompt); remove it, or "
                                    "give the lines different seeds")
        seen[key] = line.number
        lines.append(ImageLine(line.number, source, prompt, negative, seed))
    if not lines:
        raise InvalidInputError(f"--images-file {path} has no image; write one JSON object per line, "
                                "{\"image\": \"path.png\", \"prompt\": \"caption\"}")
    return lines


def parse_resize(value: str | tuple[int, int] | None) -> str | tuple[int, int] | None:
    """``--resize``: ``"native"`` (the pipeline's size), ``"WxH"`` as ``(W, H)``, or ``None``."""
    if value is None or value == "native":
        return value
    if isinstance(value, tuple):
        w, h = value
    else:
        w_text, sep, h_text = str(value).lower().partition("x")
        if not (sep and w_text.isdigit() and h_text.isdigit()):
            raise InvalidInputError(f"--resize {value!r}: write WxH (e.g. 512x512) or native")
        w, h = int(w_text), int(h_text)
    for side in (w, h):
        if not 8 <= side <= 8192 or side % 8:
            raise InvalidInputError(f"--resize {w}x{h}: both sides must be multiples of 8 between 8 and 8192 "
                                    f"(the VAE's sizes), e.g. {_nearest(w)}x{_nearest(h)}")
    return (w, h)


def _nearest(side: int) -> int:
    return max(8, int(round(side / 8)) * 8)


def _canonical(data: dict[str, Any]) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _open(path: Path, where: str) -> Any:
    from PIL import Image, UnidentifiedImageError

    if not path.exists():
        raise InvalidInputError(f"{where}: image {path} does not exist; check the path (relative to the images "
                                "file's folder)")
    if path.is_dir():
        raise InvalidInputError(f"{where}: image {path} is a directory; name an image file")
    try:
        image = Image.open(path)
        image.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise InvalidInputError(f"{where}: image {path} cannot be read ({type(exc).__name__}: "
                                f"{str(exc)[:80]}); pass a PNG or JPEG file") from None
    return image


def _to_rgb(image: Any, convert: bool, where: str) -> Any:
    from PIL import Image

    if image.mode == "RGB":
        return image
    if image.mode not in _CONVERTIBLE:
        raise InvalidInputError(f"{where}: image is {image.mode} (more than 8 bits per channel); save it as 8-bit "
                                "RGB")
    if not convert:
        raise InvalidInputError(
            f"{where}: image is {image.mode}, not RGB; convert it (e.g. PIL: Image.open(f).convert('RGB')) or pass "
            "--convert-rgb (alpha is composited on white)")
    if "A" in image.mode or "a" in image.mode or image.mode in ("P", "PA") and "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def source_record(line: ImageLine, method: RealImageMethod, *, resize: str | tuple[int, int] | None,
                  convert_rgb: bool, where: str = "") -> tuple[str, tuple[int, int]]:
    """The slot's ``source`` record (canonical JSON) of a checked, readable source, and its size
    ``(height, width)`` in the file."""
    where = where or str(line.image)
    opened = _open(line.image, where)
    mode = opened.mode
    image = _to_rgb(opened, convert_rgb, where)
    record = {"path": str(line.image), "sha256": _sha256(line.image), **method.to_json(),
              "resize": None if resize is None else (resize if isinstance(resize, str) else f"{resize[0]}x{resize[1]}"),
              "convert_rgb": bool(convert_rgb), "mode": mode}
    return _canonical(record), (image.height, image.width)


@dataclass(frozen=True, slots=True)
class ImageRequests:
    """Checked requests of an images file and the size the store takes them at
    (``None``: the pipeline's native size, ``--resize native``)."""

    records: list[ImageRecord]
    size: tuple[int, int] | None


def build_image_requests(lines: Sequence[ImageLine], method: RealImageMethod, *, seed: int = 0,
                         negative_prompt: str | None = None, guidance: float = 7.5, num_inference_steps: int = 50,
                         resize: str | tuple[int, int] | None = None, convert_rgb: bool = False,
                         store_size: tuple[int, int] | None = None, images_file: str | Path = "") -> ImageRequests:
    """One :class:`ImageRecord` per line (seed ``seed + i`` unless the line names one), every
    source read and checked first: readable, RGB (or ``convert_rgb``), and, without ``resize``,
    one size whose sides are multiples of 8 (the VAE's), equal to ``store_size`` when appending."""
    from .requests import build_requests

    resize = parse_resize(resize)
    records = build_requests([(l.prompt, l.negative_prompt, l.seed) for l in lines], seed=seed,
                             negative_prompt=negative_prompt, guidance=guidance,
                             num_inference_steps=num_inference_steps)
    out, sizes = [], {}
    for line, record in zip(lines, records):
        where = f"--images-file {images_file}, line {line.number}" if images_file else str(line.image)
        source, size = source_record(line, method, resize=resize, convert_rgb=convert_rgb, where=where)
        sizes.setdefault(size, (line, where))
        out.append(ImageRecord(prompt=record.prompt, negative_prompt=record.negative_prompt, seed=record.seed,
                               guidance=record.guidance, num_inference_steps=record.num_inference_steps,
                               source=source))
    if isinstance(resize, tuple):
        if store_size is not None and (resize[1], resize[0]) != tuple(store_size):
            raise InvalidInputError(f"--resize {resize[0]}x{resize[1]}: the store at --out holds {store_size[1]}x"
                                    f"{store_size[0]}; pass --resize {store_size[1]}x{store_size[0]}, or capture "
                                    "into a new --out")
        return ImageRequests(out, (resize[1], resize[0]))
    if resize == "native":
        return ImageRequests(out, store_size)
    if len(sizes) > 1:
        (a, (la, _)), (b, (lb, _)) = list(sizes.items())[:2]
        raise InvalidInputError(
            f"the images have different sizes ({la.image.name}: {a[1]}x{a[0]}, {lb.image.name}: {b[1]}x{b[0]}); a "
            "store holds one size: pass --resize WxH (e.g. 512x512) or --resize native")
    ((h, w), (line, where)), = sizes.items()
    if h % 8 or w % 8:
        raise InvalidInputError(
            f"{where}: image {line.image.name} is {w}x{h}; the VAE takes sizes whose sides are multiples of 8 "
            f"(e.g. {_nearest(w)}x{_nearest(h)}): pass --resize {_nearest(w)}x{_nearest(h)} or --resize native")
    if store_size is not None and (h, w) != tuple(store_size):
        raise InvalidInputError(
            f"the images are {w}x{h}, the store at --out holds {store_size[1]}x{store_size[0]}; pass --resize "
            f"{store_size[1]}x{store_size[0]}, or capture into a new --out")
    return ImageRequests(out, (h, w))


def load_source(record: ImageRecord, height: int, width: int) -> np.ndarray:
    """The source of a real-image request as the store takes it: uint8 ``(height, width, 3)``,
    checked against its recorded SHA-256, converted and resized as recorded."""
    from PIL import Image

    source = json.loads(record.source)
    path = Path(source["path"])
    where = f"source image {path}"
    if not path.is_file():
        raise InvalidInputError(f"{where} no longer exists; put it back (the store records its path and SHA-256) "
                                "and resume")
    if _sha256(path) != source["sha256"]:
        raise InvalidInputError(f"{where} has changed since it was recorded (SHA-256 {source['sha256'][:12]}...); "
                                "put the original back, or capture the new one into another --out")
    image = _to_rgb(_open(path, where), bool(source.get("convert_rgb")), where)
    if source.get("resize") is not None and image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.BICUBIC)
    if image.size != (width, height):
        raise InvalidInputError(f"{where} is {image.width}x{image.height}, the store holds {width}x{height}; "
                                "capture it with --resize")
    return np.asarray(image, dtype=np.uint8)


def reconstruction_error(reconstruction: np.ndarray, source: np.ndarray) -> tuple[float, float]:
    """``(PSNR in dB, mean absolute error)`` of uint8 images compared in [0, 1] RGB (PSNR is
    ``inf`` for identical images)."""
    diff = reconstruction.astype(np.float64) / 255 - source.astype(np.float64) / 255
    mse = float(np.mean(diff ** 2))
    return (math.inf if mse == 0 else 10 * math.log10(1 / mse)), float(np.mean(np.abs(diff)))


# ------------------------------------------------------------------ capture
def plan_real_capture(pipe: Any, identity: Any, config: CaptureConfig,
                      method: RealImageMethod) -> tuple[StoreLayout, list]:
    """The layout of a real-image capture: the recorded pass's calls (img2img: only those after
    the strength's timestep), its scheduler, and the method in ``extra["real_images"]``."""
    import dataclasses

    family = family_for_pipeline(pipe, getattr(identity, "id", ""))
    family.image_to_image(pipe)  # refuses families without real-image support, before anything else
    n_calls = method.denoiser_calls(pipe, config.num_inference_steps)
    layout, layers = plan_capture(pipe, identity, config, n_calls=n_calls)
    factor = int(getattr(pipe, "vae_scale_factor", 8))
    if layout.height % factor or layout.width % factor:
        raise InvalidInputError(f"the images are {layout.width}x{layout.height}; this pipeline's VAE takes sizes "
                                f"whose sides are multiples of {factor}: pass --resize WxH or --resize native")
    scheduler = method.scheduler(pipe)
    extra = dict(layout.extra) | {"scheduler": type(scheduler).__name__, "scheduler_config": dict(scheduler.config),
                                  REAL_IMAGES: method.to_json()}
    return dataclasses.replace(layout, extra=extra), layers


def capture_real_images(pipe: Any, identity: Any, requests: Sequence[ImageRecord], out: str | Path, *,
                        config: CaptureConfig, method: RealImageMethod,
                        progress: Callable[[int], None] | None = None) -> CaptureResult:
    """Capture real images (requests from :func:`build_image_requests`) into ``out`` (created,
    or appended to when it is a real-image store of the same method and settings)."""
    check_requests(requests, config)
    if any(not r.source for r in requests):
        raise InvalidInputError("every real-image request needs its source record; build them with "
                                "build_image_requests")
    layout, layers = plan_real_capture(pipe, identity, config, method)
    check_capture_memory(layout, config)
    writer = StoreWriter.open(out, layout, key_projections=_key_projections(pipe, layers),
                              weights=_stored_weights(pipe, layers))
    slots = writer.reserve(requests)
    _generate(pipe, layers, writer, list(zip(slots, requests)), config, method, progress)
    return CaptureResult(store=Path(out), images=tuple(slots), layout=writer.store.layout)


def resume_real_images(pipe: Any, identity: Any, out: str | Path, *, config: CaptureConfig | None = None,
                       requests: Sequence[ImageRecord] | None = None,
                       progress: Callable[[int], None] | None = None) -> CaptureResult:
    """Finish a real-image store's incomplete images from their recorded sources (the files
    must still be there, unchanged); with ``requests`` also add those it does not hold."""
    out = Path(out)
    if not (out / "zarr.json").is_file():
        raise StoreFormatError(f"store {out} does not exist, so there is nothing to resume; start the capture "
                               "without --resume")
    store = open_store(out)
    if not store.is_real_images:
        raise InvalidInputError(f"store {out} holds generations; resume it without --images-file")
    method = RealImageMethod.from_json(store.layout.extra[REAL_IMAGES])
    todo, new, done = match_requests(store, requests)
    if not todo and not new:
        return CaptureResult(store=out, images=(), layout=store.layout, already_complete=tuple(done))
    records = store.records()
    settings = store_settings(store.layout, [records[i] for i in todo] or list(new))
    settings["calls"] = None if tuple(store.layout.calls) == tuple(range(store.layout.num_unet_calls)) \
        else tuple(str(c) for c in store.layout.calls)
    if config is not None:
        settings["batch_size"] = config.batch_size
    run_config = CaptureConfig(**settings)
    layout, layers = plan_real_capture(pipe, identity, run_config, method)
    diffs = store.layout.differences(layout)
    if diffs:
        from ..errors import IncompatibleStoreError

        raise IncompatibleStoreError(f"cannot resume {out}: " + "; ".join(diffs))
    writer = StoreWriter.open(out, layout, key_projections=_key_projections(pipe, layers),
                              weights=_stored_weights(pipe, layers))
    if new:
        todo += writer.reserve(new)
        records = writer.store.records()
    _generate(pipe, layers, writer, [(slot, records[slot]) for slot in todo], run_config, method, progress)
    return CaptureResult(store=out, images=tuple(todo), layout=writer.store.layout, already_complete=tuple(done))


def _generate(pipe: Any, layers: list, writer: StoreWriter, work: list[tuple[int, ImageRecord]],
              config: CaptureConfig, method: RealImageMethod, progress: Callable[[int], None] | None) -> None:
    import torch
    from PIL import Image

    from ..errors import StoreError

    layout = writer.store.layout
    family = family_for_pipeline(pipe)
    recorder, attn1 = make_recorders(pipe, layers, layout)
    options = family_options(family, config)
    if method.method == "strength":
        img2img, (inverse, regenerate) = family.image_to_image(pipe), (None, None)
    else:
        img2img, (inverse, regenerate) = None, family.inversion_pipelines(pipe)
    background = _BackgroundWriter(writer, progress)
    try:
        for chunk in _batches(work, config.batch_size):
            records = [r for _, r in chunk]
            sources = np.stack([load_source(r, layout.height, layout.width) for r in records])
            steps, guidance = records[0].num_inference_steps, records[0].guidance
            prompts = family.pipeline_arguments([r.prompt for r in records], [r.negative_prompt for r in records])
            generators = [torch.Generator("cpu").manual_seed(r.seed) for r in records]
            if method.method == "invert":  # outside the recorder: the inversion's calls are not stored
                latents = family.encode_images(pipe, sources)
                with torch.no_grad():
                    noise = inverse(**prompts, **options, latents=latents, num_inference_steps=steps,
                                    guidance_scale=method.inversion_guidance, height=layout.height,
                                    width=layout.width, output_type="latent").images
                run = lambda: regenerate(**prompts, **options, latents=noise, generator=generators,  # noqa: E731
                                         num_inference_steps=steps, guidance_scale=guidance, height=layout.height,
                                         width=layout.width, output_type="np")
            else:
                run = lambda: img2img(**prompts, **options, image=[Image.fromarray(s) for s in sources],  # noqa: E731
                                      strength=method.strength, num_inference_steps=steps, guidance_scale=guidance,
                                      generator=generators, output_type="np")
            with recorder, attn1:
                recorder.start_batch(len(chunk), context_ids=_context_ids(pipe, family, records, recorder.branches,
                                                                          options))
                if layout.self_attention:
                    attn1.start_batch()
                output = run()
            batch = recorder.result
            if layout.self_attention:
                batch.self_attention = attn1.result()
            batch.timesteps = family.call_timesteps(pipe, batch.timesteps)
            if batch.n_calls != layout.num_unet_calls:
                raise StoreError(f"the pipeline made {batch.n_calls} denoiser calls, {layout.num_unet_calls} were "
                                 "expected from its scheduler and the method; this scheduler is not supported")
            decoded = np.round(np.clip(output.images, 0, 1) * 255).astype(np.uint8)
            extras = [{"reconstruction": (decoded[k], *reconstruction_error(decoded[k], sources[k]))}
                      for k in range(len(chunk))]
            background.put(([s for s, _ in chunk], sources, batch, recorder.branch_labels, copied_event(pipe), extras))
    except BaseException:
        background.queue.put(None)
        background.thread.join()
        raise
    background.close()

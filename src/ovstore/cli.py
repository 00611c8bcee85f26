"""The ``ovstore`` command line: capture once, analyse forever.

Each command parses its options, builds a config and calls one library function; errors
that ovstore raises on purpose are printed as one line with a non-zero exit status.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from .errors import OvstoreError, InvalidInputError

app = typer.Typer(
    name="ovstore",
    help=(
        "Open-vocabulary attention maps (OVAM) from stored diffusion captures.\n\n"
        "1. ovstore capture [MODEL] --prompt 'a cat on a sofa' --out caps.zarr   (runs the pipeline once)\n\n"
        "2. ovstore maps caps.zarr --attribution 'a cat and a sofa' --out maps.npy --png overlays/\n\n"
        "Analysis never re-runs diffusion: any words, years later, from the store alone."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True, soft_wrap=True)


def _quiet_libraries() -> None:
    """Keep library chatter (download progress, deprecations) out of the user's terminal."""
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="transformers")
    try:
        import diffusers.utils.logging as dlog
        import transformers.utils.logging as tlog

        dlog.set_verbosity_error()
        dlog.disable_progress_bar()
        tlog.set_verbosity_error()
        tlog.disable_progress_bar()
    except Exception:  # pragma: no cover - logging helpers moved
        pass


def _progress(total: int, description: str):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    # bars only on terminals: logs of batch jobs get the one-line summaries instead
    return Progress(TextColumn(description), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    console=console, transient=False, disable=not console.is_terminal)


def _layer_selection(patterns: list[str] | None, resolutions: list[str] | None, *, include_mid: bool):
    """``--layer``/``--resolution`` options as a LayerSelection (shared by every command)."""
    from .selection import LayerSelection, parse_resolution

    return LayerSelection(patterns=tuple(patterns or ()), include_mid=include_mid,
                          resolutions=tuple(parse_resolution(r) for r in (resolutions or ())))


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return str(n)


@app.command()
def capture(
    model: Annotated[Optional[str], typer.Argument(help="Diffusers pipeline directory or hub id; omitted: the embedded tiny default.")] = None,
    prompt: Annotated[Optional[list[str]], typer.Option("--prompt", "-p", help="Prompt of one image; repeat for more.")] = None,
    prompts_file: Annotated[Optional[Path], typer.Option(help="One prompt per line, or JSONL with prompt/negative_prompt/seed.")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Store directory (created, or appended to).")] = Path("captures.zarr"),
    negative_prompt: Annotated[Optional[str], typer.Option(help="Negative prompt of every image (a JSONL line may override).")] = None,
    seed: Annotated[int, typer.Option(help="Image i gets seed SEED+i (torch.Generator('cpu').manual_seed) unless its JSONL line names one.")] = 0,
    steps: Annotated[int, typer.Option(help="Denoising steps (PNDM makes steps+1 UNet calls).")] = 50,
    guidance: Annotated[float, typer.Option(help="Classifier-free guidance scale; <= 1 disables it (one half, stored as 'cond').")] = 7.5,
    height: Annotated[Optional[int], typer.Option(help="Image height (default: the pipeline's native size).")] = None,
    width: Annotated[Optional[int], typer.Option(help="Image width (default: the pipeline's native size).")] = None,
    branch: Annotated[str, typer.Option(help="Guidance half to store: uncond (reference default), cond or both.")] = "uncond",
    dtype: Annotated[str, typer.Option(help="Stored query dtype: float16 or float32 (exact).")] = "float16",
    layer: Annotated[Optional[list[str]], typer.Option("--layer", help="Keep layers whose module path matches this fnmatch pattern (repeatable), e.g. 'up_blocks.*'.")] = None,
    resolution: Annotated[Optional[list[str]], typer.Option("--resolution", help="Keep layers of this resolution, e.g. 16 or 16x16 (repeatable).")] = None,
    calls: Annotated[Optional[str], typer.Option(help="UNet calls to store, e.g. '0:10,20,-1' (default: every call).")] = None,
    preset: Annotated[str, typer.Option(help="Storage preset: full, no-finest (drop the latent-resolution layers), half-calls (every other UNet call), no-finest-half-calls. Sizes in BENCHMARKS.md.")] = "full",
    batch_size: Annotated[int, typer.Option(help="Images per pipeline call.")] = 1,
    codec: Annotated[str, typer.Option(help="Query compression preset: blosc-zstd1-bitshuffle (default), blosc-zstd3-bitshuffle, blosc-zstd3-shuffle, zstd1, zstd3, none. All add a CRC32C checksum.")] = "blosc-zstd1-bitshuffle",
    device: Annotated[str, typer.Option(help="Torch device: cpu, cuda, cuda:1...")] = "cpu",
    torch_dtype: Annotated[str, typer.Option(help="Model weights dtype: float32, float16, bfloat16.")] = "float32",
    resume: Annotated[bool, typer.Option("--resume", help="Finish the store's incomplete images from their recorded prompts and seeds.")] = False,
    reserve_only: Annotated[bool, typer.Option("--reserve-only", help="Only record the prompts as incomplete slots; generate them later with --resume (e.g. one --worker per GPU).")] = False,
    worker: Annotated[Optional[str], typer.Option(help="With --resume: K/N generates only slots with slot %% N == K, so N processes share one store.")] = None,
) -> None:
    """Generate images and store their cross-attention queries for later analysis.

    Example: ovstore capture --prompt "a cat on a sofa" --prompt "a dog" --steps 30 --out caps.zarr
    """
    from .capture import CaptureConfig, build_requests, load_pipeline, read_prompts_file
    from .capture import capture as run_capture
    from .capture import plan_capture
    from .capture import resume as run_resume

    specs = [(p, None, None) for p in (prompt or [])]
    if prompts_file is not None:
        specs += read_prompts_file(prompts_file)
    if resume and specs:
        raise InvalidInputError("--resume finishes the recorded prompts; do not pass --prompt/--prompts-file with it")
    if resume and reserve_only:
        raise InvalidInputError("--reserve-only records new prompts; it cannot be combined with --resume")
    if worker is not None and not resume:
        raise InvalidInputError("--worker K/N splits the work of --resume; add --resume")
    worker_split = None
    if worker is not None:
        k, sep, n_workers = worker.partition("/")
        if not (sep and k.isdigit() and n_workers.isdigit()):
            raise InvalidInputError(f"--worker {worker!r}: write K/N, e.g. 0/4")
        worker_split = (int(k), int(n_workers))
    if not resume and not specs:
        raise InvalidInputError("no prompt given; pass --prompt TEXT (repeatable) or --prompts-file FILE")
    config = CaptureConfig(
        num_inference_steps=steps, guidance=guidance, height=height, width=width, branch=branch,
        dtype=dtype, calls=calls, batch_size=batch_size, codec=codec, preset=preset,
        layers=_layer_selection(layer, resolution, include_mid=True),
    )
    requests = None if resume else build_requests(specs, seed=seed, negative_prompt=negative_prompt,
                                                  guidance=guidance, num_inference_steps=steps)
    _quiet_libraries()
    pipe, identity = load_pipeline(model, torch_dtype=torch_dtype, device=device)
    layout, _ = plan_capture(pipe, identity, config)
    n = len(requests) if requests is not None else None
    console.print(
        f"[bold]{identity.id}[/]: {len(layout.layers)} cross-attention layers, {layout.n_steps} of "
        f"{layout.num_unet_calls} UNet calls, branches {','.join(layout.branches)}, {layout.query_dtype}; "
        f"about {_human(layout.query_bytes_per_image())} of queries per image before compression"
    )
    with _progress(n or 0, "capturing") as bar:
        task = bar.add_task("capture", total=n)
        step = lambda slot: bar.advance(task)  # noqa: E731
        if resume:
            result = run_resume(pipe, identity, out, config=config, progress=step, worker=worker_split)
        else:
            result = run_capture(pipe, identity, requests, out, config=config, progress=step,
                                 reserve_only=reserve_only)
    action = "reserved" if reserve_only else "stored"
    console.print(f"{action} images {_ranges(result.images)} in {out}")


def _ranges(values) -> str:
    values = list(values)
    if not values:
        return "(none)"
    return f"{values[0]}..{values[-1]}" if len(values) > 1 else str(values[0])


@app.command()
def info(store: Annotated[Path, typer.Argument(help="Store directory.")]) -> None:
    """Summarise a store: images, layers, steps, sizes and the model."""
    from rich.table import Table

    from .store import open_store

    s = open_store(store)
    summary = s.summary()
    layout = s.layout
    console.print(f"[bold]{store}[/] (ovstore format v{s.format_version})")
    m = layout.model
    console.print(f"model: {m.id} ({m.source}{', ' + m.path if m.path else ''}), {m.pipeline_class}, "
                  f"weights {m.torch_dtype}, text encoder hidden size {m.text_encoder_hidden_size}")
    console.print(f"images: {summary.n_images} ({summary.n_complete} complete, "
                  f"{summary.n_images - summary.n_complete} incomplete"
                  + (f": {s.incomplete_images()[:10]}" if summary.n_complete < summary.n_images else "") + ")")
    console.print(f"image size {layout.height}x{layout.width}, latent {layout.latent_height}x{layout.latent_width}; "
                  f"steps stored: {layout.n_steps} of {layout.num_unet_calls} UNet calls; branches: "
                  f"{','.join(layout.branches)}; queries {layout.query_dtype}, codec {layout.codec}")
    table = Table("layer", "block", "h x w", "heads", "head_dim", "scale", "MB/image")
    itemsize = 4 if layout.query_dtype == "float32" else 2
    for l in layout.layers:
        per = l.heads * l.head_dim * l.height * l.width * layout.n_steps * len(layout.branches) * itemsize
        table.add_row(l.name, l.block, f"{l.height}x{l.width}", str(l.heads), str(l.head_dim),
                      f"{l.scale:.4g}", f"{per / 1e6:.2f}")
    Console().print(table)
    console.print(f"on disk: {_human(summary.bytes_on_disk)} (queries {_human(summary.query_bytes_on_disk)}, "
                  f"uncompressed {_human(summary.query_bytes_uncompressed)}, ratio {summary.compression_ratio:.2f}x)")


@app.command()
def verify(store: Annotated[Path, typer.Argument(help="Store directory.")]) -> None:
    """Read every chunk of every complete image and check its checksum; list damage by image and layer.

    Exit status 1 when anything is missing or corrupt.
    """
    from .store import open_store, verify_store

    s = open_store(store)
    n = len(s.complete_images())
    with _progress(n, "verifying") as bar:
        task = bar.add_task("verify", total=n)
        report = verify_store(s, progress=lambda _: bar.advance(task))
    for problem in report.problems:
        console.print(f"[red]damaged:[/] {problem}", highlight=False)
    console.print(f"checked {report.checked_images} complete images; {len(report.incomplete)} incomplete "
                  f"{report.incomplete[:20] if report.incomplete else ''}; "
                  + ("no damage found" if report.ok else f"{len(report.damaged_images)} damaged images: "
                     f"{report.damaged_images[:20]}"))
    if not report.ok:
        raise typer.Exit(1)


@app.command()
def merge(
    out: Annotated[Path, typer.Option("--out", "-o", help="Store to merge into (created, or appended to).")],
    sources: Annotated[list[Path], typer.Argument(help="Stores to merge (same model and capture settings).")],
) -> None:
    """Merge separately captured stores (e.g. one per GPU) into one, without duplicates."""
    from .store import merge_stores

    result = merge_stores(out, sources)
    console.print(f"merged {result.added} images into {out} ({result.duplicates} duplicates and "
                  f"{result.incomplete_skipped} incomplete images skipped)")


@app.command()
def images(
    store: Annotated[Path, typer.Argument(help="Store directory.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for PNG files named 00000.png, ...")] = Path("images"),
) -> None:
    """Write the stored images as PNG files named by image index."""
    from PIL import Image

    from .store import open_store

    s = open_store(store)
    out.mkdir(parents=True, exist_ok=True)
    done = s.complete_images()
    for i in done:
        Image.fromarray(s.image(i)).save(out / f"{i:05d}.png")
    console.print(f"wrote {len(done)} images to {out}")


@app.command()
def maps(
    store: Annotated[Path, typer.Argument(help="Store directory.")],
    attribution: Annotated[Optional[list[str]], typer.Option("--attribution", "-a", help="Attribution prompt (any words); repeatable.")] = None,
    attributions_file: Annotated[Optional[Path], typer.Option(help="One attribution prompt per line.")] = None,
    image: Annotated[Optional[list[int]], typer.Option("--image", "-i", help="Image index (repeatable); default: every complete image.")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="FILE.npy (one prompt: float32 (images, tokens, h, w)) or FILE.zarr (any number, xarray).")] = Path("maps.npy"),
    size: Annotated[Optional[tuple[int, int]], typer.Option(help="Upsample maps to H W (bilinear).")] = None,
    png: Annotated[Optional[Path], typer.Option(help="Folder for per-token PNG overlays on the images.")] = None,
    layer: Annotated[Optional[list[str]], typer.Option("--layer", help="Use layers matching this pattern (repeatable); default: all but the mid block.")] = None,
    resolution: Annotated[Optional[list[str]], typer.Option("--resolution", help="Use layers of this resolution, e.g. 16x16 (repeatable).")] = None,
    steps: Annotated[Optional[str], typer.Option(help="Stored steps to use, e.g. '0:5,-1' (default: all).")] = None,
    branch: Annotated[Optional[str], typer.Option(help="Stored half to use: uncond or cond (default: the first stored).")] = None,
    activation: Annotated[str, typer.Option(help="token_softmax (reference), sigmoid or linear.")] = "token_softmax",
    aggregation: Annotated[str, typer.Option(help="sum (reference) or mean, over heads, steps and layers.")] = "sum",
    normalize: Annotated[str, typer.Option(help="none (reference), max or minmax, per map.")] = "none",
    token: Annotated[Optional[list[Path]], typer.Option("--token", "-t", help="Learned token file from `ovstore optimize` (repeatable); evaluated as [SoT, class*].")] = None,
    combine_tokens: Annotated[bool, typer.Option("--combine-tokens", help="Put all --token classes in one softmax ([SoT, a*, b*, ...]) so they compete.")] = False,
    model: Annotated[Optional[str], typer.Option(help="Load the text encoder from this pipeline instead of the recorded one.")] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
) -> None:
    """Compute OVAM maps for attribution prompts over stored images (no diffusion re-run).

    Example: ovstore maps caps.zarr -a "a cat and a sofa" -a "furniture" --out maps.zarr --png overlays/
    """
    from .analyze import MapConfig, compute_maps, save_maps, write_overlays
    from .store import open_store

    prompts = list(attribution or [])
    if attributions_file is not None:
        try:
            lines = attributions_file.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise InvalidInputError(f"cannot read --attributions-file {attributions_file}: {exc.strerror}") from None
        prompts += [l.strip() for l in lines if l.strip() and not l.startswith("#")]
    if not prompts and not token:
        raise InvalidInputError("no attribution; pass --attribution TEXT, --attributions-file FILE or --token FILE")
    if combine_tokens and not token:
        raise InvalidInputError("--combine-tokens needs --token files to combine")
    n_attributions = len(prompts) + (1 if combine_tokens else len(token or ()))
    if out.suffix not in (".npy", ".zarr"):
        raise InvalidInputError(f"--out {out}: use a .npy (one prompt) or .zarr (any number) file name")
    if out.suffix == ".npy" and n_attributions > 1:
        raise InvalidInputError(f"--out {out} is .npy, which holds one attribution; use FILE.zarr for {n_attributions}")
    config = MapConfig(
        layers=_layer_selection(layer, resolution, include_mid=False),
        steps=steps, branch=branch, activation=activation, head_reduction=aggregation,
        step_reduction=aggregation, layer_reduction=aggregation, normalize=normalize,
        size=tuple(size) if size else None,
    )
    _quiet_libraries()
    s = open_store(store)
    chosen = s.check_images(image)
    attributions: list = list(prompts)
    if token:
        from .optimize import combined_attribution, load_token, token_attribution

        files = [load_token(t) for t in token]
        if combine_tokens:
            attributions.append(combined_attribution(files, s.layout.model))
        else:
            attributions += [token_attribution(f, s.layout.model) for f in files]
    with _progress(len(chosen), "maps") as bar:
        task = bar.add_task("maps", total=len(chosen))
        result = compute_maps(s, attributions, images=chosen, config=config, model=model, device=device,
                              progress=lambda _: bar.advance(task))
    save_maps(result, out)
    console.print(f"wrote maps {tuple(result.shape)} (image, token, y, x) for {n_attributions} attribution(s) to {out}")
    if png is not None:
        files = write_overlays(result, s.image, png)
        console.print(f"wrote {len(files)} PNG overlays to {png}")


@app.command()
def optimize(
    store: Annotated[Path, typer.Argument(help="Store holding the annotated images.")],
    image: Annotated[list[int], typer.Option("--image", "-i", help="Training image index; pair each with a --mask (repeatable).")],
    mask: Annotated[list[Path], typer.Option("--mask", "-m", help="Binary mask image of the class in the matching --image (any size).")],
    init: Annotated[str, typer.Option(help="Word to start from (its token in the context sentence).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Token file to write (.safetensors).")],
    name: Annotated[Optional[str], typer.Option(help="Class name stored in the token (default: the init word).")] = None,
    context: Annotated[str, typer.Option(help="Sentence encoded to initialise the rows; {} is the init word.")] = "A photograph of a {}",
    recipe: Annotated[str, typer.Option(help="Optimization recipe: reference (OVAM's).")] = "reference",
    epochs: Annotated[int, typer.Option(help="SGD epochs (reference: 800).")] = 800,
    lr: Annotated[float, typer.Option(help="Learning rate (reference: 100; maps are min-max normalised).")] = 100.0,
    lr_step: Annotated[int, typer.Option(help="StepLR period in epochs (reference: 120).")] = 120,
    lr_gamma: Annotated[float, typer.Option(help="StepLR factor (reference: 0.7).")] = 0.7,
    layer: Annotated[Optional[list[str]], typer.Option("--layer", help="Use layers matching this pattern (repeatable).")] = None,
    resolution: Annotated[Optional[list[str]], typer.Option("--resolution", help="Use layers of this resolution (repeatable).")] = None,
    steps: Annotated[Optional[str], typer.Option(help="Stored steps to use, e.g. '0:5,-1'.")] = None,
    model: Annotated[Optional[str], typer.Option(help="Text encoder to initialise from instead of the recorded one.")] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
) -> None:
    """Learn a class token from annotated masks, from the store alone (no UNet).

    Example: ovstore optimize caps.zarr --image 0 --mask cat0.png --init cat --out cat.safetensors
    """
    from .analyze import MapConfig
    from .optimize import OptimizeConfig, TokenTask, optimize_tokens, save_token

    if out.suffix != ".safetensors":
        raise InvalidInputError(f"--out {out}: a token file must end in .safetensors")
    config = OptimizeConfig(
        recipe=recipe, context=context, epochs=epochs, lr=lr, lr_step=lr_step, lr_gamma=lr_gamma,
        maps=MapConfig(layers=_layer_selection(layer, resolution, include_mid=False), steps=steps),
    )
    task = TokenTask(init_word=init, images=tuple(image), masks=tuple(mask), name=name)
    _quiet_libraries()
    with _progress(epochs, "optimizing") as bar:
        progress_task = bar.add_task("optimize", total=epochs)
        (token,) = optimize_tokens(store, [task], config=config, model=model, device=device,
                                   progress=lambda epoch, losses: bar.update(progress_task, completed=epoch + 1))
    save_token(token, out)
    t = token.training
    console.print(f"wrote {out}: loss {t['best_loss']:.4f}, training IoU {t['train_iou']:.3f} "
                  f"(plain word {init!r}: {t['plain_word_iou']:.3f})")


def _parse_thresholds(items: list[str] | None) -> dict[str, float]:
    out = {}
    for item in items or ():
        name, sep, value = item.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise InvalidInputError(f"--class-threshold {item!r}: write CLASS=VALUE, e.g. cat=0.5")
    return out


@app.command()
def label(
    store: Annotated[Path, typer.Argument(help="Store directory.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output dataset folder (VOC tree + COCO JSON).")],
    classes: Annotated[Optional[str], typer.Option(help="Comma-separated class names, numbered from 1 in this order.")] = None,
    classes_file: Annotated[Optional[Path], typer.Option(help="One class name per line.")] = None,
    prompt_template: Annotated[str, typer.Option(help="Sentence of a class word; {} is the class.")] = "a photograph of a {}",
    token: Annotated[Optional[list[Path]], typer.Option("--token", help="Learned token file; used for the class it names (repeatable).")] = None,
    mode: Annotated[str, typer.Option(help="separate: each class its own softmax; compete: all classes in one softmax.")] = "separate",
    threshold: Annotated[float, typer.Option(help="Threshold on max-normalised maps (reference ≈0.4 for words).")] = 0.4,
    class_threshold: Annotated[Optional[list[str]], typer.Option("--class-threshold", help="CLASS=VALUE per-class threshold (repeatable).")] = None,
    adaptive: Annotated[bool, typer.Option("--adaptive", help="DiffuMask adaptive threshold per class and image (most stable area over a sweep).")] = False,
    crf: Annotated[bool, typer.Option("--crf", help="DenseCRF refinement (pip install 'ovstore[crf]').")] = False,
    min_component: Annotated[int, typer.Option(help="Remove class regions smaller than this many pixels.")] = 0,
    prompt_classes_only: Annotated[bool, typer.Option("--prompt-classes-only", help="Only label classes named in each image's prompt.")] = False,
    image: Annotated[Optional[list[int]], typer.Option("--image", "-i", help="Image index (repeatable); default: every complete image.")] = None,
    scheduler: Annotated[Optional[str], typer.Option(help="'synchronous' (in-process), or a dask.distributed scheduler address; default: a LocalCluster.")] = None,
    workers: Annotated[Optional[int], typer.Option(help="LocalCluster worker processes (default: one per core).")] = None,
    partition_size: Annotated[int, typer.Option(help="Images per task (bounds memory per worker).")] = 8,
    write_maps: Annotated[bool, typer.Option("--write-maps", help="Also write the float class maps to OUT/maps.zarr.")] = False,
    model: Annotated[Optional[str], typer.Option(help="Text encoder to use instead of the recorded one.")] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
) -> None:
    """Label every complete image into a segmentation dataset (VOC PNGs + COCO RLE JSON).

    Re-running the same command resumes: finished images are skipped.
    Example: ovstore label caps.zarr --classes cat,dog,sofa --out dataset/
    """
    from .label import LabelConfig, label_store
    from .optimize import load_token
    from .store import open_store

    names: list[str] = [c for c in (classes or "").split(",") if c.strip()]
    if classes_file is not None:
        try:
            names += [l.strip() for l in classes_file.read_text(encoding="utf-8").splitlines() if l.strip()]
        except OSError as exc:
            raise InvalidInputError(f"cannot read --classes-file {classes_file}: {exc.strerror}") from None
    tokens = {load_token(t).name: t for t in (token or ())}
    for name in tokens:
        if name not in names:
            names.append(name)
    config = LabelConfig(classes=tuple(names), prompt_template=prompt_template, tokens=tokens, mode=mode,
                         threshold=threshold, class_thresholds=_parse_thresholds(class_threshold),
                         adaptive=adaptive, crf=crf, min_component=min_component,
                         prompt_classes_only=prompt_classes_only)
    _quiet_libraries()
    total = len(open_store(store).check_images(image))
    with _progress(total, "labelling") as bar:
        task = bar.add_task("label", total=total)
        result = label_store(store, out, config, images=image, scheduler=scheduler, workers=workers,
                             partition_size=partition_size, write_maps=write_maps, model=model, device=device,
                             progress=lambda _: bar.advance(task))
        bar.update(task, completed=total)
    console.print(f"labelled {len(result.labelled)} images ({len(result.skipped)} already done) into {out}; "
                  f"COCO: {result.coco}")


@app.command()
def evaluate(
    pred_dir: Annotated[Path, typer.Argument(help="Predicted label PNGs (a folder or a VOC tree).")],
    gt_dir: Annotated[Path, typer.Argument(help="Ground-truth label PNGs, matched by file name (255 = ignore).")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Folder for report.json, report.md and report.png.")] = None,
) -> None:
    """Per-class IoU, mIoU, precision/recall and confusion matrix (I and U summed over the set)."""
    from .label import evaluate_dirs, write_report

    report = evaluate_dirs(pred_dir, gt_dir)
    Console().print(report.to_markdown(), markup=False, highlight=False)
    if out is not None:
        files = write_report(report, out)
        console.print(f"wrote {', '.join(str(f) for f in files)}")


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the captures, pictures and report.md.")] = Path("ovstore-demo"),
    epochs: Annotated[int, typer.Option(help="Token-optimization epochs.")] = 300,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
) -> None:
    """The whole method on the embedded toy-world model, offline, in minutes: capture, maps of
    prompt words and of new words, a learned token, labels, and a Markdown report."""
    from .demo import run_demo

    _quiet_libraries()
    run_demo(out, device=device, epochs=epochs, log=lambda m: console.print(m, highlight=False))


def main() -> None:
    """Console entry point: one-line errors instead of tracebacks for expected failures."""
    try:
        code = app(standalone_mode=False)
        if isinstance(code, int) and code:
            sys.exit(code)
    except OvstoreError as exc:
        console.print(f"[bold red]error:[/] {exc}", highlight=False)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("interrupted; complete images are kept, resume with `ovstore capture --resume`")
        sys.exit(130)
    except Exception as exc:
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        if isinstance(exc, click.exceptions.Abort):
            sys.exit(1)
        raise


if __name__ == "__main__":
    main()

"""The ``ovstore`` command line: capture once, analyse forever.

Each command parses its options, builds a config and calls one library function; errors
that ovstore raises on purpose are printed as one line with a non-zero exit status.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

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
        import transformers.utils.logging as tlog

        tlog.set_verbosity_error()
        tlog.disable_progress_bar()
        if "diffusers" in sys.modules:  # analysis never imports diffusers (1.5 s): the env vars suffice
            import diffusers.utils.logging as dlog

            dlog.set_verbosity_error()
            dlog.disable_progress_bar()
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


def _calls_option(calls: str | None, steps: str | None, command: str) -> str | None:
    """``--calls`` (stored-call selection); ``--steps``, its old name here, still works with a
    note, since in ``capture`` --steps is the number of denoising steps."""
    if steps is None:
        return calls
    if calls is not None:
        raise InvalidInputError("--steps is the old name of --calls; give only --calls")
    console.print(f"note: --steps of `ovstore {command}` is deprecated, use --calls (same meaning: stored UNet "
                  "calls); in `capture`, --steps is the number of denoising steps", highlight=False)
    return steps


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return str(n)


def _recorded_arrays(layout: Any) -> str:
    """What a capture records per layer and call, in words (the bytes line before capture)."""
    if not layout.layer_arrays:
        return "queries"
    return "queries, image keys/values" + (", outputs" if "image_outputs" in layout.layer_arrays else "") + " and temb"


#: Words that are switch values in other tools, never the name of a pipeline here.
_SWITCH_VALUES = {"true", "false", "yes", "no", "on", "off", "1", "0"}


@app.command()
def capture(
    model: Annotated[Optional[str], typer.Argument(help="Diffusers pipeline directory or hub id; omitted: the store's recorded model when --out exists, else the embedded default.")] = None,
    prompt: Annotated[Optional[list[str]], typer.Option("--prompt", "-p", help="Prompt of one image; repeat for more.")] = None,
    prompts_file: Annotated[Optional[Path], typer.Option(help="One prompt per line, or JSONL with prompt/negative_prompt/seed.")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Store directory (created, or appended to).")] = Path("captures.zarr"),
    negative_prompt: Annotated[Optional[str], typer.Option(help="Negative prompt of every image (a JSONL line may override).")] = None,
    seed: Annotated[int, typer.Option(help="Image i gets seed SEED+i (torch.Generator('cpu').manual_seed) unless its JSONL line names one.")] = 0,
    steps: Annotated[Optional[int], typer.Option(help="Denoising steps (PNDM makes steps+1 UNet calls). Default: 50, or the store's when --out exists.")] = None,
    guidance: Annotated[Optional[float], typer.Option(help="Classifier-free guidance scale; <= 1 disables it (one half, stored as 'cond'). FLUX: the embedded guidance (guidance_scale; one half, 'cond'). Default: 7.5, or the store's.")] = None,
    height: Annotated[Optional[int], typer.Option(help="Image height (default: the store's, else the pipeline's native size).")] = None,
    width: Annotated[Optional[int], typer.Option(help="Image width (default: the store's, else the pipeline's native size).")] = None,
    branch: Annotated[Optional[str], typer.Option(help="Guidance half to store: uncond (reference default), cond or both. Default: uncond, or the store's.")] = None,
    dtype: Annotated[Optional[str], typer.Option(help="Stored query dtype: float16 (default) or float32 (exact).")] = None,
    layer: Annotated[Optional[list[str]], typer.Option("--layer", help="Keep layers whose module path matches this fnmatch pattern (repeatable), e.g. 'up_blocks.*'.")] = None,
    resolution: Annotated[Optional[list[str]], typer.Option("--resolution", help="Keep layers of this resolution, e.g. 16 or 16x16 (repeatable).")] = None,
    calls: Annotated[Optional[str], typer.Option(help="UNet calls to store, e.g. '0:10,20,-1' (default: every call, or the store's).")] = None,
    preset: Annotated[Optional[str], typer.Option(help="Storage preset: full (default), no-finest (drop the layers at the finest cross-attention grid), half-calls (every other UNet call), no-finest-half-calls, thin (first layer of each transformer stack: SDXL 11 of 70), thin-half-calls; SD3/FLUX: full, half-calls, first-two-thirds, first-half, first-half-half-calls (the first blocks). Sizes in BENCHMARKS.md.")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per pipeline call. Images are bit-identical to a run with another batch size only up to float rounding (batch 1 for exact resumes).")] = 1,
    codec: Annotated[Optional[str], typer.Option(help="Query compression preset: blosc-zstd1-bitshuffle (default), blosc-zstd3-bitshuffle, blosc-zstd3-shuffle, zstd1, zstd3, none. All add a CRC32C checksum.")] = None,
    device: Annotated[str, typer.Option(help="Torch device: cpu, cuda, cuda:1...")] = "cpu",
    torch_dtype: Annotated[Optional[str], typer.Option(help="Model weights dtype: float32 (default, or the store's), float16, bfloat16.")] = None,
    revision: Annotated[Optional[str], typer.Option(help="Hub revision (branch, tag or commit) of MODEL; recorded in the store.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Finish the store's incomplete images from their recorded prompts and seeds, with the store's model and settings. With the original --prompt/--prompts-file it finishes exactly what of those is missing.")] = False,
    reserve_only: Annotated[bool, typer.Option("--reserve-only", help="Only record the prompts as incomplete slots; generate them later with --resume (e.g. one --worker per GPU).")] = False,
    worker: Annotated[Optional[str], typer.Option(help="With --resume: K/N generates only slots with slot % N == K, so N processes share one store.")] = None,
    max_sequence_length: Annotated[Optional[int], typer.Option(help="SD3/FLUX: T5 tokens of the prompt encoding (the pipeline's max_sequence_length; default the pipeline's, or the store's).")] = None,
    true_cfg_scale: Annotated[Optional[float], typer.Option(help="FLUX: true classifier-free guidance scale; > 1 with --negative-prompt runs the prompt's and the negative prompt's calls (--branch chooses which are stored). --guidance is then FLUX's embedded guidance.")] = None,
    single_blocks: Annotated[bool, typer.Option("--single-blocks", help="FLUX: also record the single-stream blocks (off by default: they are stored whole, weights included; see docs/store-format.md).")] = False,
    scheduler: Annotated[Optional[str], typer.Option(help="Fill the slots on Dask workers: 'local' (a LocalCluster of --workers CPU processes) or a scheduler address tcp://HOST:8786 whose workers see --out (one `dask worker ADDRESS --resources GPU=1` per GPU with --device cuda). The slots are reserved here first; a killed worker's slots are retried elsewhere.")] = None,
    workers: Annotated[Optional[int], typer.Option(help="Worker processes of --scheduler local (default: one per core).")] = None,
    slots_per_task: Annotated[Optional[int], typer.Option(help="Slots per Dask task with --scheduler (default: twice --batch-size).")] = None,
    images_file: Annotated[Optional[Path], typer.Option(help="Real images instead of generations: JSONL, one {\"image\": \"path.png\", \"prompt\": \"caption\"} per line (optional negative_prompt, seed; paths relative to the file's folder). Needs --strength or --invert.")] = None,
    strength: Annotated[Optional[float], typer.Option(help="Real images, img2img: noise each image to the timestep of strength S in (0, 1] and denoise the remaining int(steps*S) steps while capturing.")] = None,
    invert: Annotated[bool, typer.Option("--invert", help="Real images: DDIM inversion of each image with its prompt, then capture while regenerating it with DDIM (guidance defaults to 1).")] = False,
    inversion_guidance: Annotated[Optional[float], typer.Option(help="With --invert: guidance of the inversion pass (default 1: no classifier-free guidance).")] = None,
    resize: Annotated[Optional[str], typer.Option(help="Real images: resize every image to WxH (multiples of 8) or to the pipeline's native size (native), bicubic.")] = None,
    convert_rgb: Annotated[bool, typer.Option("--convert-rgb", help="Real images: convert grey, palette, CMYK and alpha images to RGB (alpha composited on white) instead of refusing them.")] = False,
    self_attention: Annotated[Optional[str], typer.Option("--self-attention", metavar="RES[,RES]", help="Also store each image's self-attention (attn1) matrix at these latent grids, averaged over heads, stored calls and layers (float16, (RES*RES)^2 values per branch: SD 1.5 32 -> 2 MB, 64 -> 32 MB), for `maps`/`label --refine self-attention`. UNet families only; off by default, or the store's.")] = None,
    image_outputs: Annotated[bool, typer.Option("--image-outputs", help="SD3/FLUX: also record each block's image attention outputs, which `maps --space output` (ConceptAttention's output-space maps) needs; one more array as large as the image keys.")] = False,
) -> None:
    """Generate images and store their cross-attention queries for later analysis.

    Example: ovstore capture --prompt "a cat on a sofa" --prompt "a dog" --steps 30 --out caps.zarr

    After an interruption: ovstore capture --resume --out caps.zarr (or the same command plus --resume).
    """
    from rich.markup import escape

    from .capture import prepare_capture

    if model is not None and model.lower() in _SWITCH_VALUES and not Path(model).exists():
        raise InvalidInputError(f"MODEL {model!r} looks like the value of a switch, but --resume and --reserve-only "
                                "take no value: write the switch alone (e.g. --resume), and MODEL only to name a "
                                "pipeline")
    job = prepare_capture(
        model, prompts=prompt or (), prompts_file=prompts_file, out=out, negative_prompt=negative_prompt, seed=seed,
        steps=steps, guidance=guidance, height=height, width=width, branch=branch, dtype=dtype, layers=layer or (),
        resolutions=resolution or (), calls=calls, preset=preset, batch_size=batch_size, codec=codec, device=device,
        torch_dtype=torch_dtype, revision=revision, resume=resume, reserve_only=reserve_only, worker=worker,
        max_sequence_length=max_sequence_length, true_cfg_scale=true_cfg_scale, single_blocks=single_blocks,
        images_file=images_file, strength=strength, invert=invert, inversion_guidance=inversion_guidance,
        resize=resize, convert_rgb=convert_rgb, self_attention=self_attention, image_outputs=image_outputs)
    if scheduler is None and (workers is not None or slots_per_task is not None):
        raise InvalidInputError("--workers and --slots-per-task belong to --scheduler; add --scheduler local "
                                "(or a scheduler address)")
    if scheduler is not None and (reserve_only or worker is not None):
        raise InvalidInputError("--scheduler fills the slots itself; leave out --reserve-only and --worker")
    if scheduler is not None and scheduler != "local":  # a mistyped address: one line, before the model loads
        from .cluster import check_scheduler_address

        check_scheduler_address(scheduler)
    if job.nothing_to_resume:  # before loading the model
        console.print(job.nothing_message(), highlight=False)
        return
    import diffusers  # noqa: F401  (imported first so that its loading bars are silenced too)

    _quiet_libraries()
    job.load()
    identity, layout = job.identity, job.layout
    console.print(
        f"[bold]{escape(identity.id)}[/]: {len(layout.layers)} "
        f"{'joint attention blocks' if layout.layer_arrays else 'cross-attention layers'}, {layout.n_steps} of "
        f"{layout.num_unet_calls} {'transformer' if layout.layer_arrays else 'UNet'} calls, "
        f"branches {','.join(layout.branches)}, {layout.query_dtype}; "
        f"about {_human(layout.query_bytes_per_image() + layout.context_bytes_per_image())} per image before "
        f"compression ({_recorded_arrays(layout)} "
        f"{_human(layout.query_bytes_per_image())}, context "
        f"{_human(layout.context_bytes_per_image())}"
        + (f", self-attention {_human(layout.self_attention_bytes_per_image())}" if layout.self_attention else "")
        + ")",
        highlight=False,
    )
    n = job.total
    with _progress(n or 0, "capturing") as bar:
        task = bar.add_task("capture", total=n)
        if scheduler is not None:
            from .capture import capture_on_cluster

            result = capture_on_cluster(job, scheduler=scheduler, workers=workers, slots_per_task=slots_per_task,
                                        progress=lambda slot: bar.advance(task))
        else:
            result = job.run(progress=lambda slot: bar.advance(task))
    slots = list(result.images)
    shown = ", ".join(map(str, slots[:20])) + (f", ... ({len(slots)} in all)" if len(slots) > 20 else "")
    console.print(f"{job.action} images {shown} in {out}"
                  + (f"; {len(result.already_complete)} of the given prompts were already complete"
                     if result.already_complete else ""), highlight=False)


def _ranges(values) -> str:
    values = list(values)
    if not values:
        return "(none)"
    return f"{values[0]}..{values[-1]}" if len(values) > 1 else str(values[0])


@app.command()
def info(store: Annotated[Path, typer.Argument(help="Store directory.")]) -> None:
    """Summarise a store: images, layers, steps, sizes and the model (on stdout)."""
    from rich.table import Table

    from .store import open_store

    s = open_store(store)
    stdout = Console(soft_wrap=True)
    summary = s.summary()
    layout = s.layout
    stdout.print(f"[bold]{store}[/] (ovstore format v{s.format_version})")
    m = layout.model
    r = m.text_recipe
    stdout.print(f"model: {m.id} ({m.source}{', ' + m.path if m.path else ''}), {m.pipeline_class}, "
                 f"family {m.family}, weights {m.torch_dtype}; text: {' + '.join(r.encoders)} "
                 f"({'last hidden state' if r.hidden_state is None else f'hidden_states[{r.hidden_state}]'}, "
                 f"{r.width} channels); generation context "
                 + (f"{layout.context.length} tokens stored" if layout.context is not None else "not stored"))
    stdout.print(f"images: {summary.n_images} ({summary.n_complete} complete, "
                 f"{summary.n_images - summary.n_complete} incomplete"
                 + (f": {s.incomplete_images()[:10]}" if summary.n_complete < summary.n_images else "") + ")")
    stdout.print(f"image size {layout.height}x{layout.width}, latent {layout.latent_height}x{layout.latent_width}; "
                 f"stored calls: {layout.n_steps} of {layout.num_unet_calls} UNet calls; branches: "
                 f"{','.join(layout.branches)}; queries {layout.query_dtype}, codec {layout.codec}")
    if layout.self_attention:
        stdout.print(f"self-attention matrices: {', '.join(f'{h}x{w}' for h, w in layout.self_attention)} "
                     f"({_human(layout.self_attention_bytes_per_image())} per image before compression)")
    table = Table("block", "h x w", "heads", "head_dim", "scale", "MB/image")
    table.add_column("layer", overflow="fold")  # full module paths, wrapped rather than cut
    for l in layout.layers:
        per = l.query_bytes_per_call(layout.query_dtype) * layout.n_steps * len(layout.branches)
        table.add_row(l.block, f"{l.height}x{l.width}", str(l.heads), str(l.head_dim),
                      f"{l.scale:.4g}", f"{per / 1e6:.2f}", l.name)
    stdout.print(table)
    stdout.print(f"on disk: {_human(summary.bytes_on_disk)} (queries of complete images "
                 f"{_human(summary.query_bytes_on_disk)}, uncompressed {_human(summary.query_bytes_uncompressed)}, "
                 f"ratio {summary.compression_ratio:.2f}x)")


@app.command()
def verify(store: Annotated[Path, typer.Argument(help="Store directory.")]) -> None:
    """Read every chunk of every complete image and check its checksum; list damage by image and layer.

    Also reports unreadable metadata, NaN/Inf in queries and leftover temporary files of
    interrupted writes. Exit status 1 when anything is missing or corrupt.
    """
    from rich.markup import escape

    from .errors import StoreDamagedError
    from .store import open_store, verify_store

    try:
        s = open_store(store)
    except StoreDamagedError as exc:
        console.print(f"[red]damaged:[/] {escape(str(exc))} (the store cannot be opened, so nothing else was "
                      "checked)", highlight=False)
        raise typer.Exit(1) from None
    try:
        n = len(s.complete_images())
    except OvstoreError:  # a damaged status array: verify_store reports it
        n = None
    with _progress(n or 0, "verifying") as bar:
        task = bar.add_task("verify", total=n)
        report = verify_store(s, progress=lambda _: bar.advance(task))
    for note in report.notes:
        console.print(f"note: {escape(note)}", highlight=False)
    for problem in report.problems:
        console.print(f"[red]damaged:[/] {escape(str(problem))}", highlight=False)
    for path in report.leftovers[:10]:
        console.print(f"leftover: {escape(str(path))}", highlight=False)
    console.print(escape(report.summary()), highlight=False)
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
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing --out written by `ovstore images`.")] = False,
) -> None:
    """Write the stored images as PNG files named by image index.

    Damaged images are skipped and listed (exit status 2); the others are written.
    """
    from .errors import StoreError
    from .images import write_images

    result = write_images(store, out, overwrite=overwrite)
    console.print(f"wrote {len(result.written)} images to {out}", highlight=False)
    if result.damaged:
        raise StoreError(f"{len(result.damaged)} images are damaged and were skipped: {list(result.damaged[:20])}; run "
                         f"`ovstore verify {store}` for details")


_REFINE_HELP = ("Refine the maps with each image's stored self-attention (capture with --self-attention RES): "
                "self-attention (= :propagate,k=1, SA^k·map as DiffSegmenter/Dataset Diffusion), "
                "self-attention:propagate,k=2,mix=0.5 (mix<1: blended with the unpropagated map, both ÷ max), "
                "self-attention:ovam,min_sa=0.85 (OVAM's weighting: map/max times the "
                "rescaled attention each pixel receives), self-attention:iseg,iterations=3,step=0 (iSeg's "
                "entropy-reduced iteration); res=R picks a stored grid (default the finest). Maps are resampled to the "
                "self-attention grid and back.")


@app.command()
def maps(
    store: Annotated[Path, typer.Argument(help="Store directory.")],
    attribution: Annotated[Optional[list[str]], typer.Option("--attribution", "-a", help="Attribution prompt (any words); repeatable.")] = None,
    attributions_file: Annotated[Optional[Path], typer.Option(help="One attribution prompt per line (blank lines and # comments skipped; the .zarr output records each prompt's line as prompt_line).")] = None,
    image: Annotated[Optional[list[int]], typer.Option("--image", "-i", help="Image index (repeatable); default: every complete image.")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="FILE.npy (one prompt: float32 (images, tokens, h, w)) or FILE.zarr (any number, xarray).")] = Path("maps.npy"),
    size: Annotated[Optional[tuple[int, int]], typer.Option(help="Upsample maps to H W (bilinear).")] = None,
    png: Annotated[Optional[Path], typer.Option(help="Folder for PNG pictures: per image and prompt a sheet (the image, one map per word on one shared, labelled colour scale) and one picture per word. The scale is each word's share of the pixel's attention, unless --normalize is given or the model's ovstore_defaults.json sets a display normalisation.")] = None,
    png_all_tokens: Annotated[bool, typer.Option("--png-all-tokens", help="Draw start/end-of-text and filler words (a, and, ...) in the --png pictures too.")] = False,
    layer: Annotated[Optional[list[str]], typer.Option("--layer", help="Use layers matching this pattern (repeatable); default: all but the mid block.")] = None,
    resolution: Annotated[Optional[list[str]], typer.Option("--resolution", help="Use layers of this resolution, e.g. 16x16 (repeatable).")] = None,
    calls: Annotated[Optional[str], typer.Option("--calls", help="Stored UNet calls to use, by position among the stored ones, e.g. '0:5,-1' (default: all).")] = None,
    steps: Annotated[Optional[str], typer.Option("--steps", help="(deprecated: use --calls)")] = None,
    branch: Annotated[Optional[str], typer.Option(help="Stored half to use: uncond or cond (default: the first stored).")] = None,
    activation: Annotated[str, typer.Option(help="token_softmax (reference), sigmoid or linear.")] = "token_softmax",
    aggregation: Annotated[str, typer.Option(help="sum (reference) or mean, over heads, steps and layers.")] = "sum",
    normalize: Annotated[str, typer.Option(help="none (reference), max or minmax, per map.")] = "none",
    token: Annotated[Optional[list[Path]], typer.Option("--token", "-t", help="Learned token file from `ovstore optimize` (repeatable); evaluated as [SoT, class*].")] = None,
    combine_tokens: Annotated[bool, typer.Option("--combine-tokens", help="Put all --token classes in one softmax ([SoT, a*, b*, ...]) so they compete.")] = False,
    model: Annotated[Optional[str], typer.Option(help="Load the text encoder from this pipeline instead of the recorded one.")] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    generation_context: Annotated[bool, typer.Option("--generation-context", help="Instead of attribution prompts: one map per token of the context the stored calls attended (the stored branch's prompt, or negative prompt for uncond, padded as the pipeline encoded it), softmax over all of them.")] = False,
    space: Annotated[str, typer.Option(help="SD3/FLUX: attention (default: image queries against the attribution's keys, the model's own attention) or output (ConceptAttention's output-space maps; the store needs capture --image-outputs).")] = "attention",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing --out/--png written by `ovstore maps`.")] = False,
    skip_damaged: Annotated[bool, typer.Option("--skip-damaged", help="Skip images whose stored data is damaged (listed, and recorded in a .zarr output's attrs).")] = False,
    scheduler: Annotated[Optional[str], typer.Option(help="Run as a resumable job on Dask (FILE.zarr only): 'local' (a LocalCluster of --workers processes), a scheduler address tcp://HOST:8786 (its workers must see the store and --out's folder), or 'synchronous' (in this process). Images are split into partitions; a re-run of an interrupted job skips the finished ones and gives the same bytes.")] = None,
    workers: Annotated[Optional[int], typer.Option(help="Worker processes of --scheduler local (default: one per core).")] = None,
    partition_size: Annotated[int, typer.Option(help="Images per Dask task with --scheduler.")] = 4,
    head: Annotated[Optional[Path], typer.Option("--head", help="Grounding head file (`ovstore ground train`): also write its probability maps of each attribution text, as a class phrase, to OUT_STEM.head.npy (image, attribution, H, W).")] = None,
    refine: Annotated[Optional[str], typer.Option("--refine", metavar="SPEC", help=_REFINE_HELP)] = None,
) -> None:
    """Compute OVAM maps for attribution prompts over stored images (no diffusion re-run).

    Example: ovstore maps caps.zarr -a "a cat and a sofa" -a "furniture" --out maps.zarr --png overlays/
    The model's own attention over its context: ovstore maps caps.zarr --generation-context --out ctx.zarr
    """
    from .analyze import MapConfig, compute_maps, display_maps, save_maps, write_maps_zarr, write_overlays
    from .errors import OutputError, StoreError
    from .store import open_store

    if generation_context:
        _context_maps(store, out=out, image=image, png=png, png_all_tokens=png_all_tokens, overwrite=overwrite,
                      device=device,
                      skip_damaged=skip_damaged, attribution=attribution, attributions_file=attributions_file, token=token,
                      config_options=dict(layers=_layer_selection(layer, resolution, include_mid=False),
                                          steps=_calls_option(calls, steps, "maps"), branch=branch,
                                          activation=activation, aggregation=aggregation, normalize=normalize,
                                          size=size, refine=refine, space=space))
        return
    prompts = list(attribution or [])
    if attributions_file is not None:  # blank lines skipped, the others' line numbers kept (prompt_line)
        from .inputs import read_lines

        prompts += read_lines(attributions_file, "--attributions-file")
    if not prompts and not token:
        raise InvalidInputError("no attribution; pass --attribution TEXT, --attributions-file FILE or --token FILE")
    if combine_tokens and not token:
        raise InvalidInputError("--combine-tokens needs --token files to combine")
    n_attributions = len(prompts) + (1 if combine_tokens else len(token or ()))
    if out.suffix not in (".npy", ".zarr"):
        raise InvalidInputError(f"--out {out}: use a .npy (one prompt) or .zarr (any number) file name")
    if out.suffix == ".npy" and n_attributions > 1:
        raise InvalidInputError(f"--out {out} is .npy, which holds one attribution; use FILE.zarr for {n_attributions}")
    if scheduler is not None and out.suffix != ".zarr":
        raise InvalidInputError(f"--scheduler runs maps as a job that writes FILE.zarr; --out {out} is not .zarr")
    if scheduler is None and workers is not None:
        raise InvalidInputError("--workers sizes the local cluster of --scheduler local; add --scheduler local")
    from .analyze import overlay_dir
    from .outputs import open_output

    inputs = [store, *(token or ()), *([attributions_file] if attributions_file else [])]
    target = open_output(out, "maps", kind="file" if out.suffix == ".npy" else "dir", inputs=inputs,
                         overwrite=overwrite)  # refused before any work
    if png_all_tokens and png is None:
        raise InvalidInputError("--png-all-tokens draws into the --png pictures; add --png DIR (or drop it)")
    if png is not None:
        overlay_dir(png, overwrite=overwrite, inputs=[*inputs, target.path])
    if aggregation not in ("sum", "mean"):
        raise InvalidInputError(f"--aggregation {aggregation!r} is not one of sum, mean")
    config = MapConfig(
        layers=_layer_selection(layer, resolution, include_mid=False),
        steps=_calls_option(calls, steps, "maps"), branch=branch, activation=activation, head_reduction=aggregation,
        step_reduction=aggregation, layer_reduction=aggregation, normalize=normalize,
        size=tuple(size) if size else None, refine=refine, space=space,
    )
    from .devices import check_device

    check_device(device)  # before the scan for damaged images and the text encoder
    _quiet_libraries()
    s = open_store(store)
    if head is not None:  # no attribution text, a bad head file or another model's store: refused before any work
        from .ground import check_head_store, load_head

        if not prompts:
            raise InvalidInputError("--head maps attribution texts as class phrases; give --attribution TEXT")
        check_head_store(load_head(head), s)
    chosen = s.check_images(image)
    damaged: list[int] = []
    if skip_damaged:
        from .partial import find_damaged, listing

        damaged = find_damaged(s, chosen, picture=png is not None)
        chosen = [i for i in chosen if i not in damaged]
        if damaged:
            console.print(f"skipping {len(damaged)} damaged images: {listing(damaged)} (`ovstore verify {store}` "
                          "says what is damaged)", highlight=False)
        if not chosen:
            raise InvalidInputError(f"every chosen image of {store} is damaged; nothing to compute")
    attributions: list = list(prompts)
    encoder = None  # loaded here only when the tokens need its start-of-text row; then shared
    if token:
        from .optimize import store_token_attributions

        learned, encoder = store_token_attributions(s, token, combine=combine_tokens, model=model, device=device)
        attributions += learned
    with _progress(len(chosen), "maps") as bar:
        task = bar.add_task("maps", total=len(chosen))
        options = dict(images=chosen, config=config, text_encoder=encoder, model=model, device=device,
                       progress=lambda _: bar.advance(task))
        try:
            if out.suffix == ".zarr":  # streamed to disk block by block: memory stays bounded
                import xarray as xr

                if scheduler is not None:
                    from .analyze import write_maps_job

                    write_maps_job(s, attributions, out, **options, overwrite=overwrite, inputs=inputs,
                                   skipped_damaged=damaged, scheduler=scheduler, workers=workers,
                                   partition_size=partition_size)
                else:
                    write_maps_zarr(s, attributions, out, **options, overwrite=overwrite, inputs=inputs,
                                    skipped_damaged=damaged)
                result = xr.open_zarr(out, consolidated=False)["ovam_maps"]
            else:
                result = compute_maps(s, attributions, **options, cache=False)  # one pass, then the process ends
                save_maps(result, out, overwrite=overwrite, inputs=inputs)
        except StoreError as exc:
            if skip_damaged:
                raise
            hint = "" if "--skip-damaged" in str(exc) else (". Add --skip-damaged to write the maps of the "
                                                             "other images")
            raise type(exc)(f"{exc}; nothing was written to {out}{hint}") from None
    console.print(f"wrote maps {tuple(result.shape)} (image, token, y, x) for {n_attributions} attribution(s) to {out}")
    if png is not None:
        try:
            shown = result if normalize != "none" else display_maps(result, s)  # --normalize: already applied
            files = write_overlays(shown, s.image, png, overwrite=overwrite, inputs=[*inputs, target.path],
                                   all_tokens=png_all_tokens)
        except OutputError as exc:
            raise OutputError(f"the maps in {out} are complete, but {exc}") from None
        console.print(f"wrote {len(files)} PNG pictures to {png}")
    if head is not None:  # the head's probabilities beside the attention maps (ovstore.ground)
        from .ground import write_head_maps

        path, shape = write_head_maps(s, head, [getattr(p, "text", p) for p in prompts], out, images=chosen, model=model,
                                      device=device, overwrite=overwrite)
        console.print(f"wrote grounding-head maps {shape} (image, attribution, y, x) to {path}")


def _context_maps(store: Path, *, out: Path, image, png, png_all_tokens: bool, overwrite: bool, device: str,
                  skip_damaged: bool,
                  attribution, attributions_file, token, config_options: dict) -> None:
    """``maps --generation-context``: :func:`ovstore.analyze.check_context_request`, then
    :func:`ovstore.analyze.write_context_maps`."""
    from .analyze import check_context_request, context_map_config, write_context_maps

    request = check_context_request(store, out, images=image, config=context_map_config(**config_options), png=png,
                                    overwrite=overwrite, device=device, attributions=attribution or (),
                                    attributions_file=attributions_file, tokens=token or (),
                                    skip_damaged=skip_damaged, png_all_tokens=png_all_tokens)
    if request.damaged:
        from .partial import listing

        console.print(f"skipping {len(request.damaged)} damaged images: {listing(request.damaged)} (`ovstore verify "
                      f"{store}` says what is damaged)", highlight=False)
    _quiet_libraries()
    with _progress(len(request.images), "maps") as bar:
        task = bar.add_task("maps", total=len(request.images))
        result = write_context_maps(request, progress=lambda _: bar.advance(task))
    console.print(f"wrote generation-context maps {tuple(result.maps.shape)} (image, token, y, x) to {out}")
    if png is not None:
        console.print(f"wrote {len(result.overlays)} PNG overlays to {png}")


@app.command()
def optimize(
    store: Annotated[Path, typer.Argument(help="Store holding the annotated images.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Token file to write (.safetensors); with --tasks-file, a folder for one NAME.safetensors per class.")],
    image: Annotated[Optional[list[int]], typer.Option("--image", "-i", help="Training image index; pair each with a --mask (repeatable).")] = None,
    mask: Annotated[Optional[list[Path]], typer.Option("--mask", "-m", help="Binary mask image of the class in the matching --image (any size of the image's shape).")] = None,
    init: Annotated[Optional[str], typer.Option(help="Word to start from (its token in the context sentence).")] = None,
    name: Annotated[Optional[str], typer.Option(help="Class name stored in the token (default: the init word).")] = None,
    tasks_file: Annotated[Optional[Path], typer.Option(help='Several classes in one pass over the queries: JSON lines like {"init": "cat", "images": [0, 4], "masks": ["cat0.png", "cat4.png"], "name": "cat"} (mask paths relative to the file).')] = None,
    context: Annotated[str, typer.Option(help="Sentence encoded to initialise the rows; {} is the init word.")] = "A photograph of a {}",
    recipe: Annotated[str, typer.Option(help="Optimization recipe: reference (OVAM's).")] = "reference",
    epochs: Annotated[int, typer.Option(help="SGD epochs (reference: 800).")] = 800,
    lr: Annotated[float, typer.Option(help="Learning rate (reference: 100; maps are min-max normalised).")] = 100.0,
    lr_step: Annotated[int, typer.Option(help="StepLR period in epochs (reference: 120).")] = 120,
    lr_gamma: Annotated[float, typer.Option(help="StepLR factor (reference: 0.7).")] = 0.7,
    layer: Annotated[Optional[list[str]], typer.Option("--layer", help="Use layers matching this pattern (repeatable).")] = None,
    resolution: Annotated[Optional[list[str]], typer.Option("--resolution", help="Use layers of this resolution (repeatable).")] = None,
    calls: Annotated[Optional[str], typer.Option("--calls", help="Stored UNet calls to use, by position among the stored ones, e.g. '0:5,-1' (default: all).")] = None,
    steps: Annotated[Optional[str], typer.Option("--steps", help="(deprecated: use --calls)")] = None,
    model: Annotated[Optional[str], typer.Option(help="Text encoder to initialise from instead of the recorded one.")] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing --out written by `ovstore optimize`.")] = False,
) -> None:
    """Learn a class token from annotated masks, from the store alone (no UNet).

    Example: ovstore optimize caps.zarr --image 0 --mask cat0.png --init cat --out cat.safetensors
    Several classes at once: ovstore optimize caps.zarr --tasks-file classes.jsonl --out tokens/
    """
    from .analyze import MapConfig
    from .optimize import OptimizeConfig, optimize_tokens, tasks_from_options, write_tokens

    request = tasks_from_options(store, out, images=image or (), masks=mask or (), init=init, name=name,
                                 tasks_file=tasks_file, overwrite=overwrite)
    config = OptimizeConfig(
        recipe=recipe, context=context, epochs=epochs, lr=lr, lr_step=lr_step, lr_gamma=lr_gamma,
        maps=MapConfig(layers=_layer_selection(layer, resolution, include_mid=False),
                       steps=_calls_option(calls, steps, "optimize")),
    )
    _quiet_libraries()
    with _progress(epochs, "optimizing") as bar:
        progress_task = bar.add_task("optimize", total=epochs)
        tokens = optimize_tokens(store, list(request.tasks), config=config, model=model, device=device,
                                 progress=lambda epoch, losses: bar.update(progress_task, completed=epoch + 1))
    paths = write_tokens(tokens, out, folder=request.folder, overwrite=overwrite, inputs=request.inputs,
                         rescue_dir=Path(store).resolve().parent)
    for task, token, path in zip(request.tasks, tokens, paths):
        t = token.training
        console.print(f"wrote {path}: loss {t['best_loss']:.4f}, training IoU {t['train_iou']:.3f} "
                      f"(plain word {task.init_word!r}: {t['plain_word_iou']:.3f})", highlight=False)


@app.command()
def label(
    store: Annotated[Path, typer.Argument(help="Store directory.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output dataset folder (VOC tree + COCO JSON).")],
    classes: Annotated[Optional[str], typer.Option(help="Comma-separated class names, numbered from 1 in this order.")] = None,
    classes_file: Annotated[Optional[Path], typer.Option(help="One class name per line.")] = None,
    prompt_template: Annotated[Optional[str], typer.Option(help="Sentence of a class word; {} is the class. Default: the model's, else 'a photograph of a {}'.")] = None,
    token: Annotated[Optional[list[Path]], typer.Option("--token", help="Learned token file; used for the class it names (repeatable).")] = None,
    mode: Annotated[Optional[str], typer.Option(help="separate: each class its own softmax; compete: all classes in one softmax. Default: the model's, else separate.")] = None,
    normalize: Annotated[Optional[str], typer.Option(help="Class maps to [0, 1] per image: minmax ((m - min)/(max - min)) or max (m/max, the reference protocol; its floor can be high, about 2/3 of the max on the toy-world model). Default: the model's, else minmax.")] = None,
    threshold: Annotated[Optional[float], typer.Option(help="Threshold on the normalised maps. Default: the model's, else 0.6 (chosen for minmax on the v1 toy-world model's calibration set; DAAM-style evaluations of Stable Diffusion use max with ≈0.4).")] = None,
    class_threshold: Annotated[Optional[list[str]], typer.Option("--class-threshold", help="CLASS=VALUE per-class threshold (repeatable).")] = None,
    adaptive: Annotated[Optional[bool], typer.Option("--adaptive/--no-adaptive", help="DiffuMask adaptive threshold per class and image: the middle of the sweep range where the mask area is most stable. Default: the model's, else off.", show_default=False)] = None,
    sweep: Annotated[Optional[str], typer.Option(help="Thresholds tried by --adaptive: 'A,B,C' or 'START:STOP:STEP' (inclusive). Default: the model's, else 0.5:0.95:0.05.")] = None,
    crf: Annotated[Optional[bool], typer.Option("--crf/--no-crf", help="DenseCRF refinement (pip install 'ovstore\\[crf]'); thresholds still decide what is labelled. Default: the model's, else off.", show_default=False)] = None,
    min_component: Annotated[Optional[int], typer.Option(help="Remove class regions smaller than this many pixels. Default: the model's, else 0.")] = None,
    prompt_classes_only: Annotated[Optional[bool], typer.Option("--prompt-classes-only/--all-classes", help="Only label classes named in each image's prompt, by name or by one of their --class-words (--all-classes: every class). Default: the model's, else all classes.", show_default=False)] = None,
    maps_from: Annotated[Optional[str], typer.Option(help="Where class maps come from: template (each class's --prompt-template sentence or --token, the same for every image) or prompt (the class's words as they stand in each image's own generation prompt, in its softmax, as DiffuMask and Dataset Diffusion label; classes the prompt does not name stay empty). Default: the model's, else template.")] = None,
    space: Annotated[Optional[str], typer.Option(help="SD3/FLUX: the class maps' space, attention (default) or output (ConceptAttention's output-space maps; the store needs capture --image-outputs).")] = None,
    class_words: Annotated[Optional[list[str]], typer.Option("--class-words", help="CLASS=WORD,WORD: other words that name a class in prompts, for --prompt-classes-only (repeatable), e.g. dog=puppy,hound. Default: the model's, else none.")] = None,
    no_model_defaults: Annotated[bool, typer.Option("--no-model-defaults", help="Ignore the model's defaults (its ovstore_defaults.json, recorded in the store at capture): options not given take ovstore's.")] = False,
    image: Annotated[Optional[list[int]], typer.Option("--image", "-i", help="Image index (repeatable); default: every complete image.")] = None,
    scheduler: Annotated[Optional[str], typer.Option(help="'synchronous' (in-process), or a dask.distributed scheduler address; default: a LocalCluster.")] = None,
    workers: Annotated[Optional[int], typer.Option(help="LocalCluster worker processes (default: one per core).")] = None,
    partition_size: Annotated[int, typer.Option(help="Images per task (bounds memory per worker).")] = 8,
    write_maps: Annotated[bool, typer.Option("--write-maps", help="Also write the float class maps to OUT/maps.zarr (added for images finished earlier).")] = False,
    model: Annotated[Optional[str], typer.Option(help="Text encoder to use instead of the recorded one.")] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    skip_damaged: Annotated[bool, typer.Option("--skip-damaged", help="Skip images whose stored data is damaged (listed, and recorded in annotations.json info); a later run tries them again.")] = False,
    refine: Annotated[Optional[str], typer.Option("--refine", metavar="SPEC", help=_REFINE_HELP + " Applied to the class maps before thresholds, --adaptive and --crf; recorded in the provenance.")] = None,
) -> None:
    """Label every complete image into a segmentation dataset (VOC PNGs + COCO RLE JSON).

    Settings not given come from the model's defaults (its ovstore_defaults.json, recorded in
    the store at capture), else ovstore's; annotations.json records each one and its source.
    Re-running the same command resumes: finished images are skipped.
    Example: ovstore label caps.zarr --classes cat,dog,sofa --out dataset/
    """
    from .label import label_config, label_store
    from .store import analysis_defaults, open_store

    opened = open_store(store)
    defaults = None if no_model_defaults else analysis_defaults(opened)
    config = label_config(classes=classes, classes_file=classes_file, tokens=token or (),
                          class_thresholds=class_threshold, class_words=class_words, adaptive=adaptive, sweep=sweep,
                          defaults=defaults, prompt_template=prompt_template, mode=mode, normalize=normalize,
                          threshold=threshold, crf=crf, min_component=min_component,
                          prompt_classes_only=prompt_classes_only, maps_from=maps_from, refine=refine, space=space)
    from_model = [k for k, v in config.sources.items() if v == "model"]
    if from_model:
        console.print(f"model defaults ({defaults.file}): "
                      + ", ".join(f"{k} {getattr(config, k)!r}" for k in from_model), highlight=False)
    _quiet_libraries()
    total = len(opened.check_images(image))
    with _progress(total, "labelling") as bar:
        task = bar.add_task("label", total=total)
        result = label_store(store, out, config, images=image, scheduler=scheduler, workers=workers,
                             partition_size=partition_size, write_maps=write_maps, model=model, device=device,
                             progress=lambda _: bar.advance(task), skip_damaged=skip_damaged,
                             model_defaults=not no_model_defaults)
        bar.update(task, completed=total)
    console.print(f"labelled {len(result.labelled)} images ({len(result.skipped)} already done) into {out}; "
                  f"COCO: {result.coco}")
    if result.damaged:
        from .partial import listing

        console.print(f"skipped {len(result.damaged)} damaged images: {listing(result.damaged)} (`ovstore verify "
                      f"{store}` says what is damaged; a later run tries them again)", highlight=False)


@app.command()
def evaluate(
    pred_dir: Annotated[Path, typer.Argument(help="Predicted label PNGs (a folder or a VOC tree).")],
    gt_dir: Annotated[Path, typer.Argument(help="Ground-truth label PNGs, matched by file name (255 = ignore).")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Folder for report.json, report.md and report.png.")] = None,
    classes: Annotated[Optional[str], typer.Option(help="Comma-separated class names numbered from 1 (background is 0), for folders without labelmap.txt.")] = None,
    labelmap: Annotated[Optional[Path], typer.Option(help="labelmap.txt giving the class names (background first).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing --out written by `ovstore evaluate`.")] = False,
) -> None:
    """Per-class IoU, mIoU, precision/recall and confusion matrix (I and U summed over the set).

    Class names come from --classes/--labelmap, else the folders' labelmap.txt (which must agree).
    """
    from .label import evaluate_dirs, evaluation_classes, write_report

    names = evaluation_classes(classes, labelmap)
    inputs = [pred_dir, gt_dir, *([labelmap] if labelmap else [])]
    if out is not None:
        from .outputs import open_output

        open_output(out, "evaluate", kind="dir", inputs=inputs, overwrite=overwrite)  # before the work
    report = evaluate_dirs(pred_dir, gt_dir, classes=names)
    Console().print(report.to_markdown(), markup=False, highlight=False)
    if out is not None:
        files = write_report(report, out, overwrite=overwrite, inputs=inputs)
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


@app.command()
def serve(
    store: Annotated[Path, typer.Argument(help="Store directory.")],
    host: Annotated[str, typer.Option(help="Address to listen on; another than 127.0.0.1 may be reachable by others, and the viewer has no authentication (a warning is printed).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on (0: a free one).")] = 8765,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    model: Annotated[Optional[str], typer.Option(help="Load the text encoder from this pipeline instead of the recorded one.")] = None,
    cache_mb: Annotated[int, typer.Option(help="Memory for the prepared queries of recently shown images (MB; least recently used evicted).")] = 2048,
    space: Annotated[str, typer.Option(help="SD3/FLUX: attention (default) or output (ConceptAttention's output-space maps; the store needs capture --image-outputs).")] = "attention",
) -> None:
    """A local web viewer: type any words, see their maps over the stored images (read-only).

    Example: ovstore serve caps.zarr   (then open the printed URL)
    """
    from .serve import serve as run_viewer

    _quiet_libraries()
    if cache_mb < 1:
        raise InvalidInputError(f"--cache-mb {cache_mb}: give at least 1 (MB)")
    run_viewer(store, host=host, port=port, device=device, model=model, cache_bytes=cache_mb * 2**20, space=space,
               announce=lambda m: console.print(m, highlight=False, markup=False))


ground_app = typer.Typer(help="Grounding heads trained from stores (after Grounded Diffusion): masks for any class word.",
                         no_args_is_help=True)
app.add_typer(ground_app, name="ground")


@ground_app.command("train")
def ground_train(
    stores: Annotated[list[Path], typer.Argument(help="Stores holding the training images.")],
    labels: Annotated[list[Path], typer.Option("--labels", help="Label folder of each store, in order: `ovstore label` output, or exact masks in the same VOC layout (labelmap.txt + SegmentationClass/NNNNN.png by image index).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Head file to write (.safetensors).")],
    classes: Annotated[Optional[str], typer.Option(help="Comma-separated seen classes to train on (default: every class the label folders name).")] = None,
    layer: Annotated[Optional[list[str]], typer.Option("--layer", help="Read layers matching this pattern (repeatable); default: every stored layer.")] = None,
    resolution: Annotated[Optional[list[str]], typer.Option("--resolution", help="Read layers of this resolution (repeatable).")] = None,
    calls: Annotated[Optional[str], typer.Option("--calls", help="Stored UNet calls to average, by position among the stored ones, e.g. '0:5,-1' (default: all).")] = None,
    branch: Annotated[Optional[str], typer.Option(help="Stored half to read: uncond or cond (default: the first stored).")] = None,
    epochs: Annotated[int, typer.Option(help="Most epochs.")] = 30,
    val_fraction: Annotated[float, typer.Option(help="Fraction of the images held out for validation (early stopping).")] = 0.2,
    patience: Annotated[int, typer.Option(help="Stop after this many epochs without a lower validation loss.")] = 6,
    lr: Annotated[float, typer.Option(help="AdamW learning rate.")] = 3e-3,
    batch_size: Annotated[int, typer.Option(help="(image, class) examples per step.")] = 16,
    width: Annotated[int, typer.Option(help="Channels of the head's features.")] = 32,
    image: Annotated[bool, typer.Option("--image/--no-image", help="Also read the stored image, so masks follow object edges at the image's resolution, not the attention grid's (--no-image: attention features only).")] = True,
    text: Annotated[str, typer.Option(help="Class text: prompt (the class's words as they stand in each image's own prompt, else the template) or template.")] = "prompt",
    class_words: Annotated[Optional[list[str]], typer.Option("--class-words", help="CLASS=WORD,WORD: other words naming a class in prompts (repeatable).")] = None,
    template: Annotated[str, typer.Option(help="Sentence the class word is encoded in; {} is the word.")] = "a photograph of a {}",
    seed: Annotated[int, typer.Option(help="Seed of the split, the shuffles and the initial weights.")] = 0,
    cache_mb: Annotated[int, typer.Option(help="Memory for the features read from the stores (MiB); the rest is read again each epoch.")] = 512,
    model: Annotated[Optional[str], typer.Option(help="Text encoder to use instead of the recorded one.")] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing head file --out.")] = False,
) -> None:
    """Train a grounding head on stored queries and label folders; re-running resumes from its checkpoint.

    Example: ovstore ground train caps.zarr --labels dataset/ --classes circle,square --out head.safetensors
    """
    from tqdm import tqdm

    from .ground import TrainConfig, train_head
    from .inputs import check_int
    from .label import parse_class_words

    check_int(cache_mb, "--cache-mb", 0, 2**30)
    config = TrainConfig(epochs=epochs, val_fraction=val_fraction, patience=patience, lr=lr, batch_size=batch_size,
                         width=width, seed=seed, template=template, text=text, image=image,
                         cache_bytes=cache_mb * 2**20)
    words = parse_class_words(class_words) if class_words else None
    _quiet_libraries()
    with tqdm(total=epochs, desc="training", unit="epoch", disable=not console.is_terminal) as bar:
        def progress(report) -> None:
            bar.n = report.epoch + 1
            bar.set_postfix(train=f"{report.train_loss:.3f}", val=f"{report.val_loss:.3f}", iou=f"{report.val_iou:.3f}")

        result = train_head(stores, labels, out, classes=classes.split(",") if classes else None,
                            layers=_layer_selection(layer, resolution, include_mid=True), calls=calls, branch=branch,
                            config=config, class_words=words, model=model, device=device, overwrite=overwrite,
                            progress=progress)
    t = result.head.training
    resumed = f", resumed after epoch {result.resumed_from}" if result.resumed_from else ""
    console.print(f"wrote {result.path}: {t['parameters']} parameters, {t['epochs_run']} epochs (best {t['best_epoch']}"
                  f"{resumed}), validation loss {t['best_validation_loss']:.4f}, IoU {t['best_validation_iou']:.3f}, "
                  f"training IoU {t['train_iou']:.3f}; classes seen: {', '.join(result.head.classes_seen)}",
                  highlight=False)


@ground_app.command("apply")
def ground_apply(
    store: Annotated[Path, typer.Argument(help="Store directory.")],
    head: Annotated[Path, typer.Option("--head", help="Head file from `ovstore ground train`.")],
    classes: Annotated[str, typer.Option(help="Comma-separated class words, seen in training or not, numbered from 1 in this order.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output dataset folder (VOC tree + COCO JSON, as `ovstore label`).")],
    threshold: Annotated[Optional[float], typer.Option(help="Probability a pixel's most probable class must pass; default: the one chosen on the head's validation split at training (0.5 for heads without one).")] = None,
    prompt_classes_only: Annotated[bool, typer.Option("--prompt-classes-only/--all-classes", help="Only label classes named in each image's prompt, by name or --class-words.")] = False,
    class_words: Annotated[Optional[list[str]], typer.Option("--class-words", help="CLASS=WORD,WORD: other words naming a class in prompts (repeatable).")] = None,
    image: Annotated[Optional[list[int]], typer.Option("--image", "-i", help="Image index (repeatable); default: every complete image.")] = None,
    scheduler: Annotated[Optional[str], typer.Option(help="'synchronous' (in-process), or a dask.distributed scheduler address; default: a LocalCluster.")] = None,
    workers: Annotated[Optional[int], typer.Option(help="LocalCluster worker processes (default: one per core).")] = None,
    partition_size: Annotated[int, typer.Option(help="Images per task (bounds memory per worker).")] = 8,
    model: Annotated[Optional[str], typer.Option(help="Text encoder to use instead of the recorded one.")] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
) -> None:
    """Label every complete image with a grounding head's masks (VOC PNGs + COCO RLE JSON, scored by
    `ovstore evaluate`). Re-running the same command resumes.

    Example: ovstore ground apply caps.zarr --head head.safetensors --classes circle,square,triangle --out ground/
    """
    from .ground import apply_head
    from .label import parse_class_words
    from .store import open_store

    words = parse_class_words(class_words) if class_words else None
    _quiet_libraries()
    total = len(open_store(store).check_images(image))
    with _progress(total, "grounding") as bar:
        task = bar.add_task("ground", total=total)
        result = apply_head(store, head, classes.split(","), out, threshold=threshold,
                            prompt_classes_only=prompt_classes_only, class_words=words, images=image,
                            scheduler=scheduler, workers=workers, partition_size=partition_size, model=model,
                            device=device, progress=lambda _: bar.advance(task))
    console.print(f"labelled {len(result.labelled)} images ({len(result.skipped)} already done) into {out}; "
                  f"COCO: {result.coco}")


def _plain_switches(group) -> None:
    """Show switches (``--resume``, ``--help``...) without typer's ``<bool>`` type column, which
    reads as if they took a value (``--resume true``)."""
    def clear(option):
        if option is not None:
            option.metavar = ""
        return option

    for cmd in [group, *getattr(group, "commands", {}).values()]:
        if cmd is not group and getattr(cmd, "commands", None):  # a sub-app (`ovstore ground`)
            _plain_switches(cmd)
            continue
        for param in cmd.params:
            if getattr(param, "is_flag", False):  # --crf/--no-crf too
                param.metavar = ""
        cmd.get_help_option = lambda ctx, _get=cmd.get_help_option: clear(_get(ctx))


def click_command():
    """The click command behind :data:`app`, as the console script runs it."""
    group = typer.main.get_command(app)
    _plain_switches(group)
    return group


def main() -> None:
    """Console entry point: one-line errors instead of tracebacks for expected failures."""
    from rich.markup import escape

    try:
        code = click_command()(standalone_mode=False)
        if code == 130:  # click turns Ctrl-C inside a command into exit status 130
            raise KeyboardInterrupt
        if isinstance(code, int) and code:
            sys.exit(code)
    except OvstoreError as exc:
        from .partial import RunInterrupted

        if isinstance(exc, RunInterrupted):  # Ctrl-C, with what was and was not done
            console.print(f"interrupted; {exc.summary}", markup=False)
            sys.exit(130)
        console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
        sys.exit(2)
    except KeyboardInterrupt:
        command = next((a for a in sys.argv[1:] if not a.startswith("-")), "")
        if command == "label":
            console.print("interrupted; finished images are kept, re-run the same `ovstore label` command to resume",
                          markup=False)
        elif command == "capture":
            console.print("interrupted; complete images are kept, resume with `ovstore capture --resume --out STORE` "
                          "(or the same command with --resume)", markup=False)
        else:
            console.print("interrupted", markup=False)
        sys.exit(130)
    except Exception as exc:
        # click's exceptions, from click itself or the copy typer bundles (typer._click)
        if callable(getattr(exc, "show", None)) and isinstance(getattr(exc, "exit_code", None), int):
            exc.show()
            sys.exit(exc.exit_code)
        if type(exc).__name__ == "Abort" and "click" in type(exc).__module__:
            sys.exit(1)
        raise


if __name__ == "__main__":
    main()

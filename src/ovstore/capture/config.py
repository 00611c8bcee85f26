"""Capture settings."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import InvalidInputError
from ..inputs import check_float, check_int
from ..selection import LayerSelection, parse_index_spec
from ..store import CODEC_PRESETS, DEFAULT_CODEC, ImageRecord, StoreLayout

__all__ = ["CaptureConfig", "BRANCH_CHOICES", "PRESETS", "store_settings"]

#: Denoising steps: the schedulers of Stable-Diffusion-style pipelines have 1000 training timesteps.
MAX_STEPS = 1000
#: Largest image side accepted (8x the latent side; SD 1.5 is 512, SDXL 1024).
MAX_SIZE = 8192

BRANCH_CHOICES = {"uncond": ("uncond",), "cond": ("cond",), "both": ("uncond", "cond")}

#: Storage presets, named for what they keep. ``finest`` layers run at the finest grid of the
#: cross-attention layers (SD 1.5: the 64x64 layers at the latent resolution, 57 % of the
#: bytes; SDXL at 1024²: the 64x64 layers one level down, 25 %). ``thin`` keeps the first layer
#: of each transformer stack (the model family says which; SD 1.x has one per stack, so thin
#: is full; SDXL: 11 of its 70 layers, 20 % of the bytes). Sizes and measured map deviations
#: are in BENCHMARKS.md. Explicit --layer/--resolution/--calls replace a preset's choice.
#: MM-DiT families (SD3, FLUX) have their own: ``first-*`` keep the first fraction (numerator,
#: denominator, rounded up) of the recorded blocks in order (joint/double; with FLUX's
#: --single-blocks, the double then the single blocks). A block's text stream attends the image
#: keys and values of every block before it, so a preset can only drop the last blocks (a
#: ConceptAttention-style "late blocks only" preset cannot be analysed without the early ones).
#: Each family says which presets apply to it (``ModelFamily.presets``).
PRESETS = {
    "full": {"skip_finest": False, "calls": None},
    "no-finest": {"skip_finest": True, "calls": None},
    "half-calls": {"skip_finest": False, "calls": "::2"},
    "no-finest-half-calls": {"skip_finest": True, "calls": "::2"},
    "thin": {"skip_finest": False, "calls": None, "thin": True},
    "thin-half-calls": {"skip_finest": False, "calls": "::2", "thin": True},
    "first-two-thirds": {"skip_finest": False, "calls": None, "first_blocks": (2, 3)},
    "first-half": {"skip_finest": False, "calls": None, "first_blocks": (1, 2)},
    "first-half-half-calls": {"skip_finest": False, "calls": "::2", "first_blocks": (1, 2)},
}


@dataclass(frozen=True, slots=True)
class CaptureConfig:
    """How to generate and what to record.

    Parameters
    ----------
    num_inference_steps, guidance
        Passed to the pipeline. With ``guidance <= 1`` there is no classifier-free guidance
        and the single half is stored (labelled ``cond``).
    height, width
        Image size; ``None`` uses the pipeline's native size.
    branch
        ``"uncond"`` (default, as the reference implementation), ``"cond"`` or ``"both"``.
    dtype
        Storage dtype of queries: ``"float16"`` (default) or ``"float32"``.
    layers
        Which cross-attention layers to record (default: all, mid-block included).
    calls
        Which UNet calls to record, e.g. ``"0:10,20,-1"`` (default: every call).
    batch_size
        Images per pipeline call.
    codec
        Compressor preset for query arrays.
    preset
        Storage preset (see :data:`PRESETS`): ``full`` (default), ``no-finest`` (without the
        layers at the finest cross-attention grid), ``half-calls`` (every other UNet call),
        ``no-finest-half-calls``, ``thin`` (the first layer of each transformer stack; for
        SDXL's 10-deep stacks) or ``thin-half-calls``; for SD3 and FLUX ``full``,
        ``half-calls``, ``first-two-thirds``, ``first-half`` (the first blocks only) and
        ``first-half-half-calls``.
    max_sequence_length
        T5 tokens of the prompt encoding (SD3, FLUX: the pipelines' ``max_sequence_length``);
        ``None``: the pipeline's default. Refused for families without a T5 encoder.
    true_cfg_scale
        FLUX: true classifier-free guidance scale (the pipeline's ``true_cfg_scale``; with a
        negative prompt and a value > 1 every step runs the prompt's and the negative
        prompt's calls, whose halves ``branch`` chooses). ``guidance`` is then FLUX's embedded
        guidance. Refused for other families.
    single_blocks
        FLUX: also record the single-stream blocks (off by default; see docs/store-format.md).
    self_attention
        Latent grids (e.g. ``((32, 32),)``, or ``"16,32"``) at which each image's self-attention
        (``attn1``) matrix, averaged over heads, stored calls and layers, is stored for the
        self-attention refinements of maps and labels; default none. UNet families only.
    image_outputs
        SD3/FLUX: also record each block's image attention outputs (before ``to_out``), which
        output-space maps (``MapConfig(space="output")``, ConceptAttention's) need; one more
        array the size of the image keys. Refused for other families.
    """

    num_inference_steps: int = 50
    guidance: float = 7.5
    height: int | None = None
    width: int | None = None
    branch: str = "uncond"
    dtype: str = "float16"
    layers: LayerSelection = field(default_factory=LayerSelection)
    calls: tuple[str, ...] | None = None
    batch_size: int = 1
    codec: str = DEFAULT_CODEC
    preset: str = "full"
    max_sequence_length: int | None = None
    true_cfg_scale: float | None = None
    single_blocks: bool = False
    self_attention: tuple[tuple[int, int], ...] = ()
    image_outputs: bool = False

    def __post_init__(self) -> None:
        from .self_attention import parse_self_attention

        object.__setattr__(self, "self_attention", parse_self_attention(self.self_attention))
        if self.max_sequence_length is not None:
            check_int(self.max_sequence_length, "--max-sequence-length", 1, 4096)
        if self.true_cfg_scale is not None:
            check_float(self.true_cfg_scale, "--true-cfg-scale", 0.0)
        if self.preset not in PRESETS:
            raise InvalidInputError(f"--preset {self.preset!r} is not one of {', '.join(PRESETS)}")
        if self.preset != "full" and (self.calls is not None and PRESETS[self.preset]["calls"]):
            raise InvalidInputError(f"--preset {self.preset} chooses the UNet calls; drop --calls or the preset")
        if self.branch not in BRANCH_CHOICES:
            raise InvalidInputError(f"--branch {self.branch!r} is not one of uncond, cond, both")
        if self.dtype not in ("float16", "float32"):
            raise InvalidInputError(f"--dtype {self.dtype!r} is not one of float16, float32")
        check_int(self.num_inference_steps, "--steps", 1, MAX_STEPS)
        check_float(self.guidance, "--guidance", 0.0)
        check_int(self.batch_size, "--batch-size", 1, 4096)
        for name in ("height", "width"):
            value = getattr(self, name)
            if value is not None:
                check_int(value, f"--{name}", 8, MAX_SIZE)
                if value % 8:
                    raise InvalidInputError(f"--{name} {value} must be a multiple of 8 (the VAE downsamples 8x), "
                                            f"e.g. {max(8, value - value % 8)} or {value - value % 8 + 8}")
        if self.codec not in CODEC_PRESETS:
            raise InvalidInputError(f"--codec {self.codec!r} is not one of {', '.join(CODEC_PRESETS)}")
        if self.branch == "both" and self.guidance <= 1 and self.true_cfg_scale is None:
            raise InvalidInputError(
                "--branch both needs classifier-free guidance (--guidance > 1); with guidance "
                "<= 1 there is a single half"
            )
        if isinstance(self.calls, str):
            object.__setattr__(self, "calls", parse_index_spec(self.calls))

    @property
    def skip_finest(self) -> bool:
        """Whether the preset drops the layers at the latent resolution (unless layers are named)."""
        return bool(PRESETS[self.preset]["skip_finest"]) and not (self.layers.patterns or self.layers.resolutions)

    @property
    def thin(self) -> bool:
        """Whether the preset keeps only the first layer of each transformer stack (unless layers are named)."""
        return bool(PRESETS[self.preset].get("thin")) and not (self.layers.patterns or self.layers.resolutions)

    @property
    def first_blocks(self) -> tuple[int, int] | None:
        """The fraction ``(numerator, denominator)`` of the first blocks the preset keeps
        (MM-DiT presets; ``None`` when it keeps every block or layers are named)."""
        if self.layers.patterns or self.layers.resolutions:
            return None
        return PRESETS[self.preset].get("first_blocks")

    @property
    def call_spec(self) -> tuple[str, ...] | None:
        """The UNet calls to keep: ``calls`` if given, else the preset's."""
        if self.calls is not None:
            return self.calls
        spec = PRESETS[self.preset]["calls"]
        return parse_index_spec(spec) if spec else None

    @property
    def branches(self) -> tuple[str, ...]:
        """Stored halves; without guidance only the conditional pass exists."""
        if self.guidance <= 1:
            return ("cond",)
        return BRANCH_CHOICES[self.branch]


def store_settings(layout: StoreLayout, records: list[ImageRecord] | None = None) -> dict:
    """The :class:`CaptureConfig` arguments that reproduce ``layout`` (for appending to or
    resuming a store without repeating its settings).

    Steps and guidance come from the first of ``records`` (the requests to be generated), else
    from the layout's recorded capture settings; they are left out when neither exists.
    """
    settings: dict = {
        "height": layout.height,
        "width": layout.width,
        "dtype": layout.query_dtype,
        "codec": layout.codec,
        "layers": LayerSelection(patterns=tuple(l.name for l in layout.layers), include_mid=True),
        "calls": None if tuple(layout.calls) == tuple(range(layout.num_unet_calls))
        else tuple(str(c) for c in layout.calls),
        "preset": "full",
    }
    branches = tuple(layout.branches)
    settings["branch"] = {v: k for k, v in BRANCH_CHOICES.items()}.get(branches, "uncond")
    steps, guidance = layout.extra.get("num_inference_steps"), layout.extra.get("guidance")
    if records:
        steps, guidance = records[0].num_inference_steps, records[0].guidance
    if layout.self_attention:
        settings["self_attention"] = tuple(layout.self_attention)
    if layout.extra.get("max_sequence_length") is not None:
        settings["max_sequence_length"] = int(layout.extra["max_sequence_length"])
    if "image_outputs" in layout.layer_arrays:
        settings["image_outputs"] = True
    if layout.extra.get("true_cfg_scale") is not None:
        settings["true_cfg_scale"] = float(layout.extra["true_cfg_scale"])
    if steps is not None:
        settings["num_inference_steps"] = int(steps)
    if guidance is not None:
        settings["guidance"] = float(guidance)
        if (float(guidance) > 1 or settings.get("true_cfg_scale") is not None) and branches == ("cond",):
            settings["branch"] = "cond"
    return settings

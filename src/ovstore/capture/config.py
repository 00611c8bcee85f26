"""Capture settings."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import InvalidInputError
from ..selection import LayerSelection, parse_index_spec
from ..store.format import CODEC_PRESETS, DEFAULT_CODEC

__all__ = ["CaptureConfig", "BRANCH_CHOICES"]

BRANCH_CHOICES = {"uncond": ("uncond",), "cond": ("cond",), "both": ("uncond", "cond")}


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

    def __post_init__(self) -> None:
        if self.branch not in BRANCH_CHOICES:
            raise InvalidInputError(f"--branch {self.branch!r} is not one of uncond, cond, both")
        if self.dtype not in ("float16", "float32"):
            raise InvalidInputError(f"--dtype {self.dtype!r} is not one of float16, float32")
        if self.num_inference_steps < 1:
            raise InvalidInputError("--steps must be at least 1")
        if self.batch_size < 1:
            raise InvalidInputError("--batch-size must be at least 1")
        for name in ("height", "width"):
            value = getattr(self, name)
            if value is not None and (value < 8 or value % 8):
                raise InvalidInputError(f"--{name} {value} must be a positive multiple of 8")
        if self.codec not in CODEC_PRESETS:
            raise InvalidInputError(f"--codec {self.codec!r} is not one of {', '.join(CODEC_PRESETS)}")
        if self.branch == "both" and self.guidance <= 1:
            raise InvalidInputError(
                "--branch both needs classifier-free guidance (--guidance > 1); with guidance "
                "<= 1 there is a single half"
            )
        if isinstance(self.calls, str):
            object.__setattr__(self, "calls", parse_index_spec(self.calls))

    @property
    def branches(self) -> tuple[str, ...]:
        """Stored halves; without guidance only the conditional pass exists."""
        if self.guidance <= 1:
            return ("cond",)
        return BRANCH_CHOICES[self.branch]

"""Labelling settings: classes, how their maps are made, and how masks are refined."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InvalidInputError

__all__ = ["LabelConfig", "MODES"]

MODES = ("separate", "compete")


@dataclass(frozen=True)
class LabelConfig:
    """How an image's class maps become a semantic label mask.

    Parameters
    ----------
    classes
        Class names, numbered from 1 in this order (0 is background, 255 ignore).
    prompt_template
        Sentence of a class word (``{}``); its class-word tokens give the class map.
    tokens
        Learned token files by class name; those classes use the token instead of the word.
    mode
        ``separate``: every class is its own attribution (its own softmax);
        ``compete``: all classes share one softmax (start-of-text + every class), so a pixel's
        attention is divided between them.
    threshold
        Default threshold on max-normalised maps (the reference's protocol: map / max).
    class_thresholds
        Per-class thresholds overriding ``threshold``.
    adaptive
        DiffuMask-style adaptive threshold per class and image: sweep ``sweep`` and keep the
        threshold where the mask area is most stable.
    crf
        DenseCRF refinement (needs the ``crf`` extra: ``pip install ovstore[crf]``).
    min_component
        Connected class regions smaller than this many pixels become background.
    prompt_classes_only
        Only classes whose name appears in the image's generation prompt may be labelled.
    """

    classes: tuple[str, ...]
    prompt_template: str = "a photograph of a {}"
    tokens: dict[str, Path] = field(default_factory=dict)
    mode: str = "separate"
    threshold: float = 0.4
    class_thresholds: dict[str, float] = field(default_factory=dict)
    adaptive: bool = False
    sweep: tuple[float, ...] = (0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7)
    crf: bool = False
    min_component: int = 0
    prompt_classes_only: bool = False

    def __post_init__(self) -> None:
        classes = tuple(c.strip() for c in self.classes)
        if not classes or any(not c for c in classes):
            raise InvalidInputError("--classes needs non-empty class names, e.g. --classes cat,dog,person")
        if len(set(classes)) != len(classes):
            raise InvalidInputError(f"--classes has duplicates: {', '.join(classes)}")
        if len(classes) > 254:
            raise InvalidInputError("at most 254 classes fit an 8-bit label PNG (0 background, 255 ignore)")
        object.__setattr__(self, "classes", classes)
        if "{}" not in self.prompt_template:
            raise InvalidInputError(f"--prompt-template {self.prompt_template!r} needs {{}} for the class word")
        if self.mode not in MODES:
            raise InvalidInputError(f"--mode {self.mode!r} is not one of {', '.join(MODES)}")
        for name in list(self.tokens) + list(self.class_thresholds):
            if name not in classes:
                raise InvalidInputError(f"{name!r} has a token or threshold but is not in --classes")
        for t in [self.threshold, *self.class_thresholds.values(), *self.sweep]:
            if not 0 < t < 1:
                raise InvalidInputError(f"threshold {t} must lie between 0 and 1 (maps are max-normalised)")
        if self.min_component < 0:
            raise InvalidInputError("--min-component must be >= 0")

    def threshold_of(self, name: str) -> float:
        return self.class_thresholds.get(name, self.threshold)

    def describe(self) -> dict[str, object]:
        """Settings recorded with every labelled image (provenance)."""
        return {
            "classes": list(self.classes), "prompt_template": self.prompt_template,
            "tokens": {k: str(v) for k, v in self.tokens.items()}, "mode": self.mode,
            "threshold": self.threshold, "class_thresholds": dict(self.class_thresholds),
            "adaptive": self.adaptive, "sweep": list(self.sweep) if self.adaptive else None,
            "crf": self.crf, "min_component": self.min_component,
            "prompt_classes_only": self.prompt_classes_only,
        }

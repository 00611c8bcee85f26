"""Labelling settings: classes, how their maps are made, and how masks are refined; and where
each setting came from (the user, the model's ``ovstore_defaults.json``, or ovstore)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InvalidInputError

__all__ = [
    "LabelConfig", "MAPS_FROM", "MODES", "NORMALIZATIONS", "DEFAULT_SWEEP", "OVSTORE_DEFAULTS", "MODEL_DEFAULT_SETTINGS",
    "SOURCES", "check_label_defaults", "label_config", "parse_class_thresholds", "parse_class_words", "parse_sweep",
]

MODES = ("separate", "compete")
#: Where a class map comes from: the class's attribution (template sentence or learned token),
#: or the class's words in each image's own generation prompt.
MAPS_FROM = ("template", "prompt")
NORMALIZATIONS = ("minmax", "max")
#: Default DiffuMask sweep (min-max normalised maps): 0.5, 0.55, ..., 0.95, chosen with the default
#: threshold on a toy-world calibration set (lower sweeps pick lower thresholds and label more).
DEFAULT_SWEEP = tuple(round(0.5 + 0.05 * k, 2) for k in range(10))
#: ovstore's own value of each setting that a model's ``ovstore_defaults.json`` may set: used
#: when neither the user nor the model gives one.
OVSTORE_DEFAULTS: dict[str, Any] = {
    "prompt_template": "a photograph of a {}", "mode": "separate", "normalize": "minmax", "threshold": 0.6,
    "adaptive": False, "sweep": DEFAULT_SWEEP, "crf": False, "min_component": 0, "prompt_classes_only": False,
    "class_words": {}, "maps_from": "template",
}
#: The LabelConfig fields a model may give defaults for (``classes``, ``tokens`` and
#: ``class_thresholds`` belong to one labelling, not to a model).
MODEL_DEFAULT_SETTINGS = tuple(OVSTORE_DEFAULTS)
#: Where a setting came from, as recorded in the label provenance.
SOURCES = ("user", "model", "ovstore")


@dataclass(frozen=True)
class LabelConfig:
    """How an image's class maps become a semantic label mask.

    The settings of :data:`MODEL_DEFAULT_SETTINGS` left ``None`` take ovstore's value
    (:data:`OVSTORE_DEFAULTS`, given below) and are marked ``"ovstore"`` in ``sources``;
    :meth:`with_model_defaults` (which :func:`~ovstore.label.label_store` applies) replaces
    them with the values of the store's model defaults, marked ``"model"``; the others are
    the user's (``"user"``).

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
    normalize
        How each class map of an image is brought to [0, 1] before thresholding:
        ``minmax`` (default): ``(map - min) / (max - min)``; ``max``: ``map / max``, the
        reference protocol of OVAM/DAAM. They differ by the map's floor: where a class map's
        minimum is a large part of its maximum (about two thirds on the first, v1 toy-world
        model), ``max`` with any threshold below that floor labels nearly the whole image. In ``compete`` mode each class is still
        normalised on its own, after the joint softmax.
    threshold
        Default threshold on the normalised maps (0.6: chosen on a calibration set of the v1
        toy-world model, disjoint from its evaluation set, see BENCHMARKS.md; a model's
        ``ovstore_defaults.json`` replaces it, as the embedded model's does; DAAM-style
        evaluations of Stable Diffusion use ``normalize="max"`` with about 0.4).
    class_thresholds
        Per-class thresholds overriding ``threshold``.
    adaptive
        DiffuMask-style adaptive threshold per class and image: sweep ``sweep`` and keep the
        threshold where the mask area is most stable (see ``refine.adaptive_threshold``).
    sweep
        Thresholds tried by ``adaptive`` (at least two distinct values in (0, 1); sorted).
    crf
        DenseCRF refinement (needs the ``crf`` extra: ``pip install 'ovstore[crf]'``). Its
        unary comes from each class's margin over its threshold, so per-class and adaptive
        thresholds still decide what is labelled; the pairwise terms align the labels with
        the image's colour edges.
    min_component
        Connected class regions smaller than this many pixels become background.
    prompt_classes_only
        Only classes whose name appears in the image's generation prompt may be labelled.
    maps_from
        ``template`` (default): a class map is its attribution's (``prompt_template`` or learned
        token), the same for every image; ``prompt``: the map of the class's words (its name or
        class words) as they stand in each image's own generation prompt, in that prompt's
        softmax (DiffuMask's and Dataset Diffusion's labels); a class the prompt does not name
        gets an empty map, and ``mode`` does not apply (the prompt's softmax is the competition).
    class_words
        Other words that name a class in prompts (``{"person": ("man", "woman")}``): with
        ``prompt_classes_only`` a prompt naming any of them allows the class, so that a prompt
        saying "puppy" still lets "dog" be labelled. A model's defaults may give the words of
        its vocabulary; those of classes not labelled are dropped.
    refine
        A self-attention refinement of the class maps (``"self-attention:propagate,k=2"``, see
        :mod:`ovstore.analyze.self_attention`), applied to each class map at the self-attention
        grid before it is resized and normalised, so thresholds, adaptive thresholds and DenseCRF
        all see the refined maps; ``None``: none. The store must hold self-attention
        (``ovstore capture --self-attention``).
    sources
        Where each setting of :data:`MODEL_DEFAULT_SETTINGS` came from: ``user``, ``model``
        or ``ovstore`` (filled in here; recorded in the label provenance).
    space
        The class maps' space on SD3/FLUX stores (``MapConfig.space``): ``attention``
        (default) or ``output`` (ConceptAttention's; the store needs ``capture --image-outputs``).
    """

    classes: tuple[str, ...]
    prompt_template: str | None = None
    tokens: dict[str, Path] = field(default_factory=dict)
    mode: str | None = None
    normalize: str | None = None
    threshold: float | None = None
    class_thresholds: dict[str, float] = field(default_factory=dict)
    adaptive: bool | None = None
    sweep: tuple[float, ...] | None = None
    crf: bool | None = None
    min_component: int | None = None
    prompt_classes_only: bool | None = None
    class_words: Mapping[str, Sequence[str]] | None = None
    maps_from: str | None = None
    refine: Any = None
    sources: dict[str, str] = field(default_factory=dict, compare=False)
    space: str = "attention"

    def __post_init__(self) -> None:
        from ..analyze import parse_refinement

        object.__setattr__(self, "refine", parse_refinement(self.refine))
        sources = dict(self.sources)
        for name, default in OVSTORE_DEFAULTS.items():  # not given: ovstore's value, until a model's applies
            if getattr(self, name) is None:
                object.__setattr__(self, name, default)
                sources[name] = "ovstore"
            elif sources.get(name) not in SOURCES or (sources[name] == "ovstore" and getattr(self, name) != default):
                sources[name] = "user"
        object.__setattr__(self, "sources", sources)
        classes = tuple(c.strip() for c in self.classes)
        if not classes or any(not c for c in classes):
            raise InvalidInputError("--classes needs non-empty class names, e.g. --classes cat,dog,person")
        bad = [c for c in classes if ":" in c or any(ord(ch) < 32 for ch in c)]
        if bad:
            raise InvalidInputError(f"class name {bad[0]!r} has ':' or a control character, which labelmap.txt "
                                    "(NAME:R,G,B::) cannot hold; rename the class")
        if len(set(classes)) != len(classes):
            raise InvalidInputError(f"--classes has duplicates: {', '.join(classes)}")
        if len(classes) > 254:
            raise InvalidInputError("at most 254 classes fit an 8-bit label PNG (0 background, 255 ignore)")
        object.__setattr__(self, "classes", classes)
        words: dict[str, tuple[str, ...]] = {}
        for name, given in dict(self.class_words).items():
            if name not in classes:
                if sources["class_words"] == "user":
                    raise InvalidInputError(f"--class-words names {name!r}, which is not in --classes; add it to "
                                            "--classes or drop its words")
                continue  # the model knows more classes than this labelling uses
            cleaned = tuple(dict.fromkeys(w.strip() for w in ([given] if isinstance(given, str) else given)))
            if not cleaned or any(not w for w in cleaned):
                raise InvalidInputError(f"--class-words {name}=...: give at least one non-empty word, e.g. "
                                        f"{name}=word1,word2")
            words[name] = cleaned
        object.__setattr__(self, "class_words", words)
        if "{}" not in self.prompt_template:
            raise InvalidInputError(f"--prompt-template {self.prompt_template!r} needs {{}} for the class word")
        if self.mode not in MODES:
            raise InvalidInputError(f"--mode {self.mode!r} is not one of {', '.join(MODES)}")
        if self.maps_from not in MAPS_FROM:
            raise InvalidInputError(f"--maps-from {self.maps_from!r} is not one of {', '.join(MAPS_FROM)}")
        for name in list(self.tokens) + list(self.class_thresholds):
            if name not in classes:
                raise InvalidInputError(f"{name!r} has a token or threshold but is not in --classes")
        if self.normalize not in NORMALIZATIONS:
            raise InvalidInputError(f"--normalize {self.normalize!r} is not one of {', '.join(NORMALIZATIONS)}")
        from ..analyze import SPACES

        if self.space not in SPACES:
            raise InvalidInputError(f"--space {self.space!r} is not one of {', '.join(SPACES)}")
        sweep = tuple(sorted(float(t) for t in self.sweep))
        if len(set(sweep)) < 2:
            raise InvalidInputError(f"--sweep needs at least two different thresholds, got {list(self.sweep)}")
        if len(set(sweep)) != len(sweep):
            raise InvalidInputError(f"--sweep has duplicates: {list(self.sweep)}")
        object.__setattr__(self, "sweep", sweep)
        for t in [self.threshold, *self.class_thresholds.values(), *self.sweep]:
            if not 0 < t < 1:
                raise InvalidInputError(f"threshold {t} must lie between 0 and 1 (maps are normalised to [0, 1])")
        if self.min_component < 0:
            raise InvalidInputError("--min-component must be >= 0")

    def threshold_of(self, name: str) -> float:
        return self.class_thresholds.get(name, self.threshold)

    def words_of(self, name: str) -> tuple[str, ...]:
        """The words that name class ``name`` in a prompt: its name, then its ``class_words``."""
        return (name, *(w for w in self.class_words.get(name, ()) if w != name))

    def with_model_defaults(self, defaults: Any) -> LabelConfig:
        """This config with the model's defaults (an ``ovstore.store.AnalysisDefaults``, e.g.
        ``analysis_defaults(store)``; ``None``: none) for every setting the user did not give.
        Applying them again changes nothing."""
        given = dict(getattr(defaults, "label", None) or {})
        values = {k: (tuple(v) if k == "sweep" else v) for k, v in given.items() if self.sources.get(k) == "ovstore"}
        if "class_words" in values:  # only the words of the classes labelled here count
            values["class_words"] = {c: w for c, w in values["class_words"].items() if c in self.classes}
            if not values["class_words"]:
                del values["class_words"]
        if not values:
            return self
        return replace(self, **values, sources={**self.sources, **{k: "model" for k in values}})

    def provenance(self) -> dict[str, dict[str, object]]:
        """Each model-defaultable setting's value and where it came from (``user``, ``model``,
        ``ovstore``), as recorded with every labelled image and in the COCO ``info``."""
        described = self.describe()
        return {name: {"value": list(self.sweep) if name == "sweep" else described[name],
                       "source": self.sources[name]} for name in MODEL_DEFAULT_SETTINGS}

    def describe(self) -> dict[str, object]:
        """Settings recorded with every labelled image (provenance)."""
        return {
            "classes": list(self.classes), "prompt_template": self.prompt_template,
            "tokens": {k: str(v) for k, v in self.tokens.items()}, "mode": self.mode,
            "normalize": self.normalize, "threshold": self.threshold, "class_thresholds": dict(self.class_thresholds),
            "adaptive": self.adaptive, "sweep": list(self.sweep) if self.adaptive else None,
            "crf": self.crf, "min_component": self.min_component,
            "prompt_classes_only": self.prompt_classes_only,
            "class_words": {c: list(w) for c, w in self.class_words.items()},
            "maps_from": self.maps_from,
        } | ({"refine": self.refine.describe()} if self.refine is not None else {}) \
          | ({"space": self.space} if self.space != "attention" else {})  # absent: as before (labellings resume)


def parse_sweep(text: str) -> tuple[float, ...]:
    """``--sweep``: ``"0.5,0.6,0.7"`` or ``"START:STOP:STEP"`` (STOP included)."""
    text = text.strip()
    try:
        if ":" in text:
            start, stop, step = (float(v) for v in text.split(":"))
            if step <= 0 or stop < start:
                raise ValueError
            count = int(np.floor((stop - start) / step + 1e-9)) + 1
            return tuple(round(start + k * step, 6) for k in range(count))
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise InvalidInputError(f"--sweep {text!r}: write A,B,C or START:STOP:STEP with STEP > 0, "
                                "e.g. 0.3:0.9:0.05") from None


def parse_class_thresholds(items: Mapping[str, float] | Sequence[str] | None) -> dict[str, float]:
    """Per-class thresholds from ``{"cat": 0.5}`` or ``["cat=0.5", ...]`` (``--class-threshold``)."""
    if isinstance(items, Mapping):
        return {str(k): float(v) for k, v in items.items()}
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


def parse_class_words(items: Mapping[str, Sequence[str]] | Sequence[str] | None) -> dict[str, tuple[str, ...]]:
    """Class words from ``{"dog": ["puppy"]}`` or ``["dog=puppy,hound", ...]`` (``--class-words``)."""
    if isinstance(items, Mapping):
        return {str(k): tuple(v) for k, v in items.items()}
    out: dict[str, tuple[str, ...]] = {}
    for item in items or ():
        name, sep, words = item.partition("=")
        listed = tuple(w.strip() for w in words.split(",") if w.strip())
        if not sep or not name.strip() or not listed:
            raise InvalidInputError(f"--class-words {item!r}: write CLASS=WORD,WORD, e.g. dog=puppy,hound")
        out[name.strip()] = out.get(name.strip(), ()) + listed
    return out


def label_config(
    *,
    classes: str | Sequence[str] | None = None,
    classes_file: str | Path | None = None,
    tokens: Sequence[str | Path] = (),
    class_thresholds: Mapping[str, float] | Sequence[str] | None = None,
    class_words: Mapping[str, Sequence[str]] | Sequence[str] | None = None,
    adaptive: bool | None = None,
    sweep: str | Sequence[float] | None = None,
    defaults: Any = None,
    **settings,
) -> LabelConfig:
    """The :class:`LabelConfig` of ``ovstore label``'s options: class names from ``classes``
    (comma-separated or a list), then ``classes_file`` (one per line), then the names of the
    learned ``tokens`` files not yet among them; ``settings`` are the other fields (``None``:
    not given). ``defaults`` (``ovstore.store.analysis_defaults(store)``) fills the settings
    not given with the model's values; ovstore's own fill the rest."""
    from ..inputs import parse_names, read_names_file

    if isinstance(classes, str):
        names = list(parse_names(classes, "--classes"))
    else:
        names = list(classes or ())
    if classes_file is not None:
        names += read_names_file(classes_file, "--classes-file")
    by_name: dict[str, str | Path] = {}
    if tokens:
        from ..optimize import load_token

        by_name = {load_token(t).name: t for t in tokens}
    for name in by_name:
        if name not in names:
            names.append(name)
    thresholds = parse_class_thresholds(class_thresholds)
    if isinstance(sweep, str):
        settings["sweep"] = parse_sweep(sweep)
    elif sweep is not None:
        settings["sweep"] = tuple(sweep)
    if class_words:
        settings["class_words"] = parse_class_words(class_words)
    settings = {k: v for k, v in settings.items() if v is not None}
    config = LabelConfig(classes=tuple(names), tokens=by_name, class_thresholds=thresholds, adaptive=adaptive,
                         **settings).with_model_defaults(defaults)
    if sweep is not None and not config.adaptive:
        raise InvalidInputError("--sweep sets the thresholds tried by --adaptive; add --adaptive")
    return config


def check_label_defaults(values: Mapping[str, Any], file: str) -> dict[str, Any]:
    """The ``label`` section of a model's ``ovstore_defaults.json``, validated strictly: each
    key a :data:`MODEL_DEFAULT_SETTINGS` name of the right JSON type and range; errors name
    ``file``, the key and the fix."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        where = f"{file}: label.{key}"
        shown = json.dumps(value)
        if key in ("classes", "tokens", "class_thresholds"):
            option = {"classes": "--classes", "tokens": "--token", "class_thresholds": "--class-threshold"}[key]
            raise InvalidInputError(f"{where} belongs to one labelling, not to the model; remove it (give it "
                                    f"to ovstore label as {option})")
        if key not in OVSTORE_DEFAULTS:
            raise InvalidInputError(f"{where}: unknown key; label holds only {', '.join(MODEL_DEFAULT_SETTINGS)}; "
                                    "fix the name or remove the key")
        if key in ("adaptive", "crf", "prompt_classes_only"):
            if not isinstance(value, bool):
                raise InvalidInputError(f"{where} is {shown}, not true or false; write true or false")
        elif key in ("threshold", "sweep"):
            if key == "sweep" and not isinstance(value, list):
                raise InvalidInputError(f"{where} is {shown}, not a list; write a list of at least two different "
                                        "thresholds, e.g. [0.3, 0.4, 0.5]")
            for t in value if key == "sweep" else [value]:
                if isinstance(t, bool) or not isinstance(t, (int, float)):
                    raise InvalidInputError(f"{where} is {shown}, not a number; write a JSON number such as 0.45")
                if not 0 < t < 1:
                    raise InvalidInputError(f"{where} is {shown}; thresholds lie between 0 and 1 (maps are "
                                            "normalised to [0, 1]): write e.g. 0.45")
            if key == "sweep" and len(set(value)) < 2:
                raise InvalidInputError(f"{where} is {shown}; write at least two different thresholds, "
                                        "e.g. [0.3, 0.4, 0.5]")
            if key == "sweep" and len(set(value)) != len(value):
                raise InvalidInputError(f"{where} is {shown}, which has duplicates; list each threshold once")
            value = [float(t) for t in value] if key == "sweep" else float(value)
        elif key == "class_words":
            if not isinstance(value, dict) or not all(
                    isinstance(w, list) and w and all(isinstance(x, str) and x.strip() for x in w)
                    for w in value.values()):
                raise InvalidInputError(f"{where} is {shown}; write an object of class -> list of words, e.g. "
                                        "{\"dog\": [\"puppy\", \"hound\"]}")
            value = {str(k): [x.strip() for x in w] for k, w in value.items()}
        elif key == "min_component":
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InvalidInputError(f"{where} is {shown}; write a whole number of pixels >= 0")
        else:  # prompt_template, mode, normalize, maps_from
            choices = {"mode": MODES, "normalize": NORMALIZATIONS, "maps_from": MAPS_FROM}.get(key)
            if not isinstance(value, str):
                raise InvalidInputError(f"{where} is {shown}, not a string; write e.g. "
                                        f"{json.dumps(choices[0] if choices else 'a {}')}")
            if choices and value not in choices:
                raise InvalidInputError(f"{where} is {shown}, not one of {', '.join(choices)}; write one of them")
            if key == "prompt_template" and "{}" not in value:
                raise InvalidInputError(f"{where} is {shown}, which has no {{}} for the class word; write e.g. "
                                        "\"a {}\"")
        out[key] = value
    return out

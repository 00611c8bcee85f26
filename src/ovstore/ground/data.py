"""What the grounding head reads: per-layer query features streamed from Zarr (bounded memory),
class-word text rows from the store's own text encoder, and masks from label folders.

A store larger than memory is read image by image: :class:`FeatureReader` averages one image's
queries over the chosen calls as it reads them (one layer at a time) and keeps the results in an
LRU cache of at most ``cache_bytes``; what does not fit is read from the store again when needed.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InvalidInputError
from ..selection import LayerSelection, parse_index_spec, resolve_indices
from ..store import Store
from .model import LayerSpec

__all__ = ["ClassText", "FeatureReader", "LabelFolder", "Selection", "TEXT_SOURCES", "class_rows", "read_label_folder",
           "select_layers", "DEFAULT_TEMPLATE", "DEFAULT_CACHE_BYTES"]

#: The sentence a class word is encoded in (its rows are pooled).
DEFAULT_TEMPLATE = "a photograph of a {}"
#: Feature cache per reader: 512 MiB (the toy world needs 0.2 MB per image, SD 1.5 at 512² about 12 MB).
DEFAULT_CACHE_BYTES = 512 * 2**20


@dataclass(frozen=True)
class Selection:
    """Which layers, calls and branch of a store the head reads."""

    layers: tuple[LayerSpec, ...]
    calls: tuple[int, ...]  # positions along the stored call axis
    branch: int
    branch_name: str


def select_layers(store: Store, layers: LayerSelection | None = None, calls: str | Sequence[int] | None = None,
                  branch: str | None = None) -> Selection:
    """Resolve a layer selection, a ``--calls`` specification and a branch on ``store``."""
    family = store.layout.model.family
    if store.layout.layer_arrays or family not in ("unet",):
        raise InvalidInputError(f"store {store.path} was captured from a {family!r} model; the grounding head reads "
                                "UNet cross-attention stores (SD 1.x, 2.x, SDXL): capture one of those")
    selection = layers or LayerSelection()
    names = selection.select([(l.name, l.resolution) for l in store.layers])
    if not names:
        raise InvalidInputError(f"no stored layer of {store.path} matches the layer selection; stored layers: "
                                + ", ".join(l.name for l in store.layers))
    spec = calls if calls is None or isinstance(calls, tuple) and all(isinstance(c, str) for c in calls) \
        else parse_index_spec(calls)
    chosen = resolve_indices(spec, store.layout.n_steps, what="stored call")
    branches = list(store.layout.branches)
    if branch is None:
        index = 0
    elif branch in branches:
        index = branches.index(branch)
    else:
        raise InvalidInputError(f"--branch {branch!r}: store {store.path} holds the {', '.join(branches)} half; "
                                f"choose one of those")
    return Selection(tuple(LayerSpec.from_layer(store.layout.layer(n)) for n in names), tuple(chosen), index,
                     branches[index])


class FeatureReader:
    """One store's per-layer features ``(heads·head_dim, h, w)`` float32 per image (queries
    averaged over the selected calls), then with ``image=True`` the stored image ``(3, H, W)``
    scaled to [-1, 1]; read lazily, cached up to ``cache_bytes``."""

    def __init__(self, store: Store, selection: Selection, cache_bytes: int = DEFAULT_CACHE_BYTES, *,
                 image: bool = False) -> None:
        self.store = store
        self.selection = selection
        self.cache_bytes = int(cache_bytes)
        self.image = bool(image)
        self._cache: OrderedDict[int, list[np.ndarray]] = OrderedDict()
        self._held = 0
        self.reads = 0  # images read from the store (a cache miss each)

    @property
    def bytes_per_image(self) -> int:
        layout = self.store.layout
        pixels = 4 * 3 * layout.height * layout.width if self.image else 0
        return sum(4 * l.channels * l.height * l.width for l in self.selection.layers) + pixels

    def __call__(self, image: int) -> list[np.ndarray]:
        cached = self._cache.get(image)
        if cached is not None:
            self._cache.move_to_end(image)
            return cached
        features = self.read(image)
        self.reads += 1
        size = self.bytes_per_image
        if size <= self.cache_bytes:
            while self._held + size > self.cache_bytes and self._cache:
                _, dropped = self._cache.popitem(last=False)
                self._held -= size
            self._cache[image] = features
            self._held += size
        return features

    def read(self, image: int) -> list[np.ndarray]:
        """The features of ``image`` from the store (no cache)."""
        out = []
        for layer in self.selection.layers:
            q = self.store.queries(layer.name, image, branch=self.selection.branch, steps=list(self.selection.calls))
            mean = q.astype(np.float32).mean(axis=0)  # (head, y, x, channel)
            if not np.isfinite(mean).all():
                raise InvalidInputError(f"image {image}, layer {layer.name} of {self.store.path}: the stored queries "
                                        "hold NaN or Inf; `ovstore verify` lists damaged images, leave it out")
            out.append(np.ascontiguousarray(mean.transpose(0, 3, 1, 2).reshape(layer.channels, layer.height,
                                                                                layer.width)))
        if self.image:
            rgb = self.store.image(image).astype(np.float32) / 127.5 - 1.0  # (H, W, 3) uint8 -> [-1, 1]
            out.append(np.ascontiguousarray(rgb.transpose(2, 0, 1)))
        return out

    def projections(self) -> list[tuple[np.ndarray, np.ndarray | None]]:
        """The stored ``to_k`` of every selected layer (weight, bias)."""
        out = []
        for layer in self.selection.layers:
            w, b = self.store.key_projection(layer.name)
            info = self.store.layout.layer(layer.name)
            out.append((w, b if info.has_bias else None))
        return out


def class_rows(encoder: Any, classes: Sequence[str], template: str = DEFAULT_TEMPLATE) -> dict[str, Any]:
    """Per class, ``(2, hidden)`` float32 rows: [start-of-text, mean of the class word's rows in
    ``template``] (a word split into sub-tokens, or a phrase, is pooled over all of them)."""
    import torch

    from ..analyze import words_in_context

    if "{}" not in template:
        raise InvalidInputError(f"template {template!r} has no {{}} for the class word; write e.g. 'a photograph "
                                "of a {}'")
    out = {}
    for name, (att, positions) in zip(classes, words_in_context(encoder, list(classes), template)):
        rows = att.embedding.float().cpu()
        out[name] = torch.stack([rows[0], rows[positions].mean(dim=0)])
    return out


#: Where a class word's text rows come from: its template sentence, or the image's own prompt.
TEXT_SOURCES = ("template", "prompt")


class ClassText:
    """Text rows ``(2, hidden)`` per (image, class): with ``source="prompt"``, the start-of-text
    row and the mean of the rows of the class's words (its name or one of ``class_words``) as
    they stand in the image's own generation prompt, where the causal text encoder has bound
    them to their colour and neighbours (as ``label --maps-from prompt`` reads them); a class
    the prompt does not name, and every class with ``source="template"``, takes its template
    rows (:func:`class_rows`)."""

    def __init__(self, encoder: Any, classes: Sequence[str], template: str = DEFAULT_TEMPLATE,
                 source: str = "template", class_words: dict[str, Sequence[str]] | None = None) -> None:
        if source not in TEXT_SOURCES:
            raise InvalidInputError(f"--text {source!r} is not one of {', '.join(TEXT_SOURCES)}")
        self.encoder, self.source = encoder, source
        self.classes = list(classes)
        self.words = {c: (c, *(w for w in (class_words or {}).get(c, ()) if w != c)) for c in self.classes}
        self.template_rows = class_rows(encoder, self.classes, template)
        self._prompts: dict[str, dict[str, Any]] = {}

    def rows(self, prompt: str, cls: str) -> Any:
        if self.source == "template":
            return self.template_rows[cls]
        per_class = self._prompts.get(prompt)
        if per_class is None:
            import torch

            from ..label import prompt_word_columns

            (att,) = self.encoder.encode([prompt])
            emb = att.embedding.float().cpu()
            per_class = {}
            for c in self.classes:
                cols = prompt_word_columns([str(t) for t in att.tokens], self.words[c])
                per_class[c] = torch.stack([emb[0], emb[cols].mean(dim=0)]) if cols else self.template_rows[c]
            self._prompts[prompt] = per_class
        return per_class[cls]


@dataclass(frozen=True)
class LabelFolder:
    """A VOC label tree: class names (background first) and each image's label PNG by store index."""

    path: Path
    names: tuple[str, ...]
    pngs: dict[int, Path]
    settings: dict[str, Any] | None  # ovstore-label.json of an `ovstore label` output, else None

    @property
    def source(self) -> str:
        return "ovstore label" if self.settings is not None else "masks"

    def labels(self, image: int, size: tuple[int, int]) -> np.ndarray:
        """Class indices ``(H, W)`` uint8 of ``image`` at ``size`` (nearest), 255 = ignore."""
        from PIL import Image, UnidentifiedImageError

        path = self.pngs[image]
        try:
            with Image.open(path) as im:
                if im.mode not in ("P", "L"):
                    raise InvalidInputError(f"{path} is a {im.mode} image; a label PNG holds class indices "
                                            "(mode P or L, as `ovstore label` writes them)")
                array = np.asarray(im)
        except (UnidentifiedImageError, OSError) as exc:
            raise InvalidInputError(f"label {path} is not a readable image ({exc}); write it as PNG") from None
        h, w = array.shape
        if (h, w) != tuple(size):
            if abs(h / w - size[0] / size[1]) > 0.01 * size[0] / size[1]:
                raise InvalidInputError(f"label {path} is {w}x{h} but the image is {size[1]}x{size[0]} (another "
                                        "aspect ratio); label the stored image")
            array = np.asarray(Image.fromarray(array).resize((size[1], size[0]), Image.NEAREST))
        top = int(array[array != 255].max()) if (array != 255).any() else 0
        if top >= len(self.names):
            raise InvalidInputError(f"label {path} holds class index {top}, but {self.path / 'labelmap.txt'} names "
                                    f"only {len(self.names)} classes (background included); fix the labelmap")
        return array


def read_label_folder(path: str | Path) -> LabelFolder:
    """Read ``labelmap.txt`` and ``SegmentationClass/NNNNN.png`` (NNNNN: the store's image index)."""
    import json

    from ..label import read_labelmap

    path = Path(path)
    if not path.is_dir():
        raise InvalidInputError(f"--labels {path} is not a folder; give an `ovstore label` output or a VOC tree "
                                "(labelmap.txt + SegmentationClass/NNNNN.png)")
    if not (path / "labelmap.txt").is_file():
        raise InvalidInputError(f"--labels {path} has no labelmap.txt; a label folder names its classes there "
                                "(background first), as `ovstore label` writes it")
    names = tuple(read_labelmap(path / "labelmap.txt"))
    folder = path / "SegmentationClass"
    pngs = {int(p.stem): p for p in sorted(folder.glob("*.png")) if p.stem.isdigit()} if folder.is_dir() else {}
    if not pngs:
        raise InvalidInputError(f"--labels {path} has no SegmentationClass/NNNNN.png; nothing to train on")
    settings_file = path / "ovstore-label.json"
    settings = json.loads(settings_file.read_text()) if settings_file.is_file() else None
    return LabelFolder(path, names, pngs, settings)

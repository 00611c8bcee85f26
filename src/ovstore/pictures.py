"""Pictures of maps and labels that a reader can judge: the one drawing code of
``ovstore maps --png``, ``ovstore demo`` and the README.

A **map sheet** has one row per image: the image, then one tile per word, each tile the map in
one colour scale shared by every tile of the sheet (zero at the bottom, the sheet's largest
shown value at the top), with the image's object outlines drawn over it, and a labelled colour
bar stating the value range and what the values are. Small images are enlarged by
nearest-neighbour upscaling, so pixel blocks stay pixel blocks.

Why raw values on a shared scale, and not maps normalised per tile (the reference's display):
a map divided by its own maximum, or stretched between its own minimum and maximum, always
spans the whole colour range, so a map that is low on its object, or low everywhere, looks
as confident as a good one. With one scale per sheet the tiles can be compared, and a
brighter tile really holds more attention. For ``token_softmax`` maps (the default) every
pixel's values over the tokens of one attribution prompt add up to a constant (calls × heads
summed over layers); the sheet divides by it, so a value reads as the **share of that pixel's
attention** that the word takes, averaged over every head of every layer and call (0.1 = 10 %).
Maps of other settings (sigmoid, linear, normalised, or a subset of a prompt's tokens) are
drawn as their raw values, and the colour bar says so.

Tiles are words, not CLIP sub-tokens (:func:`ovstore.analyze.word_maps`: ``poin`` + ``ty``
is one tile ``pointy``, their maps summed). Start/end-of-text tokens, the padding after the
end of text, and the filler words of :data:`FILLER_WORDS` are hidden unless ``all_tokens`` is
given: they take most of the attention (end of text about three quarters on the toy model)
and would set the scale for the words a reader looks for.

A **label preview** shows each image beside its label mask in the label file's own palette,
with a legend naming each class and its colour.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import xarray as xr

__all__ = [
    "FILLER_WORDS",
    "SPECIAL_TOKENS",
    "LegendEntry",
    "MapTile",
    "Sheet",
    "SheetRow",
    "ValueScale",
    "label_legend",
    "label_sheet",
    "map_sheet",
    "prompt_sheets",
    "upscale",
    "upscale_factor",
    "value_scale",
    "word_tiles",
]

#: Tokens that are not words of the text: hidden by default.
SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")
#: Function words and punctuation hidden by default: they carry no object a reader could check.
FILLER_WORDS = frozenset({
    "a", "an", "the", "and", "or", "with", "next", "to", "of", "on", "in", "at", "by", "for", "from",
    "is", "are", "its", "it", "this", "that", "some", ",", ".", ";", ":", "!", "?", "-", "'", '"',
})
#: Smallest side of a drawn tile in pixels; smaller images are enlarged by a whole factor.
MIN_TILE = 192
COLORMAP = "viridis"
OUTLINE = (255, 255, 255)
BACKGROUND = (255, 255, 255)
TEXT = (20, 20, 20)
MARGIN = 8


@dataclass(frozen=True)
class MapTile:
    """One word's map on one image: its label, kind and values (``(h, w)``, any resolution).

    ``kind`` is ``word``, ``filler``, ``special`` (start/end of text), ``padding`` (after the
    end of text) or ``learned`` (a learned token); ``prompt`` the attribution prompt it is from;
    ``position`` the position of its first token in that prompt.
    """

    label: str
    values: np.ndarray
    kind: str = "word"
    prompt: str = ""
    prompt_index: int = 0
    position: int = 0

    @property
    def shown_by_default(self) -> bool:
        return self.kind in ("word", "learned")


@dataclass(frozen=True)
class SheetRow:
    """One image of a sheet: the image (``(H, W, 3)`` uint8), a title and its tiles."""

    image: np.ndarray
    tiles: Sequence[MapTile]
    title: str = ""


@dataclass(frozen=True)
class ValueScale:
    """What the tiles' values are: ``divisor`` turns raw map values into the drawn values,
    ``description`` says what they mean, ``share`` whether they are shares of attention."""

    description: str
    divisor: float = 1.0
    share: bool = False


@dataclass(frozen=True)
class LegendEntry:
    """One class of a label preview: its index in the label file, name and colour."""

    value: int
    name: str
    rgb: tuple[int, int, int]


@dataclass
class Sheet:
    """A drawn picture. ``pixels`` is ``(H, W, 3)`` uint8; ``boxes`` maps each panel's name
    (``"r0:image"``, ``"r0:t1:circle"``, ``"legend:circle"``, ``"colorbar"``) to its
    ``(left, top, right, bottom)`` pixel box; ``vmax`` is the top of the colour scale."""

    pixels: np.ndarray
    boxes: dict[str, tuple[int, int, int, int]] = field(default_factory=dict)
    vmax: float | None = None
    legend: list[LegendEntry] = field(default_factory=list)

    def panel(self, name: str) -> np.ndarray:
        """The pixels of one panel."""
        left, top, right, bottom = self.boxes[name]
        return self.pixels[top:bottom, left:right]

    def save(self, path: str | Path) -> Path:
        """Write the sheet as a PNG file (through Pillow, so write errors are ``OSError``)."""
        from PIL import Image

        path = Path(path)
        Image.fromarray(self.pixels).save(path, format="PNG")
        return path


# ---------------------------------------------------------------------- words and values
def _kinds(words: Sequence[str], token_ids: Sequence[int] | None) -> list[str]:
    kinds, ended = [], False
    for k, word in enumerate(words):
        if ended:
            kinds.append("padding")
        elif word in SPECIAL_TOKENS:
            kinds.append("special")
            ended = word == SPECIAL_TOKENS[1]
        elif token_ids is not None and token_ids[k] < 0:
            kinds.append("learned")
        elif word.lower() in FILLER_WORDS or not any(ch.isalnum() for ch in word):
            kinds.append("filler")
        else:
            kinds.append("word")
    return kinds


def word_tiles(maps: xr.DataArray, *, all_tokens: bool = False) -> list[MapTile]:
    """The tiles of one image's maps (``maps`` with one image, or without an image dim):
    sub-tokens joined into words (maps summed), special, padding and filler tokens left out
    unless ``all_tokens``. Values are drawn values (see :func:`value_scale`)."""
    from . import dims
    from .analyze import word_maps

    if dims.IMAGE in maps.dims:
        if maps.sizes[dims.IMAGE] != 1:
            raise ValueError("word_tiles takes the maps of one image; select one with maps.isel(image=[k])")
    else:
        maps = maps.expand_dims(dims.IMAGE)
    scales = {k: value_scale(maps.isel(token=np.flatnonzero(maps["prompt_index"].values == k)))
              for k in np.unique(maps["prompt_index"].values)}
    words = word_maps(maps)
    values = np.asarray(words.values[0], dtype=np.float64)
    tiles: list[MapTile] = []
    for k in np.unique(words["prompt_index"].values):
        cols = np.flatnonzero(words["prompt_index"].values == k)
        token_cols = np.flatnonzero(maps["prompt_index"].values == k)
        labels = [str(w) for w in words["word_str"].values[cols]]
        ids = [int(i) for i in maps["token_id"].values[token_cols]] if "token_id" in maps.coords else None
        # the first token position of every word, and whether the word is a learned token
        firsts, learned, pos = [], [], 0
        token_strs = [str(t) for t in maps["token_str"].values[token_cols]]
        for label in labels:
            firsts.append(pos)
            learned.append(ids is not None and ids[pos] < 0 and token_strs[pos] not in SPECIAL_TOKENS)
            pos += _n_pieces(token_strs, pos, label, ids)
        kinds = _kinds(labels, [-1 if lrn else 0 for lrn in learned])
        for col, label, kind, first in zip(cols, labels, kinds, firsts):
            if not all_tokens and kind not in ("word", "learned"):
                continue
            position = int(maps["position"].values[token_cols[first]]) if "position" in maps.coords else first
            tiles.append(MapTile(label=label, values=values[col] / scales[k].divisor, kind=kind,
                                 prompt=str(words["prompt"].values[col]), prompt_index=int(k), position=position))
    return tiles


def _n_pieces(tokens: Sequence[str], start: int, word: str, ids: Sequence[int] | None) -> int:
    """How many tokens from ``start`` make up ``word`` (as :func:`word_maps` grouped them)."""
    if tokens[start] in SPECIAL_TOKENS or (ids is not None and ids[start] < 0):
        return 1
    n = 0
    for j in range(start, len(tokens)):
        if tokens[j] in SPECIAL_TOKENS or (ids is not None and ids[j] < 0):
            break  # word_maps ends an unfinished word before a special or learned token
        n += 1
        if tokens[j].endswith("</w>"):
            break
    return max(1, n)


def value_scale(maps: xr.DataArray) -> ValueScale:
    """How to draw the maps of one attribution prompt (every token of it, one or more images).

    ``token_softmax`` maps whose values add up, at every pixel, to one constant over the
    prompt's tokens are divided by it: shares of the pixel's attention. Anything else
    (sigmoid, linear, normalised maps, a subset of the tokens) is drawn as raw values.
    """
    attrs = maps.attrs
    n_calls, n_layers = len(attrs.get("steps", ())), len(attrs.get("layers", ()))
    over = f"{n_calls} UNet calls and {n_layers} layers" if n_calls and n_layers else "calls and layers"
    activation = attrs.get("activation", "token_softmax")
    normalize = attrs.get("normalize", "none")
    if activation == "token_softmax" and normalize == "none":
        total = np.asarray(maps.values, dtype=np.float64).sum(axis=-3)  # over tokens
        mean = float(total.mean()) if total.size else 0.0
        if mean > 0 and float(np.abs(total - mean).max()) <= 1e-3 * mean:
            return ValueScale(f"share of each pixel's attention (softmax over the prompt's tokens, mean over "
                              f"every head of {over})", divisor=mean, share=True)
    how = attrs.get("head_reduction", "sum")
    text = f"map value ({activation}, {how} over heads, {over}"
    text += f", normalised per map: {normalize})" if normalize != "none" else ")"
    return ValueScale(text)


# ---------------------------------------------------------------------- pixels
def upscale_factor(shape: Sequence[int], min_size: int = MIN_TILE) -> int:
    """The whole factor that makes an image's larger side at least ``min_size`` pixels."""
    return max(1, -(-int(min_size) // max(int(shape[0]), int(shape[1]))))


def upscale(image: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour enlargement by a whole factor: every pixel becomes a block."""
    if factor == 1:
        return image
    return np.repeat(np.repeat(image, factor, axis=0), factor, axis=1)


def _resize(values: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A map at the image's resolution (bilinear, as the analysis upsamples layers)."""
    if values.shape == tuple(size):
        return values
    import torch

    from .analyze import resize_maps

    return resize_maps(torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)), size).double().numpy()


def _outlines(image: np.ndarray, factor: int, threshold: int = 40) -> np.ndarray:
    """1-pixel lines, at the enlarged size, where neighbouring image pixels differ in some
    channel by at least ``threshold``: the objects' outlines, drawn over map tiles."""
    img = image.astype(np.int16)
    h, w = img.shape[:2]
    right = np.abs(img[:, 1:] - img[:, :-1]).max(-1) >= threshold  # (h, w-1): between x and x+1
    down = np.abs(img[1:] - img[:-1]).max(-1) >= threshold
    out = np.zeros((h * factor, w * factor), bool)
    ys, xs = np.nonzero(right)
    for dy in range(factor):
        out[ys * factor + dy, (xs + 1) * factor - (1 if factor > 1 else 0)] = True
    ys, xs = np.nonzero(down)
    for dx in range(factor):
        out[(ys + 1) * factor - (1 if factor > 1 else 0), xs * factor + dx] = True
    return out


def _colour(values: np.ndarray, vmax: float, cmap: str) -> np.ndarray:
    import matplotlib

    scaled = np.clip(values / vmax, 0.0, 1.0) if vmax > 0 else np.zeros_like(values)
    return (matplotlib.colormaps[cmap](scaled)[..., :3] * 255).round().astype(np.uint8)


def _font(size: int):
    from matplotlib import font_manager
    from PIL import ImageFont

    return ImageFont.truetype(font_manager.findfont("DejaVu Sans"), size)


def _text_width(draw, text: str, font) -> int:
    left, _, right, _ = draw.textbbox((0, 0), text, font=font)
    return int(right - left)


def _fit(draw, text: str, font, width: int) -> str:
    """``text`` shortened with an ellipsis to fit ``width`` pixels."""
    if _text_width(draw, text, font) <= width:
        return text
    while text and _text_width(draw, text + "…", font) > width:
        text = text[:-1]
    return text + "…"


def _ticks(vmax: float) -> list[float]:
    """Round tick values from 0 to ``vmax`` (both ends included)."""
    if vmax <= 0:
        return [0.0]
    step = 10 ** math.floor(math.log10(vmax / 4))
    for m in (1, 2, 2.5, 5, 10):
        if vmax / (m * step) <= 5:
            step *= m
            break
    ticks = [k * step for k in range(int(vmax / step) + 1)]
    if vmax - ticks[-1] > 0.35 * step:
        ticks.append(vmax)
    else:
        ticks[-1] = vmax
    return ticks


def _format(value: float, vmax: float) -> str:
    if vmax >= 100:
        return f"{value:.0f}"
    digits = max(0, 2 - math.floor(math.log10(vmax))) if vmax > 0 else 0
    return f"{value:.{min(digits, 4)}f}"


# ---------------------------------------------------------------------- sheets
def map_sheet(rows: Sequence[SheetRow], *, title: str = "", values: str = "", vmax: float | None = None,
              min_size: int = MIN_TILE, cmap: str = COLORMAP, outlines: bool = True) -> Sheet:
    """Draw rows of (image, word tiles) on one colour scale from 0 to ``vmax`` (default: the
    largest value of any tile), with a colour bar labelled by ``values`` and its range."""
    from PIL import Image, ImageDraw

    if not rows:
        raise ValueError("a map sheet needs at least one row")
    if vmax is None:
        vmax = max((float(np.max(t.values)) for r in rows for t in r.tiles), default=0.0)
    vmax = float(vmax) if vmax > 0 else 1.0
    size = max(max(r.image.shape[:2]) * upscale_factor(r.image.shape, min_size) for r in rows)
    n_cols = 1 + max(len(r.tiles) for r in rows)
    label_font, title_font, small = _font(14), _font(15), _font(12)
    head = 24 if title else 0
    row_title = 20 if any(r.title for r in rows) else 0
    row_h = row_title + 20 + size
    bar_h = 14
    width = max(MARGIN * 2 + n_cols * size + (n_cols - 1) * MARGIN, 640 if row_title else 420)
    height = head + len(rows) * (row_h + MARGIN) + bar_h + 60
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    boxes: dict[str, tuple[int, int, int, int]] = {}
    if title:
        draw.text((MARGIN, 4), _fit(draw, title, title_font, width - 2 * MARGIN), fill=TEXT, font=title_font)
    top = head
    for r, row in enumerate(rows):
        if row.title:
            draw.text((MARGIN, top + 2), _fit(draw, row.title, small, width - 2 * MARGIN), fill=TEXT, font=small)
        y0 = top + row_title + 20
        factor = upscale_factor(row.image.shape, min_size)
        h, w = row.image.shape[:2]
        image = upscale(np.ascontiguousarray(row.image[..., :3], dtype=np.uint8), factor)
        edges = _outlines(row.image[..., :3], factor) if outlines else None
        panels = [("image", "image", image)]
        for k, tile in enumerate(row.tiles):
            pixels = upscale(_colour(_resize(np.asarray(tile.values, np.float64), (h, w)), vmax, cmap), factor)
            if edges is not None:
                pixels = pixels.copy()
                pixels[edges] = OUTLINE
            label = f"{tile.label} (learned)" if tile.kind == "learned" and not tile.label.endswith("*") else tile.label
            panels.append((f"t{k}:{tile.label}", label, pixels))
        for c, (name, label, pixels) in enumerate(panels):
            x0 = MARGIN + c * (size + MARGIN)
            canvas.paste(Image.fromarray(pixels), (x0, y0))
            boxes[f"r{r}:{name}"] = (x0, y0, x0 + pixels.shape[1], y0 + pixels.shape[0])
            text = _fit(draw, label, label_font, size)
            draw.text((x0 + (size - _text_width(draw, text, label_font)) // 2, y0 - 19), text, fill=TEXT,
                      font=label_font)
        top += row_h + MARGIN
    # the colour bar: 0 .. vmax, ticks, and what the values are
    bar_w = width - 2 * MARGIN
    gradient = _colour(np.tile(np.linspace(0, vmax, bar_w), (bar_h, 1)), vmax, cmap)
    canvas.paste(Image.fromarray(gradient), (MARGIN, top))
    boxes["colorbar"] = (MARGIN, top, MARGIN + bar_w, top + bar_h)
    for tick in _ticks(vmax):
        x = MARGIN + int(round(tick / vmax * (bar_w - 1)))
        draw.line([(x, top + bar_h), (x, top + bar_h + 3)], fill=TEXT)
        text = _format(tick, vmax)
        tw = _text_width(draw, text, small)
        draw.text((min(max(MARGIN, x - tw // 2), width - MARGIN - tw), top + bar_h + 4), text, fill=TEXT, font=small)
    caption = f"colour: {values or 'map value'}; scale 0 to {_format(vmax, vmax)}, shared by every tile"
    _wrapped(draw, caption, small, MARGIN, top + bar_h + 22, width - 2 * MARGIN)
    return Sheet(np.asarray(canvas), boxes, vmax)


def _wrapped(draw, text: str, font, x: int, y: int, width: int) -> None:
    """Draw ``text`` in at most two lines of ``width`` pixels."""
    words, lines, line = text.split(), [], ""
    for word in words:
        trial = f"{line} {word}".strip()
        if _text_width(draw, trial, font) <= width or not line:
            line = trial
        else:
            lines.append(line)
            line = word
    lines.append(line)
    if len(lines) > 2:
        lines = [lines[0], _fit(draw, " ".join(lines[1:]), font, width)]
    for k, line in enumerate(lines):
        draw.text((x, y + 15 * k), line, fill=TEXT, font=font)


def prompt_sheets(maps: xr.DataArray, image_of: Callable[[int], np.ndarray], *, all_tokens: bool = False,
                  min_size: int = MIN_TILE, cmap: str = COLORMAP
                  ) -> list[tuple[int, int, Sheet, list[tuple[MapTile, Sheet]]]]:
    """One sheet per image and attribution prompt of ``maps``, and one picture per shown word
    on the same scale: ``[(image, prompt_index, sheet, [(tile, word picture), ...]), ...]``."""
    from . import dims

    out = []
    for position, image in enumerate(maps[dims.IMAGE].values):
        rgb = image_of(int(image))
        one = maps.isel(image=[position])
        for k in np.unique(one["prompt_index"].values):
            prompt = one.isel(token=np.flatnonzero(one["prompt_index"].values == k))
            scale = value_scale(prompt)
            tiles = word_tiles(prompt, all_tokens=all_tokens)
            text = str(prompt["prompt"].values[0])
            title = f"maps of \"{text}\" on image {int(image)}"
            if "generation_prompt" in one.coords:
                generated = str(one["generation_prompt"].values[0])
                title += " (its own prompt)" if generated == text else f" (prompt \"{generated}\")"
            sheet = map_sheet([SheetRow(rgb, tiles)], title=title, values=scale.description, min_size=min_size,
                              cmap=cmap)
            singles = [(t, map_sheet([SheetRow(rgb, [t])], title=f"{t.label}: {title}", values=scale.description,
                                     vmax=sheet.vmax, min_size=min_size, cmap=cmap)) for t in tiles]
            out.append((int(image), int(k), sheet, singles))
    return out


# ---------------------------------------------------------------------- labels
def label_legend(classes: Sequence[str], palette: Sequence[int], present: Sequence[int] | None = None
                 ) -> list[LegendEntry]:
    """The legend of a label preview: ``classes`` names the label values from 0 (background
    first), ``palette`` is the label file's flat RGB palette; value 255 (ignore) is added
    when it is ``present``."""
    entries = []
    values = list(range(len(classes)))
    names = list(classes)
    if present is not None and 255 in present:
        values.append(255)
        names.append("ignore")
    for value, name in zip(values, names):
        r, g, b = (int(c) for c in palette[3 * value:3 * value + 3])
        entries.append(LegendEntry(value, name, (r, g, b)))
    return entries


def label_sheet(rows: Sequence[tuple[np.ndarray, np.ndarray, str]], classes: Sequence[str],
                palette: Sequence[int], *, title: str = "", min_size: int = MIN_TILE) -> Sheet:
    """Label previews: per row (image, label indices ``(H, W)``, title) the image beside its
    label mask coloured by ``palette``, and one legend naming every class and its colour."""
    from PIL import Image, ImageDraw

    if not rows:
        raise ValueError("a label sheet needs at least one row")
    lut = np.zeros((256, 3), np.uint8)
    flat = np.asarray(list(palette)[:768], np.uint8)
    lut[: len(flat) // 3] = flat[: len(flat) // 3 * 3].reshape(-1, 3)
    present = sorted({int(v) for _, label, _ in rows for v in np.unique(label)})
    legend = label_legend(classes, palette, present)
    size = max(max(img.shape[:2]) * upscale_factor(img.shape, min_size) for img, _, _ in rows)
    font, small, title_font = _font(14), _font(12), _font(15)
    head = 24 if title else 0
    legend_w = 24 + max(ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox((0, 0), e.name, font=font)[2]
                        for e in legend)
    width = MARGIN * 4 + 2 * size + legend_w
    row_h = 20 + size
    height = max(head + len(rows) * (row_h + MARGIN) + MARGIN, head + 20 + 22 * len(legend) + MARGIN)
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    boxes: dict[str, tuple[int, int, int, int]] = {}
    if title:
        draw.text((MARGIN, 4), _fit(draw, title, title_font, width - 2 * MARGIN), fill=TEXT, font=title_font)
    top = head
    for r, (image, label, row_title) in enumerate(rows):
        factor = upscale_factor(image.shape, min_size)
        panels = [("image", upscale(np.ascontiguousarray(image[..., :3], np.uint8), factor)),
                  ("labels", upscale(lut[np.asarray(label, np.uint8)], factor))]
        if row_title:
            draw.text((MARGIN, top + 2), _fit(draw, row_title, small, 2 * size + MARGIN), fill=TEXT, font=small)
        for c, (name, pixels) in enumerate(panels):
            x0, y0 = MARGIN + c * (size + MARGIN), top + 20
            canvas.paste(Image.fromarray(pixels), (x0, y0))
            boxes[f"r{r}:{name}"] = (x0, y0, x0 + pixels.shape[1], y0 + pixels.shape[0])
        top += row_h + MARGIN
    x0 = MARGIN * 3 + 2 * size
    for k, entry in enumerate(legend):
        y0 = head + 20 + 22 * k
        draw.rectangle([x0, y0, x0 + 15, y0 + 15], fill=entry.rgb, outline=TEXT)
        boxes[f"legend:{entry.name}"] = (x0 + 1, y0 + 1, x0 + 15, y0 + 15)
        draw.text((x0 + 22, y0 - 1), entry.name, fill=TEXT, font=font)
    return Sheet(np.asarray(canvas), boxes, None, legend)

"""A deterministic procedural world of coloured shapes with exact per-word masks.

Two generations of scenes share one vocabulary and one mask-recovery rule:

* **v1** (:func:`sample_scene`, the world the shipped ``toy-shapes`` model was trained on):
  flat shapes on a near-white background, captions ``"a red circle and a blue square"``;
* **v2** (:func:`sample_rich_scene`): 1-3 objects of varied size that may overlap (later
  objects on top; masks hold the visible pixels), lightly shaded, on a non-uniform
  low-saturation background (gradient, smooth noise, grain), with captions in random
  object order, several joiners (``and``, ``with``, ``next to``, commas), synonyms
  (:data:`SYNONYMS`) and hypernyms (:data:`HYPERNYMS`) some of the time.

Objects are saturated and backgrounds are not, so a pixel is "object" when its chroma
(max - min channel) reaches :data:`CHROMA_THRESHOLD` and then takes the palette colour of
nearest hue; this recovers masks from generated images of both worlds.

The v1 description follows.

Scenes hold 1-3 shapes (circle, square, triangle) in saturated colours on a near-white
background. Objects never overlap and keep a gap of at least ``MIN_GAP`` pixels, so every
pixel belongs to at most one object and the ground-truth masks are exact. Rendering uses
Pillow's ``ImageDraw`` without anti-aliasing, so each object is one flat colour.

Captions list the objects joined by "and": ``"a red circle and a blue square"``. A word's
ground-truth mask is the union of the pixels of the objects it names (colour words by
colour, shape words by shape).

Generated images are not pixel-exact, so :func:`recover_masks` classifies each pixel of an
image to the nearest palette colour or the background and rebuilds the word masks from
that and the caption.
"""

from __future__ import annotations

import re
import zlib
from collections import deque
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "BACKGROUND",
    "PALETTE",
    "SYNONYMS",
    "HYPERNYMS",
    "NOUNS",
    "JOINERS",
    "CHROMA_THRESHOLD",
    "shape_of_noun",
    "parse_phrases",
    "sample_rich_scene",
    "sample_rich_scenes",
    "render_rich_scene",
    "rich_caption",
    "is_held_out_caption",
    "vocabulary_masks",
    "SHAPES",
    "COLORS",
    "MIN_GAP",
    "ToyObject",
    "Scene",
    "sample_scene",
    "sample_scenes",
    "render_object_mask",
    "render_scene",
    "caption_for",
    "parse_caption",
    "word_masks",
    "classify_pixels",
    "recover_masks",
    "scenes_to_array",
]

#: Background colour (near-white, distinct from every palette colour).
BACKGROUND: tuple[int, int, int] = (245, 245, 240)

#: Object colours: saturated, near-pure RGB, far apart from each other and the background.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (225, 25, 25),
    "green": (25, 185, 35),
    "blue": (30, 40, 225),
    "yellow": (240, 215, 20),
}
COLORS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")

#: Other nouns for each shape, used some of the time in v2 captions.
SYNONYMS: dict[str, tuple[str, ...]] = {
    "circle": ("ball", "disc"),
    "square": ("box", "block"),
    "triangle": ("wedge", "pyramid"),
}
#: Nouns that name any object, whatever its shape.
HYPERNYMS: tuple[str, ...] = ("shape", "object")
#: Every noun a caption may use -> the shape it names (``None`` for a hypernym).
NOUNS: dict[str, str | None] = {
    **{s: s for s in SHAPES},
    **{syn: s for s, syns in SYNONYMS.items() for syn in syns},
    **{h: None for h in HYPERNYMS},
}
#: Ways v2 captions join two phrases.
JOINERS: tuple[str, ...] = (" and ", " with ", " next to ", ", ")
_SPLIT = re.compile(r"\s*,\s*(?:and\s+)?|\s+and\s+|\s+with\s+|\s+next to\s+")

#: A pixel whose chroma (max - min channel, 0-255) is at least this is an object pixel.
#: v2 backgrounds stay below 40, shaded palette colours above 120.
CHROMA_THRESHOLD = 80

#: Minimum number of background pixels between two objects' bounding boxes, so that
#: objects never touch and 4-connected components separate them.
MIN_GAP = 2


@dataclass(frozen=True)
class ToyObject:
    """One flat shape: its colour and shape words and its square bounding box.

    ``x``/``y`` are the top-left pixel, ``size`` the side of the bounding box in pixels.
    """

    color: str
    shape: str
    x: int
    y: int
    size: int
    #: The noun a caption names it by (a synonym or hypernym); ``None``: its shape word.
    noun: str | None = None
    #: Whether its caption phrase leaves the colour out (``"a circle"``; v2 training only).
    bare: bool = False

    @property
    def word(self) -> str:
        """The noun of its caption phrase."""
        return self.noun or self.shape

    @property
    def phrase(self) -> str:
        """The caption phrase naming this object, e.g. ``"a red circle"`` (``"a circle"``
        when ``bare``)."""
        return f"a {self.word}" if self.bare else f"a {self.color} {self.word}"


@dataclass
class Scene:
    """A rendered scene: RGB image, objects, caption and per-object masks.

    Attributes
    ----------
    image : np.ndarray
        ``(H, W, 3)`` uint8 RGB image.
    objects : list of ToyObject
        The objects in caption order.
    caption : str
        ``"a red circle and a blue square"``.
    object_masks : np.ndarray
        ``(n_objects, H, W)`` bool, exact (visible) pixels of each object.
    caption_order : tuple of int, optional
        v2: the object each caption phrase names, in caption order (``None``: the
        objects' order, as in v1). Objects are drawn in list order, later on top.
    """

    image: np.ndarray
    objects: list[ToyObject]
    caption: str
    object_masks: np.ndarray = field(repr=False)
    caption_order: tuple[int, ...] | None = None

    def word_masks(self) -> dict[str, np.ndarray]:
        """Ground-truth mask per colour, shape and noun word in the caption (see :func:`word_masks`)."""
        return word_masks(self.objects, self.object_masks)

    def vocabulary_masks(self) -> dict[str, np.ndarray]:
        """Mask of every word of the vocabulary, in the caption or not (see :func:`vocabulary_masks`)."""
        return vocabulary_masks(self.objects, self.object_masks)

    def to_pil(self) -> Image.Image:
        """The image as a Pillow image (for saving or feeding a pipeline)."""
        return Image.fromarray(self.image)


def render_object_mask(obj: ToyObject, image_size: int) -> np.ndarray:
    """Exact ``(H, W)`` bool mask of one object, drawn without anti-aliasing."""
    canvas = Image.new("L", (image_size, image_size), 0)
    draw = ImageDraw.Draw(canvas)
    x0, y0, x1, y1 = obj.x, obj.y, obj.x + obj.size - 1, obj.y + obj.size - 1
    if obj.shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=255)
    elif obj.shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=255)
    elif obj.shape == "triangle":
        # Upright isosceles triangle filling the bounding box: apex at the top centre.
        draw.polygon([((x0 + x1) / 2.0, y0), (x1, y1), (x0, y1)], fill=255)
    else:
        raise ValueError(f"unknown shape {obj.shape!r}; known: {', '.join(SHAPES)}")
    return np.asarray(canvas) > 0


def caption_for(objects: list[ToyObject]) -> str:
    """The caption: the objects' phrases joined by ``" and "``."""
    return " and ".join(o.phrase for o in objects)


def shape_of_noun(noun: str) -> str | None:
    """The shape a noun names (``"ball"`` -> ``"circle"``), ``None`` for a hypernym.

    Raises ValueError for a word that is no noun of the world.
    """
    if noun not in NOUNS:
        raise ValueError(f"unknown noun {noun!r}; known: {', '.join(NOUNS)}")
    return NOUNS[noun]


def parse_phrases(caption: str) -> list[tuple[str, str, str | None]]:
    """``(colour, noun, shape)`` per phrase of a v1 or v2 caption, in caption order.

    ``shape`` is the canonical shape the noun names, ``None`` for a hypernym. Phrases are
    split at every joiner of :data:`JOINERS` (a comma followed by "and" counts once).

    Raises
    ------
    ValueError
        If a phrase is not of the form ``"a <colour> <noun>"`` with known words.
    """
    out = []
    for phrase in _SPLIT.split(caption.strip()):
        words = phrase.split()
        if len(words) != 3 or words[0] != "a" or words[1] not in PALETTE or words[2] not in NOUNS:
            raise ValueError(f"cannot parse caption phrase {phrase!r} in {caption!r}")
        out.append((words[1], words[2], NOUNS[words[2]]))
    return out


def parse_caption(caption: str) -> list[tuple[str, str]]:
    """``(colour, shape)`` pairs named by a caption, in order.

    Synonyms are given as their shape (``"a red ball"`` -> ``("red", "circle")``), a
    hypernym as itself (``"a red shape"`` -> ``("red", "shape")``).

    Raises
    ------
    ValueError
        If a phrase is not of the form ``"a <colour> <noun>"`` with known words.
    """
    return [(color, shape or noun) for color, noun, shape in parse_phrases(caption)]


def _boxes_apart(a: tuple[int, int, int], b: tuple[int, int, int], gap: int) -> bool:
    ax, ay, asz = a
    bx, by, bsz = b
    return (ax + asz + gap <= bx or bx + bsz + gap <= ax or ay + asz + gap <= by or by + bsz + gap <= ay)


def sample_scene(
    rng: np.random.Generator | int,
    image_size: int = 32,
    max_objects: int = 3,
    min_objects: int = 1,
    colors: tuple[str, ...] = COLORS,
    shapes: tuple[str, ...] = SHAPES,
    min_size: int | None = None,
    max_size: int | None = None,
) -> Scene:
    """Draw one random scene; the same generator state always gives the same scene.

    Objects are placed by rejection sampling so that bounding boxes stay ``MIN_GAP``
    pixels apart; when an object does not fit after many tries the scene keeps fewer
    objects. No two objects share both colour and shape, so every caption phrase names
    exactly one object.

    Parameters
    ----------
    rng : numpy.random.Generator or int
        Source of randomness (an int is used as a seed).
    image_size : int
        Side of the square image in pixels.
    max_objects, min_objects : int
        Range of the number of objects (inclusive).
    colors, shapes : tuple of str
        Vocabulary to draw from (subsets of :data:`PALETTE` and :data:`SHAPES`).
    min_size, max_size : int, optional
        Object bounding-box side range; defaults scale with the image (7-13 px at 32).
    """
    if not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(rng)
    lo = min_size if min_size is not None else max(5, round(image_size * 7 / 32))
    hi = max_size if max_size is not None else max(lo, round(image_size * 13 / 32))
    n_target = int(rng.integers(min_objects, max_objects + 1))
    objects: list[ToyObject] = []
    boxes: list[tuple[int, int, int]] = []
    used: set[tuple[str, str]] = set()
    for _ in range(n_target):
        while True:
            color = str(colors[int(rng.integers(len(colors)))])
            shape = str(shapes[int(rng.integers(len(shapes)))])
            if (color, shape) not in used or len(used) >= len(colors) * len(shapes):
                break
        placed = False
        for _attempt in range(50):
            size = int(rng.integers(lo, hi + 1))
            x = int(rng.integers(0, image_size - size + 1))
            y = int(rng.integers(0, image_size - size + 1))
            if all(_boxes_apart((x, y, size), b, MIN_GAP) for b in boxes):
                placed = True
                break
        if not placed:
            break
        used.add((color, shape))
        boxes.append((x, y, size))
        objects.append(ToyObject(color, shape, x, y, size))
    return render_scene(objects, image_size)


def render_scene(objects: list[ToyObject], image_size: int = 32) -> Scene:
    """Render given objects on the background (flat colours, no anti-aliasing)."""
    image = np.empty((image_size, image_size, 3), dtype=np.uint8)
    image[:] = BACKGROUND
    masks = np.zeros((len(objects), image_size, image_size), dtype=bool)
    for i, obj in enumerate(objects):
        masks[i] = render_object_mask(obj, image_size)
        image[masks[i]] = PALETTE[obj.color]
    return Scene(image=image, objects=list(objects), caption=caption_for(objects), object_masks=masks)


def sample_scenes(seed: int | tuple[int, ...], n: int, **kwargs) -> list[Scene]:
    """``n`` scenes from one seed (a tuple such as ``(seed, step)`` gives a fresh stream)."""
    rng = np.random.default_rng(seed)
    return [sample_scene(rng, **kwargs) for _ in range(n)]


def word_masks(objects: list[ToyObject], object_masks: np.ndarray) -> dict[str, np.ndarray]:
    """Ground-truth mask per colour or shape word that appears among ``objects``.

    A colour word covers the pixels of every object of that colour, a shape word those of
    every object of that shape (named by it, a synonym or a hypernym); a synonym a caption
    uses covers its shape's pixels, a hypernym the objects whose phrases use it.
    """
    out: dict[str, np.ndarray] = {}
    for obj, mask in zip(objects, object_masks):
        for word in (obj.color, obj.shape):
            out[word] = out[word] | mask if word in out else mask.copy()
    for obj, mask in zip(objects, object_masks):
        if obj.noun in HYPERNYMS:  # a hypernym in a caption names its own phrase's object
            out[obj.noun] = out[obj.noun] | mask if obj.noun in out else mask.copy()
        elif obj.noun is not None:  # a synonym means its shape
            out[obj.noun] = out[obj.shape].copy()
    return out


def vocabulary_masks(objects: list[ToyObject], object_masks: np.ndarray) -> dict[str, np.ndarray]:
    """The mask of every word of the vocabulary, whether or not a caption uses it.

    Colours and shapes as in :func:`word_masks`; each synonym takes its shape's mask; a
    hypernym covers every object. Words naming nothing in the scene get empty masks.
    This is the ground truth for words that were not in the prompt (``"ball"`` on an
    image made from ``"a red circle"``).
    """
    empty = np.zeros(object_masks.shape[1:], dtype=bool)
    out = {w: empty.copy() for w in COLORS + tuple(NOUNS)}
    for obj, mask in zip(objects, object_masks):
        out[obj.color] |= mask
        for noun, shape in NOUNS.items():
            if shape is None or shape == obj.shape:
                out[noun] |= mask
    return out


def classify_pixels(image: np.ndarray | Image.Image) -> np.ndarray:
    """Label each pixel: ``0`` background, ``i+1`` for ``COLORS[i]``.

    Backgrounds are unsaturated and objects saturated (both worlds), so a pixel whose
    chroma (max - min channel) is under :data:`CHROMA_THRESHOLD` is background; any other
    pixel takes the palette colour of nearest hue (largest cosine between the pixel's and
    the colour's deviation from their own grey), which shading does not change.
    """
    arr = np.asarray(image)[..., :3].astype(np.float32)
    chroma = arr.max(-1) - arr.min(-1)
    refs = np.array([PALETTE[c] for c in COLORS], dtype=np.float32)
    refs = refs - refs.mean(-1, keepdims=True)
    refs /= np.linalg.norm(refs, axis=-1, keepdims=True)
    dev = arr - arr.mean(-1, keepdims=True)
    labels = (dev @ refs.T).argmax(-1) + 1
    labels[chroma < CHROMA_THRESHOLD] = 0
    return labels.astype(np.int64)


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a bool mask (breadth-first; images are small)."""
    h, w = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    comps = []
    for sy, sx in zip(*np.nonzero(mask)):
        if seen[sy, sx]:
            continue
        comp = np.zeros_like(mask, dtype=bool)
        queue = deque([(sy, sx)])
        seen[sy, sx] = True
        while queue:
            y, x = queue.popleft()
            comp[y, x] = True
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        comps.append(comp)
    return comps


def _shape_of(component: np.ndarray) -> str:
    """Shape of one blob from its extent (area over bounding-box area).

    Squares fill their box (extent 1), circles about pi/4, upright triangles about 1/2.
    """
    ys, xs = np.nonzero(component)
    extent = component.sum() / float((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
    if extent > 0.9:
        return "square"
    if extent > 0.66:
        return "circle"
    return "triangle"


def recover_masks(image: np.ndarray | Image.Image, caption: str, min_pixels: int = 3) -> dict[str, np.ndarray]:
    """Word masks for the caption's colour and noun words, recovered from an image.

    Meant for generated images, which are not pixel-exact. Rule:

    * every pixel is classified to a colour or the background (:func:`classify_pixels`);
    * a colour word's mask is all pixels of that colour;
    * a shape's mask is the union, over the caption phrases naming that shape (by its
      word or a synonym), of their colour's pixels. When a colour names more than one
      phrase, its pixels are split into 4-connected blobs (blobs under ``min_pixels``
      dropped) and each blob goes to the caption shape that matches its extent
      (see ``_shape_of``); a blob matching none of them goes to the colour's hypernym
      phrase if there is one, else it is left out;
    * a synonym or hypernym used in the caption gets the mask of what it names there
      (a synonym its shape's mask, a hypernym its phrases' objects).

    Keys: the caption's colours, the canonical shapes it names, and its other nouns. On
    rendered v1 scenes this reproduces :meth:`Scene.word_masks` exactly; on v2 scenes too
    unless two objects of one colour are told apart by an occluded outline.
    """
    labels = classify_pixels(image)
    phrases = parse_phrases(caption)
    out: dict[str, np.ndarray] = {}
    empty = np.zeros(labels.shape, dtype=bool)
    for color in dict.fromkeys(c for c, _, _ in phrases):
        out[color] = labels == COLORS.index(color) + 1
    for _, noun, shape in phrases:
        out.setdefault(shape or noun, empty.copy())
    for color in dict.fromkeys(c for c, _, _ in phrases):
        here = [shape or noun for c, noun, shape in phrases if c == color]
        if len(here) == 1:
            out[here[0]] |= out[color]
            continue
        hyper = [h for h in here if h in HYPERNYMS]
        for comp in _components(out[color]):
            if comp.sum() < min_pixels:
                continue
            shape = _shape_of(comp)
            if shape in here:
                out[shape] |= comp
            elif hyper:
                out[hyper[0]] |= comp
    for _, noun, shape in phrases:
        if shape is not None and noun != shape:
            out[noun] = out[shape].copy()
    return out


def is_held_out_caption(caption: str, every: int = 8) -> bool:
    """Whether a v2 caption belongs to the held-out split (one caption in ``every``, by a
    stable hash of its text), which training never uses and probes do."""
    return zlib.crc32(caption.encode()) % every == 0


def rich_caption(objects: list[ToyObject], order: tuple[int, ...], joiners: list[str]) -> str:
    """The v2 caption: the objects' phrases in ``order``, joined by ``joiners`` (one per gap)."""
    parts = [objects[order[0]].phrase]
    for j, i in zip(joiners, order[1:]):
        parts.append(j + objects[i].phrase)
    return "".join(parts)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Values in [-1, 1] on a ``cells`` x ``cells`` grid, bilinearly upsampled to ``size``."""
    grid = rng.uniform(-1, 1, (cells + 1, cells + 1))
    pos = np.linspace(0, cells, size)
    i0 = np.minimum(pos.astype(int), cells - 1)
    f = pos - i0
    rows = grid[i0] * (1 - f)[:, None] + grid[i0 + 1] * f[:, None]
    return rows[:, i0] * (1 - f)[None, :] + rows[:, i0 + 1] * f[None, :]


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A low-saturation background: grey level, faint tint, gradient, smooth noise, grain.

    Chroma stays under 40 (tint <= 12 per channel, grain <= 4), far below objects'.
    """
    level = rng.uniform(150, 235)
    tint = rng.uniform(-12, 12, 3)
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:size, 0:size] / max(1, size - 1) - 0.5
    gradient = rng.uniform(10, 30) * (np.cos(angle) * xx + np.sin(angle) * yy)
    noise = rng.uniform(3, 10) * _smooth_noise(rng, size, int(rng.integers(2, 6)))
    grey = level + gradient + noise
    img = grey[..., None] + tint + rng.uniform(-4, 4, (size, size, 3))
    return np.clip(img, 0, 255)


def render_rich_scene(
    objects: list[ToyObject],
    image_size: int = 32,
    rng: np.random.Generator | int = 0,
    caption_order: tuple[int, ...] | None = None,
    joiners: list[str] | None = None,
) -> Scene:
    """Render v2 objects (list order = drawing order, later on top) with shading on a
    random low-saturation background; masks keep each object's visible pixels."""
    if not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(rng)
    order = tuple(range(len(objects))) if caption_order is None else tuple(caption_order)
    joiners = [" and "] * (len(objects) - 1) if joiners is None else list(joiners)
    image = _background(rng, image_size)
    masks = np.zeros((len(objects), image_size, image_size), dtype=bool)
    yy, xx = np.mgrid[0:image_size, 0:image_size].astype(np.float64)
    for i, obj in enumerate(objects):
        full = render_object_mask(obj, image_size)
        masks[:i] &= ~full
        masks[i] = full
        # Light shading: brightness falls linearly from 1 to ``dark`` across the object.
        angle = rng.uniform(0, 2 * np.pi)
        dark = rng.uniform(0.82, 0.95)
        cx, cy = obj.x + obj.size / 2, obj.y + obj.size / 2
        t = ((xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)) / max(obj.size, 1) + 0.5
        shade = 1 - (1 - dark) * np.clip(t, 0, 1)
        image[full] = np.asarray(PALETTE[obj.color], dtype=np.float64) * shade[full][:, None]
    image = np.round(image).astype(np.uint8)
    return Scene(image=image, objects=list(objects), caption=rich_caption(objects, order, joiners),
                 object_masks=masks, caption_order=order)


def sample_rich_scene(
    rng: np.random.Generator | int,
    image_size: int = 32,
    max_objects: int = 3,
    min_objects: int = 1,
    synonym_p: float = 0.3,
    hypernym_p: float = 0.1,
    overlap_p: float = 0.4,
    split: str | None = "train",
    bare_p: float = 0.0,
    min_size: int | None = None,
    max_size: int | None = None,
    min_visible: float = 0.5,
) -> Scene:
    """Draw one v2 scene; the same generator state always gives the same scene.

    Objects (distinct (colour, shape) pairs) get sizes of 6-16 px at 32; with probability
    ``overlap_p`` a scene lets objects of different colours overlap (each keeps at least
    ``min_visible`` of its pixels visible), otherwise boxes stay ``MIN_GAP`` apart; two
    objects of one colour never touch, so their pixels stay separable. Each noun is a
    synonym with probability ``synonym_p``, a hypernym with ``hypernym_p``; the phrase
    order is random and so is each joiner.

    With probability ``bare_p`` a phrase leaves its colour out (``"a ball"``; such captions
    teach nouns to stand alone, as attributions like "circle square triangle" use them,
    but :func:`parse_phrases` does not read them: use the scene's objects as truth).

    ``split``: ``"train"`` redraws the wording of a caption that :func:`is_held_out_caption`
    reserves, ``"held_out"`` redraws until it is one (objects unchanged), ``None`` keeps any.
    """
    if not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(rng)
    lo = min_size if min_size is not None else max(4, round(image_size * 6 / 32))
    hi = max_size if max_size is not None else max(lo, round(image_size * 16 / 32))
    for _scene_try in range(256):
        objects = _place_rich_objects(rng, image_size, min_objects, max_objects, lo, hi, overlap_p, min_visible)
        n = len(objects)
        for _tries in range(16):
            named = []
            for o in objects:
                u = rng.random()
                if u < hypernym_p:
                    noun = str(HYPERNYMS[int(rng.integers(len(HYPERNYMS)))])
                elif u < hypernym_p + synonym_p:
                    noun = str(SYNONYMS[o.shape][int(rng.integers(len(SYNONYMS[o.shape])))])
                else:
                    noun = None
                bare = bool(bare_p > 0 and rng.random() < bare_p and noun not in HYPERNYMS)
                named.append(ToyObject(o.color, o.shape, o.x, o.y, o.size, noun, bare))
            order = tuple(int(i) for i in rng.permutation(n))
            joiners = [str(JOINERS[int(rng.integers(len(JOINERS)))]) for _ in range(n - 1)]
            caption = rich_caption(named, order, joiners)
            if split is None or is_held_out_caption(caption) == (split == "held_out"):
                return render_rich_scene(named, image_size, rng, order, joiners)
        # no wording of these objects falls in the split: draw other objects
    raise RuntimeError(f"no scene of split {split!r} found")  # pragma: no cover - needs 4096 misses


def _place_rich_objects(rng: np.random.Generator, image_size: int, min_objects: int, max_objects: int,
                        lo: int, hi: int, overlap_p: float, min_visible: float) -> list[ToyObject]:
    """Objects of one v2 scene, in drawing order (see :func:`sample_rich_scene`)."""
    n_target = int(rng.integers(min_objects, max_objects + 1))
    overlap = bool(rng.random() < overlap_p)
    objects: list[ToyObject] = []
    fulls: list[np.ndarray] = []
    used: set[tuple[str, str]] = set()
    for _ in range(n_target):
        while True:
            color = str(COLORS[int(rng.integers(len(COLORS)))])
            shape = str(SHAPES[int(rng.integers(len(SHAPES)))])
            if (color, shape) not in used:
                break
        placed = None
        for _attempt in range(50):
            size = int(rng.integers(lo, hi + 1))
            x = int(rng.integers(0, image_size - size + 1))
            y = int(rng.integers(0, image_size - size + 1))
            box = (x, y, size)
            if not all(_boxes_apart(box, (o.x, o.y, o.size), MIN_GAP)
                       for o in objects if o.color == color or not overlap):
                continue
            cand = ToyObject(color, shape, x, y, size)
            full = render_object_mask(cand, image_size)
            if overlap:
                # every earlier object keeps min_visible of its pixels under all that lies above it
                above = full.copy()
                ok = True
                for f in reversed(fulls):
                    if (f & ~above).sum() < min_visible * f.sum():
                        ok = False
                        break
                    above |= f
                if not ok:
                    continue
            placed = cand, full
            break
        if placed is None:
            break
        used.add((color, shape))
        objects.append(placed[0])
        fulls.append(placed[1])
    return objects


def sample_rich_scenes(seed: int | tuple[int, ...], n: int, **kwargs) -> list[Scene]:
    """``n`` v2 scenes from one seed (see :func:`sample_rich_scene`)."""
    rng = np.random.default_rng(seed)
    return [sample_rich_scene(rng, **kwargs) for _ in range(n)]


def scenes_to_array(scenes: list[Scene]) -> np.ndarray:
    """Stack scene images as float32 ``(N, 3, H, W)`` in ``[-1, 1]`` (diffusers' range)."""
    arr = np.stack([s.image for s in scenes]).astype(np.float32) / 127.5 - 1.0
    return arr.transpose(0, 3, 1, 2)

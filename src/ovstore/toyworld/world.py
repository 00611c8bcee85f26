"""A deterministic procedural world of flat coloured shapes with exact per-word masks.

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

from collections import deque
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "BACKGROUND",
    "PALETTE",
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

    @property
    def phrase(self) -> str:
        """The caption phrase naming this object, e.g. ``"a red circle"``."""
        return f"a {self.color} {self.shape}"


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
        ``(n_objects, H, W)`` bool, exact pixels of each object.
    """

    image: np.ndarray
    objects: list[ToyObject]
    caption: str
    object_masks: np.ndarray = field(repr=False)

    def word_masks(self) -> dict[str, np.ndarray]:
        """Ground-truth mask per colour/shape word in the caption (see :func:`word_masks`)."""
        return word_masks(self.objects, self.object_masks)

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


def parse_caption(caption: str) -> list[tuple[str, str]]:
    """``(colour, shape)`` pairs named by a caption, in order.

    Raises
    ------
    ValueError
        If a phrase is not of the form ``"a <colour> <shape>"`` with known words.
    """
    pairs = []
    for phrase in caption.strip().split(" and "):
        words = phrase.split()
        if len(words) != 3 or words[0] != "a" or words[1] not in PALETTE or words[2] not in SHAPES:
            raise ValueError(f"cannot parse caption phrase {phrase!r} in {caption!r}")
        pairs.append((words[1], words[2]))
    return pairs


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
    every object of that shape.
    """
    out: dict[str, np.ndarray] = {}
    for obj, mask in zip(objects, object_masks):
        for word in (obj.color, obj.shape):
            out[word] = out[word] | mask if word in out else mask.copy()
    return out


def classify_pixels(image: np.ndarray | Image.Image) -> np.ndarray:
    """Label each pixel with its nearest colour: ``0`` background, ``i+1`` for ``COLORS[i]``.

    The rule is plain nearest neighbour in RGB (Euclidean distance) among the background
    and the palette colours. The palette is far apart (distance > 180 between any two
    entries), so the rule is robust to the colour noise of generated images.
    """
    arr = np.asarray(image)[..., :3].astype(np.float32)
    refs = np.array([BACKGROUND] + [PALETTE[c] for c in COLORS], dtype=np.float32)
    dist = ((arr[..., None, :] - refs) ** 2).sum(-1)
    return dist.argmin(-1).astype(np.int64)


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
    """Word masks for the caption's colour and shape words, recovered from an image.

    Meant for generated images, which are not pixel-exact. Rule:

    * every pixel is classified to its nearest colour (:func:`classify_pixels`);
    * a colour word's mask is all pixels of that colour;
    * a shape word's mask is the union, over the caption objects with that shape, of
      their colour's pixels. When a colour names more than one object in the caption,
      its pixels are split into 4-connected blobs (blobs under ``min_pixels`` dropped)
      and each blob goes to the caption shape that matches its extent
      (see ``_shape_of``); blobs matching none of them are left out.

    On rendered scenes this reproduces :meth:`Scene.word_masks` exactly.
    """
    labels = classify_pixels(image)
    pairs = parse_caption(caption)
    out: dict[str, np.ndarray] = {}
    for color in dict.fromkeys(c for c, _ in pairs):
        out[color] = labels == COLORS.index(color) + 1
    for _, shape in pairs:
        out.setdefault(shape, np.zeros(labels.shape, dtype=bool))
    for color in dict.fromkeys(c for c, _ in pairs):
        shapes_here = [s for c, s in pairs if c == color]
        if len(shapes_here) == 1:
            out[shapes_here[0]] |= out[color]
            continue
        for comp in _components(out[color]):
            if comp.sum() < min_pixels:
                continue
            shape = _shape_of(comp)
            if shape in shapes_here:
                out[shape] |= comp
    return out


def scenes_to_array(scenes: list[Scene]) -> np.ndarray:
    """Stack scene images as float32 ``(N, 3, H, W)`` in ``[-1, 1]`` (diffusers' range)."""
    arr = np.stack([s.image for s in scenes]).astype(np.float32) / 127.5 - 1.0
    return arr.transpose(0, 3, 1, 2)

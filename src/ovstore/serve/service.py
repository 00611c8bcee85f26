"""What the viewer computes, without HTTP: the store opened read-only, the text encoder and the
stored key projections loaded once, maps of any text (or learned token) over any images through
the analysis engine with the images' prepared queries kept in a :class:`QueryCache`, label masks
as ``ovstore label`` makes them, and the CLI commands that reproduce a view."""

from __future__ import annotations

import re
import shlex
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..analyze import Attribution, MapConfig, MapPlan, check_recorded_encoder, iter_map_blocks, load_text_encoder
from ..errors import InvalidInputError
from ..pictures import FILLER_WORDS, SPECIAL_TOKENS
from ..store import Store, analysis_defaults, open_store
from .cache import PageBatches, QueryCache

__all__ = ["LearnedToken", "MapResult", "MapService", "MAX_TEXT_CHARS", "find_learned_tokens", "token_kind"]

#: Longest attribution text accepted (the text encoder takes 77 tokens; this bounds the work
#: of tokenizing what a request sends before the token count is known).
MAX_TEXT_CHARS = 400
#: Most images one map request may ask for (a page of the grid).
MAX_IMAGES_PER_REQUEST = 96
#: Token files looked for beside the store: in its folder and that folder's subfolders.
MAX_TOKEN_FILES = 200


def token_kind(token: str, token_id: int, ended: bool) -> str:
    """``word``, ``filler``, ``special`` (start/end of text), ``padding`` or ``learned``, as
    ``maps --png`` tells which tiles to draw by default."""
    word = token[:-4] if token.endswith("</w>") else token
    if ended:
        return "padding"
    if token in SPECIAL_TOKENS:
        return "special"
    if token_id < 0:
        return "learned"
    if word.lower() in FILLER_WORDS or not any(ch.isalnum() for ch in word):
        return "filler"
    return "word"


@dataclass(frozen=True)
class LearnedToken:
    """A token file of ``ovstore optimize`` found beside the store, usable with this store's model."""

    name: str
    path: Path
    init_word: str
    trained_on: str


def find_learned_tokens(store: Store) -> list[LearnedToken]:
    """Token files (``*.safetensors`` written by ``ovstore optimize``) in the store's folder and
    its subfolders whose model matches the store's; other files are passed over."""
    from ..optimize import load_token, token_attribution

    folder = store.path.resolve().parent
    candidates = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*/*.safetensors"))
    found: list[LearnedToken] = []
    names: set[str] = set()
    for path in candidates[:MAX_TOKEN_FILES]:
        try:
            token = load_token(path)
            token_attribution(token, store.layout.model)  # refuses a token of another model
        except InvalidInputError:
            continue
        if token.name in names:  # two files of one name: the first (sorted) is listed
            continue
        names.add(token.name)
        found.append(LearnedToken(token.name, path, token.init_word, str(token.training.get("store", ""))))
    return found


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)


@dataclass(frozen=True)
class MapResult:
    """Maps of one attribution over some images: ``maps`` is ``(image, token, h, w)`` float32,
    the raw values of ``compute_maps``; ``divisor`` turns them into shares of each pixel's
    attention when ``share`` (token softmax: every pixel's token sum is that constant)."""

    text: str
    label: str
    tokens: tuple[str, ...]
    token_ids: tuple[int, ...]
    kinds: tuple[str, ...]
    images: tuple[int, ...]
    maps: np.ndarray
    divisor: float
    share: bool
    learned: str | None = None


class MapService:
    """One store, served read-only. Thread-safe: the text encoder is used under a lock, the
    query cache is shared, the engine's layer pool does the rest."""

    def __init__(self, store: str | Path | Store, *, device: str = "cpu", model: str | None = None,
                 cache_images: int = 96, cache_bytes: int = 2 * 2**30, space: str = "attention") -> None:
        self.store = store if isinstance(store, Store) else open_store(store, mode="r")
        self.device = device
        self.model = model
        self.images = tuple(self.store.complete_images())
        if not self.images:
            raise InvalidInputError(f"store {self.store.path} has no complete image to show; capture some first")
        #: the viewer's own cache of prepared queries (``--cache-mb``), read through by every plan read
        self.cache = QueryCache(max_images=cache_images, max_bytes=cache_bytes)
        self.plan = MapPlan(self.store, MapConfig(space=space), device=device, query_cache=self.cache)  # space: SD3/FLUX
        self.pages = PageBatches(self.plan.read)
        #: a page is computed in one engine pass per layer when the plan's settings are the
        #: defaults this batching reproduces (sums, no normalisation, keys shared by every image)
        config = self.plan.config
        self.batch_pages = (not self.plan.keys_per_image and config.normalize == "none"
                            and (config.head_reduction, config.step_reduction, config.layer_reduction)
                            == ("sum", "sum", "sum"))
        self._pool = ThreadPoolExecutor(self.plan.workers, thread_name_prefix="ovstore-serve-layer",
                                        initializer=_one_thread)
        self.encoder = load_text_encoder(self.store.layout.model, model=model, device=device)
        if model is None:
            check_recorded_encoder(self.encoder, self.store.layout.model, self.store.path)
        self._encode_lock = threading.Lock()
        self._attributions: OrderedDict[str, Attribution] = OrderedDict()
        records = self.store.records()  # read array by array: fast for large stores
        self._records = {i: records[i] for i in self.images}
        self._rgb: OrderedDict[int, np.ndarray] = OrderedDict()  # decoded images, the most recent 256
        self.learned = {t.name: t for t in find_learned_tokens(self.store)}
        self._label_maps: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self._label_lock = threading.Lock()  # the small LRUs: label maps, decoded images

    # ------------------------------------------------------------------ what is served
    def info(self) -> dict[str, Any]:
        """The store as the page shows it: images and prompts, layers, model, defaults, limits."""
        layout = self.store.layout
        defaults = analysis_defaults(self.store)
        from ..label import OVSTORE_DEFAULTS

        label = {k: (list(v) if isinstance(v, tuple) else v)
                 for k, v in {**OVSTORE_DEFAULTS, **(defaults.label or {})}.items()}
        return {
            "store": str(self.store.path),
            "model": {"id": layout.model.id, "family": layout.model.family, "pipeline": layout.model.pipeline_class},
            "images": [{"image": i, "prompt": r.prompt, "negative_prompt": r.negative_prompt, "seed": r.seed}
                       for i, r in self._records.items()],
            "image_size": [layout.height, layout.width],
            "map_size": list(self.plan.size),
            "layers": [{"name": l.name, "resolution": f"{l.height}x{l.width}", "heads": l.heads,
                        "used": l.name in {p.name for p in self.plan.layers}} for l in self.store.layers],
            "calls": len(self.plan.steps),
            "branch": layout.branches[self.plan.branch],
            "learned_tokens": [{"name": t.name, "file": t.path.name, "init_word": t.init_word}
                               for t in self.learned.values()],
            "label_defaults": label,
            "limits": {"text_chars": MAX_TEXT_CHARS, "images_per_request": MAX_IMAGES_PER_REQUEST},
        }

    def image_rgb(self, image: int) -> np.ndarray:
        """The stored image ``(H, W, 3)`` uint8 (decoded once)."""
        image = self.check_image(image)
        with self._label_lock:
            rgb = self._rgb.get(image)
            if rgb is not None:
                self._rgb.move_to_end(image)
                return rgb
        rgb = np.asarray(self.store.image(image))[..., :3]
        with self._label_lock:
            self._rgb[image] = rgb
            while len(self._rgb) > 256:
                self._rgb.popitem(last=False)
        return rgb

    def prompt(self, image: int) -> str:
        return self._records[self.check_image(image)].prompt

    def check_image(self, image: int) -> int:
        image = int(image)
        if image not in self._records:
            first, last = self.images[0], self.images[-1]
            raise InvalidInputError(f"image {image} is not a complete image of this store (complete: {len(self.images)} "
                                    f"images between {first} and {last})")
        return image

    # ------------------------------------------------------------------ maps
    def attribution(self, text: str | None = None, learned: str | None = None) -> Attribution:
        """The attribution of ``text`` (encoded, kept for the next request) or of a learned token."""
        if learned:
            if learned not in self.learned:
                known = ", ".join(self.learned) or "none found beside the store"
                raise InvalidInputError(f"learned token {learned!r} is not known (tokens: {known})")
            from ..optimize import load_token, token_attribution

            return token_attribution(load_token(self.learned[learned].path), self.store.layout.model)
        text = check_text(text)
        with self._encode_lock:
            att = self._attributions.get(text)
            if att is None:
                att = self.encoder.encode([text])[0]
                self._attributions[text] = att
                while len(self._attributions) > 512:
                    self._attributions.popitem(last=False)
            else:
                self._attributions.move_to_end(text)
        return att

    def maps(self, text: str | None, images: Sequence[int], *, learned: str | None = None) -> MapResult:
        """Maps of ``text`` (or the learned token ``learned``) over ``images``: the values of
        :func:`ovstore.analyze.compute_maps` with its default configuration."""
        images = self.check_images(images)
        att = self.attribution(text, learned)
        batched = self.pages.get(tuple(images)) if self.batch_pages and len(images) > 1 else None
        if batched is not None:
            out = self._page_maps(att, batched, len(images))
        else:
            out = np.empty((len(images), att.n_tokens, *self.plan.size), dtype=np.float32)
            for block in iter_map_blocks(self.plan, images, [att], block_budget=self.plan.config.block_budget):
                out[block.position, block.tokens] = block.maps.detach().cpu().numpy()
        ids = tuple(int(i) for i in att.token_ids) if att.token_ids is not None else \
            tuple([0] + [-1] * (att.n_tokens - 1))
        kinds, ended = [], False
        for tok, tid in zip(att.tokens, ids):
            kinds.append(token_kind(tok, tid, ended))
            ended = ended or tok == SPECIAL_TOKENS[1]
        divisor, share = self._divisor(out)
        return MapResult(text=learned and f"{learned}*" or str(text), label=att.label, tokens=tuple(att.tokens),
                         token_ids=ids, kinds=tuple(kinds), images=tuple(images), maps=out, divisor=divisor,
                         share=share, learned=learned)

    def _page_maps(self, att: Attribution, batched: dict[str, Any], n_images: int) -> np.ndarray:
        """Maps ``(image, token, h, w)`` of one attribution over a batched page: per layer one
        :func:`~ovstore.analyze.layer_token_maps` over every image's pixels, layers of one
        resolution summed, each resolution upsampled once (as ``compute_maps`` combines them)."""
        import torch

        from ..analyze import TokenBuckets, layer_token_maps, resize_maps

        plan = self.plan
        buckets = TokenBuckets.from_offsets([0, att.n_tokens], att.row_keys)
        keys = plan.keys(att.embedding.float())

        def layer(info):
            with torch.inference_mode():
                maps = layer_token_maps(batched[info.name], keys[info.name], buckets,
                                        activation=plan.config.activation, memory_budget=plan.memory_budget)
                return info, maps.view(att.n_tokens, n_images, info.height, info.width)

        costly_first = sorted(plan.layers, key=lambda l: -l.height * l.width * l.heads * (l.head_dim + 8))
        by_size: dict[tuple[int, int], Any] = {}
        for info, maps in self._pool.map(layer, costly_first):
            size = (info.height, info.width)
            by_size[size] = maps.clone() if size not in by_size else by_size[size].add_(maps)
        total = None
        with torch.inference_mode():
            for maps in by_size.values():
                maps = resize_maps(maps.transpose(0, 1), plan.target)
                total = maps if total is None else total.add_(maps)
            total = resize_maps(total, plan.size)
        return np.ascontiguousarray(total.numpy(), dtype=np.float32)

    def _divisor(self, maps: np.ndarray) -> tuple[float, bool]:
        """The token-softmax constant (calls × heads summed over layers) every pixel's token sum equals."""
        total = maps.astype(np.float64).sum(axis=1)
        mean = float(total.mean()) if total.size else 0.0
        share = mean > 0 and float(np.abs(total - mean).max()) <= 1e-3 * mean
        return (mean, True) if share else (1.0, False)

    def check_images(self, images: Sequence[int]) -> list[int]:
        images = [self.check_image(i) for i in images]
        if not images:
            raise InvalidInputError("no image chosen; pass image=N or a page of images")
        if len(images) > MAX_IMAGES_PER_REQUEST:
            raise InvalidInputError(f"{len(images)} images in one request; at most {MAX_IMAGES_PER_REQUEST}: "
                                    "ask for a smaller page")
        return images

    def page(self, page: int, per_page: int) -> list[int]:
        """The images of one page of the grid (pages from 0)."""
        if not 1 <= per_page <= MAX_IMAGES_PER_REQUEST:
            raise InvalidInputError(f"per_page={per_page}: choose 1 to {MAX_IMAGES_PER_REQUEST}")
        pages = -(-len(self.images) // per_page)
        if not 0 <= page < pages:
            raise InvalidInputError(f"page={page}: the store has {pages} page(s) of {per_page} images (0 to {pages - 1})")
        return list(self.images[page * per_page:(page + 1) * per_page])

    # ------------------------------------------------------------------ labels
    def label_config(self, classes: str, *, normalize: str | None = None, threshold: float | None = None,
                     mode: str | None = None, prompt_template: str | None = None, tokens: Sequence[str] = ()):
        """The :class:`ovstore.label.LabelConfig` of these options, the model's defaults filling
        the others (as ``ovstore label`` does); ``tokens`` are names of learned tokens."""
        from ..label import label_config

        files = []
        for name in tokens:
            if name not in self.learned:
                raise InvalidInputError(f"learned token {name!r} is not known (tokens: {', '.join(self.learned) or 'none'})")
            files.append(self.learned[name].path)
        return label_config(classes=classes if classes.strip() else (), tokens=files, defaults=analysis_defaults(self.store),
                            normalize=normalize, threshold=threshold, mode=mode, prompt_template=prompt_template,
                            space=self.plan.config.space)

    def label(self, image: int, config: Any) -> tuple[np.ndarray, np.ndarray, list[float], list[bool]]:
        """One image's label mask ``(H, W)`` uint8 as ``ovstore label`` makes it, its normalised
        class maps ``(class, H, W)``, the thresholds used and the classes allowed."""
        import torch

        from ..analyze import resize_maps
        from ..label import class_attributions, image_labels, normalize_maps

        image = self.check_image(image)
        key = (image, config.classes, config.prompt_template, config.mode, config.normalize,
               tuple(sorted((k, str(v)) for k, v in config.tokens.items())))
        with self._label_lock:
            norm = self._label_maps.get(key)
        if norm is None:
            with self._encode_lock:
                atts = class_attributions(self.store, config, self.encoder)
            raw = np.empty((1, sum(a.n_tokens for a in atts.attributions), *self.plan.size), dtype=np.float32)
            for block in iter_map_blocks(self.plan, [image], list(atts.attributions),
                                         block_budget=self.plan.config.block_budget):
                raw[0, block.tokens] = block.maps.detach().cpu().numpy()
            summed = np.stack([raw[:, list(cols)].sum(axis=1) for cols in atts.columns], axis=1)
            size = (self.store.layout.height, self.store.layout.width)
            norm = normalize_maps(resize_maps(torch.from_numpy(summed), size).numpy(), config.normalize)[0]
            with self._label_lock:
                self._label_maps[key] = norm
                while len(self._label_maps) > 64:
                    self._label_maps.popitem(last=False)
        labels, thresholds, allowed = image_labels(norm, self.image_rgb(image), self.prompt(image), config)
        return labels, norm, thresholds, allowed

    # ------------------------------------------------------------------ reproducing commands
    def maps_command(self, text: str | None, images: Sequence[int], *, learned: str | None = None,
                     png: bool = True) -> str:
        """The ``ovstore maps`` command that computes (and with ``png`` draws) these maps."""
        parts = ["ovstore", "maps", str(self.store.path)]
        if learned:
            parts += ["--token", str(self.learned[learned].path)] if learned in self.learned else []
        else:
            parts += ["--attribution", str(text)]
        parts += self._image_options(images)
        slug = "-".join(re.findall(r"[a-z0-9]+", (learned or str(text)).lower())[:6]) or "maps"
        parts += ["--out", f"maps-{slug}.npy"] + (["--png", f"overlays-{slug}"] if png else [])
        if self.device != "cpu":
            parts += ["--device", self.device]
        if self.plan.config.space != "attention":
            parts += ["--space", self.plan.config.space]
        return shlex.join(parts)

    def _image_options(self, images: Sequence[int]) -> list[str]:
        """``--image`` options choosing ``images`` (none when they are every complete image)."""
        if sorted(images) == list(self.images):
            return []
        return [a for i in images for a in ("--image", str(i))]

    def label_command(self, config: Any, images: Sequence[int]) -> str:
        """The ``ovstore label`` command that labels these images with these settings (settings
        the user did not change are left to the model's defaults, as in the view)."""
        parts = ["ovstore", "label", str(self.store.path)]
        words = [c for c in config.classes if c not in config.tokens]
        if words:  # the classes of learned tokens come from their --token files
            parts += ["--classes", ",".join(words)]
        for name, path in config.tokens.items():
            parts += ["--token", str(path)]
        for option in ("prompt_template", "mode", "normalize", "threshold"):
            if config.sources.get(option) == "user":
                parts += [f"--{option.replace('_', '-')}", str(getattr(config, option))]
        parts += self._image_options(images)
        parts += ["--out", "labels"]
        if self.device != "cpu":
            parts += ["--device", self.device]
        if self.plan.config.space != "attention":
            parts += ["--space", self.plan.config.space]
        return shlex.join(parts)


def check_text(text: str | None) -> str:
    """An attribution text as a request may send it: non-empty, bounded, printable."""
    if text is None or not str(text).strip():
        raise InvalidInputError("text is empty; give at least one word, e.g. text=a red circle")
    text = str(text).strip()
    if len(text) > MAX_TEXT_CHARS:
        raise InvalidInputError(f"text has {len(text)} characters; at most {MAX_TEXT_CHARS} (the text encoder "
                                "takes 77 tokens)")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in text):
        raise InvalidInputError("text holds control characters; send plain words")
    return text

"""The ovstore on-disk format, version 2 (reads 1): names, metadata records and codecs.

The format is documented for humans in ``docs/store-format.md``; this module is its single
source of truth in code. Everything here is plain data (no torch), so a store can be read
without the libraries that wrote it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from .. import dims
from ..errors import StoreFormatError

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "FORMAT_MINOR_VERSION",
    "SUPPORTED_VERSIONS",
    "SELF_ATTENTION_GROUP",
    "self_attention_name",
    "STATUS_RESERVED",
    "STATUS_COMPLETE",
    "LayerInfo",
    "ModelIdentity",
    "StoreLayout",
    "query_codecs",
    "query_chunk_steps",
    "checked_codecs",
    "CODEC_PRESETS",
    "DEFAULT_CODEC",
    "ImageRecord",
    "LAYOUT_CHECKSUM",
    "layout_checksum",
    "TextRecipe",
    "ContextSpec",
    "AnalysisDefaults",
    "analysis_defaults",
]

FORMAT_NAME = "ovstore"
#: Version 2 records the model family and its text recipe (``layout.model.family``,
#: ``layout.model.text``) and the context each image attended (``context`` arrays,
#: ``layout.context``). Version 1 stores are read as family ``unet`` with one text encoder's
#: last hidden state, which is what version 1 wrote.
FORMAT_VERSION = 2
SUPPORTED_VERSIONS = (1, 2)
#: Minor version (root key ``format_minor_version``, absent: 0): additions older readers of the
#: same major version may ignore. 1 adds the optional ``self_attention/<H>x<W>`` arrays
#: (``layout.self_attention``) and the real-image arrays (``layout.extra["real_images"]``); a
#: store without either is written as minor 0, as before.
FORMAT_MINOR_VERSION = 1

#: ``status`` values of an image slot. Anything but COMPLETE is incomplete.
STATUS_RESERVED = 0
STATUS_COMPLETE = 1

#: Dimension names (kept in sync with :mod:`ovstore.dims`).
IMAGE_DIM = dims.IMAGE
STEP_DIM = dims.STEP
QUERY_DIM_NAMES = dims.QUERY_DIMS

#: Names of nodes inside the root group.
LAYERS_GROUP = "layers"
QUERIES = "queries"
TO_K_WEIGHT = "to_k_weight"
TO_K_BIAS = "to_k_bias"
IMAGES = "images"
STATUS = "status"
PROMPT = "prompt"
NEGATIVE_PROMPT = "negative_prompt"
SEED = "seed"
GUIDANCE = "guidance"
NUM_INFERENCE_STEPS = "num_inference_steps"
BRANCH_LABELS = "branch_labels"
TIMESTEPS = "timesteps"
#: Per image and stored branch: the context the denoiser attended (format v2).
CONTEXT = "context"
CONTEXT_TOKEN_IDS = "context_token_ids"
#: Per image, stored branch and tokenizer: the ids each text encoder saw, when the text recipe
#: has more than one tokenizer (SDXL's pad with different tokens; ``ContextSpec.tokenizers``).
CONTEXT_TOKENIZER_IDS = "context_tokenizer_ids"
#: MM-DiT families (format v2): per layer, the image keys and values of each stored call (what
#: an attribution's own text stream attends), per image the conditioning vector of each call,
#: and, once per store, the text-side weights that recompute the text stream.
IMAGE_KEYS = "image_keys"
IMAGE_VALUES = "image_values"
#: MM-DiT, with ``capture --image-outputs``: per layer, the image rows' attention outputs of each
#: stored call (before ``to_out``), what ConceptAttention's output-space maps multiply
IMAGE_OUTPUTS = "image_outputs"
CONDITIONING = "conditioning"
WEIGHTS_GROUP = "weights"
#: Per image, stored branch and chosen latent grid ``H``x``W``: the head-, call- and
#: layer-averaged self-attention (``attn1``) matrix ``(H*W, H*W)`` (format 2.1; rows sum to 1).
SELF_ATTENTION_GROUP = "self_attention"
#: Extra per-layer arrays a layout may name (``StoreLayout.layer_arrays``), shaped as the queries.
LAYER_ARRAYS = (IMAGE_KEYS, IMAGE_VALUES, IMAGE_OUTPUTS)
#: Real-image stores (``layout.extra["real_images"]`` names the method): per image, the source
#: file's record (JSON: path, SHA-256, method and parameters; written when the slot is reserved),
#: the decoded reconstruction and its error against the source. ``images`` holds the source.
REAL_IMAGES = "real_images"
SOURCE = "source"
RECONSTRUCTIONS = "reconstructions"
RECONSTRUCTION_PSNR = "reconstruction_psnr"
RECONSTRUCTION_MAE = "reconstruction_mae"
REAL_IMAGE_ARRAYS = (SOURCE, RECONSTRUCTIONS, RECONSTRUCTION_PSNR, RECONSTRUCTION_MAE)


def is_real_image_layout(layout: Any) -> bool:
    """Whether a layout is of a real-image store (captured from source files, not prompts)."""
    return bool(layout.extra.get(REAL_IMAGES))

#: Arrays with one entry per image slot (besides the per-layer ``queries``).
PER_IMAGE_ARRAYS = (STATUS, PROMPT, NEGATIVE_PROMPT, SEED, GUIDANCE, NUM_INFERENCE_STEPS,
                    BRANCH_LABELS, TIMESTEPS, IMAGES)
#: The generation request of a slot, written when it is reserved.
RECORD_ARRAYS = (PROMPT, NEGATIVE_PROMPT, SEED, GUIDANCE, NUM_INFERENCE_STEPS)

#: Root-attribute flags of stores written by ovstore >= 0.x with full integrity support:
#: every array ends with a CRC32C checksum, and every chunk of a reserved slot's request and
#: of a complete image is written even when it equals the fill value (so a missing chunk is
#: always damage).
INTEGRITY = {"checksums": "every-array", "chunks_always_written": True}

#: Root-metadata key of the SHA-256 of the layout record (:func:`layout_checksum`): maps depend
#: on the layout (a layer's ``scale``, ``heads``, ``head_dim``, grid), so an edit of it must be
#: detected like a flipped bit of a chunk. Stores written before it have no such key and open
#: as before (``verify`` notes it).
LAYOUT_CHECKSUM = "layout_sha256"


def layout_checksum(layout_json: dict[str, Any]) -> str:
    """SHA-256 of a layout record as stored (canonical JSON: sorted keys, no spaces)."""
    text = json.dumps(layout_json, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


#: Lock file (inside the store directory) held while a process adds image slots.
LOCK_FILE = ".ovstore.lock"


@dataclass(frozen=True, slots=True)
class LayerInfo:
    """One cross-attention layer as stored.

    ``height * width`` is the number of query pixels (row-major), ``heads * head_dim`` the
    width of ``to_q``; ``scale`` multiplies ``Q·Kᵀ`` before the softmax.
    """

    name: str
    block: str  # "down", "mid" or "up"
    level: int  # number of 2x downsamplings from the latent
    height: int
    width: int
    heads: int
    head_dim: int
    scale: float
    key_input_dim: int
    has_bias: bool = False
    upcast_attention: bool = False

    @property
    def resolution(self) -> tuple[int, int]:
        return (self.height, self.width)

    def query_bytes_per_call(self, query_dtype: str) -> int:
        """Uncompressed bytes of this layer's queries for one UNet call and one branch."""
        return self.heads * self.head_dim * self.height * self.width * (4 if query_dtype == "float32" else 2)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LayerInfo:
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})


@dataclass(frozen=True, slots=True)
class TextRecipe:
    """How attribution text becomes the rows that each layer's key projection takes.

    Every tokenizer tokenizes without padding (start- and end-of-text kept) and must give the
    same ids; each encoder's ``hidden_state`` is taken (``None``: ``last_hidden_state``, i.e.
    after the final layer norm; an integer: ``hidden_states[i]``, e.g. -2 for SDXL's penultimate
    layer) and the results are joined along the channel axis (``join="channels"``), ``widths``
    giving each encoder's share. ``key`` names the per-layer projection stored for analysis
    (``to_k``: a linear layer applied to the joined rows).
    """

    tokenizers: tuple[str, ...] = ("tokenizer",)
    encoders: tuple[str, ...] = ("text_encoder",)
    encoder_classes: tuple[str, ...] = ("CLIPTextModel",)
    widths: tuple[int, ...] = (0,)
    hidden_state: int | None = None
    join: str = "channels"
    key: str = "to_k"

    @property
    def width(self) -> int:
        """Channels of a joined row (the key projections' input width). ``join="clip-t5"``
        (SD3): the first encoders joined on channels and zero-padded to the last's width, whose
        rows follow on the token axis, so a row is as wide as the wider of the two."""
        if self.join == "clip-t5":
            return int(max(sum(self.widths[:-1]), self.widths[-1]))
        return int(sum(self.widths))

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TextRecipe:
        return cls(**{f.name: tuple(data[f.name]) if isinstance(data.get(f.name), list) else data[f.name]
                      for f in dataclasses.fields(cls) if f.name in data})


@dataclass(frozen=True, slots=True)
class ContextSpec:
    """The generation context stored per image and branch (format v2): ``length`` tokens of
    ``features`` channels (the denoiser's ``encoder_hidden_states``), and their token ids.

    ``tokenizers`` names (text-recipe subfolders, join order) the tokenizers whose ids are
    stored: ``context_token_ids`` holds the first one's; with more than one, every one's is
    in ``context_tokenizer_ids`` too, since each encoder saw its own (SDXL's second tokenizer
    pads with another token). Empty in stores written before it: the first tokenizer's only.
    """

    length: int
    features: int
    dtype: str = "float16"
    tokenizers: tuple[str, ...] = ()

    @property
    def per_tokenizer(self) -> bool:
        """Whether ``context_tokenizer_ids`` is stored (more than one tokenizer)."""
        return len(self.tokenizers) > 1

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if not self.tokenizers:  # as stores written before it record it
            del data["tokenizers"]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ContextSpec:
        return cls(**{f.name: tuple(data[f.name]) if isinstance(data[f.name], list) else data[f.name]
                      for f in dataclasses.fields(cls) if f.name in data})


@dataclass(frozen=True, slots=True)
class AnalysisDefaults:
    """Analysis defaults a model directory carries (its ``ovstore_defaults.json``), recorded in
    the store at capture so that every later analysis sees the same ones.

    ``label``: :class:`ovstore.label.LabelConfig` settings that ``ovstore label`` uses for the
    options not given; ``maps``: how ``ovstore maps --png`` normalises maps for display
    (``normalize``). Both were validated when the file was read (``ovstore.model_defaults``).
    ``file`` says where the file was read (a local path, or ``HUB_ID/ovstore_defaults.json``)
    and ``sha256`` its bytes. An empty record (no ``label``, no ``maps``) means "no defaults".
    """

    label: dict[str, Any] = field(default_factory=dict, hash=False)
    maps: dict[str, Any] = field(default_factory=dict, hash=False)
    file: str | None = None
    sha256: str | None = None
    format: int = 1

    @property
    def empty(self) -> bool:
        return not self.label and not self.maps

    def to_json(self) -> dict[str, Any]:
        return {"format": self.format, "label": dict(self.label), "maps": dict(self.maps), "file": self.file,
                "sha256": self.sha256}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> AnalysisDefaults:
        return cls(label=dict(data.get("label") or {}), maps=dict(data.get("maps") or {}), file=data.get("file"),
                   sha256=data.get("sha256"), format=data.get("format", 1))


def analysis_defaults(source: Any) -> AnalysisDefaults:
    """The analysis defaults recorded with a store (a ``Store``, its ``StoreLayout`` or its
    ``ModelIdentity``); an empty record for stores captured without them (and v1 stores)."""
    layout = getattr(source, "layout", source)
    model = getattr(layout, "model", layout)
    if not isinstance(model, ModelIdentity):
        raise TypeError(f"analysis_defaults takes a Store, StoreLayout or ModelIdentity, not {type(source).__name__}")
    return model.analysis_defaults or AnalysisDefaults()


@dataclass(frozen=True, slots=True)
class ModelIdentity:
    """Enough to find the same text encoder again, years later.

    ``id`` is what the user passed (hub id, local path or a built-in name); ``path`` the
    resolved local directory at capture time; ``text_encoder_fingerprint`` a SHA-256 of the
    text-encoder weights so that analysis can tell when another encoder is used.
    """

    id: str
    source: str  # "hub", "local" or "builtin"
    pipeline_class: str
    path: str | None = None
    revision: str | None = None
    commit_hash: str | None = None
    unet_class: str = "UNet2DConditionModel"
    text_encoder_subfolders: tuple[str, ...] = ("text_encoder",)
    tokenizer_subfolders: tuple[str, ...] = ("tokenizer",)
    text_encoder_classes: tuple[str, ...] = ("CLIPTextModel",)
    torch_dtype: str = "float32"
    text_encoder_hidden_size: int = 0
    text_encoder_fingerprint: str | None = None
    #: the model family (``ovstore.families``) that captured it; v1 stores: ``unet``
    family: str = "unet"
    #: how attribution text is encoded; ``None`` (v1 stores): one encoder's last hidden state
    text: TextRecipe | None = None
    #: the model directory's ``ovstore_defaults.json`` at capture; ``None``: none (older stores too)
    analysis_defaults: AnalysisDefaults | None = None

    @property
    def text_recipe(self) -> TextRecipe:
        """The recorded text recipe, or the one format v1 implied (the first encoder's last
        hidden state, keys ``to_k``)."""
        if self.text is not None:
            return self.text
        return TextRecipe(tokenizers=tuple(self.tokenizer_subfolders[:1]) or ("tokenizer",),
                          encoders=tuple(self.text_encoder_subfolders[:1]) or ("text_encoder",),
                          encoder_classes=tuple(self.text_encoder_classes[:1]) or ("CLIPTextModel",),
                          widths=(self.text_encoder_hidden_size,), hidden_state=None)

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["text"] = None if self.text is None else self.text.to_json()
        if self.analysis_defaults is None:  # stores without defaults keep the layout record they always had
            del data["analysis_defaults"]
        else:
            data["analysis_defaults"] = self.analysis_defaults.to_json()
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelIdentity:
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name in data:
                value = data[f.name]
                if f.name == "text":
                    value = None if value is None else TextRecipe.from_json(value)
                elif f.name == "analysis_defaults":
                    value = None if value is None else AnalysisDefaults.from_json(value)
                kwargs[f.name] = tuple(value) if isinstance(value, list) else value
        return cls(**kwargs)


@dataclass(frozen=True, slots=True)
class StoreLayout:
    """What every image of a store shares: fixed when the store is created.

    Appends must match it exactly, because the arrays' shapes follow from it.
    """

    model: ModelIdentity
    layers: tuple[LayerInfo, ...]
    height: int
    width: int
    latent_height: int
    latent_width: int
    branches: tuple[str, ...]  # requested halves: ("uncond",), ("cond",) or ("uncond", "cond")
    num_unet_calls: int
    calls: tuple[int, ...]  # indices of the stored UNet calls
    query_dtype: str = "float16"
    codec: str = "blosc-zstd1-bitshuffle"
    extra: dict[str, Any] = field(default_factory=dict)
    #: the stored generation context (format v2); ``None``: not stored (v1 stores)
    context: ContextSpec | None = None
    #: per-layer arrays stored besides the queries, same shape (MM-DiT: image keys and values)
    layer_arrays: tuple[str, ...] = ()
    #: width of the per-call conditioning vector stored in ``conditioning`` (0: none)
    conditioning: int = 0
    #: latent grids ``(H, W)`` whose averaged self-attention matrix is stored per image (format 2.1)
    self_attention: tuple[tuple[int, int], ...] = ()

    def __post_init__(self) -> None:
        if self.query_dtype not in ("float16", "float32", "bfloat16"):
            raise StoreFormatError(f"unsupported query dtype {self.query_dtype!r}")
        if self.codec not in CODEC_PRESETS:
            raise StoreFormatError(
                f"unknown codec {self.codec!r}; choose one of {', '.join(CODEC_PRESETS)}"
            )
        unknown = [a for a in self.layer_arrays if a not in LAYER_ARRAYS]
        if unknown:
            raise StoreFormatError(f"unknown per-layer arrays {unknown}; this ovstore knows {', '.join(LAYER_ARRAYS)}")

    @property
    def n_steps(self) -> int:
        return len(self.calls)

    def layer(self, name: str) -> LayerInfo:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)

    def query_bytes_per_image(self) -> int:
        """Uncompressed bytes of queries (and the per-layer arrays and conditioning recorded
        with them) one image adds to the store."""
        per_call = sum(l.query_bytes_per_call(self.query_dtype) for l in self.layers) * (1 + len(self.layer_arrays))
        per_call += self.conditioning * (4 if self.query_dtype == "float32" else 2)
        return per_call * self.n_steps * len(self.branches)

    def self_attention_bytes_per_image(self) -> int:
        """Bytes of the stored self-attention matrices per image (float16, every grid and branch)."""
        return sum(2 * (h * w) ** 2 for h, w in self.self_attention) * len(self.branches)

    def context_bytes_per_image(self) -> int:
        """Bytes of the stored generation context per image (embeddings and token ids)."""
        if self.context is None:
            return 0
        c = self.context
        id_sets = 1 + (len(c.tokenizers) if c.per_tokenizer else 0)
        return len(self.branches) * c.length * (c.features * (4 if c.dtype == "float32" else 2) + 8 * id_sets)

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["model"] = self.model.to_json()
        data["layers"] = [layer.to_json() for layer in self.layers]
        data["context"] = None if self.context is None else self.context.to_json()
        if self.context is None:
            del data["context"]
        # absent unless used: layouts of other families keep the JSON (and checksum) they had
        data["layer_arrays"] = list(self.layer_arrays)
        data["self_attention"] = [list(g) for g in self.self_attention]
        for name, empty in (("layer_arrays", []), ("conditioning", 0), ("self_attention", [])):
            if data[name] == empty:
                del data[name]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StoreLayout:
        return cls(
            model=ModelIdentity.from_json(data["model"]),
            layers=tuple(LayerInfo.from_json(l) for l in data["layers"]),
            height=data["height"],
            width=data["width"],
            latent_height=data["latent_height"],
            latent_width=data["latent_width"],
            branches=tuple(data["branches"]),
            num_unet_calls=data["num_unet_calls"],
            calls=tuple(data["calls"]),
            query_dtype=data.get("query_dtype", "float16"),
            codec=data["codec"],
            extra=dict(data.get("extra", {})),
            context=ContextSpec.from_json(data["context"]) if data.get("context") else None,
            layer_arrays=tuple(data.get("layer_arrays", ())),
            conditioning=int(data.get("conditioning", 0)),
            self_attention=tuple((int(h), int(w)) for h, w in data.get("self_attention", ())),
        )

    def differences(self, other: StoreLayout) -> list[str]:
        """Human-readable list of what differs from ``other`` (empty when compatible)."""
        diffs = []
        if self.model.family != other.model.family:
            diffs.append(f"family: store has {self.model.family}, this capture has {other.model.family}")
        for name in ("height", "width", "branches", "num_unet_calls", "calls", "query_dtype", "layer_arrays",
                     "conditioning", "self_attention"):
            a, b = getattr(self, name), getattr(other, name)
            if a != b:
                diffs.append(f"{name}: store has {a}, this capture has {b}")
        for key in ("max_sequence_length", "true_cfg_scale", REAL_IMAGES):  # options every image of a store shares
            a, b = self.extra.get(key), other.extra.get(key)
            if a != b:
                diffs.append(f"{key}: store has {a}, this capture has {b}")
        if [l.name for l in self.layers] != [l.name for l in other.layers]:
            diffs.append("layers: the selected cross-attention layers differ")
        elif self.layers != other.layers:
            diffs.append("layers: shapes or scales differ")
        if self.model.text_encoder_fingerprint != other.model.text_encoder_fingerprint:
            diffs.append(
                f"model: store was captured with {self.model.id!r}, this capture uses "
                f"{other.model.id!r} (text-encoder weights differ)"
            )
        return diffs


def self_attention_name(grid: tuple[int, int]) -> str:
    """Path of the self-attention array of latent grid ``(H, W)``: ``self_attention/HxW``."""
    return f"{SELF_ATTENTION_GROUP}/{int(grid[0])}x{int(grid[1])}"


def _blosc(shuffle: str, level: int) -> Any:
    from zarr.codecs import BloscCodec

    return BloscCodec(cname="zstd", clevel=level, shuffle=shuffle)


def _zstd(level: int) -> Any:
    from zarr.codecs import ZstdCodec

    return ZstdCodec(level=level)


#: Named compressor chains for query arrays. Every chain ends with a CRC32C checksum so that
#: a corrupted chunk is detected on read instead of being returned as data.
#: The default: as small as the best measured preset (see BENCHMARKS.md) at the cheapest level.
DEFAULT_CODEC = "blosc-zstd1-bitshuffle"

CODEC_PRESETS: dict[str, Any] = {
    "none": lambda: [],
    "zstd1": lambda: [_zstd(1)],
    "zstd3": lambda: [_zstd(3)],
    "blosc-zstd1-bitshuffle": lambda: [_blosc("bitshuffle", 1)],
    "blosc-zstd3-bitshuffle": lambda: [_blosc("bitshuffle", 3)],
    "blosc-zstd3-shuffle": lambda: [_blosc("shuffle", 3)],
}


def query_codecs(preset: str) -> list[Any]:
    """Compressors for a query array: the preset's chain followed by a CRC32C checksum."""
    from zarr.codecs import Crc32cCodec

    try:
        chain = CODEC_PRESETS[preset]()
    except KeyError:
        raise StoreFormatError(
            f"unknown codec {preset!r}; choose one of {', '.join(CODEC_PRESETS)}"
        ) from None
    return [*chain, Crc32cCodec()]


#: Inner chunks of the query arrays hold as many UNet calls as fit in this many bytes (at
#: least one): at SD-1.5 size a call of a layer is 0.16-2.6 MB, so most chunks hold one call
#: and step subsets read only their bytes; on small models a call is a few KB and one chunk
#: per call would make reading an image cost one chunk decode (~0.25 ms) per call and layer.
INNER_CHUNK_BYTES = 2**20


def query_chunk_steps(info: LayerInfo, n_steps: int, query_dtype: str) -> int:
    """How many stored calls one inner chunk of ``info``'s query array holds: the largest
    divisor of ``n_steps`` (inner chunks tile the shard) whose chunk fits
    :data:`INNER_CHUNK_BYTES`, at least 1."""
    fit = min(n_steps, INNER_CHUNK_BYTES // max(info.query_bytes_per_call(query_dtype), 1))
    return max((k for k in range(1, fit + 1) if n_steps % k == 0), default=1)


def checked_codecs(level: int = 3) -> list[Any]:
    """Compressors of every array besides the queries: zstd followed by a CRC32C checksum."""
    from zarr.codecs import Crc32cCodec

    return [_zstd(level), Crc32cCodec()]


@dataclass(frozen=True, slots=True)
class ImageRecord:
    """What is needed to regenerate one image: stored before its data, so that an
    interrupted capture can be resumed from the store alone."""

    prompt: str
    negative_prompt: str = ""
    seed: int = 0
    guidance: float = 7.5
    num_inference_steps: int = 50
    #: real-image stores: the source file's record as canonical JSON (path, SHA-256, method);
    #: empty for generations
    source: str = ""

    def __post_init__(self) -> None:
        from ..errors import InvalidInputError

        for name in ("prompt", "negative_prompt", "source"):
            if "\x00" in getattr(self, name):
                raise InvalidInputError(f"the {name.replace('_', ' ')} {getattr(self, name)[:40]!r} contains a "
                                        "NUL character, which cannot be stored; remove it")

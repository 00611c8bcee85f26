"""Family ``flux``: FLUX.1 transformers (``FluxTransformer2DModel``, ``FluxPipeline``).

FLUX's double-stream blocks are MM-DiT joint blocks like SD3's (``transformer_blocks.i``, the
same context-side modules, AdaLayerNormZero, RMS q/k norms, tanh-GELU feed-forward), with
three differences this module handles:

* the joint sequence is ``[text, image]`` and the processor applies a rotary embedding
  (``FluxPosEmbed`` of ``cat(txt_ids, img_ids)``) to the joined queries and keys after
  ``norm_q``/``norm_k``. FluxPipeline's text ids are all 0, so the text rows' rotation is the
  identity (cos 1, sin 0): the attribution's text stream needs no rotation, and capture refuses
  a call whose text ids are not 0. The image queries and keys are stored *after* the rotation
  (the rotation is elementwise per position, so rotating the image rows alone with the image
  rows of the embedding gives the processor's values bit for bit);
* the text is the T5 sequence of ``max_sequence_length`` tokens; the CLIP pooled output only
  enters the conditioning ``temb`` (with the timestep and the embedded guidance), which is
  stored per call, so attribution text needs T5 alone;
* ``guidance_scale`` is an embedded guidance (no extra batch); true classifier-free guidance
  (``true_cfg_scale`` > 1 with a negative prompt) runs the prompt's and the negative prompt's
  transformer calls one after the other in every step (``call_order``).

The text stream at analysis is :class:`ovstore.families.mmdit.TextStream` (the double blocks'
context side is SD3's non-``context_pre_only`` block). Single-stream blocks are not recorded:
see docs/store-format.md (FLUX) for why and what they would need.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..errors import InvalidInputError
from ..store import IMAGE_KEYS, IMAGE_OUTPUTS, IMAGE_VALUES, LayerInfo, ModelIdentity, TextRecipe
from .mmdit import _EPS, SD3Family, TextStream, block_index

__all__ = ["FluxFamily", "FluxTextEncoder", "FluxTextStream", "double_blocks", "single_blocks"]

#: the T5 length FluxPipeline uses when none is given (also its maximum)
FLUX_DEFAULT_MAX_SEQUENCE_LENGTH = 512
_TEXT = (("tokenizer_2", "text_encoder_2"),)
_SINGLE = re.compile(r"^single_transformer_blocks\.(\d+)\.attn$")
#: a single-stream block's modules that the text stream runs through (shared with the image)
_SINGLE_MODULES = ("norm.linear", "attn.norm_q", "attn.norm_k", "proj_mlp", "proj_out")
_CONTEXT_MODULES = ("norm1_context", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.norm_added_q",
                    "attn.norm_added_k", "attn.to_add_out", "norm2_context", "ff_context")


def _check_qk_norms(attn: Any, name: str, parts: Sequence[str]) -> None:
    """Refuse a block whose q/k norms are not the RMSNorm (eps ``_EPS``, with a weight) the
    text stream recomputes."""
    for part in parts:
        module = getattr(attn, part, None)
        eps = getattr(module, "eps", None)
        if type(module).__name__ != "RMSNorm" or eps is None or abs(eps - _EPS) > 1e-12 \
                or getattr(module, "weight", None) is None:
            raise InvalidInputError(f"layer {name}: {part} is a {type(module).__name__} (eps {eps}); the flux "
                                    f"family recomputes RMSNorm q/k norms with eps {_EPS} and a weight only")


def double_blocks(transformer: Any, grid: tuple[int, int]) -> list[tuple[LayerInfo, Any]]:
    """Every double-stream block's attention of a ``FluxTransformer2DModel`` with its
    :class:`LayerInfo` (grid: the packed latent tokens).

    Raises
    ------
    InvalidInputError
        A block uses a variant whose text stream this family cannot recompute.
    """
    found = []
    for i, block in enumerate(transformer.transformer_blocks):
        attn = block.attn
        name = f"transformer_blocks.{i}.attn"
        _check_qk_norms(attn, name, ("norm_q", "norm_k", "norm_added_q", "norm_added_k"))
        ff = getattr(block, "ff_context", None)
        if ff is None or getattr(ff.net[0], "approximate", None) != "tanh" \
                or type(getattr(block, "norm1_context", None)).__name__ != "AdaLayerNormZero":
            raise InvalidInputError(f"layer {name}: not a FLUX double-stream block (AdaLayerNormZero context norm, "
                                    "tanh-GELU ff_context)")
        found.append((
            LayerInfo(name=name, block="joint", level=0, height=grid[0], width=grid[1], heads=attn.heads,
                      head_dim=int(attn.head_dim), scale=float(attn.head_dim) ** -0.5,
                      key_input_dim=int(transformer.config.joint_attention_dim),
                      has_bias=attn.add_k_proj.bias is not None),
            attn,
        ))
    if not found:
        raise InvalidInputError("the transformer has no double-stream blocks (transformer_blocks); the flux family "
                                "needs a FluxTransformer2DModel")
    return found


def single_blocks(transformer: Any, grid: tuple[int, int]) -> list[tuple[LayerInfo, Any]]:
    """Every single-stream block's attention (``single_transformer_blocks.j.attn``) with its
    :class:`LayerInfo` (``block="single"``)."""
    found = []
    for j, block in enumerate(transformer.single_transformer_blocks):
        attn = block.attn
        name = f"single_transformer_blocks.{j}.attn"
        _check_qk_norms(attn, name, ("norm_q", "norm_k"))
        if type(block.norm).__name__ != "AdaLayerNormZeroSingle" or getattr(block.act_mlp, "approximate", "") != "tanh":
            raise InvalidInputError(f"layer {name}: not a FLUX single-stream block (AdaLayerNormZeroSingle, tanh-GELU "
                                    "MLP)")
        found.append((
            LayerInfo(name=name, block="single", level=0, height=grid[0], width=grid[1], heads=attn.heads,
                      head_dim=int(attn.head_dim), scale=float(attn.head_dim) ** -0.5,
                      key_input_dim=int(attn.query_dim), has_bias=attn.to_k.bias is not None),
            attn,
        ))
    return found


def _stream_position(name: str) -> tuple[int, int]:
    """Order of a block in the text stream: double blocks first, then single blocks."""
    m = _SINGLE.match(name)
    return (1, int(m.group(1))) if m else (0, block_index(name))


class FluxFamily(SD3Family):
    """FLUX.1: double-stream blocks, rotated image q/k and v + temb per call, the SD3 text
    stream recomputed at analysis, T5 attribution text."""

    name = "flux"
    pipelines = "FLUX.1 (FluxPipeline)"
    capture_options = ("max_sequence_length", "true_cfg_scale")
    layer_arrays = (IMAGE_KEYS, IMAGE_VALUES)

    def __init__(self) -> None:
        #: the per-call state of one capture (:meth:`for_capture`); the registered family has none
        self._call: _CallState | None = None

    def for_capture(self) -> FluxFamily:
        session = copy.copy(self)
        session._call = _CallState()
        return session

    # ------------------------------------------------------------------ capture
    def supports(self, pipe: Any) -> bool:
        transformer = getattr(pipe, "transformer", None)
        return transformer is not None and type(transformer).__name__ == "FluxTransformer2DModel" \
            and all(getattr(pipe, e, None) is not None for e in ("text_encoder", "text_encoder_2"))

    def text_to_image(self, pipe: Any) -> Any:
        if type(pipe).__name__ == "FluxPipeline":
            return pipe
        from diffusers import FluxPipeline

        converted = FluxPipeline.from_pipe(pipe)
        converted.set_progress_bar_config(disable=True)
        return converted

    def _patch(self, pipe: Any) -> int:
        return 2  # FluxPipeline packs 2x2 latent pixels into one token

    def native_size(self, pipe: Any) -> tuple[int, int]:
        size = int(pipe.default_sample_size) * pipe.vae_scale_factor
        return size, size

    def attention_layers(self, pipe: Any, latent_height: int, latent_width: int) -> list[tuple[LayerInfo, Any]]:
        grid = (latent_height // 2, latent_width // 2)
        return double_blocks(pipe.transformer, grid) + single_blocks(pipe.transformer, grid)

    def default_layers(self, found: Sequence[tuple[LayerInfo, Any]], config: Any) -> list[tuple[LayerInfo, Any]]:
        # single-stream blocks are opt-in: they share every weight with the image, so storing
        # them means storing those blocks whole (docs/store-format.md, FLUX)
        if config.single_blocks or config.layers.patterns:
            return list(found)
        return [(info, module) for info, module in found if info.block != "single"]

    def stored_branches(self, config: Any) -> tuple[str, ...]:
        from ..capture import BRANCH_CHOICES

        # --guidance is embedded (no batch halves); only true CFG makes a second branch
        if config.true_cfg_scale is not None and config.true_cfg_scale > 1:
            return BRANCH_CHOICES[config.branch]
        if config.branch == "both":
            raise InvalidInputError("--branch both needs FLUX's true classifier-free guidance: add --true-cfg-scale "
                                    "S (> 1) and --negative-prompt, or store one branch")
        return ("cond",)

    def call_order(self, extra: Mapping[str, Any]) -> tuple[str, ...] | None:
        scale = extra.get("true_cfg_scale")
        return ("cond", "uncond") if scale is not None and float(scale) > 1 else None

    def denoiser_calls(self, pipe: Any, steps: int) -> int | None:
        # FluxPipeline sets sigmas linspace(1, 1/steps, steps) with a resolution-dependent shift:
        # one call per step and branch
        return int(steps)

    def call_timesteps(self, pipe: Any, recorded: Sequence[float]) -> list[float]:
        # the transformer receives t / 1000; the scheduler holds the shifted timesteps themselves
        return [float(t) for t in pipe.scheduler.timesteps]

    def check_requests(self, requests: Sequence[Any], config: Any) -> None:
        true_cfg = config.true_cfg_scale is not None and config.true_cfg_scale > 1
        for i, r in enumerate(requests):
            if true_cfg and not r.negative_prompt:
                raise InvalidInputError(
                    f"request {i} ({r.prompt[:40]!r}) has no negative prompt, so FluxPipeline would ignore "
                    f"--true-cfg-scale {config.true_cfg_scale}: give --negative-prompt (or a JSONL negative_prompt), "
                    "or drop --true-cfg-scale")
            if not true_cfg and r.negative_prompt:
                raise InvalidInputError(
                    f"request {i} ({r.prompt[:40]!r}) has a negative prompt, which FluxPipeline ignores without true "
                    "classifier-free guidance: add --true-cfg-scale S (> 1) or drop the negative prompt")

    def capture_hooks(self, denoiser: Any) -> list[Any]:
        state = self._call
        if state is None:
            raise InvalidInputError("the flux family's capture hooks keep per-call state: call them on the family of "
                                    "one capture, family.for_capture() (QueryRecorder does)")

        def on_call(module: Any, args: tuple, kwargs: dict) -> None:
            txt_ids = kwargs.get("txt_ids")
            state.text_len = int(txt_ids.shape[-2]) if txt_ids is not None else 0
            if txt_ids is not None and bool((txt_ids != 0).any()):
                raise InvalidInputError("the transformer was called with non-zero text position ids; the flux family "
                                        "assumes FluxPipeline's text ids 0 (no rotation of the text rows)")

        def on_rotary(module: Any, inputs: tuple, out: Any) -> None:
            state.rotary = out

        state.rotary = None
        return [denoiser.register_forward_pre_hook(on_call, with_kwargs=True),
                denoiser.pos_embed.register_forward_hook(on_rotary)]

    def record_points(self, layer: Any) -> dict[str, Any]:
        fused = bool(getattr(layer, "fused_projections", False)) and getattr(layer, "to_qkv", None) is not None
        # the image attention output: what enters a double block's to_out; a single block has
        # none (its attention's output, [text, image] rows, joins the MLP before proj_out)
        return {"queries": layer.norm_q, IMAGE_KEYS: layer.norm_k,
                IMAGE_VALUES: layer.to_qkv if fused else layer.to_v,
                IMAGE_OUTPUTS: layer.to_out[0] if getattr(layer, "to_out", None) is not None else layer}

    def hooked_value(self, kind: str, point: Any, inputs: tuple, output: Any) -> Any:
        if kind == IMAGE_OUTPUTS and not hasattr(point, "heads"):  # a double block's to_out: its input
            return inputs[0]
        return output

    def output_rows(self, kind: str, output: Any, point: Any = None) -> Any:
        rotary = self._call.rotary if self._call is not None else None
        if rotary is not None and output.shape[1] == rotary[0].shape[0]:
            output = output[:, self._call.text_len:]  # a single block's joint [text, image] sequence: the image rows
        if output.dim() == 4:  # (batch, pixel, head, channel) after norm_q / norm_k: rotate the image rows
            from diffusers.models.embeddings import apply_rotary_emb

            if rotary is None:
                raise InvalidInputError("no rotary embedding was seen for this transformer call; is the transformer a "
                                        "FluxTransformer2DModel?")
            n = output.shape[1]
            cos, sin = (t[-n:] for t in rotary)  # the image rows follow the text rows
            output = apply_rotary_emb(output, (cos, sin), sequence_dim=1)
            b, n, h, d = output.shape
            return output.reshape(b, n, h * d)
        if kind == IMAGE_VALUES and _is_fused_qkv(point):
            return output[..., 2 * output.shape[-1] // 3:]  # to_qkv: [q, k, v]
        return output

    def conditioning_width(self, pipe: Any) -> int:
        return int(pipe.transformer.inner_dim)

    def context_token_ids(self, pipe: Any, texts: Sequence[str], *,
                          max_sequence_length: int = FLUX_DEFAULT_MAX_SEQUENCE_LENGTH,
                          **_: Any) -> list[list[int]]:
        if max_sequence_length > FLUX_DEFAULT_MAX_SEQUENCE_LENGTH:
            raise InvalidInputError(f"--max-sequence-length {max_sequence_length}: FluxPipeline takes at most "
                                    f"{FLUX_DEFAULT_MAX_SEQUENCE_LENGTH} T5 tokens")
        ids = pipe.tokenizer_2(list(texts), padding="max_length", max_length=max_sequence_length, truncation=True,
                               add_special_tokens=True)["input_ids"]
        return [list(map(int, a)) for a in ids]

    def pipeline_arguments(self, prompts: Sequence[str], negative_prompts: Sequence[str]) -> dict[str, Any]:
        negatives = None if not any(negative_prompts) else list(negative_prompts)
        return {"prompt": list(prompts), "negative_prompt": negatives}

    # ------------------------------------------------------------------ store
    def text_components(self, pipe: Any) -> list[tuple[Any, Any]]:
        return [(getattr(pipe, t), getattr(pipe, e)) for t, e in _TEXT]

    def text_recipe(self, pipe: Any) -> TextRecipe:
        encoder = pipe.text_encoder_2
        return TextRecipe(tokenizers=("tokenizer_2",), encoders=("text_encoder_2",),
                          encoder_classes=(type(encoder).__name__,), widths=(int(encoder.config.d_model),),
                          hidden_state=None, join="channels", key="flux-text-stream")

    def key_parameters(self, layers: Sequence[tuple[LayerInfo, Any]]) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
        out = {}
        for info, attn in layers:
            if info.block == "single":
                out[info.name] = _linears(attn, "to_qkv", ("to_q", "to_k", "to_v"))["attn.to_k"]
            else:
                out[info.name] = _context_linears(attn)["attn.add_k_proj"]
        return out

    def stored_weights(self, pipe: Any, layers: Sequence[tuple[LayerInfo, Any]]) -> dict[str, np.ndarray]:
        """``context_embedder`` and, per recorded double block, its context-side weights,
        float32, named by their (unfused) parameter paths in the transformer; a fused
        ``to_added_qkv`` is split into ``add_q/k/v_proj``."""
        transformer = pipe.transformer
        parts = ["context_embedder"]
        for info, _ in layers:
            if info.block == "single":  # the whole block: text and image share its weights
                parts += [f"{info.name[:-len('.attn')]}.{m}" for m in _SINGLE_MODULES]
            else:
                parts += [f"transformer_blocks.{block_index(info.name)}.{m}" for m in _CONTEXT_MODULES
                          if m not in ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")]
        out = {}
        for name, param in transformer.named_parameters():
            if any(name.startswith(p + ".") for p in parts):
                out[name] = param.detach().float().cpu().numpy()
        for info, attn in layers:
            prefix = info.name[:-len(".attn")]
            linears = _linears(attn, "to_qkv", ("to_q", "to_k", "to_v")) if info.block == "single" \
                else _context_linears(attn)
            for m, (w, b) in linears.items():
                out[f"{prefix}.{m}.weight"] = w
                if b is not None:
                    out[f"{prefix}.{m}.bias"] = b
        return out

    def analysis_state(self, store: Any, layers: Sequence[LayerInfo], device: Any) -> FluxTextStream:
        return FluxTextStream(store.weights(), store.layout.layers, device=device)

    # ------------------------------------------------------------------ analysis
    def load_text_encoder(self, identity: ModelIdentity, target: str, *, device: str = "cpu") -> Any:
        components = self.load_text_components(identity, target, hint="pass the FLUX pipeline directory as --model")
        return FluxTextEncoder(components, device=device, name=str(target))


class _CallState:
    """What one capture's hooks know of the transformer call in progress: its rotary embedding
    ``(cos, sin)`` over ``[text, image]`` rows and the number of text rows."""

    __slots__ = ("rotary", "text_len")

    def __init__(self) -> None:
        self.rotary: tuple[Any, Any] | None = None
        self.text_len = 0


def _is_fused_qkv(point: Any) -> bool:
    """Whether a recorded linear is a fused ``to_qkv`` (FLUX's attention width is the block
    width, so ``to_v`` maps width -> width and ``to_qkv`` width -> 3 x width)."""
    return point is not None and getattr(point, "out_features", 0) == 3 * getattr(point, "in_features", -1)


def _linears(attn: Any, fused_name: str, names: Sequence[str]) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    """Weights and biases (float32) of the q/k/v linears ``names`` of an attention, named
    ``attn.<name>``, read from the fused linear ``fused_name`` when the projections are fused
    (the weights that actually run)."""
    def arr(t: Any) -> np.ndarray | None:
        return None if t is None else t.detach().float().cpu().numpy()

    fused = getattr(attn, fused_name, None)
    if getattr(attn, "fused_projections", False) and fused is not None:
        ws = np.split(arr(fused.weight), 3, axis=0)
        bs = np.split(arr(fused.bias), 3, axis=0) if fused.bias is not None else [None] * 3
        return {f"attn.{n}": (w, b) for n, w, b in zip(names, ws, bs)}
    return {f"attn.{n}": (arr(getattr(attn, n).weight), arr(getattr(attn, n).bias)) for n in names}


def _context_linears(attn: Any) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    """``add_q/k/v_proj`` of a double block's attention (split from ``to_added_qkv`` when fused)."""
    return _linears(attn, "to_added_qkv", ("add_q_proj", "add_k_proj", "add_v_proj"))


class FluxTextStream(TextStream):
    """FLUX's text stream: SD3's joint-block step through the double blocks, then, where the
    store holds single-stream blocks, through those: the text rows take the block's shared
    modulation, q/k/v projections and MLP, attend the stored image keys/values and each other
    (one-way, unrotated: text ids are 0), and are updated by ``proj_out``."""

    def __init__(self, weights: Mapping[str, np.ndarray], layers: Sequence[LayerInfo], *, device: Any = "cpu") -> None:
        super().__init__(weights, sorted(layers, key=lambda l: _stream_position(l.name)), device=device)

    def block_step(self, x: Any, info: LayerInfo, silu: Any, image_kv: Mapping[str, tuple[Any, Any]], *,
                   last: bool, outputs: dict | None = None) -> tuple[Any, Any]:
        import torch
        import torch.nn.functional as F

        if info.block != "single":
            return super().block_step(x, info, silu, image_kv, last=last, outputs=outputs)
        p = info.name[:-len(".attn")]
        shift, scale, gate = self._linear(silu, f"{p}.norm.linear").chunk(3, dim=-1)  # AdaLayerNormZeroSingle
        n = F.layer_norm(x, (x.shape[-1],), eps=_EPS) * (1 + scale) + shift
        k = self._rms(self._heads(self._linear(n, f"{p}.attn.to_k"), info), f"{p}.attn.norm_k")
        if last and outputs is None:
            return k, None
        q = self._rms(self._heads(self._linear(n, f"{p}.attn.to_q"), info), f"{p}.attn.norm_q")
        v = self._heads(self._linear(n, f"{p}.attn.to_v"), info)
        image_k, image_v = (t.to(self.device) for t in image_kv[info.name])
        attn = self._attend(q, k, v, image_k, image_v, info.scale).transpose(-3, -2).reshape(*x.shape[:-1], -1)
        if outputs is not None:
            outputs[info.name] = attn
        if last:
            return k, None
        mlp = F.gelu(self._linear(n, f"{p}.proj_mlp"), approximate="tanh")
        return k, x + gate * self._linear(torch.cat([attn, mlp], dim=-1), f"{p}.proj_out")


class FluxTextEncoder:
    """FLUX's attribution text encoding: the prompt tokenized by T5 without padding (its end
    token kept), rows: T5's last hidden state, as FluxPipeline encodes its prompt (which pads
    to ``max_sequence_length``). The CLIP pooled output is not needed: it enters only the
    conditioning, which the store holds per call. The rows are not causal (T5 is bidirectional)."""

    family = "flux"
    causal = False

    def __init__(self, components: Sequence[tuple[Any, Any]], *, device: str = "cpu", name: str = "") -> None:
        from ..devices import check_device

        self.components = [(t, m.to(check_device(device)).eval()) for t, m in components]
        self.tokenizer, self.model = self.components[0]
        self.device = device
        self.name = name
        self.hidden_state = None
        self._fingerprint: str | None = None

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.d_model)

    @property
    def max_length(self) -> int:
        return FLUX_DEFAULT_MAX_SEQUENCE_LENGTH

    def fingerprint(self) -> str:
        from ..models import text_encoders_fingerprint

        if self._fingerprint is None:
            self._fingerprint = text_encoders_fingerprint([self.model])
        return self._fingerprint

    def tokenize_all(self, prompts: Sequence[str]) -> list[tuple[list[int], list[str]]]:
        """T5 ids of each prompt (end token included) and their token strings."""
        for prompt in prompts:
            if not isinstance(prompt, str) or not prompt.strip():
                raise InvalidInputError("an attribution prompt is empty; give at least one word")
        ids = self.tokenizer(list(prompts), padding=False, truncation=False)["input_ids"]
        out = []
        for prompt, a in zip(prompts, ids):
            if len(a) > self.max_length:
                raise InvalidInputError(f"attribution prompt {prompt[:40]!r}... has {len(a)} T5 tokens; at most "
                                        f"{self.max_length} fit. Shorten or split it.")
            out.append((list(map(int, a)), list(self.tokenizer.convert_ids_to_tokens(list(a)))))
        return out

    def tokenize(self, prompt: str) -> tuple[list[int], list[str]]:
        return self.tokenize_all([prompt])[0]

    def encode(self, prompts: Sequence[str], *, batch_size: int = 256) -> list[Any]:
        import torch

        from ..analyze import Attribution

        out = []
        with torch.inference_mode():
            for prompt, (ids, tokens) in zip(prompts, self.tokenize_all(prompts)):
                t = torch.tensor([ids], dtype=torch.long, device=self.device)
                rows = self.model(t).last_hidden_state.float()[0].cpu()
                out.append(Attribution(label=prompt, tokens=tuple(tokens), embedding=rows, token_ids=tuple(ids)))
        return out

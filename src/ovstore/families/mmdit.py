"""Family ``sd3``: MM-DiT joint-attention transformers (``SD3Transformer2DModel``: Stable
Diffusion 3 and 3.5).

In an MM-DiT block image and text tokens attend jointly, and the text tokens are themselves
updated block by block (they attend the image, and are modulated by the timestep). So the keys
of a new word at block L depend on everything before L: "store the queries, recompute the keys
from the text" does not hold as for UNets. This family stores, per joint block and stored call,
the image queries, keys and values after the processor's normalisations (``norm_q``/``norm_k``)
and the conditioning vector ``temb``, and once per store the text-side weights of every block.
At analysis an attribution's tokens form their own text stream (ConceptAttention's one-way
stream): at every block they take the block's context-side weights, attend the stored image keys
and values and their own keys and values, and are never seen by the image. The map at a block is
the image queries against the attribution's keys, softmax over the attribution's tokens.

With the image's own generation context as the attribution the recomputed stream is the model's
text stream, so the maps are the model's own image→text attention (renormalised over the text).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..errors import InvalidInputError, StoreError
from ..store import IMAGE_KEYS, IMAGE_OUTPUTS, IMAGE_VALUES, LayerInfo, ModelIdentity, TextRecipe
from .base import ModelFamily

__all__ = ["SD3Family", "TextStream", "joint_blocks"]

_BLOCK = re.compile(r"^transformer_blocks\.(\d+)\.attn$")
#: layer-norm epsilon of JointTransformerBlock's context norms and of its q/k RMS norms
_EPS = 1e-6
#: the T5 length SD3's pipeline uses when none is given
SD3_DEFAULT_MAX_SEQUENCE_LENGTH = 256
_TEXT = (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"), ("tokenizer_3", "text_encoder_3"))


def block_index(name: str) -> int:
    """Index of a joint block from its layer name ``transformer_blocks.i.attn``."""
    m = _BLOCK.match(name)
    if m is None:
        raise InvalidInputError(f"layer {name} is not a joint block (transformer_blocks.i.attn)")
    return int(m.group(1))


def joint_blocks(transformer: Any, grid: tuple[int, int]) -> list[tuple[LayerInfo, Any]]:
    """Every joint block's attention of an ``SD3Transformer2DModel`` with its :class:`LayerInfo`.

    Raises
    ------
    InvalidInputError
        A block uses a variant whose text stream this family cannot recompute.
    """
    found = []
    for i, block in enumerate(transformer.transformer_blocks):
        attn = block.attn
        name = f"transformer_blocks.{i}.attn"
        for part, module in (("norm_added_q", attn.norm_added_q), ("norm_added_k", attn.norm_added_k),
                             ("norm_q", attn.norm_q), ("norm_k", attn.norm_k)):
            if module is not None and (type(module).__name__ != "RMSNorm" or abs(module.eps - _EPS) > 1e-12
                                       or getattr(module, "weight", None) is None):
                raise InvalidInputError(f"layer {name}: {part} is a {type(module).__name__} (eps "
                                        f"{getattr(module, 'eps', '?')}); the sd3 family recomputes RMSNorm q/k norms "
                                        f"with eps {_EPS} and a weight only")
        ff = getattr(block, "ff_context", None)
        if ff is not None and getattr(ff.net[0], "approximate", None) != "tanh":
            raise InvalidInputError(f"layer {name}: ff_context is not the tanh-GELU feed-forward of SD3")
        inner = attn.to_q.out_features
        found.append((
            LayerInfo(name=name, block="joint", level=0, height=grid[0], width=grid[1], heads=attn.heads,
                      head_dim=inner // attn.heads, scale=float(attn.scale),
                      key_input_dim=int(transformer.context_embedder.in_features),
                      has_bias=attn.add_k_proj.bias is not None),
            attn,
        ))
    if not found:
        raise InvalidInputError("the transformer has no joint blocks (transformer_blocks); the sd3 family needs an "
                                "SD3Transformer2DModel")
    return found


class SD3Family(ModelFamily):
    """SD3 / SD3.5: joint blocks, image q/k/v + temb per call, a recomputed text stream."""

    name = "sd3"
    pipelines = "Stable Diffusion 3 and 3.5 (StableDiffusion3Pipeline)"
    capture_options = ("max_sequence_length",)
    image_dependent_keys = True
    layer_arrays = (IMAGE_KEYS, IMAGE_VALUES)
    #: the first blocks and calls: a block's text stream needs every block before it (BENCHMARKS.md)
    presets = ("full", "half-calls", "first-two-thirds", "first-half", "first-half-half-calls")

    # ------------------------------------------------------------------ capture

    def supports(self, pipe: Any) -> bool:
        transformer = getattr(pipe, "transformer", None)
        return transformer is not None and type(transformer).__name__ == "SD3Transformer2DModel" \
            and all(getattr(pipe, e, None) is not None for _, e in _TEXT)

    def text_to_image(self, pipe: Any) -> Any:
        if type(pipe).__name__ == "StableDiffusion3Pipeline":
            return pipe
        from diffusers import AutoPipelineForText2Image

        # the same transformer, text encoders and VAE, driven from text
        converted = AutoPipelineForText2Image.from_pipe(pipe)
        converted.set_progress_bar_config(disable=True)
        return converted

    def denoiser(self, pipe: Any) -> Any:
        return pipe.transformer

    def _patch(self, pipe: Any) -> int:
        return int(pipe.transformer.config.patch_size)

    def latent_size(self, pipe: Any, height: int, width: int) -> tuple[int, int]:
        factor = pipe.vae_scale_factor * self._patch(pipe)
        if height % factor or width % factor:
            raise InvalidInputError(f"--height/--width must be multiples of {factor} (the VAE factor "
                                    f"{pipe.vae_scale_factor} times the patch size {self._patch(pipe)})")
        return height // pipe.vae_scale_factor, width // pipe.vae_scale_factor

    def native_size(self, pipe: Any) -> tuple[int, int]:
        size = int(pipe.transformer.config.sample_size) * pipe.vae_scale_factor
        return size, size

    def attention_layers(self, pipe: Any, latent_height: int, latent_width: int) -> list[tuple[LayerInfo, Any]]:
        p = self._patch(pipe)
        return joint_blocks(pipe.transformer, (latent_height // p, latent_width // p))

    def check_layers(self, found: Sequence[LayerInfo], chosen: Sequence[LayerInfo]) -> None:
        # block L's text stream needs the image keys/values of every block before it
        if [l.name for l in chosen] != [l.name for l in found[:len(chosen)]]:
            raise InvalidInputError(
                f"the {self.name} family records joint blocks from the first on (block L's text stream attends the image "
                f"keys and values of every block before it); choose the first N blocks, e.g. --layer "
                f"'transformer_blocks.[0-{max(len(chosen) - 1, 0)}].attn', not "
                + ", ".join(l.name for l in chosen[:4]))

    def query_module(self, layer: Any) -> Any:
        return layer.norm_q if layer.norm_q is not None else layer.to_q

    def recorded_arrays(self, config: Any) -> tuple[str, ...]:
        # the image attention outputs only on request: one more array the size of the keys
        return tuple(self.layer_arrays) + ((IMAGE_OUTPUTS,) if getattr(config, "image_outputs", False) else ())

    def record_points(self, layer: Any) -> dict[str, Any]:
        return {"queries": self.query_module(layer),
                IMAGE_KEYS: layer.norm_k if layer.norm_k is not None else layer.to_k,
                IMAGE_VALUES: layer.to_v,
                IMAGE_OUTPUTS: layer.to_out[0]}  # its input: the image rows' attention output

    def hooked_value(self, kind: str, point: Any, inputs: tuple, output: Any) -> Any:
        return inputs[0] if kind == IMAGE_OUTPUTS else output

    def output_rows(self, kind: str, output: Any, point: Any = None) -> Any:
        if output.dim() == 4:  # (batch, head, pixel, channel) after norm_q / norm_k
            b, h, n, d = output.shape
            return output.transpose(1, 2).reshape(b, n, h * d)
        return output

    def conditioning_module(self, denoiser: Any) -> Any:
        return denoiser.time_text_embed  # temb: every joint block is modulated by it

    def conditioning_width(self, pipe: Any) -> int:
        return int(pipe.transformer.config.num_attention_heads * pipe.transformer.config.attention_head_dim)

    def context_width(self, pipe: Any) -> int:
        return int(pipe.transformer.config.joint_attention_dim)

    def context(self, args: tuple, kwargs: Mapping[str, Any]) -> Any:
        return kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)

    def context_token_ids(self, pipe: Any, texts: Sequence[str], *,
                          max_sequence_length: int = SD3_DEFAULT_MAX_SEQUENCE_LENGTH) -> list[list[int]]:
        clip = pipe.tokenizer(list(texts), padding="max_length", max_length=pipe.tokenizer_max_length,
                              truncation=True)["input_ids"]
        t5 = pipe.tokenizer_3(list(texts), padding="max_length", max_length=max_sequence_length, truncation=True,
                              add_special_tokens=True)["input_ids"]
        return [list(map(int, a)) + list(map(int, b)) for a, b in zip(clip, t5)]

    def pipeline_arguments(self, prompts: Sequence[str], negative_prompts: Sequence[str]) -> dict[str, Any]:
        negatives = None if not any(negative_prompts) else list(negative_prompts)
        return {"prompt": list(prompts), "negative_prompt": negatives}

    # ------------------------------------------------------------------ store
    def text_components(self, pipe: Any) -> list[tuple[Any, Any]]:
        return [(getattr(pipe, t), getattr(pipe, e)) for t, e in _TEXT]

    def text_recipe(self, pipe: Any) -> TextRecipe:
        encoders = [getattr(pipe, e) for _, e in _TEXT]
        widths = tuple(int(getattr(m.config, "hidden_size", None) or m.config.d_model) for m in encoders)
        return TextRecipe(tokenizers=tuple(t for t, _ in _TEXT), encoders=tuple(e for _, e in _TEXT),
                          encoder_classes=tuple(type(m).__name__ for m in encoders), widths=widths,
                          hidden_state=-2, join="clip-t5", key="sd3-text-stream")

    def key_parameters(self, layers: Sequence[tuple[LayerInfo, Any]]) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
        out = {}
        for info, attn in layers:
            b = attn.add_k_proj.bias
            out[info.name] = (attn.add_k_proj.weight.detach().float().cpu().numpy(),
                              None if b is None else b.detach().float().cpu().numpy())
        return out

    def stored_weights(self, pipe: Any, layers: Sequence[tuple[LayerInfo, Any]]) -> dict[str, np.ndarray]:
        """``context_embedder`` and, per recorded block, its text-side weights, float32, named
        by their parameter paths in the transformer."""
        transformer = pipe.transformer
        parts = ["context_embedder"]
        for info, _ in layers:
            i = block_index(info.name)
            parts += [f"transformer_blocks.{i}.{m}" for m in
                      ("norm1_context", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.norm_added_q",
                       "attn.norm_added_k", "attn.to_add_out", "norm2_context", "ff_context")]
        out = {}
        for name, param in transformer.named_parameters():
            if any(name.startswith(p + ".") for p in parts):
                out[name] = param.detach().float().cpu().numpy()
        return out

    # ------------------------------------------------------------------ analysis
    def load_text_encoder(self, identity: ModelIdentity, target: str, *, device: str = "cpu") -> Any:
        components = self.load_text_components(identity, target, hint="pass the SD3 pipeline directory as --model")
        return SD3TextEncoder(components, device=device, name=str(target), width=identity.text_recipe.width)

    def layer_keys(self, rows: Any, parameters: tuple[Any, Any], info: LayerInfo) -> Any:
        raise InvalidInputError(f"{self.name} keys depend on the image (the text stream attends it); they are "
                                "computed per image by image_layer_keys")

    def analysis_state(self, store: Any, layers: Sequence[LayerInfo], device: Any) -> TextStream:
        return TextStream(store.weights(), store.layout.layers, device=device)

    def image_key_inputs(self, state: TextStream, store: Any, image: int, branch: int, steps: Sequence[int],
                         layers: Sequence[LayerInfo]) -> tuple[Any, dict[str, tuple[Any, Any]]]:
        """The image's conditioning ``(step, width)`` and, per block up to the last of
        ``layers``, its stored image keys and values ``(step, head, pixel, channel)``, float32
        on the state's device."""
        import torch

        position = {l.name: k for k, l in enumerate(state.layers)}  # the text stream runs in stored block order
        last = max(position[l.name] for l in layers)
        needed = state.layers[:last + 1]
        temb = torch.from_numpy(np.asarray(store.conditioning(image, branch, steps), dtype=np.float32))
        image_kv = {}
        for info in needed:
            k = store.layer_array(info.name, IMAGE_KEYS, image, branch=branch, steps=steps)
            v = store.layer_array(info.name, IMAGE_VALUES, image, branch=branch, steps=steps)
            image_kv[info.name] = tuple(torch.from_numpy(np.asarray(a, dtype=np.float32)).flatten(2, 3)
                                        .to(state.device) for a in (k, v))  # (step, head, pixel, channel)
        return temb.to(state.device), image_kv

    def image_layer_keys(self, state: TextStream, store: Any, image: int, branch: int, steps: Sequence[int],
                         layers: Sequence[LayerInfo], rows: Any, groups: Sequence[tuple[int, int, int]],
                         inputs: tuple[Any, dict[str, tuple[Any, Any]]] | None = None,
                         space: str = "attention") -> dict[str, Any]:
        """Scaled keys per block (``space="attention"``), or, for ConceptAttention's
        output-space maps (``space="output"``), the attribution's attention outputs (before
        ``to_add_out``) as one head of the block's full width ``(step, 1, token, width)``,
        unscaled: they meet the stored image attention outputs in one dot product."""
        import torch

        position = {l.name: k for k, l in enumerate(state.layers)}  # the text stream runs in stored block order
        last = max(position[l.name] for l in layers)
        temb, image_kv = inputs if inputs is not None else self.image_key_inputs(state, store, image, branch,
                                                                                 steps, layers)
        wanted = {l.name for l in layers}
        output_space = space == "output"
        out = {name: torch.empty((len(steps), 1, rows.shape[0], info.heads * info.head_dim) if output_space
                                 else (len(steps), info.heads, rows.shape[0], info.head_dim), dtype=torch.float32,
                                 device=state.device) for name, info in ((l.name, l) for l in layers)}
        for s in range(len(steps)):
            kv = {name: (k[s], v[s]) for name, (k, v) in image_kv.items()}
            for n_tokens, start, stop in groups:
                x = rows[start:stop].view(-1, n_tokens, rows.shape[-1])
                outputs: dict[str, Any] | None = {} if output_space else None
                keys_per_block = state.keys(x, temb[s], kv, until=last, outputs=outputs)
                for name in wanted:
                    info = state.info[name]
                    if outputs is not None:  # (prompt, token, width) -> (1, prompt*token, width)
                        out[name][s, 0, start:stop] = outputs[name].reshape(-1, info.heads * info.head_dim)
                    else:  # (prompt, head, token, channel) -> (head, prompt*token, channel)
                        out[name][s, :, start:stop] = keys_per_block[name].transpose(0, 1) \
                            .reshape(info.heads, -1, info.head_dim) * info.scale
        return out


class TextStream:
    """SD3's text stream recomputed from stored weights, one-way: text rows attend the stored
    image keys/values and each other; the image never sees them.

    ``weights`` are the store's ``weights/`` arrays (transformer parameter paths), ``layers``
    the store's layer records (block order).
    """

    def __init__(self, weights: Mapping[str, np.ndarray], layers: Sequence[LayerInfo], *, device: Any = "cpu") -> None:
        import torch

        self.device = torch.device(device)
        self.w = {k: torch.from_numpy(np.asarray(v, dtype=np.float32)).to(self.device) for k, v in weights.items()}
        self.layers = list(layers)
        self.info = {l.name: l for l in layers}
        if "context_embedder.weight" not in self.w:
            raise StoreError("the store's text-stream weights lack context_embedder; run `ovstore verify`")

    def _linear(self, x: Any, prefix: str) -> Any:
        import torch.nn.functional as F

        return F.linear(x, self.w[prefix + ".weight"], self.w.get(prefix + ".bias"))

    def _rms(self, x: Any, prefix: str) -> Any:
        import torch

        weight = self.w.get(prefix + ".weight")
        if weight is None:
            return x  # no q/k norm in this block (SD3.0)
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + _EPS) * weight

    def _heads(self, x: Any, info: LayerInfo) -> Any:
        return x.view(*x.shape[:-1], info.heads, info.head_dim).transpose(-3, -2)  # (prompt, head, token, ch)

    def embed(self, rows: Any) -> Any:
        """The stream's input: ``context_embedder`` of the encoded rows ``(prompt, token, width)``."""
        return self._linear(rows.float().to(self.device), "context_embedder")

    def keys(self, rows: Any, temb: Any, image_kv: Mapping[str, tuple[Any, Any]], *, until: int,
             hidden: list | None = None, outputs: dict | None = None) -> dict[str, Any]:
        """Unscaled keys ``(prompt, head, token, channel)`` per block up to the ``until``-th
        stored block (its position in ``layers``, the block index for SD3's first N blocks), for
        rows ``(prompt, token, width)`` (each prompt its own stream) at one call with
        conditioning ``temb`` ``(width,)`` and that call's image keys/values per block
        ``(head, pixel, channel)``. ``hidden`` collects the stream entering each block;
        ``outputs`` (a dict) the stream's attention output at each block ``(prompt, token,
        width)``, before ``to_add_out`` (output-space maps)."""
        import torch
        import torch.nn.functional as F

        x = self.embed(rows)
        silu = F.silu(temb.float().to(self.device))
        out = {}
        for position, info in enumerate(self.layers[:until + 1]):
            if hidden is not None:
                hidden.append(x)
            k, x = self.block_step(x, info, silu, image_kv, last=position == until, outputs=outputs)
            out[info.name] = k
            if x is None:  # the block updates no text stream after it (context_pre_only), or it is the last asked
                break
        return out

    def _attend(self, q: Any, k: Any, v: Any, image_k: Any, image_v: Any, scale_qk: float) -> Any:
        """One-way joint attention of the text queries over ``[image keys, own keys]``; the
        result ``(prompt, head, token, channel)`` (the image rows are not updated)."""
        import torch

        s_img = torch.matmul(q, image_k.transpose(-1, -2)) * scale_qk  # (prompt, head, token, pixel)
        s_own = torch.matmul(q, k.transpose(-1, -2)) * scale_qk  # (prompt, head, token, token)
        top = torch.maximum(s_img.amax(-1, keepdim=True), s_own.amax(-1, keepdim=True))
        e_img, e_own = (s_img - top).exp(), (s_own - top).exp()
        return (torch.matmul(e_img, image_v) + torch.matmul(e_own, v)) / (e_img.sum(-1, keepdim=True)
                                                                          + e_own.sum(-1, keepdim=True))

    def block_step(self, x: Any, info: LayerInfo, silu: Any, image_kv: Mapping[str, tuple[Any, Any]], *,
                   last: bool, outputs: dict | None = None) -> tuple[Any, Any]:
        """One joint block for the text stream ``x``: its unscaled keys and the stream after the
        block (``None`` when ``last`` or the block is ``context_pre_only``); ``outputs``, if
        given, receives the stream's attention output ``(prompt, token, width)`` under the
        block's name (computed at the last block too)."""
        import torch.nn.functional as F

        i = block_index(info.name)
        p = f"transformer_blocks.{i}"
        emb = self._linear(silu, f"{p}.norm1_context.linear")
        pre_only = f"{p}.attn.to_add_out.weight" not in self.w
        normed = F.layer_norm(x, (x.shape[-1],), eps=_EPS)
        if pre_only:  # AdaLayerNormContinuous: (scale, shift)
            scale, shift = emb.chunk(2, dim=-1)
            n = normed * (1 + scale) + shift
        else:  # AdaLayerNormZero
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = emb.chunk(6, dim=-1)
            n = normed * (1 + scale_msa) + shift_msa
        k = self._rms(self._heads(self._linear(n, f"{p}.attn.add_k_proj"), info), f"{p}.attn.norm_added_k")
        if (pre_only or last) and outputs is None:
            return k, None
        q = self._rms(self._heads(self._linear(n, f"{p}.attn.add_q_proj"), info), f"{p}.attn.norm_added_q")
        v = self._heads(self._linear(n, f"{p}.attn.add_v_proj"), info)
        image_k, image_v = (t.to(self.device) for t in image_kv[info.name])
        attn = self._attend(q, k, v, image_k, image_v, info.scale)
        attn = attn.transpose(-3, -2).reshape(*x.shape[:-1], -1)
        if outputs is not None:
            outputs[info.name] = attn
        if pre_only or last:
            return k, None
        x = x + gate_msa * self._linear(attn, f"{p}.attn.to_add_out")
        n2 = F.layer_norm(x, (x.shape[-1],), eps=_EPS) * (1 + scale_mlp) + shift_mlp
        ff = self._linear(F.gelu(self._linear(n2, f"{p}.ff_context.net.0.proj"), approximate="tanh"),
                          f"{p}.ff_context.net.2")
        return k, x + gate_mlp * ff


class _ContextTokens:
    """The CLIP tokenizer, naming the ids of a stored SD3 context: its first
    ``model_max_length`` positions with CLIP's vocabulary, the rest with T5's."""

    def __init__(self, clip: Any, t5: Any) -> None:
        self._clip, self._t5 = clip, t5

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        n = int(self._clip.model_max_length)
        return list(self._clip.convert_ids_to_tokens(list(ids[:n]))) + list(self._t5.convert_ids_to_tokens(list(ids[n:])))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._clip, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._clip(*args, **kwargs)


class SD3TextEncoder:
    """SD3's attribution text encoding: the prompt tokenized without padding by the CLIP
    tokenizers (start and end kept; both must agree) and by T5 (its end token kept); rows:
    both CLIPs' ``hidden_states[-2]`` joined on channels, zero-padded to T5's width, followed
    on the token axis by T5's last hidden state, as the pipeline joins its prompt encoding.
    The rows are those ``context_embedder`` takes; they are not causal (T5 is bidirectional,
    and the text stream mixes every token)."""

    family = "sd3"

    def __init__(self, components: Sequence[tuple[Any, Any]], *, device: str = "cpu", name: str = "",
                 width: int = 0) -> None:
        from ..devices import check_device

        self.components = [(t, m.to(check_device(device)).eval()) for t, m in components]
        self.model = self.components[0][1]
        #: names tokens of a stored context (CLIP positions, then T5 positions)
        self.tokenizer = _ContextTokens(self.components[0][0], self.components[2][0])
        self.device = device
        self.name = name
        self.hidden_state = -2
        self._width = width or max(sum(int(m.config.hidden_size) for _, m in self.components[:2]),
                                   int(self.components[2][1].config.d_model))
        self._fingerprint: str | None = None

    @property
    def hidden_size(self) -> int:
        return self._width

    causal = False

    @property
    def max_length(self) -> int:
        return int(self.components[0][0].model_max_length)

    def fingerprint(self) -> str:
        from ..models import text_encoders_fingerprint

        if self._fingerprint is None:
            self._fingerprint = text_encoders_fingerprint([m for _, m in self.components])
        return self._fingerprint

    def tokenize_all(self, prompts: Sequence[str]) -> list[tuple[list[int], list[str]]]:
        """CLIP ids followed by T5 ids of each prompt, and their token strings."""
        for prompt in prompts:
            if not isinstance(prompt, str) or not prompt.strip():
                raise InvalidInputError("an attribution prompt is empty; give at least one word")
        (tok1, _), (tok2, _), (tok3, _) = self.components
        clip = tok1(list(prompts), padding=False, truncation=False)["input_ids"]
        clip2 = tok2(list(prompts), padding=False, truncation=False)["input_ids"]
        t5 = tok3(list(prompts), padding=False, truncation=False)["input_ids"]
        out = []
        for prompt, a, b, c in zip(prompts, clip, clip2, t5):
            if list(a) != list(b):
                raise InvalidInputError(f"attribution prompt {prompt[:40]!r} is tokenized differently by SD3's two CLIP "
                                        "tokenizers; its rows cannot be joined: rephrase it")
            if len(a) > self.max_length:
                raise InvalidInputError(f"attribution prompt {prompt[:40]!r}... has {len(a)} CLIP tokens; at most "
                                        f"{self.max_length} fit (start and end included). Shorten or split it.")
            ids = list(a) + list(c)
            out.append((ids, tok1.convert_ids_to_tokens(list(a)) + tok3.convert_ids_to_tokens(list(c)),
                        len(a)))
        return [(ids, toks) for ids, toks, _ in out]

    def tokenize(self, prompt: str) -> tuple[list[int], list[str]]:
        return self.tokenize_all([prompt])[0]

    def encode(self, prompts: Sequence[str], *, batch_size: int = 256) -> list[Any]:
        import torch

        from ..analyze import Attribution

        (tok1, te1), (_, te2), (tok3, te3) = self.components
        out = []
        with torch.inference_mode():
            for prompt, (ids, tokens) in zip(prompts, self.tokenize_all(prompts)):
                clip_ids = tok1([prompt], padding=False, truncation=False, return_tensors="pt")["input_ids"]
                t5_ids = tok3([prompt], padding=False, truncation=False, return_tensors="pt")["input_ids"]
                clip_ids, t5_ids = clip_ids.to(self.device), t5_ids.to(self.device)
                a = te1(clip_ids, output_hidden_states=True).hidden_states[-2]
                b = te2(clip_ids, output_hidden_states=True).hidden_states[-2]
                clip = torch.cat([a, b], dim=-1).float()
                t5 = te3(t5_ids).last_hidden_state.float()
                clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
                rows = torch.cat([clip, t5], dim=1)[0].cpu()
                out.append(Attribution(label=prompt, tokens=tuple(tokens), embedding=rows, token_ids=tuple(ids)))
        return out

"""The model-family interface: everything ovstore needs to know about one kind of denoiser.

Capture, the store, analysis, token optimization and labelling never look at a pipeline's
modules themselves; they ask the pipeline's :class:`ModelFamily`:

* **capture** — :meth:`ModelFamily.supports` (is this pipeline ours?), :meth:`denoiser` (the
  module whose calls are counted and whose ``encoder_hidden_states`` is the context),
  :meth:`attention_layers` (which modules to hook, described as :class:`LayerInfo`: block,
  level, grid, heads, head dim, scale, key input width), :meth:`query_module` (where the
  queries are read with a forward hook), :meth:`context` (the attended context of a call),
  :meth:`pipeline_arguments` (how prompts are passed so the pipeline behaves as without ovstore);
* **the store** — :meth:`key_parameters` (what analysis needs to recompute keys for any text
  without the denoiser, e.g. each layer's ``to_k``) and :meth:`text_recipe` (which tokenizers
  and encoders, which hidden state, how joined), recorded in ``layout.model``;
* **analysis** — :meth:`load_text_encoder` (the attribution text encoder the recipe
  describes) and :meth:`layer_keys` (keys of one layer for encoded rows).

An MM-DiT family (SD3, FLUX) fits the same seam: its layers are the joint attention blocks,
its queries the image rows of each block's (normalised, rotated) queries, and its key
parameters what recomputing the text stream at analysis needs (see docs/store-format.md,
"Families"). The MM-DiT additions below all have defaults that keep the ``unet`` family as it
was: :meth:`record_points` / :meth:`output_rows` (record image keys and values besides the
queries), :meth:`conditioning_module` (a per-call conditioning vector), :meth:`stored_weights`
(text-side weights copied into the store once), ``capture_options`` (pipeline options such as
``max_sequence_length``) and, for analysis, ``image_dependent_keys`` with
:meth:`analysis_state` / :meth:`image_layer_keys` (keys that depend on the image and call,
because the attribution's text stream attends the stored image keys and values) and
:meth:`image_key_inputs` (what those keys read of one image, read once where many embeddings
meet the same image: token optimization differentiates through :meth:`image_layer_keys`).
For FLUX also: :meth:`capture_hooks` (per-call state such as the rotary embedding, held by
the copy :meth:`for_capture` makes for each capture),
:meth:`default_layers` (opt-in layers), :meth:`stored_branches` / :meth:`call_order` (branches
run as separate denoiser calls, true CFG), :meth:`denoiser_calls` / :meth:`call_timesteps`
(schedules a copy of the scheduler cannot tell) and :meth:`check_requests` (options the
pipeline would ignore).
A family is registered by name (:mod:`ovstore.families`), by third parties
through the ``ovstore.families`` entry-point group.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ..store import LayerInfo, ModelIdentity, TextRecipe

if TYPE_CHECKING:
    import torch

    from ..analyze import TextEncoder

__all__ = ["ModelFamily"]


class ModelFamily(ABC):
    """One family of text-to-image denoisers (subclass and register to add one).

    Attributes
    ----------
    name
        Registry key, recorded in every store (``layout.model.family``).
    pipelines
        Human-readable list of the pipelines covered (used in error messages and docs).
    """

    name: str = ""
    pipelines: str = ""
    #: capture options (``CaptureConfig`` field names) this family passes to its pipeline and
    #: to :meth:`context_token_ids` as keyword arguments; others are refused for it
    capture_options: tuple[str, ...] = ()
    #: keys depend on the image and stored call (MM-DiT): analysis asks
    #: :meth:`image_layer_keys` per image instead of :meth:`layer_keys` once
    image_dependent_keys: bool = False
    #: per-layer arrays recorded besides the queries (``StoreLayout.layer_arrays``)
    layer_arrays: tuple[str, ...] = ()
    #: storage presets (``ovstore.capture.PRESETS`` names) that mean something for this family;
    #: others are refused (default: the UNet presets)
    presets: tuple[str, ...] = ("full", "no-finest", "half-calls", "no-finest-half-calls", "thin", "thin-half-calls")

    # ------------------------------------------------------------------ capture
    @abstractmethod
    def supports(self, pipe: Any) -> bool:
        """Whether ``pipe`` (a loaded diffusers pipeline) belongs to this family."""

    def text_to_image(self, pipe: Any) -> Any:
        """The text-to-image pipeline capture drives for ``pipe`` (e.g. the one sharing the
        components of an img2img pipeline); default ``pipe`` itself."""
        return pipe

    def image_to_image(self, pipe: Any) -> Any:
        """The img2img pipeline sharing ``pipe``'s components (real images, ``--strength``);
        default: refused, the family captures generations only."""
        from ..errors import InvalidInputError

        raise InvalidInputError(f"the {self.name} family captures generations only; real images (--images-file) "
                                "need a Stable Diffusion 1.x/2.x or SDXL pipeline")

    def inversion_pipelines(self, pipe: Any) -> tuple[Any, Any]:
        """``(inverting, regenerating)`` text-to-image pipelines sharing ``pipe``'s components,
        with a DDIM inverse scheduler and a DDIM scheduler (real images, ``--invert``);
        default: refused."""
        return self.image_to_image(pipe), None

    def encode_images(self, pipe: Any, pixels: np.ndarray) -> torch.Tensor:
        """Latents of uint8 images ``(image, y, x, rgb)`` as the denoiser takes them (the
        mean of the VAE's posterior, scaled); default: refused."""
        self.image_to_image(pipe)
        raise NotImplementedError  # pragma: no cover

    @abstractmethod
    def denoiser(self, pipe: Any) -> Any:
        """The module called once per denoising step and branch batch (UNet, transformer)."""

    @abstractmethod
    def latent_size(self, pipe: Any, height: int, width: int) -> tuple[int, int]:
        """Latent grid of an image of ``height`` × ``width`` pixels."""

    @abstractmethod
    def native_size(self, pipe: Any) -> tuple[int, int]:
        """The pipeline's default image size in pixels."""

    @abstractmethod
    def attention_layers(self, pipe: Any, latent_height: int, latent_width: int) -> list[tuple[LayerInfo, Any]]:
        """Every text-attending layer to record, with its :class:`LayerInfo`, in module order."""

    def self_attention_layers(self, pipe: Any, latent_height: int, latent_width: int) -> list[tuple[str, int, int, Any]]:
        """Every image self-attention module as ``(name, height, width, module)`` (its query
        grid), for ``--self-attention``: the module's ``to_q`` and ``to_k`` outputs give the
        matrix ``softmax(Q·Kᵀ·scale)`` per head. Default: the family offers none (one line)."""
        from ..errors import InvalidInputError

        raise InvalidInputError(
            f"--self-attention records UNet self-attention (attn1) matrices; the {self.name} family "
            f"({self.pipelines}) has none of its own (its image rows attend text and image jointly): drop it")

    def default_layers(self, found: Sequence[tuple[LayerInfo, Any]], config: Any) -> list[tuple[LayerInfo, Any]]:
        """The layers a capture with ``config`` chooses from (before presets and ``--layer``):
        default every one; ``--single-blocks`` (FLUX only) is refused."""
        if getattr(config, "single_blocks", False):
            from ..errors import InvalidInputError

            raise InvalidInputError(f"--single-blocks applies to FLUX pipelines (their single-stream blocks); the "
                                    f"{self.name} family has none: drop it")
        return list(found)

    def check_preset(self, preset: str) -> None:
        """Refuse a storage preset that does not apply to this family (it would keep what it
        does not say, e.g. ``no-finest`` on a transformer whose blocks share one grid)."""
        if preset not in self.presets:
            from ..errors import InvalidInputError

            raise InvalidInputError(f"--preset {preset} does not apply to the {self.name} family ({self.pipelines}); "
                                    f"choose one of {', '.join(self.presets)}")

    def stack_leaders(self, layers: Sequence[LayerInfo]) -> list[str]:
        """Names of the layers the ``thin`` presets keep: the first of each stack of layers
        that attend at the same place (default: every layer)."""
        return [info.name for info in layers]

    @abstractmethod
    def query_module(self, layer: Any) -> Any:
        """The submodule of ``layer`` whose forward output is the queries to store
        (``(batch, pixels, heads * head_dim)``)."""

    def record_points(self, layer: Any) -> dict[str, Any]:
        """What to record of ``layer``: array kind (``queries`` and the ``layer_arrays``) ->
        the submodule whose forward output it is (passed through :meth:`output_rows`)."""
        return {"queries": self.query_module(layer)}

    def recorded_arrays(self, config: Any) -> tuple[str, ...]:
        """The per-layer arrays a capture with ``config`` records besides the queries (the
        layout's ``layer_arrays``); default the family's ``layer_arrays``, and
        ``--image-outputs`` (MM-DiT output-space maps) is refused."""
        if getattr(config, "image_outputs", False):
            from ..errors import InvalidInputError

            raise InvalidInputError(f"--image-outputs applies to MM-DiT pipelines (SD3, FLUX: output-space maps); "
                                    f"the {self.name} family has no image attention outputs to record: drop it")
        return tuple(self.layer_arrays)

    def hooked_value(self, kind: str, point: Any, inputs: tuple, output: Any) -> Any:
        """What a forward hook on the record point of ``kind`` records: default its output
        (a family may record a module's input, e.g. what enters an output projection)."""
        return output

    def output_rows(self, kind: str, output: Any, point: Any = None) -> torch.Tensor:
        """A recorded module output as ``(batch, pixels, heads * head_dim)`` (default: as is);
        ``point`` is the submodule that produced it (from :meth:`record_points`)."""
        return output

    def for_capture(self) -> ModelFamily:
        """The family as one capture uses it (its recorder asks once): a copy that holds the
        capture's own per-call state (FLUX: the current call's rotary embedding), so captures
        in one process never share it; default the family itself (it keeps no state)."""
        return self

    def capture_hooks(self, denoiser: Any) -> list[Any]:
        """Extra hooks on the denoiser for the duration of a capture (handles with
        ``remove()``), e.g. to read per-call state that :meth:`output_rows` needs; default none."""
        return []

    def stored_branches(self, config: Any) -> tuple[str, ...]:
        """The branches a capture with ``config`` (a ``CaptureConfig``) stores (default: its
        classifier-free-guidance halves, ``config.branches``)."""
        return config.branches

    def call_order(self, extra: Mapping[str, Any]) -> tuple[str, ...] | None:
        """Branches run as separate denoiser calls within a step, in call order, for a store
        with capture settings ``extra`` (FLUX's true CFG); default ``None``: one call per step
        whose batch holds the branches."""
        return None

    def denoiser_calls(self, pipe: Any, steps: int) -> int | None:
        """Denoiser calls per branch of a generation with ``steps`` steps, where the scheduler
        alone cannot tell (``None``: ask a copy of the scheduler)."""
        return None

    def call_timesteps(self, pipe: Any, recorded: Sequence[float]) -> list[float]:
        """The scheduler timestep of each call, from the values the denoiser received
        (``recorded``) or the pipeline's scheduler after the generation; default as received."""
        return list(recorded)

    def check_requests(self, requests: Sequence[Any], config: Any) -> None:
        """Refuse requests whose options the pipeline would ignore (default: none refused)."""

    def conditioning_module(self, denoiser: Any) -> Any | None:
        """A submodule of the denoiser whose forward output ``(batch, width)`` is recorded at
        every stored call (MM-DiT: the timestep/pooled-text embedding); default none."""
        return None

    def conditioning_width(self, pipe: Any) -> int:
        """Width of that vector (0: none recorded)."""
        return 0

    def context_width(self, pipe: Any) -> int:
        """Features of the stored generation context (default: the joined text rows' width)."""
        return self.text_recipe(pipe).width

    def check_layers(self, found: Sequence[LayerInfo], chosen: Sequence[LayerInfo]) -> None:
        """Refuse a layer selection the family cannot analyse (default: any is fine)."""

    @abstractmethod
    def context(self, args: tuple, kwargs: Mapping[str, Any]) -> torch.Tensor | None:
        """The context a denoiser call attends to (``(batch, tokens, features)``), from the
        arguments of the call (a forward pre-hook)."""

    @abstractmethod
    def context_token_ids(self, pipe: Any, texts: Sequence[str], **options: Any) -> list[list[int]]:
        """Token ids of ``texts`` exactly as the pipeline encodes prompts (padding included);
        ``options``: the family's capture options (e.g. ``max_sequence_length``)."""

    def context_tokenizer_ids(self, pipe: Any, texts: Sequence[str], **options: Any) -> list[list[list[int]]]:
        """Token ids of ``texts`` as each tokenizer of the text recipe encodes prompts
        (``[tokenizer][text][token]``, recipe join order; padding included): what each text
        encoder saw. Default: the first tokenizer's (:meth:`context_token_ids`) only."""
        return [self.context_token_ids(pipe, texts, **options)]

    @abstractmethod
    def pipeline_arguments(self, prompts: Sequence[str], negative_prompts: Sequence[str]) -> dict[str, Any]:
        """Keyword arguments that pass prompts to the pipeline as a user would."""

    # ------------------------------------------------------------------ store
    @abstractmethod
    def text_recipe(self, pipe: Any) -> TextRecipe:
        """How attribution text is encoded for this pipeline (recorded in the store)."""

    @abstractmethod
    def text_components(self, pipe: Any) -> list[tuple[Any, Any]]:
        """``(tokenizer, text encoder)`` pairs of the recipe, in join order."""

    @abstractmethod
    def key_parameters(self, layers: Sequence[tuple[LayerInfo, Any]]) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
        """Per layer, the arrays analysis needs to compute keys without the denoiser."""

    def stored_weights(self, pipe: Any, layers: Sequence[tuple[LayerInfo, Any]]) -> dict[str, np.ndarray]:
        """Weights copied into the store once (``weights/<name>``), besides the per-layer key
        projections; default none."""
        return {}

    # ------------------------------------------------------------------ analysis
    def analysis_state(self, store: Any, layers: Sequence[LayerInfo], device: Any) -> Any:
        """What :meth:`image_layer_keys` needs for every image (e.g. stored weights on the
        device), built once per analysis."""
        return None

    def image_key_inputs(self, state: Any, store: Any, image: int, branch: int, steps: Sequence[int],
                         layers: Sequence[LayerInfo]) -> Any | None:
        """What :meth:`image_layer_keys` reads of one image (e.g. its stored image keys, values
        and conditioning), so that a caller evaluating many embeddings against the same image
        (token optimization, every epoch) reads and decodes it once and passes it back as
        ``inputs``; default ``None`` (nothing to cache)."""
        return None

    def image_layer_keys(self, state: Any, store: Any, image: int, branch: int, steps: Sequence[int],
                         layers: Sequence[LayerInfo], rows: torch.Tensor, groups: Sequence[tuple[int, int, int]],
                         inputs: Any | None = None) -> dict[str, torch.Tensor]:
        """Scaled keys ``(step, head, token, channel)`` per layer for encoded rows
        ``(token, width)`` of one image (``image_dependent_keys`` families). ``groups`` are
        ``(n_tokens, start, stop)`` slices of ``rows`` holding whole attributions of
        ``n_tokens`` tokens each (an attribution's tokens attend each other); ``inputs``, if
        given, is :meth:`image_key_inputs` of the same image. Differentiable in ``rows`` when
        grad is enabled (token optimization learns rows through it)."""
        raise NotImplementedError(f"family {self.name} computes keys without the image")

    @abstractmethod
    def load_text_encoder(self, identity: ModelIdentity, target: str, *, device: str = "cpu") -> TextEncoder:
        """The attribution text encoder of ``identity``'s recipe, loaded from ``target`` (a
        pipeline directory or hub id)."""

    def load_text_components(self, identity: ModelIdentity, target: str, *, hint: str) -> list[tuple[Any, Any]]:
        """``(tokenizer, encoder)`` of every encoder in ``identity``'s text recipe, loaded from
        ``target`` with ``from_pretrained`` (a local pipeline directory, or a hub id at the
        recorded revision); ``hint`` ends the error for a directory missing an encoder folder."""
        from pathlib import Path

        import transformers

        from ..errors import ModelLoadError
        from ..models import hub_error

        recipe = identity.text_recipe
        local = Path(target).expanduser()
        components = []
        for tok_folder, enc_folder, class_name in zip(recipe.tokenizers, recipe.encoders, recipe.encoder_classes):
            encoder_class = getattr(transformers, class_name, None)
            if encoder_class is None:
                raise ModelLoadError(f"transformers has no class {class_name!r}; upgrade transformers")
            if local.exists() and not (local / enc_folder).is_dir():
                raise ModelLoadError(
                    f"{local} has no {enc_folder}/ folder, which the store's text recipe needs "
                    f"({', '.join(recipe.encoders)}); {hint}")
            kwargs = {} if local.exists() else {"revision": identity.revision}
            try:
                tokenizer = transformers.AutoTokenizer.from_pretrained(str(target), subfolder=tok_folder, **kwargs)
                encoder = encoder_class.from_pretrained(str(target), subfolder=enc_folder, **kwargs)
            except Exception as exc:
                raise hub_error(str(target), exc, what="text encoder") from exc
            components.append((tokenizer, encoder))
        return components

    @abstractmethod
    def layer_keys(self, rows: torch.Tensor, parameters: tuple[torch.Tensor, torch.Tensor | None],
                   info: LayerInfo) -> torch.Tensor:
        """Scaled keys ``(head, token, channel)`` of one layer for encoded rows ``(token, width)``."""

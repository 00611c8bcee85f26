"""Recording queries during generation with forward hooks on each layer's query module.

The model family names the module (the ``unet`` family: ``attn2.to_q``). A forward hook on
the ``to_q`` linear sees exactly ``Q = to_q(hidden_states)`` under any attention processor
and changes nothing in the computation, so generations with and without recording are
identical. A pre-hook on the denoiser counts calls, reads each call's timestep and, at the
first call, the context it attends (``encoder_hidden_states``). Queries are copied off the device asynchronously into pinned host memory,
so the denoising loop is not stalled.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import InvalidInputError
from ..store import LayerInfo

__all__ = ["QueryRecorder", "BatchQueries"]

_DTYPES = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class BatchQueries:
    """Queries of one pipeline call: per layer, a list over stored calls of tensors shaped
    ``(image, branch, head, y, x, channel)``, plus every UNet call's timestep."""

    queries: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    timesteps: list[float] = field(default_factory=list)
    n_calls: int = 0
    #: the attended context ``(image, branch, token, feature)`` and its ids ``(image, branch, tokenizer, token)``
    context: torch.Tensor | None = None
    context_ids: Any = None
    #: other per-layer arrays (the family's ``layer_arrays``): kind -> layer -> calls, as queries
    arrays: dict[str, dict[str, list[torch.Tensor]]] = field(default_factory=dict)
    #: per stored call, the conditioning vector ``(image, branch, width)``
    conditioning: list[torch.Tensor] = field(default_factory=list)
    #: averaged self-attention matrices by latent grid ``(image, branch, H*W, H*W)`` (``--self-attention``)
    self_attention: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)

    def image_arrays(self, index: int) -> dict[str, dict[str, torch.Tensor]]:
        """The other per-layer arrays of one image, each ``(branch, step, head, y, x, channel)``."""
        return {kind: {name: torch.stack([t[index] for t in calls], dim=1) for name, calls in layers.items()}
                for kind, layers in self.arrays.items()}

    def image_conditioning(self, index: int) -> torch.Tensor | None:
        """The conditioning vectors of one image ``(branch, step, width)``, if recorded."""
        if not self.conditioning:
            return None
        return torch.stack([t[index] for t in self.conditioning], dim=1)

    def image_context(self, index: int) -> tuple[Any, Any]:
        """The context of one image: ``(branch, token, feature)`` and ``(branch, tokenizer, token)`` ids."""
        if self.context is None:
            raise InvalidInputError("the denoiser was called without encoder_hidden_states; no context to store")
        return self.context[index].numpy(), self.context_ids[index]

    def image_queries(self, index: int) -> dict[str, torch.Tensor]:
        """Queries of one image of the batch: ``(branch, step, head, y, x, channel)``."""
        return {name: torch.stack([t[index] for t in calls], dim=1) for name, calls in self.queries.items()}


class QueryRecorder:
    """Hooks that record ``to_q`` outputs of selected layers and UNet calls.

    Use as a context manager around the pipeline call; hooks are always removed on exit.

    Parameters
    ----------
    unet
        The pipeline's denoiser (``UNet2DConditionModel``).
    layers
        ``(LayerInfo, attention_module)`` pairs to record.
    calls
        Indices of the UNet calls to keep (the others are not copied).
    branches
        Which half of the classifier-free-guidance batch to keep: ``("uncond",)``,
        ``("cond",)`` or ``("uncond", "cond")``. Without guidance the single half is kept.
    dtype
        Storage dtype of the queries.
    family
        The model family (which submodule gives the queries, where the context is); default
        the ``unet`` family.
    context_dtype
        Storage dtype of the attended context; ``None`` records none.
    call_order
        Branches the pipeline runs as separate denoiser calls, in call order within a step
        (FLUX's true CFG: ``("cond", "uncond")``); ``None``: one call per step whose batch holds
        the branches (``[uncond..., cond...]`` under classifier-free guidance).
    arrays
        The per-layer arrays to record besides the queries (the layout's ``layer_arrays``);
        ``None``: the family's ``layer_arrays``.
    """

    def __init__(self, unet: Any, layers: Sequence[tuple[LayerInfo, Any]], *, calls: Sequence[int],
                 branches: Sequence[str], dtype: str = "float16", family: Any = None,
                 context_dtype: str | None = None, call_order: Sequence[str] | None = None,
                 arrays: Sequence[str] | None = None) -> None:
        if family is None:
            from ..families import get_family

            family = get_family("unet")
        self.family = family.for_capture()  # this capture's own per-call state (FLUX: the rotary embedding)
        self.context_dtype = _DTYPES[context_dtype] if context_dtype else None
        self.arrays = tuple(arrays) if arrays is not None else tuple(getattr(family, "layer_arrays", ()))
        self.unet = unet
        self.layers = list(layers)
        self.calls = set(int(c) for c in calls)
        self.branches = tuple(branches)
        self.dtype = _DTYPES[dtype]
        self.batch_size = 0
        self.result = BatchQueries()
        self._handles: list[Any] = []
        self.branch_labels = self.branches
        self._call = -1
        self.call_order = tuple(call_order) if call_order else None
        if self.call_order is not None and not set(self.branches) <= set(self.call_order):
            raise InvalidInputError(f"branches {','.join(self.branches)} are not among the pipeline's calls "
                                    f"({','.join(self.call_order)})")
        self._raw_call = -1
        self._branch = "cond"
        self._pending: dict[Any, dict[str, torch.Tensor]] = {}

    # ------------------------------------------------------------------ lifecycle
    def start_batch(self, batch_size: int, context_ids: Any = None) -> None:
        """Reset state for a pipeline call generating ``batch_size`` images (``context_ids``:
        the token ids of their contexts, stored with the context)."""
        self.batch_size = batch_size
        self.result = BatchQueries(queries={info.name: [] for info, _ in self.layers}, context_ids=context_ids,
                                   arrays={kind: {info.name: [] for info, _ in self.layers}
                                           for kind in self.arrays})
        self.branch_labels: tuple[str, ...] = self.branches
        self._call = -1
        self._raw_call = -1
        self._pending = {}

    def __enter__(self) -> QueryRecorder:
        names = set()
        for info, module in self.layers:
            if info.name in names:
                raise InvalidInputError(f"layer {info.name} is registered twice")
            names.add(info.name)
            for kind, point in self.family.record_points(module).items():
                if kind != "queries" and kind not in self.arrays:
                    continue
                self._handles.append(point.register_forward_hook(self._make_hook(info, kind)))
        conditioning = self.family.conditioning_module(self.unet)
        if conditioning is not None:
            self._handles.append(conditioning.register_forward_hook(self._on_conditioning))
        self._handles.append(self.unet.register_forward_pre_hook(self._on_unet_call, with_kwargs=True))
        self._handles.extend(self.family.capture_hooks(self.unet))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    # ------------------------------------------------------------------ hooks
    def _on_unet_call(self, module: Any, args: tuple, kwargs: dict) -> None:
        if self.call_order is not None:  # one branch per call: step = raw call // branches per step
            self._raw_call += 1
            self._branch = self.call_order[self._raw_call % len(self.call_order)]
            if self._raw_call % len(self.call_order):
                if self._call == 0 and self.context_dtype is not None and self._branch in self.branches:
                    self._record_context(args, kwargs)
                return
        self._call += 1
        timestep = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        if isinstance(timestep, torch.Tensor):
            timestep = timestep.flatten()[0].item()
        self.result.timesteps.append(float(timestep) if timestep is not None else float("nan"))
        self.result.n_calls = self._call + 1
        if self._call == 0 and self.context_dtype is not None and self._keeps_branch():
            self._record_context(args, kwargs)

    def _record_context(self, args: tuple, kwargs: dict) -> None:
        context = self.family.context(args, kwargs)
        if isinstance(context, torch.Tensor):
            selected, _ = self._select(context.detach())
            selected = self._joined("context", selected)
            if selected is not None:
                self.result.context = selected.to("cpu", self.context_dtype)

    def _keeps_branch(self) -> bool:
        """Whether the current call's branch is stored (always, when calls hold every branch)."""
        return self.call_order is None or self._branch in self.branches

    def _joined(self, key: Any, t: torch.Tensor) -> torch.Tensor | None:
        """``t`` ``(image, 1, ...)`` of the current call's branch, joined with the other stored
        branches of the same step (separate calls) in ``branches`` order once all are there."""
        if self.call_order is None or len(self.branches) == 1:
            return t
        parts = self._pending.setdefault(key, {})
        parts[self._branch] = t
        if len(parts) < len(self.branches):
            return None
        del self._pending[key]
        return torch.cat([parts[b] for b in self.branches], dim=1)

    def _select(self, out: torch.Tensor) -> tuple[torch.Tensor, tuple[str, ...]]:
        n = self.batch_size
        if self.call_order is not None:
            if out.shape[0] != n:
                raise InvalidInputError(f"the denoiser was called with batch {out.shape[0]} for {n} images; ovstore "
                                        "expects one image per prompt (num_images_per_prompt=1)")
            return out[:, None], self.branches
        if out.shape[0] == 2 * n:  # classifier-free guidance: [uncond..., cond...]
            halves = {"uncond": out[:n], "cond": out[n:]}
            return torch.stack([halves[b] for b in self.branches], dim=1), self.branches
        if out.shape[0] == n:
            if len(self.branches) > 1:
                raise InvalidInputError(
                    "--branch both needs classifier-free guidance (guidance > 1): with guidance "
                    "<= 1 there is a single half; use --branch cond or uncond"
                )
            return out[:, None], ("cond",)
        raise InvalidInputError(
            f"the UNet was called with batch {out.shape[0]} for {n} images; ovstore expects "
            "one image per prompt (num_images_per_prompt=1)"
        )

    def _on_conditioning(self, module: Any, inputs: tuple, out: torch.Tensor) -> None:
        if self._call not in self.calls or not self._keeps_branch():
            return
        c, _ = self._select(out.detach())
        c = self._joined("conditioning", c)
        if c is not None:
            self.result.conditioning.append(self._to_host(c))

    def _to_host(self, t: torch.Tensor) -> torch.Tensor:
        on_cuda = t.device.type == "cuda"
        host = torch.empty(t.shape, dtype=self.dtype, device="cpu", pin_memory=on_cuda)
        host.copy_(t, non_blocking=on_cuda)
        return host

    def _make_hook(self, info: LayerInfo, kind: str = "queries") -> Any:
        def hook(module: Any, inputs: tuple, out: torch.Tensor) -> None:
            if self._call not in self.calls or not self._keeps_branch():
                return
            value = self.family.hooked_value(kind, module, inputs, out)  # MM-DiT attention outputs: to_out's input
            q, labels = self._select(self.family.output_rows(kind, value.detach(), module))
            q = self._joined((kind, info.name), q)
            if q is None:  # the step's other stored branch comes with a later call
                return
            self.branch_labels = labels
            b, nb, seq, _ = q.shape
            if seq != info.height * info.width:
                raise InvalidInputError(
                    f"layer {info.name} produced {seq} query pixels, expected "
                    f"{info.height}x{info.width}; is the UNet a standard UNet2DConditionModel?"
                )
            q = q.reshape(b, nb, info.height, info.width, info.heads, info.head_dim)
            q = q.permute(0, 1, 4, 2, 3, 5)  # (image, branch, head, y, x, channel)
            target = self.result.queries if kind == "queries" else self.result.arrays[kind]
            target[info.name].append(self._to_host(q))

        return hook

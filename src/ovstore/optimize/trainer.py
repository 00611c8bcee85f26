"""Token optimization from stored queries: no UNet, no re-generation.

All classes of a run train together: their [SoT, class] rows are separate two-token
attributions of one batched forward, so the stored queries are read once and every epoch
is one pass over the cached (on-device) queries per layer, with no loop over steps. On
families whose keys depend on the image (MM-DiT) the rows are text-stream inputs and each
image's keys are recomputed every epoch, differentiably, from what the family read of that
image once (its stored image keys/values and conditioning).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..analyze import MapPlan, TextEncoder, TokenBuckets, load_text_encoder, word_in_context
from ..devices import check_device
from ..errors import InvalidInputError
from ..inputs import check_memory
from ..store import Store, open_store
from .config import OptimizeConfig
from .masks import load_mask
from .tasks import TokenTask
from .tokens import TokenFile

__all__ = ["optimize_tokens", "initial_rows", "mask_iou"]


def initial_rows(encoder: TextEncoder, word: str, context: str) -> torch.Tensor:
    """[SoT row, row of ``word``'s token] of the encoded context sentence, ``(2, hidden)``.

    A word split into several sub-tokens is represented by its last one (the one that
    sees the whole word through the causal text encoder).
    """
    att, positions = word_in_context(encoder, word, context)
    return att.embedding[[0, positions[-1]]].clone()


def mask_iou(maps: torch.Tensor, masks: torch.Tensor, threshold: float = 0.5) -> float:
    """IoU of min-max-normalised class maps thresholded at ``threshold`` (I and U summed
    over images). ``maps``: (image, H, W); ``masks``: boolean (image, H, W)."""
    flat = maps.flatten(1)
    low, high = flat.amin(1)[:, None, None], flat.amax(1)[:, None, None]
    pred = (maps - low) / (high - low).clamp_min(1e-12) > threshold
    inter = (pred & masks).sum().item()
    union = (pred | masks).sum().item()
    return inter / union if union else 0.0


class _Forward:
    """Cached queries of the training images and the forward pass to image-size maps.

    Families whose keys depend on the image (MM-DiT: the rows are the input of a text stream
    that attends the stored image keys and values) get their keys per image, through the
    same :meth:`MapPlan.ordered_keys` as the analysis, from what :meth:`MapPlan.key_inputs`
    read once; so the map a learned token gives at analysis is the map optimised here."""

    def __init__(self, plan: MapPlan, images: Sequence[int], size: tuple[int, int]) -> None:
        self.plan = plan
        self.images = list(images)
        self.size = size
        if plan.keys_per_image:  # the image keys/values of every block and call are held too
            layout = plan.store.layout
            per_call = sum(l.query_bytes_per_call("float32") for l in plan.layers) + len(layout.layer_arrays) * sum(
                l.query_bytes_per_call("float32") for l in layout.layers)
            check_memory(len(self.images) * len(plan.steps) * per_call,
                         f"the stored queries, image keys and values of {len(self.images)} training image(s) held "
                         "for the optimization", "choose fewer stored calls (--calls) or fewer training images")
        self.queries = [plan.read(i) for i in self.images]  # laid out once, on the device
        self.key_inputs = [plan.key_inputs(i) for i in self.images] if plan.keys_per_image else None

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        """``rows``: (classes, 2, hidden) → maps (image, classes, 2, H, W)."""
        n_classes = rows.shape[0]
        buckets = TokenBuckets.from_offsets(list(range(0, 2 * n_classes + 1, 2)))
        flat = rows.reshape(-1, rows.shape[-1])
        keys = None if self.key_inputs is not None else self.plan.ordered_keys(flat, buckets)
        out = []
        for k, queries in enumerate(self.queries):
            if self.key_inputs is not None:
                keys = self.plan.ordered_keys(flat, buckets, self.images[k], self.key_inputs[k])
            maps = self.plan.image_maps(queries, keys, buckets)  # (2C, h, w)
            maps = F.interpolate(maps[:, None], size=self.size, mode="bilinear", align_corners=False)[:, 0]
            out.append(maps.view(n_classes, 2, *self.size))
        return torch.stack(out)


def optimize_tokens(
    store: Store | str | Path,
    tasks: Sequence[TokenTask],
    *,
    config: OptimizeConfig | None = None,
    text_encoder: TextEncoder | None = None,
    model: str | None = None,
    device: str = "cpu",
    progress: Callable[[int, list[float]], None] | None = None,
) -> list[TokenFile]:
    """Learn one token per task from stored queries and annotated masks.

    Parameters
    ----------
    store
        Store holding the training images.
    tasks
        One :class:`TokenTask` per class; several classes share the pass over the queries.
    config
        :class:`OptimizeConfig` (default: the reference recipe).
    progress
        Called after every epoch with the epoch index and each class's loss.

    Returns
    -------
    list[TokenFile]
        The lowest-loss embedding of each class with its provenance and training IoU
        (class map min-max normalised, threshold 0.5) beside the plain word's.
    """
    check_device(device)  # before the masks, the text encoder and the queries
    config = config or OptimizeConfig()
    store = store if isinstance(store, Store) else open_store(store)
    if not tasks:
        raise InvalidInputError("no class to optimize; give --init WORD with --image N --mask FILE")
    size = (store.layout.height, store.layout.width)
    union = sorted({i for t in tasks for i in store.check_images(t.images)})
    slot = {image: k for k, image in enumerate(union)}
    targets = []
    for task in tasks:
        masks = [load_mask(m, size) for m in task.masks]
        targets.append((torch.tensor([slot[i] for i in task.images], device=device),
                        torch.from_numpy(np.stack(masks)).to(device)))
    encoder = text_encoder or load_text_encoder(store.layout.model, model=model, device=device)
    init = torch.stack([initial_rows(encoder, t.init_word, config.context) for t in tasks]).to(device)

    plan = MapPlan(store, config.maps, device=device)
    forward = _Forward(plan, union, size)
    rows = torch.nn.Parameter(init.clone())
    optimizer = torch.optim.SGD([rows], lr=config.lr)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=config.lr_step, gamma=config.lr_gamma)
    best_loss = [float("inf")] * len(tasks)
    best_rows = init.clone()
    last = [float("nan")] * len(tasks)
    for epoch in range(config.epochs):
        optimizer.zero_grad(set_to_none=True)
        maps = forward(rows)
        losses = []
        for c, (index, mask) in enumerate(targets):
            m = maps[index, c]  # (n, 2, H, W)
            m = (m - m.min()) / (m.max() - m.min()).clamp_min(1e-12)
            losses.append(F.cross_entropy(m, mask.long()))
        # the loss of this epoch belongs to the rows before the update
        for c, loss in enumerate(losses):
            last[c] = float(loss.detach())
            if last[c] < best_loss[c]:
                best_loss[c] = last[c]
                best_rows[c] = rows.detach()[c]
        torch.stack(losses).sum().backward()
        optimizer.step()
        scheduler.step()
        if progress is not None:
            progress(epoch, last)

    with torch.no_grad():
        learned = forward(best_rows)
        plain = forward(init)
    identity = store.layout.model
    tokens = []
    for c, (task, (index, mask)) in enumerate(zip(tasks, targets)):
        tokens.append(TokenFile(
            name=task.label, embedding=best_rows[c].cpu(), init_word=task.init_word, model_id=identity.id,
            text_encoder_fingerprint=identity.text_encoder_fingerprint,
            hidden_size=int(init.shape[-1]), hyperparameters=config.hyperparameters(), family=identity.family,
            training={
                "store": str(store.path), "images": [int(i) for i in task.images],
                "best_loss": best_loss[c], "final_loss": last[c],
                "train_iou": mask_iou(learned[index, c, 1], mask),
                "plain_word_iou": mask_iou(plain[index, c, 1], mask),
                "iou_protocol": "class row, per-image min-max, threshold 0.5; I and U summed over images",
            },
        ))
    return tokens

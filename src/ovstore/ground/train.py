"""Training a grounding head from stores and label folders, with a validation split, early
stopping and resumable checkpoints.

Examples are (image, class) pairs: the class's pixels of the image's label PNG are the target
(pixels 255 ignored); a class the folder names but the image lacks is a negative (an empty
target), so the head learns to answer "not here" too. Images are split into training and
validation sets (never the pairs, so a validation image is never seen in training). After every
epoch the state (weights, optimizer, best weights, patience counter) is written atomically to
``HEAD.safetensors.checkpoint.pt``; the same command run again continues from it, and epochs
are shuffled from ``(seed, epoch)``, so an interrupted run ends with the same head as an
uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..devices import check_device
from ..errors import InvalidInputError
from ..inputs import check_int
from ..outputs import write_atomically
from ..selection import LayerSelection
from ..store import Store, open_store
from .data import DEFAULT_CACHE_BYTES, DEFAULT_TEMPLATE, TEXT_SOURCES, ClassText, FeatureReader, LabelFolder, \
    read_label_folder, select_layers
from .headfile import HeadFile, check_head_output, check_head_store, save_head
from .model import GroundHead, HeadSpec

__all__ = ["TrainConfig", "TrainResult", "EpochReport", "train_head", "checkpoint_path", "mask_loss"]


@dataclass(frozen=True)
class TrainConfig:
    """Training settings. ``negatives``: absent classes of an image as empty targets; ``flip``:
    mirror half of the training examples left-right (features and masks alike); ``text``: a class
    word's rows from its ``template`` sentence, or from each image's own ``prompt``
    (:class:`~ovstore.ground.data.ClassText`); ``image``: the stored image is an input too
    (:class:`~ovstore.ground.model.GroundHead`), so the mask can follow the object's edges at the
    image's resolution rather than the attention grid's."""

    epochs: int = 30
    val_fraction: float = 0.2
    patience: int = 6
    lr: float = 3e-3
    weight_decay: float = 1e-4
    batch_size: int = 16
    width: int = 32
    seed: int = 0
    template: str = DEFAULT_TEMPLATE
    negatives: bool = True
    flip: bool = True
    text: str = "prompt"
    image: bool = True
    cache_bytes: int = DEFAULT_CACHE_BYTES

    def __post_init__(self) -> None:
        check_int(self.epochs, "--epochs", 1, 100_000)
        check_int(self.patience, "--patience", 1, 100_000)
        check_int(self.batch_size, "--batch-size", 1, 100_000)
        check_int(self.width, "--width", 4, 4096)
        if not 0.0 <= float(self.val_fraction) < 1.0:
            raise InvalidInputError(f"--val-fraction {self.val_fraction}: give a fraction in [0, 1), e.g. 0.2")
        if self.text not in TEXT_SOURCES:
            raise InvalidInputError(f"--text {self.text!r} is not one of {', '.join(TEXT_SOURCES)}")
        if not (float(self.lr) > 0 and np.isfinite(self.lr)):
            raise InvalidInputError(f"--lr {self.lr}: give a positive learning rate, e.g. 0.003")


@dataclass(frozen=True)
class EpochReport:
    epoch: int
    epochs: int
    train_loss: float
    val_loss: float
    val_iou: float
    best: bool


@dataclass(frozen=True)
class TrainResult:
    head: HeadFile
    path: Path
    resumed_from: int  # epochs done before this run (0: a fresh start)
    epochs_run: int
    seconds: float


def checkpoint_path(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".checkpoint.pt")


def mask_loss(logits: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy over the valid pixels (mean per example) plus soft Dice over the
    whole batch (per example, an empty target would make Dice demand zero everywhere)."""
    valid = valid.float()
    bce = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    bce = (bce * valid).flatten(1).sum(1) / valid.flatten(1).sum(1).clamp_min(1.0)
    prob = torch.sigmoid(logits) * valid
    dice = 1 - (2 * (prob * labels).sum() + 1) / (prob.sum() + (labels * valid).sum() + 1)
    return bce.mean() + dice


@dataclass(frozen=True)
class _Example:
    store: int
    image: int
    cls: str
    index: int  # the class's index in its label folder


class _Batches:
    """Features, text rows and targets of examples, read through each store's feature reader."""

    def __init__(self, readers: Sequence[FeatureReader], folders: Sequence[LabelFolder], text: ClassText,
                 size: tuple[int, int], device: torch.device) -> None:
        self.readers, self.folders, self.text, self.size, self.device = readers, folders, text, size, device
        self._prompts: dict[tuple[int, int], str] = {}

    def prompt(self, store: int, image: int) -> str:
        key = (store, image)
        if key not in self._prompts:
            self._prompts[key] = self.readers[store].store.record(image).prompt
        return self._prompts[key]

    def __call__(self, examples: Sequence[_Example]) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor,
                                                             torch.Tensor]:
        per_layer: list[list[np.ndarray]] = []
        targets, valid = [], []
        for ex in examples:
            feats = self.readers[ex.store](ex.image)
            if not per_layer:
                per_layer = [[] for _ in feats]
            for k, f in enumerate(feats):
                per_layer[k].append(f)
            labels = self.folders[ex.store].labels(ex.image, self.size)
            targets.append(labels == ex.index)
            valid.append(labels != 255)
        features = [torch.from_numpy(np.stack(f)).to(self.device) for f in per_layer]
        text = torch.stack([self.text.rows(self.prompt(ex.store, ex.image), ex.cls) for ex in examples]).to(self.device)
        return (features, text, torch.from_numpy(np.stack(targets)).float().to(self.device),
                torch.from_numpy(np.stack(valid)).to(self.device))


def _split(keys: list[tuple[int, int]], fraction: float, seed: int) -> tuple[set, set]:
    order = list(keys)
    np.random.default_rng([seed, 18]).shuffle(order)
    n_val = int(round(fraction * len(order)))
    if fraction > 0 and len(order) >= 2:
        n_val = min(max(n_val, 1), len(order) - 1)
    else:
        n_val = 0
    return set(order[n_val:]), set(order[:n_val])


#: thresholds tried on the validation split for the one ``ground apply`` uses by default
THRESHOLD_GRID = tuple(round(0.1 + 0.05 * k, 2) for k in range(17))  # 0.1 .. 0.9


def _evaluate(head: GroundHead, batches: _Batches, examples: Sequence[_Example], batch_size: int,
              thresholds: Sequence[float] = (0.5,)) -> tuple[float, dict[float, float]]:
    """Mean loss over ``examples`` and, for each of ``thresholds``, the IoU of ``sigmoid > t``
    (I and U summed)."""
    if not examples:
        return float("nan"), {t: float("nan") for t in thresholds}
    cuts = torch.logit(torch.tensor(list(thresholds), dtype=torch.float64)).tolist()
    losses, inter, union = [], [0.0] * len(cuts), [0.0] * len(cuts)
    head.eval()
    with torch.no_grad():
        for k in range(0, len(examples), batch_size):
            part = examples[k:k + batch_size]
            features, text, target, valid = batches(part)
            logits = head(features, text)
            losses.append(float(mask_loss(logits, target, valid)) * len(part))
            truth = (target > 0.5) & valid
            for i, cut in enumerate(cuts):
                pred = (logits > cut) & valid
                inter[i] += float((pred & truth).sum())
                union[i] += float((pred | truth).sum())
    head.train()
    return sum(losses) / len(examples), {t: i / u if u else float("nan")
                                         for t, i, u in zip(thresholds, inter, union)}


def train_head(
    stores: Sequence[Store | str | Path],
    labels: Sequence[str | Path],
    out: str | Path,
    *,
    classes: Sequence[str] | None = None,
    layers: LayerSelection | None = None,
    calls: str | Sequence[int] | None = None,
    branch: str | None = None,
    config: TrainConfig | None = None,
    class_words: dict[str, Sequence[str]] | None = None,
    text_encoder: Any | None = None,
    model: str | None = None,
    device: str = "cpu",
    overwrite: bool = False,
    progress: Callable[[EpochReport], None] | None = None,
) -> TrainResult:
    """Train a grounding head on ``stores[k]``'s images labelled by ``labels[k]`` and write it to ``out``.

    ``classes`` are the seen classes (default: every class the label folders name);
    ``class_words`` other words naming them in prompts (``config.text == "prompt"``). Re-running
    the same call after an interruption continues from ``out``'s checkpoint.
    """
    dev = check_device(device)
    config = config or TrainConfig()
    out = Path(out)
    check_head_output(out, overwrite=overwrite)
    if not stores:
        raise InvalidInputError("no store to train on; give STORE... and one --labels DIR per store")
    if len(stores) != len(labels):
        raise InvalidInputError(f"{len(stores)} store(s) but {len(labels)} --labels folder(s); give one --labels DIR "
                                "per store, in the same order")
    opened = [s if isinstance(s, Store) else open_store(s) for s in stores]
    folders = [read_label_folder(p) for p in labels]
    first = opened[0]
    selection = select_layers(first, layers, calls, branch)
    size = (first.layout.height, first.layout.width)
    identity = first.layout.model
    probe = HeadFile(spec=HeadSpec(selection.layers, 0, size), state={}, model=identity.to_json(),
                     calls=selection.calls, branch=selection.branch_name, template=config.template, classes_seen=())
    for k, s in enumerate(opened[1:], start=1):
        check_head_store(probe, s, where=f"the head (trained on {first.path} too)")
        if (s.layout.height, s.layout.width) != size:
            raise InvalidInputError(f"{s.path} holds {s.layout.height}x{s.layout.width} images, {first.path} "
                                    f"{size[0]}x{size[1]}; train one head on stores of one image size")
    named = [n for f in folders for n in f.names[1:]]
    if classes is None:
        chosen = list(dict.fromkeys(named))
    else:
        chosen = list(dict.fromkeys(c.strip() for c in classes if c.strip()))
        missing = [c for c in chosen if c not in named]
        if missing:
            raise InvalidInputError(f"--classes {', '.join(missing)}: no --labels folder names "
                                    f"{'it' if len(missing) == 1 else 'them'} (they name {', '.join(sorted(set(named)))})")
    if not chosen:
        raise InvalidInputError("no class to train on; the label folders name none besides background")
    examples: list[_Example] = []
    for k, (s, folder) in enumerate(zip(opened, folders)):
        s.check_images(sorted(folder.pngs))  # every labelled image must be complete in its store
        for image in sorted(folder.pngs):
            for c in chosen:
                if c in folder.names:
                    examples.append(_Example(k, image, c, folder.names.index(c)))
    keys = sorted({(e.store, e.image) for e in examples})
    train_keys, val_keys = _split(keys, config.val_fraction, config.seed)
    readers = [FeatureReader(s, selection, config.cache_bytes, image=config.image) for s in opened]
    if text_encoder is None:
        from ..analyze import check_recorded_encoder, load_text_encoder

        text_encoder = load_text_encoder(identity, model=model, device="cpu")
        if model is None:
            check_recorded_encoder(text_encoder, identity, first.path)
    words = {c: list(w) for c, w in (class_words or {}).items()}
    text = ClassText(text_encoder, chosen, config.template, config.text, words)
    spec = HeadSpec(selection.layers, int(text.template_rows[chosen[0]].shape[-1]), size, config.width,
                    image_channels=3 if config.image else 0)
    batches = _Batches(readers, folders, text, size, dev)
    # empty targets: kept as negatives, or dropped
    train_ex = [e for e in examples if (e.store, e.image) in train_keys]
    val_ex = [e for e in examples if (e.store, e.image) in val_keys]
    if not config.negatives:
        train_ex = [e for e in train_ex if (folders[e.store].labels(e.image, size) == e.index).any()]
    if not train_ex:
        raise InvalidInputError("no training example is left after the validation split; label more images or "
                                "lower --val-fraction")

    provenance = {
        "stores": [str(s.path.resolve()) for s in opened], "labels": [str(f.path.resolve()) for f in folders],
        "mask_sources": [f.source for f in folders],
        "label_settings": [f.settings.get("config") if f.settings else None for f in folders],
        "images": {"train": len(train_keys), "validation": len(val_keys)},
        "examples": {"train": len(train_ex), "validation": len(val_ex)},
        "validation_images": [[int(k), int(i)] for k, i in sorted(val_keys)],
    }
    signature = hashlib.sha256(json.dumps({
        "provenance": provenance, "classes": chosen, "layers": [l.name for l in selection.layers],
        "calls": list(selection.calls), "branch": selection.branch_name, "class_words": words,
        "config": {k: v for k, v in asdict(config).items() if k not in ("epochs", "patience", "cache_bytes")},
    }, sort_keys=True).encode()).hexdigest()

    torch.manual_seed(config.seed)
    head = GroundHead(spec).to(dev)
    head.attach_keys(readers[0].projections())
    optimizer = torch.optim.AdamW(head.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    state = {"epoch": 0, "best_loss": float("inf"), "best_iou": float("nan"), "best_epoch": -1, "bad": 0,
             "history": [], "best_state": None, "seconds": 0.0}
    ckpt = checkpoint_path(out)
    resumed_from = 0
    if ckpt.exists():
        try:
            saved = torch.load(ckpt, map_location=dev, weights_only=False)
        except Exception as exc:
            raise InvalidInputError(f"checkpoint {ckpt} cannot be read ({type(exc).__name__}); remove it to train "
                                    "from the start") from None
        if saved.get("signature") != signature:
            raise InvalidInputError(f"checkpoint {ckpt} belongs to a training with other stores, labels, classes or "
                                    "settings; re-run that command to resume it, or remove the checkpoint to start "
                                    "this one")
        head.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        state = saved["state"]
        resumed_from = int(state["epoch"])
    t0 = time.perf_counter()
    epochs_run = 0
    head.train()
    while state["epoch"] < config.epochs and state["bad"] < config.patience:
        epoch = int(state["epoch"])
        order = np.random.default_rng([config.seed, epoch]).permutation(len(train_ex))
        total = 0.0
        for k in range(0, len(order), config.batch_size):
            part = [train_ex[i] for i in order[k:k + config.batch_size]]
            features, text, target, valid = batches(part)
            if config.flip:  # drawn from (seed, epoch) too: a resumed run flips the same examples
                mirror = torch.from_numpy(np.random.default_rng([config.seed, epoch, k]).random(len(part)) < 0.5)
                mirror = mirror.to(dev)
                features = [torch.where(mirror[:, None, None, None], f.flip(-1), f) for f in features]
                target = torch.where(mirror[:, None, None], target.flip(-1), target)
                valid = torch.where(mirror[:, None, None], valid.flip(-1), valid)
            loss = mask_loss(head(features, text), target, valid)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(part)
        train_loss = total / len(train_ex)
        val_loss, val_ious = _evaluate(head, batches, val_ex, config.batch_size)
        val_iou = val_ious[0.5]
        watched = val_loss if val_ex else train_loss
        best = watched < state["best_loss"]
        if best:
            state.update(best_loss=watched, best_iou=val_iou, best_epoch=epoch, bad=0,
                         best_state={k: v.detach().cpu().clone() for k, v in head.state_dict().items()})
        else:
            state["bad"] += 1
        state["epoch"] = epoch + 1
        state["history"].append([epoch, train_loss, val_loss, val_iou])
        state["seconds"] = float(state["seconds"]) + (time.perf_counter() - t0)
        t0 = time.perf_counter()
        _save_checkpoint(ckpt, {"signature": signature, "model": head.state_dict(),
                                "optimizer": optimizer.state_dict(), "state": state})
        epochs_run += 1
        if progress is not None:
            progress(EpochReport(epoch, config.epochs, train_loss, val_loss, val_iou, best))

    best_state = state["best_state"] or {k: v.detach().cpu().clone() for k, v in head.state_dict().items()}
    head.load_state_dict(best_state)
    # the probability `ground apply` thresholds at by default: the best on the validation split
    # (on the training split when there is none), the way label thresholds are calibrated
    train_iou = _evaluate(head, batches, train_ex, config.batch_size, THRESHOLD_GRID)[1]
    sweep = _evaluate(head, batches, val_ex, config.batch_size, THRESHOLD_GRID)[1] if val_ex else train_iou
    chosen_t = max((t for t in sweep if sweep[t] == sweep[t]), key=lambda t: sweep[t], default=0.5)
    result = HeadFile(
        spec=spec, state=best_state, model=identity.to_json(), calls=selection.calls, branch=selection.branch_name,
        template=config.template, classes_seen=tuple(chosen), text=config.text, class_words=words,
        training={**provenance, "hyperparameters": {k: v for k, v in asdict(config).items() if k != "cache_bytes"},
                  "parameters": head.parameter_count(), "epochs_run": int(state["epoch"]),
                  "best_epoch": int(state["best_epoch"]), "best_validation_loss": float(state["best_loss"]),
                  "best_validation_iou": float(state["best_iou"]), "train_iou": float(train_iou[0.5]),
                  "validation_threshold": float(chosen_t), "threshold_split": "validation" if val_ex else "training",
                  "threshold_sweep": {f"{t:.2f}": v for t, v in sweep.items()},
                  "history": state["history"], "seconds": float(state["seconds"]),
                  "iou_protocol": "sigmoid > 0.5 per (image, class) pair, I and U summed, 255 ignored"})
    path = save_head(result, out, overwrite=True)  # checked before training; a head of this run may be replaced
    ckpt.unlink(missing_ok=True)
    return TrainResult(result, path, resumed_from, epochs_run, float(state["seconds"]))


def _save_checkpoint(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, lambda tmp: torch.save(data, tmp))

"""Head files: a trained grounding head as safetensors, with its model identity, layers, calls,
classes seen and training provenance as JSON metadata; refused on another model's store."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._version import __version__
from ..errors import InvalidInputError, OutputError
from ..outputs import describe_os_error, write_atomically
from ..store import Store
from .model import GroundHead, HeadSpec

__all__ = ["HEAD_FORMAT", "HeadFile", "check_head_store", "load_head", "save_head", "is_head_file"]

HEAD_FORMAT = "ovstore-ground-head"
HEAD_FORMAT_VERSION = 1


@dataclass
class HeadFile:
    """A grounding head and what it was trained on."""

    spec: HeadSpec
    state: dict[str, Any]  # the module's state dict (float32 tensors)
    model: dict[str, Any]  # the store's ModelIdentity (to_json)
    calls: tuple[int, ...]
    branch: str
    template: str
    classes_seen: tuple[str, ...]
    training: dict[str, Any] = field(default_factory=dict)
    #: where class words' text rows come from: "template" or each image's "prompt"
    text: str = "template"
    #: other words naming a class in prompts, used in training (apply may add more)
    class_words: dict[str, list[str]] = field(default_factory=dict)

    def build(self, device: str = "cpu") -> GroundHead:
        """The module with these weights (key projections still to attach)."""
        head = GroundHead(self.spec)
        head.load_state_dict(self.state)
        return head.to(device).eval()

    def metadata(self) -> dict[str, str]:
        return {"format": HEAD_FORMAT, "format_version": str(HEAD_FORMAT_VERSION), "ovstore_version": __version__,
                "spec": json.dumps(self.spec.to_json(), sort_keys=True),
                "model": json.dumps(self.model, sort_keys=True), "calls": json.dumps(list(self.calls)),
                "branch": self.branch, "template": self.template,
                "classes_seen": json.dumps(list(self.classes_seen)),
                "training": json.dumps(self.training, sort_keys=True), "text": self.text,
                "class_words": json.dumps(self.class_words, sort_keys=True)}


def is_head_file(path: Path) -> bool:
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="np") as f:
            return (f.metadata() or {}).get("format") == HEAD_FORMAT
    except Exception:  # any unreadable file is not a head
        return False


def save_head(head: HeadFile, path: str | Path, *, overwrite: bool = False) -> Path:
    """Write ``head`` to ``path`` (built beside it, then renamed): an existing file is replaced
    only when it is a head file and ``overwrite`` is given."""
    from safetensors.torch import save_file

    path = Path(path)
    check_head_output(path, overwrite=overwrite)
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in head.state.items()}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, lambda tmp: save_file(tensors, str(tmp), metadata=head.metadata()))
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {describe_os_error(exc)}; the training checkpoint beside it is "
                          "kept, free space and run the same command again") from None
    return path


def check_head_output(path: Path, *, overwrite: bool) -> None:
    """Refuse, before training, an ``--out`` that must not be written."""
    if path.suffix != ".safetensors":
        raise InvalidInputError(f"--out {path}: a head file must end in .safetensors")
    if path.is_dir():
        raise InvalidInputError(f"--out {path} is a folder; give a file name, or move the folder")
    if path.exists():
        if not is_head_file(path):
            raise InvalidInputError(f"--out {path} is a file that `ovstore ground train` did not write; it is never "
                                    "replaced: choose another --out, or move it away")
        if not overwrite:
            raise InvalidInputError(f"--out {path} exists (a head file); add --overwrite to replace it, or choose "
                                    "another --out")


def load_head(path: str | Path) -> HeadFile:
    """Read a head file written by :func:`save_head`."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise InvalidInputError(f"head file {path} does not exist; train one with `ovstore ground train`")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:
        raise InvalidInputError(f"{path} is not a readable safetensors head file ({type(exc).__name__}); train the "
                                "head again") from None
    if meta.get("format") != HEAD_FORMAT:
        raise InvalidInputError(f"{path} is a safetensors file but not an ovstore grounding head (format "
                                f"{meta.get('format', 'none')!r}); give a file written by `ovstore ground train`")
    version = meta.get("format_version", "")
    if not version.isdigit() or int(version) > HEAD_FORMAT_VERSION:
        raise InvalidInputError(f"{path} has head format {version!r}, which this ovstore does not read (it reads "
                                f"{HEAD_FORMAT_VERSION}); upgrade ovstore, or train the head again")
    try:
        head = HeadFile(spec=HeadSpec.from_json(json.loads(meta["spec"])), state=state,
                        model=json.loads(meta["model"]), calls=tuple(json.loads(meta["calls"])),
                        branch=meta["branch"], template=meta["template"],
                        classes_seen=tuple(json.loads(meta["classes_seen"])),
                        training=json.loads(meta.get("training", "{}")), text=meta.get("text", "template"),
                        class_words=json.loads(meta.get("class_words", "{}")))
        head.build()  # weights that fit the recorded architecture
    except (KeyError, ValueError, TypeError, RuntimeError) as exc:
        raise InvalidInputError(f"{path}: the head's metadata or weights are damaged ({type(exc).__name__}); train "
                                "the head again") from None
    return head


def check_head_store(head: HeadFile, store: Store, where: str = "the head") -> None:
    """Refuse a store of another model, or one that lacks the head's layers, calls or branch."""
    identity = store.layout.model
    recorded = head.model
    fingerprint = recorded.get("text_encoder_fingerprint")
    if recorded.get("family", "unet") != identity.family or (
            fingerprint and identity.text_encoder_fingerprint and fingerprint != identity.text_encoder_fingerprint) \
            or int(recorded.get("text_encoder_hidden_size") or 0) != identity.text_encoder_hidden_size:
        raise InvalidInputError(f"{where} was trained on stores of model {recorded.get('id')!r}; {store.path} was "
                                f"captured with {identity.id!r} (another text encoder): train a head on stores of "
                                "this model")
    stored = {l.name: l for l in store.layers}
    for layer in head.spec.layers:
        info = stored.get(layer.name)
        if info is None or (info.height, info.width, info.heads, info.head_dim) != (
                layer.height, layer.width, layer.heads, layer.head_dim):
            raise InvalidInputError(f"{where} reads layer {layer.name} ({layer.height}x{layer.width}), which "
                                    f"{store.path} does not hold as such; apply it to stores captured like its "
                                    "training stores (same preset and size)")
    n_calls = store.layout.n_steps
    if max(head.calls) >= n_calls:
        raise InvalidInputError(f"{where} reads stored calls {list(head.calls)}; {store.path} holds {n_calls}; apply "
                                "it to stores captured with as many steps as its training stores")
    if head.branch not in store.layout.branches:
        raise InvalidInputError(f"{where} reads the {head.branch} half; {store.path} holds "
                                f"{', '.join(store.layout.branches)}: capture with --branch {head.branch} or both")

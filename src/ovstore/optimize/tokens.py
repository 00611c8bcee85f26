"""Token files: a learned [SoT, class] embedding with its provenance, as safetensors."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._version import __version__
from ..analyze import Attribution
from ..errors import InvalidInputError, OutputError
from ..outputs import describe_os_error, fix_for, open_output, temporary_path
from ..store import ModelIdentity

__all__ = ["TokenFile", "save_token", "write_tokens", "load_token", "token_attribution", "combined_attribution",
           "store_token_attributions"]

TOKEN_FORMAT = "ovstore-token"
TOKEN_FORMAT_VERSION = 1
SOT = "<|startoftext|>"


@dataclass(frozen=True)
class TokenFile:
    """A learned token: ``embedding`` is ``(2, hidden)``: rows [start-of-text, class]."""

    name: str
    embedding: Any  # torch.Tensor
    init_word: str
    model_id: str
    text_encoder_fingerprint: str | None
    hidden_size: int
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    #: the model family of the store it was learned on (``None``: not recorded, older files)
    family: str | None = None

    def metadata(self) -> dict[str, str]:
        return {
            "format": TOKEN_FORMAT,
            "format_version": str(TOKEN_FORMAT_VERSION),
            "ovstore_version": __version__,
            "name": self.name,
            "init_word": self.init_word,
            "model_id": self.model_id,
            "text_encoder_fingerprint": self.text_encoder_fingerprint or "",
            "hidden_size": str(self.hidden_size),
            "family": self.family or "",
            "hyperparameters": json.dumps(self.hyperparameters, sort_keys=True),
            "training": json.dumps(self.training, sort_keys=True),
        }


def _write_file(token: TokenFile, path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"embedding": token.embedding.detach().float().cpu().contiguous()}, str(path),
              metadata=token.metadata())


def save_token(token: TokenFile, path: str | Path, *, overwrite: bool = False,
               inputs: Sequence[str | Path] = ()) -> Path:
    """Write ``token`` as safetensors (built in a temporary beside ``path``, then renamed).

    An existing ``path`` is replaced only when it is an ovstore token and ``overwrite`` is
    given (:mod:`ovstore.outputs`)."""
    return write_tokens([token], path, overwrite=overwrite, inputs=inputs)[0]


def write_tokens(tokens: Sequence[TokenFile], out: str | Path, *, folder: bool = False, overwrite: bool = False,
                 inputs: Sequence[str | Path] = (), rescue_dir: str | Path | None = None) -> list[Path]:
    """Write one token to the file ``out`` or, with ``folder``, ``NAME.safetensors`` per token
    into the folder ``out``, published complete.

    A trained token is never lost to a write error: when ``out`` cannot be written, the
    tokens are saved to ``rescue_dir`` (or the system's temporary folder) and the
    :class:`~ovstore.errors.OutputError` says where they went.
    """
    path = Path(out)
    if not folder and path.suffix != ".safetensors":
        raise InvalidInputError(f"--out {path}: a token file must end in .safetensors")
    target = open_output(path, "optimize", kind="dir" if folder else "file", inputs=inputs, overwrite=overwrite)
    try:
        with target.writing() as tmp:
            for token in tokens:
                _write_file(token, tmp / f"{token.name}.safetensors" if folder else tmp)
    except (OutputError, InvalidInputError) as exc:
        cause = exc.__cause__ if isinstance(exc.__cause__, OSError) else None
        reason = (f"cannot write {target.path}: {describe_os_error(cause)}" if cause is not None else str(exc))
        saved = _rescue(tokens, rescue_dir)
        many = len(tokens) > 1
        if saved:
            where = ", ".join(map(str, saved))
            raise OutputError(f"{reason}; the trained token{'s were' if many else ' was'} saved to {where} instead, "
                              f"so nothing is lost: move {'them' if many else 'it'} where you want "
                              f"({fix_for(cause) if cause is not None else 'no need to train again'})") from exc
        raise OutputError(f"{reason}; the trained tokens could not be saved anywhere else either "
                          "(free space, then train again)") from exc
    if folder:
        return [target.path / f"{t.name}.safetensors" for t in tokens]
    return [target.path]


def _rescue(tokens: Sequence[TokenFile], rescue_dir: str | Path | None) -> list[Path]:
    """Save ``tokens`` where they fit: ``rescue_dir``, else the system temp folder."""
    import tempfile
    import time

    stamp = time.strftime("%Y%m%d-%H%M%S")
    for folder in [d for d in (rescue_dir, tempfile.gettempdir()) if d is not None]:
        saved = []
        try:
            for token in tokens:
                dest = Path(folder) / f"{token.name}.rescued-{stamp}.safetensors"
                tmp = temporary_path(dest)
                try:
                    _write_file(token, tmp)
                    os.replace(tmp, dest)
                finally:
                    tmp.unlink(missing_ok=True)
                saved.append(dest)
            return saved
        except OSError:
            for p in saved:
                p.unlink(missing_ok=True)
    return []


def load_token(path: str | Path) -> TokenFile:
    """Read a token file written by :func:`save_token`."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            embedding = f.get_tensor("embedding")
    except FileNotFoundError:
        raise InvalidInputError(f"token file {path} does not exist") from None
    except Exception as exc:
        raise InvalidInputError(f"{path} is not a readable safetensors token file ({exc})") from None
    if meta.get("format") != TOKEN_FORMAT:
        raise InvalidInputError(f"{path} is a safetensors file but not an ovstore token (no format metadata)")
    version = meta.get("format_version", "")
    if not version.isdigit():
        raise InvalidInputError(f"{path}: token format version {version!r} is not an integer; the token "
                                "file is damaged, optimize it again")
    if int(version) > TOKEN_FORMAT_VERSION:
        raise InvalidInputError(f"{path} has token format {version}, newer than this ovstore reads "
                                f"({TOKEN_FORMAT_VERSION}); upgrade ovstore (pip install -U ovstore)")
    try:
        hidden = int(meta["hidden_size"])
        name, init_word, model_id = meta["name"], meta["init_word"], meta["model_id"]
        hyperparameters = json.loads(meta.get("hyperparameters", "{}"))
        training = json.loads(meta.get("training", "{}"))
    except (KeyError, ValueError) as exc:
        raise InvalidInputError(f"{path}: the token's metadata is damaged ({type(exc).__name__}: {exc}); "
                                "optimize the token again") from None
    check_embedding(embedding, hidden, path)
    return TokenFile(
        name=name, embedding=embedding, init_word=init_word, model_id=model_id,
        text_encoder_fingerprint=meta.get("text_encoder_fingerprint") or None,
        hidden_size=hidden, hyperparameters=hyperparameters, training=training, family=meta.get("family") or None,
    )


def check_embedding(embedding: Any, hidden_size: int, where: object = "the token") -> None:
    """A token embedding must be a finite float tensor of shape ``(2, hidden_size)`` (rows
    [start-of-text, class]): NaN or Inf would give NaN maps, integers are not embeddings."""
    import torch

    if not isinstance(embedding, torch.Tensor) or not torch.is_floating_point(embedding):
        dtype = getattr(embedding, "dtype", type(embedding).__name__)
        raise InvalidInputError(f"{where}: the embedding is {dtype}, not a float tensor; a token file holds "
                                "float embeddings written by `ovstore optimize`")
    if tuple(embedding.shape) != (2, hidden_size):
        raise InvalidInputError(f"{where}: the embedding has shape {tuple(embedding.shape)}, expected "
                                f"(2, {hidden_size}) (rows start-of-text and class); optimize the token again")
    if not bool(torch.isfinite(embedding).all()):
        bad = int((~torch.isfinite(embedding)).sum())
        raise InvalidInputError(f"{where}: the embedding holds {bad} NaN or Inf values (the optimization "
                                "diverged, or the file was damaged); optimize the token again, e.g. with a lower --lr")


def _check_model(token: TokenFile, identity: ModelIdentity, path: str = "") -> None:
    where = f" {path}" if path else ""
    if token.family and token.family != identity.family:  # its rows feed another kind of denoiser's text path
        raise InvalidInputError(
            f"token{where} ({token.name}) was learned for model {token.model_id!r} of family {token.family}; "
            f"this store was captured with {identity.id!r} of family {identity.family}. "
            "Optimize a token on a store of this model."
        )
    if token.hidden_size != identity.text_encoder_hidden_size or (
        token.text_encoder_fingerprint and identity.text_encoder_fingerprint
        and token.text_encoder_fingerprint != identity.text_encoder_fingerprint
    ):
        raise InvalidInputError(
            f"token{where} ({token.name}) was learned for model {token.model_id!r} (hidden size "
            f"{token.hidden_size}); this store was captured with {identity.id!r} (hidden size "
            f"{identity.text_encoder_hidden_size}). Optimize a token on a store of this model."
        )


def token_attribution(token: TokenFile, identity: ModelIdentity) -> Attribution:
    """The token alone, as the reference evaluates it: rows [SoT, class]."""
    _check_model(token, identity)
    return Attribution(label=token.name, tokens=(SOT, f"{token.name}*"), embedding=token.embedding.float())


def combined_attribution(tokens: Sequence[TokenFile], identity: ModelIdentity,
                         start_of_text: Any | None = None) -> Attribution:
    """Several tokens in one softmax, so that their classes compete: [SoT, a*, b*, ...].

    ``start_of_text`` is the SoT row to use, normally the text encoder's
    (:func:`~ovstore.analyze.text.start_of_text_row`), so that the result does not depend on
    the order of the tokens; without it, the first token's trained SoT row is used.
    """
    import torch

    if not tokens:
        raise InvalidInputError("no token to combine")
    for token in tokens:
        _check_model(token, identity)
    sot = tokens[0].embedding[0] if start_of_text is None else torch.as_tensor(start_of_text).reshape(-1)
    rows = [sot.float().cpu()] + [t.embedding[1].float() for t in tokens]
    return Attribution(label="+".join(f"{t.name}*" for t in tokens),
                       tokens=(SOT, *(f"{t.name}*" for t in tokens)),
                       embedding=torch.stack(rows).float())


def store_token_attributions(store: Any, tokens: Sequence[str | Path | TokenFile], *, combine: bool = False,
                             model: str | None = None, device: str = "cpu") -> tuple[list[Attribution], Any]:
    """Learned ``tokens`` as attributions for ``store`` (``ovstore maps --token``): one each, or
    with ``combine`` one attribution in which they compete (``--combine-tokens``; loads the text
    encoder for its start-of-text row, checked against the recorded one unless ``model`` is
    given). Returns the attributions and the encoder loaded (``None`` if none was), so that a
    later :func:`ovstore.analyze.compute_maps` can share it."""
    from ..analyze import check_recorded_encoder, load_text_encoder, start_of_text_row

    files = [t if isinstance(t, TokenFile) else load_token(t) for t in tokens]
    identity = store.layout.model
    if not combine:
        return [token_attribution(f, identity) for f in files], None
    encoder = load_text_encoder(identity, model=model, device=device)
    if model is None:
        check_recorded_encoder(encoder, identity, store.path)
    return [combined_attribution(files, identity, start_of_text_row(encoder))], encoder

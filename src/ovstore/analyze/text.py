"""Attribution text: tokenizing and encoding attribution prompts with only the tokenizer and
text encoder of the captured model (never its UNet or VAE)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..devices import check_device
from ..errors import InvalidInputError, ModelLoadError
from ..models import (
    BUILTIN_MODELS,
    build_builtin_text_encoder,
    clip_tokenizer,
    hub_error,
    packaged_model_path,
    text_encoder_fingerprint,
)
from ..store.format import ModelIdentity

__all__ = ["Attribution", "TextEncoder", "load_text_encoder", "word_in_context", "words_in_context"]


@dataclass(frozen=True)
class Attribution:
    """One attribution: a label, its token strings and their text embeddings.

    ``embedding`` has shape ``(n_tokens, hidden)``: the text encoder's last hidden state
    (the input of ``to_k``). It may come from a prompt or from an optimized token file.
    """

    label: str
    tokens: tuple[str, ...]
    embedding: Any  # torch.Tensor (n_tokens, hidden)
    token_ids: tuple[int, ...] | None = None
    #: one hashable per token, equal across attributions for identical embedding rows (set
    #: by causal text encoders, whose row i depends only on tokens 0..i); None: all distinct
    row_keys: tuple[Any, ...] | None = None
    #: line of the attributions file the prompt came from (recorded as the maps' ``prompt_line``)
    line: int | None = None

    def __post_init__(self) -> None:
        if len(self.tokens) != int(self.embedding.shape[0]):
            raise InvalidInputError(
                f"attribution {self.label!r} has {len(self.tokens)} token names for "
                f"{int(self.embedding.shape[0])} embedding rows"
            )

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)


class TextEncoder:
    """Tokenizer + text encoder of one model, for attribution prompts.

    Prompts are tokenized without padding, keeping start- and end-of-text tokens; the
    encoder's last hidden state of those tokens is the attribution embedding (the OVAM
    reference semantics). Prompts of equal token count are encoded together.
    """

    def __init__(self, tokenizer: Any, model: Any, *, device: str = "cpu", name: str = "") -> None:
        self.tokenizer = tokenizer
        self.model = model.to(check_device(device)).eval()
        self.device = device
        self.name = name
        self._fingerprint: str | None = None

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def max_length(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", self.tokenizer.model_max_length))

    def fingerprint(self) -> str:
        """SHA-256 of the weights, computed once (hashing CLIP ViT-L/14 takes ~0.3 s)."""
        if self._fingerprint is None:
            self._fingerprint = text_encoder_fingerprint(self.model)
        return self._fingerprint

    @property
    def causal(self) -> bool:
        """Whether row i of an embedding depends only on tokens 0..i (CLIP's causal mask), so
        that prompts with a common beginning share those rows."""
        return getattr(self.model.config, "model_type", "") == "clip_text_model"

    def tokenize(self, prompt: str) -> tuple[list[int], list[str]]:
        """Token ids and strings of ``prompt`` (no padding, SoT and EoT kept)."""
        return self.tokenize_all([prompt])[0]

    def tokenize_all(self, prompts: Sequence[str]) -> list[tuple[list[int], list[str]]]:
        """:meth:`tokenize` of many prompts in one tokenizer call (a batch is several times
        faster than a call per prompt)."""
        for prompt in prompts:
            if not isinstance(prompt, str) or not prompt.strip():
                raise InvalidInputError("an attribution prompt is empty; give at least one word")
        batch = self.tokenizer(list(prompts), padding=False, truncation=False, add_special_tokens=True)["input_ids"]
        out = []
        for prompt, ids in zip(prompts, batch):
            if len(ids) > self.max_length:
                raise InvalidInputError(
                    f"attribution prompt {prompt[:40]!r}... has {len(ids)} tokens; the text encoder "
                    f"takes at most {self.max_length} (start and end included). Shorten or split it."
                )
            out.append((list(ids), self.tokenizer.convert_ids_to_tokens(ids)))
        return out

    def encode(self, prompts: Sequence[str], *, batch_size: int = 256) -> list[Attribution]:
        """Encode prompts into :class:`Attribution` objects (in the given order)."""
        import torch

        tokenized = self.tokenize_all(prompts)
        by_length: dict[int, list[int]] = {}
        for i, (ids, _) in enumerate(tokenized):
            by_length.setdefault(len(ids), []).append(i)
        embeddings: list[Any] = [None] * len(prompts)
        with torch.inference_mode():
            for indices in by_length.values():
                for start in range(0, len(indices), batch_size):
                    chunk = indices[start:start + batch_size]
                    ids = torch.tensor([tokenized[i][0] for i in chunk], device=self.device)
                    hidden = self.model(ids)[0].float()
                    for row, i in enumerate(chunk):
                        embeddings[i] = hidden[row].clone()
        if not self.causal:
            return [Attribution(label=p, tokens=tuple(tok), embedding=emb, token_ids=tuple(ids))
                    for p, (ids, tok), emb in zip(prompts, tokenized, embeddings)]
        # Rows of a common beginning are the same function of the same tokens: make them the
        # same numbers (not just equal to rounding), so that analysis may compute them once.
        first: dict[tuple[int, ...], Any] = {}
        out = []
        with torch.inference_mode():
            for p, (ids, tok), emb in zip(prompts, tokenized, embeddings):
                keys = tuple(tuple(ids[:i + 1]) for i in range(len(ids)))
                for i, key in enumerate(keys):
                    if key in first:
                        emb[i] = first[key]
                    else:
                        first[key] = emb[i]
                out.append(Attribution(label=p, tokens=tuple(tok), embedding=emb, token_ids=tuple(ids),
                                       row_keys=keys))
        return out


def start_of_text_row(encoder: TextEncoder) -> Any:
    """The encoder's start-of-text row ``(hidden,)``: the same in every prompt of a causal
    encoder (CLIP), so classes combined in one softmax share it whatever their order."""
    (att,) = encoder.encode(["a"])
    return att.embedding[0].clone()


def word_in_context(encoder: TextEncoder, word: str, template: str) -> tuple[Attribution, list[int]]:
    """Encode ``template.format(word)`` and find the positions of ``word``'s tokens in it.

    Token optimization starts from these rows and labelling sums them into a class map.
    """
    return words_in_context(encoder, [word], template)[0]


def words_in_context(encoder: TextEncoder, words: Sequence[str],
                     template: str) -> list[tuple[Attribution, list[int]]]:
    """:func:`word_in_context` of many words, their sentences encoded in one batched call."""
    sentences = [template.format(word) for word in words]
    out = []
    for word, sentence, att in zip(words, sentences, encoder.encode(sentences)):
        word_ids = list(encoder.tokenizer(word, add_special_tokens=False)["input_ids"])
        ids = list(att.token_ids or ())
        start = next((k for k in range(1, len(ids) - len(word_ids) + 1) if ids[k:k + len(word_ids)] == word_ids),
                     None)
        if start is None:
            raise InvalidInputError(f"{word!r} is not tokenized the same inside {sentence!r}; choose a template "
                                    "where it stands as a separate word")
        out.append((att, list(range(start, start + len(word_ids)))))
    return out


def check_recorded_encoder(encoder: TextEncoder, identity: ModelIdentity, store_path: object) -> None:
    """Refuse a text encoder that is not the one the store was captured with: its keys would
    not match the stored queries and every map would be meaningless (a model replaced on
    disk or on the hub). ``--model`` chooses another encoder deliberately."""
    recorded = identity.text_encoder_fingerprint
    if recorded and encoder.fingerprint() != recorded:
        raise InvalidInputError(
            f"the text encoder found for {identity.id!r} is not the one {store_path} was captured with "
            "(fingerprints differ), so its maps would be meaningless; restore that model, or pass --model "
            "to choose an encoder deliberately")


def load_text_encoder(identity: ModelIdentity, *, model: str | None = None, device: str = "cpu") -> TextEncoder:
    """Load the tokenizer and text encoder recorded in a store (or ``model`` instead).

    Resolution: ``model`` if given (a pipeline directory, hub id or built-in name), else the
    recorded local path when it still exists, else the recorded id (hub or built-in).
    """
    target = model or identity.id
    if model is None and identity.source != "builtin" and identity.path and Path(identity.path).exists():
        target = identity.path
    packaged = packaged_model_path(target)
    if packaged is not None:  # shipped with ovstore: found wherever it is installed
        return _from_pretrained(str(packaged), identity, device)
    if target in BUILTIN_MODELS:
        return TextEncoder(clip_tokenizer(), build_builtin_text_encoder(target), device=device, name=target)
    return _from_pretrained(target, identity, device)


def _from_pretrained(target: str, identity: ModelIdentity, device: str) -> TextEncoder:
    import transformers

    encoder_folder = identity.text_encoder_subfolders[0] if identity.text_encoder_subfolders else "text_encoder"
    tokenizer_folder = identity.tokenizer_subfolders[0] if identity.tokenizer_subfolders else "tokenizer"
    class_name = identity.text_encoder_classes[0] if identity.text_encoder_classes else "CLIPTextModel"
    encoder_class = getattr(transformers, class_name, None)
    if encoder_class is None:
        raise ModelLoadError(f"transformers has no class {class_name!r}; upgrade transformers")
    local = Path(target).expanduser()
    if local.exists() and not (local / encoder_folder).is_dir():
        raise ModelLoadError(
            f"{local} has no {encoder_folder}/ folder; pass a diffusers pipeline directory "
            "(with text_encoder/ and tokenizer/) as --model"
        )
    kwargs = {} if local.exists() else {"revision": identity.revision}
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(target), subfolder=tokenizer_folder, **kwargs)
        encoder = encoder_class.from_pretrained(str(target), subfolder=encoder_folder, **kwargs)
    except Exception as exc:
        raise hub_error(str(target), exc, what="text encoder") from exc
    return TextEncoder(tokenizer, encoder, device=device, name=str(target))


def embedding_matrix(attributions: Sequence[Attribution]) -> tuple[Any, list[int]]:
    """Stack attributions into one ``(total_tokens, hidden)`` matrix and their offsets."""
    import torch

    offsets = list(np.cumsum([0] + [a.n_tokens for a in attributions]))
    return torch.cat([a.embedding.float() for a in attributions], dim=0), offsets


def row_keys(attributions: Sequence[Attribution]) -> list[Any]:
    """One key per token of the stacked attributions, equal only for identical rows."""
    keys: list[Any] = []
    for att in attributions:
        keys.extend(att.row_keys if att.row_keys is not None else ((id(att), i) for i in range(att.n_tokens)))
    return keys

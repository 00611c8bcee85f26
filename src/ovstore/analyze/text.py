"""Attribution text: tokenizing and encoding attribution prompts with only the tokenizer and
text encoder of the captured model (never its UNet or VAE)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..devices import check_device
from ..errors import InvalidInputError
from ..models import (
    BUILTIN_MODELS,
    build_builtin_text_encoder,
    clip_tokenizer,
    packaged_model_path,
    text_encoders_fingerprint,
)
from ..store import ModelIdentity

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
    """Tokenizer(s) + text encoder(s) of one model, for attribution prompts.

    Prompts are tokenized without padding, keeping start- and end-of-text tokens; each
    encoder's chosen hidden state of those tokens (``hidden_state``: ``None`` for the last
    hidden state, the OVAM reference semantics; ``-2`` for SDXL's penultimate layer) is
    joined on the channel axis into the attribution embedding. ``more`` holds further
    ``(tokenizer, encoder)`` pairs (SDXL's second encoder); every tokenizer must give the same
    ids. Which recipe a model uses is its family's business (``ovstore.families``). Prompts of
    equal token count are encoded together.
    """

    def __init__(self, tokenizer: Any, model: Any, *, device: str = "cpu", name: str = "",
                 more: Sequence[tuple[Any, Any]] = (), hidden_state: int | None = None,
                 family: str = "unet") -> None:
        self.tokenizer = tokenizer
        self.model = model.to(check_device(device)).eval()
        self.components = [(tokenizer, self.model)] + [(t, m.to(check_device(device)).eval()) for t, m in more]
        self.hidden_state = hidden_state
        self.family = family
        self.device = device
        self.name = name
        self._fingerprint: str | None = None

    @property
    def hidden_size(self) -> int:
        """Channels of a joined row (the sum of the encoders' widths)."""
        return int(sum(m.config.hidden_size for _, m in self.components))

    @property
    def max_length(self) -> int:
        return min(int(getattr(m.config, "max_position_embeddings", t.model_max_length)) for t, m in self.components)

    def fingerprint(self) -> str:
        """SHA-256 of the weights, computed once (hashing CLIP ViT-L/14 takes ~0.3 s)."""
        if self._fingerprint is None:
            self._fingerprint = text_encoders_fingerprint([m for _, m in self.components])
        return self._fingerprint

    @property
    def causal(self) -> bool:
        """Whether row i of an embedding depends only on tokens 0..i (CLIP's causal mask), so
        that prompts with a common beginning share those rows."""
        return all(getattr(m.config, "model_type", "") == "clip_text_model" for _, m in self.components)

    def _rows(self, ids: Any) -> Any:
        """Joined hidden states ``(batch, tokens, width)`` of token ids ``(batch, tokens)``."""
        import torch

        parts = []
        for _, model in self.components:
            out = model(ids, output_hidden_states=self.hidden_state is not None)
            hidden = out.last_hidden_state if self.hidden_state is None else out.hidden_states[self.hidden_state]
            parts.append(hidden.float())
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)

    def tokenize(self, prompt: str) -> tuple[list[int], list[str]]:
        """Token ids and strings of ``prompt`` (no padding, SoT and EoT kept)."""
        return self.tokenize_all([prompt])[0]

    def tokenize_all(self, prompts: Sequence[str]) -> list[tuple[list[int], list[str]]]:
        """:meth:`tokenize` of many prompts in one tokenizer call (a batch is several times
        faster than a call per prompt)."""
        for prompt in prompts:
            if not isinstance(prompt, str) or not prompt.strip():
                raise InvalidInputError("an attribution prompt is empty; give at least one word")
        backend = getattr(self.tokenizer, "backend_tokenizer", None) if getattr(self.tokenizer, "is_fast", False) else None
        if backend is not None and backend.truncation is None and backend.padding is None:
            # the Rust tokenizer directly: ids and token strings in one call, without the wrapper's
            # per-prompt conversions (the same ids; a wrapper left padding or truncating is not used)
            encodings = backend.encode_batch(list(prompts), add_special_tokens=True)
            batch = [list(e.ids) for e in encodings]
            strings: list[list[str]] | None = [list(e.tokens) for e in encodings]
        else:
            batch = self.tokenizer(list(prompts), padding=False, truncation=False,
                                   add_special_tokens=True)["input_ids"]
            strings = None
        for k, (tokenizer, _) in enumerate(self.components[1:], start=2):
            other = tokenizer(list(prompts), padding=False, truncation=False, add_special_tokens=True)["input_ids"]
            for prompt, a, b in zip(prompts, batch, other):
                if list(a) != list(b):
                    raise InvalidInputError(
                        f"attribution prompt {prompt[:40]!r} is tokenized differently by the model's tokenizer 1 and "
                        f"tokenizer {k} ({len(a)} vs {len(b)} tokens); its rows cannot be joined: rephrase it")
        out = []
        for k, (prompt, ids) in enumerate(zip(prompts, batch)):
            if len(ids) > self.max_length:
                raise InvalidInputError(
                    f"attribution prompt {prompt[:40]!r}... has {len(ids)} tokens; the text encoder "
                    f"takes at most {self.max_length} (start and end included). Shorten or split it."
                )
            out.append((list(ids), strings[k] if strings is not None else self.tokenizer.convert_ids_to_tokens(ids)))
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
                    hidden = self._rows(ids)
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
    disk or on the hub, or another family's encoder). ``--model`` chooses another encoder
    deliberately (of the same family and width)."""
    recorded = identity.text_encoder_fingerprint
    if recorded and encoder.fingerprint() != recorded:
        raise InvalidInputError(
            f"the text encoder found for {identity.id!r} is not the one {store_path} was captured with "
            "(fingerprints differ), so its maps would be meaningless; restore that model, or pass --model "
            "to choose an encoder deliberately")
    check_encoder_family(encoder, identity, store_path)


def check_encoder_family(encoder: TextEncoder, identity: ModelIdentity, store_path: object) -> None:
    """Refuse an encoder of another model family or text recipe than the store's."""
    recipe = identity.text_recipe
    if encoder.family != identity.family or (recipe.width and encoder.hidden_size != recipe.width) \
            or len(encoder.components) != len(recipe.encoders) or encoder.hidden_state != recipe.hidden_state:
        raise InvalidInputError(
            f"{store_path} was captured with model family {identity.family!r} (text: {len(recipe.encoders)} "
            f"encoder(s), {recipe.width} channels); the given text encoder {encoder.name or ''} encodes "
            f"family {encoder.family!r} text ({len(encoder.components)} encoder(s), {encoder.hidden_size} channels). "
            "Use the text encoder of the captured model")


def load_text_encoder(identity: ModelIdentity, *, model: str | None = None, device: str = "cpu") -> TextEncoder:
    """Load the attribution text encoder recorded in a store (or ``model``'s instead), as
    the store's model family encodes text (its recorded text recipe).

    Resolution: ``model`` if given (a pipeline directory, hub id or built-in name), else the
    recorded local path when it still exists, else the recorded id (hub or built-in).
    """
    from ..devices import check_device
    from ..families import get_family

    check_device(device)
    target = model or identity.id
    if model is None and identity.source != "builtin" and identity.path and Path(identity.path).exists():
        target = identity.path
    family = get_family(identity.family)
    packaged = packaged_model_path(target)
    if packaged is not None:  # shipped with ovstore: found wherever it is installed
        return family.load_text_encoder(identity, str(packaged), device=device)
    if target in BUILTIN_MODELS:
        return TextEncoder(clip_tokenizer(), build_builtin_text_encoder(target), device=device, name=target)
    return family.load_text_encoder(identity, target, device=device)


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

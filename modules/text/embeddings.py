"""Textual-inversion embeddings in the text encoders: fit to a model, find trigger words, inject vectors.

An embedding's trigger word is found in a fragment's token ids (longest match first, as
A1111), replaced by one placeholder slot per vector (see `chunking.py`), and the token
embedding layer's output at those slots is replaced by the vectors during the forward pass,
through a forward hook that lives only for that call. Nothing is monkeypatched.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class TokenEmbedding:
    """An embedding fitted to a model: one `[n, width]` tensor per text encoder, in the model's order."""

    name: str
    vectors: tuple[torch.Tensor, ...]
    hash: str = ""

    @property
    def n_vectors(self) -> int:
        return int(self.vectors[0].shape[0])


def _encoder_keys(flavours: Sequence[str]) -> list[str]:
    """The file keys for each encoder: SDXL files name them clip_l / clip_g; one-encoder files use ""."""
    if len(flavours) == 1:
        return [""]
    return ["clip_l" if f == "clip_l" else "clip_g" for f in flavours]


def fit_embedding(spec: Any, flavours: Sequence[str], widths: Sequence[int]) -> tuple[TokenEmbedding | None, str]:
    """An `EmbeddingSpec` -> TokenEmbedding for a model's encoders, or (None, why it does not fit)."""
    vectors = dict(spec.vectors)
    keys = _encoder_keys(flavours)
    if keys == [""] and len(vectors) == 1:
        vectors = {"": next(iter(vectors.values()))}
    missing = [k or "single-encoder" for k in keys if k not in vectors]
    if missing:
        found = ", ".join(f"{k or 'single'} {tuple(v.shape)}" for k, v in vectors.items())
        return None, f"made for another model (has {found}; this model needs {', '.join(missing)} vectors)"
    fitted = []
    for key, width in zip(keys, widths, strict=True):
        tensor = vectors[key]
        tensor = tensor.unsqueeze(0) if tensor.ndim == 1 else tensor
        if tensor.ndim != 2 or tensor.shape[-1] != width:
            return None, (f"width {tensor.shape[-1]} does not match this model's text encoder ({width}); "
                          "made for another model")
        fitted.append(tensor.detach().float())
    if len({t.shape[0] for t in fitted}) != 1:
        return None, "its encoders have different numbers of vectors"
    return TokenEmbedding(spec.name, tuple(fitted), spec.hash), ""


class EmbeddingLookup:
    """Trigger words by their token ids; `match` is `chunking.EmbeddingMatcher`."""

    def __init__(self, embeddings: Iterable[TokenEmbedding], tokenizer: Any) -> None:
        from modules.text.tokenizer import tokenize_many  # transformers: imported only when used

        self.embeddings = {e.name: e for e in embeddings}
        names = list(self.embeddings)
        self._by_first: dict[int, list[tuple[tuple[int, ...], TokenEmbedding]]] = {}
        for name, ids in zip(names, tokenize_many(tokenizer, names), strict=True):
            if ids:
                self._by_first.setdefault(ids[0], []).append((tuple(ids), self.embeddings[name]))
        for candidates in self._by_first.values():
            candidates.sort(key=lambda c: -len(c[0]))
        self.used: dict[str, TokenEmbedding] = {}  # trigger words that matched, in order

    def __bool__(self) -> bool:
        return bool(self._by_first)

    def match(self, tokens: Sequence[int], position: int) -> tuple[TokenEmbedding | None, int]:
        for ids, embedding in self._by_first.get(tokens[position], ()):
            if tuple(tokens[position:position + len(ids)]) == ids:
                self.used.setdefault(embedding.name, embedding)
                return embedding, len(ids)
        return None, 0


def token_embedding_layer(encoder: nn.Module) -> nn.Module:
    """The token embedding of a transformers CLIP text model (5.x flattens `text_model`)."""
    embeddings = getattr(encoder, "embeddings", None) or encoder.text_model.embeddings
    return embeddings.token_embedding


@contextmanager
def injected(encoder: nn.Module, encoder_index: int, rows: Sequence[Sequence[tuple[int, Any]]]) -> Iterator[None]:
    """Replace token embeddings at `rows[i]`'s (offset, embedding) slots during the block's forward passes."""
    if not any(rows):
        yield
        return

    def hook(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
        output = output.clone()
        for row, fixes in enumerate(rows):
            for offset, embedding in fixes:
                vectors = embedding.vectors[encoder_index]
                output[row, offset:offset + vectors.shape[0]] = vectors.to(output)
        return output

    handle = token_embedding_layer(encoder).register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()

"""A1111's prompt chunking: weighted fragments -> 77-token chunks for CLIP.

A prompt is parsed into `[text, weight]` fragments (BREAK is `["BREAK", -1]`), each fragment
is tokenized without special tokens, and the tokens are packed into chunks of 75. A chunk
becomes `[BOS] + 75 tokens + [EOS]` (77), padded with EOS. OpenCLIP encoders then replace
everything after the first EOS with id 0 (`pad_after_first_eos`), which is done per encoder
because SDXL's two encoders share one chunking but pad differently.

Comma backtrack: when a chunk is full and the next token is not a comma, and the chunk's last
comma is at most `comma_backtrack` tokens from its end, the tokens after that comma move to
the next chunk, so a phrase is not cut in half.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from modules.text.tokenizer import SpecialTokens

CHUNK_LENGTH = 75  # prompt tokens per chunk; +BOS +EOS = 77
COMMA_BACKTRACK = 20  # A1111's `comma_padding_backtrack` default
BREAK = "BREAK"
EMBEDDING_PLACEHOLDER = 0  # token id under an embedding's vectors, as A1111 (it never reaches the model)


class EmbeddingMatcher(Protocol):
    """Finds a textual-inversion trigger word at a position of a fragment's token ids."""

    def match(self, tokens: Sequence[int], position: int) -> tuple[Any, int]:
        """(embedding, tokens its trigger word spans) or (None, 0); the embedding has `n_vectors`."""


@dataclass
class PromptChunk:
    """One chunk: token ids and the weight of each; 77 long once finished."""

    tokens: list[int] = field(default_factory=list)
    multipliers: list[float] = field(default_factory=list)
    fixes: list[tuple[int, Any]] = field(default_factory=list)  # (offset after BOS, embedding)


@dataclass(frozen=True)
class ChunkedPrompt:
    """A prompt's chunks and its token count as A1111's counter shows it.

    token_count counts every chunk but the last as full (75), plus the last chunk's tokens,
    so `a BREAK b` counts 76.
    """

    chunks: tuple[PromptChunk, ...]
    token_count: int


def is_break(text: str, weight: float) -> bool:
    return text == BREAK and weight == -1


def target_token_count(token_count: int, chunk_length: int = CHUNK_LENGTH) -> int:
    """Tokens that fit in the chunks a prompt of this length uses: the '/75', '/150' of the counter."""
    return math.ceil(max(token_count, 1) / chunk_length) * chunk_length


def empty_chunk(ids: SpecialTokens, chunk_length: int = CHUNK_LENGTH) -> PromptChunk:
    """The chunk of an empty prompt: BOS, then EOS to the end, all weights 1."""
    return PromptChunk([ids.bos] + [ids.eos] * (chunk_length + 1), [1.0] * (chunk_length + 2))


class _Packer:
    """Packs weighted tokens into chunks; mirrors A1111's tokenize_line state machine."""

    def __init__(self, ids: SpecialTokens, chunk_length: int, comma_backtrack: int) -> None:
        self.ids = ids
        self.chunk_length = chunk_length
        self.comma_backtrack = comma_backtrack
        self.chunks: list[PromptChunk] = []
        self.chunk = PromptChunk()
        self.token_count = 0
        self.last_comma = -1

    def close_chunk(self, is_last: bool = False) -> None:
        chunk, n = self.chunk, self.chunk_length
        self.token_count += len(chunk.tokens) if is_last else n
        pad = n - len(chunk.tokens)
        tokens = [self.ids.bos, *chunk.tokens, *[self.ids.eos] * pad, self.ids.eos]
        weights = [1.0, *chunk.multipliers, *[1.0] * pad, 1.0]
        self.chunks.append(PromptChunk(tokens, weights, [(offset + 1, emb) for offset, emb in chunk.fixes]))
        self.chunk = PromptChunk()
        self.last_comma = -1

    def _backtrack(self) -> None:
        """Move the tokens after the last comma into a new chunk."""
        cut = self.last_comma + 1
        moved = PromptChunk(self.chunk.tokens[cut:], self.chunk.multipliers[cut:],
                            [(offset - cut, emb) for offset, emb in self.chunk.fixes if offset >= cut])
        del self.chunk.tokens[cut:], self.chunk.multipliers[cut:]
        self.chunk.fixes = [(offset, emb) for offset, emb in self.chunk.fixes if offset < cut]
        self.close_chunk()
        self.chunk = moved

    def add(self, token: int, weight: float) -> None:
        full = len(self.chunk.tokens) == self.chunk_length
        if token == self.ids.comma:
            self.last_comma = len(self.chunk.tokens)
        elif (full and self.comma_backtrack > 0 and self.last_comma != -1
              and len(self.chunk.tokens) - self.last_comma <= self.comma_backtrack):
            self._backtrack()
        if len(self.chunk.tokens) == self.chunk_length:
            self.close_chunk()
        self.chunk.tokens.append(token)
        self.chunk.multipliers.append(weight)

    def add_embedding(self, first_token: int, embedding: Any, weight: float) -> None:
        """An embedding's vectors take one slot each and never cross into the next chunk (A1111)."""
        n = int(embedding.n_vectors)
        if n > self.chunk_length:
            raise ValueError(f"embedding {getattr(embedding, 'name', '?')!r} has {n} vectors; "
                             f"at most {self.chunk_length} fit in a chunk")
        self.add(first_token, weight)  # comma backtrack and the full-chunk check, as for a token
        self.chunk.tokens.pop()
        self.chunk.multipliers.pop()
        if len(self.chunk.tokens) + n > self.chunk_length:
            self.close_chunk()
        self.chunk.fixes.append((len(self.chunk.tokens), embedding))
        self.chunk.tokens.extend([EMBEDDING_PLACEHOLDER] * n)
        self.chunk.multipliers.extend([weight] * n)

    def finish(self) -> ChunkedPrompt:
        if self.chunk.tokens or not self.chunks:
            self.close_chunk(is_last=True)
        return ChunkedPrompt(tuple(self.chunks), self.token_count)


def chunk_prompt(
    fragments: Sequence[tuple[str, float] | list],
    tokenized: Sequence[Sequence[int]],
    ids: SpecialTokens,
    chunk_length: int = CHUNK_LENGTH,
    comma_backtrack: int = COMMA_BACKTRACK,
    embeddings: EmbeddingMatcher | None = None,
) -> ChunkedPrompt:
    """Chunk parsed fragments whose token ids (no BOS/EOS) are given in `tokenized`.

    `fragments[i]` is `[text, weight]`; a `["BREAK", -1]` fragment closes the current chunk.
    An empty prompt gives one chunk. `comma_backtrack=0` turns backtracking off.
    With `embeddings`, a trigger word becomes placeholder slots recorded in the chunk's `fixes`.
    """
    if len(fragments) != len(tokenized):
        raise ValueError(f"{len(fragments)} fragments but {len(tokenized)} token lists")
    packer = _Packer(ids, chunk_length, comma_backtrack)
    for (text, weight), tokens in zip(fragments, tokenized, strict=True):
        if is_break(text, weight):
            packer.close_chunk()
            continue
        position = 0
        while position < len(tokens):
            embedding, span = embeddings.match(tokens, position) if embeddings is not None else (None, 0)
            if embedding is None:
                packer.add(tokens[position], float(weight))
                position += 1
            else:
                packer.add_embedding(tokens[position], embedding, float(weight))
                position += span
    return packer.finish()


def pad_after_first_eos(tokens: Sequence[int], eos: int, pad: int = 0) -> list[int]:
    """OpenCLIP padding: every position after the first EOS becomes `pad`."""
    tokens = list(tokens)
    first = tokens.index(eos)
    return tokens[:first + 1] + [pad] * (len(tokens) - first - 1)

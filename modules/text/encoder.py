"""Chunked, weighted CLIP text encoding with A1111's semantics.

`TextConditioner` turns prompt texts into the UNet's cross-attention states (and SDXL's
pooled vector): parse emphasis -> tokenize -> chunk (see `chunking.py`) -> run every chunk
through each text encoder -> pick the hidden layer -> apply the emphasis weights ->
concatenate chunks along the token axis and encoders along the channel axis.

Layer choice per `TextEncoderSpec.layer`, as A1111 does it:
- "last" (SD1): clip skip N takes `hidden_states[-N]` then the final layer norm; N=1 is the
  normal last hidden state. Only the clip_l flavour honours clip skip: an OpenCLIP encoder whose
  last layer was already cut off (an SD2 diffusers folder) uses its last state, as A1111 does.
- "penultimate_norm" (SD2): the penultimate layer then the final norm; A1111 ignores clip skip
  for OpenCLIP, and so do we.
- "penultimate" (SDXL, both encoders): the penultimate layer without the final norm; clip skip
  is ignored unless `sdxl_clip_l_skip` is set (A1111's "Clip skip SDXL" option), which takes
  `hidden_states[-N]` (no norm) for the clip_l encoder only.

Returned tensors are float32 on the encoders' device, whatever dtype the encoders run in:
the emphasis arithmetic is done in float32 and the caller casts to the UNet's dtype.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from modules.checkpoints.model import TextEncoderSpec
from modules.errors import InvalidParams
from modules.text.chunking import (
    ChunkedPrompt,
    chunk_prompt,
    empty_chunk,
    pad_after_first_eos,
    target_token_count,
)
from modules.text.embeddings import EmbeddingLookup, injected
from modules.text.prompt_parser import parse_prompt_attention
from modules.text.tokenizer import SpecialTokens, special_tokens, tokenize_many

EMPHASIS_MODES = ("Original", "No norm", "Ignore", "None")
LAYERS = ("last", "penultimate_norm", "penultimate")

ParseFn = Callable[[str], list]


@dataclass(frozen=True)
class Conditioning:
    """Encoded texts.

    cross_attn: [B, 77 * chunks, D], float32. D is the sum of the encoders' widths (SDXL: 768 + 1280).
        Texts with fewer chunks than the longest one in the call are padded with the encoding of
        an empty chunk, as A1111 does within one batch.
    pooled: [B, Dp] float32 from the encoder whose spec has pooled=True (SDXL), taken from each
        text's first chunk; None otherwise.
    chunk_counts: how many chunks each text really uses.
    """

    cross_attn: torch.Tensor
    pooled: torch.Tensor | None
    chunk_counts: tuple[int, ...]


def apply_emphasis(z: torch.Tensor, multipliers: torch.Tensor, mode: str) -> torch.Tensor:
    """Weight hidden states [B, T, C] by per-token multipliers [B, T].

    "Original" multiplies, then rescales so the mean over the whole tensor is unchanged;
    "No norm" only multiplies; "Ignore" and "None" leave z as it is.
    """
    if mode in ("Ignore", "None"):
        return z
    if mode not in EMPHASIS_MODES:
        raise InvalidParams(f"unknown emphasis mode {mode!r}; expected one of {EMPHASIS_MODES}")
    if bool((multipliers == 1).all()):
        return z  # exactly what the formula gives, without dividing two means
    weighted = z * multipliers.to(z)[..., None]
    if mode == "No norm":
        return weighted
    return weighted * (z.mean() / weighted.mean())


def _final_norm(encoder: nn.Module) -> nn.Module:
    """The final layer norm of a CLIPTextModel or CLIPTextModelWithProjection (transformers 5.x)."""
    norm = getattr(encoder, "final_layer_norm", None)
    if norm is None:
        norm = encoder.text_model.final_layer_norm
    return norm


def _num_layers(encoder: nn.Module) -> int:
    return int(encoder.config.num_hidden_layers)


def select_hidden(encoder: nn.Module, spec: TextEncoderSpec, output, clip_skip: int,
                  sdxl_clip_l_skip: bool = False) -> torch.Tensor:
    """Pick the hidden states the UNet sees from an encoder's output (see the module docstring)."""
    hidden = output.hidden_states
    if spec.layer == "last":
        if clip_skip <= 1 or spec.flavour != "clip_l":
            return output.last_hidden_state
        return _final_norm(encoder)(hidden[-clip_skip])
    if spec.layer == "penultimate_norm":
        return _final_norm(encoder)(hidden[-2])
    if spec.layer == "penultimate":
        if sdxl_clip_l_skip and spec.flavour == "clip_l":
            return hidden[-clip_skip]
        return hidden[-2]
    raise ValueError(f"unknown text encoder layer {spec.layer!r}; expected one of {LAYERS}")


class TextConditioner:
    """A model's text encoders with A1111's prompt chunking, emphasis and clip skip.

    encoders: transformers CLIPTextModel / CLIPTextModelWithProjection, one per spec, in the
        order their states are concatenated (SDXL: clip_l, then clip_g).
    tokenizer: the shared CLIP tokenizer (`modules.text.tokenizer.load_tokenizer()`).
    parse: `text -> [[fragment, weight], ...]`; defaults to `prompt_parser.parse_prompt_attention`.
    Nothing is cached here: the caller keeps the encodings of texts it reuses across steps.
    """

    def __init__(self, encoders: Sequence[nn.Module], specs: Sequence[TextEncoderSpec], tokenizer,
                 parse: ParseFn | None = None) -> None:
        if not encoders or len(encoders) != len(specs):
            raise ValueError(f"need one spec per text encoder, got {len(encoders)} encoders and {len(specs)} specs")
        for encoder, spec in zip(encoders, specs, strict=True):
            if spec.layer not in LAYERS:
                raise ValueError(f"unknown text encoder layer {spec.layer!r}; expected one of {LAYERS}")
            if spec.pooled and not hasattr(encoder, "text_projection"):
                raise ValueError("a pooled text encoder must be a CLIPTextModelWithProjection")
        self.encoders = list(encoders)
        self.specs = list(specs)
        self.tokenizer = tokenizer
        self.ids: SpecialTokens = special_tokens(tokenizer)
        self.parse = parse if parse is not None else parse_prompt_attention

    # -- tokens -------------------------------------------------------------------------------
    def chunk(self, text: str, emphasis: str = "Original", embeddings: EmbeddingLookup | None = None
              ) -> ChunkedPrompt:
        """Parse (unless emphasis is "None"), tokenize and chunk one prompt text (trigger words of `embeddings`)."""
        if emphasis not in EMPHASIS_MODES:
            raise InvalidParams(f"unknown emphasis mode {emphasis!r}; expected one of {EMPHASIS_MODES}")
        fragments = [[text, 1.0]] if emphasis == "None" else self.parse(text)
        texts = [frag[0] for frag in fragments]
        return chunk_prompt(fragments, tokenize_many(self.tokenizer, texts), self.ids,
                            embeddings=embeddings or None)

    def count_tokens(self, text: str, emphasis: str = "Original", embeddings: EmbeddingLookup | None = None
                     ) -> tuple[int, int]:
        """A1111's token counter for one (already schedule-expanded) text: (used, capacity), e.g. (80, 150)."""
        count = self.chunk(text, emphasis, embeddings).token_count
        return count, target_token_count(count)

    # -- encoding -----------------------------------------------------------------------------
    def encode(self, texts: Sequence[str], clip_skip: int = 1, emphasis: str = "Original",
               sdxl_clip_l_skip: bool = False, embeddings: EmbeddingLookup | None = None) -> Conditioning:
        """Encode a batch of prompt texts (identical texts are chunked once).

        As in A1111, "Original" emphasis restores the mean over the whole batch at each chunk
        index, so a weighted text's result can depend on the other texts of the call; encode one
        text per call (as the pipeline does) for batch-independent results.
        """
        if isinstance(texts, str):
            raise TypeError("encode() takes a list of texts")
        chunked: dict[str, ChunkedPrompt] = {}
        for text in texts:
            if text not in chunked:
                chunked[text] = self.chunk(text, emphasis, embeddings)
        return self.encode_chunks([chunked[t] for t in texts], clip_skip, emphasis, sdxl_clip_l_skip)

    def encode_chunks(self, prompts: Sequence[ChunkedPrompt], clip_skip: int = 1, emphasis: str = "Original",
                      sdxl_clip_l_skip: bool = False) -> Conditioning:
        """Encode already chunked prompts; every chunk of every prompt goes through one forward pass."""
        if not prompts:
            raise ValueError("nothing to encode")
        if emphasis not in EMPHASIS_MODES:
            raise InvalidParams(f"unknown emphasis mode {emphasis!r}; expected one of {EMPHASIS_MODES}")
        n_chunks = max(len(p.chunks) for p in prompts)
        padded = [list(p.chunks) + [empty_chunk(self.ids)] * (n_chunks - len(p.chunks)) for p in prompts]
        # chunk-major order: rows [i*B:(i+1)*B] are chunk i of every prompt, as A1111 batches them
        ordered = [prompt[i] for i in range(n_chunks) for prompt in padded]
        tokens = [c.tokens for c in ordered]
        fixes = [c.fixes for c in ordered]
        weights = torch.tensor([c.multipliers for c in ordered], dtype=torch.float32)
        states, pooled = [], None
        for index, (encoder, spec) in enumerate(zip(self.encoders, self.specs, strict=True)):
            with injected(encoder, index, fixes):
                z, pool = self._run(encoder, spec, tokens, clip_skip, sdxl_clip_l_skip)
            z = self._weight(z, weights.to(z.device), len(prompts), n_chunks, emphasis)
            states.append(z)
            if spec.pooled:
                pooled = pool[:len(prompts)]  # the first chunk of each prompt
        return Conditioning(torch.cat(states, dim=-1), pooled, tuple(len(p.chunks) for p in prompts))

    def _run(self, encoder: nn.Module, spec: TextEncoderSpec, tokens: list[list[int]], clip_skip: int,
             sdxl_clip_l_skip: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One forward pass over all chunks: float32 states [N, 77, C] and, if pooled, [N, Dp]."""
        if not 1 <= clip_skip <= _num_layers(encoder):
            raise InvalidParams(f"clip skip must be between 1 and {_num_layers(encoder)}, got {clip_skip}")
        if spec.pad_with_zero:
            tokens = [pad_after_first_eos(t, self.ids.eos) for t in tokens]
        device = next(encoder.parameters()).device
        ids = torch.tensor(tokens, dtype=torch.long, device=device)
        need_hidden = spec.layer != "last" or (clip_skip > 1 and spec.flavour == "clip_l")
        with torch.no_grad():  # not inference_mode: callers may still edit the result in place
            out = encoder(input_ids=ids, output_hidden_states=need_hidden)
            z = select_hidden(encoder, spec, out, clip_skip, sdxl_clip_l_skip)
            pooled = out.text_embeds.float() if spec.pooled else None
        return z.float(), pooled

    @staticmethod
    def _weight(z: torch.Tensor, weights: torch.Tensor, batch: int, n_chunks: int, emphasis: str) -> torch.Tensor:
        """Emphasis per chunk index over the whole batch (A1111's means), then chunks -> tokens."""
        _, length, width = z.shape
        z = z.reshape(n_chunks, batch, length, width)
        weights = weights.reshape(n_chunks, batch, length)
        z = torch.stack([apply_emphasis(z[i], weights[i], emphasis) for i in range(n_chunks)])
        return z.permute(1, 0, 2, 3).reshape(batch, n_chunks * length, width)

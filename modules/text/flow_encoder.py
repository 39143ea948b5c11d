"""FLUX.1 and SD3.5 text conditioning: CLIP pooled vectors plus T5-XXL token states.

What each encoder sees (the choice, documented in docs/flux-sd3.md):
- T5 gets A1111 emphasis. Each `(text:w)` fragment is tokenized on its own, without special
  tokens, and the ids are joined (as Forge's T5 engine does); `</s>` ends the prompt and `<pad>`
  fills it to the family's length (FLUX.1-dev and SD3.5: 512 at most, schnell 256). Tokens past
  the limit are dropped, as diffusers truncates. Emphasis "Original" scales the states by the
  weights and restores their mean. BREAK has no meaning for T5 (no 75-token chunks) and is removed.
- CLIP-L / CLIP-G get the prompt text with the markup removed, in one 77-token window.
  FLUX uses CLIP-L's pooled output only; SD3 joins both CLIPs' penultimate states (padded to
  T5's width) before the T5 states and concatenates their projected pooled outputs.
- AND works at the sampler (composable prompts), unchanged.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from modules.text import prompt_parser
from modules.text.encoder import apply_emphasis

T5_TOKENIZER_DIR = Path(__file__).resolve().parent / "tokenizer_t5"
T5_EOS = 1
T5_PAD = 0
CLIP_LENGTH = 77


def load_t5_tokenizer(path: Path | str = T5_TOKENIZER_DIR):
    """The bundled T5 v1.1 tokenizer (a `tokenizers.Tokenizer`), offline; see tools/make_t5_tokenizer.py."""
    from tokenizers import Tokenizer

    file = Path(path) / "tokenizer.json"
    if not file.is_file():
        raise FileNotFoundError(f"T5 tokenizer file {file} is missing; run tools/make_t5_tokenizer.py")
    return Tokenizer.from_file(str(file))


def folder_t5_tokenizer(model_folder: Path | None, family) -> Path | None:
    """A diffusers folder's own T5 tokenizer (`tokenizer_2/` for FLUX, `tokenizer_3/` for SD3), which wins."""
    if model_folder is None:
        return None
    sub = Path(model_folder) / ("tokenizer_2" if family.transformer == "flux" else "tokenizer_3")
    return sub if (sub / "tokenizer.json").is_file() else None


def fragments(text: str, emphasis: str) -> list[tuple[str, float]]:
    """(text, weight) pieces of a prompt; BREAK markers dropped; one piece when emphasis is "None"."""
    if emphasis == "None":
        return [(text, 1.0)]
    parsed = prompt_parser.parse_prompt_attention(text)
    return [(t, float(w)) for t, w in parsed if not (t == prompt_parser.BREAK_MARKER and w == prompt_parser.BREAK_WEIGHT)]


def t5_tokens(tokenizer, text: str, emphasis: str, pad_to: int, limit: int) -> tuple[list[int], list[float]]:
    """T5 ids and per-token weights: fragments tokenized alone, joined, cut at `limit - 1`, `</s>`, padded."""
    ids: list[int] = []
    weights: list[float] = []
    parts = fragments(text, emphasis)
    encoded = tokenizer.encode_batch([t for t, _ in parts], add_special_tokens=False) if parts else []
    for enc, (_, weight) in zip(encoded, parts, strict=True):
        ids.extend(enc.ids)
        weights.extend([weight] * len(enc.ids))
    ids, weights = ids[:limit - 1] + [T5_EOS], weights[:limit - 1] + [1.0]
    length = max(pad_to, len(ids))
    return ids + [T5_PAD] * (length - len(ids)), weights + [1.0] * (length - len(weights))


@dataclass(frozen=True)
class FlowEncoded:
    cross_attn: torch.Tensor  # [B, T, D] float32
    pooled: torch.Tensor  # [B, P] float32


class FlowTextConditioner:
    """Encodes prompts for a flow-matching family (same `encode` shape as `TextConditioner`)."""

    def __init__(self, encoders: Sequence[nn.Module], family, clip_tokenizer, model_folder: Path | None = None) -> None:
        self.family = family
        self.encoders = dict(zip(family.text_encoders, encoders, strict=True))
        self.clip_tokenizer = clip_tokenizer
        self.t5_tokenizer = load_t5_tokenizer(folder_t5_tokenizer(model_folder, family) or T5_TOKENIZER_DIR)

    def encode(self, texts: Sequence[str], clip_skip: int = 1, emphasis: str = "Original",
               embeddings=None) -> FlowEncoded:
        states, pooled = [], []
        for text in texts:
            s, p = self._encode_one(text, emphasis)
            states.append(s)
            pooled.append(p)
        return FlowEncoded(torch.cat(states), torch.cat(pooled))

    def _clip_ids(self, text: str, pad_with_zero: bool, device: torch.device) -> torch.Tensor:
        tok = self.clip_tokenizer
        ids = tok(text, padding="max_length", max_length=CLIP_LENGTH, truncation=True)["input_ids"]
        if pad_with_zero:
            end = ids.index(tok.eos_token_id) + 1
            ids = ids[:end] + [0] * (CLIP_LENGTH - end)
        return torch.tensor([ids], device=device)

    def _encode_one(self, text: str, emphasis: str) -> tuple[torch.Tensor, torch.Tensor]:
        plain = "".join(t for t, _ in fragments(text, emphasis))
        t5 = self.encoders["t5xxl"]
        device = next(self.encoders["clip_l"].parameters()).device  # T5's may be meta (freed after encoding)
        pad_to, limit = self.family.t5_tokens
        ids, weights = t5_tokens(self.t5_tokenizer, text, emphasis, pad_to, limit)
        z = t5(input_ids=torch.tensor([ids], device=device)).last_hidden_state.float()
        z = apply_emphasis(z, torch.tensor([weights], device=z.device), emphasis)
        if self.family.transformer == "flux":
            clip = self.encoders["clip_l"]
            pooled = clip(input_ids=self._clip_ids(plain, False, device)).pooler_output.float()
            return z, pooled
        hidden, pooled = [], []
        for name in ("clip_l", "clip_g"):
            out = self.encoders[name](input_ids=self._clip_ids(plain, name == "clip_g", device),
                                      output_hidden_states=True)
            hidden.append(out.hidden_states[-2].float())
            pooled.append(out.text_embeds.float())
        clip_states = torch.cat(hidden, dim=-1)
        clip_states = F.pad(clip_states, (0, z.shape[-1] - clip_states.shape[-1]))
        return torch.cat([clip_states, z], dim=-2), torch.cat(pooled, dim=-1)

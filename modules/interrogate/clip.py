"""A1111's CLIP interrogator: a BLIP caption, then the best CLIP matches from each word list.

Both models are transformers models in Hugging Face folder layout (config.json, model.safetensors
and the tokenizer files), read from local folders only and as safetensors only (no pickle):
- BLIP: `BlipForConditionalGeneration` (Salesforce/blip-image-captioning-base or -large);
- CLIP: `CLIPModel` (openai/clip-vit-large-patch14, the ViT-L/14 A1111 uses).
The result is "caption, match, match, ...": for each list (a text file, one entry a line, in
name order) the `topn` entries whose text embedding is most similar to the image's, ranked
as A1111 does (softmax over 100 x cosine similarity).
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from modules.errors import CheckpointError
from modules.interrogate.options import InterrogateOptions

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's; BLIP uses the same
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TEXT_BATCH = 256  # list entries encoded per forward pass
CACHED_LISTS = 16  # lists whose text features a Ranker keeps (they rarely change between calls)
_TOPN = re.compile(r"\.top(\d+)$")
ORDER = ("artists", "mediums", "movements", "flavors")  # "caption, by artist, medium, movement, flavors"


@dataclass(frozen=True)
class Category:
    name: str
    topn: int
    items: tuple[str, ...]


def _order(path: Path) -> tuple[int, str]:
    name = _TOPN.sub("", path.stem)
    return (ORDER.index(name) if name in ORDER else len(ORDER), path.name)


def read_categories(folder: Path, options: InterrogateOptions) -> list[Category]:
    """The lists in `folder` (*.txt; "flavors.top3.txt" keeps 3 matches), A1111's four in ORDER, then
    others by name; skipped categories (by name, "flavors", or file stem) are left out."""
    found = []
    for path in sorted(Path(folder).glob("*.txt"), key=_order):
        name = _TOPN.sub("", path.stem)
        if {name, path.stem} & set(options.interrogate_clip_skip_categories):
            continue
        m = _TOPN.search(path.stem)
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        lines = [line for line in lines if line]
        if options.interrogate_clip_dict_limit:
            lines = lines[:options.interrogate_clip_dict_limit]
        if lines:
            found.append(Category(name, int(m.group(1)) if m else 1, tuple(lines)))
    return found


def _normalised(image: Image.Image, size: tuple[int, int]) -> torch.Tensor:
    """RGB resized (bicubic) to `size` (w, h) -> (1, 3, h, w), normalised with CLIP's mean and std."""
    array = np.asarray(image.convert("RGB").resize(size, Image.Resampling.BICUBIC), dtype=np.float32) / 255
    array = (array - np.array(CLIP_MEAN, dtype=np.float32)) / np.array(CLIP_STD, dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0)


def blip_pixels(image: Image.Image, size: int) -> torch.Tensor:
    """BLIP's input: the whole image squeezed to size x size."""
    return _normalised(image, (size, size))


def clip_pixels(image: Image.Image, size: int) -> torch.Tensor:
    """CLIP's input: shortest side to `size`, then the centre size x size crop."""
    image = image.convert("RGB")
    scale = size / min(image.size)
    w, h = max(size, int(image.width * scale)), max(size, int(image.height * scale))
    image = image.resize((w, h), Image.Resampling.BICUBIC)
    left, top = (w - size) // 2, (h - size) // 2
    return _normalised(image.crop((left, top, left + size, top + size)), (size, size))


def _from_pretrained(cls: Any, folder: Path, what: str, **kwargs: Any) -> Any:
    try:
        return cls.from_pretrained(folder, local_files_only=True, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise CheckpointError(f"{what} in {folder} cannot be loaded ({type(err).__name__}: {str(err)[:300]}). "
                              "It must be a Hugging Face folder with config.json, model.safetensors and "
                              "the tokenizer files.") from None


@dataclass
class Captioner:
    """BLIP: image -> caption."""

    model: Any
    tokenizer: Any

    @classmethod
    def load(cls, folder: Path) -> Captioner:
        from transformers import AutoTokenizer, BlipForConditionalGeneration

        model = _from_pretrained(BlipForConditionalGeneration, folder, "The BLIP model", use_safetensors=True)
        return cls(model.eval().requires_grad_(False), _from_pretrained(AutoTokenizer, folder, "BLIP's tokenizer"))

    @torch.no_grad()
    def caption(self, image: Image.Image, options: InterrogateOptions) -> str:
        param = next(self.model.parameters())
        pixels = blip_pixels(image, self.model.config.vision_config.image_size).to(param.device, param.dtype)
        ids = self.model.generate(pixel_values=pixels, do_sample=False,
                                  num_beams=options.interrogate_clip_num_beams,
                                  min_length=options.interrogate_clip_min_length,
                                  max_length=options.interrogate_clip_max_length)
        return self.tokenizer.decode(ids[0], skip_special_tokens=True).strip()


@dataclass
class Ranker:
    """CLIP: ranks text entries by similarity to an image. A list's text features are computed once."""

    model: Any
    tokenizer: Any
    cache: dict[tuple[str, ...], torch.Tensor] = field(default_factory=dict)  # texts -> features (CPU)

    @classmethod
    def load(cls, folder: Path) -> Ranker:
        from transformers import CLIPModel, CLIPTokenizer

        model = _from_pretrained(CLIPModel, folder, "The CLIP model", use_safetensors=True)
        return cls(model.eval().requires_grad_(False), _from_pretrained(CLIPTokenizer, folder, "CLIP's tokenizer"))

    @torch.no_grad()
    def image_features(self, image: Image.Image) -> torch.Tensor:
        """(1, D), unit length."""
        param = next(self.model.parameters())
        pixels = clip_pixels(image, self.model.config.vision_config.image_size).to(param.device, param.dtype)
        pooled = self.model.vision_model(pixel_values=pixels).pooler_output
        features = self.model.visual_projection(pooled).float()
        return features / features.norm(dim=-1, keepdim=True)

    def text_features(self, texts: Sequence[str]) -> torch.Tensor:
        """(len(texts), D), unit length, on the CPU; cached by the texts."""
        key = tuple(texts)
        if key not in self.cache:
            if len(self.cache) >= CACHED_LISTS:
                self.cache.pop(next(iter(self.cache)))
            self.cache[key] = self.encode_texts(key).cpu()
        return self.cache[key]

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """(len(texts), D), unit length; texts longer than CLIP's context are truncated."""
        device = next(self.model.parameters()).device
        limit = self.model.config.text_config.max_position_embeddings
        out = []
        for start in range(0, len(texts), TEXT_BATCH):
            tokens = self.tokenizer(list(texts[start:start + TEXT_BATCH]), padding=True, truncation=True,
                                    max_length=limit, return_tensors="pt").to(device)
            pooled = self.model.text_model(input_ids=tokens["input_ids"],
                                           attention_mask=tokens["attention_mask"]).pooler_output
            out.append(self.model.text_projection(pooled).float())
        features = torch.cat(out)
        return features / features.norm(dim=-1, keepdim=True)

    def rank(self, image_features: torch.Tensor, texts: Sequence[str], top: int) -> list[tuple[str, float]]:
        """The `top` best entries with their scores (percent of the softmax over 100 x cosine)."""
        text_features = self.text_features(texts).to(image_features.device)
        probs = (100.0 * image_features @ text_features.T).softmax(dim=-1)[0].cpu()
        values, indices = probs.topk(min(top, len(texts)))
        return [(texts[i], float(v) * 100) for v, i in zip(values.tolist(), indices.tolist(), strict=True)]


def interrogate_clip(captioner: Captioner, ranker: Ranker, categories: Sequence[Category], image: Image.Image,
                     options: InterrogateOptions) -> str:
    """"caption, best of list 1, best of list 2, ..." (with ranks: "(entry:0.123)")."""
    parts = [captioner.caption(image, options)]
    features = ranker.image_features(image)
    for category in categories:
        for text, score in ranker.rank(features, category.items, category.topn):
            parts.append(f"({text}:{score / 100:.3f})" if options.interrogate_return_ranks else text)
    return ", ".join(p for p in parts if p)

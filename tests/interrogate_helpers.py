"""Tiny random-weight interrogation models, written in the layouts users download.

BLIP and CLIP are Hugging Face folders saved by transformers' own `save_pretrained` (as
Salesforce/blip-image-captioning-* and openai/clip-vit-* ship them). The DeepDanbooru file is a
torch state dict with `n_Conv_*` keys and a `tags` list, as model-resnet_custom_v3.pt is; its
layout is written out here from the network's published structure, not from Atelier's loader.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
CLIP_TOKENIZER = REPO / "modules" / "text" / "tokenizer"
WORDS = ["a", "cat", "dog", "on", "the", "red", "blue", "house", "tree", "sky", "photo", "of", "with", "and"]
TAGS = ["1girl", "solo", "long_hair", "smile", "blue_(color)", "open_mouth", "rating:safe", "outdoors"]


def write_blip(folder: Path, seed: int = 0) -> Path:
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration

    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", *WORDS]
    tokenizer = BertTokenizer(vocab={token: i for i, token in enumerate(vocab)}, bos_token="[DEC]")
    tokenizer.save_pretrained(folder)
    text = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=5,
                sep_token_id=3, eos_token_id=3)
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
                  image_size=32, patch_size=8)
    torch.manual_seed(seed)
    model = BlipForConditionalGeneration(BlipConfig(text_config=text, vision_config=vision))
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def write_clip(folder: Path, seed: int = 0) -> Path:
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    CLIPTokenizer(str(CLIP_TOKENIZER / "vocab.json"), str(CLIP_TOKENIZER / "merges.txt")).save_pretrained(folder)
    text = dict(vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
                  image_size=32, patch_size=8)
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def deepdanbooru_layout() -> list[tuple[int, int, int, str]]:
    """(conv number, kernel, stride, role) of resnet_custom_v3, from its stage plan:
    stages of 3, 8, 40, 3, 3 bottlenecks; stage 3 halves again at its 21st block."""
    convs = [(0, 7, 2, "stem")]
    n = 1
    for stage, count in enumerate((3, 8, 40, 3, 3)):
        for i in range(count):
            first = i == 0
            mid = stage == 2 and i == 20
            stride = 2 if (first and stage > 0) or mid else 1
            if first:
                convs.append((n, 1, stride, "proj"))
                n += 1
            convs += [(n, 1, 1, "reduce"), (n + 1, 3, stride, "mid"), (n + 2, 1, 1, "expand")]
            n += 3
            if mid:
                convs.append((n, 1, stride, "proj"))
                n += 1
    convs.append((n, 1, 1, "head"))
    return convs


def write_deepdanbooru(path: Path, width: int = 4, seed: int = 0, tags: list[str] | None = None) -> Path:
    """A resnet_custom_v3 state dict with every stage `width` channels wide (x4 after expansion)."""
    tags = list(TAGS if tags is None else tags)
    gen = torch.Generator().manual_seed(seed)
    sd: dict = {}
    channels = 3
    for number, kernel, _, role in deepdanbooru_layout():
        if role == "stem":
            out = width
        elif role == "proj":
            out, source = width * 4, channels
        elif role == "reduce":
            source, out = channels, width
        elif role == "mid":
            out = width
        elif role == "expand":
            out = width * 4
        else:
            out = len(tags)
        in_ch = source if role == "proj" else channels
        gain = {"expand": 0.2, "head": 0.05}.get(role, 1.0)  # residuals stay tame: scores spread over (0, 1)
        sd[f"n_Conv_{number}.weight"] = (torch.randn(out, in_ch, kernel, kernel, generator=gen)
                                         * gain * (2 / (in_ch * kernel ** 2)) ** 0.5)
        if role != "head":
            sd[f"n_Conv_{number}.bias"] = torch.randn(out, generator=gen) * 0.1
        if role != "proj":
            channels = out
        if role == "expand":
            channels = width * 4
    sd["tags"] = tags
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(sd, path)
    return path


def install_models(models_dir: Path, which: tuple[str, ...] = ("blip", "clip", "deepdanbooru")) -> Path:
    """The interrogation models under `models_dir` where Atelier looks for them."""
    if "blip" in which:
        write_blip(models_dir / "BLIP" / "tiny-blip")
    if "clip" in which:
        write_clip(models_dir / "CLIP" / "tiny-clip")
    if "deepdanbooru" in which:
        write_deepdanbooru(models_dir / "torch_deepdanbooru" / "model-resnet_custom_v3.pt")
    return models_dir


def remove_models(models_dir: Path) -> None:
    for name in ("BLIP", "CLIP", "torch_deepdanbooru"):
        shutil.rmtree(models_dir / name, ignore_errors=True)

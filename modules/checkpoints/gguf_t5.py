"""T5 text encoders stored as GGUF (llama.cpp's layout, as in city96's `t5-v1_1-xxl-encoder-Q8_0.gguf`).

llama.cpp names the encoder's tensors `token_embd.weight`, `enc.blk.N.attn_q.weight`, ...,
`enc.output_norm.weight` under `general.architecture` "t5encoder" (or "t5" for a whole
encoder-decoder, whose `dec.*` tensors are dropped here). They are renamed to transformers'
`T5EncoderModel` keys (`shared.weight`, `encoder.block.N.layer.0.SelfAttention.q.weight`, ...);
quantized tensors stay `PackedTensor`s, so the encoder keeps its blocks in memory and restores
each weight per layer, as the UNet / transformer path does.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from modules.checkpoints.gguf_file import GGUFContents, inspect_gguf, read_gguf
from modules.checkpoints.packed import PackedTensor
from modules.checkpoints.quantized import _LABELS, tensor_family
from modules.errors import CheckpointError

T5_ARCHES = ("t5encoder", "t5")
# llama.cpp's per-block T5 encoder tensor names -> transformers' names within `encoder.block.N.`
_BLOCK = {"attn_norm": "layer.0.layer_norm", "attn_q": "layer.0.SelfAttention.q",
          "attn_k": "layer.0.SelfAttention.k", "attn_v": "layer.0.SelfAttention.v",
          "attn_o": "layer.0.SelfAttention.o", "attn_rel_b": "layer.0.SelfAttention.relative_attention_bias",
          "ffn_norm": "layer.1.layer_norm", "ffn_gate": "layer.1.DenseReluDense.wi_0",
          "ffn_up": "layer.1.DenseReluDense.wi_1", "ffn_down": "layer.1.DenseReluDense.wo"}
_TOP = {"token_embd": "shared", "enc.output_norm": "encoder.final_layer_norm"}
_BLOCK_NAME = re.compile(r"enc\.blk\.(\d+)\.(\w+)\.(weight|bias)$")
Tensors = dict[str, torch.Tensor | PackedTensor]


def transformers_name(name: str) -> str | None:
    """transformers' key for a llama.cpp T5 tensor name; None for decoder tensors; unknown names unchanged."""
    if name.startswith("dec.") or name == "output.weight":  # a whole T5's decoder and LM head
        return None
    stem, _, leaf = name.rpartition(".")
    if stem in _TOP:
        return f"{_TOP[stem]}.{leaf}"
    match = _BLOCK_NAME.match(name)
    if match and match.group(2) in _BLOCK:
        return f"encoder.block.{match.group(1)}.{_BLOCK[match.group(2)]}.{match.group(3)}"
    return name


def is_t5_gguf(contents: GGUFContents) -> bool:
    if contents.architecture is not None:
        return contents.architecture in T5_ARCHES
    return "token_embd.weight" in contents.tensors and any(k.startswith("enc.blk.") for k in contents.tensors)


def _what_it_is(contents: GGUFContents) -> str:
    family = tensor_family(contents.tensors, contents.architecture)
    arch = f"architecture {contents.architecture!r}" if contents.architecture else "no named architecture"
    return f"{arch} ({_LABELS[family]})" if family else arch


def check_t5_contents(contents: GGUFContents, path: Path) -> None:
    """CheckpointError naming the file and both architectures unless `contents` is a T5 encoder."""
    if is_t5_gguf(contents):
        if "token_embd.weight" not in contents.tensors:
            raise CheckpointError(f"{Path(path).name} is a T5 GGUF without token_embd.weight; the file is "
                                  "incomplete. Download it again.")
        return
    raise CheckpointError(f"{Path(path).name} was given as the T5 text encoder, but it is a GGUF of "
                          f"{_what_it_is(contents)}, not a T5 encoder (architecture 't5encoder', e.g. "
                          "t5-v1_1-xxl-encoder-Q8_0.gguf). Choose a T5 file (GGUF or t5xxl_fp16.safetensors); "
                          "transformer and UNet files go in models/unet.")


def _renamed(tensors: Tensors) -> Tensors:
    out: Tensors = {}
    for name, tensor in tensors.items():
        key = transformers_name(name)
        if key is not None:
            out[key] = tensor
    return out


def t5_gguf_shapes(path: Path) -> Tensors:
    """A T5 GGUF's tensors under transformers' names, as meta tensors (header only, every entry checked)."""
    contents = inspect_gguf(Path(path))
    check_t5_contents(contents, path)
    return _renamed(contents.tensors)


def read_t5_gguf(path: Path) -> Tensors:
    """A T5 GGUF's tensors under transformers' names; quantized ones stay packed."""
    contents = read_gguf(Path(path))
    check_t5_contents(contents, path)
    return _renamed(contents.tensors)


def gguf_encoder_kind(path: Path) -> str:
    """'t5xxl' for a T5 GGUF; CheckpointError (naming both architectures) for any other GGUF."""
    t5_gguf_shapes(path)
    return "t5xxl"

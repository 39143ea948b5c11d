"""LoRA file keys -> (patch target, module name) of the loaded diffusers / transformers model.

Files name layers in several ways:
- kohya / A1111: `lora_unet_<flat name>.<param>`, `lora_te_` (SD1/SD2), `lora_te1_` / `lora_te2_` (SDXL),
  where the flat name is a module path with "." replaced by "_", in diffusers naming
  (`down_blocks_0_attentions_0_...`, kohya's SD1/SD2 trainers) or in the original ldm naming
  (`input_blocks_4_1_...`, SDXL and ldm-trained files);
- FLUX.1 / SD3.5 (see flow.py): kohya `lora_unet_double_blocks_0_img_attn_qkv` (original module names) or
  `lora_transformer_` + diffusers names, `lora_te1_` CLIP-L, `lora_te2_` CLIP-G, `lora_te3_` T5; dotted
  `transformer.` (diffusers names), `diffusion_model.` (BFL / ComfyUI, original names), `text_encoder_3.` (T5);
- diffusers / PEFT: dotted paths under `unet.`, `text_encoder.`, `text_encoder_2.`, with
  `.lora_A.weight` / `.lora_B.weight`, `.lora.down.weight` / `.lora.up.weight`, or the old
  attention-processor names (`attn1.processor.to_q_lora.down.weight`).
An index maps every flat spelling of every weighted module to its real name.
"""
from __future__ import annotations

import re
from typing import Any

import torch

KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_transformer_": "unet", "lora_te_": "te0", "lora_te1_": "te0",
                  "lora_te2_": "te1", "lora_te3_": "t5"}
DOTTED_PREFIXES = {"unet.": "unet", "transformer.": "unet", "diffusion_model.": "unet",
                   "model.diffusion_model.": "unet", "text_encoder.": "te0", "text_encoder_2.": "te1",
                   "text_encoder_3.": "t5"}
# dotted parameter suffixes -> our names
DOTTED_PARAMS = {".lora_A.weight": "lora_down.weight", ".lora_B.weight": "lora_up.weight",
                 ".lora.down.weight": "lora_down.weight", ".lora.up.weight": "lora_up.weight",
                 "_lora.down.weight": "lora_down.weight", "_lora.up.weight": "lora_up.weight",
                 ".lora_down.weight": "lora_down.weight", ".lora_up.weight": "lora_up.weight",
                 ".alpha": "alpha"}
_RESNET = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
           "conv_shortcut": "skip_connection", "norm1": "in_layers.0", "norm2": "out_layers.0"}
_TOP = {"conv_in": "input_blocks.0.0", "conv_out": "out.2", "conv_norm_out": "out.0",
        "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
        "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}


def _resnet_rest(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return ".".join(p for p in (_RESNET.get(head, head), tail) if p)


def ldm_unet_name(name: str, config: Any) -> str | None:
    """A diffusers UNet module path in the original ldm naming, or None when it has no ldm twin."""
    for diffusers_name, ldm in _TOP.items():
        if name == diffusers_name:
            return ldm
    lpb = int(config.layers_per_block)
    parts = name.split(".")
    if parts[0] == "down_blocks" and len(parts) >= 4:
        block, kind, index, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
        if kind == "downsamplers":
            return f"input_blocks.{(block + 1) * (lpb + 1)}.0.op"
        slot = 1 + block * (lpb + 1) + index
        return f"input_blocks.{slot}.0.{_resnet_rest(rest)}" if kind == "resnets" else f"input_blocks.{slot}.1.{rest}"
    if parts[0] == "mid_block" and len(parts) >= 3:
        kind, index, rest = parts[1], int(parts[2]), ".".join(parts[3:])
        if kind == "attentions":
            return f"middle_block.1.{rest}"
        return f"middle_block.{0 if index == 0 else 2}.{_resnet_rest(rest)}"
    if parts[0] == "up_blocks" and len(parts) >= 4:
        block, kind, index, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
        if kind == "upsamplers":
            has_attention = "CrossAttn" in config.up_block_types[block]
            return f"output_blocks.{block * (lpb + 1) + lpb}.{2 if has_attention else 1}.{rest}"
        slot = block * (lpb + 1) + index
        return f"output_blocks.{slot}.0.{_resnet_rest(rest)}" if kind == "resnets" else f"output_blocks.{slot}.1.{rest}"
    return None


def _flat(name: str) -> str:
    return name.strip(".").replace(".", "_")


def module_index(patch: Any) -> dict[str, dict[str, str]]:
    """Per target: every flat spelling (diffusers, ldm, with/without `text_model_`) -> module name."""
    index: dict[str, dict[str, str]] = {}
    for target in patch.targets:
        names: dict[str, str] = {}
        config = patch.config(target)
        for name, module in patch.modules(target).items():
            if not isinstance(getattr(module, "weight", None), torch.Tensor) or not name:
                continue
            names[_flat(name)] = name
            if target == "unet" and "layers_per_block" in (config or {}):  # a UNet (not FLUX / SD3)
                ldm = ldm_unet_name(name, config)
                if ldm:
                    names.setdefault(_flat(ldm), name)
            else:
                bare = name[len("text_model."):] if name.startswith("text_model.") else name
                names.setdefault(_flat("text_model." + bare), name)
                names.setdefault(_flat(bare), name)
        index[target] = names
    return index


_PROCESSOR = re.compile(r"\.processor\.(to_q|to_k|to_v|to_out)$")


def split_key(key: str) -> tuple[str, str, str] | None:
    """A file key -> (target, flat module name, parameter name), or None if it names no known target."""
    for prefix, target in sorted(KOHYA_PREFIXES.items(), key=lambda kv: -len(kv[0])):
        if key.startswith(prefix):
            module, _, param = key[len(prefix):].partition(".")
            return target, module, param
    body = key.removeprefix("base_model.model.")
    target = "unet"
    for prefix, candidate in DOTTED_PREFIXES.items():
        if body.startswith(prefix):
            target, body = candidate, body[len(prefix):]
            break
    for suffix, param in DOTTED_PARAMS.items():
        if body.endswith(suffix):
            module = _PROCESSOR.sub(lambda m: "." + m.group(1), body[:-len(suffix)])
            module = module[:-len(".to_out")] + ".to_out.0" if module.endswith(".to_out") else module
            return target, _flat(module), param
    module, _, param = body.rpartition(".")
    if module and param.startswith(("hada_", "lokr_")):  # dotted LyCORIS: <module>.hada_w1_a
        return target, _flat(module), param
    return None


def resolve_target(label: str, patch: Any) -> str | None:
    """A file's target label -> the patch target.

    SD: `te0` / `te1` by position. FLUX.1 / SD3.5 (whose encoders include T5): by encoder, `te0` CLIP-L,
    `te1` CLIP-G (FLUX has none: diffusers' `text_encoder_2` is its T5), `t5` T5-XXL.
    """
    if label == "unet":
        return label
    flavours = patch.text_encoder_flavours()
    if "t5xxl" not in flavours:
        return label if label in patch.targets else None
    wanted = {"te0": ("clip_l",), "te1": ("clip_g", "t5xxl"), "t5": ("t5xxl",)}.get(label, ())
    for flavour in wanted:
        if flavour in flavours:
            return f"te{flavours.index(flavour)}"
    return None


def original_index(patch: Any) -> dict[str, dict[str, torch.Tensor]]:
    """FLUX.1 / SD3.5: flat original-layout names (`double_blocks_0_img_attn_qkv`) -> {module: rows}."""
    return {_flat(name): parts for name, parts in patch.original_layout("unet").items()}


_UNETS = "SD 1.x / 2.x / SDXL"
_LORA_ARCHES = (("FLUX.1", ("double_blocks", "single_blocks", "single_transformer_blocks")),
                ("SD3 / SD3.5", ("joint_blocks", "context_block")),
                (_UNETS, ("down_blocks", "up_blocks", "mid_block", "input_blocks", "output_blocks", "middle_block",
                          "lora_te_", "lora_te2_text_model")))
_MODEL_NAMES = {"sd1": "SD 1.x", "sd1-inpaint": "SD 1.x inpainting", "sd2": "SD 2.x", "sd2-v": "SD 2.x-v",
                "sdxl": "SDXL"}


def lora_architecture(tensors: Any) -> str | None:
    """The model group a LoRA file was trained for (FLUX.1, SD3, the SD UNets), from its key names; None: unknown.

    Diffusers-named transformer files that touch only the double-stream blocks name no group (FLUX and SD3 share
    `transformer_blocks.N.attn.add_q_proj`), and then nothing is refused.
    """
    keys = list(tensors)
    for label, words in _LORA_ARCHES:
        if any(word in key for key in keys for word in words):
            return label
    return None


def model_architecture(patch: Any) -> tuple[str, str]:
    """The loaded model's group (as `lora_architecture` names it) and its own name."""
    family = getattr(patch.model.spec, "family", None)
    if family is not None:
        return ("SD3 / SD3.5" if family.transformer == "sd3" else "FLUX.1"), family.label
    return _UNETS, _MODEL_NAMES.get(patch.arch, patch.arch)

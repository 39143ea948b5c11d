"""Original-layout FLUX.1 (Black Forest Labs) and SD3.5 (Stability) transformer keys -> diffusers keys.

Atelier's own mapping. Fused projections are split by their shapes, never by a fixed width:
FLUX's `qkv` into three equal parts, its single blocks' `linear1` into q, k, v (hidden each)
and the MLP's input (the rest). The original final-layer modulation is (shift, scale) while
diffusers' `AdaLayerNormContinuous` reads (scale, shift): those halves are swapped.
Every source tensor must be used exactly once; a leftover one is an error.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from modules.checkpoints.packed import PackedTensor
from modules.errors import CheckpointError

StateDict = Mapping[str, torch.Tensor]
Rule = Callable[[str, str, torch.Tensor], dict[str, torch.Tensor]]

_FLUX_TOP = {"img_in": "x_embedder", "txt_in": "context_embedder",
             "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
             "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
             "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
             "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
             "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
             "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
             "final_layer.linear": "proj_out"}
_FLUX_DOUBLE = {"img_mod.lin": "norm1.linear", "txt_mod.lin": "norm1_context.linear",
                "img_attn.proj": "attn.to_out.0", "txt_attn.proj": "attn.to_add_out",
                "img_attn.norm.query_norm.scale": "attn.norm_q.weight",
                "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
                "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
                "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight",
                "img_mlp.0": "ff.net.0.proj", "img_mlp.2": "ff.net.2",
                "txt_mlp.0": "ff_context.net.0.proj", "txt_mlp.2": "ff_context.net.2"}
_FLUX_SINGLE = {"modulation.lin": "norm.linear", "linear2": "proj_out",
                "norm.query_norm.scale": "attn.norm_q.weight", "norm.key_norm.scale": "attn.norm_k.weight"}
_QKV = {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
        "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}

_SD3_TOP = {"x_embedder.proj": "pos_embed.proj", "context_embedder": "context_embedder",
            "t_embedder.mlp.0": "time_text_embed.timestep_embedder.linear_1",
            "t_embedder.mlp.2": "time_text_embed.timestep_embedder.linear_2",
            "y_embedder.mlp.0": "time_text_embed.text_embedder.linear_1",
            "y_embedder.mlp.2": "time_text_embed.text_embedder.linear_2",
            "final_layer.linear": "proj_out"}
_SD3_BLOCK = {"x_block.attn.proj": "attn.to_out.0", "context_block.attn.proj": "attn.to_add_out",
              "x_block.attn2.proj": "attn2.to_out.0",
              "x_block.attn.ln_q.weight": "attn.norm_q.weight", "x_block.attn.ln_k.weight": "attn.norm_k.weight",
              "context_block.attn.ln_q.weight": "attn.norm_added_q.weight",
              "context_block.attn.ln_k.weight": "attn.norm_added_k.weight",
              "x_block.attn2.ln_q.weight": "attn2.norm_q.weight", "x_block.attn2.ln_k.weight": "attn2.norm_k.weight",
              "x_block.mlp.fc1": "ff.net.0.proj", "x_block.mlp.fc2": "ff.net.2",
              "context_block.mlp.fc1": "ff_context.net.0.proj", "context_block.mlp.fc2": "ff_context.net.2",
              "x_block.adaLN_modulation.1": "norm1.linear"}
_SD3_QKV = {"x_block.attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
            "context_block.attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
            "x_block.attn2.qkv": ("attn2.to_q", "attn2.to_k", "attn2.to_v")}


def swap_halves(t: torch.Tensor) -> torch.Tensor:
    """(shift, scale) -> (scale, shift) along dim 0; a packed (GGUF, fp8) tensor stays packed."""
    first, second = t.chunk(2, dim=0)
    if isinstance(t, PackedTensor):
        return PackedTensor.cat([second, first])
    return torch.cat([second, first], dim=0)


def _split_leaf(rest: str) -> tuple[str, str]:
    """'a.b.weight' -> ('a.b', 'weight'); leaves that are not weight/bias stay whole."""
    stem, _, leaf = rest.rpartition(".")
    return (stem, leaf) if leaf in ("weight", "bias") else (rest, "")


def _join(name: str, leaf: str) -> str:
    return f"{name}.{leaf}" if leaf else name


def _map_module(table: Mapping[str, str], fused: Mapping[str, tuple[str, ...]], rest: str,
                t: torch.Tensor, prefix: str) -> dict[str, torch.Tensor] | None:
    if rest in table:  # whole-key entries (norm scales)
        return {prefix + table[rest]: t}
    stem, leaf = _split_leaf(rest)
    if stem in table:
        return {prefix + _join(table[stem], leaf): t}
    if stem in fused:
        return {prefix + _join(n, leaf): part for n, part in zip(fused[stem], t.chunk(3, dim=0), strict=True)}
    return None


def _block_index(rest: str) -> tuple[int, str]:
    head, _, tail = rest.partition(".")
    return int(head), tail


def flux_to_diffusers(sd: StateDict, hidden: int) -> dict[str, torch.Tensor]:
    """BFL FLUX.1 keys (prefix already removed) -> FluxTransformer2DModel keys."""
    out: dict[str, torch.Tensor] = {}
    for key, t in sd.items():
        mapped = None
        if key.startswith("double_blocks."):
            i, rest = _block_index(key[len("double_blocks."):])
            mapped = _map_module(_FLUX_DOUBLE, _QKV, rest, t, f"transformer_blocks.{i}.")
        elif key.startswith("single_blocks."):
            i, rest = _block_index(key[len("single_blocks."):])
            p = f"single_transformer_blocks.{i}."
            stem, leaf = _split_leaf(rest)
            if stem == "linear1":
                q, k, v, mlp = t.split([hidden, hidden, hidden, t.shape[0] - 3 * hidden], dim=0)
                mapped = {p + _join(n, leaf): part for n, part in
                          zip(("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), (q, k, v, mlp), strict=True)}
            else:
                mapped = _map_module(_FLUX_SINGLE, {}, rest, t, p)
        elif key.startswith("final_layer.adaLN_modulation.1."):
            mapped = {"norm_out.linear." + key.rsplit(".", 1)[1]: swap_halves(t)}
        else:
            mapped = _map_module(_FLUX_TOP, {}, key, t, "")
        if mapped is None:
            raise CheckpointError(f"FLUX transformer tensor {key!r} is not part of the FLUX.1 layout")
        out.update(mapped)
    return out


def sd3_to_diffusers(sd: StateDict, depth: int) -> dict[str, torch.Tensor]:
    """Stability SD3 / SD3.5 MMDiT keys (prefix removed) -> SD3Transformer2DModel keys."""
    out: dict[str, torch.Tensor] = {}
    for key, t in sd.items():
        mapped = None
        if key == "pos_embed":
            mapped = {"pos_embed.pos_embed": t}
        elif key.startswith("joint_blocks."):
            i, rest = _block_index(key[len("joint_blocks."):])
            p = f"transformer_blocks.{i}."
            if rest.startswith("context_block.adaLN_modulation.1."):
                leaf = rest.rsplit(".", 1)[1]  # the last block's context norm is a continuous one
                mapped = {p + "norm1_context.linear." + leaf: swap_halves(t) if i == depth - 1 else t}
            else:
                mapped = _map_module(_SD3_BLOCK, _SD3_QKV, rest, t, p)
        elif key.startswith("final_layer.adaLN_modulation.1."):
            mapped = {"norm_out.linear." + key.rsplit(".", 1)[1]: swap_halves(t)}
        else:
            mapped = _map_module(_SD3_TOP, {}, key, t, "")
        if mapped is None:
            raise CheckpointError(f"SD3 transformer tensor {key!r} is not part of the SD3 / SD3.5 layout")
        out.update(mapped)
    return out


def _original_names(transformer: str, config: Mapping) -> list[str]:
    """Every weighted module of the original layout (BFL / Stability names); some may be absent from a model."""
    if transformer == "flux":
        double = [k for k in _FLUX_DOUBLE if not k.endswith(".scale")] + list(_QKV)
        single = ["linear1"] + [k for k in _FLUX_SINGLE if not k.endswith(".scale")]
        return (list(_FLUX_TOP) + ["final_layer.adaLN_modulation.1"]
                + [f"double_blocks.{i}.{k}" for i in range(int(config["num_layers"])) for k in double]
                + [f"single_blocks.{i}.{k}" for i in range(int(config["num_single_layers"])) for k in single])
    block = [k for k in _SD3_BLOCK if not k.endswith(".weight")] + list(_SD3_QKV) + ["context_block.adaLN_modulation.1"]
    return (list(_SD3_TOP) + ["final_layer.adaLN_modulation.1"]
            + [f"joint_blocks.{i}.{k}" for i in range(int(config["num_layers"])) for k in block])


def _convert_rows(transformer: str, config: Mapping, name: str, rows: int) -> dict[str, torch.Tensor]:
    """Where the rows of an original weight go: {diffusers module: original row index of each of its rows}."""
    sd = {f"{name}.weight": torch.arange(rows)}
    if transformer == "flux":
        out = flux_to_diffusers(sd, int(config["num_attention_heads"]) * int(config["attention_head_dim"]))
    else:
        out = sd3_to_diffusers(sd, int(config["num_layers"]))
    return {key.removesuffix(".weight"): index for key, index in out.items()}


def original_layout(transformer: str, config: Mapping,
                    rows_of: Callable[[str], int | None]) -> dict[str, dict[str, torch.Tensor]]:
    """Original-layout module -> {diffusers module: row indices into the original weight}, for this model.

    Fused weights (FLUX `qkv`, `linear1`; SD3 `qkv`) map onto several diffusers modules, swapped
    modulations onto one with its halves exchanged. `rows_of(diffusers module)` gives a weight's row count
    (None when the model lacks it: SD3.5's `attn2` outside dual blocks, the last context block's MLP).
    Derived from the converters above, so loading and LoRA naming cannot disagree.
    """
    hidden = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
    layout: dict[str, dict[str, torch.Tensor]] = {}
    for name in _original_names(transformer, config):
        sizes = [rows_of(m) for m in _convert_rows(transformer, config, name, 4 * hidden)]
        if sizes and all(sizes):
            layout[name] = _convert_rows(transformer, config, name, sum(sizes))
    return layout

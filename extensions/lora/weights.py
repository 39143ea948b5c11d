"""Per-layer weight deltas of LoRA (incl. LoCon 3x3 and its CP `lora_mid`), LyCORIS LoHa and LoKr.

Every delta is `scale * update` with `scale = alpha / rank` (1 without alpha), as kohya and
LyCORIS train them; the tag's multiplier is applied by the caller.
- LoRA:  update = up @ down (flattened over in-channels x kernel), reshaped to the weight;
         with `lora_mid` (CP): update[i, j, k, l] = sum_nm mid[n, m, k, l] up[i, n] down[m, j]; rank = down.shape[0]
- split LoRA (kohya's FLUX `split_qkv`): `lora_down.N.weight` / `lora_up.N.weight` per part of a fused weight;
         update = the parts' up_N @ down_N stacked along the rows; rank = down_0.shape[0]
- LoHa:  update = (w1_a @ w1_b) * (w2_a @ w2_b) (Hadamard product); rank = w1_b.shape[0]
- LoKr:  update = kron(w1, w2), each factor whole or a product a @ b; rank = w1_b or w2_b rows (no alpha scaling
         when neither factor is decomposed)
Left out (reported as unsupported): LoHa/LoKr Tucker (`hada_t1`, `lokr_t2`), IA3, OFT/BOFT, GLoRA,
full-weight `diff`, norm layers (`w_norm`) and DoRA (`dora_scale`).
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

LORA = ("lora_up.weight", "lora_down.weight")
LOHA = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
UNSUPPORTED = {"hada_t1": "LoHa (Tucker)", "hada_t2": "LoHa (Tucker)", "lokr_t2": "LoKr (Tucker)",
               "on_input": "IA3", "oft_blocks": "OFT", "oft_diag": "OFT", "a1.weight": "GLoRA", "diff": "full (diff)",
               "w_norm": "norm", "b_norm": "norm", "dora_scale": "DoRA"}


class UnsupportedModule(ValueError):
    """A layer type this extension does not apply; the message names it."""


def kind_of(params: Mapping[str, torch.Tensor]) -> str:
    for key, name in UNSUPPORTED.items():
        if key in params:
            raise UnsupportedModule(name)
    if all(k in params for k in LORA):
        return "lora"
    if "lora_down.0.weight" in params and "lora_up.0.weight" in params:
        return "split"
    if all(k in params for k in LOHA):
        return "loha"
    has_1 = "lokr_w1" in params or ("lokr_w1_a" in params and "lokr_w1_b" in params)
    has_2 = "lokr_w2" in params or ("lokr_w2_a" in params and "lokr_w2_b" in params)
    if has_1 and has_2:
        return "lokr"
    raise UnsupportedModule(f"unknown layer keys {sorted(params)}")


def _scale(params: Mapping[str, torch.Tensor], rank: int | None) -> float:
    alpha = params.get("alpha")
    if alpha is None or not rank:
        return 1.0
    return float(alpha) / rank


def _lora(p: Mapping[str, torch.Tensor], shape: torch.Size) -> torch.Tensor:
    up, down = p["lora_up.weight"].float(), p["lora_down.weight"].float()
    rank = down.shape[0]
    if "lora_mid.weight" in p:
        mid = p["lora_mid.weight"].float()
        update = torch.einsum("nmkl,in,mj->ijkl", mid, up.flatten(1), down.flatten(1))
    else:
        update = up.flatten(1) @ down.flatten(1)
    return update.reshape(shape) * _scale(p, rank)


def _split(p: Mapping[str, torch.Tensor], shape: torch.Size) -> torch.Tensor:
    parts, n = [], 0
    while f"lora_down.{n}.weight" in p:
        parts.append(p[f"lora_up.{n}.weight"].float().flatten(1) @ p[f"lora_down.{n}.weight"].float().flatten(1))
        n += 1
    return torch.cat(parts).reshape(shape) * _scale(p, p["lora_down.0.weight"].shape[0])


def _loha(p: Mapping[str, torch.Tensor], shape: torch.Size) -> torch.Tensor:
    w1 = p["hada_w1_a"].float() @ p["hada_w1_b"].float()
    w2 = p["hada_w2_a"].float() @ p["hada_w2_b"].float()
    return (w1 * w2).reshape(shape) * _scale(p, p["hada_w1_b"].shape[0])


def _factor(p: Mapping[str, torch.Tensor], n: int) -> tuple[torch.Tensor, int | None]:
    if f"lokr_w{n}" in p:
        return p[f"lokr_w{n}"].float(), None
    a, b = p[f"lokr_w{n}_a"].float(), p[f"lokr_w{n}_b"].float()
    return (a @ b.flatten(1)).reshape(a.shape[0], *b.shape[1:]), b.shape[0]


def _lokr(p: Mapping[str, torch.Tensor], shape: torch.Size) -> torch.Tensor:
    w1, rank1 = _factor(p, 1)
    w2, rank2 = _factor(p, 2)
    if w2.ndim == 4:
        w1 = w1[:, :, None, None]
    return torch.kron(w1, w2.contiguous()).reshape(shape) * _scale(p, rank1 or rank2)


def delta(params: Mapping[str, torch.Tensor], shape: torch.Size) -> torch.Tensor:
    """The float32 weight delta of one layer (before the multiplier); raises ValueError on a misfit."""
    kind = kind_of(params)
    build = {"lora": _lora, "split": _split, "loha": _loha, "lokr": _lokr}[kind]
    try:
        update = build(params, torch.Size(shape))
    except RuntimeError as err:  # shapes that cannot multiply or reshape
        raise ValueError(f"{kind} tensors do not fit a weight of shape {tuple(shape)}: {err}") from None
    return update

"""Reference-only units (`reference_only`, `reference_adain`, `reference_adain+attn`): no control model.

Facts from sd-webui-controlnet: the reference image (fitted to the pass's size by the resize mode)
is VAE-encoded and, at every UNet call, noised to the call's sigma and run through the UNet first.
Its self-attention inputs are recorded ("attn") and the main evaluation's self-attention layers
attend to their own tokens and the reference's (keys/values concatenated). With "adain" each
block's output is recorded as its per-channel mean and variance, and the main evaluation's block
output is renormalised to them. Style fidelity (threshold A, 0.5) blends in the negative prompt's
rows left without the reference: out = f * out_c + (1 - f) * out_uc. "ControlNet is more
important" sets f to 1, "My prompt is more important" and the hires pass to 0; SDXL uses f**3.
The weight picks the layers: self-attention layers sorted by width (widest first) get
rank / count, blocks get fixed A1111 positions, and a layer is used when weight > its own.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from modules.plugins import api

from .control import active
from .units import Unit

MODULES = ("reference_only", "reference_adain", "reference_adain+attn")
# block positions (A1111's LDM names) and their weights, as sd-webui-controlnet lists them
_GN_INPUTS = {"sd1": (4, 5, 7, 8, 10, 11), "sdxl": (4, 5, 7, 8)}
_GN_OUTPUTS = {"sd1": tuple(range(8)), "sdxl": tuple(range(6))}


def is_reference(module: str) -> bool:
    return module in MODULES


def uses_attention(module: str) -> bool:
    return module in ("reference_only", "reference_adain+attn")


def uses_adain(module: str) -> bool:
    return module in ("reference_adain", "reference_adain+attn")


def block_weights(arch: str) -> dict[str, float]:
    """The adain blocks and their weights: middle 0, inputs 1 - k/n, outputs k/n."""
    key = "sdxl" if "xl" in arch else "sd1"
    inputs, outputs = _GN_INPUTS[key], _GN_OUTPUTS[key]
    weights = {"middle_block": 0.0}
    weights.update({f"input_blocks.{i}": 1.0 - k / len(inputs) for k, i in enumerate(inputs)})
    weights.update({f"output_blocks.{i}": k / len(outputs) for k, i in enumerate(outputs)})
    return weights


def style_fidelity(unit: Unit, arch: str, pass_name: str) -> float:
    if unit.control_mode == 2:
        return 1.0
    if unit.control_mode == 1 or pass_name == "hires":
        return 0.0
    fidelity = max(0.0, min(1.0, float(unit.threshold_a)))
    return fidelity ** 3.0 if "xl" in arch else fidelity


def _blend(main: torch.Tensor, plain: torch.Tensor, uncond: torch.Tensor, fidelity: float) -> torch.Tensor:
    """f * (main with the negative rows replaced by `plain`) + (1 - f) * main."""
    if fidelity <= 1e-5 or not bool(uncond.any()):
        return main
    rows = uncond.to(main.device)
    kept = main.clone()
    kept[rows] = plain[rows] if plain.shape[0] == main.shape[0] else plain
    return fidelity * kept + (1.0 - fidelity) * main


class ReferencePatch:
    """The engine's `HiddenStatesPatch` for one pass: the reference inputs, then the injection."""

    def __init__(self, planned: Sequence[Any], latents: Sequence[torch.Tensor], context: api.DenoiserContext,
                 seed: int) -> None:
        self.planned, self.latents, self.context, self.seed = planned, latents, context, seed
        self.steps = len(context.sigmas) - 1
        self.fidelity = [style_fidelity(p.unit, context.arch, context.pass_name) for p in planned]
        self.gn_weights = block_weights(context.arch)
        self.live: list[int] = []  # positions in `planned` of this call's reference inputs
        self.attn_banks: list[dict[int, torch.Tensor]] = []
        self.gn_banks: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = []
        self.widths: dict[int, int] = {}  # self-attention index -> width, seen in the reference passes
        self.calls: list[tuple[int, tuple[int, ...]]] = []  # (step, units used), for tests
        self.injected: list[tuple[int, str, int]] = []  # (step, kind, tap index) where states were changed

    def patch(self) -> api.HiddenStatesPatch:
        return api.HiddenStatesPatch(self.function, self.references)

    def references(self, call: api.UNetCall) -> list[torch.Tensor]:
        """Each live unit's latent noised to the call's sigmas (seeded by job, step and unit), times c_in."""
        step = self.context.step
        self.live = [k for k, p in enumerate(self.planned) if active(p.unit, step, self.steps)]
        self.calls.append((step, tuple(self.planned[k].index for k in self.live)))
        self.attn_banks = [{} for _ in self.live]
        self.gn_banks = [{} for _ in self.live]
        sigma = call.sigma.reshape(-1, 1, 1, 1).to(call.x.dtype)
        inputs = []
        for k in self.live:
            latent = self.latents[k].to(call.x.device, call.x.dtype)
            generator = torch.Generator().manual_seed(self.seed + 1000 * step + self.planned[k].index)
            noise = torch.randn(latent.shape, generator=generator, dtype=torch.float32).to(latent)
            x = latent + noise * sigma  # [rows, C, h, w]
            inputs.append(x / (sigma**2 + 1.0) ** 0.5)
        return inputs

    def function(self, call: api.HiddenStatesCall) -> torch.Tensor | None:
        if call.reference is not None:
            self._record(call)
            return None
        if call.kind == "self_attention":
            return self._attention(call)
        return self._adain(call)

    def _record(self, call: api.HiddenStatesCall) -> None:
        module = self.planned[self.live[call.reference]].unit.module
        if call.kind == "self_attention" and uses_attention(module):
            self.widths[call.index] = int(call.hidden_states.shape[-1])
            self.attn_banks[call.reference][call.index] = call.hidden_states
        elif call.kind == "block" and uses_adain(module) and call.name in self.gn_weights:
            var, mean = torch.var_mean(call.hidden_states, dim=(2, 3), keepdim=True, correction=0)
            self.gn_banks[call.reference][call.name] = (mean, var)

    def _attention_weight(self, index: int) -> float:
        order = sorted(self.widths, key=lambda i: -self.widths[i])  # stable: forward order among equal widths
        return order.index(index) / len(order)

    def _chosen(self, banks: Sequence[dict], key: Any, weight_of: Any) -> list[tuple[int, Any]]:
        out = []
        for j, k in enumerate(self.live):
            if key in banks[j] and self.planned[k].unit.weight > weight_of(key):
                out.append((k, banks[j][key]))
        return out

    def _attention(self, call: api.HiddenStatesCall) -> torch.Tensor | None:
        chosen = self._chosen(self.attn_banks, call.index, self._attention_weight)
        if not chosen:
            return None
        h = call.hidden_states
        main = call.attend(h, torch.cat([h, *(bank.to(h) for _, bank in chosen)], dim=1))
        fidelity = sum(self.fidelity[k] for k, _ in chosen) / len(chosen)
        uncond = call.uncond.to(h.device)
        if fidelity > 1e-5 and bool(uncond.any()):
            main = _blend(main, call.attend(h[uncond], h[uncond]), uncond, fidelity)
        self.injected.append((self.context.step, "self_attention", call.index))
        return main

    def _adain(self, call: api.HiddenStatesCall) -> torch.Tensor | None:
        chosen = self._chosen(self.gn_banks, call.name, lambda name: self.gn_weights[name])
        if not chosen:
            return None
        x = call.hidden_states
        mean_acc = sum(m for _, (m, _v) in chosen) / len(chosen)
        var_acc = sum(v for _, (_m, v) in chosen) / len(chosen)
        var, mean = torch.var_mean(x, dim=(2, 3), keepdim=True, correction=0)
        eps = 1e-5
        std, std_acc = torch.maximum(var, torch.tensor(eps)) ** 0.5, torch.maximum(var_acc, torch.tensor(eps)) ** 0.5
        normed = (x - mean) / std * std_acc.to(x) + mean_acc.to(x)
        fidelity = sum(self.fidelity[k] for k, _ in chosen) / len(chosen)
        self.injected.append((self.context.step, "block", call.index))
        return _blend(normed, x, call.uncond.to(x.device), fidelity)


def reference_latents(planned: Sequence[Any], hints: Sequence[torch.Tensor],
                      context: api.DenoiserContext) -> list[torch.Tensor]:
    """Each reference unit's fitted image (a 0..1 hint) through the checkpoint's VAE, [1, C, h, w] (once per pass)."""
    if context.encode is None:
        raise api.InvalidParams("reference-only ControlNet units need the engine's VAE encoder (plugin API 1.10)")
    return [context.encode(h * 2.0 - 1.0).float().cpu() for h in hints]

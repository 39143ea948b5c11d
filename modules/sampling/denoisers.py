"""Model wrappers that turn a UNet into `model(x, sigma) -> denoised`.

`ModelDenoiser` (eps) and `VDenoiser` adapt UNets to the k-diffusion interface
(Karras et al. 2022, "Elucidating the Design Space", Table 1 with sigma_data = 1);
`denoiser_class` picks one by the model's prediction type. `CFGDenoiser` adds classifier-free guidance (Ho & Salimans
2022) with A1111's prompt schedules and composable `AND` prompts (Liu et al.
2022, "Compositional Visual Generation").
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from modules.errors import CheckpointError
from modules.sampling.attention import CrossAttentionFn, attention_layers, cross_attention_patched
from modules.sampling.flow import FlowDenoiser
from modules.sampling.hidden_states import HiddenStatesPatch, hidden_states_patched


class StopSampling(Exception):
    """Raised by a denoiser's `check` to leave the sampler early; `reason` is "interrupt" or "skip"."""

    def __init__(self, reason: str = "interrupt") -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Cond:
    """Text conditioning for one UNet row: cross-attention states and SDXL's pooled vector."""

    cross_attn: torch.Tensor  # [1, tokens, dim]
    pooled: torch.Tensor | None = None  # [1, dim] (SDXL)


ScheduledCond = Sequence[tuple[int, Cond]]  # [(end_step, cond), ...] as A1111's prompt schedules


def cond_at(schedule: ScheduledCond, step: int) -> Cond:
    """The first entry whose end step is at or after `step` (steps count from 0)."""
    for end_step, cond in schedule:
        if step <= end_step:
            return cond
    return schedule[-1][1]


@dataclass(frozen=True)
class UNetCall:
    """One UNet evaluation, as a residual function (`ResidualFn`) sees it.

    Rows are images x prompt parts; `uncond` marks the rows of negative prompts (all False
    when the caller did not say).
    """

    x: torch.Tensor  # the noisy latents in k-diffusion scale, [rows, 4, h, w]
    sigma: torch.Tensor  # [rows]
    model_in: torch.Tensor  # x * c_in, the UNet's latent input without concat channels
    timestep: torch.Tensor  # [rows], the UNet's (fractional) timesteps
    cross_attn: torch.Tensor  # [rows, tokens, dim]
    added_cond: Mapping[str, torch.Tensor] | None  # SDXL: text_embeds and time_ids (FLUX: see below)
    uncond: torch.Tensor  # [rows] bool
    # FLUX.1 transformer calls (API 1.9): (double, single) block counts; `model_in` is then the packed
    # latents [rows, h/2 * w/2, 4C], `timestep` sigma, and `added_cond` holds pooled_projections,
    # img_ids, txt_ids and (FLUX.1-dev) guidance, as diffusers' FluxTransformer2DModel takes them.
    block_counts: tuple[int, int] | None = None


@dataclass(frozen=True)
class UNetResiduals:
    """What conditioning models add inside the UNet: per down-block skip residuals (ControlNet's
    12 for SD1/SD2, 9 for SDXL) with the middle block's residual (a pair: the UNet applies both
    or neither), and T2I-Adapter-style intra-block residuals. Residuals from several sources are summed.

    On a FLUX.1 transformer (API 1.9): `blocks`, one tensor per double block, and `single_blocks`, one per
    single block (`UNetCall.block_counts`), each added to the image tokens after its block."""

    down: tuple[torch.Tensor, ...] | None = None
    mid: torch.Tensor | None = None
    intrablock: tuple[torch.Tensor, ...] | None = None
    blocks: tuple[torch.Tensor, ...] | None = None
    single_blocks: tuple[torch.Tensor, ...] | None = None

    def __add__(self, other: UNetResiduals) -> UNetResiduals:
        def add(a, b):
            if a is None or b is None:
                return b if a is None else a
            if isinstance(a, tuple):
                return tuple(x + y for x, y in zip(a, b, strict=True))
            return a + b
        return UNetResiduals(add(self.down, other.down), add(self.mid, other.mid),
                             add(self.intrablock, other.intrablock), add(self.blocks, other.blocks),
                             add(self.single_blocks, other.single_blocks))


ResidualFn = Callable[[UNetCall], "UNetResiduals | None"]


class ModelDenoiser:
    """Wraps an eps-prediction diffusers UNet as model(x, sigma, ...) -> denoised.

    `sigma_to_t` maps sigmas to the UNet's (fractional) timesteps; `time_ids` is SDXL's
    size conditioning. `residuals` (conditioning hooks: ControlNet and the like) returns
    what to add inside the UNet at each call; `cross_attention` (IP-Adapter and the like) adds
    to the cross-attention layers' outputs. Subclasses for other predictions override `to_denoised`.
    """

    prediction = "eps"

    def __init__(self, unet: torch.nn.Module, sigma_to_t: Callable[[torch.Tensor], torch.Tensor],
                 time_ids: torch.Tensor | None = None, residuals: ResidualFn | None = None,
                 cross_attention: CrossAttentionFn | None = None,
                 hidden_states: HiddenStatesPatch | None = None) -> None:
        self.unet = unet
        self.hidden_states = hidden_states
        self.sigma_to_t = sigma_to_t
        self.time_ids = time_ids
        self.residuals = residuals
        self.cross_attention = cross_attention
        self._layers = attention_layers(unet) if cross_attention is not None else []
        self.dtype = next(unet.parameters()).dtype

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cross_attn: torch.Tensor,
                 pooled: torch.Tensor | None = None, concat: torch.Tensor | None = None,
                 uncond: torch.Tensor | None = None) -> torch.Tensor:
        sigma_ = sigma.reshape(-1, 1, 1, 1).to(x.dtype)
        c_in = 1.0 / (sigma_**2 + 1.0) ** 0.5
        model_in = x * c_in
        latent_in = model_in
        if concat is not None:
            model_in = torch.cat([model_in, concat.to(x.dtype)], dim=1)
        t = self.sigma_to_t(sigma.reshape(-1))
        added = self._added_cond(pooled, model_in)
        extra = {}
        rows = torch.zeros(x.shape[0], dtype=torch.bool) if uncond is None else uncond
        call = None
        if self.residuals is not None or self.hidden_states is not None:
            call = UNetCall(x, sigma.reshape(-1), latent_in.to(self.dtype), t.to(x.device),
                            cross_attn.to(self.dtype), added, rows)
        if self.residuals is not None:
            extra = _residual_kwargs(self.residuals(call))
        if self.hidden_states is not None:
            with hidden_states_patched(self.unet, self.hidden_states.function, rows) as taps:
                self._references(taps, call, t, cross_attn, added, concat)
                out = self._patched_unet(model_in, t, cross_attn, added, extra, rows)
        else:
            out = self._patched_unet(model_in, t, cross_attn, added, extra, rows)
        return self.to_denoised(x, out, sigma_)

    def _patched_unet(self, model_in, t, cross_attn, added, extra, rows) -> torch.Tensor:
        if self.cross_attention is None:
            return self._unet(model_in, t, cross_attn, added, extra)
        with cross_attention_patched(self._layers, self.cross_attention, rows):
            return self._unet(model_in, t, cross_attn, added, extra)

    def _references(self, taps, call: UNetCall, t, cross_attn, added, concat) -> None:
        """The hidden-states patch's reference inputs, evaluated first (outputs unused; no residuals)."""
        references = self.hidden_states.references
        for i, ref in enumerate(references(call) if references is not None else ()):
            taps.start(i)
            ref = ref.to(device=call.model_in.device, dtype=call.x.dtype)
            if concat is not None:  # inpainting models: the main call's mask and masked-image channels
                ref = torch.cat([ref, concat.to(ref.dtype)], dim=1)
            self._unet(ref, t, cross_attn, added, {})
        taps.start(None)

    def to_denoised(self, x: torch.Tensor, out: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """eps-prediction: denoised = x - eps * sigma."""
        return x - out * sigma

    @property
    def takes_uncond(self) -> bool:
        """CFGDenoiser passes `uncond=` row flags when a residual or attention function may want them."""
        return self.residuals is not None or self.cross_attention is not None or self.hidden_states is not None

    def _added_cond(self, pooled: torch.Tensor | None, model_in: torch.Tensor) -> dict[str, torch.Tensor] | None:
        if pooled is None:
            return None
        if self.time_ids.device != model_in.device:  # once: a host-to-GPU copy waits for the GPU
            self.time_ids = self.time_ids.to(model_in.device)
        time_ids = self.time_ids.expand(model_in.shape[0], -1)
        return {"text_embeds": pooled.to(self.dtype), "time_ids": time_ids}

    def _unet(self, model_in, t, cross_attn, added, extra) -> torch.Tensor:
        kwargs = dict(extra)
        if added is not None:
            kwargs["added_cond_kwargs"] = added
        out = self.unet(model_in.to(self.dtype), t.to(model_in.device),
                        encoder_hidden_states=cross_attn.to(self.dtype), return_dict=False, **kwargs)[0]
        return out.float()


def _residual_kwargs(residuals: UNetResiduals | None) -> dict[str, object]:
    """diffusers UNet2DConditionModel keyword arguments for `residuals`."""
    if residuals is None:
        return {}
    kwargs: dict[str, object] = {}
    if residuals.down is not None:
        kwargs["down_block_additional_residuals"] = list(residuals.down)
    if residuals.mid is not None:
        kwargs["mid_block_additional_residual"] = residuals.mid
    if residuals.intrablock is not None:
        kwargs["down_intrablock_additional_residuals"] = list(residuals.intrablock)
    return kwargs


class VDenoiser(ModelDenoiser):
    """v-prediction (Salimans & Ho 2022): denoised = x * c_skip + v * c_out."""

    prediction = "v"

    def to_denoised(self, x: torch.Tensor, out: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        c_skip = 1.0 / (sigma**2 + 1.0)
        c_out = -sigma / (sigma**2 + 1.0) ** 0.5
        return x * c_skip + out * c_out


# Prediction type -> model wrapper. Flow matching (SD3, FLUX) goes here as one more entry:
# a wrapper with x0 = x - sigma * v, the model's own timestep mapping and no c_in scaling.
DENOISERS: Mapping[str, type[ModelDenoiser]] = {"eps": ModelDenoiser, "v": VDenoiser}


class ControlledFlowDenoiser(FlowDenoiser):
    """`FlowDenoiser` whose FLUX.1 transformer takes conditioning hooks' per-block residuals
    (`UNetResiduals.blocks` / `.single_blocks`, added as diffusers' `controlnet_block_samples`)."""

    def __init__(self, unet: torch.nn.Module, sigma_to_t: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 time_ids: torch.Tensor | None = None, guidance: float | None = None,
                 residuals: ResidualFn | None = None) -> None:
        super().__init__(unet, sigma_to_t, time_ids, guidance)
        self.residuals = residuals
        self.block_counts = (len(getattr(unet, "transformer_blocks", ())),
                             len(getattr(unet, "single_transformer_blocks", ())))

    @property
    def takes_uncond(self) -> bool:
        return self.residuals is not None

    def extra_inputs(self, x: torch.Tensor, sigma: torch.Tensor, inputs: dict[str, object],
                     uncond: torch.Tensor | None) -> dict[str, object]:
        if self.residuals is None:
            return {}
        rows = torch.zeros(x.shape[0], dtype=torch.bool) if uncond is None else uncond
        added = {k: inputs[k] for k in ("pooled_projections", "img_ids", "txt_ids", "guidance")
                 if inputs[k] is not None}
        call = UNetCall(x, sigma, inputs["hidden_states"], inputs["timestep"], inputs["encoder_hidden_states"],
                        added, rows, block_counts=self.block_counts)
        return _block_kwargs(self.residuals(call), self.block_counts)


def _block_kwargs(residuals: UNetResiduals | None, counts: tuple[int, int]) -> dict[str, object]:
    """diffusers FluxTransformer2DModel keyword arguments for `residuals` (one tensor per block)."""
    if residuals is None:
        return {}
    if residuals.down is not None or residuals.mid is not None or residuals.intrablock is not None:
        raise ValueError("UNet residuals (down / mid / intrablock) were given for a FLUX.1 transformer, which "
                         "takes per-block residuals (`blocks`, `single_blocks`)")
    kwargs: dict[str, object] = {}
    for name, arg, blocks, count in (("blocks", "controlnet_block_samples", residuals.blocks, counts[0]),
                                     ("single_blocks", "controlnet_single_block_samples",
                                      residuals.single_blocks, counts[1])):
        if blocks is None:
            continue
        if len(blocks) != count:
            raise ValueError(f"UNetResiduals.{name} has {len(blocks)} tensors; this FLUX.1 transformer has "
                             f"{count} (one per block)")
        kwargs[arg] = list(blocks)
    return kwargs


def denoiser_class(prediction: str) -> type[ModelDenoiser] | type[FlowDenoiser]:
    """The model wrapper for a checkpoint's prediction type; CheckpointError for an unknown one."""
    if prediction == "flow":  # SD3.5 / FLUX.1
        return ControlledFlowDenoiser
    try:
        return DENOISERS[prediction]
    except KeyError:
        raise CheckpointError(f"this checkpoint predicts {prediction!r}, which Atelier cannot sample yet "
                              f"(known prediction types: {', '.join([*DENOISERS, 'flow'])})") from None


@dataclass(frozen=True)
class DenoiserStep:
    """One guided model call, as the `cfg_denoiser` hook and guidance-aware samplers see it.

    `denoised == uncond + cfg_scale * (cond - uncond)` per image, where `cond` folds the
    `AND` parts into one prediction; `uncond` is None when CFG scale 1 skipped it.
    """

    x: torch.Tensor
    sigma: torch.Tensor
    step: int  # sampling steps completed before this call
    cfg_scale: float
    cond: torch.Tensor
    uncond: torch.Tensor | None
    denoised: torch.Tensor


GuidanceHook = Callable[[DenoiserStep], torch.Tensor]


@dataclass(frozen=True)
class Row:
    """One UNet input row: which image it belongs to and its conditioning."""

    image: int
    cond: Cond
    uncond: bool = False  # the negative prompt's row


class CFGDenoiser:
    """Classifier-free guidance over prompt schedules and composable sub-prompts.

    conds[b] lists (schedule, weight) pairs for image b (one per `AND` part);
    unconds[b] is image b's negative-prompt schedule. The result is
    uncond + sum_i w_i * cfg_scale * (cond_i - uncond), in denoised space.
    Call `set_step` from the sampler callback so prompt editing follows the steps.
    After each call `last_uncond` holds the unconditional prediction, for CFG++ samplers.
    `check`, called before every model evaluation, raises StopSampling to stop early.
    """

    def __init__(self, inner: Callable[..., torch.Tensor], conds: Sequence[Sequence[tuple[ScheduledCond, float]]],
                 unconds: Sequence[ScheduledCond], cfg_scale: float,
                 check: Callable[[], None] | None = None, concat: torch.Tensor | None = None,
                 on_guided: GuidanceHook | None = None) -> None:
        self.inner = inner
        self.on_guided = on_guided  # wraps each guided prediction (the cfg_denoiser hook)
        self.conds = conds
        self.unconds = unconds
        self.cfg_scale = cfg_scale
        self.check = check
        self.concat = concat
        self.step = 0
        self.last_uncond: torch.Tensor | None = None  # the latest call's uncond prediction (None: skipped)
        self._indices: dict[tuple[int, ...], torch.Tensor] = {}

    def set_step(self, step: int) -> None:
        self.step = step

    def _skip_uncond(self) -> bool:
        return self.cfg_scale == 1.0 and all(len(c) == 1 and c[0][1] == 1.0 for c in self.conds)

    def _rows(self) -> tuple[list[Row], list[list[tuple[int, float]]], list[int]]:
        """Rows to evaluate, each image's (row, weight) for its conds, and its uncond row."""
        rows: list[Row] = []
        cond_rows: list[list[tuple[int, float]]] = []
        uncond_rows: list[int] = []
        for b, parts in enumerate(self.conds):
            cond_rows.append([])
            for schedule, weight in parts:
                cond_rows[b].append((len(rows), weight))
                rows.append(Row(b, cond_at(schedule, self.step)))
            if not self._skip_uncond():
                uncond_rows.append(len(rows))
                rows.append(Row(b, cond_at(self.unconds[b], self.step), uncond=True))
        return rows, cond_rows, uncond_rows

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The guided prediction; afterwards `last_uncond` holds this call's uncond (CFG++ samplers)."""
        if self.on_guided is None:
            denoised, out, _, uncond_rows = self._guide(x, sigma)
            self.last_uncond = torch.stack([out[r] for r in uncond_rows]) if uncond_rows else None
            return denoised
        return self.guidance(x, sigma).denoised

    def guidance(self, x: torch.Tensor, sigma: torch.Tensor) -> DenoiserStep:
        """The guided prediction with its cond and uncond parts (for CFG++-style samplers), after hooks."""
        denoised, out, cond_rows, uncond_rows = self._guide(x, sigma)
        uncond = torch.stack([out[r] for r in uncond_rows]) if uncond_rows else None
        self.last_uncond = uncond
        conds = []
        for b, parts in enumerate(cond_rows):
            if uncond is None or (len(parts) == 1 and parts[0][1] == 1.0):
                conds.append(out[parts[0][0]])
            else:
                conds.append(uncond[b] + sum(w * (out[r] - uncond[b]) for r, w in parts))
        step = DenoiserStep(x, sigma, self.step, self.cfg_scale, torch.stack(conds), uncond, denoised)
        if self.on_guided is not None:
            step = dataclasses.replace(step, denoised=self.on_guided(step))
        return step

    def _guide(self, x: torch.Tensor, sigma: torch.Tensor):
        if self.check is not None:
            self.check()
        rows, cond_rows, uncond_rows = self._rows()
        out = self._evaluate(x, sigma, rows)
        if not uncond_rows:
            return torch.stack([out[parts[0][0]] for parts in cond_rows]), out, cond_rows, uncond_rows
        denoised = []
        for b, parts in enumerate(cond_rows):
            uncond = out[uncond_rows[b]]
            guided = uncond + sum(w * self.cfg_scale * (out[r] - uncond) for r, w in parts)
            denoised.append(guided)
        return torch.stack(denoised), out, cond_rows, uncond_rows

    def _evaluate(self, x: torch.Tensor, sigma: torch.Tensor, rows: list[Row]) -> list[torch.Tensor]:
        """Run the UNet over all rows, batching rows whose token counts match."""
        out: list[torch.Tensor | None] = [None] * len(rows)
        groups: dict[int, list[int]] = {}
        for i, row in enumerate(rows):
            groups.setdefault(row.cond.cross_attn.shape[1], []).append(i)
        for indices in groups.values():
            images = self._index([rows[i].image for i in indices], x.device)
            pooled = [rows[i].cond.pooled for i in indices]
            result = self.inner(
                x[images], sigma[images],
                torch.cat([rows[i].cond.cross_attn for i in indices]),
                torch.cat(pooled) if pooled[0] is not None else None,
                self.concat[images] if self.concat is not None else None,
                **self._uncond_kwargs([rows[i].uncond for i in indices]),
            )
            for i, value in zip(indices, result, strict=True):
                out[i] = value
        return out

    def _uncond_kwargs(self, flags: list[bool]) -> dict[str, torch.Tensor]:
        """`uncond=` row flags for models that take them (ModelDenoiser does; plain callables need not)."""
        if not getattr(self.inner, "takes_uncond", False):
            return {}
        return {"uncond": torch.tensor(flags, dtype=torch.bool)}

    def _index(self, images: list[int], device: torch.device) -> torch.Tensor:
        """`images` as an index tensor on `device`, built once per pattern: indexing a GPU tensor
        with a Python list copies the list to the GPU, which waits for the GPU at every step."""
        key = tuple(images)
        if key not in self._indices:
            self._indices[key] = torch.tensor(images, dtype=torch.long, device=device)
        return self._indices[key]

"""The built-in X/Y/Z axes, registered through `register_xyz_axes` like any extension's.

`A1111_AXES` lists A1111 1.10's axis labels per tab in its order: API clients send an axis as
an index into that list (`x_type`), so indexes keep A1111's meaning even where Atelier lacks
the axis (that gives a clear error). Extension axes follow at the end, in registration order.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from modules.plugins import api

_COMMON_HEAD = ("Nothing", "Seed", "Var. seed", "Var. strength", "Steps")
_COMMON_TAIL = ("Checkpoint name", "Negative Guidance minimum sigma", "Sigma Churn", "Sigma min", "Sigma max",
                "Sigma noise", "Schedule type", "Schedule min sigma", "Schedule max sigma", "Schedule rho", "Eta",
                "Clip skip", "Denoising", "Initial noise multiplier", "Extra noise")
_END = ("VAE", "Styles", "UniPC Order", "Face restore", "Token merging ratio", "Token merging ratio high-res",
        "Always discard next-to-last sigma", "SGM noise multiplier", "Refiner checkpoint", "Refiner switch at",
        "RNG source")
A1111_AXES = {
    "txt2img": (*_COMMON_HEAD, "Hires steps", "CFG Scale", "Prompt S/R", "Prompt order", "Sampler", "Hires sampler",
                *_COMMON_TAIL, "Hires upscaler", *_END),
    "img2img": (*_COMMON_HEAD, "CFG Scale", "Image CFG Scale", "Prompt S/R", "Prompt order", "Sampler",
                *_COMMON_TAIL, "Cond. Image Mask Weight", *_END),
}
FALSE_WORDS = ("false", "no", "n", "0", "none", "off", "")


def set_field(name: str):
    def apply(params: Any, value: Any, values: Any = None) -> Any:
        changes = {name: value}
        unset = getattr(params, "model_defaults", ())
        if name in unset:  # the axis sets it: a FLUX.1 / SD3.5 family default must not replace it
            changes["model_defaults"] = tuple(n for n in unset if n != name)
        return dataclasses.replace(params, **changes)

    return apply


def prompt_sr(params: Any, value: str, values: list[str]) -> Any:
    """Prompt S/R: the axis's first value, wherever it is in either prompt, becomes `value`."""
    search = values[0]
    return dataclasses.replace(params, prompt=params.prompt.replace(search, value),
                               negative_prompt=params.negative_prompt.replace(search, value))


def check_prompt_sr(values: list[str], ctx: api.ScriptCheck) -> None:
    p = ctx.params
    if values and values[0] not in p.prompt and values[0] not in p.negative_prompt:
        raise api.InvalidParams(f"Prompt S/R: {values[0]!r} is in neither the prompt nor the negative prompt")


def apply_order(params: Any, order: tuple[str, ...], values: Any = None) -> Any:
    """Rebuild the prompt with the listed parts in `order`, each at the place a part was found."""
    prompt = params.prompt
    found = sorted((prompt.find(token), token) for token in order)
    pieces, rest = [], prompt
    for _, token in found:
        at = rest.find(token)
        pieces.append(rest[:at])
        rest = rest[at + len(token):]
    rebuilt = "".join(piece + token for piece, token in zip(pieces, order, strict=False))
    return dataclasses.replace(params, prompt=rebuilt + rest)


def check_prompt_order(values: list[Any], ctx: api.ScriptCheck) -> None:
    for token in values[0] if values else ():
        if token not in ctx.params.prompt:
            raise api.InvalidParams(f"Prompt order: {token!r} is not in the prompt")


def check_registry(kind: str, attr: str):
    def check(values: list[str], ctx: api.ScriptCheck) -> None:
        registry = getattr(ctx.registries, attr)
        for value in values:
            if value not in registry and not (attr == "schedulers" and value.lower() == "automatic"):
                raise api.InvalidParams(f"Unknown {kind} {value!r} on an X/Y/Z axis. Known: "
                                        f"{', '.join(registry.names())}")

    return check


def check_styles(values: list[str], ctx: api.ScriptCheck) -> None:
    known = ctx.registries.styles.names()
    lowered = {n.lower() for n in known}
    for value in values:
        for name in (v.strip() for v in value.split(",")):
            if name and name.lower() not in lowered:
                raise api.InvalidParams(f"Unknown style {name!r} on an X/Y/Z axis. Known: {', '.join(known)}")


def apply_styles(params: Any, value: str, values: Any = None) -> Any:
    extra = tuple(v.strip() for v in value.split(",") if v.strip())
    return dataclasses.replace(params, styles=(*params.styles, *extra))


TRUE_WORDS = ("true", "yes", "y", "1", "on")
FACE_MODELS = {"codeformer": "CodeFormer", "gfpgan": "GFPGAN", "restoreformer": "RestoreFormer"}


def face_restore_choice(value: str) -> str | None:
    """A1111's Face restore values: a model name turns it on with that model, True with the job's model."""
    word = str(value).strip().lower()
    if word in FACE_MODELS:
        return FACE_MODELS[word]
    if word in TRUE_WORDS:
        return ""
    if word in FALSE_WORDS:
        return None
    raise api.InvalidParams(f"Face restore {value!r}: use True, False, CodeFormer, GFPGAN or RestoreFormer")


def apply_face_restore(params: Any, value: str, values: Any = None) -> Any:
    model = face_restore_choice(value)
    if model is None:
        return dataclasses.replace(params, restore_faces=False)
    return dataclasses.replace(params, restore_faces=True, face_restoration_model=model or params.face_restoration_model)


def check_face_restore(values: list[str], ctx: api.ScriptCheck) -> None:
    """Each value is understood, and the models it turns on have their files (the message names them)."""
    faces = getattr(ctx.registries, "face_restorers", None)
    for value in values:
        model = face_restore_choice(value)
        if model is None:
            continue
        if faces is None:
            raise api.InvalidParams("Face restore: face restoration is not available in this process")
        faces.check(model or ctx.params.face_restoration_model, "script_args")


def parse_size(value: str) -> tuple[int, int]:
    parts = value.lower().replace(" ", "").split("x")
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise api.InvalidParams(f"Size {value!r} must look like 512x768 (width x height)")
    return int(parts[0]), int(parts[1])


def apply_size(params: Any, value: str, values: Any = None) -> Any:
    width, height = parse_size(value)
    return dataclasses.replace(params, width=width, height=height)


def check_rng(values: list[str], ctx: api.ScriptCheck) -> None:
    for value in values:
        if value.lower() not in ("gpu", "cpu", "nv"):
            raise api.InvalidParams(f"RNG source {value!r}: use GPU, CPU or NV")


NO_REFINER = ("none", "")
REFINER_DEFAULT_SWITCH = 0.8  # A1111's slider default, for jobs that name no switch point
VAE_SPECIAL = ("Automatic", "None")
UNIPC_ORDERS = (1, 2, 3)


def apply_refiner(params: Any, value: str, values: Any = None) -> Any:
    """The cell's refiner ("None": none); a job without a switch point switches at A1111's 0.8."""
    if value.strip().lower() in NO_REFINER:
        return dataclasses.replace(params, refiner_checkpoint=None)
    switch = params.refiner_switch_at if params.refiner_switch_at is not None else REFINER_DEFAULT_SWITCH
    return dataclasses.replace(params, refiner_checkpoint=value, refiner_switch_at=switch)


def check_refiners(values: list[str], ctx: api.ScriptCheck) -> None:
    for value in values:
        if value.strip().lower() not in NO_REFINER:
            ctx.find_checkpoint(value)  # raises, naming the value


def _refiner_label(value: Any) -> str:
    return f"Refiner checkpoint: {Path(str(value)).stem}"


def vae_axis(settings: Any) -> api.AxisSpec:
    """A1111's VAE axis: each cell's `sd_vae` (Automatic, None or a VAE file), checked against the VAE folder."""
    def known() -> list[str]:
        return [*VAE_SPECIAL, *api.vae_names(settings)]

    def check(values: list[str], ctx: api.ScriptCheck) -> None:
        names = known()
        allowed = {*names, *(Path(n).stem for n in names)}
        for value in values:
            if value not in allowed:
                raise api.InvalidParams(f"Unknown VAE {value!r} on an X/Y/Z axis. Known: {', '.join(names)}")

    return api.AxisSpec("VAE", set_field("sd_vae"), check=check, cost=0.7, choices=lambda r: known())


def check_unipc_order(values: list[int], ctx: api.ScriptCheck) -> None:
    for value in values:
        if value not in UNIPC_ORDERS:
            raise api.InvalidParams(f"UniPC Order {value}: Atelier's UniPC runs orders 1, 2 and 3")


def check_extra_noise(values: list[float], ctx: api.ScriptCheck) -> None:
    for value in values:
        if not 0.0 <= value <= 1.0:
            raise api.InvalidParams(f"Extra noise {value}: use a value between 0 and 1")


def _unchanged(params: Any, value: Any, values: Any = None) -> Any:
    return params


def _checkpoint_label(value: Any) -> str:
    return Path(str(value)).stem


def _raw(value: Any) -> str:
    return str(value)


def _joined(value: Any) -> str:
    return ", ".join(value)


def builtin_axes(settings: Any = None) -> list[api.AxisSpec]:
    t2i, i2i = ("txt2img",), ("img2img",)
    field = set_field
    return [
        api.AxisSpec("Nothing", _unchanged, kind="nothing"),
        api.AxisSpec("Seed", field("seed"), kind="int"),
        api.AxisSpec("Var. seed", field("subseed"), kind="int"),
        api.AxisSpec("Var. strength", field("subseed_strength"), kind="float"),
        api.AxisSpec("Steps", field("steps"), kind="int"),
        api.AxisSpec("Hires steps", field("hr_second_pass_steps"), kind="int", tabs=t2i),
        api.AxisSpec("CFG Scale", field("cfg_scale"), kind="float"),
        api.AxisSpec("Image CFG Scale", field("image_cfg_scale"), kind="float", tabs=i2i),
        api.AxisSpec("Prompt S/R", prompt_sr, check=check_prompt_sr, format=_raw),
        api.AxisSpec("Prompt order", apply_order, kind="permutations", check=check_prompt_order, format=_joined),
        api.AxisSpec("Sampler", field("sampler_name"), check=check_registry("sampler", "samplers"), format=_raw,
                     choices=lambda r: r.samplers.names()),
        api.AxisSpec("Hires sampler", field("hr_sampler_name"), tabs=t2i, check=check_registry("sampler", "samplers"),
                     choices=lambda r: r.samplers.names()),
        api.AxisSpec("Checkpoint name", _unchanged, kind="checkpoint", cost=1.0, format=_checkpoint_label),
        api.AxisSpec("Sigma Churn", field("s_churn"), kind="float"),
        api.AxisSpec("Sigma min", field("s_tmin"), kind="float"),
        api.AxisSpec("Sigma max", field("s_tmax"), kind="float"),
        api.AxisSpec("Sigma noise", field("s_noise"), kind="float"),
        api.AxisSpec("Schedule type", field("scheduler"), check=check_registry("schedule type", "schedulers"),
                     choices=lambda r: ["Automatic", *r.schedulers.names()]),
        api.AxisSpec("Schedule min sigma", field("sigma_min"), kind="float"),
        api.AxisSpec("Schedule max sigma", field("sigma_max"), kind="float"),
        api.AxisSpec("Schedule rho", field("rho"), kind="float"),
        api.AxisSpec("Eta", field("eta"), kind="float"),
        api.AxisSpec("Clip skip", field("clip_skip"), kind="int"),
        api.AxisSpec("Denoising", field("denoising_strength"), kind="float"),
        api.AxisSpec("Initial noise multiplier", field("initial_noise_multiplier"), kind="float", tabs=i2i),
        api.AxisSpec("Hires upscaler", field("hr_upscaler"), tabs=t2i, check=check_registry("upscaler", "upscalers"),
                     choices=lambda r: r.upscalers.names()),
        api.AxisSpec("Styles", apply_styles, check=check_styles, choices=lambda r: r.styles.names()),
        api.AxisSpec("Face restore", apply_face_restore, check=check_face_restore, format=_raw,
                     choices=lambda r: ["False", "True", *FACE_MODELS.values()]),
        api.AxisSpec("RNG source", lambda p, v, vs=None: dataclasses.replace(p, rng_source=v.lower()), check=check_rng,
                     choices=lambda r: ["GPU", "CPU", "NV"]),
        api.AxisSpec("Size", apply_size, check=lambda values, ctx: [parse_size(v) for v in values]),
        api.AxisSpec("Extra noise", field("img2img_extra_noise"), kind="float", check=check_extra_noise),
        vae_axis(settings),
        api.AxisSpec("UniPC Order", field("uni_pc_order"), kind="int", cost=0.5, check=check_unipc_order),
        api.AxisSpec("Refiner checkpoint", apply_refiner, cost=1.0, check=check_refiners, format=_refiner_label),
        api.AxisSpec("Refiner switch at", field("refiner_switch_at"), kind="float"),
        # Forge's axis for FLUX.1-dev's guidance embedding; other models ignore it (no-op, as in Forge)
        api.AxisSpec("Distilled CFG Scale", field("distilled_cfg_scale"), kind="float", aliases=("Distilled CFG",)),
    ]

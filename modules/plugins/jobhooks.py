"""Job-time hooks, called by the pipeline: prepare_params, post-processors, the guidance hook,
on_image_saved, and the infotext of extension options.

The failure rule: a failure in something the user explicitly asked for (an extension or
post-processor named in `params.extension_args`) fails the job with `ExtensionError`;
any other failure is logged, recorded on the extension and attached to the result as
a warning.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

import torch

from modules.errors import InvalidParams
from modules.pipeline.hooks import PassThroughStages
from modules.plugins.context import JobContext, PostprocessContext
from modules.plugins.extensions import ExtensionError
from modules.plugins.host import PluginHost
from modules.plugins.networks import build_patch, job_embeddings, ti_hashes
from modules.plugins.patch import ModelPatch
from modules.plugins.specs import OptionSpec, PostprocessorSpec
from modules.sampling import rng
from modules.sampling.attention import CrossAttentionCall, CrossAttentionFn
from modules.sampling.denoisers import DenoiserStep, GuidanceHook, ResidualFn, UNetCall, UNetResiduals
from modules.sampling.hidden_states import HiddenStatesCall, HiddenStatesPatch

log = logging.getLogger("atelier.plugins")


def extension_args(params: Any) -> Mapping[str, Mapping[str, Any]]:
    return getattr(params, "extension_args", None) or {}


def _asked(params: Any):
    """Whose failures fail the job: the extensions the job's extension_args turn on."""
    names = {n for n, v in extension_args(params).items() if not (isinstance(v, Mapping) and v.get("enabled") is False)}
    return lambda plugin: plugin in names


def check_extension_args(host: PluginHost, registries: Any, params: Any, task: str) -> None:
    """Every entry must name a loaded extension, a post-processor or a UI section, and hold a mapping."""
    args = extension_args(params)
    if not isinstance(args, Mapping):
        raise InvalidParams("extension_args must map names to option mappings")
    sections = {s.name for s in ui_sections(host, task)}
    for name, values in args.items():
        if not isinstance(values, Mapping):
            raise InvalidParams(f"extension_args[{name!r}] must be a mapping of option values")
        info = host.extension(name)
        if info is not None and not info.loaded:
            raise ExtensionError(f"Extension {name!r} was asked for but is {info.status}: {info.error}".rstrip(": "))
        if info is None and name not in registries.postprocessors and name not in sections:
            raise InvalidParams(f"extension_args names {name!r}, which is no loaded extension, "
                                "post-processor or UI section")


def prepare_params(host: PluginHost, params: Any, context: JobContext) -> Any:
    """Resolve random seeds (so hooks can use them), then chain every prepare_params hook.

    The caller validated `params`; they are validated again only when a hook returned new ones.
    """
    params = dataclasses.replace(params, seed=rng.resolve_seed(params.seed),
                                 subseed=rng.resolve_seed(params.subseed))
    check_extension_args(host, context.registries, params, context.task)
    asked, changed = _asked(params), False
    for impl in host.implementations("prepare_params"):
        ok, value = host.call_one("prepare_params", impl, {"params": params, "context": context},
                                  strict=asked(impl.plugin_name))
        if not ok:
            context.warn(f"Extension {impl.plugin_name!r} failed in prepare_params and was skipped: {value.message}")
        elif value is not None and type(value) is not type(params):
            context.warn(f"Extension {impl.plugin_name!r} returned {type(value).__name__} from prepare_params; "
                         "ignored")
        elif value is not None:
            changed = changed or value is not params
            params = value
    if changed:
        params.validate(context.settings.limits)
    return params


def ui_sections(host: PluginHost, tab: str) -> list[Any]:
    sections = [spec for _, spec in host.specs("register_ui_sections", tab=tab)]
    return sorted((s for s in sections if tab in s.tabs), key=lambda s: s.order)


def _enabled(spec: PostprocessorSpec, params: Any) -> bool:
    values = extension_args(params).get(spec.name)
    if values is None:
        return spec.always_on
    return values.get("enabled", True) is not False


def _options(options: tuple[OptionSpec, ...], values: Mapping[str, Any] | None) -> dict[str, Any]:
    chosen = {o.name: o.default for o in options}
    chosen.update(values or {})
    return chosen


def postprocess(host: PluginHost, image: Any, params: Any, context: JobContext,
                index: int, seed: int, subseed: int) -> Any:
    """Run the enabled post-processors in order on one decoded PIL image."""
    for spec in context.registries.postprocessors:
        if not _enabled(spec, params):
            continue
        values = _options(spec.options, extension_args(params).get(spec.name))
        ctx = PostprocessContext(context, index, seed, subseed, values)
        try:
            result = spec.function(image, params, ctx)
            if not hasattr(result, "size") or result.size != image.size:
                raise TypeError(f"returned {type(result).__name__} instead of an image of size {image.size}")
        except InvalidParams:
            raise
        except Exception as err:  # an extension bug: fatal only if asked for
            owner = host.owners.get(("post-processor", spec.name), spec.name)
            error = host.record(f"post-processor {spec.name}", owner, err)
            if spec.name in extension_args(params):
                raise ExtensionError(f"Post-processor {spec.label!r} failed: {error.message}") from err
            context.warn(f"Post-processor {spec.label!r} failed and was skipped: {error.message}")
            continue
        image = result
    return image


def guidance_hook(host: PluginHost, params: Any, context: JobContext) -> GuidanceHook | None:
    """A wrapper for CFGDenoiser that chains the cfg_denoiser hooks; None when nobody implements it."""
    impls = host.implementations("cfg_denoiser")
    if not impls:
        return None
    asked, failed = _asked(params), set()

    def hook(step: DenoiserStep) -> torch.Tensor:
        for impl in impls:
            if impl.plugin_name in failed:
                continue
            ok, value = host.call_one("cfg_denoiser", impl, {"step": step, "params": params},
                                      strict=asked(impl.plugin_name))
            if ok and value is not None and getattr(value, "shape", None) != step.denoised.shape:
                ok = False
                value = host.record("cfg_denoiser", impl.plugin_name, TypeError(
                    f"returned {type(value).__name__} {getattr(value, 'shape', '')}, expected a tensor "
                    f"shaped {tuple(step.denoised.shape)}"))
                if asked(impl.plugin_name):
                    raise ExtensionError(f"Extension {impl.plugin_name!r} failed in cfg_denoiser: {value.message}")
            if not ok:
                failed.add(impl.plugin_name)
                context.warn(f"Extension {impl.plugin_name!r} failed in cfg_denoiser and was skipped for "
                             f"the rest of the job: {value.message}")
            elif value is not None:
                step = dataclasses.replace(step, denoised=value)
        return step.denoised

    return hook


def _per_pass(host: PluginHost, hook: str, denoiser: Any, params: Any, context: JobContext) -> list[tuple[str, Any]]:
    """(extension, value) for each extension whose per-pass `hook` answered; one that failed is warned of
    and skipped (or fails the job when the job asked for that extension)."""
    asked, found = _asked(params), []
    for impl in host.implementations(hook):
        ok, value = host.call_one(hook, impl, {"context": denoiser, "params": params, "job": context},
                                  strict=asked(impl.plugin_name))
        if not ok:
            context.warn(f"Extension {impl.plugin_name!r} failed in {hook} and was skipped: {value.message}")
        elif value is not None:
            found.append((impl.plugin_name, value))
    return found


def residual_functions(host: PluginHost, denoiser: Any, params: Any, context: JobContext) -> ResidualFn | None:
    """The pass's `unet_residuals` functions summed into one; None when no extension adds any."""
    found = _per_pass(host, "unet_residuals", denoiser, params, context)
    if not found:
        return None

    def residuals(call: UNetCall) -> UNetResiduals | None:
        total = None
        for name, fn in found:
            value = fn(call)
            if value is not None and not isinstance(value, UNetResiduals):
                raise ExtensionError(f"Extension {name!r} returned {type(value).__name__} from its unet_residuals "
                                     "function; expected UNetResiduals or None")
            if value is not None and (value.down is None) != (value.mid is None):
                raise ExtensionError(f"Extension {name!r} returned UNetResiduals with only one of `down` and `mid`; "
                                     "the UNet applies them as a pair (use zeros for the other)")
            if value is not None and call.block_counts is not None:
                _check_blocks(name, value, call.block_counts)
            if value is not None:
                total = value if total is None else total + value
        return total

    return residuals


def _check_blocks(name: str, value: UNetResiduals, counts: tuple[int, int]) -> None:
    """A FLUX.1 transformer takes one residual per block, and no UNet residuals."""
    if value.down is not None or value.intrablock is not None:
        raise ExtensionError(f"Extension {name!r} returned UNet residuals (down / mid / intrablock) for a FLUX.1 "
                             "transformer; return `blocks` / `single_blocks` (one tensor per block) instead")
    for field, count in (("blocks", counts[0]), ("single_blocks", counts[1])):
        got = getattr(value, field)
        if got is not None and len(got) != count:
            raise ExtensionError(f"Extension {name!r} returned {len(got)} tensors in UNetResiduals.{field}; this "
                                 f"FLUX.1 transformer has {count} (one per block, see UNetCall.block_counts)")


def cross_attention_functions(host: PluginHost, denoiser: Any, params: Any,
                               context: JobContext) -> CrossAttentionFn | None:
    """The pass's `unet_cross_attention` functions summed into one; None when no extension adds any."""
    found = [fn for _, fn in _per_pass(host, "unet_cross_attention", denoiser, params, context)]
    if not found:
        return None

    def attention(call: CrossAttentionCall) -> torch.Tensor | None:
        total = None
        for fn in found:
            value = fn(call)
            if value is not None:
                total = value if total is None else total + value
        return total

    return attention


def hidden_states_patches(host: PluginHost, denoiser: Any, params: Any,
                          context: JobContext) -> HiddenStatesPatch | None:
    """The pass's `unet_hidden_states` patches as one; None when no extension adds any."""
    found = _per_pass(host, "unet_hidden_states", denoiser, params, context)
    for name, value in found:
        if not isinstance(value, HiddenStatesPatch):
            raise ExtensionError(f"Extension {name!r} returned {type(value).__name__} from "
                                 "unet_hidden_states; expected HiddenStatesPatch or None")
    return combined_hidden_states([patch for _, patch in found]) if found else None


def combined_hidden_states(patches: list[HiddenStatesPatch]) -> HiddenStatesPatch:
    """One patch over several: each one's reference inputs reach only its own function (renumbered from 0);
    in the main evaluation the functions are asked in order and the first tensor answered wins."""
    if len(patches) == 1:
        return patches[0]
    owners: list[tuple[int, int]] = []  # per reference input of the call: (patch, its own position)

    def references(call: Any) -> list[torch.Tensor]:
        owners.clear()
        inputs = []
        for k, patch in enumerate(patches):
            own = list(patch.references(call)) if patch.references is not None else []
            owners.extend((k, i) for i in range(len(own)))
            inputs.extend(own)
        return inputs

    def function(call: HiddenStatesCall) -> torch.Tensor | None:
        if call.reference is not None:
            k, i = owners[call.reference]
            return patches[k].function(dataclasses.replace(call, reference=i))
        for patch in patches:
            value = patch.function(call)
            if value is not None:
                return value
        return None

    return HiddenStatesPatch(function, references)


def image_saved(host: PluginHost, path: Any, params: Any, infotext: str, context: JobContext) -> None:
    outcome = host.call("on_image_saved", strict=_asked(params), path=path, params=params, infotext=infotext)
    for warning in outcome.warnings():
        context.warn(warning)


def _option_owners(host: PluginHost, registries: Any, task: str) -> dict[str, tuple[str, tuple[OptionSpec, ...]]]:
    owners = {s.name: (s.label, s.options) for s in registries.postprocessors}
    owners.update({s.name: (s.title, s.options) for s in ui_sections(host, task)})
    return owners


def infotext_key(owner_label: str, option: OptionSpec) -> str:
    return option.infotext or f"{owner_label} {option.label}"


def extension_infotext(host: PluginHost, registries: Any, params: Any, task: str = "txt2img") -> dict[str, Any]:
    """Infotext fields for the declared options of the job's extension_args (enabled ones only)."""
    fields: dict[str, Any] = {}
    owners = _option_owners(host, registries, task)
    for name, values in extension_args(params).items():
        if name not in owners or values.get("enabled", True) is False:
            continue
        label, options = owners[name]
        chosen = _options(options, values)  # every declared option, defaults filled in
        for option in options:
            if option.name != "enabled":
                fields[infotext_key(label, option)] = chosen[option.name]
    return fields


def _coerce(option: OptionSpec, text: str) -> Any:
    default = option.default
    if isinstance(default, bool):
        return text.strip().lower() in ("true", "1", "yes", "on")
    if isinstance(default, int):
        return int(float(text))
    if isinstance(default, float):
        return float(text)
    return text


def extension_args_from_infotext(host: PluginHost, registries: Any, fields: Mapping[str, str],
                                 task: str = "txt2img") -> dict[str, dict[str, Any]]:
    """The reverse of `extension_infotext`, for "send to txt2img" and PNG info."""
    result: dict[str, dict[str, Any]] = {}
    for name, (label, options) in _option_owners(host, registries, task).items():
        for option in options:
            key = infotext_key(label, option)
            if key in fields:
                try:
                    result.setdefault(name, {})[option.name] = _coerce(option, fields[key])
                except ValueError:
                    log.warning("infotext %s: %r is not a valid value", key, fields[key])
    return result


class JobHooks(PassThroughStages):
    """The pipeline's `StageHooks` over the plugin host, bound to one job's context; warnings collect
    in `context`. The denoiser wrap points and stage hooks are no-ops until hookspecs use them."""

    def __init__(self, host: PluginHost, registries: Any, settings: Any, task: str) -> None:
        self.host = host
        self.context = JobContext(settings, registries, task)
        self.on_guided: GuidanceHook | None = None
        self._infotext: dict[str, Any] = {}
        self.embedding_lookup: Any = None  # the job's textual-inversion lookup (records what was used)

    def prepare(self, params: Any) -> Any:
        """prepare_params hooks (seeds resolved first); binds the guidance hook and infotext to the result."""
        params = prepare_params(self.host, params, self.context)
        self.on_guided = guidance_hook(self.host, params, self.context)
        self._infotext = extension_infotext(self.host, self.context.registries, params, self.context.task)
        return params

    def infotext(self) -> dict[str, Any]:
        """Extension options, then what hooks added ("Lora hashes"), then "TI hashes"."""
        fields = {**self._infotext, **self.context.infotext}
        hashes = ti_hashes(self.embedding_lookup)
        if hashes:
            fields["TI hashes"] = hashes
        return fields

    def patch(self, model: Any, params: Any) -> ModelPatch:
        """The job's copy-on-write model patch from the prompt tags (`patch_model` hooks); apply it with `.applied()`."""
        return build_patch(self.host, model, params, self.context)

    def embeddings(self, model: Any, tokenizer: Any, params: Any) -> Any:
        """The job's textual-inversion lookup (`register_embeddings` hooks), or None when there is none."""
        self.embedding_lookup = job_embeddings(self.host, self.context.settings, model, tokenizer, params,
                                               self.context)
        return self.embedding_lookup

    def unet_residuals(self, context: Any) -> ResidualFn | None:
        """The `unet_residuals` hooks' functions for one sampling pass, summed (None without any)."""
        return residual_functions(self.host, context, context.params, self.context)

    def unet_cross_attention(self, context: Any) -> CrossAttentionFn | None:
        """The `unet_cross_attention` hooks' functions for one sampling pass, summed (None without any)."""
        return cross_attention_functions(self.host, context, context.params, self.context)

    def unet_hidden_states(self, context: Any) -> HiddenStatesPatch | None:
        """The `unet_hidden_states` hooks' patches for one sampling pass, as one (None without any)."""
        return hidden_states_patches(self.host, context, context.params, self.context)

    def postprocess(self, image: Any, params: Any, index: int, seed: int, subseed: int) -> Any:
        return postprocess(self.host, image, params, self.context, index, seed, subseed)

    def saved(self, path: Any, params: Any, infotext: str) -> None:
        image_saved(self.host, path, params, infotext, self.context)

    @property
    def warnings(self) -> list[str]:
        return self.context.warnings

"""The public plugin API: the only Atelier module an extension should import.

    from modules.plugins import api

    @api.hookimpl
    def register_styles():
        return [api.StyleSpec("Noir", "{prompt}, film noir, high contrast")]

`API_VERSION` is "MAJOR.MINOR". An extension declares the version it was written
for (`api_version` in extension.toml); it loads when the major versions match and
its minor is not newer than ours. Removing or changing anything here bumps the
major; adding something bumps the minor. See docs/extensions.md.
"""
from __future__ import annotations

import logging

from modules.errors import AtelierError, InvalidParams
from modules.pipeline.hooks import DenoiserContext
from modules.pipeline.params import GenerationParams, Img2ImgParams, Result, Txt2ImgParams
from modules.plugins.context import JobContext, PostprocessContext
from modules.plugins.grids import GridAnnotation, annotate_grid, combine_grid, image_grid, split_grid
from modules.plugins.hookspecs import hookimpl
from modules.plugins.patch import ModelPatch
from modules.plugins.scripts import (
    AxisSpec,
    ScriptCheck,
    ScriptContext,
    ScriptFill,
    ScriptSpec,
    extend_result,
    with_infotext_fields,
)
from modules.plugins.specs import (
    EmbeddingSpec,
    ExtraNetworkItem,
    ExtraNetworkSpec,
    OptionSpec,
    PostprocessorSpec,
    RootRoutesSpec,
    SamplerSpec,
    ScheduleContext,
    SchedulerSpec,
    StyleSpec,
    UISectionSpec,
    UITabSpec,
    UpscalerSpec,
)
from modules.sampling.attention import CrossAttentionCall
from modules.sampling.denoisers import DenoiserStep, UNetCall, UNetResiduals
from modules.sampling.hidden_states import HiddenStatesCall, HiddenStatesPatch
from modules.text.prompt_parser import ExtraNetworkTag

# 1.1: register_extra_networks, patch_model, register_embeddings; ExtraNetworkSpec, ExtraNetworkItem,
#      ExtraNetworkTag, EmbeddingSpec, ModelPatch; JobContext.infotext
# 1.2: an extension module may define create_plugin(settings); each app registers the object it returns
# 1.3: SamplerSpec.brownian_noise; a sampler taking `model_sigmas` gets the model's sigma table;
#      the sampler's model offers `last_uncond` (CFG++)
# 1.4: register_upscalers(settings) may take the settings; UpscalerSpec.model_path and .scale (model upscalers); register_scripts,
#      register_xyz_axes; ScriptSpec, ScriptCheck, ScriptContext, AxisSpec, with_infotext_fields,
#      extend_result; the grid builder (image_grid, annotate_grid, GridAnnotation, split_grid, combine_grid)
# 1.5: unet_residuals (conditioning inside the UNet: ControlNet) with DenoiserContext, UNetCall, UNetResiduals
#      and JobContext.state; register_root_api_routes with RootRoutesSpec; a list `args` in alwayson_scripts
# 1.6: ScriptContext.interrogate(image, model) and ScriptCheck.check_interrogation(model) (CLIP / DeepDanbooru)
# 1.7: register_xyz_axes(settings) may take the settings; vae_names(settings); ScriptSpec.fill_buttons and
#      .fill with ScriptFill (the UI's "fill values" buttons)
# 1.8: unet_cross_attention with CrossAttentionCall (decoupled cross-attention: IP-Adapter)
# 1.9: unet_residuals on FLUX.1 transformers: UNetCall.block_counts, UNetResiduals.blocks / .single_blocks;
#      DenoiserContext.encode (pixels -> the model's latents)
# 1.10: unet_hidden_states with HiddenStatesPatch and HiddenStatesCall (self-attention and block taps, reference
#      inputs: reference-only)
# 1.11: flux_keys_to_diffusers (FLUX.1 tensors in Black Forest Labs' layout -> diffusers' names)
API_VERSION = "1.11"

__all__ = [
    "API_VERSION", "AtelierError", "AxisSpec", "CrossAttentionCall", "DenoiserContext", "GridAnnotation", "ScriptCheck", "ScriptContext", "ScriptFill", "ScriptSpec",
    "annotate_grid", "combine_grid", "extend_result", "image_grid", "split_grid", "with_infotext_fields", "DenoiserStep", "EmbeddingSpec", "ExtraNetworkItem", "ExtraNetworkSpec",
    "ExtraNetworkTag", "GenerationParams", "Img2ImgParams", "InvalidParams", "JobContext", "ModelPatch", "OptionSpec", "PostprocessContext", "PostprocessorSpec", "Result", "RootRoutesSpec", "SamplerSpec",
    "ScheduleContext", "SchedulerSpec", "StyleSpec", "Txt2ImgParams", "UISectionSpec", "UITabSpec",
    "UNetCall", "UNetResiduals", "UpscalerSpec", "get_logger", "hookimpl", "to_d", "vae_names",
    "HiddenStatesCall", "HiddenStatesPatch", "flux_keys_to_diffusers",
]


def get_logger(extension_name: str) -> logging.Logger:
    """A logger under "atelier.ext.<name>", so users can filter one extension's messages."""
    return logging.getLogger(f"atelier.ext.{extension_name}")


def vae_names(settings) -> list[str]:
    """The VAE files a job's `sd_vae` may name (file names under the VAE folder), sorted; [] without settings."""
    from modules.checkpoints.discover import find_vaes

    folder = getattr(settings, "vae_dir", None)
    return sorted(path.name for path in find_vaes(folder)) if folder is not None else []


def to_d(x, sigma, denoised):
    """Karras ODE derivative dx/dsigma = (x - denoised) / sigma, for sampler extensions."""
    return (x - denoised) / sigma


def flux_keys_to_diffusers(state, hidden=None):
    """FLUX.1 tensors named as Black Forest Labs' files name them (`img_in`, `double_blocks.N.img_attn.qkv`,
    `single_blocks.N.linear1`, ...; any file prefix removed) -> diffusers' FluxTransformer2DModel names, the
    fused projections split. `hidden` (the model width, used only for single blocks' `linear1`) defaults to
    the rows of `img_in.weight`. A tensor outside that layout raises InvalidParams naming it."""
    from modules.checkpoints.mmdit_keys import flux_to_diffusers

    if hidden is None and "img_in.weight" in state:
        hidden = int(state["img_in.weight"].shape[0])
    if hidden is None and any(key.startswith("single_blocks.") for key in state):
        raise InvalidParams("flux_keys_to_diffusers: single blocks without img_in.weight need `hidden` (the model width)")
    try:
        return flux_to_diffusers(state, hidden or 0)
    except AtelierError as err:
        raise InvalidParams(str(err)) from None
    except ValueError:
        raise InvalidParams("FLUX.1 tensors: a double_blocks / single_blocks key has no block number") from None

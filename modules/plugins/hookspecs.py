"""Every hook Atelier calls. Built-in features implement these hooks too.

A hook implementation may accept any subset of a spec's arguments (pluggy matches
them by name), so specs can gain arguments without breaking extensions.
`docs/extensions.md` documents each hook with an example; a test checks that.
"""
from __future__ import annotations

from typing import Any

import pluggy

from modules.plugins.scripts import AxisSpec, ScriptSpec
from modules.plugins.specs import (
    EmbeddingSpec,
    ExtraNetworkSpec,
    PostprocessorSpec,
    SamplerSpec,
    SchedulerSpec,
    StyleSpec,
    UISectionSpec,
    UITabSpec,
    UpscalerSpec,
)

PROJECT = "atelier"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_samplers() -> list[SamplerSpec]:
    """Return sampler specs to add to the sampler registry."""


@hookspec
def register_schedulers() -> list[SchedulerSpec]:
    """Return noise-schedule specs to add to the schedule registry."""


@hookspec
def register_upscalers(settings: Any) -> list[UpscalerSpec]:
    """Return upscalers (latent modes or pixel-space functions) for the hires fix and Extras."""


@hookspec
def register_styles(settings: Any) -> list[StyleSpec]:
    """Return prompt styles to add to the styles selector."""


@hookspec
def register_postprocessors() -> list[PostprocessorSpec]:
    """Return image post-processors that run after decoding, with their UI options."""


@hookspec
def prepare_params(params: Any, context: Any) -> Any:
    """Return changed job parameters (or None to keep them) before a job runs."""


@hookspec
def cfg_denoiser(step: Any, params: Any) -> Any:
    """Return a replacement for a step's guided prediction (or None), after classifier-free guidance."""


@hookspec
def on_image_saved(path: Any, params: Any, infotext: str) -> None:
    """Called after a generated image was written to disk."""


@hookspec
def on_app_started(app: Any) -> None:
    """Called once the App (settings, engine, registries, extensions) is built."""


@hookspec
def register_ui_sections(tab: str) -> list[UISectionSpec]:
    """Return sections of controls to add to a generation tab ("txt2img" or "img2img")."""


@hookspec
def register_ui_tabs() -> list[UITabSpec]:
    """Return whole top-level tabs to add to the web UI."""


@hookspec
def register_api_routes() -> list[Any]:
    """Return FastAPI routers; they are mounted under /ext/<extension name>/."""


@hookspec
def register_extra_networks(settings: Any) -> list[ExtraNetworkSpec]:
    """Return extra-network kinds that prompt tags `<name:...>` name, with their browser cards."""


@hookspec
def patch_model(patch: Any, tags: Any, params: Any, context: Any) -> None:
    """Add copy-on-write weight deltas to a job's model for its prompt tags; they are reverted after the job."""


@hookspec
def register_embeddings(settings: Any) -> list[EmbeddingSpec]:
    """Return textual-inversion embeddings whose trigger words prompts may use."""


@hookspec
def register_scripts() -> list[ScriptSpec]:
    """Return selectable scripts (X/Y/Z plot, ...) for the Script dropdown and `script_name` in the API."""


@hookspec
def register_xyz_axes(settings: Any) -> list[AxisSpec]:
    """Return axes that the X/Y/Z plot script can vary (LoRA weight, for example); `settings` is optional."""


@hookspec
def unet_residuals(context: Any, params: Any, job: Any) -> Any:
    """Return a function `UNetCall -> UNetResiduals` whose residuals are added inside every UNet call of a pass."""


@hookspec
def register_root_api_routes() -> list[Any]:
    """Return RootRoutesSpec(prefix, router)s served at a top-level prefix, for another project's URLs."""


@hookspec
def unet_cross_attention(context: Any, params: Any, job: Any) -> Any:
    """Return a function `CrossAttentionCall -> tensor` whose result is added to every cross-attention output of a pass."""


@hookspec
def unet_hidden_states(context: Any, params: Any, job: Any) -> Any:
    """Return a HiddenStatesPatch that sees (and may replace) the UNet's self-attention and block states of a pass."""

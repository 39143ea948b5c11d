"""Built-in ControlNet, compatible with sd-webui-controlnet's API, written against the public plugin API only.

Hooks: `prepare_params` (the job's units from `extension_args["controlnet"]`, checked, written to
infotext), `unet_residuals` (per sampling pass: hints preprocessed once per job, the residual
function summing the ControlNet and T2I-Adapter units), `unet_cross_attention` (IP-Adapter units), `unet_hidden_states` (reference-only units), `register_root_api_routes` (/controlnet/*, as sd-webui-controlnet
serves them; also under /ext/controlnet/) and `register_ui_sections`. Each app gets its own
`ControlNetExtension` from `create_plugin`. See docs/controlnet.md.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from modules.plugins import api

from . import control, reference
from .annotators import Annotators, annotator_device
from .annotators.faces import FaceAnalyzer
from .models import ControlNetLibrary
from .routes import api_router
from .ui import controlnet_section
from .units import parse_units

NAME = "controlnet"
log = api.get_logger(NAME)


def create_plugin(settings: Any) -> ControlNetExtension:
    """The plugin one app registers (plugin API 1.2; FLUX.1 ControlNets need 1.9): its model library belongs to
    that app only."""
    return ControlNetExtension(settings)


class ControlNetExtension:
    """One app's ControlNet library (found files, converted tensors, built models) and settings."""

    def __init__(self, settings: Any) -> None:
        models_dir = Path(getattr(settings, "models_dir", "models"))
        self.library = ControlNetLibrary((models_dir / "ControlNet", Path(__file__).parent / "models"))
        self.annotators = Annotators(models_dir / "annotators",
                                     device=annotator_device(str(getattr(settings, "device", "cpu"))))
        self.unit_count = int(getattr(settings, "controlnet_unit_count", 3))
        self.hashes: dict = {}  # (path, mtime) -> short sha256, for model titles
        self.clip_vision = models_dir / "clip_vision"
        self.encoders: dict = {}  # the last CLIP vision encoder loaded, by path
        self.faces = FaceAnalyzer(models_dir / "insightface" / "models" / "buffalo_l")  # IP-Adapter FaceID

    @api.hookimpl
    def prepare_params(self, params, context):
        args = (params.extension_args or {}).get(NAME)
        if args is None or (isinstance(args, dict) and args.get("enabled") is False):
            return None
        units = parse_units(args, self.unit_count)
        planned = control.plan_units(units, self.library)
        context.state[NAME] = {"planned": planned}
        for p in planned:
            context.infotext[f"ControlNet {p.index}"] = p.unit.infotext()
        return None

    @api.hookimpl
    def unet_residuals(self, context, params, job):
        state = job.state.get(NAME)
        if not state or not state["planned"]:
            return None
        planned = [p for p in state["planned"] if p.path is not None and self.library.read(p.path).kind != "ip_adapter"]
        control.check_arch(state["planned"], self.library, context.arch)
        if not planned:
            return None
        hints = control.prepare_hints(planned, state, context, self.annotators, int(params.seed))
        if context.arch.startswith("flux"):
            residuals = control.flux_residuals(planned, hints, self.library, context)
        else:
            residuals = control.Residuals(planned, hints, self.library, context, state.get("base_unet"))
        state.setdefault("passes", []).append(residuals)
        return residuals

    @api.hookimpl
    def patch_model(self, patch, context):
        """Control-LoRAs are built from the loaded UNet: keep a reference to it for the job."""
        state = context.state.get(NAME)
        if state and any(p.path is not None and self.library.read(p.path).kind == "control_lora"
                         for p in state["planned"]):
            state["base_unet"] = patch.modules("unet")[""]

    @api.hookimpl
    def unet_cross_attention(self, context, params, job):
        state = job.state.get(NAME)
        planned = [p for p in (state or {}).get("planned", ())
                   if p.path is not None and self.library.read(p.path).kind == "ip_adapter"]
        if not planned:
            return None
        control.check_arch(planned, self.library, context.arch)
        tokens = control.ip_tokens(planned, state, context, self.library, self.encoders, self.clip_vision,
                                   self.faces)
        attention = control.IPAttention(planned, tokens, self.library, context)
        state.setdefault("ip_passes", []).append(attention)
        return attention

    @api.hookimpl
    def unet_hidden_states(self, context, params, job):
        """Reference-only units: the reference latents per pass, noised per call, injected into self-attention."""
        state = job.state.get(NAME)
        planned = [p for p in (state or {}).get("planned", ()) if p.path is None]
        if not planned:
            return None
        control.check_arch(planned, self.library, context.arch)
        hints = control.prepare_hints(planned, state, context, self.annotators, int(params.seed))
        patch = reference.ReferencePatch(planned, reference.reference_latents(planned, hints, context), context,
                                         int(params.seed))
        state.setdefault("reference_passes", []).append(patch)
        return patch.patch()

    @api.hookimpl
    def register_root_api_routes(self):
        return [api.RootRoutesSpec("/controlnet", api_router(self))]

    @api.hookimpl
    def register_api_routes(self):
        return [api_router(self)]

    @api.hookimpl
    def register_ui_sections(self, tab):
        return [controlnet_section(self, tab)]

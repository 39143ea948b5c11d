"""Model families that are data: latent format, prediction, shift, text encoders, defaults, names.

The SD1 / SD2 / SDXL families still live in detect.py's table; the flow-matching families
(FLUX.1 dev / schnell, SD3.5 Medium / Large) are declared here and the engine asks them
instead of branching on names. Numbers follow the published model configs (diffusers'
`scheduler_config.json` and VAE configs) and Forge's per-model presets.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LatentFormat:
    """How VAE latents are normalised: `latent = (vae_latent - shift) * scale`."""

    channels: int
    scale: float
    shift: float = 0.0


@dataclass(frozen=True)
class Family:
    """One flow-matching model family.

    shift:          the static time shift (SD3: 3.0; FLUX.1-schnell: 1.0);
    dynamic_shift:  FLUX.1-dev's resolution-dependent shift, (base, max) over 256..4096 image tokens;
    text_encoders:  the encoder names this family needs (`clip_l`, `clip_g`, `t5xxl`);
    t5_tokens:      (pad to, truncate at) for T5 prompts;
    distilled_cfg:  FLUX.1-dev's guidance-embedding default, None for families without one.
    """

    name: str
    label: str  # user-facing, in errors and the UI
    transformer: str  # "flux" or "sd3"
    latent: LatentFormat
    text_encoders: tuple[str, ...]
    t5_tokens: tuple[int, int]
    steps: int
    cfg_scale: float
    size: int
    vae_hint: str  # what the VAE file is usually called
    shift: float = 1.0
    dynamic_shift: tuple[float, float] | None = None
    distilled_cfg: float | None = None
    prediction: str = "flow"
    sampler: str = "Euler"  # the UI's default sampler and schedule for this family (Forge's presets)
    scheduler: str = "Simple"

    @property
    def uses_negative(self) -> bool:
        """Whether the default CFG runs a negative prompt (FLUX defaults to CFG 1, none)."""
        return self.cfg_scale > 1.0


FLUX_LATENT = LatentFormat(16, 0.3611, 0.1159)
SD3_LATENT = LatentFormat(16, 1.5305, 0.0609)

FLUX_DEV = Family("flux-dev", "FLUX.1-dev", "flux", FLUX_LATENT, ("clip_l", "t5xxl"), (512, 512),
                  steps=20, cfg_scale=1.0, size=1024, vae_hint="the FLUX VAE (ae.safetensors)",
                  shift=1.15, dynamic_shift=(0.5, 1.15), distilled_cfg=3.5)
FLUX_SCHNELL = Family("flux-schnell", "FLUX.1-schnell", "flux", FLUX_LATENT, ("clip_l", "t5xxl"), (256, 256),
                      steps=4, cfg_scale=1.0, size=1024, vae_hint="the FLUX VAE (ae.safetensors)", shift=1.0)
SD35_MEDIUM = Family("sd35-medium", "SD3.5 Medium", "sd3", SD3_LATENT, ("clip_l", "clip_g", "t5xxl"), (256, 512),
                     steps=40, cfg_scale=4.5, size=1024, vae_hint="the SD3 VAE", shift=3.0)
SD35_LARGE = Family("sd35-large", "SD3.5 Large", "sd3", SD3_LATENT, ("clip_l", "clip_g", "t5xxl"), (256, 512),
                    steps=28, cfg_scale=3.5, size=1024, vae_hint="the SD3 VAE", shift=3.0)

SD35_LARGE_TURBO = Family("sd35-large-turbo", "SD3.5 Large Turbo", "sd3", SD3_LATENT, ("clip_l", "clip_g", "t5xxl"),
                          (256, 512), steps=4, cfg_scale=1.0, size=1024, vae_hint="the SD3 VAE", shift=3.0)

FAMILIES = {f.name: f for f in (FLUX_DEV, FLUX_SCHNELL, SD35_MEDIUM, SD35_LARGE, SD35_LARGE_TURBO)}


def family(name: str) -> Family | None:
    return FAMILIES.get(name)


def is_turbo(name: str, metadata: dict[str, str] | None = None) -> bool:
    """SD3.5 Large Turbo has Large's architecture: told apart by the file's modelspec metadata
    (`modelspec.title` / `modelspec.architecture` naming "turbo"), else by "turbo" in the file or folder name."""
    fields = (metadata or {}).get("modelspec.title", ""), (metadata or {}).get("modelspec.architecture", "")
    return any("turbo" in str(v).lower() for v in fields) or "turbo" in name.lower()


def variant(fam: Family, name: str, metadata: dict[str, str] | None = None) -> Family:
    """The family a file belongs to, given the one its keys show (SD3.5 Large -> Large Turbo by name / metadata)."""
    return SD35_LARGE_TURBO if fam is SD35_LARGE and is_turbo(name, metadata) else fam


def defaults(fam: Family | None) -> dict[str, object]:
    """The generation defaults a UI applies for a family (None: SD's, left to the UI's built values)."""
    if fam is None:
        return {}
    out: dict[str, object] = {"steps": fam.steps, "cfg_scale": fam.cfg_scale, "sampler_name": fam.sampler,
                              "scheduler": fam.scheduler}
    if fam.distilled_cfg is not None:
        out["distilled_cfg_scale"] = fam.distilled_cfg
    return out

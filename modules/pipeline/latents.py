"""Latent <-> image: VAE decode with an fp32 NaN fallback, cheap previews, conditioning images."""
from __future__ import annotations

import logging

import numpy as np
import torch
from PIL import Image

from modules.pipeline.vae_tiling import VaeTiling, tiled_decode, tiled_encode

log = logging.getLogger(__name__)

# Linear latent -> RGB factors for a cheap preview (A1111's "Approx cheap" idea).
SD_LATENT_RGB = torch.tensor([[0.298, 0.207, 0.208], [0.187, 0.286, 0.173],
                              [-0.158, 0.189, 0.264], [-0.184, -0.271, -0.473]])
SDXL_LATENT_RGB = torch.tensor([[0.3651, 0.4232, 0.4341], [-0.2533, -0.0042, 0.1068],
                                [0.1076, 0.1111, -0.0362], [-0.3165, -0.2492, -0.2188]])


def cheap_preview(latent: torch.Tensor, is_sdxl: bool = False) -> Image.Image:
    """One latent [4, h, w] -> a small RGB image, by a fixed linear map (no VAE)."""
    factors = SDXL_LATENT_RGB if is_sdxl else SD_LATENT_RGB
    rgb = torch.einsum("chw,cr->hwr", latent[:4].float().cpu(), factors)
    rgb = ((rgb + 1.0) * 127.5).clamp(0, 255).to(torch.uint8).numpy()
    return Image.fromarray(rgb)


def latent_shift(model) -> float:
    """The latent format's shift factor of a LoadedModel (FLUX.1 / SD3.5), 0 for SD models."""
    family = model.spec.family
    return family.latent.shift if family is not None else 0.0


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[B, 3, H, W] in [-1, 1] -> PIL images."""
    array = ((images.float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(np.ascontiguousarray(a.permute(1, 2, 0).cpu().numpy())) for a in array]


def from_pil(images: list[Image.Image]) -> torch.Tensor:
    """PIL images -> [B, 3, H, W] float32 in [-1, 1]."""
    arrays = [np.asarray(im.convert("RGB"), dtype=np.float32) / 127.5 - 1.0 for im in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def _vae_decode(vae: torch.nn.Module, latents: torch.Tensor, tiling: VaeTiling | None = None) -> torch.Tensor:
    dtype = next(vae.parameters()).dtype
    device = next(vae.parameters()).device

    def run(z: torch.Tensor) -> torch.Tensor:
        return vae.decode(z.to(device, dtype), return_dict=False)[0].float()

    with torch.inference_mode():
        if tiling is not None and tiling.needed(*latents.shape[2:]):
            return tiled_decode(run, latents, tiling, norm_net=vae).to(device)
        return run(latents)


def decode(vae: torch.nn.Module, latents: torch.Tensor, scale_factor: float,
           tiling: VaeTiling | None = None, shift: float = 0.0) -> tuple[torch.Tensor, bool]:
    """Decode latents (tile by tile when `tiling` is given and the image is larger than a tile);
    on NaNs or infs from a half-precision VAE, retry in fp32 and keep it there.

    `shift` is the latent format's shift factor (FLUX.1 / SD3.5). Returns the images in [-1, 1]
    and whether the fp32 fallback was used.
    """
    latents = latents / scale_factor + shift
    images = _vae_decode(vae, latents, tiling)
    if torch.isfinite(images).all() or next(vae.parameters()).dtype == torch.float32:
        return images, False
    log.warning("NaNs or infs in the VAE output; switching the VAE to fp32")
    vae.to(torch.float32)
    return _vae_decode(vae, latents, tiling), True


def encode(vae: torch.nn.Module, images: torch.Tensor, scale_factor: float,
           tiling: VaeTiling | None = None, shift: float = 0.0) -> torch.Tensor:
    """Images [B, 3, H, W] in [-1, 1] -> scaled latents (the distribution's mode), tiled if asked."""
    dtype = next(vae.parameters()).dtype
    device = next(vae.parameters()).device

    def run(x: torch.Tensor) -> torch.Tensor:
        return vae.encode(x.to(device, dtype), return_dict=False)[0].mode().float()

    with torch.inference_mode():
        if tiling is not None and tiling.needed(images.shape[2] // 8, images.shape[3] // 8):
            channels = vae.config.latent_channels if hasattr(vae, "config") else 4
            return (tiled_encode(run, images, tiling, channels, norm_net=vae).to(device) - shift) * scale_factor
        return (run(images) - shift) * scale_factor


def txt2img_inpaint_concat(vae: torch.nn.Module, batch: int, height: int, width: int,
                           scale_factor: float) -> torch.Tensor:
    """9-channel inpainting models in txt2img: a full mask and a grey 'masked image', as A1111."""
    grey = torch.zeros(1, 3, height, width)  # 0.5 grey in [0, 1] is 0 in [-1, 1]
    latent = encode(vae, grey, scale_factor)
    mask = torch.ones(1, 1, *latent.shape[2:], device=latent.device)
    return torch.cat([mask, latent], dim=1).expand(batch, -1, -1, -1)

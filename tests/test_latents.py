"""Latent helpers: the fp32 fallback for a half-precision VAE that overflows, and previews."""
from __future__ import annotations

import torch

from modules.pipeline import latents as latent_ops


class OverflowingVAE(torch.nn.Module):
    """Decodes to NaN in half precision and to finite values in fp32, as SDXL's VAE does in fp16."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))

    def decode(self, z, return_dict=False):
        out = z.repeat(1, 1, 8, 8)[:, :3] * self.scale
        if self.scale.dtype != torch.float32:
            out = out * float("nan")
        return (out,)


def test_decode_falls_back_to_fp32_on_nans():
    vae = OverflowingVAE().to(torch.bfloat16)
    images, fell_back = latent_ops.decode(vae, torch.ones(1, 4, 2, 2), 0.5)
    assert fell_back and torch.isfinite(images).all()
    assert next(vae.parameters()).dtype == torch.float32
    assert torch.allclose(images, torch.full_like(images, 2.0))


def test_decode_keeps_a_healthy_vae():
    vae = OverflowingVAE()
    images, fell_back = latent_ops.decode(vae, torch.ones(1, 4, 2, 2), 0.5)
    assert not fell_back and images.shape == (1, 3, 16, 16)


def test_cheap_preview_maps_latent_channels_to_rgb():
    latent = torch.zeros(4, 3, 5)
    latent[0] = 1.0
    preview = latent_ops.cheap_preview(latent)
    assert preview.size == (5, 3)
    expected = [round((v + 1.0) * 127.5) for v in (0.298, 0.207, 0.208)]
    assert [abs(a - b) <= 1 for a, b in zip(preview.getpixel((0, 0)), expected, strict=True)] == [True] * 3

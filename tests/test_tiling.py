"""Seamless tiling: within a tiling job the UNet and VAE pad circularly, which makes them commute with a
circular shift of their input (the property that makes the image wrap); the padding comes back after."""
from __future__ import annotations

import numpy as np
import torch

from modules import infotext
from modules.pipeline.params import Txt2ImgParams
from modules.pipeline.tiling import circular_padding


def unet_out(model, x: torch.Tensor) -> torch.Tensor:
    context = torch.zeros(1, 77, model.unet.config.cross_attention_dim)
    with torch.no_grad():
        return model.unet(x, torch.tensor([500]), encoder_hidden_states=context).sample


def test_circular_padding_makes_unet_and_vae_shift_equivariant(sd1_engine):
    model = sd1_engine.models.current
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    shift = (8, 8)
    with circular_padding(True, model.unet, model.vae):
        assert torch.allclose(unet_out(model, torch.roll(x, shift, (2, 3))),
                              torch.roll(unet_out(model, x), shift, (2, 3)), atol=1e-4)
        with torch.no_grad():
            decoded = model.vae.decode(x).sample
            rolled = model.vae.decode(torch.roll(x, (2, 3), (2, 3))).sample
        assert torch.allclose(rolled, torch.roll(decoded, (16, 24), (2, 3)), atol=1e-4)
    assert not torch.allclose(unet_out(model, torch.roll(x, shift, (2, 3))),
                              torch.roll(unet_out(model, x), shift, (2, 3)), atol=1e-4)
    modes = {m.padding_mode for m in model.unet.modules() if isinstance(m, torch.nn.Conv2d)}
    assert modes == {"zeros"}


def test_tiling_job(sd1_engine):
    base = dict(prompt="bricks", steps=3, sampler_name="Euler", width=64, height=64, seed=5, rng_source="cpu",
                save_images=False)
    plain = sd1_engine.txt2img(Txt2ImgParams(**base))
    tiled = sd1_engine.txt2img(Txt2ImgParams(**base, tiling=True))
    assert infotext.parse(tiled.infotexts[0])["Tiling"] == "True"
    assert "Tiling" not in infotext.parse(plain.infotexts[0])
    assert not np.array_equal(np.asarray(plain.images[0]), np.asarray(tiled.images[0]))
    modes = {m.padding_mode for m in sd1_engine.models.current.vae.modules() if isinstance(m, torch.nn.Conv2d)}
    assert modes == {"zeros"}

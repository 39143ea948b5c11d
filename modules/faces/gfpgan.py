"""GFPGAN v1.3 / v1.4 ("GFPGANv1Clean"): a U-Net encoder whose features steer a StyleGAN2 decoder.

Module names follow the released state dicts (`conv_body_down.N`, `stylegan_decoder.style_convs.N`,
`condition_scale.N.0`, ...), so a file loads with `load_state_dict(strict=True)`. Sizes (output
side, channels, style width, MLP depth, SFT on half the channels) are read from the weights.
The decoder's noise inputs are the stored `noises.noiseN` buffers, so a restoration is deterministic.
Input and output: (B, 3, S, S) in [-1, 1].
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _lrelu(x: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu(x, 0.2)


def _resize2(x: torch.Tensor, factor: float) -> torch.Tensor:
    return F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False)


class ResBlock(nn.Module):
    """conv -> resize -> conv, plus a resized 1x1 skip (factor 0.5 down, 2 up)."""

    def __init__(self, c_in: int, c_out: int, factor: float) -> None:
        super().__init__()
        self.factor = factor
        self.conv1 = nn.Conv2d(c_in, c_in, 3, 1, 1)
        self.conv2 = nn.Conv2d(c_in, c_out, 3, 1, 1)
        self.skip = nn.Conv2d(c_in, c_out, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _lrelu(self.conv2(_resize2(_lrelu(self.conv1(x)), self.factor)))
        return out + self.skip(_resize2(x, self.factor))


class ModulatedConv(nn.Module):
    """StyleGAN2's weight-modulated convolution, batched as a grouped convolution."""

    def __init__(self, c_in: int, c_out: int, kernel: int, style_dim: int, demodulate: bool, up: bool) -> None:
        super().__init__()
        self.modulation = nn.Linear(style_dim, c_in)
        self.weight = nn.Parameter(torch.zeros(1, c_out, c_in, kernel, kernel))
        self.demodulate, self.up = demodulate, up

    def forward(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        b, c_in = x.shape[:2]
        w = self.weight * self.modulation(style).view(b, 1, c_in, 1, 1)
        if self.demodulate:
            w = w * torch.rsqrt(w.pow(2).sum([2, 3, 4]) + 1e-8).view(b, -1, 1, 1, 1)
        if self.up:
            x = _resize2(x, 2)
        c_out, k = w.shape[1], w.shape[-1]
        out = F.conv2d(x.reshape(1, b * c_in, *x.shape[2:]), w.reshape(b * c_out, c_in, k, k), padding=k // 2, groups=b)
        return out.view(b, c_out, *out.shape[2:])


class StyleConv(nn.Module):
    def __init__(self, c_in: int, c_out: int, style_dim: int, up: bool) -> None:
        super().__init__()
        self.modulated_conv = ModulatedConv(c_in, c_out, 3, style_dim, True, up)
        self.weight = nn.Parameter(torch.zeros(1))  # noise strength
        self.bias = nn.Parameter(torch.zeros(1, c_out, 1, 1))

    def forward(self, x: torch.Tensor, style: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        out = self.modulated_conv(x, style) * math.sqrt(2) + self.weight * noise + self.bias
        return _lrelu(out)


class ToRGB(nn.Module):
    def __init__(self, c_in: int, style_dim: int, up: bool) -> None:
        super().__init__()
        self.modulated_conv = ModulatedConv(c_in, 3, 1, style_dim, False, False)
        self.bias = nn.Parameter(torch.zeros(1, 3, 1, 1))
        self.up = up

    def forward(self, x: torch.Tensor, style: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        out = self.modulated_conv(x, style) + self.bias
        return out if skip is None else out + (_resize2(skip, 2) if self.up else skip)


class ConstantInput(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1, channels, 4, 4))


class StyleDecoder(nn.Module):
    """The StyleGAN2 generator with spatial feature transforms (SFT) from the encoder's conditions."""

    def __init__(self, channels: list[int], style_dim: int, num_mlp: int, sft_half: bool) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Identity()]  # NormStyleCode has no weights; unused with latent input
        for _ in range(num_mlp):
            layers += [nn.Linear(style_dim, style_dim), nn.LeakyReLU(0.2)]
        self.style_mlp = nn.Sequential(*layers)
        self.constant_input = ConstantInput(channels[0])
        self.style_conv1 = StyleConv(channels[0], channels[0], style_dim, False)
        self.to_rgb1 = ToRGB(channels[0], style_dim, False)
        self.style_convs, self.to_rgbs = nn.ModuleList(), nn.ModuleList()
        for c_in, c_out in zip(channels[:-1], channels[1:], strict=True):
            self.style_convs.extend([StyleConv(c_in, c_out, style_dim, True), StyleConv(c_out, c_out, style_dim, False)])
            self.to_rgbs.append(ToRGB(c_out, style_dim, True))
        self.noises = nn.Module()
        for i in range(2 * len(channels) - 1):
            side = 2 ** ((i + 5) // 2)
            self.noises.register_buffer(f"noise{i}", torch.zeros(1, 1, side, side))
        self.sft_half = sft_half

    def _sft(self, out: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        if not self.sft_half:
            return out * scale + shift
        same, sft = torch.split(out, out.shape[1] // 2, dim=1)
        return torch.cat([same, sft * scale + shift], dim=1)

    def forward(self, latent: torch.Tensor, conditions: list[torch.Tensor]) -> torch.Tensor:
        noise = [getattr(self.noises, f"noise{i}") for i in range(len(self.style_convs) + 1)]
        out = self.constant_input.weight.repeat(latent.shape[0], 1, 1, 1)
        out = self.style_conv1(out, latent[:, 0], noise[0])
        skip = self.to_rgb1(out, latent[:, 1])
        for k, to_rgb in enumerate(self.to_rgbs):
            i = 2 * k + 1
            out = self.style_convs[2 * k](out, latent[:, i], noise[i])
            if i < len(conditions):
                out = self._sft(out, conditions[i - 1], conditions[i])
            out = self.style_convs[2 * k + 1](out, latent[:, i + 1], noise[i + 1])
            skip = to_rgb(out, latent[:, i + 2], skip)
        return skip


def _condition(c: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c, c, 3, 1, 1), nn.LeakyReLU(0.2), nn.Conv2d(c, c_out, 3, 1, 1))


class GFPGAN(nn.Module):
    """GFPGANv1Clean with `input_is_latent` and one style code per layer (as v1.3 and v1.4 are trained)."""

    def __init__(self, unet: list[int], decoder: list[int], style_dim: int, num_mlp: int, sft_half: bool) -> None:
        super().__init__()
        # unet / decoder: channels from 4x4 up to the output size
        self.style_dim = style_dim
        self.conv_body_first = nn.Conv2d(3, unet[-1], 1)
        self.conv_body_down = nn.ModuleList(ResBlock(a, b, 0.5) for a, b in zip(unet[:0:-1], unet[-2::-1], strict=True))
        self.final_conv = nn.Conv2d(unet[0], unet[0], 3, 1, 1)
        self.conv_body_up = nn.ModuleList(ResBlock(a, b, 2) for a, b in zip(unet[:-1], unet[1:], strict=True))
        self.toRGB = nn.ModuleList(nn.Conv2d(c, 3, 1) for c in unet[1:])  # noqa: N815 (the file's name)
        self.final_linear = nn.Linear(unet[0] * 16, 2 * len(unet) * style_dim)
        self.stylegan_decoder = StyleDecoder(decoder, style_dim, num_mlp, sft_half)
        sft = [c if sft_half else 2 * c for c in unet[1:]]
        self.condition_scale = nn.ModuleList(_condition(c, s) for c, s in zip(unet[1:], sft, strict=True))
        self.condition_shift = nn.ModuleList(_condition(c, s) for c, s in zip(unet[1:], sft, strict=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = _lrelu(self.conv_body_first(x))
        skips = []
        for block in self.conv_body_down:
            feat = block(feat)
            skips.insert(0, feat)
        feat = _lrelu(self.final_conv(feat))
        latent = self.final_linear(feat.flatten(1)).view(x.shape[0], -1, self.style_dim)
        conditions = []
        for i, block in enumerate(self.conv_body_up):
            feat = block(feat + skips[i])
            conditions += [self.condition_scale[i](feat), self.condition_shift[i](feat)]
        return self.stylegan_decoder(latent, conditions)


def is_gfpgan(keys: set[str]) -> bool:
    return {"toRGB.0.weight", "stylegan_decoder.style_mlp.1.weight", "conv_body_first.weight"} <= keys


def build(sd: dict[str, torch.Tensor]) -> GFPGAN:
    """GFPGANv1Clean sized from its weights (raises KeyError / RuntimeError when they do not fit)."""
    levels = sum(1 for k in sd if k.startswith("conv_body_up.") and k.endswith(".conv1.weight"))
    unet = [sd["final_conv.weight"].shape[0]] + [sd[f"conv_body_up.{i}.conv2.weight"].shape[0] for i in range(levels)]
    decoder = [sd["stylegan_decoder.style_conv1.modulated_conv.weight"].shape[1]] + [
        sd[f"stylegan_decoder.style_convs.{2 * i}.modulated_conv.weight"].shape[1] for i in range(levels)]
    style_dim = sd["stylegan_decoder.style_conv1.modulated_conv.modulation.weight"].shape[1]
    num_mlp = sum(1 for k in sd if k.startswith("stylegan_decoder.style_mlp.") and k.endswith(".weight"))
    sft_half = sd["condition_scale.0.2.weight"].shape[0] == unet[1]
    net = GFPGAN(unet, decoder, style_dim, num_mlp, sft_half)
    net.load_state_dict(sd, strict=True)
    return net

"""SwinIR (Liang et al. 2021, "SwinIR: Image Restoration Using Swin Transformer"), in its released layouts.

Shallow conv `conv_first`; residual Swin transformer blocks `layers.N` (each a group of Swin blocks
`residual_group.blocks.M`, then a conv `conv` (1conv) or `conv.0/2/4` (3conv) and a residual);
`norm`; `conv_after_body` plus the shallow features; then the reconstruction, detected from the keys:
- classical SR, "pixelshuffle": `conv_before_upsample.0`, `upsample.0, 2, ...`, `conv_last`;
- lightweight SR, "pixelshuffledirect": one conv `upsample.0` to out_ch * scale², pixel shuffle;
- real-world SR, "nearest+conv": `conv_before_upsample.0`, `conv_up1` (`conv_up2`), `conv_hr`, `conv_last`;
- denoising / JPEG (no upsampler): `conv_last` added to the input, scale 1.
Window size, depths, heads, widths and scale come from the shapes; the input range is 0-255 for the
window-7 (JPEG) models and 0-1 otherwise, as released. Input is reflect-padded to whole windows and
the output cropped back.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from modules.errors import CheckpointError
from modules.upscalers import swin

BLOCK0 = "layers.0.residual_group.blocks.0."
NOT_SWINIR = ("attn.logit_scale", "conv_block.cab.0.weight")  # Swin2SR (SwinV2 attention), HAT
LEFT_TO_SPANDREL = ("absolute_pos_embed", "conv_first.1.weight")  # variants no release uses


@dataclass(frozen=True)
class SwinIRConfig:
    in_ch: int
    embed_dim: int
    depths: tuple[int, ...]
    heads: tuple[int, ...]
    ws: int
    shifted: bool  # odd blocks shift their windows (all releases; not when trained on images <= a window)
    mlp_hidden: int
    qkv_bias: bool
    patch_norm: bool
    three_conv: bool  # residual convs: "3conv" (conv, 1x1, conv) or "1conv"
    upsampler: str  # "pixelshuffle", "pixelshuffledirect", "nearest+conv" or ""
    num_feat: int
    scale: int
    img_range: float


def residual_conv(dim: int, three: bool) -> nn.Module:
    """The conv closing a residual group: one 3x3, or 3x3 to dim/4, 1x1, 3x3 back (LeakyReLU 0.2)."""
    if not three:
        return nn.Conv2d(dim, dim, 3, 1, 1)
    q = dim // 4
    return nn.Sequential(nn.Conv2d(dim, q, 3, 1, 1), nn.LeakyReLU(0.2), nn.Conv2d(q, q, 1, 1, 0),
                         nn.LeakyReLU(0.2), nn.Conv2d(q, dim, 3, 1, 1))


class BlockGroup(nn.Module):
    """Holds `blocks` so the keys read `residual_group.blocks.M`."""

    def __init__(self, blocks: list[nn.Module]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)


class RSTB(nn.Module):
    """Residual Swin transformer block: Swin blocks, a conv on the image, plus the input."""

    def __init__(self, c: SwinIRConfig, depth: int, heads: int) -> None:
        super().__init__()
        self.residual_group = BlockGroup([
            swin.SwinBlock(c.embed_dim, heads, c.ws, c.ws // 2 if i % 2 and c.shifted else 0, c.mlp_hidden,
                           c.qkv_bias)
            for i in range(depth)])
        self.conv = residual_conv(c.embed_dim, c.three_conv)

    def forward(self, x: torch.Tensor, size: tuple[int, int], index: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = x
        for block in self.residual_group.blocks:
            h = block(h, size, index, mask)
        return self.conv(swin.tokens_to_image(h, size)).flatten(2).transpose(1, 2) + x


class SwinIR(nn.Module):
    def __init__(self, c: SwinIRConfig) -> None:
        super().__init__()
        self.config = c
        out_ch = c.in_ch
        self.register_buffer("mean", swin.image_mean(c.in_ch), persistent=False)
        self.register_buffer("index", swin.relative_position_index(c.ws), persistent=False)
        self.conv_first = nn.Conv2d(c.in_ch, c.embed_dim, 3, 1, 1)
        self.patch_embed = swin.PatchNorm(c.embed_dim, c.patch_norm)
        self.layers = nn.ModuleList(RSTB(c, d, h) for d, h in zip(c.depths, c.heads, strict=True))
        self.norm = nn.LayerNorm(c.embed_dim)
        self.conv_after_body = residual_conv(c.embed_dim, c.three_conv)
        if c.upsampler in ("pixelshuffle", "nearest+conv"):
            self.conv_before_upsample = nn.Sequential(nn.Conv2d(c.embed_dim, c.num_feat, 3, 1, 1), nn.LeakyReLU())
        if c.upsampler == "pixelshuffle":
            self.upsample = swin.pixelshuffle_upsample(c.scale, c.num_feat)
        elif c.upsampler == "pixelshuffledirect":
            self.upsample = nn.Sequential(nn.Conv2d(c.embed_dim, out_ch * c.scale ** 2, 3, 1, 1),
                                          nn.PixelShuffle(c.scale))
        elif c.upsampler == "nearest+conv":
            for k in range(1, int(math.log2(c.scale)) + 1):
                self.add_module(f"conv_up{k}", nn.Conv2d(c.num_feat, c.num_feat, 3, 1, 1))
            self.conv_hr = nn.Conv2d(c.num_feat, c.num_feat, 3, 1, 1)
        if c.upsampler != "pixelshuffledirect":
            self.conv_last = nn.Conv2d(c.num_feat if c.upsampler else c.embed_dim, out_ch, 3, 1, 1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        size = (x.shape[2], x.shape[3])
        mask = swin.shift_mask(*size, self.config.ws, self.config.ws // 2).to(x.device)
        tokens = self.patch_embed(x)
        for layer in self.layers:
            tokens = layer(tokens, size, self.index, mask)
        return self.conv_after_body(swin.tokens_to_image(self.norm(tokens), size)) + x

    def reconstruct(self, feat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        up = self.config.upsampler
        if up == "pixelshuffledirect":
            return self.upsample(feat)
        if not up:
            return x + self.conv_last(feat)
        feat = self.conv_before_upsample(feat)
        if up == "pixelshuffle":
            return self.conv_last(self.upsample(feat))
        for k in range(1, int(math.log2(self.config.scale)) + 1):
            conv = getattr(self, f"conv_up{k}")
            feat = F.leaky_relu(conv(F.interpolate(feat, scale_factor=2, mode="nearest")), 0.2)
        return self.conv_last(F.leaky_relu(self.conv_hr(feat), 0.2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[2:]
        c = self.config
        x = (swin.pad_to_window(x, c.ws) - self.mean) * c.img_range
        out = self.reconstruct(self.features(self.conv_first(x)), x)
        return (out / c.img_range + self.mean)[:, :, : h * c.scale, : w * c.scale]


def is_swinir(keys: set[str]) -> bool:
    return ("conv_first.weight" in keys and f"{BLOCK0}attn.relative_position_bias_table" in keys
            and not any(f"{BLOCK0}{k}" in keys for k in NOT_SWINIR) and not any(k in keys for k in LEFT_TO_SPANDREL))


def _shifted(sd: dict[str, torch.Tensor]) -> bool:
    """Shifted windows, unless the saved buffers show a second block without a shift mask."""
    second = "layers.0.residual_group.blocks.1."
    return not (f"{second}attn.relative_position_index" in sd and f"{second}attn_mask" not in sd)


def _upsampler(sd: dict[str, torch.Tensor]) -> str:
    if "conv_before_upsample.0.weight" in sd:
        return "nearest+conv" if "conv_up1.weight" in sd else "pixelshuffle"
    return "pixelshuffledirect" if "upsample.0.weight" in sd else ""


def _scale(sd: dict[str, torch.Tensor], upsampler: str, in_ch: int, num_feat: int) -> int:
    if upsampler == "pixelshuffle":
        return swin.pixelshuffle_scale(sd, "upsample", num_feat)
    if upsampler == "nearest+conv":
        return 2 ** swin.count(sd, r"^conv_up(\d+)\.weight$")
    if upsampler == "pixelshuffledirect":
        scale = math.isqrt(sd["upsample.0.weight"].shape[0] // in_ch)
        if scale * scale * in_ch != sd["upsample.0.weight"].shape[0]:
            raise CheckpointError(f"SwinIR: upsample.0 has {sd['upsample.0.weight'].shape[0]} outputs, "
                                  f"not {in_ch} x scale²")
        return scale
    return 1


def config_from(sd: dict[str, torch.Tensor]) -> SwinIRConfig:
    first = sd["conv_first.weight"]
    in_ch, dim = first.shape[1], first.shape[0]
    layers = swin.count(sd, r"^layers\.(\d+)\.residual_group\.")
    depths = tuple(swin.count(sd, rf"^layers\.{i}\.residual_group\.blocks\.(\d+)\.") for i in range(layers))
    heads = tuple(sd[f"layers.{i}.residual_group.blocks.0.attn.relative_position_bias_table"].shape[1]
                  for i in range(layers))
    ws = swin.window_from_table(sd[f"{BLOCK0}attn.relative_position_bias_table"])
    upsampler = _upsampler(sd)
    num_feat = sd["conv_before_upsample.0.weight"].shape[0] if "conv_before_upsample.0.weight" in sd else dim
    return SwinIRConfig(
        in_ch=in_ch, embed_dim=dim, depths=depths, heads=heads, ws=ws, shifted=_shifted(sd),
        mlp_hidden=sd[f"{BLOCK0}mlp.fc1.weight"].shape[0], qkv_bias=f"{BLOCK0}attn.qkv.bias" in sd,
        patch_norm="patch_embed.norm.weight" in sd, three_conv="conv_after_body.weight" not in sd,
        upsampler=upsampler, num_feat=num_feat, scale=_scale(sd, upsampler, in_ch, num_feat),
        img_range=255.0 if ws == 7 else 1.0)


def network_weights(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The learned weights: the checkpoints' position-index and shift-mask buffers are recomputed."""
    return {k: v for k, v in sd.items() if not k.endswith(("attn.relative_position_index", ".attn_mask"))}


LABELS = {"pixelshuffle": "SwinIR", "pixelshuffledirect": "SwinIR (lightweight)",
          "nearest+conv": "SwinIR (real-world SR)", "": "SwinIR (restoration)"}


def build(sd: dict[str, torch.Tensor]) -> tuple[nn.Module, int, str]:
    """(network with the weights loaded, scale, variant label) for a SwinIR state dict."""
    config = config_from(sd)
    if config.upsampler == "nearest+conv" and config.scale not in (2, 4, 8):
        raise CheckpointError(f"SwinIR (real-world SR): {int(math.log2(config.scale))} conv_up layers")
    net = SwinIR(config)
    net.load_state_dict(network_weights(sd), strict=True)
    return net, config.scale, LABELS[config.upsampler]

"""HAT (Chen et al. 2023, "Activating More Pixels in Image Super-Resolution Transformer"): HAT-S, HAT, HAT-L.

SwinIR's layout (`conv_first`, `layers.N.residual_group.blocks.M`, `conv_after_body`,
`conv_before_upsample.0`, `upsample.0, 2, ...`, `conv_last`) with two additions:
- each block (HAB) adds a channel-attention conv branch `conv_block.cab.{0,2,3.attention.1,3}`,
  scaled by 0.01, beside the window attention;
- each group ends with an overlapping cross-attention block `residual_group.overlap_attn` (OCAB):
  queries from ws x ws windows attend to keys and values from enlarged windows of side ows.
The variants differ only in sizes, read from the shapes: HAT-L has 12 groups, HAT-S squeezes the
conv branch by 24 (HAT by 3). Input is reflect-padded to whole windows and the output cropped back.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from modules.upscalers import swin
from modules.upscalers.swinir import BlockGroup

BLOCK0 = "layers.0.residual_group.blocks.0."
CONV_SCALE = 0.01  # weight of the conv branch in every HAB, fixed in the released models


@dataclass(frozen=True)
class HATConfig:
    in_ch: int
    embed_dim: int
    depths: tuple[int, ...]
    heads: tuple[int, ...]
    ws: int
    ows: int  # side of OCAB's enlarged key/value windows
    mlp_hidden: int
    cab_hidden: int  # conv branch width (embed_dim / compress ratio)
    squeeze: int  # channel-attention width (embed_dim / squeeze factor)
    qkv_bias: bool
    patch_norm: bool
    one_conv: bool  # a conv closing each group and the body ("1conv"), else identity
    num_feat: int
    img_range: float = 1.0


class ChannelAttention(nn.Module):
    def __init__(self, dim: int, squeeze: int) -> None:
        super().__init__()
        self.attention = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(dim, squeeze, 1), nn.ReLU(),
                                       nn.Conv2d(squeeze, dim, 1), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.attention(x)


class CAB(nn.Module):
    """Channel-attention block: conv, GELU, conv, channel attention (keys `cab.0`, `cab.2`, `cab.3`)."""

    def __init__(self, dim: int, hidden: int, squeeze: int) -> None:
        super().__init__()
        self.cab = nn.Sequential(nn.Conv2d(dim, hidden, 3, 1, 1), nn.GELU(), nn.Conv2d(hidden, dim, 3, 1, 1),
                                 ChannelAttention(dim, squeeze))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cab(x)


class HAB(swin.SwinBlock):
    """Hybrid attention block: (shifted) window attention plus the scaled conv branch, then the MLP."""

    def __init__(self, c: HATConfig, heads: int, shift: int) -> None:
        super().__init__(c.embed_dim, heads, c.ws, shift, c.mlp_hidden, c.qkv_bias)
        self.conv_block = CAB(c.embed_dim, c.cab_hidden, c.squeeze)

    def forward(self, x: torch.Tensor, size: tuple[int, int], index: torch.Tensor, mask: torch.Tensor | None
                ) -> torch.Tensor:
        h = self.norm1(x)
        conv = self.conv_block(swin.tokens_to_image(h, size)).flatten(2).transpose(1, 2)
        x = x + self.attend(h, size, index, mask) + conv * CONV_SCALE
        return x + self.mlp(self.norm2(x))


class OCAB(nn.Module):
    """Overlapping cross-attention: window queries, keys/values unfolded from enlarged windows."""

    def __init__(self, c: HATConfig, heads: int, mlp_hidden: int) -> None:
        super().__init__()
        self.ws, self.ows, self.heads = c.ws, c.ows, heads
        dim = c.embed_dim
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, dim * 3, bias=c.qkv_bias)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((c.ws + c.ows - 1) ** 2, heads))
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = swin.Mlp(dim, mlp_hidden)

    def _key_windows(self, t: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B * windows, ows², C): each window's enlarged, zero-padded neighbourhood."""
        c = t.shape[1]
        cols = F.unfold(t, self.ows, padding=(self.ows - self.ws) // 2, stride=self.ws)  # B, C*ows², windows
        b, _, n = cols.shape
        return cols.view(b, c, self.ows * self.ows, n).permute(0, 3, 2, 1).reshape(b * n, self.ows ** 2, c)

    def forward(self, x: torch.Tensor, size: tuple[int, int], index: torch.Tensor) -> torch.Tensor:
        b, length, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        q = swin.to_windows(q.view(b, *size, c), self.ws)
        k, v = (self._key_windows(swin.tokens_to_image(t, size)) for t in (k, v))
        bias = self.relative_position_bias_table[index].permute(2, 0, 1)
        out = swin.from_windows(swin.attention(q, k, v, self.heads, bias, None), self.ws, *size)
        x = self.proj(out.reshape(b, length, c)) + x
        return x + self.mlp(self.norm2(x))


class RHAG(nn.Module):
    """Residual hybrid attention group: HABs, one OCAB, a conv (or none) on the image, plus the input."""

    def __init__(self, c: HATConfig, depth: int, heads: int, oca_hidden: int) -> None:
        super().__init__()
        self.residual_group = BlockGroup([HAB(c, heads, c.ws // 2 if i % 2 else 0) for i in range(depth)])
        self.residual_group.overlap_attn = OCAB(c, heads, oca_hidden)
        self.conv = nn.Conv2d(c.embed_dim, c.embed_dim, 3, 1, 1) if c.one_conv else nn.Identity()

    def forward(self, x: torch.Tensor, size: tuple[int, int], indices: tuple[torch.Tensor, torch.Tensor],
                mask: torch.Tensor) -> torch.Tensor:
        h = x
        for block in self.residual_group.blocks:
            h = block(h, size, indices[0], mask)
        h = self.residual_group.overlap_attn(h, size, indices[1])
        return self.conv(swin.tokens_to_image(h, size)).flatten(2).transpose(1, 2) + x


class HAT(nn.Module):
    def __init__(self, c: HATConfig, oca_hidden: int, scale: int) -> None:
        super().__init__()
        self.config, self.scale = c, scale
        self.register_buffer("mean", swin.image_mean(c.in_ch), persistent=False)
        self.register_buffer("index_sa", swin.relative_position_index(c.ws), persistent=False)
        self.register_buffer("index_oca", swin.overlap_position_index(c.ws, c.ows), persistent=False)
        self.conv_first = nn.Conv2d(c.in_ch, c.embed_dim, 3, 1, 1)
        self.patch_embed = swin.PatchNorm(c.embed_dim, c.patch_norm)
        self.layers = nn.ModuleList(RHAG(c, d, h, oca_hidden) for d, h in zip(c.depths, c.heads, strict=True))
        self.norm = nn.LayerNorm(c.embed_dim)
        self.conv_after_body = nn.Conv2d(c.embed_dim, c.embed_dim, 3, 1, 1) if c.one_conv else nn.Identity()
        self.conv_before_upsample = nn.Sequential(nn.Conv2d(c.embed_dim, c.num_feat, 3, 1, 1), nn.LeakyReLU())
        self.upsample = swin.pixelshuffle_upsample(scale, c.num_feat)
        self.conv_last = nn.Conv2d(c.num_feat, c.in_ch, 3, 1, 1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        size = (x.shape[2], x.shape[3])
        mask = swin.shift_mask(*size, self.config.ws, self.config.ws // 2).to(x.device)
        tokens = self.patch_embed(x)
        for layer in self.layers:
            tokens = layer(tokens, size, (self.index_sa, self.index_oca), mask)
        return self.conv_after_body(swin.tokens_to_image(self.norm(tokens), size)) + x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[2:]
        c = self.config
        x = swin.pad_to_window((x - self.mean) * c.img_range, c.ws)
        out = self.conv_last(self.upsample(self.conv_before_upsample(self.features(self.conv_first(x)))))
        return (out / c.img_range + self.mean)[:, :, : h * self.scale, : w * self.scale]


def is_hat(keys: set[str]) -> bool:
    return "conv_first.weight" in keys and f"{BLOCK0}conv_block.cab.0.weight" in keys and (
        "layers.0.residual_group.overlap_attn.qkv.weight" in keys)


def config_from(sd: dict[str, torch.Tensor]) -> HATConfig:
    first = sd["conv_first.weight"]
    dim = first.shape[0]
    layers = swin.count(sd, r"^layers\.(\d+)\.residual_group\.")
    ws = swin.window_from_table(sd[f"{BLOCK0}attn.relative_position_bias_table"])
    oca_table = sd["layers.0.residual_group.overlap_attn.relative_position_bias_table"]
    return HATConfig(
        in_ch=first.shape[1], embed_dim=dim,
        depths=tuple(swin.count(sd, rf"^layers\.{i}\.residual_group\.blocks\.(\d+)\.") for i in range(layers)),
        heads=tuple(sd[f"layers.{i}.residual_group.overlap_attn.relative_position_bias_table"].shape[1]
                    for i in range(layers)),
        ws=ws, ows=swin.window_from_table(oca_table, other=ws),
        mlp_hidden=sd[f"{BLOCK0}mlp.fc1.weight"].shape[0],
        cab_hidden=sd[f"{BLOCK0}conv_block.cab.0.weight"].shape[0],
        squeeze=sd[f"{BLOCK0}conv_block.cab.3.attention.1.weight"].shape[0],
        qkv_bias=f"{BLOCK0}attn.qkv.bias" in sd, patch_norm="patch_embed.norm.weight" in sd,
        one_conv="conv_after_body.weight" in sd, num_feat=sd["conv_last.weight"].shape[1])


def variant(c: HATConfig) -> str:
    """HAT-L has 12 groups; HAT-S compresses the conv branch 24-fold where HAT and HAT-L use 3."""
    if len(c.depths) >= 9:
        return "HAT-L"
    return "HAT-S" if c.cab_hidden * 4 < c.embed_dim else "HAT"


def network_weights(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The learned weights: the checkpoints' position-index buffers are recomputed."""
    return {k: v for k, v in sd.items() if k not in ("relative_position_index_SA", "relative_position_index_OCA")
            and not k.endswith(".attn_mask")}


def build(sd: dict[str, torch.Tensor]) -> tuple[nn.Module, int, str]:
    """(network with the weights loaded, scale, HAT-S / HAT / HAT-L) for a HAT state dict."""
    config = config_from(sd)
    scale = swin.pixelshuffle_scale(sd, "upsample", config.num_feat)
    oca_hidden = sd["layers.0.residual_group.overlap_attn.mlp.fc1.weight"].shape[0]
    net = HAT(config, oca_hidden, scale)
    net.load_state_dict(network_weights(sd), strict=True)
    return net, scale, variant(config)

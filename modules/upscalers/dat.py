"""DAT (Dual Aggregation Transformer, Chen et al. ICCV 2023), as published in its key layout.

Keys: `conv_first`, `before_RG.1` (LayerNorm on the tokens), `layers.G.blocks.B` (residual groups of
blocks: even blocks use spatial window attention, odd ones channel attention, each with a
depthwise-conv branch and `channel_interaction`/`spatial_interaction` gates between the two, then
the spatial-gate FFN `ffn`), `layers.G.conv`, `norm`, `conv_after_body`, then either
`conv_before_upsample.0` / `upsample.2k` / `conv_last` (pixel shuffle) or `upsample.0` (one-step,
DAT-light). The spatial attention splits the channels in two halves attending in h x w and w x h
windows (`split_size`, read from the stored `rpe_biases`); some blocks shift the windows by half.

Variants by their published settings: DAT-light (one-step upsampler), DAT-S (8x16 windows),
DAT-2 (8x32 windows, FFN expansion 2) and DAT (8x32, expansion 4).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from modules.errors import CheckpointError
from modules.upscalers.shapes import seq_len

RGB_MEAN = (0.4488, 0.4371, 0.4040)
DERIVED_BUFFERS = ("rpe_biases", "relative_position_index", "attn_mask_0", "attn_mask_1")  # recomputed here
MASKED = -100.0


class ToTokens(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2).transpose(1, 2)


def to_image(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, h, w)


class DynamicPosBias(nn.Module):
    """An MLP from relative (dy, dx) offsets to a per-head attention bias."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        pos_dim = dim // 4

        def mlp(out: int) -> nn.Sequential:
            return nn.Sequential(nn.LayerNorm(pos_dim), nn.ReLU(), nn.Linear(pos_dim, out))

        self.pos_proj = nn.Linear(2, pos_dim)
        self.pos1, self.pos2, self.pos3 = mlp(pos_dim), mlp(pos_dim), mlp(heads)

    def forward(self, offsets: torch.Tensor) -> torch.Tensor:
        return self.pos3(self.pos2(self.pos1(self.pos_proj(offsets))))


class WindowBranch(nn.Module):
    """Multi-head attention inside win_h x win_w windows of (B, H, W, C) q/k/v, with a dynamic position bias."""

    def __init__(self, dim: int, heads: int, win_h: int, win_w: int) -> None:
        super().__init__()
        self.heads, self.win_h, self.win_w = heads, win_h, win_w
        self.pos = DynamicPosBias(dim // 4, heads)
        dy, dx = torch.meshgrid(torch.arange(1 - win_h, win_h), torch.arange(1 - win_w, win_w), indexing="ij")
        self.register_buffer("rpe_biases", torch.stack([dy.flatten(), dx.flatten()], 1).float(), persistent=False)
        ys, xs = torch.meshgrid(torch.arange(win_h), torch.arange(win_w), indexing="ij")
        ys, xs = ys.flatten(), xs.flatten()
        index = (ys[:, None] - ys[None, :] + win_h - 1) * (2 * win_w - 1) + xs[:, None] - xs[None, :] + win_w - 1
        self.register_buffer("relative_position_index", index, persistent=False)

    def _windows(self, t: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, nW, heads, h*w, C/heads)."""
        b, h, w, c = t.shape
        t = t.reshape(b, h // self.win_h, self.win_h, w // self.win_w, self.win_w, self.heads, c // self.heads)
        return t.permute(0, 1, 3, 5, 2, 4, 6).reshape(b, -1, self.heads, self.win_h * self.win_w, c // self.heads)

    def forward(self, qkv: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        _, b, h, w, c = qkv.shape
        q, k, v = (self._windows(t) for t in qkv)
        n = self.win_h * self.win_w
        bias = self.pos(self.rpe_biases)[self.relative_position_index.flatten()].reshape(n, n, -1).permute(2, 0, 1)
        if mask is not None:  # (nW, N, N) -> per window and head
            bias = bias + mask[:, None]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
        out = out.reshape(b, h // self.win_h, w // self.win_w, self.heads, self.win_h, self.win_w, -1)
        return out.permute(0, 1, 4, 2, 5, 3, 6).reshape(b, h, w, c)


def shift_mask(h: int, w: int, win: tuple[int, int], shift: tuple[int, int], device: torch.device) -> torch.Tensor:
    """(nW, N, N) additive mask keeping shifted windows from attending across the wrapped-around border."""
    labels = torch.zeros(h, w, device=device)
    h_parts = (slice(0, -win[0]), slice(-win[0], -shift[0]), slice(-shift[0], None))
    w_parts = (slice(0, -win[1]), slice(-win[1], -shift[1]), slice(-shift[1], None))
    for i, hs in enumerate(h_parts):
        for j, ws in enumerate(w_parts):
            labels[hs, ws] = 3 * i + j
    windows = labels.reshape(h // win[0], win[0], w // win[1], win[1]).permute(0, 2, 1, 3).flatten(2).flatten(0, 1)
    same = windows[:, None, :] == windows[:, :, None]
    return torch.zeros(same.shape, device=device).masked_fill(~same, MASKED)


class _GatedMixer(nn.Module):
    """Shared parts of both attentions: qkv, the depthwise-conv branch, the two interaction gates, proj."""

    def __init__(self, dim: int, qkv_bias: bool) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.dwconv = nn.Sequential(nn.Conv2d(dim, dim, 3, padding=1, groups=dim), nn.BatchNorm2d(dim), nn.GELU())
        self.channel_interaction = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(dim, dim // 8, 1),
                                                 nn.BatchNorm2d(dim // 8), nn.GELU(), nn.Conv2d(dim // 8, dim, 1))
        self.spatial_interaction = nn.Sequential(nn.Conv2d(dim, dim // 16, 1), nn.BatchNorm2d(dim // 16), nn.GELU(),
                                                 nn.Conv2d(dim // 16, 1, 1))


class SpatialAttention(_GatedMixer):
    """Half the channels in h x w windows, half in w x h; gated against a depthwise conv of v."""

    def __init__(self, dim: int, heads: int, split: tuple[int, int], qkv_bias: bool, shifted: bool) -> None:
        super().__init__(dim, qkv_bias)
        self.split, self.shifted = split, shifted
        self.attns = nn.ModuleList([WindowBranch(dim // 2, heads // 2, split[0], split[1]),
                                    WindowBranch(dim // 2, heads // 2, split[1], split[0])])

    def _branch(self, index: int, qkv: torch.Tensor) -> torch.Tensor:
        win = self.split if index == 0 else self.split[::-1]
        if not self.shifted:
            return self.attns[index](qkv, None)
        shift = (win[0] // 2, win[1] // 2)
        mask = shift_mask(qkv.shape[2], qkv.shape[3], win, shift, qkv.device)
        out = self.attns[index](torch.roll(qkv, (-shift[0], -shift[1]), dims=(2, 3)), mask)
        return torch.roll(out, shift, dims=(1, 2))

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, h, w, 3, c).permute(3, 0, 1, 2, 4)  # (3, B, H, W, C)
        v = qkv[2].permute(0, 3, 1, 2)
        step = max(self.split)
        qkv = F.pad(qkv, (0, 0, 0, -w % step, 0, -h % step))
        halves = (self._branch(i, part) for i, part in enumerate(qkv.chunk(2, -1)))
        attended = torch.cat([out[:, :h, :w] for out in halves], -1).reshape(b, n, c)
        conv = self.dwconv(v)
        channel_gate = self.channel_interaction(conv).reshape(b, 1, c)
        spatial_gate = self.spatial_interaction(to_image(attended, h, w))
        mixed = attended * torch.sigmoid(channel_gate) + (torch.sigmoid(spatial_gate) * conv).flatten(2).transpose(1, 2)
        return self.proj(mixed)


class ChannelAttention(_GatedMixer):
    """Transposed attention (channel x channel per head, cosine similarity, learned temperature)."""

    def __init__(self, dim: int, heads: int, qkv_bias: bool) -> None:
        super().__init__(dim, qkv_bias)
        self.heads = heads
        self.temperature = nn.Parameter(torch.ones(heads, 1, 1))

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 4, 1)  # (B, heads, d, N)
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        attn = ((q @ k.transpose(-2, -1)) * self.temperature).softmax(-1)
        attended = (attn @ v).permute(0, 3, 1, 2).reshape(b, n, c)
        conv = self.dwconv(v.reshape(b, c, h, w))
        channel_gate = self.channel_interaction(to_image(attended, h, w))
        spatial_gate = self.spatial_interaction(conv).reshape(b, n, 1)
        mixed = attended * torch.sigmoid(spatial_gate) + (conv * torch.sigmoid(channel_gate)).flatten(2).transpose(1, 2)
        return self.proj(mixed)


class SpatialGate(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.conv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        kept, gate = x.chunk(2, -1)
        return kept * self.conv(to_image(self.norm(gate), h, w)).flatten(2).transpose(1, 2)


class SGFN(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.sg = SpatialGate(hidden // 2)
        self.fc2 = nn.Linear(hidden // 2, dim)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        return self.fc2(self.sg(F.gelu(self.fc1(x)), h, w))


class DATBlock(nn.Module):
    def __init__(self, dim: int, attn: nn.Module, hidden: int) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), attn
        self.norm2, self.ffn = nn.LayerNorm(dim), SGFN(dim, hidden)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), h, w)
        return x + self.ffn(self.norm2(x), h, w)


def residual_conv(dim: int, three: bool) -> nn.Module:
    """`1conv`: one 3x3; `3conv`: 3x3 to dim/4, 1x1, 3x3 back, with LeakyReLU(0.2) between."""
    if not three:
        return nn.Conv2d(dim, dim, 3, padding=1)
    return nn.Sequential(nn.Conv2d(dim, dim // 4, 3, padding=1), nn.LeakyReLU(0.2), nn.Conv2d(dim // 4, dim // 4, 1),
                         nn.LeakyReLU(0.2), nn.Conv2d(dim // 4, dim, 3, padding=1))


def is_shifted(group: int, block: int) -> bool:
    """Which spatial blocks shift their windows (the published schedule)."""
    return (group % 2 == 0 and block > 0 and (block - 2) % 4 == 0) or (group % 2 == 1 and block % 4 == 0)


class ResidualGroup(nn.Module):
    def __init__(self, dim: int, heads: int, depth: int, split: tuple[int, int], hidden: int, qkv_bias: bool,
                 three_conv: bool, group: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(DATBlock(dim, SpatialAttention(dim, heads, split, qkv_bias, is_shifted(group, i))
                                             if i % 2 == 0 else ChannelAttention(dim, heads, qkv_bias), hidden)
                                    for i in range(depth))
        self.conv = residual_conv(dim, three_conv)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        out = x
        for block in self.blocks:
            out = block(out, h, w)
        return x + self.conv(to_image(out, h, w)).flatten(2).transpose(1, 2)


class DAT(nn.Module):
    def __init__(self, *, in_ch: int, dim: int, depths: list[int], heads: list[int], split: tuple[int, int],
                 hidden: int, qkv_bias: bool, scale: int, three_conv: bool, one_step: bool, num_feat: int) -> None:
        super().__init__()
        self.one_step = one_step
        mean = torch.tensor(RGB_MEAN) if in_ch == 3 else torch.zeros(1)
        self.register_buffer("mean", mean.view(1, -1, 1, 1), persistent=False)
        self.conv_first = nn.Conv2d(in_ch, dim, 3, padding=1)
        self.before_RG = nn.Sequential(ToTokens(), nn.LayerNorm(dim))
        self.layers = nn.ModuleList(ResidualGroup(dim, heads[g], depths[g], split, hidden, qkv_bias, three_conv, g)
                                    for g in range(len(depths)))
        self.norm = nn.LayerNorm(dim)
        self.conv_after_body = residual_conv(dim, three_conv)
        if one_step:
            self.upsample = nn.Sequential(nn.Conv2d(dim, in_ch * scale * scale, 3, padding=1), nn.PixelShuffle(scale))
            return
        self.conv_before_upsample = nn.Sequential(nn.Conv2d(dim, num_feat, 3, padding=1), nn.LeakyReLU())
        steps = [3] if scale == 3 else [2] * (scale.bit_length() - 1)
        self.upsample = nn.Sequential(*(m for f in steps for m in (nn.Conv2d(num_feat, f * f * num_feat, 3, padding=1),
                                                                   nn.PixelShuffle(f))))
        self.conv_last = nn.Conv2d(num_feat, in_ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = self.mean.to(x.dtype)
        feat = self.conv_first(x - mean)
        h, w = feat.shape[2:]
        tokens = self.before_RG(feat)
        for layer in self.layers:
            tokens = layer(tokens, h, w)
        feat = self.conv_after_body(to_image(self.norm(tokens), h, w)) + feat
        if self.one_step:
            return self.upsample(feat) + mean
        return self.conv_last(self.upsample(self.conv_before_upsample(feat))) + mean


def is_dat(keys: set[str]) -> bool:
    return {"conv_first.weight", "before_RG.1.weight", "layers.0.blocks.0.ffn.sg.conv.weight",
            "layers.0.blocks.0.attn.attns.0.pos.pos_proj.weight"} <= keys


def _scale(sd: dict[str, torch.Tensor], in_ch: int, one_step: bool) -> int:
    if one_step:
        return round((sd["upsample.0.weight"].shape[0] // in_ch) ** 0.5)
    scale = 1
    for i in range(0, seq_len(sd, "upsample"), 2):
        weight = sd[f"upsample.{i}.weight"]
        scale *= round((weight.shape[0] // weight.shape[1]) ** 0.5)
    return scale


def variant(depths: list[int], split: tuple[int, int], expansion: float, one_step: bool) -> str:
    if one_step or len(depths) < 4:
        return "DAT-light"
    if split == (8, 16):
        return "DAT-S"
    return "DAT-2" if expansion == 2 else "DAT"


def build(sd: dict[str, torch.Tensor]) -> tuple[nn.Module, int, str]:
    """(network with the weights loaded, scale, variant label) for a DAT state dict."""
    rpe = sd.get("layers.0.blocks.0.attn.attns.0.rpe_biases")
    if rpe is None or rpe.ndim != 2:
        raise CheckpointError("DAT: the window size table layers.0.blocks.0.attn.attns.0.rpe_biases is missing")
    split = (int(rpe[-1, 0]) + 1, int(rpe[-1, 1]) + 1)
    weights = {k: v for k, v in sd.items() if not k.endswith(DERIVED_BUFFERS)}
    in_ch, dim = weights["conv_first.weight"].shape[1], weights["conv_first.weight"].shape[0]
    depths = [seq_len(weights, f"layers.{g}.blocks") for g in range(seq_len(weights, "layers"))]
    heads = [weights[f"layers.{g}.blocks.1.attn.temperature"].shape[0] if depth > 1
             else weights[f"layers.{g}.blocks.0.attn.attns.0.pos.pos3.2.weight"].shape[0] * 2
             for g, depth in enumerate(depths)]
    one_step = "conv_last.weight" not in weights
    hidden = weights["layers.0.blocks.0.ffn.fc1.weight"].shape[0]
    scale = _scale(weights, in_ch, one_step)
    num_feat = 0 if one_step else weights["conv_before_upsample.0.weight"].shape[0]
    net = DAT(in_ch=in_ch, dim=dim, depths=depths, heads=heads, split=split, hidden=hidden,
              qkv_bias="layers.0.blocks.0.attn.qkv.bias" in weights, scale=scale,
              three_conv="conv_after_body.weight" not in weights, one_step=one_step, num_feat=num_feat)
    net.load_state_dict(weights, strict=True)
    return net, scale, variant(depths, split, hidden / dim, one_step)

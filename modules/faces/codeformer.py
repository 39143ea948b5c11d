"""CodeFormer: a VQGAN encoder, a transformer that predicts codebook entries, and a generator fused
with the encoder's features at fidelity weight `w` (0: the codebook's face, 1: closest to the input).

Module names follow the released `codeformer.pth` (`encoder.blocks.N`, `generator.blocks.N`,
`quantize.embedding`, `ft_layers.N.self_attn`, `fuse_convs_dict.<size>`). The block sequences
are read from the keys (ResBlock, attention, down/upsample, GroupNorm, conv), so the network
follows the file. Input and output: (B, 3, 512, 512) in [-1, 1]. The model's licence is
non-commercial (S-Lab License 1.0): Atelier ships no weights and runs only a user-supplied file.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

GROUPS = 32
HEADS = 8  # not stored in the weights; the released model's
# after which encoder / generator block the features of each connected level are taken / fused
ENCODER_TAPS = {"512": 2, "256": 5, "128": 8, "64": 11, "32": 14, "16": 18}
GENERATOR_TAPS = {"16": 6, "32": 9, "64": 12, "128": 15, "256": 18, "512": 21}


def group_norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(GROUPS, c, eps=1e-6)


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = group_norm(c_in), nn.Conv2d(c_in, c_out, 3, 1, 1)
        self.norm2, self.conv2 = group_norm(c_out), nn.Conv2d(c_out, c_out, 3, 1, 1)
        self.conv_out = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return h + (x if self.conv_out is None else self.conv_out(x))


class AttnBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.norm = group_norm(c)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        b, c, hh, ww = x.shape
        q, k, v = (m(h).flatten(2).transpose(1, 2) for m in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, c, hh, ww)
        return x + self.proj_out(out)


class Resample(nn.Module):
    """VQGAN's Downsample (pad right/bottom, 3x3 stride 2) or Upsample (nearest 2x, 3x3)."""

    def __init__(self, c: int, up: bool) -> None:
        super().__init__()
        self.up = up
        self.conv = nn.Conv2d(c, c, 3, 1 if up else 2, 1 if up else 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest") if self.up else F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


def _blocks(sd: dict[str, torch.Tensor], prefix: str, up: bool) -> nn.ModuleList:
    """`prefix`.N blocks as the keys describe them."""
    count = 1 + max(int(k[len(prefix):].split(".")[0]) for k in sd if k.startswith(prefix))
    blocks = []
    for n in range(count):
        p = f"{prefix}{n}."
        if p + "conv1.weight" in sd:
            blocks.append(ResBlock(sd[p + "conv1.weight"].shape[1], sd[p + "conv1.weight"].shape[0]))
        elif p + "q.weight" in sd:
            blocks.append(AttnBlock(sd[p + "q.weight"].shape[0]))
        elif p + "conv.weight" in sd:
            blocks.append(Resample(sd[p + "conv.weight"].shape[0], up))
        elif sd[p + "weight"].ndim == 1:
            blocks.append(group_norm(sd[p + "weight"].shape[0]))
        else:
            w = sd[p + "weight"]
            blocks.append(nn.Conv2d(w.shape[1], w.shape[0], w.shape[2], 1, w.shape[2] // 2))
    return nn.ModuleList(blocks)


class Blocks(nn.Module):
    def __init__(self, blocks: nn.ModuleList) -> None:
        super().__init__()
        self.blocks = blocks


class Quantize(nn.Module):
    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(size, dim)


class TransformerLayer(nn.Module):
    """Pre-norm self-attention (position added to queries and keys) and a GELU MLP."""

    def __init__(self, dim: int, mlp: int) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, HEADS)
        self.linear1, self.linear2 = nn.Linear(dim, mlp), nn.Linear(mlp, dim)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.self_attn(h + pos, h + pos, h, need_weights=False)[0]
        return x + self.linear2(F.gelu(self.linear1(self.norm2(x))))


class FuseSFT(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.encode_enc = ResBlock(2 * c, c)
        self.scale = nn.Sequential(nn.Conv2d(c, c, 3, 1, 1), nn.LeakyReLU(0.2), nn.Conv2d(c, c, 3, 1, 1))
        self.shift = nn.Sequential(nn.Conv2d(c, c, 3, 1, 1), nn.LeakyReLU(0.2), nn.Conv2d(c, c, 3, 1, 1))

    def forward(self, enc: torch.Tensor, dec: torch.Tensor, w: float) -> torch.Tensor:
        enc = self.encode_enc(torch.cat([enc, dec], dim=1))
        return dec + w * (dec * self.scale(enc) + self.shift(enc))


def adain(content: torch.Tensor, style: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """`content` renormalised to `style`'s per-channel mean and (unbiased) standard deviation."""
    def stats(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flat = t.flatten(2)
        return flat.mean(2)[..., None, None], (flat.var(2) + eps).sqrt()[..., None, None]

    c_mean, c_std = stats(content)
    s_mean, s_std = stats(style)
    return (content - c_mean) / c_std * s_std + s_mean


class CodeFormer(nn.Module):
    def __init__(self, sd: dict[str, torch.Tensor]) -> None:
        super().__init__()
        codes, emb = sd["quantize.embedding.weight"].shape
        length, dim = sd["position_emb"].shape
        layers = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("ft_layers."))
        self.encoder = Blocks(_blocks(sd, "encoder.blocks.", up=False))
        self.generator = Blocks(_blocks(sd, "generator.blocks.", up=True))
        self.quantize = Quantize(codes, emb)
        self.position_emb = nn.Parameter(torch.zeros(length, dim))
        self.feat_emb = nn.Linear(emb, dim)
        self.ft_layers = nn.Sequential(*(TransformerLayer(dim, sd["ft_layers.0.linear1.weight"].shape[0])
                                         for _ in range(layers)))
        self.idx_pred_layer = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, codes, bias=False))
        levels = sorted({k.split(".")[1] for k in sd if k.startswith("fuse_convs_dict.")}, key=int)
        self.fuse_convs_dict = nn.ModuleDict(
            {lv: FuseSFT(sd[f"fuse_convs_dict.{lv}.scale.0.weight"].shape[0]) for lv in levels})

    def forward(self, x: torch.Tensor, w: float = 0.5, use_adain: bool = True) -> torch.Tensor:
        taps = {ENCODER_TAPS[lv]: lv for lv in self.fuse_convs_dict}
        encoded = {}
        for i, block in enumerate(self.encoder.blocks):
            x = block(x)
            if i in taps:
                encoded[taps[i]] = x
        lq = x
        b, c, h, ww = lq.shape
        tokens = self.feat_emb(lq.flatten(2).permute(2, 0, 1))  # (hw, b, dim)
        pos = self.position_emb[:, None].expand(-1, b, -1)
        for layer in self.ft_layers:
            tokens = layer(tokens, pos)
        index = self.idx_pred_layer(tokens).argmax(dim=2).T  # (b, hw)
        x = self.quantize.embedding.weight[index].view(b, h, ww, c).permute(0, 3, 1, 2)
        if use_adain:
            x = adain(x, lq)
        fuse_at = {GENERATOR_TAPS[lv]: lv for lv in self.fuse_convs_dict}
        for i, block in enumerate(self.generator.blocks):
            x = block(x)
            if i in fuse_at and w > 0:
                x = self.fuse_convs_dict[fuse_at[i]](encoded[fuse_at[i]], x, w)
        return x


def is_codeformer(keys: set[str]) -> bool:
    return {"position_emb", "quantize.embedding.weight", "encoder.blocks.0.weight",
            "generator.blocks.0.weight"} <= keys


def build(sd: dict[str, torch.Tensor]) -> CodeFormer:
    net = CodeFormer(sd)
    if math.isqrt(sd["position_emb"].shape[0]) ** 2 != sd["position_emb"].shape[0]:
        raise ValueError("position_emb does not hold a square grid of tokens")
    net.load_state_dict(sd, strict=True)
    return net

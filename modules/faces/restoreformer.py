"""RestoreFormer and RestoreFormer++: a VQGAN whose decoder attends (multi-head cross-attention) to
the encoder's features of the degraded face, with queries from the encoder.

Module names follow the released files (`encoder.down.N.block.M`, `encoder.mid.attn_1`,
`quantize.embedding`, `quant_conv`, `post_quant_conv`, `decoder.up.N.attn.M`, ...); levels, blocks
and where attention sits are read from the keys. RestoreFormer++ is told apart by its decoder
attending at two resolutions (16 and 32 for a 512 face); the head counts, which the weights do not
hold, are the released ones: 8 for RestoreFormer, 4 for RestoreFormer++.
Input and output: (B, 3, 512, 512) in [-1, 1].
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from modules.faces.codeformer import Resample, group_norm


class ResnetBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = group_norm(c_in), nn.Conv2d(c_in, c_out, 3, 1, 1)
        self.norm2, self.conv2 = group_norm(c_out), nn.Conv2d(c_out, c_out, 3, 1, 1)
        self.nin_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv2(F.silu(self.norm2(self.conv1(F.silu(self.norm1(x))))))
        return h + (x if self.nin_shortcut is None else self.nin_shortcut(x))


class MultiHeadAttn(nn.Module):
    """Attention over `x` (keys, values) with queries from `y` (itself when None)."""

    def __init__(self, c: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = group_norm(c), group_norm(c)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        h = self.norm1(x)
        y = h if y is None else self.norm2(y)
        b, c, hh, ww = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(b, self.heads, c // self.heads, hh * ww).transpose(2, 3)

        out = F.scaled_dot_product_attention(split(self.q(y)), split(self.k(h)), split(self.v(h)))
        return x + self.proj_out(out.transpose(2, 3).reshape(b, c, hh, ww))


def _count(sd: dict[str, torch.Tensor], prefix: str) -> int:
    found = {int(k[len(prefix):].split(".")[0]) for k in sd if k.startswith(prefix)}
    return max(found) + 1 if found else 0


def _level(sd: dict, prefix: str, heads: int, up: bool | None) -> nn.Module:
    level = nn.Module()
    level.block = nn.ModuleList(ResnetBlock(sd[f"{prefix}block.{i}.conv1.weight"].shape[1],
                                            sd[f"{prefix}block.{i}.conv1.weight"].shape[0])
                                for i in range(_count(sd, prefix + "block.")))
    level.attn = nn.ModuleList(MultiHeadAttn(sd[f"{prefix}attn.{i}.q.weight"].shape[0], heads)
                               for i in range(_count(sd, prefix + "attn.")))
    name = "upsample" if up else "downsample"
    if f"{prefix}{name}.conv.weight" in sd:
        setattr(level, name, Resample(sd[f"{prefix}{name}.conv.weight"].shape[0], bool(up)))
    return level


def _mid(sd: dict, prefix: str, heads: int) -> nn.Module:
    mid = nn.Module()
    c = sd[prefix + "block_1.conv1.weight"].shape[0]
    mid.block_1, mid.attn_1, mid.block_2 = ResnetBlock(c, c), MultiHeadAttn(c, heads), ResnetBlock(c, c)
    return mid


class Coder(nn.Module):
    """The encoder or the decoder, as its keys describe it."""

    def __init__(self, sd: dict, prefix: str, heads: int, up: bool) -> None:
        super().__init__()
        levels = _count(sd, prefix + ("up." if up else "down."))
        self.conv_in = nn.Conv2d(sd[prefix + "conv_in.weight"].shape[1], sd[prefix + "conv_in.weight"].shape[0], 3, 1, 1)
        if prefix + "mid.block_1.conv1.weight" in sd:
            self.mid = _mid(sd, prefix + "mid.", heads)
        levels_list = nn.ModuleList(_level(sd, f"{prefix}{'up' if up else 'down'}.{i}.", heads, up)
                                    for i in range(levels))
        setattr(self, "up" if up else "down", levels_list)
        self.norm_out = group_norm(sd[prefix + "norm_out.weight"].shape[0])
        w = sd[prefix + "conv_out.weight"]
        self.conv_out = nn.Conv2d(w.shape[1], w.shape[0], 3, 1, 1)

    def encode(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        hs: dict[str, torch.Tensor] = {}
        h = self.conv_in(x)
        last = len(self.down) - 1
        for i, level in enumerate(self.down):
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[j](h)
            if i != last:
                hs[f"block_{i}"] = h
                h = level.downsample(h)
        if hasattr(self, "mid"):
            h = self.mid.block_1(h)
            hs[f"block_{last}_atten"] = h
            h = self.mid.block_2(self.mid.attn_1(h))
            hs["mid_atten"] = h
        hs["out"] = self.conv_out(F.silu(self.norm_out(h)))
        return hs

    def decode(self, z: torch.Tensor, hs: dict[str, torch.Tensor]) -> torch.Tensor:
        h = self.conv_in(z)
        if hasattr(self, "mid"):
            h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h), hs["mid_atten"]))
        for i in reversed(range(len(self.up))):
            level = self.up[i]
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[j](h, hs.get(f"block_{i}_atten", hs.get(f"block_{i}")))
            if i != 0:
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Quantize(nn.Module):
    def __init__(self, codes: int, dim: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(codes, dim)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        e = self.embedding.weight
        d = flat.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2 * flat @ e.T
        return e[d.argmin(1)].view(z.shape[0], z.shape[2], z.shape[3], -1).permute(0, 3, 1, 2)


class RestoreFormer(nn.Module):
    def __init__(self, sd: dict[str, torch.Tensor]) -> None:
        super().__init__()
        heads = 4 if is_plus_plus(sd) else 8
        self.encoder = Coder(sd, "encoder.", heads, up=False)
        self.decoder = Coder(sd, "decoder.", heads, up=True)
        self.quantize = Quantize(*sd["quantize.embedding.weight"].shape)
        w, pw = sd["quant_conv.weight"], sd["post_quant_conv.weight"]
        self.quant_conv = nn.Conv2d(w.shape[1], w.shape[0], 1)
        self.post_quant_conv = nn.Conv2d(pw.shape[1], pw.shape[0], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hs = self.encoder.encode(x)
        quant = self.quantize(self.quant_conv(hs["out"]))
        return self.decoder.decode(self.post_quant_conv(quant), hs)


def is_plus_plus(sd: dict[str, torch.Tensor]) -> bool:
    """RestoreFormer++ attends in more than one decoder level."""
    return len({k.split(".")[2] for k in sd if k.startswith("decoder.up.") and ".attn." in k}) > 1


def is_restoreformer(keys: set[str]) -> bool:
    return {"quantize.embedding.weight", "encoder.conv_in.weight", "quant_conv.weight",
            "decoder.conv_out.weight"} <= keys


def build(sd: dict[str, torch.Tensor]) -> RestoreFormer:
    net = RestoreFormer(sd)
    net.load_state_dict(sd, strict=True)
    return net

"""RetinaFace face detection (ResNet-50 or MobileNet-0.25 backbone) in the key layout of facexlib's
`detection_Resnet50_Final.pth` / `detection_mobilenet0.25_Final.pth`.

`body.*` is the backbone (torchvision ResNet names, or MobileNetV1's `stage1..3`), then `fpn.*`,
`ssh1..3.*` and the `ClassHead` / `BboxHead` / `LandmarkHead` 1x1 convs, two anchors per cell.
Widths and block counts are read from the weights. `detect` returns boxes, scores and the five
landmarks (left eye, right eye, nose, mouth left, mouth right) in input pixels.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import product

import torch
import torch.nn.functional as F
from torch import nn

MIN_SIZES = ((16, 32), (64, 128), (256, 512))
STEPS = (8, 16, 32)
VARIANCE = (0.1, 0.2)
BGR_MEAN = (104.0, 117.0, 123.0)
MOBILENET_STRIDES = ((2, 1, 2, 1, 2, 1), (2, 1, 1, 1, 1, 1), (2, 1))


def conv_bn(c_in: int, c_out: int, kernel: int = 3, stride: int = 1, leaky: float | None = 0.0,
            groups: int = 1) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False),
                               nn.BatchNorm2d(c_out)]
    if leaky is not None:
        layers.append(nn.LeakyReLU(leaky) if leaky else nn.ReLU())
    return layers


class Bottleneck(nn.Module):
    """torchvision's ResNet bottleneck (stride on the 3x3 conv)."""

    def __init__(self, c_in: int, width: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c_in, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, c_out, 1, bias=False), nn.BatchNorm2d(c_out)
        self.downsample = nn.Sequential(*conv_bn(c_in, c_out, 1, stride, None)) \
            if stride != 1 or c_in != c_out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNetBody(nn.Module):
    def __init__(self, sd: dict[str, torch.Tensor]) -> None:
        super().__init__()
        stem = sd["body.conv1.weight"].shape[0]
        self.conv1, self.bn1 = nn.Conv2d(3, stem, 7, 2, 3, bias=False), nn.BatchNorm2d(stem)
        c_in = stem
        for layer in range(1, 5):
            count = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith(f"body.layer{layer}."))
            blocks = []
            for b in range(count):
                width = sd[f"body.layer{layer}.{b}.conv1.weight"].shape[0]
                c_out = sd[f"body.layer{layer}.{b}.conv3.weight"].shape[0]
                blocks.append(Bottleneck(c_in, width, c_out, 2 if b == 0 and layer > 1 else 1))
                c_in = c_out
            setattr(self, f"layer{layer}", nn.Sequential(*blocks))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        x = self.layer1(x)
        c2 = self.layer2(x)
        c3 = self.layer3(c2)
        return [c2, c3, self.layer4(c3)]


class MobileNetBody(nn.Module):
    def __init__(self, sd: dict[str, torch.Tensor]) -> None:
        super().__init__()
        c_in = 3
        for s, strides in enumerate(MOBILENET_STRIDES, start=1):
            blocks = []
            for i, stride in enumerate(strides):
                p = f"body.stage{s}.{i}."
                if s == 1 and i == 0:
                    c_out = sd[p + "0.weight"].shape[0]
                    blocks.append(nn.Sequential(*conv_bn(c_in, c_out, 3, stride, 0.1)))
                else:
                    c_out = sd[p + "3.weight"].shape[0]
                    blocks.append(nn.Sequential(*conv_bn(c_in, c_in, 3, stride, 0.1, groups=c_in),
                                                *conv_bn(c_in, c_out, 1, 1, 0.1)))
                c_in = c_out
            setattr(self, f"stage{s}", nn.Sequential(*blocks))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        c1 = self.stage1(x)
        c2 = self.stage2(c1)
        return [c1, c2, self.stage3(c2)]


class FPN(nn.Module):
    def __init__(self, c_ins: list[int], c: int) -> None:
        super().__init__()
        leaky = 0.1 if c <= 64 else 0.0
        for i, c_in in enumerate(c_ins, start=1):
            setattr(self, f"output{i}", nn.Sequential(*conv_bn(c_in, c, 1, 1, leaky)))
        self.merge1 = nn.Sequential(*conv_bn(c, c, 3, 1, leaky))
        self.merge2 = nn.Sequential(*conv_bn(c, c, 3, 1, leaky))

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        o1, o2, o3 = self.output1(feats[0]), self.output2(feats[1]), self.output3(feats[2])
        o2 = self.merge2(o2 + F.interpolate(o3, size=o2.shape[2:], mode="nearest"))
        o1 = self.merge1(o1 + F.interpolate(o2, size=o1.shape[2:], mode="nearest"))
        return [o1, o2, o3]


class SSH(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        leaky = 0.1 if c <= 64 else 0.0
        self.conv3X3 = nn.Sequential(*conv_bn(c, c // 2, leaky=None))  # noqa: N815 (the file's names)
        self.conv5X5_1 = nn.Sequential(*conv_bn(c, c // 4, leaky=leaky))  # noqa: N815
        self.conv5X5_2 = nn.Sequential(*conv_bn(c // 4, c // 4, leaky=None))  # noqa: N815
        self.conv7X7_2 = nn.Sequential(*conv_bn(c // 4, c // 4, leaky=leaky))  # noqa: N815
        self.conv7x7_3 = nn.Sequential(*conv_bn(c // 4, c // 4, leaky=None))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mid = self.conv5X5_1(x)
        return F.relu(torch.cat([self.conv3X3(x), self.conv5X5_2(mid), self.conv7x7_3(self.conv7X7_2(mid))], 1))


class Head(nn.Module):
    def __init__(self, c: int, outputs: int) -> None:
        super().__init__()
        self.conv1x1 = nn.Conv2d(c, outputs, 1)


class RetinaFace(nn.Module):
    def __init__(self, sd: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.body = ResNetBody(sd) if "body.conv1.weight" in sd else MobileNetBody(sd)
        c_ins = [sd[f"fpn.output{i}.0.weight"].shape[1] for i in (1, 2, 3)]
        c = sd["fpn.output1.0.weight"].shape[0]
        self.fpn = FPN(c_ins, c)
        self.ssh1, self.ssh2, self.ssh3 = SSH(c), SSH(c), SSH(c)
        self.ClassHead = nn.ModuleList(Head(c, 4) for _ in range(3))  # noqa: N815
        self.BboxHead = nn.ModuleList(Head(c, 8) for _ in range(3))  # noqa: N815
        self.LandmarkHead = nn.ModuleList(Head(c, 20) for _ in range(3))  # noqa: N815

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(box offsets (B, N, 4), face probabilities (B, N), landmark offsets (B, N, 10))."""
        fpn = self.fpn(self.body(x))
        feats = [self.ssh1(fpn[0]), self.ssh2(fpn[1]), self.ssh3(fpn[2])]

        def head(heads: nn.ModuleList, size: int) -> torch.Tensor:
            outs = [h.conv1x1(f).permute(0, 2, 3, 1).reshape(x.shape[0], -1, size)
                    for h, f in zip(heads, feats, strict=True)]
            return torch.cat(outs, dim=1)

        return head(self.BboxHead, 4), head(self.ClassHead, 2).softmax(-1)[..., 1], head(self.LandmarkHead, 10)


def is_retinaface(keys: set[str]) -> bool:
    return {"fpn.output1.0.weight", "ssh1.conv3X3.0.weight", "ClassHead.0.conv1x1.weight"} <= keys


def build(sd: dict[str, torch.Tensor]) -> RetinaFace:
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    net = RetinaFace(sd)
    net.load_state_dict(sd, strict=True)
    return net.eval()


def priors(height: int, width: int) -> torch.Tensor:
    """Anchors (cx, cy, w, h) relative to the image, in the network's output order."""
    rows = []
    for sizes, step in zip(MIN_SIZES, STEPS, strict=True):
        fh, fw = -(-height // step), -(-width // step)
        for i, j in product(range(fh), range(fw)):
            for size in sizes:
                rows.append(((j + 0.5) * step / width, (i + 0.5) * step / height, size / width, size / height))
    return torch.tensor(rows, dtype=torch.float32)


def decode(loc: torch.Tensor, landm: torch.Tensor, anchors: torch.Tensor, height: int, width: int
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Boxes (N, 4: x1 y1 x2 y2) and landmarks (N, 5, 2) in pixels from the offsets."""
    centre = anchors[:, :2] + loc[:, :2] * VARIANCE[0] * anchors[:, 2:]
    size = anchors[:, 2:] * torch.exp(loc[:, 2:] * VARIANCE[1])
    boxes = torch.cat([centre - size / 2, centre + size / 2], 1) * torch.tensor([width, height] * 2)
    points = anchors[:, None, :2] + landm.view(-1, 5, 2) * VARIANCE[0] * anchors[:, None, 2:]
    return boxes, points * torch.tensor([width, height])


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou: float) -> list[int]:
    """Indices kept by greedy non-maximum suppression, best score first."""
    order = scores.argsort(descending=True)
    area = (boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)
    keep = []
    while order.numel():
        i = int(order[0])
        keep.append(i)
        rest = order[1:]
        lt = torch.maximum(boxes[i, :2], boxes[rest, :2])
        rb = torch.minimum(boxes[i, 2:], boxes[rest, 2:])
        inter = (rb - lt).clamp(min=0).prod(1)
        order = rest[inter / (area[i] + area[rest] - inter + 1e-12) <= iou]
    return keep


@dataclass(frozen=True)
class Detection:
    box: tuple[float, float, float, float]
    score: float
    landmarks: tuple[tuple[float, float], ...]  # five (x, y) points


def detect(net: RetinaFace, rgb: torch.Tensor, threshold: float = 0.97, iou: float = 0.4) -> list[Detection]:
    """Faces in an RGB image tensor (3, H, W) with values 0-255, best score first."""
    height, width = rgb.shape[1:]
    weight = next(net.parameters())
    x = (rgb.flip(0) - torch.tensor(BGR_MEAN).view(3, 1, 1))[None].to(weight)
    with torch.inference_mode():
        loc, conf, landm = (t[0].float().cpu() for t in net(x))
    anchors = priors(height, width)
    picked = conf > threshold
    boxes, points = decode(loc[picked], landm[picked], anchors[picked], height, width)
    scores = conf[picked]
    return [Detection(tuple(boxes[i].tolist()), float(scores[i]), tuple(map(tuple, points[i].tolist())))
            for i in nms(boxes, scores, iou)]

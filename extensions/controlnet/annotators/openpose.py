"""OpenPose body (CMU's 18-keypoint model, `body_pose_model.pth`) in torch.

The network is VGG-19's first ten convolutions plus two CPM convolutions, then six stages of two
branches: part affinity fields (38 channels, x/y per limb) and part heatmaps (18 points and the
background). Widths come from the file's tensors. Detection follows the reference: the image is
scaled so its height is 0.5 x 368, padded to a multiple of 8 with grey, and the maps are scaled
back; peaks of the Gaussian-smoothed heatmaps are joints, limbs join the pairs whose line integral
over the PAF is high, and limbs sharing a joint are grouped into people.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import read_tensors
from .posedraw import BODY_LIMBS, DRAWN_LIMBS, Person, PoseMap, pose_map

BOX_SIZE, SCALE, STRIDE, PAD_VALUE = 368, 0.5, 8, 128
PEAK_THRESHOLD, PAF_THRESHOLD, MIDPOINTS = 0.1, 0.05, 10
BODY_POINTS = 18
VGG = (("conv1_1", "conv1_2"), ("conv2_1", "conv2_2"), ("conv3_1", "conv3_2", "conv3_3", "conv3_4"),
       ("conv4_1", "conv4_2", "conv4_3_CPM", "conv4_4_CPM"))
# the (x, y) PAF channels of each limb of BODY_LIMBS
PAF_CHANNELS = ((12, 13), (20, 21), (14, 15), (16, 17), (22, 23), (24, 25), (0, 1), (2, 3), (4, 5), (6, 7), (8, 9),
                (10, 11), (28, 29), (30, 31), (34, 35), (32, 33), (36, 37), (18, 19), (26, 27))


def stage_layers(stage: int, branch: int) -> list[str]:
    """The layer names of one stage's branch (1: PAFs, 2: heatmaps); the last has no ReLU."""
    if stage == 1:
        return [f"conv5_{i}_CPM_L{branch}" for i in range(1, 6)]
    return [f"Mconv{i}_stage{stage}_L{branch}" for i in range(1, 8)]


class BodyNet:
    """The two-branch body network over a state dict (keys as in body_pose_model.pth)."""

    def __init__(self, tensors: dict[str, torch.Tensor], device: torch.device | None = None) -> None:
        self.w = {k: v.float().to(device or "cpu") for k, v in tensors.items()}
        self.stages = 1
        while f"Mconv1_stage{self.stages + 1}_L1.weight" in self.w:
            self.stages += 1
        names = [n for block in VGG for n in block]
        names += [n for s in range(1, self.stages + 1) for b in (1, 2) for n in stage_layers(s, b)]
        missing = [f"{n}.{p}" for n in names for p in ("weight", "bias") if f"{n}.{p}" not in self.w]
        if missing:
            raise KeyError(f"no {missing[0]} ({len(missing)} tensors missing)")
        pafs = self.w[f"{stage_layers(self.stages, 1)[-1]}.weight"].shape[0]
        heats = self.w[f"{stage_layers(self.stages, 2)[-1]}.weight"].shape[0]
        if pafs != 2 * len(BODY_LIMBS) or heats != BODY_POINTS + 1:
            raise ValueError(f"expected 38 PAF and 19 heatmap channels, found {pafs} and {heats}")

    def _conv(self, name: str, x: torch.Tensor, relu: bool = True) -> torch.Tensor:
        weight = self.w[f"{name}.weight"]
        x = F.conv2d(x, weight, self.w[f"{name}.bias"], padding=weight.shape[-1] // 2)
        return F.relu(x) if relu else x

    def _branch(self, names: list[str], x: torch.Tensor) -> torch.Tensor:
        for i, name in enumerate(names):
            x = self._conv(name, x, relu=i < len(names) - 1)
        return x

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(PAFs, heatmaps) at 1/8 of the (1, 3, H, W) input, which is BGR / 256 - 0.5."""
        x = x.to(self.w["conv1_1.weight"].device)
        for i, block in enumerate(VGG):
            x = F.max_pool2d(x, 2, 2) if i else x
            for name in block:
                x = self._conv(name, x)
        features = x
        paf, heat = self._branch(stage_layers(1, 1), x), self._branch(stage_layers(1, 2), x)
        for stage in range(2, self.stages + 1):
            x = torch.cat([paf, heat, features], 1)
            paf, heat = self._branch(stage_layers(stage, 1), x), self._branch(stage_layers(stage, 2), x)
        return paf.cpu(), heat.cpu()


def _cubic(t: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(t, size=size, mode="bicubic", align_corners=False)


def body_maps(net: BodyNet, bgr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The PAFs (HxWx38) and heatmaps (HxWx19) at the image's size."""
    h, w = bgr.shape[:2]
    scale = SCALE * BOX_SIZE / h
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    x = torch.from_numpy(np.ascontiguousarray(bgr, dtype=np.float32)).permute(2, 0, 1)[None]
    x = _cubic(x, size).round().clamp(0, 255)
    x = F.pad(x, (0, -size[1] % STRIDE, 0, -size[0] % STRIDE), value=PAD_VALUE) / 256 - 0.5
    maps = []
    for m in net(x):
        m = _cubic(m, (m.shape[2] * STRIDE, m.shape[3] * STRIDE))[:, :, :size[0], :size[1]]
        maps.append(_cubic(m, (h, w))[0].permute(1, 2, 0).numpy())
    return maps[0], maps[1]


def gaussian(maps: np.ndarray, sigma: float) -> np.ndarray:
    """Each channel of HxWxC blurred as scipy.ndimage.gaussian_filter (truncate 4, mirrored edges)."""
    radius = int(4 * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = (kernel / kernel.sum()).float()
    padded = np.pad(maps, ((radius, radius), (radius, radius), (0, 0)), mode="symmetric")
    t = torch.from_numpy(np.ascontiguousarray(padded, dtype=np.float32)).permute(2, 0, 1)[:, None]
    t = F.conv2d(F.conv2d(t, kernel[None, None, None, :]), kernel[None, None, :, None])
    return t[:, 0].permute(1, 2, 0).numpy()


def find_peaks(heat: np.ndarray) -> list[np.ndarray]:
    """Per body point: rows of (x, y, score, id), ids numbered across all points in order."""
    smooth = gaussian(heat[..., :BODY_POINTS], 3.0)
    padded = np.pad(smooth, ((1, 1), (1, 1), (0, 0)))
    top = smooth >= padded[:-2, 1:-1]
    peaks = top & (smooth >= padded[2:, 1:-1]) & (smooth >= padded[1:-1, :-2]) & (smooth >= padded[1:-1, 2:])
    peaks &= smooth > PEAK_THRESHOLD
    found, count = [], 0
    for part in range(BODY_POINTS):
        ys, xs = np.nonzero(peaks[..., part])
        ids = np.arange(count, count + len(xs))
        found.append(np.stack([xs, ys, heat[ys, xs, part], ids], axis=1).astype(np.float64).reshape(-1, 4))
        count += len(xs)
    return found


def _limb_scores(cand_a: np.ndarray, cand_b: np.ndarray, paf: np.ndarray, channels: tuple[int, int]) -> np.ndarray:
    """(na, nb): the PAF's mean alignment along each a -> b with a distance prior; NaN where a test fails."""
    a, b = cand_a[:, None, :2], cand_b[None, :, :2]
    vec = b - a
    norm = np.maximum(0.001, np.sqrt((vec**2).sum(-1)))
    unit = vec / norm[..., None]
    # MIDPOINTS samples from a to b, as np.linspace computes them (the last one exactly b)
    steps = np.arange(MIDPOINTS) * ((b - a) / (MIDPOINTS - 1))[..., None]
    line = a[..., None] + steps
    line[..., -1] = np.broadcast_to(b, line.shape[:-1])
    xs, ys = np.round(line[:, :, 0]).astype(int), np.round(line[:, :, 1]).astype(int)
    along = paf[ys, xs, channels[0]] * unit[..., :1] + paf[ys, xs, channels[1]] * unit[..., 1:]
    score = along.mean(-1) + np.minimum(0.5 * paf.shape[0] / norm - 1, 0)
    ok = (np.count_nonzero(along > PAF_THRESHOLD, axis=-1) > 0.8 * MIDPOINTS) & (score > 0)
    return np.where(ok, score, np.nan)


def connect_limbs(peaks: list[np.ndarray], paf: np.ndarray) -> list[np.ndarray | None]:
    """Per limb: rows of (id a, id b, score), each joint used once, best first; None if an end has no peak."""
    limbs: list[np.ndarray | None] = []
    for (ia, ib), channels in zip(BODY_LIMBS, PAF_CHANNELS, strict=True):
        cand_a, cand_b = peaks[ia], peaks[ib]
        if not len(cand_a) or not len(cand_b):
            limbs.append(None)
            continue
        scores = _limb_scores(cand_a, cand_b, paf, channels).ravel()
        order = [k for k in np.argsort(-scores, kind="stable") if not np.isnan(scores[k])]
        used_a, used_b, rows = set(), set(), []
        for i, j in (divmod(int(k), len(cand_b)) for k in order):
            if i in used_a or j in used_b:
                continue
            rows.append((cand_a[i][3], cand_b[j][3], scores[i * len(cand_b) + j]))
            used_a.add(i)
            used_b.add(j)
            if len(rows) >= min(len(cand_a), len(cand_b)):
                break
        limbs.append(np.array(rows, dtype=np.float64).reshape(-1, 3))
    return limbs


def group_people(limbs: list[np.ndarray | None], candidate: np.ndarray) -> np.ndarray:
    """Rows of 18 peak ids (-1: absent), the total score and the point count, one row per person."""
    subset = np.empty((0, BODY_POINTS + 2))
    for k, rows in enumerate(limbs):
        if rows is None:
            continue
        ia, ib = BODY_LIMBS[k]
        for pa, pb, score in rows:
            hits = [r for r in range(len(subset)) if subset[r, ia] == pa or subset[r, ib] == pb]
            if len(hits) == 2 and not np.any((subset[hits[0], :-2] >= 0) & (subset[hits[1], :-2] >= 0)):
                j1, j2 = hits  # two disjoint partial people joined by this limb: merge them
                subset[j1, :-2] += subset[j2, :-2] + 1
                subset[j1, -2:] += subset[j2, -2:]
                subset[j1, -2] += score
                subset = np.delete(subset, j2, axis=0)
            elif len(hits) in (1, 2):
                row = subset[hits[0]]
                if len(hits) == 2 or row[ib] != pb:
                    row[ib] = pb
                    row[-1] += 1
                    row[-2] += candidate[int(pb), 2] + score
            elif not hits and k < DRAWN_LIMBS:  # the ear-shoulder limbs only extend people
                row = -np.ones(BODY_POINTS + 2)
                row[ia], row[ib] = pa, pb
                row[-1] = 2
                row[-2] = candidate[int(pa), 2] + candidate[int(pb), 2] + score
                subset = np.vstack([subset, row])
    keep = (subset[:, -1] >= 4) & (subset[:, -2] / np.maximum(subset[:, -1], 1) >= 0.4)
    return subset[keep]


def people_from_maps(paf: np.ndarray, heat: np.ndarray) -> list[Person]:
    """Everyone whose joints and limbs the PAFs (HxWx38) and heatmaps (HxWx19) show."""
    peaks = find_peaks(heat)
    candidate = np.concatenate(peaks, axis=0)
    people = []
    for row in group_people(connect_limbs(peaks, paf), candidate):
        body = np.zeros((BODY_POINTS, 3))
        for i, idx in enumerate(row[:BODY_POINTS].astype(int)):
            if idx >= 0:
                body[i] = (*candidate[idx, :2], 1.0)
        people.append(Person(body))
    return people


def detect_people(net: BodyNet, rgb: np.ndarray) -> list[Person]:
    return people_from_maps(*body_maps(net, rgb[..., ::-1]))  # the network was trained on BGR


def build(path: Path, device: torch.device | None = None):
    """The `openpose` runner: the body skeletons of everyone in the image, drawn on black."""
    net = BodyNet(read_tensors(path), device)
    net(torch.zeros(1, 3, 16, 16))  # wrong widths fail here, while the file is being checked

    def run(rgb: np.ndarray, resolution: int, a: float, b: float, seed: int) -> PoseMap:
        h, w = rgb.shape[:2]
        return pose_map(detect_people(net, rgb[..., :3]), h, w)

    return run

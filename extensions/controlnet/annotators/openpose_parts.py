"""OpenPose hands and face (CMU's `hand_pose_model.pth` and `facenet.pth`) on top of the body model.

Both are convolutional pose machines: VGG-19's first convolutions (`conv1_1` .. `conv4_4`, `conv5_1`,
`conv5_2`, `conv5_3_CPM`, three 2x2 max pools), a first stage (`conv6_1_CPM`, `conv6_2_CPM`) and
stages 2.. (`Mconv1..7_stageN`, 7x7 then 1x1) that each see the previous heatmaps concatenated with
the features. Every convolution but each stage's last has a ReLU. The hand network gives 22 maps
(21 points and the background), the face network 71 (70 points and the background). Widths and the
stage count come from the file's tensors.

Boxes follow the body, as OpenPose's detectors do. A hand box is centred a third of the forearm past
the wrist, 1.5x the longer of the forearm and 0.9x the upper arm wide; a face box is centred on the
nose, twice the larger of 3x the nose-eye and 1.5x the nose-ear distance (Chebyshev) wide. Both are
clipped to the image and dropped under 20 px. Resizes are OpenCV's as OpenPose picks them (area
to shrink, Lanczos-4 to enlarge). A hand crop (BGR, blurred with sigma 0.8) is run at 184, 368, 552
and 736 px squares; the heatmaps, averaged on a 128 grid and smoothed (sigma 3), keep
their largest blob over 0.05, whose maximum is the point. A face crop is run at 384 px; each point is
its map's maximum over 0.05 (the background map is not a point).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from modules.plugins import api

from . import Runner, read_tensors
from .openpose import BodyNet, body_maps, gaussian, people_from_maps
from .posedraw import Person, PoseMap, pose_map
from .sketch import gaussian_blur

HAND_FILE, FACE_FILE = "hand_pose_model.pth", "facenet.pth"
HAND_MAPS, FACE_MAPS = 22, 71
CPM_VGG = (("conv1_1", "conv1_2"), ("conv2_1", "conv2_2"), ("conv3_1", "conv3_2", "conv3_3", "conv3_4"),
           ("conv4_1", "conv4_2", "conv4_3", "conv4_4", "conv5_1", "conv5_2", "conv5_3_CPM"))
HAND_SCALES, HAND_BOX, HAND_GRID, HAND_BLUR = (0.5, 1.0, 1.5, 2.0), 368, 128, 0.8
FACE_SIZE, THRESHOLD, MIN_BOX, WRIST_RATIO = 384, 0.05, 20, 0.33
PAD_VALUE, STRIDE = 128, 8
LEFT_ARM, RIGHT_ARM = (5, 6, 7), (2, 3, 4)  # shoulder, elbow, wrist (the person's left first)
NOSE, EYES, EARS = 0, (14, 15), (16, 17)


def cpm_stage(stage: int) -> list[str]:
    """The layer names of one stage (1: `conv6_*_CPM`, then `MconvK_stageN`); the last has no ReLU."""
    if stage == 1:
        return ["conv6_1_CPM", "conv6_2_CPM"]
    return [f"Mconv{i}_stage{stage}" for i in range(1, 8)]


class CpmNet:
    """A single-branch pose machine (the hand or face network) over a state dict in the released keys."""

    def __init__(self, tensors: dict[str, torch.Tensor], maps: int, device: torch.device | None = None) -> None:
        self.w = {k: v.float().to(device or "cpu") for k, v in tensors.items()}
        self.stages = 1
        while f"Mconv1_stage{self.stages + 1}.weight" in self.w:
            self.stages += 1
        names = [n for block in CPM_VGG for n in block] + [n for s in range(1, self.stages + 1) for n in cpm_stage(s)]
        missing = [f"{n}.{p}" for n in names for p in ("weight", "bias") if f"{n}.{p}" not in self.w]
        if missing:
            raise KeyError(f"no {missing[0]} ({len(missing)} tensors missing)")
        found = self.w[f"{cpm_stage(self.stages)[-1]}.weight"].shape[0]
        if found != maps:
            raise ValueError(f"expected {maps} heatmaps, found {found}")
        self.device = next(iter(self.w.values())).device

    def _conv(self, name: str, x: torch.Tensor, relu: bool = True) -> torch.Tensor:
        weight = self.w[f"{name}.weight"]
        x = F.conv2d(x, weight, self.w[f"{name}.bias"], padding=weight.shape[-1] // 2)
        return F.relu(x) if relu else x

    def _stage(self, stage: int, x: torch.Tensor) -> torch.Tensor:
        names = cpm_stage(stage)
        for i, name in enumerate(names):
            x = self._conv(name, x, relu=i < len(names) - 1)
        return x

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage's heatmaps at 1/8 of the (1, 3, H, W) input (BGR / 256 - 0.5)."""
        x = x.to(self.device)
        for i, block in enumerate(CPM_VGG):
            x = F.max_pool2d(x, 2, 2) if i else x
            for name in block:
                x = self._conv(name, x)
        features, maps = x, self._stage(1, x)
        for stage in range(2, self.stages + 1):
            maps = self._stage(stage, torch.cat([maps, features], 1))
        return maps.cpu()


# ------------------------------------------------------------------ boxes from the body
def _point(body: np.ndarray, i: int) -> np.ndarray | None:
    return body[i, :2] if body[i, 2] > 0 else None


def _clip_box(x: float, y: float, width: float, reach: float, h: int, w: int) -> tuple[int, int, int] | None:
    """(x, y, size) of a square box clipped to the image (OpenPose's rule: the far edges are tested at
    `reach` from the corner), or None under MIN_BOX."""
    x, y = max(x, 0.0), max(y, 0.0)
    size = min(width if x + reach <= w else w - x, width if y + reach <= h else h - y)
    return (int(x), int(y), int(size)) if size >= MIN_BOX else None


def hand_boxes(body: np.ndarray, h: int, w: int) -> list[tuple[int, int, int, bool]]:
    """(x, y, size, is_left) of each hand whose shoulder, elbow and wrist are seen."""
    boxes = []
    for arm, is_left in ((LEFT_ARM, True), (RIGHT_ARM, False)):
        points = [_point(body, i) for i in arm]
        if any(p is None for p in points):
            continue
        shoulder, elbow, wrist = points
        centre = wrist + WRIST_RATIO * (wrist - elbow)
        width = 1.5 * max(math.dist(wrist, elbow), 0.9 * math.dist(elbow, shoulder))
        box = _clip_box(centre[0] - width / 2, centre[1] - width / 2, width, width, h, w)
        if box is not None:
            boxes.append((*box, is_left))
    return boxes


def face_box(body: np.ndarray, h: int, w: int) -> tuple[int, int, int] | None:
    """(x, y, size) of the face around the nose, or None without the nose and an eye or ear."""
    nose = _point(body, NOSE)
    near = [(p, 3.0) for p in (_point(body, i) for i in EYES) if p is not None]
    near += [(p, 1.5) for p in (_point(body, i) for i in EARS) if p is not None]
    if nose is None or not near:
        return None
    half = max(k * float(np.abs(nose - p).max()) for p, k in near)
    return _clip_box(nose[0] - half, nose[1] - half, 2 * half, half, h, w)


# ------------------------------------------------------------------ heatmaps to points
def resize_matrix(n_in: int, n_out: int, area: bool) -> torch.Tensor:
    """(n_out, n_in) weights of OpenCV's resize along one axis: INTER_AREA (the overlap of each output
    pixel's span with the input pixels) or INTER_LANCZOS4 (8 taps of sinc(x) sinc(x / 4), edges clamped)."""
    if area:
        scale = n_in / n_out
        lo = np.arange(n_out)[:, None] * scale
        edges = np.arange(n_in)[None, :]
        overlap = np.clip(np.minimum(lo + scale, edges + 1) - np.maximum(lo, edges), 0, None)
        return torch.from_numpy(overlap / overlap.sum(axis=1, keepdims=True)).float()
    src = (np.arange(n_out) + 0.5) * n_in / n_out - 0.5
    base = np.floor(src).astype(int)
    taps = np.arange(-3, 5)
    dist = (src - base)[:, None] - taps[None, :]
    weights = np.sinc(dist) * np.sinc(dist / 4)
    weights /= weights.sum(axis=1, keepdims=True)
    matrix = np.zeros((n_out, n_in))
    np.add.at(matrix, (np.repeat(np.arange(n_out), 8), np.clip(base[:, None] + taps, 0, n_in - 1).ravel()),
              weights.ravel())
    return torch.from_numpy(matrix).float()


def smart_resize(t: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(1, C, H, W) resized to `size` as OpenPose's `smart_resize`: area when the sides shrink on the
    whole, else Lanczos-4."""
    area = size[0] + size[1] < t.shape[2] + t.shape[3]
    t = torch.einsum("oh,nchw->ncow", resize_matrix(t.shape[2], size[0], area), t)
    return torch.einsum("ow,nchw->ncho", resize_matrix(t.shape[3], size[1], area), t)


def _as_input(bgr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(bgr, dtype=np.float32)).permute(2, 0, 1)[None]


def hand_heatmaps(net: CpmNet, crop: np.ndarray) -> np.ndarray:
    """The 22 hand maps of a square BGR crop, averaged over the scales on a HAND_GRID x HAND_GRID grid."""
    x = _as_input(gaussian_blur(crop, HAND_BLUR))
    total = torch.zeros(1, HAND_MAPS, HAND_GRID, HAND_GRID)
    for scale in HAND_SCALES:
        side = int(scale * HAND_BOX)
        image = smart_resize(x, (side, side)).round().clamp(0, 255)
        pad = -side % STRIDE
        image = F.pad(image, (0, pad, 0, pad), value=PAD_VALUE) / 256 - 0.5
        maps = net(image)
        rows, cols = (_to_grid(n, side) for n in maps.shape[2:])
        total += torch.einsum("oh,nchw,pw->ncop", rows, maps, cols) / len(HAND_SCALES)
    return total[0].permute(1, 2, 0).numpy()


def _to_grid(n: int, side: int) -> torch.Tensor:
    """One axis of the network's maps (n cells) to the HAND_GRID grid as a single matrix: the x8
    enlargement (Lanczos-4), the crop to `side` and the resize to HAND_GRID (area when shrinking)."""
    up = resize_matrix(n, n * STRIDE, area=False)[:side]
    return resize_matrix(side, HAND_GRID, area=side > HAND_GRID) @ up


def largest_blob(mask: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """The 8-connected component of `mask` with the largest sum of `weight`."""
    h, w = mask.shape
    inside = torch.from_numpy(mask)
    labels = torch.where(inside, torch.arange(1, h * w + 1).view(h, w), 0).float()
    while True:  # every pixel takes the largest label of its 8-neighbourhood until nothing changes
        grown = torch.where(inside, F.max_pool2d(labels[None, None], 3, 1, 1)[0, 0], 0)
        if torch.equal(grown, labels):
            break
        labels = grown
    ids = labels.long().numpy()
    sums = np.bincount(ids.ravel(), weights=weight.ravel())
    sums[0] = -np.inf
    return ids == int(np.argmax(sums))


def hand_points(maps: np.ndarray, size: int) -> np.ndarray:
    """(21, 3) x, y in the crop (of side `size`) and seen, from the averaged HAND_GRID maps."""
    smooth = gaussian(maps[..., :HAND_MAPS - 1], 3.0)
    points = np.zeros((HAND_MAPS - 1, 3))
    for part in range(HAND_MAPS - 1):
        mask = smooth[..., part] > THRESHOLD
        if not mask.any():
            continue
        kept = np.where(largest_blob(mask, maps[..., part]), maps[..., part], 0)
        y, x = np.unravel_index(np.argmax(kept), kept.shape)
        points[part] = (int(x * size / HAND_GRID), int(y * size / HAND_GRID), 1.0)
    return points


def face_heatmaps(net: CpmNet, crop: np.ndarray) -> np.ndarray:
    """The 71 face maps of a BGR crop, at the crop's size (bilinear, corners aligned)."""
    x = smart_resize(_as_input(crop), (FACE_SIZE, FACE_SIZE)).round().clamp(0, 255) / 256 - 0.5
    maps = F.interpolate(net(x), size=crop.shape[:2], mode="bilinear", align_corners=True)
    return maps[0].permute(1, 2, 0).numpy()


def face_points(maps: np.ndarray) -> np.ndarray:
    """(70, 3) x, y in the crop and seen: each landmark map's maximum, where it is over THRESHOLD."""
    points = np.zeros((FACE_MAPS - 1, 3))
    for part in range(FACE_MAPS - 1):
        y, x = np.unravel_index(np.argmax(maps[..., part]), maps.shape[:2])
        if maps[y, x, part] > THRESHOLD:
            points[part] = (x, y, 1.0)
    return points


def _shifted(points: np.ndarray, x: int, y: int) -> np.ndarray:
    out = points.copy()
    out[:, :2] += np.array([x, y]) * (points[:, 2:] > 0)
    return out


def add_hands(person: Person, bgr: np.ndarray, net: CpmNet) -> None:
    """Detect the person's hands in the image and store them as [left, right] (unseen: all zero)."""
    found = {True: np.zeros((HAND_MAPS - 1, 3)), False: np.zeros((HAND_MAPS - 1, 3))}
    boxes = hand_boxes(person.body, *bgr.shape[:2])
    for x, y, size, is_left in boxes:
        found[is_left] = _shifted(hand_points(hand_heatmaps(net, bgr[y:y + size, x:x + size]), size), x, y)
    person.hands = [found[True], found[False]] if boxes else []


def add_face(person: Person, bgr: np.ndarray, net: CpmNet) -> None:
    box = face_box(person.body, *bgr.shape[:2])
    if box is not None:
        x, y, size = box
        person.face = _shifted(face_points(face_heatmaps(net, bgr[y:y + size, x:x + size])), x, y)


# ------------------------------------------------------------------ runners
def load_part(folder: Path, file: str, maps: int, device: torch.device | None) -> CpmNet:
    """The hand or face network from `folder/file`, every failure a message naming that file."""
    path = folder / file
    if not path.is_file():
        raise api.InvalidParams(f"This OpenPose preprocessor also needs {file} in {folder}; download it from "
                                "lllyasviel/Annotators (the CMU OpenPose models) next to body_pose_model.pth")
    try:
        net = CpmNet(read_tensors(path), maps, device)
        net(torch.zeros(1, 3, 16, 16))  # widths that do not chain fail here
    except (KeyError, RuntimeError, ValueError) as err:
        raise api.InvalidParams(f"Annotator file {path} is not CMU's {file} ({type(err).__name__}: "
                                f"{str(err)[:200]}); download it again") from None
    return net


class PartFile:
    """A hand or face network, reread when its file changes (the runner is cached by the body file alone)."""

    def __init__(self, folder: Path, file: str, maps: int, device: torch.device | None) -> None:
        self.folder, self.file, self.maps, self.device = folder, file, maps, device
        self.stamp: int | None = None
        self.net = self.get()

    def get(self) -> CpmNet:
        path = self.folder / self.file
        stamp = path.stat().st_mtime_ns if path.is_file() else None
        if self.stamp is None or (stamp is not None and stamp != self.stamp):  # a removed file: keep the last
            self.net, self.stamp = load_part(self.folder, self.file, self.maps, self.device), stamp
        return self.net


def build_parts(path: Path, hands: bool, face: bool, body: bool = True,
                device: torch.device | None = None) -> Runner:
    """A runner drawing the chosen parts: `path` is body_pose_model.pth, the hand and face files beside it."""
    hand = PartFile(path.parent, HAND_FILE, HAND_MAPS, device) if hands else None
    face_part = PartFile(path.parent, FACE_FILE, FACE_MAPS, device) if face else None
    body_net = BodyNet(read_tensors(path), device)
    body_net(torch.zeros(1, 3, 16, 16))  # wrong widths fail here, while the file is being checked

    def run(rgb: np.ndarray, resolution: int, a: float, b: float, seed: int) -> PoseMap:
        hand_net, face_net = hand.get() if hand else None, face_part.get() if face_part else None
        bgr = np.ascontiguousarray(rgb[..., 2::-1])  # every network was trained on BGR
        people = people_from_maps(*body_maps(body_net, bgr))
        for person in people:
            if hand_net is not None:
                add_hands(person, bgr, hand_net)
            if face_net is not None:
                add_face(person, bgr, face_net)
        return pose_map(people, *rgb.shape[:2], body=body, hands=hands, face=face)

    return run


def build_hand(path: Path, device: torch.device | None = None) -> Runner:
    return build_parts(path, hands=True, face=False, device=device)


def build_face(path: Path, device: torch.device | None = None) -> Runner:
    return build_parts(path, hands=False, face=True, device=device)


def build_faceonly(path: Path, device: torch.device | None = None) -> Runner:
    return build_parts(path, hands=False, face=True, body=False, device=device)


def build_full(path: Path, device: torch.device | None = None) -> Runner:
    return build_parts(path, hands=True, face=True, device=device)

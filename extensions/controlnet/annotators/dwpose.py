"""DWPose whole-body keypoints through onnxruntime: `yolox_l.onnx` finds people, then
`dw-ll_ucoco_384.onnx` (an RTMPose model with SimCC heads) gives 133 COCO-WholeBody points per person
(17 body, 6 feet, 68 face, 21 per hand), which are reordered to OpenPose's 18 body points (the neck
is the shoulders' mean) and drawn with the hands and face.

The detector sees the image scaled to fit its input (640x640), padded with grey 114; its output rows
are YOLOX's (cx, cy, log w, log h, objectness, class scores) per anchor of strides 8, 16 and 32. Each
person box, widened by 1.25 and fixed to the pose input's aspect ratio, is cropped by an affine warp
and normalised with ImageNet's mean and std; each point is the argmax of its x and y SimCC vectors
(two bins per pixel), its score the smaller of the two maxima.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from modules.plugins import api

from .onnx import input_size, onnx_session
from .posedraw import Person, PoseMap, pose_map

DETECTOR_FILE = "yolox_l.onnx"
POSE_FILE = "dw-ll_ucoco_384.onnx"
DET_STRIDES, DET_PAD, NMS_IOU, BOX_SCORE = (8, 16, 32), 114, 0.45, 0.3
BOX_PADDING, SIMCC_SPLIT, SEEN = 1.25, 2.0, 0.3
MEAN = np.array([123.675, 116.28, 103.53], np.float32)
STD = np.array([58.395, 57.12, 57.375], np.float32)
# COCO-WholeBody body points -> OpenPose's order (after the neck is inserted at 17)
MMPOSE_BODY = [17, 6, 8, 10, 7, 9, 12, 14, 16, 13, 15, 2, 1, 4, 3]
OPENPOSE_BODY = [1, 2, 3, 4, 6, 7, 8, 9, 10, 12, 13, 14, 15, 16, 17]
FACE, LEFT_HAND, RIGHT_HAND = slice(24, 92), slice(92, 113), slice(113, 134)


def session(path: Path) -> Any:
    """An onnxruntime session of a DWPose file, with every failure as a message naming the file."""
    return onnx_session(path, users="The DWPose preprocessors", extra="pose",
                        missing=f"DWPose needs {path.name} in {path.parent}; download it from DWPose's release "
                                f"(yzd-v/DWPose on Hugging Face) into {path.parent}",
                        kind="Annotator file", fix=f"download {path.name} again",
                        providers=("CUDAExecutionProvider", "CPUExecutionProvider"))


def _bilinear(rgb: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(rgb, dtype=np.float32)).permute(2, 0, 1)[None]
    return F.interpolate(t, size=size, mode="bilinear", align_corners=False)[0].round().clamp(0, 255)


def _anchor_grid(size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    grids, strides = [], []
    for stride in DET_STRIDES:
        ys, xs = np.meshgrid(np.arange(size[0] // stride), np.arange(size[1] // stride), indexing="ij")
        grids.append(np.stack([xs, ys], axis=-1).reshape(-1, 2))
        strides.append(np.full((grids[-1].shape[0], 1), stride))
    return np.concatenate(grids).astype(np.float32), np.concatenate(strides).astype(np.float32)


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> np.ndarray:
    """Greedy non-maximum suppression (YOLOX's, with its +1 pixel areas): the kept indices, best first."""
    x1, y1, x2, y2 = boxes.T
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order, keep = scores.argsort()[::-1], []
    while order.size:
        i, rest = order[0], order[1:]
        keep.append(i)
        w = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + 1)
        h = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + 1)
        overlap = w * h / (areas[i] + areas[rest] - w * h)
        order = rest[overlap <= iou]
    return np.array(keep, dtype=int)


def detect_boxes(det: Any, rgb: np.ndarray) -> np.ndarray:
    """Person boxes (n, 4: x1, y1, x2, y2) in image pixels."""
    size = input_size(det, (640, 640))
    h, w = rgb.shape[:2]
    ratio = min(size[0] / h, size[1] / w)
    padded = torch.full((3, *size), float(DET_PAD))
    fit = (max(1, int(h * ratio)), max(1, int(w * ratio)))
    padded[:, :fit[0], :fit[1]] = _bilinear(rgb, fit)
    out = det.run(None, {det.get_inputs()[0].name: padded[None].numpy()})[0][0]
    grid, strides = _anchor_grid(size)
    if out.ndim != 2 or out.shape[0] != len(grid) or out.shape[1] < 6:
        raise api.InvalidParams(f"{DETECTOR_FILE} gave output {tuple(out.shape)}, not YOLOX rows for "
                                f"{len(grid)} anchors; use yolox_l.onnx from DWPose's release")
    centres = (out[:, :2] + grid) * strides
    half = np.exp(out[:, 2:4]) * strides / 2
    boxes = np.concatenate([centres - half, centres + half], axis=1) / ratio
    scores = out[:, 4] * out[:, 5]  # objectness x the person class
    boxes, scores = boxes[scores > BOX_SCORE], scores[scores > BOX_SCORE]
    return boxes[nms(boxes, scores, NMS_IOU)]


def _warp(rgb: np.ndarray, centre: np.ndarray, scale: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The box (centre, scale) resampled bilinearly to `size` (as cv2.warpAffine, black outside)."""
    h, w = rgb.shape[:2]
    step = scale[0] / size[1]
    xs = (np.arange(size[1]) - size[1] / 2) * step + centre[0]
    ys = (np.arange(size[0]) - size[0] / 2) * step + centre[1]
    gx = torch.from_numpy(xs / max(w - 1, 1) * 2 - 1).float()
    gy = torch.from_numpy(ys / max(h - 1, 1) * 2 - 1).float()
    grid = torch.stack(torch.meshgrid(gx, gy, indexing="xy"), dim=-1)[None]
    t = torch.from_numpy(np.ascontiguousarray(rgb, dtype=np.float32)).permute(2, 0, 1)[None]
    out = F.grid_sample(t, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    return out[0].permute(1, 2, 0).numpy()


def decode_simcc(simcc_x: np.ndarray, simcc_y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(K, 2) bin positions and (K,) scores: argmax per axis, score the smaller maximum (-1 where <= 0)."""
    locs = np.stack([simcc_x.argmax(-1), simcc_y.argmax(-1)], axis=-1).astype(np.float32)
    scores = np.minimum(simcc_x.max(-1), simcc_y.max(-1))
    locs[scores <= 0] = -1
    return locs, scores


def estimate(pose: Any, rgb: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """(people, 133, 3): x, y (image pixels) and score of each whole-body point, one box at a time."""
    ih, iw = input_size(pose, (384, 288))
    names = [o.name for o in pose.get_outputs()]
    names = ["simcc_x", "simcc_y"] if {"simcc_x", "simcc_y"} <= set(names) else names[:2]
    if not len(boxes):  # nobody found: treat the whole image as one person's box
        boxes = np.array([[0, 0, rgb.shape[1], rgb.shape[0]]], np.float32)
    people = []
    for x1, y1, x2, y2 in boxes:
        centre = np.array([(x1 + x2) / 2, (y1 + y2) / 2])
        sw, sh = (x2 - x1) * BOX_PADDING, (y2 - y1) * BOX_PADDING
        scale = np.array([sw, sw * ih / iw] if sw > sh * iw / ih else [sh * iw / ih, sh])
        crop = (_warp(rgb, centre, scale, (ih, iw)) - MEAN) / STD
        simcc_x, simcc_y = pose.run(names, {pose.get_inputs()[0].name: crop.transpose(2, 0, 1)[None]})
        locs, scores = decode_simcc(simcc_x[0], simcc_y[0])
        points = locs / SIMCC_SPLIT / np.array([iw, ih]) * scale + centre - scale / 2
        people.append(np.concatenate([points, scores[:, None]], axis=1))
    return np.stack(people)


def to_openpose(points: np.ndarray) -> np.ndarray:
    """(people, 134, 3): the neck inserted at 17 and the body points in OpenPose's order."""
    neck = points[:, [5, 6]].mean(axis=1)
    neck[:, 2] = (points[:, 5, 2] > SEEN) & (points[:, 6, 2] > SEEN)
    points = np.insert(points, 17, neck, axis=1)
    points[:, OPENPOSE_BODY] = points[:, MMPOSE_BODY]
    return points


def _seen(points: np.ndarray, strict: bool) -> np.ndarray:
    seen = points[:, 2] > SEEN if strict else points[:, 2] >= SEEN
    return np.concatenate([points[:, :2], seen[:, None].astype(np.float64)], axis=1)


def detect_people(det: Any, pose: Any, rgb: np.ndarray) -> list[Person]:
    people = []
    for p in to_openpose(estimate(pose, rgb, detect_boxes(det, rgb))):
        people.append(Person(_seen(p[:18], strict=True), _seen(p[FACE], strict=False),
                             [_seen(p[LEFT_HAND], strict=False), _seen(p[RIGHT_HAND], strict=False)]))
    return people


def build(path: Path):
    """The `dw_openpose_full` runner (body, hands and face); `path` is the pose model, the detector sits beside it."""
    det, pose = session(path.parent / DETECTOR_FILE), session(path)
    if len(pose.get_outputs()) < 2 or len(pose.get_inputs()[0].shape) != 4:
        raise api.InvalidParams(f"Annotator file {path} is not a SimCC pose model (two outputs, simcc_x and "
                                f"simcc_y); use {POSE_FILE} from DWPose's release")

    def run(rgb: np.ndarray, resolution: int, a: float, b: float, seed: int) -> PoseMap:
        h, w = rgb.shape[:2]
        return pose_map(detect_people(det, pose, rgb[..., :3]), h, w)

    return run

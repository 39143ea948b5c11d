"""Face embeddings from insightface's buffalo_l ONNX files, for the IP-Adapter FaceID preprocessors.

Users keep `det_10g.onnx` (SCRFD: face boxes and 5 landmarks) and `w600k_r50.onnx` (ArcFace:
a 512-d identity embedding of a 112x112 aligned face) in `models/insightface/models/buffalo_l/`.

The detector sees the image scaled to fit its input (640x640 where the file leaves it dynamic), placed at
the top left of a black canvas, as (x - 127.5) / 128 in RGB. Its outputs are, in order, the scores,
box distances and landmark offsets of strides 8, 16 and 32 (2 anchors per cell; distances and offsets in
units of the stride from the cell's top-left corner). Faces scoring 0.5 or more are kept after
non-maximum suppression at IoU 0.4, and the largest is used. Its 5 landmarks (eyes, nose, mouth corners)
are mapped by a least-squares similarity transform (Umeyama) onto ArcFace's 112x112 template; the warped
crop, as (x - 127.5) / 127.5 in RGB, gives the embedding, L2-normalised (insightface's `normed_embedding`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from modules.plugins import api

from .dwpose import nms
from .onnx import input_size, onnx_session

DETECTOR_FILE, RECOGNIZER_FILE = "det_10g.onnx", "w600k_r50.onnx"
DET_SIZE, DET_STRIDES, ANCHORS, DET_SCORE, DET_IOU = (640, 640), (8, 16, 32), 2, 0.5, 0.4
# ArcFace's landmark template for a 112x112 crop (left eye, right eye, nose, left and right mouth corners)
ARCFACE_TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                             [41.5493, 92.3655], [70.7299, 92.2041]], np.float32)


@dataclass(frozen=True)
class Face:
    """A detected face in image pixels: box (x1, y1, x2, y2), 5 landmarks (x, y), score."""

    box: np.ndarray
    landmarks: np.ndarray
    score: float

    @property
    def area(self) -> float:
        return float((self.box[2] - self.box[0]) * (self.box[3] - self.box[1]))


def session(path: Path) -> Any:
    """An onnxruntime session of a buffalo_l file; a missing file or package is one clear message."""
    return onnx_session(path, users="The IP-Adapter FaceID preprocessors", extra="faceid",
                        missing=f"The IP-Adapter FaceID preprocessors need insightface's {path.name} in "
                                f"{path.parent}: put the buffalo_l model files (det_10g.onnx, w600k_r50.onnx) there",
                        kind="insightface file", fix=f"put a fresh copy of {path.name} there")


def _planar(rgb: np.ndarray, mean: float, std: float) -> np.ndarray:
    return ((rgb.astype(np.float32) - mean) / std).transpose(2, 0, 1)[None]


def _letterbox(rgb: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, float]:
    """The image scaled to fit `size` (h, w), at the top left of a black canvas, and its scale."""
    h, w = rgb.shape[:2]
    if h / w > size[0] / size[1]:
        new_h, new_w = size[0], int(size[0] * w / h)
    else:
        new_h, new_w = int(size[1] * h / w), size[1]
    t = torch.from_numpy(np.ascontiguousarray(rgb, dtype=np.float32)).permute(2, 0, 1)[None]
    resized = F.interpolate(t, size=(new_h, new_w), mode="bilinear", align_corners=False)[0]
    canvas = np.zeros((size[0], size[1], 3), np.float32)
    canvas[:new_h, :new_w] = resized.round().clamp(0, 255).permute(1, 2, 0).numpy()
    return canvas, new_h / h


def _centers(size: tuple[int, int], stride: int) -> np.ndarray:
    ys, xs = np.mgrid[:size[0] // stride, :size[1] // stride]
    grid = np.stack([xs, ys], axis=-1).reshape(-1, 2).astype(np.float32) * stride
    return np.repeat(grid, ANCHORS, axis=0)


def detect_faces(det: Any, rgb: np.ndarray) -> list[Face]:
    """SCRFD faces in image pixels, best first."""
    size = input_size(det, DET_SIZE)
    canvas, scale = _letterbox(rgb, size)
    outs = det.run(None, {det.get_inputs()[0].name: _planar(canvas, 127.5, 128.0)})
    n = len(DET_STRIDES)
    boxes, points, scores = [], [], []
    for i, stride in enumerate(DET_STRIDES):
        score = outs[i].reshape(-1)
        dist, offsets = outs[i + n].reshape(-1, 4) * stride, outs[i + 2 * n].reshape(-1, 5, 2) * stride
        c = _centers(size, stride)
        keep = score >= DET_SCORE
        boxes.append(np.concatenate([c - dist[:, :2], c + dist[:, 2:]], axis=1)[keep])
        points.append((c[:, None] + offsets)[keep])
        scores.append(score[keep])
    box, pts, score = (np.concatenate(x) / s for x, s in ((boxes, scale), (points, scale), (scores, 1.0)))
    return [Face(box[i], pts[i], float(score[i])) for i in nms(box, score, DET_IOU)]


def similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 2x3 least-squares similarity transform (rotation, uniform scale, shift) taking src onto dst (Umeyama)."""
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s, d = src - mu_s, dst - mu_d
    cov = d.T @ s / len(src)
    u, sv, vt = np.linalg.svd(cov)
    sign = np.array([1.0, -1.0 if np.linalg.det(cov) < 0 else 1.0])
    rot = u @ np.diag(sign) @ vt
    scale = (sv @ sign) / s.var(0).sum()
    return np.concatenate([scale * rot, (mu_d - scale * rot @ mu_s)[:, None]], axis=1)


def warp(rgb: np.ndarray, matrix: np.ndarray, size: int) -> np.ndarray:
    """The size x size crop whose pixel p is the image at matrix^-1 p (bilinear, black outside), uint8."""
    inverse = np.linalg.inv(np.vstack([matrix, [0, 0, 1]]))[:2]
    ys, xs = np.mgrid[:size, :size].astype(np.float64)
    src = np.einsum("ij,jhw->hwi", inverse, np.stack([xs, ys, np.ones_like(xs)]))
    h, w = rgb.shape[:2]
    grid = torch.from_numpy(np.stack([2 * src[..., 0] / max(w - 1, 1) - 1, 2 * src[..., 1] / max(h - 1, 1) - 1], -1))
    image = torch.from_numpy(np.ascontiguousarray(rgb, dtype=np.float32)).permute(2, 0, 1)[None]
    out = F.grid_sample(image, grid[None].float(), mode="bilinear", padding_mode="zeros", align_corners=True)
    return out[0].permute(1, 2, 0).round().clamp(0, 255).numpy().astype(np.uint8)


def align(rgb: np.ndarray, landmarks: np.ndarray, size: int = 112) -> np.ndarray:
    """The face warped so that its landmarks fall on ArcFace's template (scaled to `size`, a multiple of 112)."""
    return warp(rgb, similarity(landmarks.astype(np.float64), ARCFACE_TEMPLATE * (size / 112.0)), size)


class FaceAnalyzer:
    """The detector and recognizer sessions of one buffalo_l folder, opened on first use."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._sessions: dict[str, Any] = {}

    def _session(self, name: str) -> Any:
        if name not in self._sessions:
            self._sessions[name] = session(self.folder / name)
        return self._sessions[name]

    def largest_face(self, rgb: np.ndarray) -> Face:
        """The largest detected face; InvalidParams when there is none."""
        faces = detect_faces(self._session(DETECTOR_FILE), rgb)
        if not faces:
            raise api.InvalidParams("IP-Adapter FaceID found no face in the unit's image: use a photo with a clearly "
                                    "visible, roughly frontal face")
        return max(faces, key=lambda f: f.area)

    def embedding(self, rgb: np.ndarray, face: Face) -> np.ndarray:
        """The face's L2-normalised ArcFace embedding (512 values for w600k_r50)."""
        rec = self._session(RECOGNIZER_FILE)
        size = input_size(rec, (112, 112))[0]
        crop = align(rgb, face.landmarks, size)
        out = rec.run(None, {rec.get_inputs()[0].name: _planar(crop, 127.5, 127.5)})[0].reshape(-1)
        return out / max(float(np.linalg.norm(out)), 1e-12)

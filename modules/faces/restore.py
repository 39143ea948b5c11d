"""Face restoration on PIL images: detect (RetinaFace), align to the model's template, restore,
paste back under a feathered mask, blend by visibility.

As facexlib (which A1111 uses) does: the image is scaled up for detection until its short side is
`det_size` (640; never scaled down), faces below 0.97 confidence or with eyes under 5 pixels
apart are skipped, and every remaining face is restored, best score first.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from modules.faces import align, retinaface
from modules.faces.load import FaceNet

MIN_EYE_DISTANCE = 5.0


@dataclass(frozen=True)
class DetectOptions:
    det_size: int = 640  # short side the image is scaled up to for detection (0: as it is)
    threshold: float = 0.97
    iou: float = 0.4


@dataclass(frozen=True)
class Face:
    detection: retinaface.Detection
    matrix: torch.Tensor  # image -> face crop (2x3)
    region: tuple[int, int, int, int] | None  # image pixels the paste can change (left, top, right, bottom)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """(1, 3, H, W) float32 0-255 from a PIL image."""
    array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1)[None].float()


def to_image(x: torch.Tensor) -> Image.Image:
    array = x[0].clamp(0, 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(np.ascontiguousarray(array), "RGB")


def find_faces(detector: retinaface.RetinaFace, image: torch.Tensor, size: int,
               options: DetectOptions = DetectOptions()) -> list[Face]:  # noqa: B008 (frozen)
    """Faces in `image` (1, 3, H, W, 0-255) with their transforms to a `size` x `size` crop."""
    _, _, h, w = image.shape
    scale = max(1.0, options.det_size / min(h, w)) if options.det_size else 1.0
    det_input = image[0]
    if scale != 1.0:
        det_input = F.interpolate(image, size=(round(h * scale), round(w * scale)), mode="bilinear",
                                  align_corners=False)[0]
    faces = []
    for found in retinaface.detect(detector, det_input, options.threshold, options.iou):
        points = torch.tensor(found.landmarks, dtype=torch.float64) / scale
        if float((points[0] - points[1]).norm()) < MIN_EYE_DISTANCE:
            continue
        detection = retinaface.Detection(tuple(v / scale for v in found.box), found.score,
                                         tuple(map(tuple, points.tolist())))
        matrix = align.similarity(points, align.template(size))
        faces.append(Face(detection, matrix, align.face_region(matrix, size, h, w)))
    return faces


def restore_faces(image: Image.Image, detector: retinaface.RetinaFace, model: FaceNet, weight: float = 0.5,
                  options: DetectOptions = DetectOptions()) -> tuple[Image.Image, list[Face]]:  # noqa: B008
    """Every detected face restored and pasted back; pixels outside the faces keep their values."""
    x = to_tensor(image)
    faces = find_faces(detector, x, model.size, options)
    param = next(model.net.parameters())
    out = x
    for face in faces:
        crop = align.warp_face(x, face.matrix, model.size)
        with torch.inference_mode():
            restored = model.run((crop / 127.5 - 1).to(param), weight).float().cpu()
        out = align.paste_face(out, ((restored.clamp(-1, 1) + 1) * 127.5), face.matrix)
    return to_image(out), faces


def blend(original: Image.Image, restored: Image.Image, visibility: float) -> Image.Image:
    """`restored` over `original` at `visibility`; pixels equal in both are returned unchanged."""
    if visibility >= 1:
        return restored
    a, b = to_tensor(original), to_tensor(restored)
    mixed = (a + (b - a) * visibility).round()
    return to_image(torch.where(a == b, a, mixed))

"""Pose keypoints drawn as ControlNet's OpenPose hint, and their sd-webui-controlnet JSON form.

A `Person` holds pixel coordinates with a visibility flag per point: 18 body points in OpenPose's
order (nose, neck, right shoulder/elbow/wrist, left shoulder/elbow/wrist, right hip/knee/ankle,
left hip/knee/ankle, right/left eye, right/left ear), optionally 68 face points and 21 points per
hand. The drawing follows the OpenPose ControlNet's training maps: limbs as ellipses in 60% of the
limb's colour, joints as radius-4 discs, hands as HSV-coloured lines with blue joints, faces as
white dots, all on black.
"""
from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

BODY_COLORS = ((255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0), (0, 255, 0),
               (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255), (0, 0, 255), (85, 0, 255),
               (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85))
# OpenPose's 19 body limbs (zero-based point pairs); the first 17 are drawn, the last two (ear-shoulder)
# only help to group points into people.
BODY_LIMBS = ((1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10), (1, 11), (11, 12), (12, 13),
              (1, 0), (0, 14), (14, 16), (0, 15), (15, 17), (2, 16), (5, 17))
DRAWN_LIMBS = 17
HAND_EDGES = ((0, 1), (1, 2), (2, 3), (3, 4), (0, 5), (5, 6), (6, 7), (7, 8), (0, 9), (9, 10), (10, 11), (11, 12),
              (0, 13), (13, 14), (14, 15), (15, 16), (0, 17), (17, 18), (18, 19), (19, 20))
HAND_JOINT = (0, 0, 255)
FACE_DOT = (255, 255, 255)
STICK_WIDTH = 4


@dataclass
class Person:
    """Keypoints as (n, 3) float arrays of x, y (pixels) and visibility (1 seen, 0 not)."""

    body: np.ndarray
    face: np.ndarray | None = None
    hands: list[np.ndarray] = field(default_factory=list)  # left, right


def _seen(points: np.ndarray, i: int) -> bool:
    return bool(points[i, 2] > 0)


def _disc(draw: ImageDraw.ImageDraw, x: float, y: float, radius: int, color: tuple[int, ...]) -> None:
    cx, cy = int(x), int(y)
    draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=color)


def _limb(draw: ImageDraw.ImageDraw, a: np.ndarray, b: np.ndarray, color: tuple[int, ...]) -> None:
    """A filled ellipse from a to b, STICK_WIDTH wide (as cv2.ellipse2Poly + fillConvexPoly)."""
    cx, cy = (a[0] + b[0]) / 2, (a[1] + b[1]) / 2
    half = math.hypot(a[0] - b[0], a[1] - b[1]) / 2
    angle = math.atan2(a[1] - b[1], a[0] - b[0])
    t = np.radians(np.arange(0, 361))
    xs = cx + half * np.cos(t) * math.cos(angle) - STICK_WIDTH * np.sin(t) * math.sin(angle)
    ys = cy + half * np.cos(t) * math.sin(angle) + STICK_WIDTH * np.sin(t) * math.cos(angle)
    draw.polygon([(float(x), float(y)) for x, y in zip(np.round(xs), np.round(ys), strict=True)], fill=color)


def draw_body(draw: ImageDraw.ImageDraw, body: np.ndarray) -> None:
    for (i, j), color in zip(BODY_LIMBS[:DRAWN_LIMBS], BODY_COLORS, strict=False):
        if _seen(body, i) and _seen(body, j):
            _limb(draw, body[i], body[j], tuple(int(c * 0.6) for c in color))
    for i, color in enumerate(BODY_COLORS):
        if _seen(body, i):
            _disc(draw, body[i, 0], body[i, 1], 4, color)


def draw_hand(draw: ImageDraw.ImageDraw, hand: np.ndarray) -> None:
    for k, (i, j) in enumerate(HAND_EDGES):
        if _seen(hand, i) and _seen(hand, j):
            color = tuple(int(c * 255) for c in colorsys.hsv_to_rgb(k / len(HAND_EDGES), 1.0, 1.0))
            draw.line([(int(hand[i, 0]), int(hand[i, 1])), (int(hand[j, 0]), int(hand[j, 1]))], fill=color, width=2)
    for i in range(len(hand)):
        if _seen(hand, i):
            _disc(draw, hand[i, 0], hand[i, 1], 4, HAND_JOINT)


def draw_face(draw: ImageDraw.ImageDraw, face: np.ndarray) -> None:
    for i in range(len(face)):
        if _seen(face, i):
            _disc(draw, face[i, 0], face[i, 1], 3, FACE_DOT)


def draw_people(people: list[Person], height: int, width: int, body: bool = True, hands: bool = True,
                face: bool = True) -> np.ndarray:
    """The pose hint (uint8 HxWx3): the chosen parts of every person on black."""
    canvas = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(canvas)
    for person in people:
        if body:
            draw_body(draw, person.body)
    for person in people:
        for hand in person.hands if hands else ():
            draw_hand(draw, hand)
    for person in people:
        if face and person.face is not None:
            draw_face(draw, person.face)
    return np.asarray(canvas).copy()


def _flat(points: np.ndarray | None, height: int, width: int) -> list[float] | None:
    if points is None or not len(points):
        return None
    out: list[float] = []
    for x, y, seen in points:
        out += [float(x) / width, float(y) / height, 1.0] if seen > 0 else [0.0, 0.0, 0.0]
    return out


def poses_json(people: list[Person], height: int, width: int) -> dict:
    """sd-webui-controlnet's pose JSON (OpenPose's keypoint format, coordinates as fractions of the canvas)."""
    return {
        "people": [{"pose_keypoints_2d": _flat(p.body, height, width),
                    "face_keypoints_2d": _flat(p.face, height, width),
                    "hand_left_keypoints_2d": _flat(p.hands[0] if p.hands else None, height, width),
                    "hand_right_keypoints_2d": _flat(p.hands[1] if len(p.hands) > 1 else None, height, width)}
                   for p in people],
        "canvas_height": height,
        "canvas_width": width,
    }


class PoseMap(np.ndarray):
    """A drawn pose hint that also carries its pose JSON (`poses`) for /controlnet/detect."""

    poses: dict | None = None


def pose_map(people: list[Person], height: int, width: int, **parts: bool) -> PoseMap:
    drawn = draw_people(people, height, width, **parts).view(PoseMap)
    drawn.poses = poses_json(people, height, width)
    return drawn

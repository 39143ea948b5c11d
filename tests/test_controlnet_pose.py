"""Pose preprocessors: `openpose` (CMU's body model in our torch) and `dw_openpose_full` (YOLOX +
DWPose through onnxruntime). The tiny files are written here, independently of the loaders: a narrow
body model by the original key names (checked against a forward written from the published
architecture), and ONNX models exported from small torch modules with DWPose's input and output
names (a detector giving fixed YOLOX rows, SimCC heads peaking at planted bins or at the brightest
pixel). The drawing is checked at planted keypoints; every error names its file; /controlnet/detect
runs both over HTTP."""
from __future__ import annotations

import base64
import io
import math
import sys
from collections import OrderedDict
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from extensions.controlnet.annotators import Annotators, dwpose, openpose, posedraw
from modules.plugins import api
from tests.api_server import start_server
from tests.fixtures.make_tiny_checkpoint import make_tiny_checkpoint
from tests.fixtures.make_tiny_controlnet import make_tiny_controlnet

# ------------------------------------------------------------------ OpenPose body model (published layout)
PAFS, HEATS = 38, 19


def body_layers(w: int) -> dict[str, list[tuple]]:
    """Blocks of (name, in, out, kernel) or (pool name,), as the CMU model; widths are w-multiples
    standing in for 64/128/256/512."""
    feat, mid, wide = w, w, 2 * w
    block0 = [("conv1_1", 3, w, 3), ("conv1_2", w, w, 3), ("pool1_stage1",), ("conv2_1", w, w, 3),
              ("conv2_2", w, w, 3), ("pool2_stage1",), ("conv3_1", w, 2 * w, 3), ("conv3_2", 2 * w, 2 * w, 3),
              ("conv3_3", 2 * w, 2 * w, 3), ("conv3_4", 2 * w, 2 * w, 3), ("pool3_stage1",),
              ("conv4_1", 2 * w, 2 * w, 3), ("conv4_2", 2 * w, 2 * w, 3), ("conv4_3_CPM", 2 * w, w, 3),
              ("conv4_4_CPM", w, feat, 3)]
    blocks = {"model0": block0}
    for branch, out in ((1, PAFS), (2, HEATS)):
        blocks[f"model1_{branch}"] = [(f"conv5_1_CPM_L{branch}", feat, mid, 3), (f"conv5_2_CPM_L{branch}", mid, mid, 3),
                                      (f"conv5_3_CPM_L{branch}", mid, mid, 3), (f"conv5_4_CPM_L{branch}", mid, wide, 1),
                                      (f"conv5_5_CPM_L{branch}", wide, out, 1)]
        for t in range(2, 7):
            blocks[f"model{t}_{branch}"] = [
                (f"Mconv1_stage{t}_L{branch}", PAFS + HEATS + feat, mid, 7),
                *[(f"Mconv{i}_stage{t}_L{branch}", mid, mid, 7) for i in range(2, 6)],
                (f"Mconv6_stage{t}_L{branch}", mid, mid, 1), (f"Mconv7_stage{t}_L{branch}", mid, out, 1)]
    return blocks


def conv_blocks(blocks: dict[str, list[tuple]], features: str) -> nn.ModuleDict:
    """The published CMU nets' blocks from their layer lists: a ReLU after every convolution but each stage's
    last (the `features` block keeps its last ReLU); a one-name entry is a 2x2 max pool."""
    out = nn.ModuleDict()
    for block, layers in blocks.items():
        seq = OrderedDict()
        for i, layer in enumerate(layers):
            if len(layer) == 1:
                seq[layer[0]] = nn.MaxPool2d(2, 2, 0)
                continue
            name, cin, cout, k = layer
            seq[name] = nn.Conv2d(cin, cout, k, 1, k // 2)
            if block == features or i < len(layers) - 1:
                seq[f"{name}_relu"] = nn.ReLU()
        out[block] = nn.Sequential(seq)
    return out


class ReferenceBody(nn.Module):
    """The published bodypose model: conv+ReLU blocks (no ReLU after each branch's last conv)."""

    def __init__(self, w: int) -> None:
        super().__init__()
        self.blocks = conv_blocks(body_layers(w), "model0")

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feat = self.blocks["model0"](x)
        paf, heat = self.blocks["model1_1"](feat), self.blocks["model1_2"](feat)
        for t in range(2, 7):
            both = torch.cat([paf, heat, feat], 1)
            paf, heat = self.blocks[f"model{t}_1"](both), self.blocks[f"model{t}_2"](both)
        return paf, heat


def write_body_model(path: Path, w: int = 8, seed: int = 0) -> ReferenceBody:
    torch.manual_seed(seed)
    ref = ReferenceBody(w).eval()
    # the released file's keys drop the block name: "conv1_1.weight", "Mconv7_stage6_L2.bias", ...
    torch.save({k.split(".", 2)[2]: v for k, v in ref.state_dict().items()}, path)
    return ref


def test_body_network_matches_the_published_architecture(tmp_path):
    ref = write_body_model(tmp_path / "body_pose_model.pth")
    net = openpose.BodyNet(torch.load(tmp_path / "body_pose_model.pth", weights_only=True))
    x = torch.randn(1, 3, 40, 56)
    with torch.no_grad():
        want = ref(x)
    got = net(x)
    assert net.stages == 6 and got[0].shape == (1, PAFS, 5, 7) and got[1].shape == (1, HEATS, 5, 7)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_heatmap_smoothing_matches_scipy():
    ndimage = pytest.importorskip("scipy.ndimage")
    maps = np.random.default_rng(0).random((30, 41, 3)).astype(np.float32)
    want = np.stack([ndimage.gaussian_filter(maps[..., c], sigma=3) for c in range(3)], axis=-1)
    np.testing.assert_allclose(openpose.gaussian(maps, 3.0), want, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ keypoints from planted maps
# a standing person in OpenPose's 18-point order, points at least 9 px apart
PERSON = [(64, 20), (64, 36), (48, 36), (40, 56), (36, 76), (80, 36), (88, 56), (92, 76), (54, 76), (52, 96),
          (50, 116), (74, 76), (76, 96), (78, 116), (58, 10), (70, 10), (48, 16), (80, 16)]
LIMBS = [(1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10), (1, 11), (11, 12), (12, 13),
         (1, 0), (0, 14), (14, 16), (0, 15), (15, 17), (2, 16), (5, 17)]
# OpenPose's mapIdx less the 19 heatmaps: the (x, y) PAF channels of each limb above
PAF_XY = [(12, 13), (20, 21), (14, 15), (16, 17), (22, 23), (24, 25), (0, 1), (2, 3), (4, 5), (6, 7), (8, 9),
          (10, 11), (28, 29), (30, 31), (34, 35), (32, 33), (36, 37), (18, 19), (26, 27)]
COLORS = [(255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0), (0, 255, 0),
          (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255), (0, 0, 255), (85, 0, 255),
          (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85)]


def planted_maps(size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    heat = np.zeros((size, size, HEATS))
    for i, (x, y) in enumerate(PERSON):
        heat[..., i] = np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / 8)
    paf = np.zeros((size, size, PAFS))
    for (a, b), (cx, cy) in zip(LIMBS, PAF_XY, strict=True):
        (x1, y1), (x2, y2) = PERSON[a], PERSON[b]
        length = math.hypot(x2 - x1, y2 - y1)
        ux, uy = (x2 - x1) / length, (y2 - y1) / length
        t = np.clip(((xx - x1) * ux + (yy - y1) * uy) / length, 0, 1)
        near = np.hypot(xx - (x1 + t * (x2 - x1)), yy - (y1 + t * (y2 - y1))) <= 2
        paf[near, cx], paf[near, cy] = ux, uy
    return paf, heat


def test_openpose_groups_planted_joints_and_draws_them():
    people = openpose.people_from_maps(*planted_maps())
    assert len(people) == 1
    body = people[0].body
    assert body[:, 2].tolist() == [1.0] * 18
    np.testing.assert_allclose(body[:, :2], np.array(PERSON, float), atol=1)
    canvas = posedraw.draw_people(people, 128, 128)
    for (x, y), color in zip(PERSON, COLORS, strict=True):
        assert tuple(canvas[y, x]) == color
    assert tuple(canvas[46, 44]) == (153, 102, 0)  # the right upper arm: 60% of its colour
    assert tuple(canvas[2, 2]) == (0, 0, 0) and canvas.dtype == np.uint8


def test_two_people_stay_apart():
    paf, heat = planted_maps()
    paf, heat = np.concatenate([paf, paf], axis=1), np.concatenate([heat, heat], axis=1)  # side by side
    people = sorted(openpose.people_from_maps(paf, heat), key=lambda p: p.body[0, 0])
    assert len(people) == 2
    np.testing.assert_allclose(people[1].body[:, 0] - people[0].body[:, 0], 128, atol=1)


def test_pose_json_has_the_extensions_format():
    people = openpose.people_from_maps(*planted_maps())
    out = posedraw.poses_json(people, 128, 256)
    assert out["canvas_height"] == 128 and out["canvas_width"] == 256
    person = out["people"][0]
    assert len(person["pose_keypoints_2d"]) == 54 and person["face_keypoints_2d"] is None
    assert person["pose_keypoints_2d"][:3] == pytest.approx([64 / 256, 20 / 128, 1.0], abs=0.01)


# ------------------------------------------------------------------ DWPose: exported ONNX stand-ins
DET_SIZE, POSE_H, POSE_W, POINTS = 64, 64, 48, 133


class FixedRows(nn.Module):
    """A YOLOX stand-in: the same (anchors, 85) rows for every image."""

    def __init__(self, rows: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("rows", rows)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.rows[None] + 0 * images.mean()


class PlantedSimCC(nn.Module):
    """SimCC heads whose logits are fixed (planted peaks), whatever the crop."""

    def __init__(self, sx: torch.Tensor, sy: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("sx", sx)
        self.register_buffer("sy", sy)

    def forward(self, input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: A002
        zero = 0 * input.mean()
        return self.sx[None] + zero, self.sy[None] + zero


class BrightestPixel(nn.Module):
    """SimCC heads that put every point at the crop's brightest red pixel (two bins per pixel)."""

    def forward(self, input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: A002
        red = input[:, 0]
        sx = red.amax(dim=1).repeat_interleave(2, dim=-1)
        sy = red.amax(dim=2).repeat_interleave(2, dim=-1)
        return sx[:, None].expand(-1, POINTS, -1), sy[:, None].expand(-1, POINTS, -1)


def export(module: nn.Module, shape: tuple[int, ...], path: Path, inputs: list[str], outputs: list[str]) -> Path:
    torch.onnx.export(module.eval(), (torch.zeros(shape),), str(path), input_names=inputs, output_names=outputs,
                      dynamo=False)
    return path


def yolox_rows(boxes: list[tuple[tuple[float, float, float, float], float]]) -> torch.Tensor:
    """YOLOX's raw rows for 64x64 (anchors of strides 8, 16, 32), each box (x1, y1, x2, y2) on its stride-8 cell."""
    rows = torch.zeros(64 + 16 + 4, 85)
    for (x1, y1, x2, y2), score in boxes:
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        gx, gy = int(cx // 8), int(cy // 8)
        rows[gy * 8 + gx, :4] = torch.tensor([cx / 8 - gx, cy / 8 - gy, math.log((x2 - x1) / 8),
                                              math.log((y2 - y1) / 8)])
        rows[gy * 8 + gx, 4], rows[gy * 8 + gx, 5] = 1.0, score
    return rows


def write_detector(folder: Path, boxes) -> Path:
    return export(FixedRows(yolox_rows(boxes)), (1, 3, DET_SIZE, DET_SIZE), folder / "yolox_l.onnx",
                  ["images"], ["output"])


def write_pose(folder: Path, module: nn.Module) -> Path:
    return export(module, (1, 3, POSE_H, POSE_W), folder / "dw-ll_ucoco_384.onnx", ["input"],
                  ["simcc_x", "simcc_y"])


# the image is 128x128 and the detector sees it at half size: this box is (32, 16, 96, 112) in the image
BOX = (16, 8, 48, 56)
# COCO-WholeBody's body points by OpenPose index (OpenPose 1, the neck, is the shoulders' mean)
COCO_OF_OPENPOSE = {0: 0, 2: 6, 3: 8, 4: 10, 5: 5, 6: 7, 7: 9, 8: 12, 9: 14, 10: 16, 11: 11, 12: 13, 13: 15,
                    14: 2, 15: 1, 16: 4, 17: 3}
FACE0, LEFT_HAND0 = 23, 91  # COCO-WholeBody indices of the first face and left-hand points


def crop_box() -> tuple[np.ndarray, np.ndarray]:
    """The pose crop of BOX in image pixels (centre, size): widened 1.25x, fixed to the 48:64 aspect."""
    x1, y1, x2, y2 = (2 * v for v in BOX)
    h = (y2 - y1) * 1.25
    return np.array([(x1 + x2) / 2, (y1 + y2) / 2]), np.array([h * POSE_W / POSE_H, h])


def planted_simcc(where: dict[int, tuple[float, float]]) -> tuple[PlantedSimCC, dict[int, tuple[float, float]]]:
    """Peaks at the bins nearest the wanted image points; returns the module and the points the bins mean."""
    centre, size = crop_box()
    sx, sy = torch.zeros(POINTS, 2 * POSE_W), torch.zeros(POINTS, 2 * POSE_H)
    meant = {}
    for k, (x, y) in where.items():
        bx = round((x - centre[0] + size[0] / 2) / size[0] * POSE_W * 2)
        by = round((y - centre[1] + size[1] / 2) / size[1] * POSE_H * 2)
        sx[k, bx], sy[k, by] = 1.0, 1.0
        meant[k] = (bx / 2 / POSE_W * size[0] + centre[0] - size[0] / 2, by / 2 / POSE_H * size[1] + centre[1] - size[1] / 2)
    return PlantedSimCC(sx, sy), meant


def body_grid() -> dict[int, tuple[float, float]]:
    return {k: (28 + 18 * (k % 4), 24 + 22 * (k // 4)) for k in range(17)}


@pytest.fixture()
def dw_folder(tmp_path):
    planted = {**body_grid(), FACE0: (100, 30), LEFT_HAND0: (100, 60), LEFT_HAND0 + 1: (100, 90)}
    module, meant = planted_simcc(planted)
    # a second, weaker box over the first is suppressed; a box under the score threshold is dropped
    write_detector(tmp_path, [(BOX, 0.9), ((24, 8, 56, 56), 0.6), ((40, 40, 60, 60), 0.2)])
    write_pose(tmp_path, module)
    return tmp_path, meant


def test_dwpose_draws_planted_points_in_openpose_order(dw_folder):
    folder, meant = dw_folder
    canvas = Annotators(folder).runner("dw_openpose_full", "dw-ll_ucoco_384.onnx", dwpose.build)(
        np.zeros((128, 128, 3), np.uint8), 128, 0, 0, 0)
    assert canvas.shape == (128, 128, 3) and canvas.dtype == np.uint8
    for op, coco in COCO_OF_OPENPOSE.items():
        x, y = meant[coco]
        assert tuple(canvas[int(y), int(x)]) == COLORS[op], op
    neck = np.mean([meant[5], meant[6]], axis=0)
    assert tuple(canvas[int(neck[1]), int(neck[0])]) == COLORS[1]
    face, hand0, hand1 = meant[FACE0], meant[LEFT_HAND0], meant[LEFT_HAND0 + 1]
    assert tuple(canvas[int(face[1]), int(face[0])]) == (255, 255, 255)
    assert tuple(canvas[int(hand0[1]), int(hand0[0])]) == (0, 0, 255)
    assert tuple(canvas[int((hand0[1] + hand1[1]) / 2), int(hand0[0])]) == (255, 0, 0)  # the first finger edge
    poses = canvas.poses["people"]
    assert len(poses) == 1 and len(poses[0]["hand_left_keypoints_2d"]) == 63
    assert poses[0]["pose_keypoints_2d"][:3] == pytest.approx([meant[0][0] / 128, meant[0][1] / 128, 1.0], abs=1e-4)
    assert sum(poses[0]["face_keypoints_2d"][2::3]) == 1 and sum(poses[0]["hand_right_keypoints_2d"][2::3]) == 0


def bright_spot(h: int, w: int, centre: tuple[float, float], sigma: float) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    spot = 255 * np.exp(-((xx - centre[0]) ** 2 + (yy - centre[1]) ** 2) / (2 * sigma**2))
    return np.repeat(spot.round().astype(np.uint8)[..., None], 3, axis=2)


def test_dwpose_crop_and_decode_find_a_bright_spot(tmp_path):
    write_detector(tmp_path, [(BOX, 0.9)])
    write_pose(tmp_path, BrightestPixel())
    det = dwpose.session(tmp_path / "yolox_l.onnx")
    pose = dwpose.session(tmp_path / "dw-ll_ucoco_384.onnx")
    for spot in ((45, 30), (80, 100), (64.5, 63.2)):
        people = dwpose.detect_people(det, pose, bright_spot(128, 128, spot, 3))
        assert len(people) == 1
        # the crop samples the image every 90 / 48 px: the decoded point is the nearest sample
        np.testing.assert_allclose(people[0].body[0, :2], spot, atol=0.95)
    assert len(dwpose.detect_boxes(det, np.zeros((100, 60, 3), np.uint8))) == 1


def test_dwpose_without_a_person_box_uses_the_whole_image(tmp_path):
    write_detector(tmp_path, [])
    write_pose(tmp_path, BrightestPixel())
    det, pose = dwpose.session(tmp_path / "yolox_l.onnx"), dwpose.session(tmp_path / "dw-ll_ucoco_384.onnx")
    people = dwpose.detect_people(det, pose, bright_spot(96, 128, (32, 62), 5))
    assert len(people) == 1
    np.testing.assert_allclose(people[0].body[0, :2], (32, 62), atol=160 / 48 / 2)


# ------------------------------------------------------------------ errors name the file
def test_missing_files_are_named(tmp_path):
    with pytest.raises(api.InvalidParams, match="body_pose_model.pth"):
        Annotators(tmp_path).runner("openpose", "body_pose_model.pth", openpose.build)
    with pytest.raises(api.InvalidParams, match="dw-ll_ucoco_384.onnx"):
        Annotators(tmp_path).runner("dw_openpose_full", "dw-ll_ucoco_384.onnx", dwpose.build)
    write_pose(tmp_path, BrightestPixel())
    with pytest.raises(api.InvalidParams, match="yolox_l.onnx"):
        Annotators(tmp_path).runner("dw_openpose_full", "dw-ll_ucoco_384.onnx", dwpose.build)


def test_corrupt_and_truncated_files_are_named(tmp_path):
    write_pose(tmp_path, BrightestPixel())
    (tmp_path / "yolox_l.onnx").write_bytes(b"this is not an onnx model")
    with pytest.raises(api.InvalidParams, match=r"yolox_l\.onnx.*onnxruntime"):
        Annotators(tmp_path).runner("dw_openpose_full", "dw-ll_ucoco_384.onnx", dwpose.build)
    write_body_model(tmp_path / "whole.pth")
    data = (tmp_path / "whole.pth").read_bytes()
    (tmp_path / "body_pose_model.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(api.InvalidParams, match=r"body_pose_model\.pth could not be read"):
        Annotators(tmp_path).runner("openpose", "body_pose_model.pth", openpose.build)


def test_a_file_of_another_layout_is_refused(tmp_path):
    write_body_model(tmp_path / "x.pth")
    tensors = torch.load(tmp_path / "x.pth", weights_only=True)
    del tensors["Mconv3_stage4_L2.weight"]
    torch.save(tensors, tmp_path / "body_pose_model.pth")
    with pytest.raises(api.InvalidParams, match="does not fit preprocessor 'openpose'.*Mconv3_stage4_L2"):
        Annotators(tmp_path).runner("openpose", "body_pose_model.pth", openpose.build)
    tensors = torch.load(tmp_path / "x.pth", weights_only=True)
    tensors["conv2_1.weight"] = tensors["conv2_1.weight"][:, :4]  # a width that does not chain
    torch.save(tensors, tmp_path / "body_pose_model.pth")
    with pytest.raises(api.InvalidParams, match="does not fit"):
        Annotators(tmp_path).runner("openpose", "body_pose_model.pth", openpose.build)
    write_pose(tmp_path, PlantedSimCC(torch.zeros(POINTS, 4), torch.zeros(POINTS, 4)))
    export(FixedRows(torch.zeros(5, 85)), (1, 3, DET_SIZE, DET_SIZE), tmp_path / "yolox_l.onnx", ["images"], ["output"])
    run = Annotators(tmp_path).runner("dw_openpose_full", "dw-ll_ucoco_384.onnx", dwpose.build)
    with pytest.raises(api.InvalidParams, match="yolox_l.onnx gave output"):
        run(np.zeros((64, 64, 3), np.uint8), 64, 0, 0, 0)


def test_without_onnxruntime_the_message_says_what_to_install(tmp_path, monkeypatch):
    write_pose(tmp_path, BrightestPixel())
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(api.InvalidParams, match="pip install onnxruntime"):
        Annotators(tmp_path).runner("dw_openpose_full", "dw-ll_ucoco_384.onnx", dwpose.build)


# ------------------------------------------------------------------ /controlnet/detect over HTTP
def b64(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def decode(data: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"))


@pytest.fixture(scope="module")
def http(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pose-api")
    checkpoint = make_tiny_checkpoint("sd1", tmp / "src" / "tiny-sd1.safetensors")
    make_tiny_controlnet("sd1", tmp / "models" / "ControlNet" / "cn-pose.safetensors", seed=3)
    srv = start_server(tmp, {"tiny-sd1": checkpoint})
    with httpx.Client(base_url=srv.url, timeout=600) as client:
        client.folder = srv.context.app.settings.models_dir / "annotators"
        yield client
    srv.stop()


def detect(http, module: str, image: np.ndarray, res: int) -> httpx.Response:
    return http.post("/controlnet/detect", json={"controlnet_module": module, "controlnet_input_images": [b64(image)],
                                                  "controlnet_processor_res": res})


def test_detect_route_runs_openpose(http):
    image = np.random.default_rng(0).integers(0, 255, (64, 80, 3), dtype=np.uint8)
    missing = detect(http, "openpose", image, 64)
    assert missing.status_code == 422 and "body_pose_model.pth" in missing.json()["detail"]
    http.folder.mkdir(parents=True, exist_ok=True)
    write_body_model(http.folder / "body_pose_model.pth")
    reply = detect(http, "openpose", image, 64)
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert decode(body["images"][0]).shape == (64, 80, 3)
    assert body["poses"][0]["canvas_width"] == 80 and body["poses"][0]["canvas_height"] == 64
    assert "poses" not in detect(http, "invert", image, 64).json()


def test_detect_route_runs_dwpose(http, dw_folder):
    folder, meant = dw_folder
    http.folder.mkdir(parents=True, exist_ok=True)
    for name in ("yolox_l.onnx", "dw-ll_ucoco_384.onnx"):
        (http.folder / name).write_bytes((folder / name).read_bytes())
    reply = detect(http, "dw_openpose_full", np.zeros((128, 128, 3), np.uint8), 128)
    assert reply.status_code == 200, reply.text
    canvas = decode(reply.json()["images"][0])
    x, y = meant[0]
    assert tuple(canvas[int(y), int(x)]) == COLORS[0]
    nose = reply.json()["poses"][0]["people"][0]["pose_keypoints_2d"][:3]
    assert nose == pytest.approx([x / 128, y / 128, 1.0], abs=1e-4)


@pytest.mark.slow  # loads a tiny checkpoint and runs two jobs
def test_a_job_with_a_dwpose_unit(http, dw_folder):
    folder, _ = dw_folder
    http.folder.mkdir(parents=True, exist_ok=True)
    for name in ("yolox_l.onnx", "dw-ll_ucoco_384.onnx"):
        (http.folder / name).write_bytes((folder / name).read_bytes())
    job = {"prompt": "a dancer", "steps": 2, "width": 64, "height": 64, "seed": 3, "sampler_name": "Euler"}
    unit = {"enabled": True, "input_image": b64(np.zeros((128, 128, 3), np.uint8)), "module": "dw_openpose_full",
            "model": "cn-pose", "processor_res": 128}
    plain = http.post("/sdapi/v1/txt2img", json=job)
    posed = http.post("/sdapi/v1/txt2img", json={**job, "alwayson_scripts": {"controlnet": {"args": [unit]}}})
    assert plain.status_code == posed.status_code == 200, posed.text
    a, b = (decode(r.json()["images"][0]).astype(float) for r in (plain, posed))
    assert np.abs(a - b).mean() > 0.5
    assert "Module: dw_openpose_full" in posed.json()["info"]

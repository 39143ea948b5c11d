"""OpenPose hands and face (`openpose_hand`, `openpose_face`, `openpose_faceonly`, `openpose_full`).

Narrow hand and face networks are written here by the released key names from a reference module
built from the published layer list (independent of the loader) and compared with our forward;
planted heatmaps decode to the right points and colours; the boxes follow the body's arms and head;
missing or foreign files are named; /controlnet/detect runs openpose_full over HTTP."""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from extensions.controlnet.annotators import Annotators, annotator_device, openpose_parts, posedraw
from modules.plugins import api
from tests.test_controlnet_pose import b64, conv_blocks, decode, http, write_body_model  # noqa: F401  (http: the server fixture)


# ------------------------------------------------------------------ the published layout
def cpm_layers(w: int, maps: int) -> dict[str, list[tuple]]:
    """Blocks of (name, in, out, kernel) or (pool name,), as CMU's hand and face models; widths are
    w-multiples standing in for 64/128/256/512."""
    vgg = [("conv1_1", 3, w, 3), ("conv1_2", w, w, 3), ("pool1_stage1",), ("conv2_1", w, 2 * w, 3),
           ("conv2_2", 2 * w, 2 * w, 3), ("pool2_stage1",), ("conv3_1", 2 * w, 2 * w, 3),
           ("conv3_2", 2 * w, 2 * w, 3), ("conv3_3", 2 * w, 2 * w, 3), ("conv3_4", 2 * w, 2 * w, 3),
           ("pool3_stage1",), ("conv4_1", 2 * w, 3 * w, 3), ("conv4_2", 3 * w, 3 * w, 3),
           ("conv4_3", 3 * w, 3 * w, 3), ("conv4_4", 3 * w, 3 * w, 3), ("conv5_1", 3 * w, 3 * w, 3),
           ("conv5_2", 3 * w, 3 * w, 3), ("conv5_3_CPM", 3 * w, w, 3)]
    blocks = {"model1_0": vgg, "model1_1": [("conv6_1_CPM", w, 3 * w, 1), ("conv6_2_CPM", 3 * w, maps, 1)]}
    for t in range(2, 7):
        blocks[f"model{t}"] = [(f"Mconv1_stage{t}", maps + w, w, 7),
                               *[(f"Mconv{i}_stage{t}", w, w, 7) for i in range(2, 6)],
                               (f"Mconv6_stage{t}", w, w, 1), (f"Mconv7_stage{t}", w, maps, 1)]
    return blocks


class ReferenceCPM(nn.Module):
    """handpose_model / FaceNet: conv+ReLU blocks, no ReLU after each stage's last conv; stage t sees
    the previous maps concatenated with the VGG features."""

    def __init__(self, w: int, maps: int) -> None:
        super().__init__()
        self.blocks = conv_blocks(cpm_layers(w, maps), "model1_0")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = self.blocks["model1_0"](x)
        out = self.blocks["model1_1"](feat)
        for t in range(2, 7):
            out = self.blocks[f"model{t}"](torch.cat([out, feat], 1))
        return out


def write_cpm(path: Path, maps: int, w: int = 2, seed: int = 0) -> ReferenceCPM:
    torch.manual_seed(seed)
    ref = ReferenceCPM(w, maps).eval()
    # the released files drop the block name: "conv1_1.weight", "Mconv7_stage6.bias", ...
    torch.save({k.split(".", 2)[2]: v for k, v in ref.state_dict().items()}, path)
    return ref


@pytest.mark.parametrize(("file", "maps"), [("hand_pose_model.pth", 22), ("facenet.pth", 71)])
def test_networks_match_the_published_layout(tmp_path, file, maps):
    ref = write_cpm(tmp_path / file, maps)
    net = openpose_parts.CpmNet(torch.load(tmp_path / file, weights_only=True), maps)
    x = torch.randn(1, 3, 48, 40)
    with torch.no_grad():
        want = ref(x)
    got = net(x)
    assert net.stages == 6 and got.shape == (1, maps, 6, 5)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ boxes from the body
def body_with(points: dict[int, tuple[float, float]]) -> np.ndarray:
    body = np.zeros((18, 3))
    for i, (x, y) in points.items():
        body[i] = (x, y, 1.0)
    return body


def test_hand_boxes_follow_the_arms():
    # left arm straight down: forearm 40, upper arm 50 -> width 1.5 * max(40, 45) = 67.5,
    # centre a third of the forearm past the wrist: (100, 153.2)
    body = body_with({5: (100, 50), 6: (100, 100), 7: (100, 140), 2: (40, 50), 3: (40, 100)})
    assert openpose_parts.hand_boxes(body, 300, 300) == [(66, 119, 67, True)]  # no right wrist: no right box
    body = body_with({2: (20, 10), 3: (20, 60), 4: (20, 100)})  # the right hand near the image's corner
    (x, y, size, left), = openpose_parts.hand_boxes(body, 130, 300)
    assert (x, y, size, left) == (0, 79, 50, False)  # x clipped at 0, the bottom edge at 130 - 79.45
    assert openpose_parts.hand_boxes(body_with({2: (0, 0), 3: (0, 4), 4: (0, 8)}), 100, 100) == []  # under 20 px


def test_face_box_follows_the_head():
    # nose-eye 6 (x3 = 18) and nose-ear 14 (x1.5 = 21): a box 42 wide around the nose
    body = body_with({0: (50, 40), 14: (56, 36), 16: (64, 40)})
    assert openpose_parts.face_box(body, 100, 100) == (29, 19, 42)
    assert openpose_parts.face_box(body_with({0: (50, 40)}), 100, 100) is None  # no eye or ear
    assert openpose_parts.face_box(body_with({0: (50, 40), 15: (52, 41)}), 100, 100) is None  # 12 px: too small


# ------------------------------------------------------------------ planted heatmaps
def spot(size: int, x: float, y: float, height: float = 1.0, sigma: float = 2.0) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size]
    return height * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma**2))


HAND = [(64 + 40 * math.cos(k / 3), 64 + 40 * math.sin(k / 3)) for k in range(21)]


def test_planted_hand_maps_decode_to_points():
    maps = np.zeros((128, 128, 22))
    for k, (x, y) in enumerate(HAND):
        maps[..., k] = spot(128, x, y)
    # a taller but thin spike on point 0 loses to the broad blob: the largest blob wins, then its maximum
    maps[..., 0] += spot(128, 10, 10, height=1.5, sigma=0.6)
    maps[..., 20] = 0.01  # under the threshold everywhere: unseen
    points = openpose_parts.hand_points(maps, 96)
    want = [(int(round(x) * 96 / 128), int(round(y) * 96 / 128)) for x, y in HAND]
    assert points[:20, :2].tolist() == [list(p) for p in want[:20]]
    assert points[:20, 2].tolist() == [1.0] * 20 and points[20].tolist() == [0, 0, 0]


def test_planted_face_maps_decode_to_points():
    maps = np.zeros((64, 64, 71))
    where = [(5 + (k * 7) % 54, 5 + (k * 11) % 54) for k in range(70)]
    for k, (x, y) in enumerate(where):
        maps[..., k] = spot(64, x, y, height=0.5)
    maps[..., 69] *= 0.05  # peak 0.025: not a point
    maps[..., 70] = 1.0  # the background map is never a point
    points = openpose_parts.face_points(maps)
    assert points.shape == (70, 3)
    assert points[:69].tolist() == [[x, y, 1.0] for x, y in where[:69]] and points[69].tolist() == [0, 0, 0]


def test_hands_and_face_are_drawn_in_the_extensions_colours():
    body = body_with({1: (40, 20), 2: (30, 20), 5: (50, 20)})
    hand = np.array([(20 + (k % 5) * 10, 60 + (k // 5) * 12, 1.0) for k in range(21)])
    face = np.array([(40 + k % 10 * 2, 5 + k // 10, 1.0) for k in range(70)])
    canvas = posedraw.draw_people([posedraw.Person(body, face, [hand, np.zeros((21, 3))])], 128, 128)
    for x, y, _ in hand:
        assert tuple(canvas[int(y), int(x)]) == (0, 0, 255)
    assert tuple(canvas[60, 25]) == (255, 0, 0)  # the first edge (point 0 to 1), between their joints
    assert tuple(canvas[int(face[0, 1]), int(face[0, 0])]) == (255, 255, 255)


# ------------------------------------------------------------------ OpenCV's resizes (smart_resize)
def lanczos4_row(x: float) -> np.ndarray:
    """OpenCV's interpolateLanczos4 coefficients for fractional offset x (taps -3 .. 4), from its table form."""
    s45 = math.sqrt(0.5)
    cs = [(1, 0), (-s45, -s45), (0, 1), (s45, -s45), (-1, 0), (s45, s45), (0, -1), (-s45, s45)]
    y0 = -(x + 3) * math.pi / 4
    coeffs = np.array([(a * math.sin(y0) + b * math.cos(y0)) / (-(x + 3 - i) * math.pi / 4) ** 2
                       for i, (a, b) in enumerate(cs)])
    return coeffs / coeffs.sum()


def test_resizes_follow_opencvs_area_and_lanczos4():
    x = torch.rand(1, 2, 12, 12)
    torch.testing.assert_close(openpose_parts.smart_resize(x, (4, 4)), torch.nn.functional.avg_pool2d(x, 3))
    torch.testing.assert_close(openpose_parts.smart_resize(x, (12, 12)), x)
    area = openpose_parts.resize_matrix(3, 2, area=True).numpy()
    np.testing.assert_allclose(area, [[2 / 3, 1 / 3, 0], [0, 1 / 3, 2 / 3]], atol=1e-6)
    up = openpose_parts.resize_matrix(10, 25, area=False).numpy()  # output 12 samples 12.5 * 0.4 - 0.5 = 4.5
    np.testing.assert_allclose(up[12, 1:9], lanczos4_row(0.5), atol=1e-6)
    assert up[0, 0] > 0.99 and np.allclose(up.sum(axis=1), 1)  # the edge clamps to the first pixel
    maps = torch.rand(1, 3, 23, 23)  # the 184 px scale: x8, then down to the 128 grid, as one matrix
    two_steps = openpose_parts.smart_resize(openpose_parts.smart_resize(maps, (184, 184)), (128, 128))
    grid = openpose_parts._to_grid(23, 184)
    torch.testing.assert_close(torch.einsum("oh,nchw,pw->ncop", grid, maps, grid), two_steps)


# ------------------------------------------------------------------ the crops run through the networks
def spot_finder(maps: int, gain: float = 4.0) -> dict[str, torch.Tensor]:
    """Released-layout tensors (width 1) whose every heatmap is `gain` x the blue brightness above
    mid-grey, max-pooled: each point lands on the crop's bright spot."""
    tensors = {}
    for layers in cpm_layers(1, maps).values():
        for layer in layers:
            if len(layer) == 1:
                continue
            name, cin, cout, k = layer
            weight = torch.zeros(cout, cin, k, k)
            source = maps if name.startswith("Mconv1_") else 0  # stage inputs are [maps, features]
            weight[0, source, k // 2, k // 2] = 1.0
            if cout == maps:
                weight[:, 0, k // 2, k // 2] = gain
            tensors[f"{name}.weight"], tensors[f"{name}.bias"] = weight, torch.zeros(cout)
    return tensors


def bright(h: int, w: int, x: float, y: float) -> np.ndarray:
    return np.repeat((255 * spot(max(h, w), x, y, sigma=3.0)[:h, :w]).round().astype(np.uint8)[..., None], 3, 2)


@pytest.mark.parametrize("where", [(70, 100), (90, 118)])
def test_hand_points_land_on_a_bright_spot_in_the_hand_box(where):
    net = openpose_parts.CpmNet(spot_finder(22), 22)
    person = posedraw.Person(body_with({5: (80, 20), 6: (80, 60), 7: (80, 90)}))  # left arm down: box (53, 72, 54)
    openpose_parts.add_hands(person, bright(160, 160, *where), net)
    left, right = person.hands
    assert left[:, 2].tolist() == [1.0] * 21 and right[:, 2].sum() == 0
    np.testing.assert_allclose(left[:, :2], np.broadcast_to(where, (21, 2)), atol=2)


def test_face_points_land_on_a_bright_spot_in_the_face_box():
    net = openpose_parts.CpmNet(spot_finder(71), 71)
    person = posedraw.Person(body_with({0: (60, 50), 14: (70, 44)}))  # a box of 60 from (30, 20)
    openpose_parts.add_face(person, bright(128, 128, 48, 62), net)
    assert person.face.shape == (70, 3) and person.face[:, 2].tolist() == [1.0] * 70
    np.testing.assert_allclose(person.face[:, :2], np.broadcast_to((48, 62), (70, 2)), atol=2)


# ------------------------------------------------------------------ errors name the file
def test_missing_and_foreign_part_files_are_named(tmp_path):
    write_body_model(tmp_path / "body_pose_model.pth")
    annotators = Annotators(tmp_path)
    with pytest.raises(api.InvalidParams, match=r"needs hand_pose_model\.pth"):
        annotators.runner("openpose_hand", "body_pose_model.pth", openpose_parts.build_hand)
    with pytest.raises(api.InvalidParams, match=r"needs facenet\.pth"):
        annotators.runner("openpose_face", "body_pose_model.pth", openpose_parts.build_face)
    write_cpm(tmp_path / "hand_pose_model.pth", 22)
    with pytest.raises(api.InvalidParams, match=r"needs facenet\.pth"):
        annotators.runner("openpose_full", "body_pose_model.pth", openpose_parts.build_full)
    write_cpm(tmp_path / "facenet.pth", 22)  # a hand model under the face's name
    with pytest.raises(api.InvalidParams, match=r"facenet\.pth is not CMU's.*expected 71 heatmaps"):
        annotators.runner("openpose_faceonly", "body_pose_model.pth", openpose_parts.build_faceonly)
    (tmp_path / "body_pose_model.pth").unlink()
    with pytest.raises(api.InvalidParams, match=r"body_pose_model\.pth"):
        annotators.runner("openpose_hand", "body_pose_model.pth", openpose_parts.build_hand)


def test_a_replaced_part_file_is_reread(tmp_path):
    write_body_model(tmp_path / "body_pose_model.pth")
    write_cpm(tmp_path / "hand_pose_model.pth", 22)
    annotators = Annotators(tmp_path)
    run = annotators.runner("openpose_hand", "body_pose_model.pth", openpose_parts.build_hand)
    image = np.zeros((32, 32, 3), np.uint8)
    assert run(image, 32, 0, 0, 0).shape == (32, 32, 3)
    write_cpm(tmp_path / "hand_pose_model.pth", 71)  # replaced by a face model: refused when next used
    os.utime(tmp_path / "hand_pose_model.pth", ns=(1, 1))
    with pytest.raises(api.InvalidParams, match=r"hand_pose_model\.pth is not CMU's"):
        annotators.runner("openpose_hand", "body_pose_model.pth", openpose_parts.build_hand)(image, 32, 0, 0, 0)
    write_cpm(tmp_path / "hand_pose_model.pth", 22)
    assert run(image, 32, 0, 0, 0).shape == (32, 32, 3)


# ------------------------------------------------------------------ the annotators' device
def test_annotators_follow_the_apps_cuda_device_only():
    cuda = torch.cuda.is_available()
    assert annotator_device("cpu") == torch.device("cpu")
    assert annotator_device("auto").type == ("cuda" if cuda else "cpu")
    assert annotator_device("cuda:0") == (torch.device("cuda:0") if cuda else torch.device("cpu"))
    assert annotator_device("mps") == annotator_device("no such device") == torch.device("cpu")


def test_builders_that_take_a_device_get_the_annotators_device(tmp_path):
    (tmp_path / "a.pth").write_bytes(b"")
    seen = []

    def with_device(path: Path, device: torch.device | None = None):
        seen.append(device)
        return lambda *args: np.zeros((1, 1, 3), np.uint8)

    Annotators(tmp_path, device=torch.device("cpu")).runner("x", "a.pth", with_device)
    Annotators(tmp_path).runner("y", "a.pth", lambda path: seen.append(path) or (lambda *args: None))
    assert seen == [torch.device("cpu"), tmp_path / "a.pth"]
    write_cpm(tmp_path / "hand_pose_model.pth", 22)
    write_body_model(tmp_path / "body_pose_model.pth")
    run = Annotators(tmp_path, device=annotator_device("auto")).runner(
        "openpose_hand", "body_pose_model.pth", openpose_parts.build_hand)
    assert run(np.zeros((32, 32, 3), np.uint8), 32, 0, 0, 0).shape == (32, 32, 3)


# ------------------------------------------------------------------ /controlnet/detect over HTTP
def test_detect_route_runs_openpose_full(http):  # noqa: F811
    image = np.random.default_rng(1).integers(0, 255, (64, 96, 3), dtype=np.uint8)
    http.folder.mkdir(parents=True, exist_ok=True)
    write_body_model(http.folder / "body_pose_model.pth")
    write_cpm(http.folder / "hand_pose_model.pth", 22)
    request = {"controlnet_module": "openpose_full", "controlnet_input_images": [b64(image)],
               "controlnet_processor_res": 64}
    missing = http.post("/controlnet/detect", json=request)
    assert missing.status_code == 422 and "facenet.pth" in missing.json()["detail"]
    write_cpm(http.folder / "facenet.pth", 71)
    reply = http.post("/controlnet/detect", json=request)
    assert reply.status_code == 200, reply.text
    assert decode(reply.json()["images"][0]).shape == (64, 96, 3)
    assert reply.json()["poses"][0]["canvas_width"] == 96
    names = http.get("/controlnet/module_list").json()["module_list"]
    assert {"openpose_hand", "openpose_face", "openpose_faceonly", "openpose_full"} <= set(names)

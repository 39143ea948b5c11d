"""Face restoration: networks against references, detection, alignment, paste-back, files and errors.

Tiny random weights are written by tests/fixtures/make_tiny_faces.py in the released key layouts.
GFPGAN is compared with spandrel's GFPGANv1Clean; CodeFormer (not in spandrel 0.4.2) with a
functional forward written here from the original algorithm over the raw state dict.
"""
from __future__ import annotations

import math
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from modules.errors import CheckpointError, InvalidParams, UnsafeCheckpointError
from modules.faces import align, codeformer, gfpgan, load, restore, retinaface
from modules.faces.restore import DetectOptions
from modules.faces.service import FaceRestorers
from tests.fixtures import make_tiny_faces as mk
from tests.spandrel_reference import spandrel_or_skip


# -- networks ----------------------------------------------------------------------------
def test_gfpgan_matches_spandrel():
    spandrel_or_skip()
    from spandrel.architectures.GFPGAN import GFPGAN as Reference

    sd = mk.gfpgan_state_dict()
    ref = Reference(out_size=32, num_style_feat=16, channel_multiplier=2, narrow=1 / 16, num_mlp=2, sft_half=True)
    ref.load_state_dict(sd, strict=True)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        expected = ref.eval()(x, return_rgb=False, randomize_noise=False)[0]
        got = gfpgan.build(sd).eval()(x)
    assert expected.abs().mean() > 0.05
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def _ref_block(sd: dict, p: str, x: torch.Tensor, up: bool) -> torch.Tensor:
    """One VQGAN block from the raw weights, as the original Encoder / Generator lists define them."""
    def gn(key, t):
        return F.group_norm(t, 32, sd[key + ".weight"], sd[key + ".bias"], 1e-6)

    def conv(key, t, pad=1, stride=1):
        return F.conv2d(t, sd[key + ".weight"], sd[key + ".bias"], stride, pad)

    if p + ".conv1.weight" in sd:
        h = conv(p + ".conv1", F.silu(gn(p + ".norm1", x)))
        h = conv(p + ".conv2", F.silu(gn(p + ".norm2", h)))
        return h + (conv(p + ".conv_out", x, 0) if p + ".conv_out.weight" in sd else x)
    if p + ".q.weight" in sd:
        h = gn(p + ".norm", x)
        b, c, hh, ww = h.shape
        q, k, v = (conv(f"{p}.{n}", h, 0).reshape(b, c, hh * ww) for n in "qkv")
        attn = torch.softmax(torch.bmm(q.permute(0, 2, 1), k) * c ** -0.5, dim=2)
        return x + conv(p + ".proj_out", torch.bmm(v, attn.permute(0, 2, 1)).reshape(b, c, hh, ww), 0)
    if p + ".conv.weight" in sd:
        if up:
            return conv(p + ".conv", F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return conv(p + ".conv", F.pad(x, (0, 1, 0, 1)), 0, 2)
    if sd[p + ".weight"].ndim == 1:
        return gn(p, x)
    return conv(p, x)


def _ref_codeformer(sd: dict, x: torch.Tensor, w: float) -> torch.Tensor:
    enc_taps = {2: "512", 5: "256", 8: "128", 11: "64", 14: "32", 18: "16"}
    gen_taps = {6: "16", 9: "32", 12: "64", 15: "128", 18: "256", 21: "512"}
    count = {part: 1 + max(int(k.split(".")[2]) for k in sd if k.startswith(part + ".blocks."))
             for part in ("encoder", "generator")}
    feats = {}
    for i in range(count["encoder"]):
        x = _ref_block(sd, f"encoder.blocks.{i}", x, False)
        feats[enc_taps.get(i)] = x
    lq = x
    b, c, h, ww = lq.shape
    q = F.linear(lq.flatten(2).permute(2, 0, 1), sd["feat_emb.weight"], sd["feat_emb.bias"])
    pos = sd["position_emb"].unsqueeze(1).repeat(1, b, 1)
    dim = q.shape[-1]
    layers = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("ft_layers."))
    for i in range(layers):
        p = f"ft_layers.{i}."
        t = F.layer_norm(q, (dim,), sd[p + "norm1.weight"], sd[p + "norm1.bias"])
        attn = F.multi_head_attention_forward(
            t + pos, t + pos, t, dim, 8, sd[p + "self_attn.in_proj_weight"], sd[p + "self_attn.in_proj_bias"],
            None, None, False, 0.0, sd[p + "self_attn.out_proj.weight"], sd[p + "self_attn.out_proj.bias"],
            training=False, need_weights=False)[0]
        q = q + attn
        t = F.layer_norm(q, (dim,), sd[p + "norm2.weight"], sd[p + "norm2.bias"])
        q = q + F.linear(F.gelu(F.linear(t, sd[p + "linear1.weight"], sd[p + "linear1.bias"])),
                         sd[p + "linear2.weight"], sd[p + "linear2.bias"])
    t = F.layer_norm(q, (dim,), sd["idx_pred_layer.0.weight"], sd["idx_pred_layer.0.bias"])
    logits = F.linear(t, sd["idx_pred_layer.1.weight"]).permute(1, 0, 2)
    top = torch.topk(F.softmax(logits, dim=2), 1, dim=2)[1]
    one_hot = torch.zeros(top.numel(), sd["quantize.embedding.weight"].shape[0]).scatter_(1, top.view(-1, 1), 1)
    quant = (one_hot @ sd["quantize.embedding.weight"]).view(b, h, ww, c).permute(0, 3, 1, 2)
    mean_q, std_q = quant.flatten(2).mean(2), (quant.flatten(2).var(2) + 1e-5).sqrt()
    mean_l, std_l = lq.flatten(2).mean(2), (lq.flatten(2).var(2) + 1e-5).sqrt()
    x = (quant - mean_q[..., None, None]) / std_q[..., None, None] * std_l[..., None, None] + mean_l[..., None, None]
    for i in range(count["generator"]):
        x = _ref_block(sd, f"generator.blocks.{i}", x, True)
        level = gen_taps.get(i)
        if w > 0 and level is not None and f"fuse_convs_dict.{level}.scale.0.weight" in sd:
            p = f"fuse_convs_dict.{level}."
            e = _ref_block(sd, p + "encode_enc", torch.cat([feats[level], x], 1), False)
            branch = {part: F.conv2d(F.leaky_relu(F.conv2d(e, sd[f"{p}{part}.0.weight"], sd[f"{p}{part}.0.bias"],
                                                           padding=1), 0.2),
                                     sd[f"{p}{part}.2.weight"], sd[f"{p}{part}.2.bias"], padding=1)
                      for part in ("scale", "shift")}
            x = x + w * (x * branch["scale"] + branch["shift"])
    return x


@pytest.mark.parametrize("w", [0.0, 0.5, 1.0])
def test_codeformer_matches_functional_reference(w):
    sd = mk.codeformer_state_dict()
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        got = codeformer.build(sd).eval()(x, w)
        expected = _ref_codeformer(sd, x, w)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_codeformer_weight_changes_the_result():
    net = codeformer.build(mk.codeformer_state_dict()).eval()
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        assert (net(x, 0.0) - net(x, 1.0)).abs().max() > 1e-3


# -- detection -----------------------------------------------------------------------------
@pytest.mark.parametrize("backbone", ["mobilenet", "resnet"])
def test_retinaface_layouts_load_and_crafted_heads_find_the_faces(backbone):
    sd = mk.retinaface_state_dict(backbone)
    assert load.retinaface.is_retinaface(set(sd))
    net = retinaface.build({f"module.{k}": v for k, v in mk.crafted_detector(sd).items()})
    found = retinaface.detect(net, torch.rand(3, 64, 64) * 255)
    # the level-3 map is 2x2 cells of 256-pixel anchors; the four overlap, so one face remains
    assert len(found) == 1
    box = found[0].box
    centre = ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)
    assert box[2] - box[0] == pytest.approx(256, abs=1e-3)
    assert centre in [pytest.approx((cx, cy), abs=1e-3) for cx in (16, 48) for cy in (16, 48)]
    eyes = torch.tensor(found[0].landmarks[:2])
    assert float((eyes[1] - eyes[0]).norm()) == pytest.approx(12.0, abs=0.05)


def test_priors_and_decode():
    anchors = retinaface.priors(64, 96)
    assert anchors.shape[0] == sum(2 * math.ceil(64 / s) * math.ceil(96 / s) for s in (8, 16, 32))
    boxes, points = retinaface.decode(torch.zeros(len(anchors), 4), torch.zeros(len(anchors), 10), anchors, 64, 96)
    assert boxes[0].tolist() == pytest.approx([4 - 8, 4 - 8, 4 + 8, 4 + 8])  # first anchor: 16 px at (4, 4)
    assert points[0, 3].tolist() == pytest.approx([4, 4])


def test_nms_keeps_the_best_of_overlapping_boxes():
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30]], dtype=torch.float32)
    assert retinaface.nms(boxes, torch.tensor([0.5, 0.9, 0.7]), 0.4) == [1, 2]


# -- alignment ---------------------------------------------------------------------------------
def test_similarity_recovers_a_known_transform():
    angle, scale, shift = 0.3, 0.37, torch.tensor([12.5, -7.25], dtype=torch.float64)
    rot = torch.tensor([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]],
                       dtype=torch.float64) * scale
    src = align.template(512)
    dst = src @ rot.T + shift
    m = align.similarity(src, dst)
    torch.testing.assert_close(m[:, :2], rot, rtol=0, atol=1e-9)
    torch.testing.assert_close(m[:, 2], shift, rtol=0, atol=1e-9)
    torch.testing.assert_close(align.apply(align.invert(m), dst), src, rtol=0, atol=1e-9)


def test_alignment_round_trip_reproduces_the_face():
    """Crop a face with a rotated, scaled transform and paste it straight back: the smooth image
    comes back inside the face within interpolation error, and unchanged outside it."""
    ys, xs = torch.meshgrid(torch.arange(96.0), torch.arange(128.0), indexing="ij")
    image = torch.stack([xs * 1.5, ys * 2.0, 100 + 50 * torch.sin(xs / 9) * torch.cos(ys / 7)])[None].round()
    points = align.template(40) @ torch.tensor([[0.98, -0.17], [0.17, 0.98]], dtype=torch.float64).T + torch.tensor(
        [50.0, 20.0], dtype=torch.float64)
    m = align.similarity(points, align.template(64))
    face = align.warp_face(image, m, 64)
    pasted = align.paste_face(image, face, m)
    left, top, right, bottom = align.face_region(m, 64, 96, 128)
    outside = torch.ones(96, 128, dtype=torch.bool)
    outside[top:bottom, left:right] = False
    assert torch.equal(pasted[0][:, outside], image[0][:, outside])
    centre = align.apply(align.invert(m), torch.tensor([[32.0, 32.0]], dtype=torch.float64))[0].round().int()
    cx, cy = int(centre[0]), int(centre[1])
    inner = (slice(None), slice(None), slice(cy - 6, cy + 6), slice(cx - 6, cx + 6))
    assert (pasted[inner] - image[inner]).abs().max() <= 2.0


# -- the pipeline on files -------------------------------------------------------------------
def _write(folder: Path, name: str, sd: dict, wrap: str | None = "params_ema") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        torch.save({wrap: sd} if wrap else sd, path)
    return path


@pytest.fixture()
def models(tmp_path) -> Path:
    root = tmp_path / "models"
    _write(root / "GFPGAN", "GFPGANv1.4.pth", mk.gfpgan_state_dict())
    _write(root / "Codeformer", "codeformer-v0.1.0.safetensors", mk.codeformer_state_dict())
    detector = {f"module.{k}": v for k, v in mk.crafted_detector(mk.retinaface_state_dict()).items()}
    _write(root / "facedetection", "detection_mobilenet0.25_Final.pth", detector, wrap=None)
    return root


def _noise_image(w: int = 96, h: int = 80) -> Image.Image:
    rng = np.random.default_rng(3)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


@pytest.mark.parametrize("name", ["GFPGAN", "CodeFormer"])
def test_restoration_keeps_pixels_outside_the_faces_bit_exact(models, name):
    faces = FaceRestorers(models, device="cpu", options=DetectOptions(det_size=0))
    image = _noise_image()
    model = load.load_restorer(faces.restorer_file(name))
    detector = load.load_detector(faces.detector_file())
    restored, found = restore.restore_faces(image, detector, model, 0.5, DetectOptions(det_size=0))
    assert len(found) >= 1
    before, after = np.asarray(image), np.asarray(restored)
    outside = np.ones(before.shape[:2], dtype=bool)
    for face in found:
        left, top, right, bottom = face.region
        outside[top:bottom, left:right] = False
    assert outside.any() and (~outside).any()
    assert np.array_equal(before[outside], after[outside])
    assert (before[~outside] != after[~outside]).any()
    again = faces.restore(image, name.lower(), 0.5, visibility=1.0)  # the service: same result, any case
    assert np.array_equal(np.asarray(again), after)


def test_visibility_blends_only_changed_pixels(models):
    faces = FaceRestorers(models, device="cpu", options=DetectOptions(det_size=0))
    image = _noise_image()
    full = np.asarray(faces.restore(image, "GFPGAN", visibility=1.0)).astype(int)
    half = np.asarray(faces.restore(image, "GFPGAN", visibility=0.5)).astype(int)
    before = np.asarray(image).astype(int)
    assert np.abs(half - (before + (full - before) * 0.5)).max() <= 1
    assert np.array_equal(np.asarray(faces.restore(image, "GFPGAN", visibility=0)), before)


def test_detection_scales_small_images_up_and_skips_tiny_faces():
    """With det_size 256 a 96x80 image is detected at 307x256 (x3.2): landmarks come back in image pixels,
    and a face whose eyes are under 5 pixels apart there is skipped, as facexlib does."""
    sd = mk.retinaface_state_dict()
    image = restore.to_tensor(_noise_image())
    wide = retinaface.build(mk.crafted_detector(sd, eye_distance=32.0))
    found = restore.find_faces(wide, image, 32, DetectOptions(det_size=256))
    assert found
    eyes = torch.tensor(found[0].detection.landmarks[:2])
    assert float((eyes[1] - eyes[0]).norm()) == pytest.approx(10.0, abs=0.01)
    narrow = retinaface.build(mk.crafted_detector(sd, eye_distance=12.0))
    assert restore.find_faces(narrow, image, 32, DetectOptions(det_size=256)) == []


def test_listing_and_file_choice(models):
    faces = FaceRestorers(models)
    listed = {r.name: r.path for r in faces.restorers()}
    assert listed["GFPGAN"].name == "GFPGANv1.4.pth"
    assert listed["CodeFormer"].name == "codeformer-v0.1.0.safetensors"
    assert listed["RestoreFormer"] is None
    _write(models / "GFPGAN", "GFPGANv1.3.pth", mk.gfpgan_state_dict(seed=5))
    _write(models / "facerestore_models", "codeformer.pth", mk.codeformer_state_dict())
    assert faces.restorer_file("GFPGAN").name == "GFPGANv1.4.pth"  # v1.4 before v1.3
    assert faces.detector_file().name == "detection_mobilenet0.25_Final.pth"
    _write(models / "GFPGAN", "RestoreFormer.pth", mk.restoreformer_state_dict())
    _write(models / "GFPGAN", "RestoreFormer++.ckpt", mk.restoreformer_state_dict(True, prefix="vqvae."),
           wrap="state_dict")
    assert faces.restorer_file("RestoreFormer").name == "RestoreFormer++.ckpt"
    assert faces.restorer_file("GFPGAN").name == "GFPGANv1.4.pth"
    assert load.load_restorer(faces.restorer_file("RestoreFormer")).architecture == "RestoreFormer++"
    faces.check("RestoreFormer")


# -- errors ------------------------------------------------------------------------------------
def test_absent_weights_name_the_files_and_folders(tmp_path):
    faces = FaceRestorers(tmp_path / "models")
    with pytest.raises(InvalidParams) as err:
        faces.check("CodeFormer")
    text = str(err.value)
    assert "codeformer-v0.1.0.pth" in text and "models/Codeformer" in text
    assert "detection_Resnet50_Final.pth" in text and "models/facedetection" in text
    with pytest.raises(InvalidParams, match="GFPGANv1.4.pth.*models/GFPGAN"):
        faces.restore(_noise_image(), "GFPGAN")
    with pytest.raises(InvalidParams, match="Unknown face restoration model 'Nope'.*CodeFormer"):
        faces.check("Nope")


def test_absent_detector_alone_is_named(models):
    for path in (models / "facedetection").iterdir():
        path.unlink()
    with pytest.raises(InvalidParams, match="detection_Resnet50_Final.pth") as err:
        FaceRestorers(models).check("GFPGAN")
    assert "GFPGANv1.4" not in str(err.value)


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("legacy", [False, True])
def test_malicious_pth_is_refused_and_never_run(tmp_path, legacy):
    marker = tmp_path / "pwned"
    path = tmp_path / "models" / "GFPGAN" / "GFPGANv1.4.pth"
    path.parent.mkdir(parents=True)
    payload = {"params_ema": {"conv_body_first.weight": torch.zeros(1), "x": _Payload(marker)}}
    if legacy:
        with path.open("wb") as f:
            pickle.dump(payload, f)
    else:
        torch.save(payload, path)
    with pytest.raises(UnsafeCheckpointError if not legacy else CheckpointError, match="GFPGANv1.4.pth"):
        load.load_restorer(path)
    assert not marker.exists()


@pytest.mark.parametrize("writer,message", [
    (lambda p: p.write_bytes(b""), "empty"),
    (lambda p: p.write_bytes(b"not a checkpoint at all"), ""),
    (lambda p: torch.save({"params_ema": {"conv.weight": torch.zeros(1)}}, p), "not GFPGAN"),
])
def test_bad_files_give_clear_errors(tmp_path, writer, message):
    path = tmp_path / "GFPGANv1.4.pth"
    writer(path)
    with pytest.raises(CheckpointError, match=message) as err:
        load.load_restorer(path)
    assert str(err.value).startswith("Face model")


def test_weights_that_do_not_fit_name_the_file(tmp_path):
    sd = mk.gfpgan_state_dict()
    sd["final_linear.weight"] = sd["final_linear.weight"][:, :5]
    path = _write(tmp_path, "GFPGANv1.4.pth", sd)
    with pytest.raises(CheckpointError, match="GFPGANv1.4.pth: the weights do not fit"):
        load.load_restorer(path)


def test_wrong_detection_file_is_named(tmp_path):
    path = _write(tmp_path, "detection_Resnet50_Final.pth", mk.gfpgan_state_dict(), wrap=None)
    with pytest.raises(CheckpointError, match="detection_Resnet50_Final.pth is not RetinaFace"):
        load.load_detector(path)


class _PlusPlusFeatures(dict):
    def __missing__(self, key: str):
        return self[key.removesuffix("_atten")]


@pytest.mark.parametrize("plus", [False, True])
def test_restoreformer_matches_spandrel(plus):
    """RestoreFormer against spandrel's network; RestoreFormer++ against spandrel's encoder and
    quantiser with spandrel's MultiHeadDecoderTransformer attending at two levels, 4 heads, where a
    level without `block_i_atten` features reads `block_i` (as RestoreFormer++'s decoder does)."""
    spandrel_or_skip()
    from spandrel.architectures.RestoreFormer import RestoreFormer as Reference
    from spandrel.architectures.RestoreFormer.__arch.restoreformer_arch import MultiHeadDecoderTransformer

    sd = mk.restoreformer_state_dict(plus)
    shape = dict(ch=32, out_ch=3, ch_mult=(1, 1, 1, 2, 2, 2), num_res_blocks=1, resolution=64, z_channels=32,
                 enable_mid=True)
    ref = Reference(n_embed=16, embed_dim=32, attn_resolutions=(2,), double_z=False, head_size=4 if plus else 8,
                    in_channels=3, dropout=0.0, **shape)
    if plus:
        ref.decoder = MultiHeadDecoderTransformer(attn_resolutions=(2, 4), head_size=4, **shape)
    ref.load_state_dict(sd, strict=True)
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(4)) * 2 - 1
    with torch.no_grad():
        quant, _, _, hs = ref.eval().encode(x)
        expected = ref.decode(quant, _PlusPlusFeatures(hs))
        net = load.build_restorer({f"vqvae.{k}": v for k, v in sd.items()} | {"loss.w": torch.zeros(1)},
                                  Path("RestoreFormer++.ckpt" if plus else "RestoreFormer.pth"))
        got = net.run(x, 0.5)
    assert net.architecture == ("RestoreFormer++" if plus else "RestoreFormer")
    assert expected.abs().mean() > 0.01
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)

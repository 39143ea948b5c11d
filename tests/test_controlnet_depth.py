"""Depth and normal preprocessors from user-supplied annotator files (issue 17).

Tiny random models are built in transformers and written in the layouts users download (the Depth
Anything V2 repository's keys, a transformers `model.safetensors`, MiDaS's `dpt_hybrid` .pt) by a key
mapping of this file's own, independent of the loader. The preprocessor's map must equal the
transformers model's forward with sd-webui-controlnet's pre- and post-processing, written here again.
"""
from __future__ import annotations

import base64
import copy
import io
import re
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from extensions.controlnet import preprocessors
from extensions.controlnet.annotators import Annotators
from modules.plugins import api
from tests.api_server import start_server

DA_FILE = "depth_anything_v2_vits.safetensors"
MIDAS_FILE = "dpt_hybrid-midas-501f0c75.pt"


def picture(w: int = 80, h: int = 64) -> Image.Image:
    rng = np.random.default_rng(7)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 / w, y * 255 / h, (x + y) * 127 / (w + h)], axis=2)
    return Image.fromarray((base + rng.integers(0, 40, (h, w, 3))).clip(0, 255).astype(np.uint8))


# ---------------------------------------------------------------- Depth Anything V2 fixtures
def tiny_depth_anything():
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config

    torch.manual_seed(0)
    backbone = Dinov2Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=1, image_size=70, patch_size=14,
                            out_indices=[1, 2, 3, 4], reshape_hidden_states=False, layerscale_value=0.5)
    config = DepthAnythingConfig(backbone_config=backbone, reassemble_hidden_size=32, neck_hidden_sizes=[8, 16, 24, 32],
                                 fusion_hidden_size=8, head_hidden_size=4)
    model = DepthAnythingForDepthEstimation(config).eval()
    with torch.no_grad():  # random biases and layer scales, so every tensor matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        model.head.conv3.bias.fill_(1.0)  # keep the final ReLU's output above zero
    return model


def hf_hub_names(sd: dict) -> dict:
    """transformers' current attention names -> the names the Hub's model.safetensors files carry."""
    names = {"attention.q_proj.": "attention.attention.query.", "attention.k_proj.": "attention.attention.key.",
             "attention.v_proj.": "attention.attention.value.", "attention.o_proj.": "attention.output.dense."}
    out = {}
    for key, value in sd.items():
        for new, old in names.items():
            key = key.replace(new, old)
        out[key] = value.contiguous()
    return out


def depth_anything_original(sd: dict) -> dict:
    """A transformers Depth Anything state dict under the Depth-Anything-V2 repository's key names."""
    sd = hf_hub_names(sd)
    out = {}
    layer = re.compile(r"backbone\.encoder\.layer\.(\d+)\.attention\.attention\.query\.(weight|bias)")
    for key, value in sd.items():
        if m := layer.match(key):
            i, kind = m.groups()
            parts = [sd[f"backbone.encoder.layer.{i}.attention.attention.{n}.{kind}"] for n in ("query", "key", "value")]
            out[f"pretrained.blocks.{i}.attn.qkv.{kind}"] = torch.cat(parts)
            continue
        if ".attention.attention." in key:
            continue
        out[original_name(key)] = value
    return out


def reference_key(key: str, rules: list, scratch: str) -> str:
    """The original name of a transformers DPT key: the fusion-stage blocks under `scratch`, else the first
    matching rule."""
    if m := re.match(r"neck\.fusion_stage\.layers\.(\d)\.(.+)", key):
        rest = m.group(2).replace("projection.", "out_conv.").replace("residual_layer", "resConfUnit")
        rest = rest.replace("convolution1", "conv1").replace("convolution2", "conv2")
        return f"{scratch}refinenet{4 - int(m.group(1))}.{rest}"
    for pattern, repl in rules:
        new, n = re.subn("^" + pattern, repl, key)
        if n:
            return new
    raise AssertionError(f"unmapped key {key}")


def original_name(key: str) -> str:
    rules = [
        (r"backbone\.embeddings\.cls_token", "pretrained.cls_token"),
        (r"backbone\.embeddings\.mask_token", "pretrained.mask_token"),
        (r"backbone\.embeddings\.position_embeddings", "pretrained.pos_embed"),
        (r"backbone\.embeddings\.patch_embeddings\.projection\.", "pretrained.patch_embed.proj."),
        (r"backbone\.layernorm\.", "pretrained.norm."),
        (r"backbone\.encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"pretrained.blocks.\1.attn.proj."),
        (r"backbone\.encoder\.layer\.(\d+)\.layer_scale(\d)\.lambda1", r"pretrained.blocks.\1.ls\2.gamma"),
        (r"backbone\.encoder\.layer\.(\d+)\.", r"pretrained.blocks.\1."),
        (r"neck\.reassemble_stage\.layers\.(\d)\.projection\.", r"depth_head.projects.\1."),
        (r"neck\.reassemble_stage\.layers\.(\d)\.resize\.", r"depth_head.resize_layers.\1."),
        (r"neck\.convs\.0\.", "depth_head.scratch.layer1_rn."), (r"neck\.convs\.1\.", "depth_head.scratch.layer2_rn."),
        (r"neck\.convs\.2\.", "depth_head.scratch.layer3_rn."), (r"neck\.convs\.3\.", "depth_head.scratch.layer4_rn."),
        (r"head\.conv1\.", "depth_head.scratch.output_conv1."), (r"head\.conv2\.", "depth_head.scratch.output_conv2.0."),
        (r"head\.conv3\.", "depth_head.scratch.output_conv2.2."),
    ]
    return reference_key(key, rules, "depth_head.scratch.")


@torch.no_grad()
def reference_depth_anything(model, img: np.ndarray) -> np.ndarray:
    """sd-webui-controlnet's depth_anything_v2: short side to 518 in multiples of 14, ImageNet normalisation,
    inverse depth back to the image size, min-max to 0..255."""
    h, w = img.shape[:2]
    scale = 518 / min(h, w)
    size = [max(518, int(round(s * scale / 14)) * 14) for s in (h, w)]
    x = torch.tensor(img, dtype=torch.float32).permute(2, 0, 1)[None] / 255
    x = F.interpolate(x, size=size, mode="bicubic", align_corners=False)
    x = (x - torch.tensor([0.485, 0.456, 0.406])[:, None, None]) / torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    depth = model(pixel_values=x).predicted_depth[None]
    depth = F.interpolate(depth, size=(h, w), mode="bilinear", align_corners=False)[0, 0].numpy().astype(np.float64)
    depth = (depth - depth.min()) / (depth.max() - depth.min()) * 255
    return np.repeat(depth.astype(np.uint8)[..., None], 3, axis=2)


# ---------------------------------------------------------------- MiDaS fixtures
def tiny_midas():
    from transformers import BitConfig, DPTConfig, DPTForDepthEstimation

    torch.manual_seed(1)
    bit = BitConfig(global_padding="same", layer_type="bottleneck", depths=[1, 2, 1], hidden_sizes=[128, 256, 512],
                    embedding_size=32, out_features=["stage1", "stage2", "stage3"], embedding_dynamic_padding=True)
    config = DPTConfig(is_hybrid=True, backbone_config=bit, backbone_featmap_shape=[1, 512, 4, 4], hidden_size=32,
                       num_hidden_layers=4, num_attention_heads=1, intermediate_size=64, image_size=64, patch_size=16,
                       layer_norm_eps=1e-6, readout_type="project", reassemble_factors=[1, 1, 1, 0.5],
                       backbone_out_indices=[0, 1, 2, 3], neck_hidden_sizes=[128, 256, 32, 32], fusion_hidden_size=16,
                       use_auxiliary_head=False)
    model = DPTForDepthEstimation(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        model.head.head[4].bias.fill_(1.0)  # keep the final ReLU's output above zero
    return model


def midas_original(sd: dict) -> dict:
    """A transformers hybrid DPT state dict under MiDaS's dpt_hybrid key names (timm ViT-hybrid)."""
    out = {}
    for key, value in sd.items():
        if m := re.match(r"dpt\.encoder\.layer\.(\d+)\.attention\.attention\.query\.(weight|bias)", key):
            i, kind = m.groups()
            parts = [sd[f"dpt.encoder.layer.{i}.attention.attention.{n}.{kind}"] for n in ("query", "key", "value")]
            out[f"pretrained.model.blocks.{i}.attn.qkv.{kind}"] = torch.cat(parts)
        elif ".attention.attention." not in key:
            out[midas_name(key)] = value
    out["pretrained.model.head.weight"] = torch.zeros(10, 32)  # the ViT's classifier, unused by MiDaS
    return out


def midas_name(key: str) -> str:
    rules = [
        (r"dpt\.embeddings\.backbone\.bit\.embedder\.convolution\.", "pretrained.model.patch_embed.backbone.stem.conv."),
        (r"dpt\.embeddings\.backbone\.bit\.embedder\.norm\.", "pretrained.model.patch_embed.backbone.stem.norm."),
        (r"dpt\.embeddings\.backbone\.bit\.encoder\.stages\.(\d)\.layers\.(\d+)\.",
         r"pretrained.model.patch_embed.backbone.stages.\1.blocks.\2."),
        (r"dpt\.embeddings\.projection\.", "pretrained.model.patch_embed.proj."),
        (r"dpt\.embeddings\.cls_token", "pretrained.model.cls_token"),
        (r"dpt\.embeddings\.position_embeddings", "pretrained.model.pos_embed"),
        (r"dpt\.layernorm\.", "pretrained.model.norm."),
        (r"dpt\.encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"pretrained.model.blocks.\1.attn.proj."),
        (r"dpt\.encoder\.layer\.(\d+)\.layernorm_before\.", r"pretrained.model.blocks.\1.norm1."),
        (r"dpt\.encoder\.layer\.(\d+)\.layernorm_after\.", r"pretrained.model.blocks.\1.norm2."),
        (r"dpt\.encoder\.layer\.(\d+)\.intermediate\.dense\.", r"pretrained.model.blocks.\1.mlp.fc1."),
        (r"dpt\.encoder\.layer\.(\d+)\.output\.dense\.", r"pretrained.model.blocks.\1.mlp.fc2."),
        (r"neck\.reassemble_stage\.readout_projects\.(\d)\.0\.", lambda m: f"pretrained.act_postprocess{int(m[1]) + 1}.0.project.0."),
        (r"neck\.reassemble_stage\.layers\.(\d)\.projection\.", lambda m: f"pretrained.act_postprocess{int(m[1]) + 1}.3."),
        (r"neck\.reassemble_stage\.layers\.(\d)\.resize\.", lambda m: f"pretrained.act_postprocess{int(m[1]) + 1}.4."),
        (r"neck\.convs\.(\d)\.", lambda m: f"scratch.layer{int(m[1]) + 1}_rn."),
        (r"head\.head\.", "scratch.output_conv."),
    ]
    return reference_key(key, rules, "scratch.")


@torch.no_grad()
def reference_midas_depth(model, img: np.ndarray) -> np.ndarray:
    """MiDaS's raw depth of sd-webui-controlnet's input: -1..1 pixels, edge-padded to multiples of 64."""
    h, w = img.shape[:2]
    padded = np.pad(img, [[0, (64 - h % 64) % 64], [0, (64 - w % 64) % 64], [0, 0]], mode="edge")
    x = torch.tensor(padded, dtype=torch.float32).permute(2, 0, 1)[None] / 127.5 - 1.0
    # DPTForDepthEstimation's hybrid forward, step by step: its own forward takes only the square
    # image_size, while MiDaS runs at any size (position embeddings resized, the token grid given)
    embeddings = model.dpt.embeddings(x, interpolate_pos_encoding=True)
    tokens, per_block = embeddings.last_hidden_states, []
    for block in model.dpt.encoder.layer:
        tokens = block(tokens)
        per_block.append(tokens)
    features = list(embeddings.intermediate_activations)
    features += [per_block[i] for i in model.config.backbone_out_indices[2:]]
    features = model.neck(features, x.shape[2] // 16, x.shape[3] // 16)
    return model.head(features)[0].numpy()


def reference_midas_maps(model, img: np.ndarray, bg_th: float) -> tuple[np.ndarray, np.ndarray]:
    depth = reference_midas_depth(model, img)
    scaled = (depth - depth.min()) / (depth - depth.min()).max()
    depth_image = (scaled * 255.0).clip(0, 255).astype(np.uint8)
    d = np.pad(depth, 1, mode="reflect")  # OpenCV's BORDER_REFLECT_101
    dx = (d[:-2, 2:] + 2 * d[1:-1, 2:] + d[2:, 2:]) - (d[:-2, :-2] + 2 * d[1:-1, :-2] + d[2:, :-2])
    dy = (d[2:, :-2] + 2 * d[2:, 1:-1] + d[2:, 2:]) - (d[:-2, :-2] + 2 * d[:-2, 1:-1] + d[:-2, 2:])
    dx[scaled < bg_th] = 0
    dy[scaled < bg_th] = 0
    normal = np.stack([dx, dy, np.full_like(dx, np.pi * 2.0)], axis=2)
    normal /= np.sum(normal ** 2.0, axis=2, keepdims=True) ** 0.5
    normal_image = (normal * 127.5 + 127.5).clip(0, 255).astype(np.uint8)
    h, w = img.shape[:2]
    return np.repeat(depth_image[:h, :w, None], 3, axis=2), normal_image[:h, :w]


# ---------------------------------------------------------------- helpers
def detect(name: str, folder: Path, image: Image.Image, a: float = -1) -> np.ndarray:
    pre = preprocessors.find(name)
    return preprocessors.run(pre, image, None, min(image.size), a, -1, 0, Annotators(folder))


def assert_close_maps(got: np.ndarray, want: np.ndarray) -> None:
    """Equal up to one step of rounding (float32 order of operations), and mostly exactly equal."""
    assert got.shape == want.shape and got.dtype == np.uint8
    diff = np.abs(got.astype(int) - want.astype(int))
    assert diff.max() <= 1 and (diff == 0).mean() > 0.95, (diff.max(), (diff == 0).mean())


@pytest.fixture(scope="module")
def depth_anything():
    return tiny_depth_anything()


@pytest.fixture(scope="module")
def midas():
    return tiny_midas()


# ---------------------------------------------------------------- numerics
@pytest.mark.parametrize("layout", ["original", "original-fp16", "transformers"])
def test_depth_anything_v2_matches_transformers(tmp_path, depth_anything, layout):
    sd = depth_anything.state_dict()
    sd = depth_anything_original(sd) if layout.startswith("original") else hf_hub_names(sd)
    reference = depth_anything
    if layout == "original-fp16":  # as the fp16 safetensors copies ship; compare with the rounded weights
        sd = {k: v.half() for k, v in sd.items()}
        reference = copy.deepcopy(depth_anything)
        with torch.no_grad():
            for p in reference.parameters():
                p.copy_(p.half().float())
    save_file(sd, str(tmp_path / DA_FILE))
    image = picture()
    got = detect("depth_anything_v2", tmp_path, image)
    want = reference_depth_anything(reference, np.asarray(image))
    assert_close_maps(got, want)
    assert want.std() > 10  # the map is not flat: a wrong weight would show


def test_depth_midas_and_normal_midas_match_transformers(tmp_path, midas):
    torch.save(midas_original(midas.state_dict()), tmp_path / MIDAS_FILE)
    image = picture(72, 66)  # padded to 128x128 inside, cropped back
    want_depth, want_normal = reference_midas_maps(midas, np.asarray(image), bg_th=0.4)
    assert_close_maps(detect("depth_midas", tmp_path, image), want_depth)
    assert_close_maps(detect("normal_midas", tmp_path, image), want_normal)  # a = -1: the slider's default 0.4
    _, want_other = reference_midas_maps(midas, np.asarray(image), bg_th=0.0)
    assert_close_maps(detect("normal_midas", tmp_path, image, a=0.0), want_other)
    assert want_depth.std() > 10 and not np.array_equal(want_normal, want_other)


def test_depth_midas_takes_a_transformers_state_dict_too(tmp_path, midas):
    torch.save(midas.state_dict(), tmp_path / MIDAS_FILE)  # Intel/dpt-hybrid-midas's keys, under MiDaS's name
    image = picture()
    want_depth, _ = reference_midas_maps(midas, np.asarray(image), bg_th=0.4)
    assert_close_maps(detect("depth_midas", tmp_path, image), want_depth)


def test_normal_midas_is_listed_with_its_slider():
    pre = preprocessors.find("normal_midas")
    assert pre.tag == "NormalMap" and pre.annotator == MIDAS_FILE
    assert (pre.a.name, pre.a.value, pre.a.min, pre.a.max) == ("Normal Background Threshold", 0.4, 0.0, 1.0)
    assert preprocessors.find("normal_bae").annotator == "scannet.pt"


# ---------------------------------------------------------------- errors
@pytest.mark.parametrize("name, file", [("depth_anything_v2", DA_FILE), ("depth_midas", MIDAS_FILE),
                                        ("normal_midas", MIDAS_FILE)])
def test_a_missing_file_is_named(tmp_path, name, file):
    with pytest.raises(api.InvalidParams, match=re.escape(file)):
        detect(name, tmp_path, picture())


def test_truncated_files_are_refused_with_the_file_named(tmp_path, depth_anything, midas):
    save_file(hf_hub_names(depth_anything.state_dict()), str(tmp_path / DA_FILE))
    torch.save(midas_original(midas.state_dict()), tmp_path / MIDAS_FILE)
    for name, file in (("depth_anything_v2", DA_FILE), ("depth_midas", MIDAS_FILE)):
        data = (tmp_path / file).read_bytes()
        (tmp_path / file).write_bytes(data[: len(data) // 2])
        with pytest.raises(api.InvalidParams, match=re.escape(file)):
            detect(name, tmp_path, picture())


def test_mismatched_files_are_refused_with_the_file_named(tmp_path, depth_anything, midas):
    save_file(midas_original(midas.state_dict()), str(tmp_path / DA_FILE))  # MiDaS where Depth Anything belongs
    with pytest.raises(api.InvalidParams, match=re.escape(DA_FILE) + ".*not a Depth Anything V2"):
        detect("depth_anything_v2", tmp_path, picture())
    torch.save(depth_anything_original(depth_anything.state_dict()), tmp_path / MIDAS_FILE)
    with pytest.raises(api.InvalidParams, match=re.escape(MIDAS_FILE) + ".*not a MiDaS"):
        detect("depth_midas", tmp_path, picture())
    sd = depth_anything_original(depth_anything.state_dict())
    del sd["depth_head.scratch.output_conv2.2.weight"]  # the right file, damaged
    save_file(sd, str(tmp_path / DA_FILE))
    with pytest.raises(api.InvalidParams, match=re.escape(DA_FILE) + ".*does not fit"):
        detect("depth_anything_v2", tmp_path, picture())


class NotATensor:
    pass


def test_a_pickle_that_needs_code_is_refused(tmp_path):
    torch.save({"model": NotATensor()}, tmp_path / MIDAS_FILE)
    with pytest.raises(api.InvalidParams, match=re.escape(MIDAS_FILE)):
        detect("depth_midas", tmp_path, picture())


# ---------------------------------------------------------------- over HTTP
def b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_detect_route_runs_depth_anything_v2_and_normal_midas(tmp_path, depth_anything, midas):
    server = start_server(tmp_path)
    try:
        folder = server.context.app.settings.models_dir / "annotators"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / DA_FILE).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": ")  # a cut-off download
        image = picture()
        body = {"controlnet_module": "depth_anything_v2", "controlnet_input_images": [b64(image)],
                "controlnet_processor_res": 64}
        normal = {**body, "controlnet_module": "normal_midas", "controlnet_threshold_a": 0.2}
        with httpx.Client(base_url=server.url, timeout=300) as http:
            midas_missing = http.post("/controlnet/detect", json=normal)
            corrupt = http.post("/controlnet/detect", json=body)
            save_file(depth_anything_original(depth_anything.state_dict()), str(folder / DA_FILE))
            response = http.post("/controlnet/detect", json=body)
            torch.save(midas_original(midas.state_dict()), folder / MIDAS_FILE)
            normal_response = http.post("/controlnet/detect", json=normal)
        assert midas_missing.status_code == 422 and MIDAS_FILE in str(midas_missing.json()["detail"])
        assert corrupt.status_code == 422 and DA_FILE in str(corrupt.json()["detail"]), corrupt.text
        assert response.status_code == 200 and normal_response.status_code == 200, response.text
        assert_close_maps(decode(response.json()["images"][0]), reference_depth_anything(depth_anything, np.asarray(image)))
        _, want_normal = reference_midas_maps(midas, np.asarray(image), bg_th=0.2)
        assert_close_maps(decode(normal_response.json()["images"][0]), want_normal)
    finally:
        server.stop()


def decode(data: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"))

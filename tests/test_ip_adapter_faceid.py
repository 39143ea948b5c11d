"""IP-Adapter FaceID (plain and PlusV2) in the controlnet extension: latents against diffusers'
load_ip_adapter with `ip_adapter_image_embeds`, the insightface buffalo_l preprocessing (SCRFD landmarks,
ArcFace alignment, normalised embedding) on tiny ONNX files, the layout, weight 0, the API, and the errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("onnxruntime")

from extensions.controlnet.annotators import faces  # noqa: E402
from extensions.controlnet.models import read_controlnet  # noqa: E402
from modules.plugins import api  # noqa: E402
from modules.sampling.rng import randn  # noqa: E402
from modules.settings import REPO_ROOT  # noqa: E402
from tests.api_server import start_server  # noqa: E402
from tests.conftest import make_app  # noqa: E402
from tests.fixtures.make_tiny_faceid import (  # noqa: E402
    TEMPLATE,
    planted_landmarks,
    tiny_faceid,
    without_lora,
    write_buffalo,
)
from tests.fixtures.make_tiny_ip_adapter import save_ip_adapter, tiny_clip_vision  # noqa: E402
from tests.test_controlnet import SEED, STEPS, latents, params  # noqa: E402
from tests.test_controlnet_api import SMALL, b64, decode  # noqa: E402

WEIGHT, SIZE = 0.8, 96  # the face photo is 96x96; the tiny detector sees 64x64 (scale 2/3)
COLOURS = [(255, 0, 0), (0, 160, 0), (0, 0, 255), (200, 0, 200), (0, 160, 160)]
BIG = planted_landmarks((46.0, 50.0), 0.6, 12.0)  # image pixels
SMALL_FACE = np.array([[70, 12], [76, 12], [73, 15], [71, 18], [75, 18]], float)


def box_around(points: np.ndarray, margin: float) -> np.ndarray:
    return np.array([*(points.min(0) - margin), *(points.max(0) + margin)])


def planted() -> list[tuple[np.ndarray, np.ndarray]]:
    """The faces the tiny detector reports, in its 64x64 input's pixels: a big one and a small one."""
    k = 64 / SIZE
    return [(box_around(BIG, 10) * k, BIG * k), (box_around(SMALL_FACE, 3) * k, SMALL_FACE * k)]


def face_photo(dark: bool = False) -> Image.Image:
    """A pale gradient with a coloured dot on each of the big face's landmarks (black when `dark`)."""
    if dark:
        return Image.new("RGB", (SIZE, SIZE))
    ramp = np.linspace(150, 230, SIZE, dtype=np.float32)
    rgb = np.stack([ramp[None, :].repeat(SIZE, 0), ramp[:, None].repeat(SIZE, 1), np.full((SIZE, SIZE), 190.0)], -1)
    image = Image.fromarray(rgb.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for (x, y), colour in zip(BIG, COLOURS, strict=True):
        draw.rectangle([round(x) - 2, round(y) - 2, round(x) + 2, round(y) + 2], fill=colour)
    return image


@pytest.fixture(scope="module")
def face_app(tmp_path_factory, tiny_checkpoints):
    tmp = tmp_path_factory.mktemp("faceid-app")
    app = make_app(tmp, extensions_dirs=(REPO_ROOT / "extensions",))
    app.engine.load_model(tiny_checkpoints["sd1"])
    unet = app.engine.require_model().unet
    for name, plus in (("ip-adapter-faceid_sd15", False), ("ip-adapter-faceid-plusv2_sd15", True)):
        parts = tiny_faceid(unet, plus, seed=5)
        save_ip_adapter(parts, tmp / "models" / "ControlNet" / f"{name}.bin")  # nested dicts, as released
        save_ip_adapter(without_lora(parts), tmp / "ref" / f"{name}.safetensors")  # for diffusers (no peft LoRA)
    tiny_clip_vision(tmp / "models" / "clip_vision" / "clip_h", seed=2)
    app.recognizer = write_buffalo(tmp / "models" / "insightface" / "models" / "buffalo_l", planted())
    app.tmp = tmp
    return app


@pytest.fixture(scope="module")
def plain(face_app):
    return latents(face_app, params())[0]


def unit(model: str, module: str = "ip-adapter_face_id", image: Image.Image | None = None, **changes) -> dict:
    return {"controlnet": {"args": [{"image": image or face_photo(), "module": module, "model": model,
                                     "weight": WEIGHT, **changes}]}}


# ---------------------------------------------------------------- the face embedding
def test_detection_alignment_and_embedding(face_app):
    analyzer = faces.FaceAnalyzer(face_app.tmp / "models" / "insightface" / "models" / "buffalo_l")
    rgb = np.asarray(face_photo())
    face = analyzer.largest_face(rgb)  # the big face, not the small one
    np.testing.assert_allclose(face.landmarks, BIG, atol=1e-3)
    np.testing.assert_allclose(face.box, box_around(BIG, 10), atol=1e-3)
    assert len(faces.detect_faces(analyzer._session(faces.DETECTOR_FILE), rgb)) == 2
    matrix = faces.similarity(face.landmarks, faces.ARCFACE_TEMPLATE)
    moved = face.landmarks @ matrix[:, :2].T + matrix[:, 2]
    np.testing.assert_allclose(moved, TEMPLATE, atol=1e-3)  # a planted similarity is undone exactly
    crop = faces.align(rgb, face.landmarks)
    for (x, y), colour in zip(TEMPLATE, COLOURS, strict=True):  # each dot lands on its template point
        np.testing.assert_allclose(crop[round(y), round(x)], colour, atol=2)
    embedding = analyzer.embedding(rgb, face)
    reference = face_app.recognizer(torch.from_numpy((crop.astype(np.float32) - 127.5) / 127.5).permute(2, 0, 1)[None])
    reference = torch.nn.functional.normalize(reference.detach(), dim=-1)[0].numpy()
    assert embedding.shape == (512,) and abs(np.linalg.norm(embedding) - 1) < 1e-5
    np.testing.assert_allclose(embedding, reference, atol=1e-5)
    big = faces.align(rgb, face.landmarks, 224)  # the Plus crop: the template scaled by 2
    np.testing.assert_allclose(big[round(TEMPLATE[2, 1] * 2), round(TEMPLATE[2, 0] * 2)], COLOURS[2], atol=2)


def test_faceid_files_are_told_apart(face_app):
    from extensions.controlnet import ip_adapter

    for name, kind in (("ip-adapter-faceid_sd15", "faceid"), ("ip-adapter-faceid-plusv2_sd15", "faceid_plus")):
        cn = read_controlnet(face_app.tmp / "models" / "ControlNet" / f"{name}.bin")
        assert (cn.layout, cn.kind, cn.arch, ip_adapter.variant(cn.state)) == ("ip-adapter-faceid", "ip_adapter",
                                                                               "", kind)
        same = read_controlnet(face_app.tmp / "ref" / f"{name}.safetensors")
        assert same.layout == "ip-adapter-faceid"


def test_insightface_file_errors_name_the_file(face_app, tmp_path):
    rgb = np.asarray(face_photo())
    with pytest.raises(api.InvalidParams, match=f"det_10g.onnx in {tmp_path}"):
        faces.FaceAnalyzer(tmp_path).largest_face(rgb)
    (tmp_path / "det_10g.onnx").write_bytes(b"not an onnx file")
    with pytest.raises(api.InvalidParams, match="could not be loaded by onnxruntime"):
        faces.FaceAnalyzer(tmp_path).largest_face(rgb)
    buffalo = face_app.tmp / "models" / "insightface" / "models" / "buffalo_l"
    (tmp_path / "det_10g.onnx").write_bytes((buffalo / "det_10g.onnx").read_bytes())
    analyzer = faces.FaceAnalyzer(tmp_path)
    with pytest.raises(api.InvalidParams, match=f"w600k_r50.onnx in {tmp_path}"):
        analyzer.embedding(rgb, analyzer.largest_face(rgb))


def test_faceid_plus_without_the_clip_encoder_names_it(tmp_path):
    from extensions.controlnet import ip_adapter

    with pytest.raises(api.InvalidParams, match=f"needs the CLIP ViT-H image encoder in {tmp_path}"):
        ip_adapter.find_encoder("ip-adapter_face_id_plus", tmp_path)


# ---------------------------------------------------------------- against diffusers
def diffusers_faceid(face_app, tiny_checkpoints, tmp_path, name: str, plus: bool):
    """diffusers' StableDiffusionPipeline, load_ip_adapter and ip_adapter_image_embeds (a zero negative
    embedding), on a separate UNet; Plus gets the aligned crop's CLIP hidden states and its shortcut."""
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    ref_app = make_app(tmp_path, extensions_dirs=())
    ref_app.engine.load_model(tiny_checkpoints["sd1"])
    model = ref_app.engine.require_model()
    encoder = CLIPVisionModelWithProjection.from_pretrained(str(face_app.tmp / "models" / "clip_vision" / "clip_h"),
                                                            local_files_only=True) if plus else None
    scheduler = diffusers.EulerDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                                 beta_schedule="scaled_linear", timestep_spacing="linspace")
    pipe = diffusers.StableDiffusionPipeline(
        vae=model.vae, text_encoder=model.text_encoders[0], tokenizer=ref_app.engine.tokenizer(), unet=model.unet,
        scheduler=scheduler, safety_checker=None, requires_safety_checker=False, image_encoder=encoder,
        feature_extractor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}))
    pipe.load_ip_adapter(str(face_app.tmp / "ref"), subfolder="", weight_name=f"{name}.safetensors",
                         image_encoder_folder=None, local_files_only=True)
    pipe.set_ip_adapter_scale(WEIGHT)
    pipe.set_progress_bar_config(disable=True)
    analyzer = faces.FaceAnalyzer(face_app.tmp / "models" / "insightface" / "models" / "buffalo_l")
    rgb = np.asarray(face_photo())
    face = analyzer.largest_face(rgb)
    embedding = torch.from_numpy(analyzer.embedding(rgb, face)).float()[None]
    embeds = torch.stack([torch.zeros_like(embedding), embedding])  # [negative, positive] x 1 image x 512
    if plus:
        projection = pipe.unet.encoder_hid_proj.image_projection_layers[0]
        crop = Image.fromarray(faces.align(rgb, face.landmarks, 224))
        projection.clip_embeds = pipe.prepare_ip_adapter_image_embeds([crop], None, "cpu", 1, True)[0]
        projection.shortcut = True  # PlusV2
    with torch.no_grad():
        tokens = pipe.unet.encoder_hid_proj.image_projection_layers[0](embeds[:, 0])  # [negative, positive]
        return tokens, pipe(prompt="a red circle", negative_prompt="green", ip_adapter_image_embeds=[embeds],
                    num_inference_steps=STEPS, guidance_scale=7.0, latents=randn(SEED, (4, 8, 8), "cpu")[None],
                    height=64, width=64, output_type="latent").images


@pytest.mark.parametrize(("name", "module"), [("ip-adapter-faceid_sd15", "ip-adapter_face_id"),
                                              ("ip-adapter-faceid-plusv2_sd15", "ip-adapter_face_id_plus")])
def test_latents_match_diffusers_load_ip_adapter(face_app, plain, tiny_checkpoints, tmp_path, name, module):
    tokens, expected = diffusers_faceid(face_app, tiny_checkpoints, tmp_path, name, plus="plus" in name)
    ours, state, result = latents(face_app, params(extension_args=unit(name, module)))
    assert (ours - plain).abs().mean() > 0.05  # the face really changes the result
    torch.testing.assert_close(state["ip_tokens"][0].uncond, tokens[:1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state["ip_tokens"][0].cond, tokens[1:], atol=1e-5, rtol=1e-5)
    # the tiny random UNet's latents reach ~30: float32 rounding leaves ~1e-4 absolute on them
    assert (ours - expected).abs().mean() < 1e-5 * expected.abs().mean()
    torch.testing.assert_close(ours, expected, atol=5e-4, rtol=2e-4)
    assert state["preprocess_calls"] == [0]
    assert f'ControlNet 0: "Module: {module}, Model: {name}, Weight: 0.8' in result.infotexts[0]


def test_weight_zero_is_bit_identical(face_app, plain):
    off, _, _ = latents(face_app, params(extension_args=unit("ip-adapter-faceid_sd15", weight=0)))
    assert torch.equal(off, plain)


@pytest.mark.parametrize(("model", "module", "words"), [
    ("ip-adapter-faceid-plusv2_sd15", "ip-adapter_face_id",
     "needs an IP-Adapter FaceID preprocessor (ip-adapter_face_id_plus), not 'ip-adapter_face_id'"),
    ("ip-adapter-faceid_sd15", "ip-adapter_clip_sd15",
     "needs an IP-Adapter FaceID preprocessor (ip-adapter_face_id), not 'ip-adapter_clip_sd15'"),
])
def test_a_wrong_preprocessor_is_named(face_app, model, module, words):
    with pytest.raises(api.InvalidParams) as err:
        latents(face_app, params(extension_args=unit(model, module)))
    assert words in str(err.value)


def test_no_face_is_a_clear_error_and_the_model_keeps_working(face_app, plain):
    with pytest.raises(api.InvalidParams, match="found no face in the unit's image"):
        latents(face_app, params(extension_args=unit("ip-adapter-faceid_sd15", image=face_photo(dark=True))))
    assert torch.equal(latents(face_app, params())[0], plain)


# ---------------------------------------------------------------- through the API
def test_a_face_id_unit_through_the_api_and_a_missing_insightface_file(tmp_path, tiny_checkpoints):
    import httpx

    server = start_server(tmp_path, {"tiny-sd1": tiny_checkpoints["sd1"]})
    try:
        with httpx.Client(base_url=server.url, timeout=600) as http:
            assert http.post("/sdapi/v1/options", json={"sd_model_checkpoint": "tiny-sd1"}).status_code == 200
            models = server.context.app.settings.models_dir
            unet = server.context.app.engine.require_model().unet
            save_ip_adapter(tiny_faceid(unet, plus=False, seed=5), models / "ControlNet" / "ip-adapter-faceid_sd15.bin")
            modules = http.get("/controlnet/module_list").json()["module_list"]
            assert {"ip-adapter_face_id", "ip-adapter_face_id_plus"} <= set(modules)
            names = http.get("/controlnet/model_list", params={"update": "true"}).json()["model_list"]
            model = next(n for n in names if n.startswith("ip-adapter-faceid_sd15"))
            face = {"input_image": b64(face_photo()), "module": "ip-adapter_face_id", "model": model, "weight": 1.0}
            payload = {**SMALL, "alwayson_scripts": {"controlnet": {"args": [face]}}}
            missing = http.post("/sdapi/v1/txt2img", json=payload)
            assert missing.status_code == 422
            folder = models / "insightface" / "models" / "buffalo_l"
            assert "det_10g.onnx" in missing.text and str(folder) in missing.text
            write_buffalo(folder, planted())
            plain, with_face = http.post("/sdapi/v1/txt2img", json=SMALL), http.post("/sdapi/v1/txt2img", json=payload)
            assert plain.status_code == with_face.status_code == 200, with_face.text
            a, b = (decode(r.json()["images"][0]).astype(float) for r in (plain, with_face))
            assert np.abs(a - b).mean() > 1.0
            dark = {**face, "input_image": b64(face_photo(dark=True))}
            no_face = http.post("/sdapi/v1/txt2img", json={**SMALL, "alwayson_scripts": {"controlnet": {"args": [dark]}}})
            assert no_face.status_code == 422 and "found no face" in no_face.text
    finally:
        server.stop()

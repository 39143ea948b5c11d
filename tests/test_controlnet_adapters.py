"""T2I-Adapters in the controlnet extension: TencentARC's original layout against the original network's
maths, diffusers' layout against diffusers' StableDiffusionAdapterPipeline (SD1.5) and T2IAdapter
(SDXL), units, mismatched architectures, a unit through the A1111 API over HTTP; FLUX/SD3 ControlNet
files and units on FLUX checkpoints refused by name."""
from __future__ import annotations

import shutil

import httpx
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

diffusers = pytest.importorskip("diffusers")

from extensions.controlnet import control  # noqa: E402
from extensions.controlnet.models import build_model, read_controlnet  # noqa: E402
from extensions.controlnet.units import Unit  # noqa: E402
from modules.plugins import api  # noqa: E402
from modules.sampling.denoisers import ModelDenoiser  # noqa: E402
from modules.sampling.rng import randn  # noqa: E402
from modules.settings import REPO_ROOT  # noqa: E402
from tests.api_server import start_server  # noqa: E402
from tests.conftest import make_app  # noqa: E402
from tests.fixtures.make_tiny_t2i_adapter import CHANNELS, make_tiny_t2i_adapter, reference_features  # noqa: E402
from tests.test_controlnet import SEED, STEPS, hint_image, latents, params  # noqa: E402
from tests.test_controlnet_api import SMALL, b64, decode  # noqa: E402


def diffusers_adapter(arch: str, seed: int):
    """A diffusers T2IAdapter with random weights (its own init, biases made non-zero)."""
    torch.manual_seed(seed)
    xl = arch == "sdxl"
    adapter = diffusers.T2IAdapter(in_channels=3, channels=list(CHANNELS), num_res_blocks=2,
                                   downscale_factor=16 if xl else 8,
                                   adapter_type="full_adapter_xl" if xl else "full_adapter")
    with torch.no_grad():
        for name, p in adapter.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    return adapter.eval()


@pytest.fixture(scope="module")
def t2i_app(tmp_path_factory, tiny_checkpoints):
    tmp = tmp_path_factory.mktemp("t2i-app")
    folder = tmp / "models" / "ControlNet"
    for arch in ("sd1", "sdxl"):
        make_tiny_t2i_adapter(arch, folder / f"t2i-{arch}.safetensors", seed=11)
        diffusers_adapter(arch, 5).save_pretrained(folder / f"t2i-diffusers-{arch}")
    single = diffusers_adapter("sd1", 5).state_dict()
    save_file({k: v.contiguous() for k, v in single.items()}, str(folder / "t2i-single-sd1.safetensors"))
    app = make_app(tmp, extensions_dirs=(REPO_ROOT / "extensions",))
    app.engine.load_model(tiny_checkpoints["sd1"])
    return app


def library(app):
    return app.plugins.manager.get_plugin("controlnet").library


def units(model: str, **changes) -> dict:
    return {"controlnet": {"args": [{"image": hint_image(), "module": "none", "model": model, **changes}]}}


def hint() -> torch.Tensor:
    return torch.from_numpy(np.asarray(hint_image(), np.float32) / 255).permute(2, 0, 1)[None]


# ---------------------------------------------------------------- loading
@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_original_layout_computes_tencentarcs_features(t2i_app, arch):
    path = library(t2i_app).find(f"t2i-{arch}")
    cn = read_controlnet(path)
    assert (cn.kind, cn.layout, cn.arch) == ("t2i_adapter", "t2i-original", arch)
    model = build_model(cn, None, torch.device("cpu"), torch.float32)
    with torch.no_grad():
        ours = model(hint())
    expected = reference_features(load_file(str(path)), arch, hint())
    assert [f.shape for f in ours] == [f.shape for f in expected]
    for a, b in zip(ours, expected, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_diffusers_folder_and_single_file_load_diffusers_tensors(t2i_app):
    reference = diffusers_adapter("sd1", 5).state_dict()
    for name in ("t2i-diffusers-sd1", "t2i-single-sd1"):
        cn = read_controlnet(library(t2i_app).find(name))
        assert (cn.kind, cn.layout, cn.arch) == ("t2i_adapter", "t2i-diffusers", "sd1")
        assert set(cn.state) == set(reference)
        assert all(torch.equal(cn.state[k], reference[k]) for k in reference)
    assert read_controlnet(library(t2i_app).find("t2i-diffusers-sdxl")).arch == "sdxl"


def test_an_adapter_with_skip_convs_is_refused_by_name(tmp_path):
    from tests.fixtures.make_tiny_t2i_adapter import tiny_adapter_state_dict

    sd = tiny_adapter_state_dict("sd1")
    sd["body.0.skep.weight"] = torch.zeros(32, 32, 1, 1)
    save_file(sd, str(tmp_path / "skep.safetensors"))
    with pytest.raises(api.InvalidParams, match="skip convolutions"):
        read_controlnet(tmp_path / "skep.safetensors")


# ---------------------------------------------------------------- numerics
def test_latents_match_diffusers_adapter_pipeline(t2i_app, tiny_checkpoints):
    model = t2i_app.engine.require_model()
    folder = library(t2i_app).find("t2i-diffusers-sd1")
    adapter = diffusers.T2IAdapter.from_pretrained(str(folder), local_files_only=True, torch_dtype=torch.float32)
    scheduler = diffusers.EulerDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                                 beta_schedule="scaled_linear", timestep_spacing="linspace")
    pipe = diffusers.StableDiffusionAdapterPipeline(
        vae=model.vae, text_encoder=model.text_encoders[0], tokenizer=t2i_app.engine.tokenizer(), unet=model.unet,
        adapter=adapter, scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        expected = pipe(prompt="a red circle", negative_prompt="green", image=hint_image(), num_inference_steps=STEPS,
                        guidance_scale=7.0, latents=randn(SEED, (4, 8, 8), "cpu")[None], height=64, width=64,
                        adapter_conditioning_scale=0.8, output_type="latent").images
    plain, _, _ = latents(t2i_app, params())
    for name in ("t2i-diffusers-sd1", "t2i-single-sd1"):
        ours, _, result = latents(t2i_app, params(extension_args=units(name, weight=0.8)))
        assert (ours - plain).abs().mean() > 0.05  # the adapter really changes the result
        torch.testing.assert_close(ours, expected, atol=2e-4, rtol=2e-4)
    assert 'ControlNet 0: "Module: none, Model: t2i-single-sd1, Weight: 0.8' in result.infotexts[0]


def test_sdxl_adapter_matches_diffusers_inside_the_unet(t2i_app, tiny_checkpoints, tmp_path):
    xl = make_app(tmp_path, extensions_dirs=())
    xl.engine.load_model(tiny_checkpoints["sdxl"])
    model = xl.engine.require_model()
    folder = library(t2i_app).find("t2i-diffusers-sdxl")
    ref = diffusers.T2IAdapter.from_pretrained(str(folder), local_files_only=True, torch_dtype=torch.float32)

    def reference(call):
        with torch.no_grad():
            features = ref(hint())
        return api.UNetResiduals(intrablock=tuple(f.expand(call.x.shape[0], -1, -1, -1) for f in features))

    planned = control.plan_units([Unit(image=hint_image(), model="t2i-diffusers-sdxl")], library(t2i_app))
    control.check_arch(planned, library(t2i_app), "sdxl")
    context = api.DenoiserContext("txt2img", "first", None, 64, 64, (), (), 7.0, torch.linspace(10, 0, 5), arch="sdxl")
    ours = control.Residuals(planned, control.prepare_hints(planned, {}, context, tmp_path, 0), library(t2i_app),
                             context)
    sigma_to_t = xl.engine.discrete_schedule(model).sigma_to_t
    time_ids = torch.tensor([[64.0, 64, 0, 0, 64, 64]])
    gen = torch.Generator().manual_seed(5)
    x, sigma = torch.randn(2, 4, 8, 8, generator=gen) * 3, torch.tensor([3.0, 3.0])
    cross, pooled = torch.randn(2, 77, 64, generator=gen), torch.randn(2, 32, generator=gen)
    with torch.no_grad():
        plain = ModelDenoiser(model.unet, sigma_to_t, time_ids=time_ids)(x, sigma, cross, pooled)
        expected = ModelDenoiser(model.unet, sigma_to_t, time_ids=time_ids, residuals=reference)(x, sigma, cross, pooled)
        got = ModelDenoiser(model.unet, sigma_to_t, time_ids=time_ids, residuals=ours)(x, sigma, cross, pooled)
    assert (expected - plain).abs().mean() > 1e-3
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_weight_zero_is_bit_identical_and_guidance_window_applies(t2i_app):
    plain, _, _ = latents(t2i_app, params())
    off, _, _ = latents(t2i_app, params(extension_args=units("t2i-sd1", weight=0)))
    assert torch.equal(plain, off)
    _, state, _ = latents(t2i_app, params(extension_args=units("t2i-sd1", guidance_end=0.5)))
    residuals = state["passes"][0]
    assert {step for step, used in residuals.calls if used} == {0, 1, 2}
    assert len(residuals.features) == 1  # the features are computed once per pass


def test_a_controlnet_and_an_adapter_sum(t2i_app, tmp_path):
    from tests.fixtures.make_tiny_controlnet import make_tiny_controlnet

    shutil.copy(make_tiny_controlnet("sd1", tmp_path / "cn-sd1.safetensors", seed=7),
                library(t2i_app).roots[0] / "cn-sum-sd1.safetensors")
    library(t2i_app).refresh()
    cn, t2i = Unit(image=hint_image(), model="cn-sum-sd1"), Unit(image=hint_image(), model="t2i-sd1", weight=0.5)
    context = api.DenoiserContext("txt2img", "first", None, 64, 64, (), (), 7.0, torch.linspace(10, 0, 5))
    calls = []
    for unit_list in ([cn, t2i], [cn], [t2i]):
        planned = control.plan_units(unit_list, library(t2i_app))
        calls.append(control.Residuals(planned, control.prepare_hints(planned, {}, context, tmp_path, 0),
                                       library(t2i_app), context))
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    call = api.UNetCall(x=x, sigma=torch.full((2,), 2.0), model_in=x, timestep=torch.full((2,), 500.0),
                        cross_attn=torch.randn(2, 77, 32), added_cond=None, uncond=torch.tensor([False, True]))
    both, only_cn, only_t2i = (fn(call) for fn in calls)
    assert only_cn.intrablock is None and only_t2i.down is None
    assert all(torch.equal(a, b) for a, b in zip(both.down, only_cn.down, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(both.intrablock, only_t2i.intrablock, strict=True))


def test_sdxl_adapter_on_sd15_names_both_architectures(t2i_app):
    planned = control.plan_units([Unit(image=hint_image(), model="t2i-sdxl")], library(t2i_app))
    with pytest.raises(api.InvalidParams, match="is a SDXL T2I-Adapter, but the loaded checkpoint is SD1.5"):
        control.check_arch(planned, library(t2i_app), "sd1")


# ---------------------------------------------------------------- through the API
@pytest.fixture(scope="module")
def http(tmp_path_factory, tiny_checkpoints):
    from tests.fixtures.make_tiny_mmdit import make_all_in_one

    tmp = tmp_path_factory.mktemp("t2i-api")
    for arch in ("sd1", "sdxl"):
        make_tiny_t2i_adapter(arch, tmp / "models" / "ControlNet" / f"t2iadapter_canny_{arch}.safetensors", seed=4)
    flux = make_all_in_one("flux-schnell", tmp / "src" / "tiny-flux.safetensors")
    server = start_server(tmp, {"tiny-sd1": tiny_checkpoints["sd1"], "tiny-flux": flux})
    with httpx.Client(base_url=server.url, timeout=600) as client:
        client.server = server
        yield client
    server.stop()


def test_an_adapter_unit_through_the_api(http):
    assert http.post("/sdapi/v1/options", json={"sd_model_checkpoint": "tiny-sd1"}).status_code == 200
    names = http.get("/controlnet/model_list").json()["model_list"]
    sd1 = next(n for n in names if n.startswith("t2iadapter_canny_sd1 ["))
    t2i = [n for n in names if n.startswith("t2iadapter")]
    assert http.get("/controlnet/control_types").json()["control_types"]["T2I-Adapter"]["model_list"][1:] == t2i
    plain = http.post("/sdapi/v1/txt2img", json=SMALL)
    unit = {"input_image": b64(hint_image()), "module": "canny", "model": sd1, "weight": 1}
    with_adapter = http.post("/sdapi/v1/txt2img", json={**SMALL, "alwayson_scripts": {"controlnet": {"args": [unit]}}})
    assert plain.status_code == with_adapter.status_code == 200, with_adapter.text
    a, b = (decode(r.json()["images"][0]).astype(float) for r in (plain, with_adapter))
    assert np.abs(a - b).mean() > 1.0
    wrong = {**unit, "model": "t2iadapter_canny_sdxl"}
    response = http.post("/sdapi/v1/txt2img", json={**SMALL, "alwayson_scripts": {"controlnet": {"args": [wrong]}}})
    assert response.status_code == 422
    assert "is a SDXL T2I-Adapter, but the loaded checkpoint is SD1.5" in response.text


def test_a_unit_on_a_flux_checkpoint_is_a_422_naming_both(http):
    unit = {"input_image": b64(hint_image()), "module": "none", "model": "t2iadapter_canny_sd1"}
    payload = {**SMALL, "cfg_scale": 1, "alwayson_scripts": {"controlnet": {"args": [unit]}},
               "override_settings": {"sd_model_checkpoint": "tiny-flux"}}
    response = http.post("/sdapi/v1/txt2img", json=payload)
    assert response.status_code == 422, response.text
    assert "is a SD1.5 T2I-Adapter, but the loaded checkpoint is FLUX.1-schnell" in response.text
    assert "use a FLUX.1 ControlNet" in response.text
    again = {**SMALL, "cfg_scale": 1, "override_settings": {"sd_model_checkpoint": "tiny-flux"}}
    assert http.post("/sdapi/v1/txt2img", json=again).status_code == 200  # the checkpoint still works


@pytest.mark.parametrize(("keys", "words"), [  # FLUX.1 ControlNets run: tests/test_controlnet_flux.py
    (("pos_embed_input.proj.weight", "controlnet_blocks.0.weight"), "an SD3 ControlNet"),
])
def test_flow_model_controlnets_are_recognised_and_refused(tmp_path, keys, words):
    save_file({k: torch.zeros(2, 2) for k in keys}, str(tmp_path / "flow-cn.safetensors"))
    with pytest.raises(api.InvalidParams, match=f"{words} is not supported yet"):
        read_controlnet(tmp_path / "flow-cn.safetensors")


def test_an_ip_adapter_unit_through_the_api_and_a_missing_encoder(http):
    from tests.fixtures.make_tiny_ip_adapter import save_ip_adapter, tiny_clip_vision, tiny_ip_adapter

    app = http.server.context.app
    assert http.post("/sdapi/v1/options", json={"sd_model_checkpoint": "tiny-sd1"}).status_code == 200
    models = app.settings.models_dir
    save_ip_adapter(tiny_ip_adapter(app.engine.require_model().unet, plus=False, seed=1),
                    models / "ControlNet" / "ip-adapter_sd15.safetensors")
    assert "IP-Adapter" in http.get("/controlnet/control_types").json()["control_types"]
    names = http.get("/controlnet/model_list", params={"update": "true"}).json()["model_list"]
    ip = next(n for n in names if n.startswith("ip-adapter_sd15 ["))
    unit = {"input_image": b64(hint_image()), "module": "ip-adapter_clip_sd15", "model": ip, "weight": 0.8}
    payload = {**SMALL, "alwayson_scripts": {"controlnet": {"args": [unit]}}}
    missing = http.post("/sdapi/v1/txt2img", json=payload)
    assert missing.status_code == 422
    assert "needs the CLIP ViT-H image encoder in" in missing.text and "clip_vision" in missing.text
    tiny_clip_vision(models / "clip_vision" / "clip_h", seed=2)
    plain, with_ip = http.post("/sdapi/v1/txt2img", json=SMALL), http.post("/sdapi/v1/txt2img", json=payload)
    assert plain.status_code == with_ip.status_code == 200, with_ip.text
    a, b = (decode(r.json()["images"][0]).astype(float) for r in (plain, with_ip))
    assert np.abs(a - b).mean() > 1.0

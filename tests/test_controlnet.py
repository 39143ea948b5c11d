"""The bundled controlnet extension: loading (ours vs diffusers' from_single_file), latents against
diffusers' StableDiffusionControlNetPipeline, units (weight 0, guidance window, sums), the
`unet_residuals` hook, hints preprocessed once per job, img2img / inpaint / hires, preprocessors."""
from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

diffusers = pytest.importorskip("diffusers")

from extensions.controlnet import control, preprocessors  # noqa: E402
from extensions.controlnet.annotators import Annotators  # noqa: E402
from extensions.controlnet.models import ControlNetLibrary, read_controlnet  # noqa: E402
from extensions.controlnet.units import Unit  # noqa: E402
from modules.pipeline.params import Img2ImgParams, Txt2ImgParams  # noqa: E402
from modules.plugins import api  # noqa: E402
from modules.sampling.rng import randn  # noqa: E402
from modules.settings import REPO_ROOT  # noqa: E402
from tests.conftest import make_app  # noqa: E402
from tests.fixtures.make_tiny_controlnet import make_tiny_controlnet  # noqa: E402
from tests.stage_helpers import run_recorded  # noqa: E402

SEED, STEPS = 1234, 4  # linspace(999, 0, 4) hits whole timesteps: both interpolations agree


def hint_image() -> Image.Image:
    image = Image.new("RGB", (64, 64), (255, 255, 255))
    image.paste((0, 0, 0), (12, 20, 50, 44))
    image.paste((200, 40, 40), (30, 4, 40, 60))
    return image


@pytest.fixture(scope="module")
def cn_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cn")
    return {arch: make_tiny_controlnet(arch, folder / f"cn-{arch}.safetensors", seed=7) for arch in ("sd1", "sd2", "sdxl")}


@pytest.fixture(scope="module")
def cn_app(tmp_path_factory, tiny_checkpoints, cn_files):
    tmp = tmp_path_factory.mktemp("cn-app")
    target = tmp / "models" / "ControlNet"
    target.mkdir(parents=True)
    for path in cn_files.values():
        shutil.copy(path, target / path.name)
    second = make_tiny_controlnet("sd1", tmp / "other" / "cn-sd1-b.safetensors", seed=8)
    shutil.copy(second, target / second.name)
    app = make_app(tmp, extensions_dirs=(REPO_ROOT / "extensions",))
    assert app.plugins.extension("controlnet").status == "loaded"
    app.engine.load_model(tiny_checkpoints["sd1"])
    return app


def params(**changes) -> Txt2ImgParams:
    base = dict(prompt="a red circle", negative_prompt="green", steps=STEPS, sampler_name="Euler",
                scheduler="Uniform", cfg_scale=7.0, seed=SEED, width=64, height=64, rng_source="cpu",
                save_images=False)
    return Txt2ImgParams(**{**base, **changes})


def units(*items) -> dict:
    return {"controlnet": {"args": [{"image": hint_image(), "module": "none", "model": "cn-sd1", **u} for u in items]}}


@pytest.fixture(scope="module")
def plain(cn_app):
    return latents(cn_app, params())[0]


def latents(app, p):
    result, hooks = run_recorded(app.engine, p)
    return hooks.values["sampling"][-1].latents, hooks.inner.context.state.get("controlnet"), result


# ---------------------------------------------------------------- loading
@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
def test_original_layout_loads_as_diffusers_from_single_file_does(cn_files, arch):
    path = cn_files[arch]
    ours = read_controlnet(path)
    assert (ours.layout, ours.arch) == ("original", arch)
    ref = diffusers.ControlNetModel.from_single_file(str(path), config=str(path.parent / f"{path.stem}-config"),
                                                     local_files_only=True, torch_dtype=torch.float32)
    theirs = ref.state_dict()
    assert set(ours.state) == set(theirs)
    source = {k.removeprefix("control_model."): v for k, v in load_file(str(path)).items()}
    for key, value in ours.state.items():
        if key.startswith("add_embedding."):  # diffusers 0.3x leaves SDXL's label_emb unconverted: check the source
            old = key.replace("add_embedding.linear_1", "label_emb.0.0").replace("add_embedding.linear_2", "label_emb.0.2")
            assert torch.equal(value, source[old]), key
        else:
            assert torch.equal(value.float(), theirs[key]), key


def test_diffusers_single_file_and_folder_give_the_same_tensors(cn_files, tmp_path):
    path = cn_files["sd1"]
    ref = diffusers.ControlNetModel.from_single_file(str(path), config=str(path.parent / f"{path.stem}-config"),
                                                     local_files_only=True, torch_dtype=torch.float32)
    ref.save_pretrained(tmp_path / "folder-cn")
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "single.safetensors"))
    original = read_controlnet(path)
    for layout_path in (tmp_path / "folder-cn", tmp_path / "single.safetensors"):
        other = read_controlnet(layout_path)
        assert (other.layout, other.arch) == ("diffusers", "sd1")
        assert all(torch.equal(original.state[k].float(), other.state[k].float()) for k in original.state)
    library = ControlNetLibrary((tmp_path,))
    assert {"folder-cn", "single"} <= set(library.names())


def test_an_unknown_file_is_refused_by_name(tmp_path):
    save_file({"foo.weight": torch.zeros(2)}, str(tmp_path / "odd.safetensors"))
    with pytest.raises(api.InvalidParams, match="odd.safetensors is not a ControlNet"):
        read_controlnet(tmp_path / "odd.safetensors")


# ---------------------------------------------------------------- numerics
def _diffusers_latents(app, cn_path):
    model = app.engine.require_model()
    controlnet = diffusers.ControlNetModel.from_single_file(
        str(cn_path), config=str(cn_path.parent / f"{cn_path.stem}-config"), local_files_only=True,
        torch_dtype=torch.float32)
    scheduler = diffusers.EulerDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                                 beta_schedule="scaled_linear", timestep_spacing="linspace")
    pipe = diffusers.StableDiffusionControlNetPipeline(
        vae=model.vae, text_encoder=model.text_encoders[0], tokenizer=app.engine.tokenizer(), unet=model.unet,
        controlnet=controlnet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        out = pipe(prompt="a red circle", negative_prompt="green", image=hint_image(), num_inference_steps=STEPS,
                   guidance_scale=7.0, latents=randn(SEED, (4, 8, 8), "cpu")[None], height=64, width=64,
                   controlnet_conditioning_scale=1.0, control_guidance_start=0.0, control_guidance_end=1.0,
                   output_type="latent")
    return out.images


def test_latents_match_diffusers_controlnet_pipeline(cn_app, cn_files, plain):
    expected = _diffusers_latents(cn_app, cn_files["sd1"])
    ours, _, _ = latents(cn_app, params(extension_args=units({})))
    assert (ours - plain).abs().mean() > 0.05  # the ControlNet really changes the result
    torch.testing.assert_close(ours, expected, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("args", [units({"weight": 0.0}), units({"enabled": False}, {"weight": 0})])
def test_weight_zero_or_disabled_is_bit_identical(cn_app, args, plain):
    off, _, _ = latents(cn_app, params(extension_args=args))
    assert torch.equal(plain, off)


def test_guidance_window_names_exactly_its_steps(cn_app):
    _, state, _ = latents(cn_app, params(extension_args=units({"guidance_start": 0.25, "guidance_end": 0.5})))
    calls = state["passes"][0].calls
    active_steps = {step for step, used in calls if used}
    assert active_steps == {1, 2}  # step i of 4 is on when 0.25 <= i / 4 <= 0.5
    assert {step for step, _ in calls} == set(range(STEPS))


def test_guidance_window_changes_the_residuals_per_step(cn_app):
    fn = _residual_fn(cn_app, [Unit(image=hint_image(), model="cn-sd1", guidance_start=0.5, guidance_end=0.75)])
    call, recorded = _unet_call(cn_app), []
    for step in range(STEPS):
        fn.context.clock.step = step
        recorded.append(fn(call))
    assert [r is not None for r in recorded] == [False, False, True, True]
    full = _residual_fn(cn_app, [Unit(image=hint_image(), model="cn-sd1")])(call)
    assert all(torch.equal(a, b) for a, b in zip(recorded[2].down, full.down, strict=True))


def _unet_call(app, rows: int = 2, uncond=(False, True)):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(rows, 4, 8, 8, generator=gen)
    return api.UNetCall(x=x, sigma=torch.full((rows,), 2.0), model_in=x / 5 ** 0.5, timestep=torch.full((rows,), 500.0),
                        cross_attn=torch.randn(rows, 77, 32, generator=gen), added_cond=None,
                        uncond=torch.tensor(uncond))


def _residual_fn(app, unit_list):
    ext = app.plugins.manager.get_plugin("controlnet")
    planned = control.plan_units(unit_list, ext.library)
    context = api.DenoiserContext("txt2img", "first", None, 64, 64, (), (), 7.0, torch.linspace(10, 0, STEPS + 1))
    hints = control.prepare_hints(planned, {}, context, ext.annotators, 0)
    return control.Residuals(planned, hints, ext.library, context)


def test_two_units_give_the_sum_of_their_residuals(cn_app):
    a = Unit(image=hint_image(), module="none", model="cn-sd1", weight=0.7)
    b = Unit(image=hint_image().rotate(90), module="canny", model="cn-sd1-b", weight=1.3)
    call = _unet_call(cn_app)
    both, ra, rb = (_residual_fn(cn_app, u)(call) for u in ([a, b], [a], [b]))
    assert len(both.down) == 8 and both.mid is not None
    for x, y, z in zip((*both.down, both.mid), (*ra.down, ra.mid), (*rb.down, rb.mid), strict=True):
        torch.testing.assert_close(x, y + z)
        assert (y - z).abs().max() > 0


def test_control_modes(cn_app):
    call = _unet_call(cn_app)
    base = _residual_fn(cn_app, [Unit(image=hint_image(), model="cn-sd1")])(call)
    prompt = _residual_fn(cn_app, [Unit(image=hint_image(), model="cn-sd1", control_mode=1)])(call)
    strong = _residual_fn(cn_app, [Unit(image=hint_image(), model="cn-sd1", control_mode=2)])(call)
    n = len(base.down) + 1
    for k, (b, p, s) in enumerate(zip((*base.down, base.mid), (*prompt.down, prompt.mid),
                                      (*strong.down, strong.mid), strict=True)):
        torch.testing.assert_close(p, b * 0.825 ** (n - 1 - k))
        torch.testing.assert_close(s[0], p[0])  # the prompt's row
        assert torch.count_nonzero(s[1]) == 0  # the negative prompt's row gets nothing


# ---------------------------------------------------------------- the hook
class ResidualProbe:
    """A plugin adding a constant to the middle block's output, and recording the contexts."""

    def __init__(self, value: float | None) -> None:
        self.value, self.contexts = value, []

    @api.hookimpl
    def unet_residuals(self, context, params, job):
        self.contexts.append((context.pass_name, context.arch, context.width))
        if self.value is None:
            return None
        skips = ((32, 8), (32, 8), (32, 4), (64, 4), (64, 2), (128, 2), (128, 1), (128, 1))  # tiny SD1, 64x64
        return lambda call: api.UNetResiduals(
            down=tuple(torch.zeros(call.x.shape[0], c, s, s) for c, s in skips),
            mid=torch.full((call.x.shape[0], 128, 1, 1), self.value))


def test_hook_unet_residuals(cn_app, plain):
    for value, changes in ((None, False), (0.5, True)):
        probe = ResidualProbe(value)
        cn_app.plugins.manager.register(probe, name=f"probe-{value}")
        try:
            got, _, _ = latents(cn_app, params())
        finally:
            cn_app.plugins.manager.unregister(probe)
        assert probe.contexts == [("first", "sd1", 64)]
        assert torch.equal(got, plain) != changes


# ---------------------------------------------------------------- jobs
def test_hint_is_preprocessed_once_per_job_with_hires_and_batches(cn_app):
    p = params(extension_args=units({"module": "canny"}), n_iter=2, steps=2, enable_hr=True, hr_scale=1.5,
               hr_second_pass_steps=2, denoising_strength=0.5, hr_upscaler="Latent")
    _, state, result = latents(cn_app, p)
    assert state["preprocess_calls"] == [0]
    assert [r.context.pass_name for r in state["passes"]] == ["first", "hires", "first", "hires"]
    assert state["passes"][1].hints[0].shape[-2:] == (96, 96)
    assert 'ControlNet 0: "Module: canny, Model: cn-sd1, Weight: 1, Resize Mode: Crop and Resize, Processor Res: 512, ' \
           'Threshold A: 100.0, Threshold B: 200.0, Guidance Start: 0.0, Guidance End: 1.0, Pixel Perfect: False, ' \
           'Control Mode: Balanced"' in result.infotexts[0]


def test_img2img_uses_the_init_image_and_inpaint_only_its_mask(cn_app):
    init = hint_image()
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    base = dict(prompt="a", steps=3, sampler_name="Euler", seed=3, width=64, height=64, save_images=False,
                init_images=(init,), denoising_strength=0.8)
    plain, _, _ = latents(cn_app, Img2ImgParams(**base))
    args = {"controlnet": {"args": [{"module": "none", "model": "cn-sd1"}]}}
    with_cn, state, _ = latents(cn_app, Img2ImgParams(**base, extension_args=args))
    assert (with_cn - plain).abs().mean() > 1e-3
    inpaint = {"controlnet": {"args": [{"module": "inpaint_only", "model": "cn-sd1"}]}}
    _, state, _ = latents(cn_app, Img2ImgParams(**base, mask=mask, extension_args=inpaint))
    hint = state["passes"][0].hints[0][0]
    assert torch.all(hint[:, 24, 24] == -1) and torch.all(hint[:, 2, 2] >= 0)  # masked pixels are -1


# ---------------------------------------------------------------- hints and preprocessors
def test_resize_modes():
    wide = np.zeros((32, 64, 3), np.uint8)
    wide[:, :32] = 255
    assert control.fit(wide, 32, 32, 0).shape == (32, 32, 3)
    cropped = control.fit(wide, 32, 32, 1)
    assert cropped[0, 0].tolist() == [255] * 3 and cropped[0, -1].tolist() == [0] * 3
    filled = control.fit(wide, 32, 32, 2)
    assert filled[0, 10].tolist() == [0] * 3 and filled[16, 2].tolist() == [255] * 3  # black bands top/bottom
    assert control.pixel_perfect_resolution(Image.new("RGB", (64, 32)), 128, 128, 1) == 128
    assert control.pixel_perfect_resolution(Image.new("RGB", (64, 32)), 128, 128, 2) == 64


def test_canny_finds_the_square_outline_only():
    image = np.zeros((64, 64, 3), np.uint8)
    image[16:48, 16:48] = 255
    edges = preprocessors.canny(image, 100, 200)[..., 0] > 0
    assert edges[16:48, 15:17].any(axis=1).all() and edges[15:17, 16:48].any(axis=0).all()
    assert not edges[24:40, 24:40].any() and not edges[:8].any()


def test_algorithmic_preprocessors_run_and_weight_based_ones_name_their_file(tmp_path):
    image, folder = hint_image(), Annotators(tmp_path)
    for pre in preprocessors.PREPROCESSORS:
        if pre.run is None:
            with pytest.raises(api.InvalidParams, match=pre.annotator):
                preprocessors.run(pre, image, None, 64, -1, -1, 0, folder)
            continue
        out = preprocessors.run(pre, image, None, 64, -1, -1, 0, folder)
        assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] in (3, 4), pre.name
    gray = np.asarray(preprocessors.run(preprocessors.find("invert"), image, None, 64, -1, -1, 0, folder))
    assert gray[0, 0].tolist() == [0, 0, 0]
    assert preprocessors.find("invert (from white bg & black line)").name == "invert"
    shuffled = [preprocessors.shuffle(np.asarray(image), s) for s in (1, 1, 2)]
    assert np.array_equal(shuffled[0], shuffled[1]) and not np.array_equal(shuffled[0], shuffled[2])


def test_module_and_model_errors_name_the_thing(cn_app):
    ext = cn_app.plugins.manager.get_plugin("controlnet")
    with pytest.raises(api.InvalidParams, match="unknown module 'cany'"):
        control.plan_units([Unit(module="cany", model="cn-sd1")], ext.library)
    with pytest.raises(api.InvalidParams, match="model 'nope' not found"):
        control.plan_units([Unit(model="nope")], ext.library)
    planned = control.plan_units([Unit(model="cn-sdxl")], ext.library)
    with pytest.raises(api.InvalidParams, match="SDXL ControlNet, but the loaded checkpoint is SD1.5"):
        control.check_arch(planned, ext.library, "sd1")
    assert dataclasses.replace(planned[0].unit, weight=0).active is False


def test_sdxl_residuals_match_diffusers_controlnet(cn_app, cn_files, tiny_checkpoints, tmp_path):
    """SDXL: our residual path (pooled size and time ids through added_cond) against diffusers' ControlNetModel
    (from_single_file; its SDXL converter leaves label_emb out, so those four tensors are copied by name)."""
    from safetensors.torch import load_file as read

    from modules.sampling.denoisers import ModelDenoiser

    xl = make_app(tmp_path, extensions_dirs=())
    xl.engine.load_model(tiny_checkpoints["sdxl"])
    model = xl.engine.require_model()
    path = cn_files["sdxl"]
    ref = diffusers.ControlNetModel.from_single_file(str(path), config=str(path.parent / f"{path.stem}-config"),
                                                     local_files_only=True, torch_dtype=torch.float32)
    source = read(str(path))
    with torch.no_grad():
        for i, j in (("1", "0"), ("2", "2")):
            for kind in ("weight", "bias"):
                getattr(getattr(ref.add_embedding, f"linear_{i}"), kind).copy_(
                    source[f"control_model.label_emb.0.{j}.{kind}"].float())
    hint = torch.from_numpy(np.asarray(hint_image(), np.float32) / 255).permute(2, 0, 1)[None]

    def reference(call):
        down, mid = ref(call.model_in, call.timestep, encoder_hidden_states=call.cross_attn, controlnet_cond=hint.expand(
            call.x.shape[0], -1, -1, -1), added_cond_kwargs=dict(call.added_cond), return_dict=False)
        return api.UNetResiduals(down=tuple(down), mid=mid)

    ext = cn_app.plugins.manager.get_plugin("controlnet")
    planned = control.plan_units([Unit(image=hint_image(), model="cn-sdxl")], ext.library)
    context = api.DenoiserContext("txt2img", "first", None, 64, 64, (), (), 7.0, torch.linspace(10, 0, 5), arch="sdxl")
    control.check_arch(planned, ext.library, "sdxl")
    ours = control.Residuals(planned, control.prepare_hints(planned, {}, context, ext.annotators, 0), ext.library,
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

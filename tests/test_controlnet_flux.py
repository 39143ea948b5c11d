"""FLUX.1 ControlNets in the controlnet extension: InstantX (diffusers' FluxControlNetModel single file),
InstantX Union with a control mode per unit, and XLabs (its own BFL-style keys). Final latents against
diffusers' FluxControlNetPipeline on the same transformer, VAE, noise, sigmas and text states; weight 0 and
disabled units bit-identical to none; mismatched architectures named both ways, also as a 422 over HTTP."""
from __future__ import annotations

import shutil
from unittest import mock

import httpx
import pytest
import torch
from safetensors.torch import save_file

diffusers = pytest.importorskip("diffusers")

from extensions.controlnet import flux  # noqa: E402
from extensions.controlnet.models import read_controlnet  # noqa: E402
from modules.pipeline.params import Txt2ImgParams  # noqa: E402
from modules.plugins import api  # noqa: E402
from modules.sampling import flow  # noqa: E402
from modules.settings import REPO_ROOT  # noqa: E402
from tests.api_server import start_server  # noqa: E402
from tests.conftest import make_app  # noqa: E402
from tests.fixtures.make_tiny_controlnet import make_tiny_controlnet  # noqa: E402
from tests.fixtures.make_tiny_mmdit import make_all_in_one  # noqa: E402
from tests.stage_helpers import run_recorded  # noqa: E402
from tests.test_controlnet import hint_image  # noqa: E402
from tests.test_controlnet_api import b64  # noqa: E402

STEPS = 3
# the tiny FLUX.1-dev of tests/fixtures/make_tiny_mmdit.py: 32 wide, 2 heads of 16, T5 32, CLIP-L 32
TINY = dict(in_channels=64, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
            pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=[4, 6, 6])


def tiny_controlnet(seed: int, **config) -> torch.nn.Module:
    """A tiny diffusers FluxControlNetModel, every tensor random (the zero-initialised ones too)."""
    torch.manual_seed(seed)
    model = diffusers.FluxControlNetModel(**{**TINY, **config})
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * (p.shape[-1] ** -0.5 if p.ndim > 1 else 0.1))
    return model.eval()


# XLabs' names for the diffusers modules (x-flux's ControlNetFlux), written out independently of the loader
XLABS_TOP = {"x_embedder": "img_in", "context_embedder": "txt_in", "controlnet_x_embedder": "pos_embed_input",
             "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
             "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
             "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
             "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
             "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
             "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer"}
XLABS_BLOCK = {"norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin", "attn.to_out.0": "img_attn.proj",
               "attn.to_add_out": "txt_attn.proj", "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2",
               "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2"}
XLABS_NORMS = {"attn.norm_q": "img_attn.norm.query_norm", "attn.norm_k": "img_attn.norm.key_norm",
               "attn.norm_added_q": "txt_attn.norm.query_norm", "attn.norm_added_k": "txt_attn.norm.key_norm"}


def xlabs_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The XLabs file of a diffusers FluxControlNetModel with an input hint block (qkv fused, BFL names)."""
    sd, out = model.state_dict(), {}
    for i in range(len(model.transformer_blocks)):
        p, q = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        for leaf in ("weight", "bias"):
            out[f"{q}img_attn.qkv.{leaf}"] = torch.cat([sd[f"{p}attn.to_{n}.{leaf}"] for n in "qkv"])
            out[f"{q}txt_attn.qkv.{leaf}"] = torch.cat([sd[f"{p}attn.add_{n}_proj.{leaf}"] for n in "qkv"])
            out.update({f"{q}{x}.{leaf}": sd[f"{p}{d}.{leaf}"] for d, x in XLABS_BLOCK.items()})
        out.update({f"{q}{x}.scale": sd[f"{p}{d}.weight"] for d, x in XLABS_NORMS.items()})
        out.update({f"controlnet_blocks.{i}.{leaf}": sd[f"controlnet_blocks.{i}.{leaf}"] for leaf in ("weight", "bias")})
    hint = ["input_hint_block.conv_in", *(f"input_hint_block.blocks.{j}" for j in range(6)), "input_hint_block.conv_out"]
    for n, name in enumerate(hint):  # x-flux's nn.Sequential: convolutions at 0, 2, ..., 14 (SiLU between)
        out.update({f"input_hint_block.{2 * n}.{leaf}": sd[f"{name}.{leaf}"] for leaf in ("weight", "bias")})
    for d, x in XLABS_TOP.items():
        out.update({f"{x}.{leaf}": sd[f"{d}.{leaf}"] for leaf in ("weight", "bias")})
    assert len(out) == len(sd) - 8 * len(model.transformer_blocks)  # q, k, v fused into qkv twice per block
    return {k: v.contiguous() for k, v in out.items()}


def save(state: dict[str, torch.Tensor], path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))


@pytest.fixture(scope="module")
def references():
    return {"flux-instantx": tiny_controlnet(1, num_layers=1, num_single_layers=1),
            "flux-union": tiny_controlnet(2, num_layers=1, num_single_layers=2, num_mode=7),
            "flux-xlabs": tiny_controlnet(3, num_layers=2, num_single_layers=0, conditioning_embedding_channels=16,
                                          patch_size=2)}


@pytest.fixture(scope="module")
def flux_app(tmp_path_factory, references):
    tmp = tmp_path_factory.mktemp("cn-flux")
    cn_dir = tmp / "models" / "ControlNet"
    save(references["flux-instantx"].state_dict(), cn_dir / "flux-instantx.safetensors")
    save(references["flux-union"].state_dict(), cn_dir / "flux-union.safetensors")
    save(xlabs_state(references["flux-xlabs"]), cn_dir / "flux-xlabs.safetensors")
    make_tiny_controlnet("sd1", cn_dir / "cn-sd1.safetensors", seed=7)
    app = make_app(tmp, extensions_dirs=(REPO_ROOT / "extensions",))
    app.engine.load_model(make_all_in_one("flux-dev", tmp / "src" / "tiny-flux.safetensors"))
    return app


class CallProbe:
    """A plugin recording each pass's sigmas and the transformer calls (it adds nothing)."""

    def __init__(self) -> None:
        self.sigmas, self.calls = [], []

    @api.hookimpl
    def unet_residuals(self, context, params, job):
        self.sigmas.append(context.sigmas)
        return self.calls.append  # returns None: no residuals


def params(*units, **changes) -> Txt2ImgParams:
    base = dict(prompt="a fox", steps=STEPS, width=64, height=64, seed=3, sampler_name="Euler", cfg_scale=1.0,
                rng_source="cpu", save_images=False)
    if units:
        base["extension_args"] = {"controlnet": {"args": [{"image": hint_image(), "module": "none", **u}
                                                          for u in units]}}
    return Txt2ImgParams(**{**base, **changes})


def run(app, p):
    """(final latents, the probe's recorded calls and sigmas, the controlnet job state)."""
    probe = CallProbe()
    app.plugins.manager.register(probe, name="flux-probe")
    try:
        result, hooks = run_recorded(app.engine, p)
    finally:
        app.plugins.manager.unregister(probe)
    return hooks.values["sampling"][-1].latents, probe, hooks.inner.context.state.get("controlnet")


@pytest.fixture(scope="module")
def plain(flux_app):
    return run(flux_app, params())


def pipeline_latents(app, controlnet, probe, **kw) -> torch.Tensor:
    """diffusers' FluxControlNetPipeline on the app's transformer and VAE with the job's text states, first
    latents and sigmas. The hint's VAE latents are the distribution's mode, as Atelier encodes (not a sample)."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    model = app.engine.require_model()
    pipe = diffusers.FluxControlNetPipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=1.0), vae=model.vae, text_encoder=None,
        tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=model.unet, controlnet=controlnet)
    pipe.set_progress_bar_config(disable=True)
    first = probe.calls[0]
    with torch.no_grad(), mock.patch.object(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mode()):
        out = pipe(prompt_embeds=first.cross_attn, pooled_prompt_embeds=first.added_cond["pooled_projections"],
                   control_image=hint_image(), latents=flow.pack_latents(first.x), sigmas=probe.sigmas[0][:-1].tolist(),
                   num_inference_steps=STEPS, guidance_scale=3.5, height=64, width=64, output_type="latent",
                   control_guidance_start=0.0, control_guidance_end=1.0, **kw)
    return flow.unpack_latents(out.images, 8, 8)


# ---------------------------------------------------------------- files
def test_layouts_are_detected(flux_app):
    lib = flux_app.plugins.manager.get_plugin("controlnet").library
    got = {n: (read_controlnet(lib.find(n)).layout, read_controlnet(lib.find(n)).arch, read_controlnet(lib.find(n)).kind)
           for n in ("flux-instantx", "flux-union", "flux-xlabs")}
    assert got == {n: (n, "flux", "flux_controlnet") for n in got}
    xlabs = read_controlnet(lib.find("flux-xlabs"))
    assert flux.infer_config(xlabs.state)["conditioning_embedding_channels"] == 16
    assert flux.infer_config(read_controlnet(lib.find("flux-union")).state)["num_mode"] == 7



def test_xlabs_keys_convert_through_the_plugin_api_and_strays_are_named(references):
    """Every XLabs tensor lands on its diffusers module (q, k, v split back); a stray one is named."""
    model = references["flux-xlabs"]
    state = xlabs_state(model)
    out = flux.xlabs_to_diffusers(state)
    assert set(out) == set(model.state_dict())
    assert all(torch.equal(out[k], v) for k, v in model.state_dict().items())
    for stray in ("double_blocks.0.img_attn.extra.weight", "input_hint_block.x.weight", "lora_down.weight"):
        with pytest.raises(api.InvalidParams, match=rf"Unsupported XLabs FLUX.1 ControlNet.*{stray}"):
            flux.xlabs_to_diffusers({**state, stray: torch.zeros(1)})

def test_blocks_spread_as_diffusers_or_repeat_as_xlabs():
    samples = [torch.tensor(0), torch.tensor(1)]
    assert [int(t) for t in flux.spread(samples, 5, repeat=False)] == [0, 0, 0, 1, 1]  # ceil(5 / 2) = 3 per sample
    assert [int(t) for t in flux.spread(samples, 5, repeat=True)] == [0, 1, 0, 1, 0]


# ---------------------------------------------------------------- numerics
@pytest.mark.parametrize(("name", "unit", "kw"), [
    ("flux-instantx", {"weight": 0.6}, {"controlnet_conditioning_scale": 0.6}),
    ("flux-union", {"union_control_type": "Depth"}, {"control_mode": 2}),
    ("flux-xlabs", {"weight": 0.8}, {"controlnet_conditioning_scale": 0.8}),
])
def test_latents_match_diffusers_flux_controlnet_pipeline(flux_app, references, plain, name, unit, kw):
    ours, probe, state = run(flux_app, params({"model": name, **unit}))
    assert (ours - plain[0]).abs().mean() > 1e-3  # the ControlNet really changes the result
    assert [c.block_counts for c in probe.calls] == [(2, 2)] * STEPS
    expected = pipeline_latents(flux_app, references[name], probe, **kw)
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)
    assert state["passes"][0].calls == [(i, (0,)) for i in range(STEPS)]


def test_union_mode_matters_and_comes_from_the_unit(flux_app):
    by_module, _, state = run(flux_app, params({"model": "flux-union", "module": "canny"}))  # Canny: mode 0
    by_number, _, _ = run(flux_app, params({"model": "flux-union", "module": "canny", "union_control_type": "0"}))
    depth, _, _ = run(flux_app, params({"model": "flux-union", "module": "canny", "union_control_type": "Depth"}))
    assert state["passes"][0].units[0][1] == 0
    assert torch.equal(by_module, by_number) and (by_module - depth).abs().max() > 1e-4
    with pytest.raises(api.InvalidParams, match="'union_control_type': 'Unknown' does not pick a control mode"):
        run(flux_app, params({"model": "flux-union", "module": "shuffle"}))


@pytest.mark.parametrize("units", [({"model": "flux-instantx", "weight": 0.0},),
                                   ({"model": "flux-xlabs", "enabled": False}, {"model": "flux-union", "weight": 0})])
def test_weight_zero_or_disabled_is_bit_identical(flux_app, plain, units):
    got, probe, _ = run(flux_app, params(*units))
    assert torch.equal(got, plain[0])


def test_two_units_and_the_guidance_window(flux_app, plain):
    both, _, state = run(flux_app, params({"model": "flux-instantx"}, {"model": "flux-xlabs", "guidance_end": 0.3}))
    assert state["passes"][0].calls == [(0, (0, 1)), (1, (0,)), (2, (0,))]
    alone, _, _ = run(flux_app, params({"model": "flux-instantx"}))
    assert (both - alone).abs().max() > 1e-5


# ---------------------------------------------------------------- the hook on FLUX.1 (plugin API 1.9)
class BlockProbe:
    """A plugin adding `value` to the image tokens after every double block (`counts` tensors)."""

    def __init__(self, value: float, counts: int = 2) -> None:
        self.value, self.counts = value, counts

    @api.hookimpl
    def unet_residuals(self, context, params, job):
        assert context.encode is not None and context.arch == "flux-dev"

        def residuals(call):
            rows, tokens = call.model_in.shape[:2]
            return api.UNetResiduals(blocks=tuple(torch.full((rows, tokens, 32), self.value)
                                                  for _ in range(self.counts)))
        return residuals


def test_hook_unet_residuals_on_flux_blocks(flux_app, plain):
    for probe, changes in ((BlockProbe(0.0), False), (BlockProbe(0.2), True), (BlockProbe(0.2, 1), None)):
        flux_app.plugins.manager.register(probe, name="block-probe")
        try:
            if changes is None:
                with pytest.raises(api.AtelierError, match=r"returned 1 tensors in UNetResiduals.blocks; this FLUX.1 "
                                                           r"transformer has 2"):
                    run(flux_app, params())
                continue
            got = run(flux_app, params())[0]
        finally:
            flux_app.plugins.manager.unregister(probe)
        assert torch.equal(got, plain[0]) != changes


# ---------------------------------------------------------------- mismatches
def test_an_sd15_controlnet_on_flux_names_both(flux_app):
    with pytest.raises(api.InvalidParams, match="is a SD1.5 ControlNet, but the loaded checkpoint is FLUX.1-dev: "
                                                "use a FLUX.1 ControlNet"):
        run(flux_app, params({"model": "cn-sd1"}))
    assert run(flux_app, params())[0].shape == (1, 16, 8, 8)  # the model still works


@pytest.fixture(scope="module")
def http(tmp_path_factory, tiny_checkpoints, references):
    tmp = tmp_path_factory.mktemp("cn-flux-api")
    cn_dir = tmp / "models" / "ControlNet"
    save(references["flux-instantx"].state_dict(), cn_dir / "flux-instantx.safetensors")
    make_tiny_controlnet("sd1", cn_dir / "cn-sd1.safetensors", seed=7)
    flux_file = make_all_in_one("flux-dev", tmp / "src" / "tiny-flux.safetensors")
    sdxl = tmp / "src" / "tiny-sdxl.safetensors"
    shutil.copy(tiny_checkpoints["sdxl"], sdxl)
    server = start_server(tmp, {"tiny-flux": flux_file, "tiny-sdxl": sdxl})
    with httpx.Client(base_url=server.url, timeout=600) as client:
        yield client
    server.stop()


def _payload(model: str, checkpoint: str) -> dict:
    unit = {"input_image": b64(hint_image()), "module": "none", "model": model}
    return {"prompt": "a fox", "steps": 2, "width": 64, "height": 64, "seed": 5, "sampler_name": "Euler",
            "cfg_scale": 1, "alwayson_scripts": {"controlnet": {"args": [unit]}},
            "override_settings": {"sd_model_checkpoint": checkpoint}}


def test_mismatches_are_422_naming_both_over_the_api(http):
    ok = http.post("/sdapi/v1/txt2img", json=_payload("flux-instantx", "tiny-flux"))
    assert ok.status_code == 200, ok.text
    wrong = http.post("/sdapi/v1/txt2img", json=_payload("cn-sd1", "tiny-flux"))
    assert wrong.status_code == 422
    assert "is a SD1.5 ControlNet, but the loaded checkpoint is FLUX.1-dev" in wrong.text
    other = http.post("/sdapi/v1/txt2img", json=_payload("flux-instantx", "tiny-sdxl"))
    assert other.status_code == 422
    assert "is a FLUX.1 ControlNet, but the loaded checkpoint is SDXL" in other.text

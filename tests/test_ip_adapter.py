"""IP-Adapters in the controlnet extension, on the `unet_cross_attention` hook: latents against
diffusers' load_ip_adapter path (base and plus), the .bin layout, units, and the errors (no encoder
in models/clip_vision, wrong preprocessor, an adapter for another architecture)."""
from __future__ import annotations

import shutil

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from extensions.controlnet.models import read_controlnet  # noqa: E402
from modules.plugins import api  # noqa: E402
from modules.sampling.rng import randn  # noqa: E402
from modules.settings import REPO_ROOT  # noqa: E402
from tests.conftest import make_app  # noqa: E402
from tests.fixtures.make_tiny_ip_adapter import save_ip_adapter, tiny_clip_vision, tiny_ip_adapter  # noqa: E402
from tests.test_controlnet import SEED, STEPS, hint_image, latents, params  # noqa: E402

WEIGHT = 0.7


@pytest.fixture(scope="module")
def ip_app(tmp_path_factory, tiny_checkpoints):
    tmp = tmp_path_factory.mktemp("ip-app")
    app = make_app(tmp, extensions_dirs=(REPO_ROOT / "extensions",))
    app.engine.load_model(tiny_checkpoints["sd1"])
    unet = app.engine.require_model().unet
    folder = tmp / "models" / "ControlNet"
    for plus in (False, True):
        name = "ip-adapter-plus_sd15" if plus else "ip-adapter_sd15"
        parts = tiny_ip_adapter(unet, plus, seed=3)
        save_ip_adapter(parts, folder / f"{name}.safetensors")
        save_ip_adapter(parts, tmp / "bin" / f"{name}.bin")
    tiny_clip_vision(tmp / "models" / "clip_vision" / "clip_h", seed=2)
    xl = make_app(tmp / "xl", extensions_dirs=())
    xl.engine.load_model(tiny_checkpoints["sdxl"])
    save_ip_adapter(tiny_ip_adapter(xl.engine.require_model().unet, False), folder / "ip-adapter_sdxl.safetensors")
    app.tmp = tmp
    return app


def units(model: str, module: str = "ip-adapter_clip_sd15", **changes) -> dict:
    return {"controlnet": {"args": [{"image": hint_image().rotate(30), "module": module, "model": model,
                                     "weight": WEIGHT, **changes}]}}


def diffusers_latents(tmp_path, checkpoint, ip_folder, weight_name):
    """diffusers' StableDiffusionPipeline with load_ip_adapter (local folder, no hub) on a separate UNet."""
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    ref_app = make_app(tmp_path, extensions_dirs=())
    ref_app.engine.load_model(checkpoint)
    model = ref_app.engine.require_model()
    encoder = CLIPVisionModelWithProjection.from_pretrained(str(ip_folder.parent / "clip_vision" / "clip_h"),
                                                            local_files_only=True)
    scheduler = diffusers.EulerDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                                 beta_schedule="scaled_linear", timestep_spacing="linspace")
    pipe = diffusers.StableDiffusionPipeline(
        vae=model.vae, text_encoder=model.text_encoders[0], tokenizer=ref_app.engine.tokenizer(), unet=model.unet,
        scheduler=scheduler, safety_checker=None, requires_safety_checker=False, image_encoder=encoder,
        feature_extractor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}))
    pipe.load_ip_adapter(str(ip_folder), subfolder="", weight_name=weight_name, image_encoder_folder=None,
                         local_files_only=True)
    pipe.set_ip_adapter_scale(WEIGHT)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        return pipe(prompt="a red circle", negative_prompt="green", ip_adapter_image=hint_image().rotate(30),
                    num_inference_steps=STEPS, guidance_scale=7.0, latents=randn(SEED, (4, 8, 8), "cpu")[None],
                    height=64, width=64, output_type="latent").images


@pytest.mark.parametrize("name", ["ip-adapter_sd15", "ip-adapter-plus_sd15"])
def test_latents_match_diffusers_load_ip_adapter(ip_app, tiny_checkpoints, tmp_path, name):
    expected = diffusers_latents(tmp_path, tiny_checkpoints["sd1"], ip_app.tmp / "models" / "ControlNet",
                                 f"{name}.safetensors")
    plain, _, _ = latents(ip_app, params())
    ours, state, result = latents(ip_app, params(extension_args=units(name)))
    assert (ours - plain).abs().mean() > 0.05  # the image prompt really changes the result
    torch.testing.assert_close(ours, expected, atol=2e-4, rtol=2e-4)
    assert state["preprocess_calls"] == [0]
    assert f'ControlNet 0: "Module: ip-adapter_clip_sd15, Model: {name}, Weight: 0.7' in result.infotexts[0]


def test_bin_layout_reads_the_same_tensors(ip_app):
    for name in ("ip-adapter_sd15", "ip-adapter-plus_sd15"):
        a = read_controlnet(ip_app.tmp / "models" / "ControlNet" / f"{name}.safetensors")
        b = read_controlnet(ip_app.tmp / "bin" / f"{name}.bin")
        assert (a.kind, a.layout, b.layout) == ("ip_adapter", "ip-adapter", "ip-adapter")
        assert set(a.state) == set(b.state) and all(torch.equal(a.state[k], b.state[k]) for k in a.state)


def test_weight_zero_is_bit_identical_and_processors_are_restored(ip_app):
    unet = ip_app.engine.require_model().unet
    before = {k: type(v) for k, v in unet.attn_processors.items()}
    plain, _, _ = latents(ip_app, params())
    off, _, _ = latents(ip_app, params(extension_args=units("ip-adapter_sd15", weight=0)))
    assert torch.equal(plain, off)
    _, state, _ = latents(ip_app, params(extension_args=units("ip-adapter_sd15", guidance_end=0.5)))
    assert {k: type(v) for k, v in unet.attn_processors.items()} == before
    assert len(state["ip_passes"]) == 1


@pytest.mark.parametrize(("changes", "words"), [
    ({"module": "none"}, "needs an IP-Adapter preprocessor"),
    ({"module": "ip-adapter_clip_sdxl"}, "needs the CLIP ViT-bigG image encoder in"),
    ({"model": "ip-adapter_sdxl"}, "is a 64-wide IP-Adapter, but the loaded checkpoint is SD1.5 (32-wide"),
])
def test_errors_name_the_thing(ip_app, changes, words):
    args = units(changes.pop("model", "ip-adapter_sd15"), **changes)
    with pytest.raises(api.InvalidParams, match=None) as err:
        latents(ip_app, params(extension_args=args))
    assert words in str(err.value)
    if "clip_vision" in words or "ViT-bigG" in words:
        assert str(ip_app.tmp / "models" / "clip_vision") in str(err.value)
    plain, _, _ = latents(ip_app, params())  # the model keeps working
    assert torch.isfinite(plain).all()


def test_a_single_file_encoder_loads_like_its_folder(ip_app, tmp_path):
    from extensions.controlnet import ip_adapter

    folder = ip_app.tmp / "models" / "clip_vision" / "clip_h"
    shutil.copy(folder / "model.safetensors", tmp_path / "clip_h.safetensors")
    path = ip_adapter.find_encoder("ip-adapter_clip_sd15", tmp_path)
    inferred = ip_adapter.load_encoder(path, torch.device("cpu"), torch.float32).config
    assert (inferred.image_size, inferred.patch_size, inferred.num_hidden_layers, inferred.projection_dim,
            inferred.intermediate_size) == (32, 8, 2, 24, 48)
    shutil.copy(folder / "config.json", tmp_path / "clip_h.json")  # the heads are not in the tensors: a sidecar
    one = ip_adapter.load_encoder(path, torch.device("cpu"), torch.float32)
    two = ip_adapter.load_encoder(folder, torch.device("cpu"), torch.float32)
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = one(pixels), two(pixels)
    assert torch.equal(a.image_embeds, b.image_embeds)


# ---------------------------------------------------------------- the hook
class AttentionProbe:
    """A plugin adding a constant to every cross-attention output, recording the layers it saw."""

    def __init__(self, value: float | None) -> None:
        self.value, self.layers = value, []

    @api.hookimpl
    def unet_cross_attention(self, context, params, job):
        if self.value is None:
            return None

        def attention(call):
            self.layers.append((call.index, call.name))
            q = call.query
            return torch.full((q.shape[0], q.shape[2], call.heads * q.shape[3]), self.value)

        return attention


def test_hook_unet_cross_attention(ip_app):
    plain, _, _ = latents(ip_app, params())
    for value, changes in ((None, False), (0.3, True)):
        probe = AttentionProbe(value)
        ip_app.plugins.manager.register(probe, name=f"attn-probe-{value}")
        try:
            got, _, _ = latents(ip_app, params())
        finally:
            ip_app.plugins.manager.unregister(probe)
        assert torch.equal(got, plain) != changes
    names = dict(probe.layers)
    unet = ip_app.engine.require_model().unet
    expected = {i: n.removesuffix(".processor") for i, n in enumerate(unet.attn_processors) if "attn2" in n}
    assert names == expected

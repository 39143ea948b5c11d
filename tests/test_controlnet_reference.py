"""Reference-only ControlNet units (reference_only, reference_adain, reference_adain+attn) on the
`unet_hidden_states` hook: bit-identity when off, injection, style fidelity, the guidance window,
the hook itself (taps, reference inputs, `attend` against attention computed from the layer's
weights), and the API and infotext over HTTP."""
from __future__ import annotations

import base64
import io

import httpx
import pytest
import torch
from PIL import Image

pytest.importorskip("diffusers")

from modules.plugins import api  # noqa: E402
from modules.settings import REPO_ROOT  # noqa: E402
from tests.api_server import start_server  # noqa: E402
from tests.conftest import make_app  # noqa: E402
from tests.stage_helpers import run_recorded  # noqa: E402
from tests.test_controlnet import params  # noqa: E402


def reference_image() -> Image.Image:
    image = Image.new("RGB", (64, 64), (30, 60, 200))
    image.paste((250, 220, 10), (8, 8, 40, 56))
    return image


@pytest.fixture(scope="module")
def ref_app(tmp_path_factory, tiny_checkpoints):
    app = make_app(tmp_path_factory.mktemp("ref-app"), extensions_dirs=(REPO_ROOT / "extensions",))
    assert app.plugins.extension("controlnet").status == "loaded"
    app.engine.load_model(tiny_checkpoints["sd1"])
    return app


def unit(**fields) -> dict:
    return {"controlnet": {"args": [{"image": reference_image(), "module": "reference_only", "model": "None",
                                     **fields}]}}


def run(app, p):
    result, hooks = run_recorded(app.engine, p)
    return hooks.values["sampling"][-1].latents, hooks.inner.context.state.get("controlnet"), result


@pytest.fixture(scope="module")
def plain(ref_app):
    return run(ref_app, params())[0]


@pytest.mark.parametrize("fields", [{"weight": 0.0}, {"enabled": False}])
def test_off_is_bit_identical(ref_app, plain, fields):
    got, state, _ = run(ref_app, params(extension_args=unit(**fields)))
    assert torch.equal(got, plain)
    assert not (state or {}).get("reference_passes")


@pytest.mark.parametrize("module", ["reference_only", "reference_adain", "reference_adain+attn"])
def test_reference_changes_the_image(ref_app, plain, module):
    got, state, result = run(ref_app, params(extension_args=unit(module=module)))
    assert not torch.allclose(got, plain, atol=1e-4)
    patch = state["reference_passes"][0]
    kinds = {kind for _, kind, _ in patch.injected}
    assert kinds == {"reference_only": {"self_attention"}, "reference_adain": {"block"},
                     "reference_adain+attn": {"self_attention", "block"}}[module]
    assert f'Module: {module}, Model: None, Weight: 1' in result.infotexts[0]


def test_style_fidelity_changes_the_result(ref_app):
    zero, _, _ = run(ref_app, params(extension_args=unit(threshold_a=0.0)))
    one, _, _ = run(ref_app, params(extension_args=unit(threshold_a=1.0)))
    assert not torch.allclose(zero, one, atol=1e-5)


def test_control_modes_set_the_fidelity(ref_app):
    fid = {}
    for mode, fidelity in ((0, 0.3), (1, 0.3), (2, 0.3)):
        _, state, _ = run(ref_app, params(extension_args=unit(control_mode=mode, threshold_a=fidelity)))
        fid[mode] = state["reference_passes"][0].fidelity[0]
    assert fid == {0: 0.3, 1: 0.0, 2: 1.0}


def test_guidance_end_stops_injection_at_its_step(ref_app):
    _, state, _ = run(ref_app, params(extension_args=unit(guidance_end=0.5)))
    patch = state["reference_passes"][0]
    used = {step: units for step, units in patch.calls}
    assert used == {0: (0,), 1: (0,), 2: (0,), 3: ()}  # step 3 of 4: 0.75 > 0.5
    assert {step for step, _, _ in patch.injected} == {0, 1, 2}


def test_weight_selects_the_widest_layers(ref_app):
    _, state, _ = run(ref_app, params(extension_args=unit(weight=0.5), steps=1))
    patch = state["reference_passes"][0]
    widths = patch.widths
    injected = {index for _, _, index in patch.injected}
    assert injected and len(injected) < len(widths)
    assert min(widths[i] for i in injected) >= max(widths[i] for i in widths if i not in injected)


# ---------------------------------------------------------------- the hook
class HiddenStatesProbe:
    """Records the taps; with `reference`, asks for one reference input and checks `attend` numerically."""

    def __init__(self, reference: bool, replace_blocks: bool = False) -> None:
        self.reference, self.replace_blocks, self.seen, self.checked = reference, replace_blocks, [], 0
        self.active = False

    @api.hookimpl
    def unet_hidden_states(self, context, params, job):
        if not self.active:
            return None
        refs = (lambda call: [torch.zeros_like(call.model_in)]) if self.reference else None
        return api.HiddenStatesPatch(self.function, refs)

    def function(self, call):
        self.seen.append((call.reference, call.kind, call.name, call.index))
        if call.kind == "self_attention" and self.checked < 2:
            self.checked += 1
            h = call.hidden_states
            ctx = torch.cat([h, h.flip(0)], dim=1)
            assert torch.allclose(call.attend(h, ctx), manual_attention(self.layer(call.name), h, ctx), atol=1e-5)
        if self.replace_blocks and call.kind == "block" and call.reference is None:
            return call.hidden_states * 1.01
        return None


def manual_attention(attn, h, ctx):
    """Multi-head attention from the layer's weights: softmax(q k^T / sqrt(d)) v, then the output projection."""
    q, k, v = attn.to_q(h), attn.to_k(ctx), attn.to_v(ctx)
    heads = attn.heads
    split = [t.view(t.shape[0], t.shape[1], heads, -1).transpose(1, 2) for t in (q, k, v)]
    weights = (split[0] @ split[1].transpose(-1, -2) / split[0].shape[-1] ** 0.5).softmax(-1)
    out = (weights @ split[2]).transpose(1, 2).flatten(2)
    return attn.to_out[0](out)


def test_hook_unet_hidden_states(ref_app, plain):
    unet = ref_app.engine.require_model().unet
    probe = HiddenStatesProbe(reference=True)
    probe.layer = lambda name: unet.get_submodule(name)
    ref_app.plugins.manager.register(probe, name="hidden-probe")
    try:
        before = run(ref_app, params(steps=1))[0]
        probe.active = True
        got, _, _ = run(ref_app, params(steps=1))
        assert torch.equal(got, before)  # taps answering None change nothing
        first = [s for s in probe.seen if s[0] == 0]
        main = [s for s in probe.seen if s[0] is None]
        assert first and main and probe.seen.index(first[-1]) < probe.seen.index(main[0])
        attn1 = [n.removesuffix(".processor") for n in unet.attn_processors if n.endswith("attn1.processor")]
        names = [name for ref, kind, name, _ in main if kind == "self_attention"]
        assert sorted(set(names)) == sorted(attn1) and probe.checked == 2
        blocks = [name for ref, kind, name, _ in main if kind == "block"]
        assert blocks[0] == "input_blocks.1" and "middle_block" in blocks and blocks[-1].startswith("output_blocks.")
        probe.replace_blocks = True
        changed, _, _ = run(ref_app, params(steps=1))
        assert not torch.allclose(changed, got, atol=1e-5)
    finally:
        ref_app.plugins.manager.unregister(probe)
    assert torch.equal(run(ref_app, params())[0], plain)  # nothing outlives the job


def test_hook_returning_the_wrong_type_fails_the_job(ref_app):
    class Wrong:
        @api.hookimpl
        def unet_hidden_states(self, context, params, job):
            return lambda call: None

    wrong = Wrong()
    ref_app.plugins.manager.register(wrong, name="hidden-wrong")
    try:
        with pytest.raises(Exception, match="expected HiddenStatesPatch"):
            run(ref_app, params(steps=1))
    finally:
        ref_app.plugins.manager.unregister(wrong)


# ---------------------------------------------------------------- over HTTP
def b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture(scope="module")
def http(tmp_path_factory, tiny_checkpoints):
    srv = start_server(tmp_path_factory.mktemp("ref-api"), {"tiny-sd1": tiny_checkpoints["sd1"]})
    with httpx.Client(base_url=srv.url, timeout=600) as client:
        yield client
    srv.stop()


def test_api_accepts_a_reference_unit_without_a_model(http):
    body = {"prompt": "a red circle", "negative_prompt": "green", "steps": 3, "width": 64, "height": 64, "seed": 5,
            "sampler_name": "Euler", "cfg_scale": 7}
    plain = http.post("/sdapi/v1/txt2img", json=body)
    assert plain.status_code == 200
    unit = {"module": "reference_adain+attn", "model": "None", "image": b64(reference_image()), "threshold_a": 0.7}
    r = http.post("/sdapi/v1/txt2img", json={**body, "alwayson_scripts": {"controlnet": {"args": [unit]}}})
    assert r.status_code == 200, r.text
    info = r.json()["info"]
    assert 'ControlNet 0: \\"Module: reference_adain+attn, Model: None, Weight: 1' in info
    assert "Threshold A: 0.7" in info
    assert r.json()["images"][0] != plain.json()["images"][0]
    modules = http.get("/controlnet/module_list").json()["module_list"]
    assert {"reference_only", "reference_adain", "reference_adain+attn"} <= set(modules)
    reference = http.get("/controlnet/control_types").json()["control_types"]["Reference"]
    assert (reference["default_option"], reference["model_list"], reference["default_model"]) == \
        ("reference_only", ["None"], "None")


def test_paste_restores_units_and_leaves_out_what_is_not_here(tmp_path):
    from extensions.controlnet import ControlNetExtension
    from extensions.controlnet.ui import pasted_units
    from modules.settings import Settings

    ext = ControlNetExtension(Settings(models_dir=tmp_path / "models"))
    fields = {"ControlNet 1": "Module: reference_only, Model: None, Weight: 0.7, Resize Mode: Just Resize, "
                              "Processor Res: -1, Threshold A: 0.25, Threshold B: -1.0, Guidance Start: 0.0, "
                              "Guidance End: 0.5, Pixel Perfect: False, Control Mode: Balanced",
              "ControlNet 2": "Module: canny, Model: not-installed [12345678], Weight: 1"}
    values = pasted_units(ext, fields)
    assert values["u0_enabled"] is False and values["u1_enabled"] is True and values["u2_enabled"] is True
    assert (values["u1_module"], values["u1_model"], values["u1_weight"], values["u1_threshold_a"],
            values["u1_guidance_end"], values["u1_resize_mode"]) == ("reference_only", "None", 0.7, 0.25, 0.5,
                                                                      "Just Resize")
    assert "u1_processor_res" not in values  # -1: no resolution slider value to restore
    assert values["u2_module"] == "canny" and "u2_model" not in values  # not in models/ControlNet

"""One test per hook (the meta-tests require `test_hook_<name>`), through real plugins:
built-ins, the bundled extensions and the fixture pack. No checkpoint is needed here;
tests/test_extensions_jobs.py runs the job-time hooks end to end."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from modules.pipeline.params import Txt2ImgParams
from modules.plugins import api, jobhooks
from modules.plugins.context import JobContext
from modules.plugins.host import PluginHost
from modules.plugins.manager import build_plugin_manager, build_registries
from modules.plugins.ui import sections_for_tab, ui_tabs
from modules.sampling.denoisers import CFGDenoiser, Cond
from modules.server.extension_routes import routes_for_extensions
from modules.styles import apply_styles, load_styles_csv, merge_prompt
from tests.plugin_helpers import ext_app


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    return ext_app(tmp_path_factory.mktemp("hooks"))


def gaussian_denoiser(mu=0.5, s=0.8):
    """The optimal denoiser for x0 ~ N(mu, s^2): D(x; sigma) = (s^2 x + sigma^2 mu) / (s^2 + sigma^2)."""
    def model(x, sigma):
        sig = sigma.reshape(-1, *([1] * (x.ndim - 1)))
        return (s**2 * x + sig**2 * mu) / (s**2 + sig**2)
    return model


def test_hook_register_samplers(app):
    spec = app.registries.samplers.get("euler_cfg_pp")
    assert spec.name == "Euler CFG++" and "Euler CFG++" in app.registries.samplers.names()
    sigmas = torch.linspace(10, 0.05, 30).tolist() + [0.0]
    sigmas = torch.tensor(sigmas)
    x = torch.randn(2, 3) * 10
    euler = app.registries.samplers.get("Euler").function(gaussian_denoiser(), x, sigmas)
    cfgpp = spec.function(gaussian_denoiser(), x, sigmas)  # no guidance(): exactly Euler
    assert torch.allclose(euler, cfgpp, atol=1e-5)

    class Guided:  # cond and uncond are two Gaussian denoisers; `last_uncond` as CFGDenoiser offers it
        last_uncond = None

        def __call__(self, x, sigma):
            cond, self.last_uncond = gaussian_denoiser(0.5)(x, sigma), gaussian_denoiser(-0.5)(x, sigma)
            return self.last_uncond + 1.5 * (cond - self.last_uncond)

    x1 = spec.function(Guided(), x, sigmas[:2])  # one step: denoised + sigma_next * (x - uncond) / sigma
    guided = Guided()
    denoised = guided(x, x.new_full((2,), float(sigmas[0])))
    expected = denoised + (x - guided.last_uncond) / sigmas[0] * sigmas[1]
    assert torch.allclose(x1, expected, atol=1e-6)


def test_hook_register_schedulers(app):
    spec = app.registries.schedulers.get("Linear sigma")
    ctx = api.ScheduleContext(0.03, 14.6, torch.linspace(0.03, 14.6, 1000))
    sigmas = spec.function(8, ctx)
    assert len(sigmas) == 9 and sigmas[-1] == 0 and bool((sigmas[:-1] > sigmas[1:]).all())
    assert app.registries.samplers.get("Fixture Euler").default_scheduler == "linear_sigma"


def test_hook_register_styles(app, tmp_path):
    assert {"Cinematic", "Fixture wrap"} <= set(app.registries.styles.names())
    assert app.registries.styles.get("cinematic").source == "style-pack"
    assert merge_prompt("{prompt}, noir", "a cat") == "a cat, noir"
    assert merge_prompt("noir", " a cat ") == "a cat, noir" and merge_prompt("noir", "") == "noir"
    assert apply_styles("a cat", "", [api.StyleSpec("x", "{prompt}!", "bad")]) == ("a cat!", "bad")
    csv = tmp_path / "styles.csv"
    csv.write_text('\ufeffname,text,negative_prompt\nOld,"old, {prompt}",\n#x,y,\n', encoding="utf-8")
    assert load_styles_csv(csv) == [api.StyleSpec("Old", "old, {prompt}", "", "styles.csv")]


def test_hook_register_postprocessors(app):
    spec = app.registries.postprocessors.get("film-grain")
    assert spec.label == "Film grain" and [o.name for o in spec.options] == ["strength", "size", "monochrome"]
    grain = app.plugins.manager.get_plugin("film-grain")
    image = Image.new("RGB", (32, 24), (128, 100, 90))
    a, b = grain.add_grain(image, 7, 0.2, 2), grain.add_grain(image, 7, 0.2, 2)
    assert a.size == image.size and np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(grain.add_grain(image, 8, 0.2, 2)))
    assert np.array_equal(np.asarray(grain.add_grain(image, 7, 0.0)), np.asarray(image))
    orders = [s.order for s in app.registries.postprocessors]
    assert orders == sorted(orders)


def test_hook_register_upscalers():
    class Plugin:
        @api.hookimpl
        def register_upscalers(self):
            return [api.UpscalerSpec("Box", function=lambda im, s: im.resize(
                (round(im.width * s), round(im.height * s)), Image.Resampling.BOX))]

    registries = build_registries(build_plugin_manager([Plugin()]))
    assert registries.upscalers.names()[-1] == "Box" and "Latent" in registries.upscalers
    assert registries.upscalers.get("box").function(Image.new("RGB", (8, 8)), 2).size == (16, 16)


def test_hook_prepare_params(app):
    context = JobContext(app.settings, app.registries)
    params = Txt2ImgParams(prompt="a __colors__ order-test", styles=("Fixture wrap",), seed=11)
    out = jobhooks.prepare_params(app.plugins, params, context)
    assert out.prompt.startswith("[a ") and out.prompt.endswith("] wrapped b c a")
    assert "__colors__" not in out.prompt and out.styles == ()
    again = jobhooks.prepare_params(app.plugins, params, JobContext(app.settings, app.registries))
    assert again.prompt == out.prompt  # the seed decides the wildcard
    resolved = jobhooks.prepare_params(app.plugins, dataclasses.replace(params, seed=-1), context)
    assert 0 <= resolved.seed < 2**32 and resolved.subseed >= 0
    assert any("prepare exploded" in w for w in context.warnings)  # raising-hook: a warning, not a failure


def test_hook_cfg_denoiser():
    class Double:
        @api.hookimpl
        def cfg_denoiser(self, step):
            return step.denoised * 2

    class Inner:
        def __call__(self, x, sigma, cross_attn, pooled=None, concat=None):
            return x * cross_attn.mean()

    host = PluginHost(build_plugin_manager([Double()]))
    context = JobContext(None, None)
    hook = jobhooks.guidance_hook(host, Txt2ImgParams(), context)
    conds = [[([(10, Cond(torch.ones(1, 2, 3)))], 1.0)]]
    unconds = [[(10, Cond(torch.zeros(1, 2, 3)))]]
    plain = CFGDenoiser(Inner(), conds, unconds, 5.0)
    hooked = CFGDenoiser(Inner(), conds, unconds, 5.0, on_guided=hook)
    x, sigma = torch.randn(1, 4, 2, 2), torch.ones(1)
    assert torch.allclose(hooked(x, sigma), 2 * plain(x, sigma))
    assert jobhooks.guidance_hook(PluginHost(build_plugin_manager()), Txt2ImgParams(), context) is None


def test_hook_on_image_saved(app, tmp_path):
    web = app.plugins.manager.get_plugin("web-ext")
    context = JobContext(app.settings, app.registries)
    jobhooks.image_saved(app.plugins, tmp_path / "x.png", Txt2ImgParams(), "infotext", context)
    assert web.SAVED[-1] == (tmp_path / "x.png", "infotext")
    assert any("saved hook exploded" in w for w in context.warnings)


def test_hook_on_app_started(app):
    assert app.plugins.manager.get_plugin("web-ext").STARTED == [app]


def test_hook_register_ui_sections(app):
    txt = {s.name: s for s in sections_for_tab(app.plugins, app.registries, "txt2img")}
    img = {s.name for s in sections_for_tab(app.plugins, app.registries, "img2img")}
    assert txt["web-ext"].options[0].name == "level" and "web-ext" not in img
    assert [o.name for o in txt["film-grain"].options][0] == "enabled" and "film-grain" in img
    fields = jobhooks.extension_infotext(app.plugins, app.registries, Txt2ImgParams(extension_args={"web-ext": {}}))
    assert fields == {"Web extension Level": 3}  # defaults are recorded too


def test_hook_register_ui_tabs(app):
    tabs = ui_tabs(app.plugins)
    assert [t.name for t in tabs] == ["web-ext-tab"] and tabs[0].build(None) is None


def test_hook_register_api_routes(app):
    mounted = dict(routes_for_extensions(app.plugins))
    assert {"web-ext", "evil-routes"} <= set(mounted)
    assert [r.path for r in mounted["web-ext"].routes] == ["/hello"]
    assert [r.path for r in mounted["evil-routes"].routes] == ["/ok"]

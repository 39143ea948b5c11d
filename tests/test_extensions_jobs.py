"""Extensions inside jobs, end to end on a tiny SD1 checkpoint: samplers, styles, wildcards,
post-processors, the guidance hook, on_image_saved, and the failure rule."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from modules import infotext
from modules.errors import InvalidParams
from modules.pipeline.params import Txt2ImgParams
from modules.plugins import jobhooks
from modules.plugins.extensions import ExtensionError
from tests.plugin_helpers import ext_app


@pytest.fixture(scope="module")
def app(tmp_path_factory, tiny_sd1):
    tmp = tmp_path_factory.mktemp("ext-jobs")
    (tmp / "styles.csv").write_text('name,prompt,negative_prompt\n"Csv style","{prompt}, from csv",csvneg\n'
                                    '# divider,,\n', encoding="utf-8")
    app = ext_app(tmp, extensions_allow=("film-grain", "style-pack", "wildcards",
                                         "fixture-sampler", "cfg-probe", "web-ext", "order-a"))
    app.engine.load_model(tiny_sd1)
    return app


def run(app, **kw):
    base = dict(prompt="a red circle", negative_prompt="blue", steps=3, sampler_name="Euler", width=64, height=64,
                seed=42, rng_source="cpu", save_images=False)
    return app.engine.txt2img(Txt2ImgParams(**{**base, **kw}))


def pixels(result, i=0):
    return np.asarray(result.images[i], dtype=np.int16)


def test_extension_sampler_end_to_end(app):
    assert "Fixture Euler" in app.registries.samplers.names()
    result = run(app, sampler_name="fixture_euler")  # by alias
    fields = infotext.parse(result.infotexts[0])
    assert fields["Sampler"] == "Fixture Euler" and fields["Schedule type"] == "Linear sigma"
    assert pixels(result).std() > 0
    again = run(app, sampler_name="Fixture Euler", scheduler="Linear sigma")
    assert np.array_equal(pixels(result), pixels(again))
    assert not np.array_equal(pixels(result), pixels(run(app, sampler_name="Euler")))


def test_euler_cfg_pp_runs_and_differs_from_euler(app):
    cfgpp = run(app, sampler_name="Euler CFG++", cfg_scale=1.5)
    assert infotext.parse(cfgpp.infotexts[0])["Sampler"] == "Euler CFG++"
    assert not np.array_equal(pixels(cfgpp), pixels(run(app, sampler_name="Euler", cfg_scale=1.5)))
    # At CFG scale 1 the uncond is skipped, so CFG++ is plain Euler.
    euler = run(app, sampler_name="Euler", cfg_scale=1.0)
    assert np.abs(pixels(run(app, sampler_name="Euler CFG++", cfg_scale=1.0)) - pixels(euler)).max() <= 1


def test_styles_from_csv_yaml_and_extensions(app):
    names = app.registries.styles.names()
    assert {"Csv style", "Cinematic", "Fixture wrap"} <= set(names) and "# divider" not in names
    result = run(app, styles=("Csv style", "Fixture wrap"))
    assert result.prompts[0] == "[a red circle, from csv] wrapped"
    assert result.negative_prompts[0] == "blue, csvneg, ugly"
    with pytest.raises(InvalidParams, match="Unknown style 'Nope'"):
        run(app, styles=("Nope",))


def test_wildcards_follow_the_seed(app):
    prompts = {seed: run(app, prompt="a __colors__ __animals__", seed=seed, steps=1).prompts[0] for seed in range(4)}
    assert all("__" not in p for p in prompts.values())
    assert len(set(prompts.values())) > 1  # different seeds, different picks
    assert run(app, prompt="a __colors__ __animals__", seed=3, steps=1).prompts[0] == prompts[3]
    assert infotext.parse(run(app, prompt="a __colors__", seed=3, steps=1).infotexts[0])["Prompt"].count("__") == 0
    result = run(app, prompt="a __nosuchfile__", steps=1)
    assert result.prompts[0] == "a __nosuchfile__" and any("__nosuchfile__" in w for w in result.warnings)
    random_seed = run(app, prompt="a __colors__", seed=-1, steps=1)  # resolved before prepare_params
    assert run(app, prompt="a __colors__", seed=random_seed.seeds[0], steps=1).prompts[0] == random_seed.prompts[0]


def test_film_grain_options_reach_the_image_and_infotext(app):
    plain = run(app)
    grain = run(app, extension_args={"film-grain": {"strength": 0.3, "size": 2}})
    assert not np.array_equal(pixels(plain), pixels(grain))
    fields = infotext.parse(grain.infotexts[0])
    assert (fields["Film grain"], fields["Film grain size"], fields["Film grain mono"]) == ("0.3", "2", "True")
    assert np.array_equal(pixels(grain), pixels(run(app, extension_args={"film-grain": {"strength": 0.3, "size": 2}})))
    off = run(app, extension_args={"film-grain": {"enabled": False, "strength": 0.3}})
    assert np.array_equal(pixels(plain), pixels(off)) and "Film grain" not in off.infotexts[0]
    # "send to txt2img": infotext -> extension_args
    restored = jobhooks.extension_args_from_infotext(app.plugins, app.registries, fields)
    assert restored["film-grain"] == {"strength": 0.3, "size": 2, "monochrome": True}


def test_guidance_hook_changes_guidance(app):
    probe = app.plugins.manager.get_plugin("cfg-probe")
    probe.SEEN.clear()
    no_cfg = run(app, cfg_scale=1.0)
    dropped = run(app, cfg_scale=7.0, extension_args={"cfg-probe": {"mode": "cond-only"}})
    assert [s[0] for s in probe.SEEN] == [0, 1, 2] and all(s[2] for s in probe.SEEN)
    assert np.abs(pixels(dropped) - pixels(no_cfg)).max() <= 1  # cond-only == CFG scale 1
    assert not np.array_equal(pixels(dropped), pixels(run(app, cfg_scale=7.0)))
    assert "CFG probe" not in dropped.infotexts[0]


def test_guidance_hook_failure_fails_only_when_asked_for(app):
    with pytest.raises(ExtensionError, match="cfg-probe.*probe exploded"):
        run(app, extension_args={"cfg-probe": {"mode": "raise"}})


def test_asking_for_unknown_or_unloaded_extensions(app):
    with pytest.raises(InvalidParams, match="no loaded extension"):
        run(app, extension_args={"nope": {}})
    with pytest.raises(ExtensionError, match="broken-import.*skipped"):
        run(app, extension_args={"broken-import": {}})


def test_on_image_saved_and_ui_section_infotext(app, tmp_path):
    web = app.plugins.manager.get_plugin("web-ext")
    result = run(app, save_images=True, outdir=tmp_path, extension_args={"web-ext": {"level": 7}})
    assert web.SAVED[-1] == (result.paths[0], result.infotexts[0])
    assert infotext.parse(result.infotexts[0])["Web extension Level"] == "7"


@pytest.fixture(scope="module")
def raising_app(tmp_path_factory, tiny_sd1):
    app = ext_app(tmp_path_factory.mktemp("ext-raising"), extensions_allow=("raising-hook",))
    app.engine.load_model(tiny_sd1)
    return app


def test_raising_hooks_become_warnings(raising_app, tmp_path):
    result = run(raising_app, save_images=True, outdir=tmp_path)
    assert len(result.images) == 1
    joined = "\n".join(result.warnings)
    assert "prepare exploded" in joined and "post-processor exploded" in joined and "saved hook exploded" in joined
    hooks = [e.hook for e in raising_app.plugins.extension("raising-hook").hook_errors]
    assert {"prepare_params", "post-processor raising-post", "on_image_saved"} <= set(hooks)


def test_raising_hooks_fail_the_job_when_asked_for(raising_app):
    with pytest.raises(ExtensionError, match="prepare exploded"):
        run(raising_app, extension_args={"raising-hook": {}})
    with pytest.raises(ExtensionError, match="Raising post"):
        run(raising_app, extension_args={"raising-post": {}})


def test_guidance_state_invariant():
    """DenoiserStep.denoised == uncond + cfg * (cond - uncond), AND parts folded into cond."""
    from modules.sampling.denoisers import CFGDenoiser, Cond

    class Inner:
        def __call__(self, x, sigma, cross_attn, pooled=None, concat=None):
            return x * cross_attn.mean(dim=(1, 2)).reshape(-1, 1, 1, 1)

    def cond(value):
        return [(10, Cond(torch.full((1, 2, 3), value)))]

    cfg = CFGDenoiser(Inner(), [[(cond(2.0), 0.7), (cond(3.0), 0.5)]], [cond(0.5)], 6.0)
    x, sigma = torch.randn(1, 4, 2, 2), torch.ones(1)
    step = cfg.guidance(x, sigma)
    assert torch.allclose(step.denoised, cfg(x, sigma))
    assert torch.allclose(step.denoised, step.uncond + 6.0 * (step.cond - step.uncond), atol=1e-5)

"""End-to-end txt2img on tiny checkpoints of every architecture, on the CPU."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from modules import infotext
from modules.pipeline.control import JobControl
from modules.pipeline.params import Txt2ImgParams
from tests.conftest import ARCHES, make_engine


def params(**kw) -> Txt2ImgParams:
    base = dict(prompt="a red circle", negative_prompt="blue", steps=4, sampler_name="Euler a",
                width=64, height=64, seed=42, rng_source="cpu")
    base.update(kw)
    return Txt2ImgParams(**base)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


@pytest.mark.parametrize("arch", ARCHES)
def test_every_architecture_generates(arch, tiny_checkpoints, tmp_path):
    engine = make_engine(tmp_path)
    model = engine.load_model(tiny_checkpoints[arch])
    assert model.spec.arch == arch
    result = engine.txt2img(params(batch_size=2))
    assert len(result.images) == 2 and result.seeds == [42, 43]
    for image, path, seed, text in zip(result.images, result.paths, result.seeds, result.infotexts, strict=True):
        assert image.size == (64, 64)
        assert pixels(image).std() > 0  # not a blank image
        assert path.parent.parent == tmp_path / "outputs" / "txt2img-images"
        assert path.name.endswith(f"-{seed}.png")
        assert Image.open(path).info["parameters"] == text


def test_same_seed_same_image_and_batch_independence(sd1_engine):
    single = sd1_engine.txt2img(params(seed=101, save_images=False)).images[0]
    again = sd1_engine.txt2img(params(seed=101, save_images=False)).images[0]
    batch = sd1_engine.txt2img(params(seed=100, batch_size=3, save_images=False))
    assert np.array_equal(pixels(single), pixels(again))
    assert batch.seeds == [100, 101, 102]
    assert np.abs(pixels(batch.images[1]) - pixels(single)).max() <= 1
    assert not np.array_equal(pixels(batch.images[0]), pixels(single))


def test_batch_count_continues_seeds(sd1_engine):
    result = sd1_engine.txt2img(params(seed=7, batch_size=2, n_iter=2, save_images=False))
    assert result.seeds == [7, 8, 9, 10]
    single = sd1_engine.txt2img(params(seed=9, save_images=False)).images[0]
    assert np.abs(pixels(result.images[2]) - pixels(single)).max() <= 1


def test_random_seed_is_recorded(sd1_engine):
    result = sd1_engine.txt2img(params(seed=-1, save_images=False))
    seed = result.seeds[0]
    assert 0 <= seed < 2**32 - 1
    assert infotext.parse(result.infotexts[0])["Seed"] == str(seed)


def test_infotext_fields(sd1_engine):
    p = params(sampler_name="DPM++ 2M", scheduler="Karras", cfg_scale=5.5, clip_skip=2, save_images=False)
    fields = infotext.parse(sd1_engine.txt2img(p).infotexts[0])
    assert fields["Prompt"] == "a red circle" and fields["Negative prompt"] == "blue"
    assert fields["Steps"] == "4" and fields["Sampler"] == "DPM++ 2M"
    assert fields["Schedule type"] == "Karras" and fields["CFG scale"] == "5.5"
    assert fields["Seed"] == "42" and (fields["Size-1"], fields["Size-2"]) == ("64", "64")
    assert fields["Clip skip"] == "2" and fields["RNG"] == "CPU"
    model = sd1_engine.require_model()
    assert fields["Model hash"] == model.model_hash and len(model.model_hash) == 10


def test_prompt_features_change_the_image(sd1_engine):
    def image(**kw):
        return pixels(sd1_engine.txt2img(params(save_images=False, **kw)).images[0])

    plain = image(prompt="a red circle")
    assert not np.array_equal(plain, image(prompt="a (red:1.5) circle"))
    assert not np.array_equal(plain, image(prompt="a [red:green:2] circle"))
    assert not np.array_equal(plain, image(prompt="a red circle AND a green square:0.7"))
    assert not np.array_equal(plain, image(negative_prompt="yellow"))


@pytest.mark.parametrize("prompt", ["", "🐱 猫 chat, ünïcödé ✨", " ".join(["cat"] * 1000),
                                    "a [b", "((((", "(a:)", "\\(literal\\) BREAK next"])
def test_unusual_prompts_generate(sd1_engine, prompt):
    result = sd1_engine.txt2img(params(prompt=prompt, steps=2, save_images=False))
    assert len(result.images) == 1 and result.infotexts[0].startswith(prompt)


def test_progress_and_previews(sd1_engine):
    seen = []
    sd1_engine.txt2img(params(steps=3, n_iter=2, save_images=False), on_progress=seen.append)
    assert [(p.job_no, p.step) for p in seen] == [(0, 1), (0, 2), (0, 3), (1, 1), (1, 2), (1, 3)]
    assert all(p.preview is not None and p.preview.size == (8, 8) for p in seen)
    assert seen[-1].fraction == 1.0


def test_interrupt_stops_between_steps(sd1_engine):
    control = JobControl()
    steps_seen = []

    def on_progress(progress):
        steps_seen.append(progress.step)
        if progress.step == 2:
            control.interrupt()

    result = sd1_engine.txt2img(params(steps=10, n_iter=3, save_images=False), control, on_progress)
    assert result.interrupted
    assert steps_seen == [1, 2]
    assert len(result.images) == 1  # the interrupted batch keeps its latest prediction


def test_skip_moves_to_next_batch(sd1_engine):
    control = JobControl()
    seen = []

    def on_progress(progress):
        seen.append((progress.job_no, progress.step))
        if progress.job_no == 0 and progress.step == 1:
            control.skip()

    result = sd1_engine.txt2img(params(steps=3, n_iter=2, save_images=False), control, on_progress)
    assert not result.interrupted and len(result.images) == 2
    assert seen == [(0, 1), (1, 1), (1, 2), (1, 3)]


def test_every_sampler_runs_end_to_end(sd1_engine):
    for spec in sd1_engine.registries.samplers:
        result = sd1_engine.txt2img(params(sampler_name=spec.name, steps=3, save_images=False))
        assert np.isfinite(pixels(result.images[0])).all()
        assert infotext.parse(result.infotexts[0])["Sampler"] == spec.name


def test_variation_seed(sd1_engine):
    base = pixels(sd1_engine.txt2img(params(save_images=False)).images[0])
    zero = sd1_engine.txt2img(params(subseed=5, subseed_strength=0.0, save_images=False))
    varied = sd1_engine.txt2img(params(subseed=5, subseed_strength=0.5, batch_size=2, save_images=False))
    assert np.array_equal(base, pixels(zero.images[0]))
    assert not np.array_equal(base, pixels(varied.images[0]))
    assert varied.seeds == [42, 42] and varied.subseeds == [5, 6]
    fields = infotext.parse(varied.infotexts[0])
    assert fields["Variation seed"] == "5" and fields["Variation seed strength"] == "0.5"


def test_nv_rng_and_ensd_are_recorded(sd1_engine):
    result = sd1_engine.txt2img(params(rng_source="nv", eta_noise_seed_delta=31337, save_images=False))
    fields = infotext.parse(result.infotexts[0])
    assert fields["RNG"] == "NV" and fields["ENSD"] == "31337"


def test_vae_override_beside_checkpoint_and_by_name(tiny_checkpoints, tmp_path):
    """NAME.vae.safetensors beside the checkpoint, or a named file in models/VAE, replaces the VAE."""
    import shutil

    from safetensors.torch import load_file, save_file

    ckpt = tmp_path / "models" / "Stable-diffusion" / "m.safetensors"
    ckpt.parent.mkdir(parents=True)
    shutil.copy(tiny_checkpoints["sd1"], ckpt)
    donor = load_file(tiny_checkpoints["sd2"])
    vae = {k: v for k, v in donor.items() if k.startswith("first_stage_model.")}
    save_file(vae, ckpt.with_name("m.vae.safetensors"))
    (tmp_path / "models" / "VAE").mkdir()
    save_file(vae, tmp_path / "models" / "VAE" / "other.safetensors")

    def decoder_weight(engine):
        model = engine.load_model("m")
        return model, model.vae.decoder.conv_out.weight.detach().clone()

    plain, own = decoder_weight(make_engine(tmp_path / "a", sd_vae="None", models_dir=tmp_path / "models"))
    beside, swapped = decoder_weight(make_engine(tmp_path / "b", models_dir=tmp_path / "models"))
    named, named_w = decoder_weight(make_engine(tmp_path / "c", sd_vae="other", models_dir=tmp_path / "models"))
    expected = donor["first_stage_model.decoder.conv_out.weight"].float()
    assert plain.vae_name is None and not torch.equal(own, expected)
    assert beside.vae_name == "m.vae.safetensors" and torch.equal(swapped, expected)
    assert named.vae_name == "other.safetensors" and torch.equal(named_w, expected)
    text = make_engine(tmp_path / "d", models_dir=tmp_path / "models")
    text.load_model("m")
    fields = infotext.parse(text.txt2img(params(save_images=False)).infotexts[0])
    assert fields["VAE"] == "m.vae.safetensors" and len(fields["VAE hash"]) == 10

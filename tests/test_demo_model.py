"""The demo model's dataset, classifier, export round trip, training resume and default selection."""
from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest
import torch

from modules.demo import DEMO_CHECKPOINT, shapes
from modules.demo.classify import classify
from modules.demo.nets import DemoArch, build_nets
from modules.pipeline.latents import to_pil
from tests.conftest import make_app, make_engine

TINY = DemoArch(image_size=64, unet_channels=(32, 64), unet_attention=(True, False),
                vae_channels=(32, 32, 32, 32), clip_hidden=64, clip_layers=1)


def test_dataset_is_reproducible_and_keeps_held_out_combinations_out():
    a_images, a_captions, a_scenes = shapes.sample_batch(5, 100, 24)
    b_images, b_captions, _ = shapes.sample_batch(5, 100, 24)
    c_images, _, _ = shapes.sample_batch(6, 100, 24)
    assert torch.equal(a_images, b_images) and a_captions == b_captions
    assert not torch.equal(a_images, c_images)
    held = shapes.all_scenes(held_out=True)
    assert 0 < len(held) < len(shapes.all_scenes()) // 5
    _, _, many = shapes.sample_batch(1, 0, 2000)
    assert not any(shapes.is_held_out(s) for s in many)
    assert {s.shape for s in many} == set(shapes.SHAPES) and {s.position for s in many} == set(shapes.POSITIONS)


def test_caption_phrasings():
    scene = shapes.Scene("circle", "red", "blue", "top left", "small")
    texts = {shapes.caption(scene, style) for style in range(5)}
    assert "a small red circle on a blue background, top left" in texts
    assert "blue background with a small red circle in the upper left corner" in texts
    assert len(texts) == 5
    assert "red" not in shapes.caption(scene, 0, frozenset({"colour"}))
    assert shapes.caption(replace(scene, background="orange"), 0).endswith("on an orange background, top left")


def test_classifier_reads_every_rendered_attribute():
    images, _, scenes = shapes.sample_batch(3, 0, 300)
    for image, scene in zip(to_pil(images), scenes, strict=True):
        reading = classify(image)
        assert (reading.shape, reading.colour, reading.background, reading.position) == scene.combo, (scene, reading)


def test_classifier_sees_no_shape_on_a_plain_image():
    plain = to_pil(torch.full((1, 3, 64, 64), 0.2))[0]
    assert classify(plain).shape == "none"


def test_export_round_trip_through_the_engine_loader(tmp_path):
    """diffusers modules -> original SD1 file -> engine load gives the same weights and outputs."""
    from modules.checkpoints.discover import find_checkpoints
    from modules.checkpoints.load import load_checkpoint
    from modules.demo.export import export_checkpoint

    nets = build_nets(TINY, seed=3)
    for module in nets.modules().values():  # what fp16 storage keeps
        module.to(torch.float16).to(torch.float32)
    path = export_checkpoint(nets, TINY, tmp_path / "demo.safetensors", {"note": "test"})
    model = load_checkpoint(find_checkpoints([], [path])[0], device="cpu", dtype=torch.float32)
    assert model.spec.arch == "sd1"
    assert model.unet.config.block_out_channels == list(TINY.unet_channels)
    for ours, loaded in ((nets.unet, model.unet), (nets.vae, model.vae), (nets.text_encoder, model.text_encoders[0])):
        a, b = ours.state_dict(), loaded.state_dict()
        assert {k for k in a if not k.endswith("position_ids")} == {k for k in b if not k.endswith("position_ids")}
        assert all(torch.equal(a[k], b[k]) for k in a if not k.endswith("position_ids"))
    ids = torch.tensor([[49406, 320, 736, 49407] + [49407] * 73])
    ctx = nets.text_encoder(input_ids=ids).last_hidden_state
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([500])
    with torch.no_grad():
        assert torch.allclose(nets.unet(x, t, encoder_hidden_states=ctx).sample,
                              model.unet(x, t, encoder_hidden_states=ctx).sample, atol=1e-5)
    again = export_checkpoint(nets, TINY, tmp_path / "again.safetensors", {"note": "test"})
    assert again.read_bytes() == path.read_bytes()


@pytest.fixture(scope="module")
def tiny_training(tmp_path_factory):
    from modules.demo.train import TrainConfig

    root = tmp_path_factory.mktemp("train")
    return TrainConfig(out=root / "a" / "m.safetensors", work_dir=root / "a", seed=5, device="cpu", max_minutes=5,
                       vae_steps=2, steps=3, vae_batch=2, batch=2, pool_size=8, sample_every=100, save_every=100, arch=TINY)


def test_training_resumes_exactly(tiny_training):
    from modules.checkpoints.read import read_state_dict
    from modules.demo.train import train

    straight = train(tiny_training)
    first = replace(tiny_training, steps=2, work_dir=tiny_training.work_dir.parent / "b",
                    out=tiny_training.work_dir.parent / "b" / "m.safetensors")
    train(first)
    resumed = train(replace(first, steps=3), resume=True)
    a, b = read_state_dict(straight), read_state_dict(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    log = [json.loads(line) for line in (first.work_dir / "train.log").read_text().splitlines()]
    assert any(e.get("event") == "resumed" and e["step"] == 2 for e in log)
    assert (first.work_dir / "samples" / "final.png").exists()


def test_latent_normalisation_is_an_exact_reparameterisation(tiny_training):
    from modules.demo.train import SCALE, Trainer

    trainer = Trainer(tiny_training)
    images, _ = trainer.batch(2, 0, 4)
    vae = trainer.nets.vae
    with torch.no_grad():
        before = vae.decode(vae.encode(images).latent_dist.mean).sample
        trainer.normalise_latents(count=64)
        latents = vae.encode(images).latent_dist.mean
        after = vae.decode(latents).sample
    assert torch.allclose(before, after, atol=1e-4)
    assert 0.5 < float((latents * SCALE).std()) < 2.0


@pytest.mark.skipif(not DEMO_CHECKPOINT.exists(), reason="bundled demo checkpoint missing")
def test_bundled_checkpoint_is_a_small_sd1_file():
    from modules.checkpoints.detect import detect_model_spec
    from modules.checkpoints.read import read_safetensors_metadata, read_state_dict

    assert DEMO_CHECKPOINT.stat().st_size <= 30_000_000
    spec = detect_model_spec(read_state_dict(DEMO_CHECKPOINT))
    assert spec.arch == "sd1" and spec.prediction == "eps"
    meta = read_safetensors_metadata(DEMO_CHECKPOINT)
    assert meta["modelspec.resolution"] == "128x128"
    assert json.loads(meta["atelier.demo"])["steps"] > 0


@pytest.mark.skipif(not DEMO_CHECKPOINT.exists(), reason="bundled demo checkpoint missing")
def test_default_checkpoint_is_the_demo_only_when_nothing_else_is_there(tmp_path, tiny_sd1):
    engine = make_engine(tmp_path)
    assert engine.default_checkpoint().path.resolve() == DEMO_CHECKPOINT
    folder = tmp_path / "models" / "Stable-diffusion"
    folder.mkdir(parents=True)
    shutil.copy(tiny_sd1, folder / "zz-real.safetensors")
    assert engine.default_checkpoint().stem == "zz-real"
    assert make_engine(tmp_path, ckpt=tiny_sd1).default_checkpoint().path == tiny_sd1


@pytest.fixture(scope="module")
def demo_engine(tmp_path_factory):
    if not DEMO_CHECKPOINT.exists():
        pytest.skip("bundled demo checkpoint missing")
    engine = make_engine(tmp_path_factory.mktemp("demo"))
    engine.load_model(engine.default_checkpoint().path)
    return engine


def test_bundled_model_paints_the_two_colours_it_is_asked_for(demo_engine):
    """Held-out prompts: the {background, shape} colour pair matches the prompt's (chance: 1 in 28)."""
    from modules.demo.evaluate import EvalOptions, _txt2img, held_out_prompts

    hits = 0
    for i, (prompt, scene) in enumerate(held_out_prompts(4)):
        reading = classify(_txt2img(demo_engine, EvalOptions(), prompt, 1, 7.0, 1000 + i)[0])
        hits += {reading.background, reading.colour} == {scene.background, scene.colour}
    assert hits >= 2


def test_bundled_model_img2img_at_0_3_keeps_the_position(demo_engine):
    from modules.demo.evaluate import EvalOptions, img2img_keeps

    kept = img2img_keeps(demo_engine, 2, EvalOptions(steps=10))
    assert kept["position"] == 1.0  # shape: the VAE rounds corners, so squares may read as circles


def test_bundled_model_inpainting_leaves_the_unmasked_part_alone(demo_engine):
    from modules.demo.evaluate import EvalOptions, inpaint_green

    result = inpaint_green(demo_engine, 2, EvalOptions(steps=10))
    assert result["mean_change_outside"] < 2.0
    assert result["green_share_inside"] > 0.4  # the masked square turns mostly green (eval: ~75%)


def test_bundled_model_cfg_7_adheres_better_than_cfg_1(demo_engine):
    from modules.demo.evaluate import EvalOptions, adherence, held_out_prompts

    prompts, opts = held_out_prompts(6), EvalOptions(steps=12)
    strong, weak = adherence(demo_engine, prompts, 1, 7.0, opts), adherence(demo_engine, prompts, 1, 1.0, opts)
    assert strong["all"] > weak["all"]
    assert strong["background"] >= 5 / 6 and strong["colour"] >= 5 / 6


def test_bundled_model_negative_prompt_removes_its_colour(demo_engine):
    from modules.demo.evaluate import EvalOptions, negative_prompt_effect

    rates = negative_prompt_effect(demo_engine, 8, 4, EvalOptions(steps=12))  # 32 images each way
    assert rates["without_negative"] >= 2 / 32  # measured 5 / 32 (the model picks red rarely unasked)
    assert rates["with_negative"] <= rates["without_negative"] / 2  # measured 0 / 32


@pytest.mark.skipif(not DEMO_CHECKPOINT.exists(), reason="bundled demo checkpoint missing")
def test_server_selects_the_engines_default_checkpoint(tmp_path, tiny_sd1):
    """With a real model beside the demo, the server starts on the real one (it sorts after the demo)."""
    from modules.server.config import ServerConfig
    from modules.server.context import build_context

    folder = tmp_path / "models" / "Stable-diffusion"
    folder.mkdir(parents=True)
    shutil.copy(tiny_sd1, folder / "zz-real.safetensors")
    shutil.copy(DEMO_CHECKPOINT, folder / DEMO_CHECKPOINT.name)
    ctx = build_context(make_app(tmp_path), ServerConfig(api=True, nowebui=True))
    ctx.start()
    try:
        assert ctx.options.get("sd_model_checkpoint").startswith("zz-real")
    finally:
        ctx.close()

"""img2img, inpainting and outpainting end to end on tiny checkpoints, with A1111's semantics."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from modules import infotext
from modules.pipeline.control import JobControl
from modules.pipeline.img2img import IMG2IMG
from modules.pipeline.params import Img2ImgParams, Txt2ImgParams
from modules.pipeline.txt2img import TXT2IMG
from modules.plugins.specs import SamplerSpec
from modules.sampling import rng
from tests.conftest import make_engine
from tests.stage_helpers import run_recorded

ARCHES = ("sd1", "sd1-inpaint", "sd2", "sdxl")
BLUR_RADIUS = 10  # mask_blur 4: kernel 2 * int(2.5 * 4 + 0.5) + 1 = 21


def picture(width: int = 64, height: int = 64, shift: int = 0) -> Image.Image:
    """A deterministic test picture: a gradient with a few shapes."""
    x = np.linspace(0, 255, width)[None, :, None]
    y = np.linspace(0, 255, height)[:, None, None]
    base = np.concatenate([np.broadcast_to(x, (height, width, 1)), np.broadcast_to(y, (height, width, 1)),
                           np.full((height, width, 1), 90.0)], axis=2)
    image = Image.fromarray(((base + shift * 37) % 256).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    draw.ellipse((width // 6, height // 6, width // 2, height // 2), fill=(230, 40, 40))
    draw.rectangle((width // 2, height // 2, width - 6, height - 6), fill=(20, 60, 220))
    return image


def rect_mask(size: tuple[int, int], box: tuple[int, int, int, int]) -> Image.Image:
    mask = Image.new("L", size, 0)
    ImageDraw.Draw(mask).rectangle((box[0], box[1], box[2] - 1, box[3] - 1), fill=255)
    return mask


def far_from(box: tuple[int, int, int, int], size: tuple[int, int], radius: int = BLUR_RADIUS) -> np.ndarray:
    """Pixels more than `radius` away (in x or y) from the half-open `box`."""
    w, h = size
    xs, ys = np.arange(w)[None, :], np.arange(h)[:, None]
    near_x = (xs >= box[0] - radius) & (xs < box[2] + radius)
    near_y = (ys >= box[1] - radius) & (ys < box[3] + radius)
    return ~(near_x & near_y)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def params(**kw) -> Img2ImgParams:
    base = dict(prompt="a red circle", negative_prompt="blue", steps=4, sampler_name="Euler a", width=64,
                height=64, seed=42, rng_source="cpu", save_images=False, init_images=(picture(),),
                inpaint_full_res=False)
    base.update(kw)
    return Img2ImgParams(**base)


@pytest.fixture(scope="module", params=ARCHES)
def arch_engine(request, tiny_checkpoints, tmp_path_factory):
    engine = make_engine(tmp_path_factory.mktemp(f"i2i-{request.param}"))
    engine.load_model(tiny_checkpoints[request.param])
    return engine


def test_every_architecture_img2img_inpaint_outpaint(arch_engine, tmp_path):
    """Every mode runs on sd1, sd1-inpaint, sd2 and SDXL; pixels outside the blurred mask come back exactly."""
    engine, init = arch_engine, picture()
    result = engine.img2img(params(batch_size=2, save_images=True))
    assert result.seeds == [42, 43] and [im.size for im in result.images] == [(64, 64)] * 2
    assert all(p.parent.parent.name == "img2img-images" for p in result.paths)
    assert Image.open(result.paths[0]).info["parameters"] == result.infotexts[0]
    assert infotext.parse(result.infotexts[0])["Denoising strength"] == "0.75"

    box = (24, 20, 44, 40)
    keep = far_from(box, init.size)
    for only_masked in (False, True):
        out = engine.img2img(params(mask=rect_mask(init.size, box), inpaint_full_res=only_masked,
                                    inpaint_full_res_padding=8, inpainting_fill=1)).images[0]
        assert out.size == init.size
        assert np.array_equal(pixels(out)[keep], pixels(init)[keep])  # exact outside the blurred mask
        assert np.abs(pixels(out)[26:38, 28:40] - pixels(init)[26:38, 28:40]).mean() > 3  # repainted inside

    grown = engine.img2img(params(outpaint=(16, 8, 0, 8), width=88, height=72)).images[0]
    assert grown.size == (88, 72)
    assert np.array_equal(pixels(grown)[0:64, 16:80], pixels(init))  # the original sits at (16, 0), untouched
    assert np.abs(pixels(grown)[:, :8].astype(int) - pixels(grown)[:, 8:9].astype(int)).mean() > 0


def test_outpaint_keeps_the_original_pixels_at_any_target_size(sd1_engine):
    """A 64x64 image outpainted 16 px to the left is an 80x64 canvas with the original at x=16, exactly,
    whether width x height is the canvas (no warning) or another size (fitted with its aspect, warned)."""
    init = picture()
    exact = sd1_engine.img2img(params(outpaint=(16, 0, 0, 0), width=80, height=64))
    assert exact.images[0].size == (80, 64) and not any("Outpainting" in w for w in exact.warnings)
    fitted = sd1_engine.img2img(params(outpaint=(16, 0, 0, 0), width=64, height=64))
    out = fitted.images[0]
    assert out.size == (80, 64)
    assert np.array_equal(pixels(out)[:, 16:], pixels(init))
    assert np.abs(pixels(out)[:, :8] - pixels(init)[:, :1]).mean() > 3  # the new border was generated
    warning = next(w for w in fitted.warnings if w.startswith("Outpainting"))
    assert "the 80x64 canvas" in warning and "generated at 64x51 inside the 64x64 asked" in warning, warning
    assert infotext.parse(fitted.infotexts[0])["Outpaint"] == "16,0,0,0"


def test_outpaint_fit_box_keeps_the_aspect():
    from modules.pipeline.outpaint import fit_box

    assert fit_box((80, 64), 64, 64) == (0, 6, 64, 51)
    assert fit_box((160, 128), 128, 128) == (0, 13, 128, 102)
    assert fit_box((64, 128), 128, 128) == (32, 0, 64, 128)


def test_inpainting_model_gets_masked_image_conditioning(tiny_checkpoints, tmp_path):
    engine = make_engine(tmp_path)
    engine.load_model(tiny_checkpoints["sd1-inpaint"])
    result, hooks = run_recorded(engine, params(mask=rect_mask((64, 64), (16, 16, 48, 48)), mask_blur=0))
    concat = hooks.values["inputs"][0].concat
    assert concat.shape == (1, 5, 8, 8)
    mask = concat[0, 0]
    assert set(mask.unique().tolist()) == {0.0, 1.0} and mask[2:6, 2:6].eq(1).all() and mask[0].eq(0).all()
    fields = infotext.parse(result.infotexts[0])
    assert fields["Conditional mask weight"] == "1"


def test_start_follows_a1111(tiny_sd1, tmp_path):
    """x = init_latent + noise * sigmas[steps - t_enc - 1], t_enc = int(min(strength, 0.999) * steps)."""
    engine = make_engine(tmp_path)
    engine.load_model(tiny_sd1)
    seen = {}

    def spy(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None):
        seen["x"], seen["sigmas"] = x.clone(), sigmas.clone()
        return x

    engine.registries.samplers.add(SamplerSpec("Spy", spy, default_scheduler="karras"))
    full = TXT2IMG.inputs(engine.new_job(Txt2ImgParams(sampler_name="Spy", steps=10, width=64, height=64))).plan.sigmas
    noise = rng.ImageNoise((4, 8, 8), [42], source="cpu").first()
    for strength, t_enc in ((0.0, 0), (0.25, 2), (0.5, 5), (1.0, 9)):
        _, hooks = run_recorded(engine, params(sampler_name="Spy", steps=10, denoising_strength=strength))
        run = hooks.values["inputs"][0]
        assert torch.equal(seen["sigmas"], full[10 - t_enc - 1 :])
        torch.testing.assert_close(seen["x"], run.init_latent + noise * full[10 - t_enc - 1])
        assert run.steps_per_batch == t_enc + 1


def test_strength_zero_keeps_and_strength_one_ignores_the_input(sd1_engine):
    a, b = picture(), picture(shift=3).transpose(Image.Transpose.ROTATE_90)

    def run(image, strength):
        result, hooks = run_recorded(sd1_engine, params(init_images=(image,), denoising_strength=strength, steps=10,
                                                        sampler_name="Euler", cfg_scale=1.0))
        return hooks, pixels(result.images[0])

    zero_a, out_zero_a = run(a, 0.0)
    half_a, _ = run(a, 0.5)
    sigma_min = float(zero_a.values["inputs"][0].plan.sigmas[0])

    def moved(hooks):
        return (hooks.values["sampling"][0].latents - hooks.values["inputs"][0].init_latent).abs().mean()

    # strength 0: one step at the smallest sigma; the latents move by about that sigma
    assert moved(zero_a) < 2 * sigma_min
    assert moved(half_a) > 10 * sigma_min
    _, out_zero_b = run(b, 0.0)
    _, out_one_a = run(a, 1.0)
    _, out_one_b = run(b, 1.0)
    assert np.abs(out_zero_a - out_zero_b).mean() > 20  # strength 0 follows the input
    assert np.abs(out_one_a - out_one_b).mean() < 2  # strength 1 all but ignores it (init / sigma_max)


def test_resize_modes_and_odd_sizes(sd1_engine):
    odd = picture(67, 45)
    for mode in (0, 1, 2, 3):
        out = sd1_engine.img2img(params(init_images=(odd,), resize_mode=mode, width=72, height=64)).images[0]
        assert out.size == (72, 64)
    run = IMG2IMG.inputs(sd1_engine.new_job(params(init_images=(picture(32, 32),), resize_mode=3, width=64,
                                                   height=64)))
    assert run.init_latent.shape == (1, 4, 8, 8)  # latent upscale: encoded at 32x32, latents resized


def test_masked_content_modes(sd1_engine):
    mask = rect_mask((64, 64), (16, 16, 48, 48))
    nothing = IMG2IMG.inputs(sd1_engine.new_job(params(mask=mask, inpainting_fill=3, mask_blur=0)))
    assert nothing.init_latent[0, :, 3:5, 3:5].eq(0).all() and nothing.init_latent[0, :, 0].ne(0).all()
    texts = {}
    for fill in (0, 1, 2, 3):
        texts[fill] = sd1_engine.img2img(params(mask=mask, inpainting_fill=fill)).infotexts[0]
    assert "Masked content: fill" in texts[0] and "Masked content" not in texts[1]
    assert "Masked content: latent noise" in texts[2] and "Masked content: latent nothing" in texts[3]
    fields = infotext.parse(texts[1])
    assert fields["Mask blur"] == "4" and fields["Denoising strength"] == "0.75"


def test_inpaint_not_masked_keeps_the_inside(sd1_engine):
    init, box = picture(), (8, 8, 56, 56)
    result = sd1_engine.img2img(params(mask=rect_mask(init.size, box), inpainting_mask_invert=1))
    inside = slice(8 + BLUR_RADIUS, 56 - BLUR_RADIUS)
    out = pixels(result.images[0])
    assert np.array_equal(out[inside, inside], pixels(init)[inside, inside])
    assert np.abs(out[:4] - pixels(init)[:4]).mean() > 3
    assert infotext.parse(result.infotexts[0])["Mask mode"] == "Inpaint not masked"


def test_only_masked_returns_the_original_size(sd1_engine):
    init, box = picture(96, 80), (60, 10, 80, 30)
    result = sd1_engine.img2img(params(init_images=(init,), mask=rect_mask(init.size, box), inpaint_full_res=True,
                                       inpaint_full_res_padding=4, batch_size=2))
    assert [im.size for im in result.images] == [(96, 80), (96, 80)]
    keep = far_from(box, init.size)
    assert all(np.array_equal(pixels(im)[keep], pixels(init)[keep]) for im in result.images)
    fields = infotext.parse(result.infotexts[0])
    assert fields["Inpaint area"] == "Only masked" and fields["Masked area padding"] == "4"


def test_mask_from_alpha_and_rgba_masks(sd1_engine):
    from modules.pipeline import masks

    rgba = picture().convert("RGBA")
    rgba.putalpha(rect_mask((64, 64), (0, 0, 64, 64)).point(lambda v: 255))
    ImageDraw.Draw(rgba).rectangle((40, 40, 63, 63), fill=(0, 0, 0, 0))
    mask = masks.alpha_mask(rgba)
    assert mask.getpixel((50, 50)) == 255 and mask.getpixel((10, 10)) == 0
    stroke = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    ImageDraw.Draw(stroke).rectangle((0, 0, 9, 9), fill=(255, 255, 255, 200))
    assert masks.binary_mask(stroke).getpixel((5, 5)) == 255 and masks.binary_mask(stroke).getpixel((20, 20)) == 0
    out = sd1_engine.img2img(params(init_images=(rgba,), mask=mask)).images[0]
    keep = far_from((40, 40, 64, 64), (64, 64))
    flat = pixels(Image.alpha_composite(Image.new("RGBA", (64, 64), "white"), rgba))
    assert np.array_equal(pixels(out)[keep], flat[keep])  # transparency flattened onto white, as A1111


def test_empty_mask_returns_the_input_unchanged(sd1_engine):
    seen = []
    for only_masked in (False, True):
        result = sd1_engine.img2img(params(mask=Image.new("L", (64, 64), 0), inpaint_full_res=only_masked),
                                    on_progress=seen.append)
        assert np.array_equal(pixels(result.images[0]), pixels(picture()))
        assert any("mask is empty" in w for w in result.warnings)
    assert seen == []  # nothing was sampled


def test_full_mask_and_mask_of_another_size(sd1_engine):
    full = sd1_engine.img2img(params(mask=Image.new("L", (64, 64), 255), inpaint_full_res=True))
    assert full.images[0].size == (64, 64) and np.abs(pixels(full.images[0]) - pixels(picture())).mean() > 3
    small = rect_mask((32, 32), (0, 0, 12, 12))
    result = sd1_engine.img2img(params(mask=small))
    assert any("not the size of the init image" in w for w in result.warnings)
    keep = far_from((0, 0, 24, 24), (64, 64), radius=BLUR_RADIUS + 2)
    assert np.array_equal(pixels(result.images[0])[keep], pixels(picture())[keep])


def test_batch_of_init_images_and_progress(sd1_engine):
    seen = []
    images = (picture(), picture(shift=2))
    result = sd1_engine.img2img(params(init_images=images, batch_size=2, steps=10, denoising_strength=0.5),
                                on_progress=seen.append)
    assert [p.step for p in seen] == [1, 2, 3, 4, 5, 6] and seen[-1].steps == 6
    assert not np.array_equal(pixels(result.images[0]), pixels(result.images[1]))


def test_interrupt_keeps_a_result(sd1_engine):
    control = JobControl()

    def on_progress(progress):
        if progress.step == 1:
            control.interrupt()

    result = sd1_engine.img2img(params(steps=10, n_iter=2), control, on_progress)
    assert result.interrupted and len(result.images) == 1


@pytest.mark.parametrize("field,value,message", [
    ("init_images", (), "init_images needs at least one image"),
    ("init_images", ("x.png",), "init_images\\[0\\] must be an image"),
    ("init_images", (picture(), picture(), picture()), "give one init image, or batch_size"),
    ("mask", "mask.png", "mask must be an image"),
    ("denoising_strength", 1.5, "denoising_strength must be between"),
    ("resize_mode", 4, "resize_mode must be between"),
    ("inpainting_fill", 5, "inpainting_fill must be between"),
    ("mask_blur", -1, "mask_blur must be between"),
    ("width", 65, "width must be a multiple of 8"),
    ("outpaint", (0, 0, 0, 0), "at least one side"),
    ("outpaint", (4096, 4096, 0, 0), "makes a 8256x64 canvas"),
    ("outpaint", (8, 8), "outpaint must be"),
])
def test_bad_params(sd1_engine, field, value, message):
    from modules.errors import InvalidParams

    with pytest.raises(InvalidParams, match=message):
        sd1_engine.img2img(params(batch_size=2, **{field: value}))


def test_latent_upscale_with_a_mask_is_refused(sd1_engine):
    from modules.errors import InvalidParams

    with pytest.raises(InvalidParams, match="resize_mode 3"):
        sd1_engine.img2img(params(resize_mode=3, mask=Image.new("L", (64, 64), 255)))


def test_corrupt_and_missing_images(tmp_path):
    from modules.errors import InvalidParams
    from modules.pipeline.inputs import load_image

    good = tmp_path / "good.png"
    picture().save(good)
    assert load_image(good).size == (64, 64)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:200])
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"not an image at all")
    for path in (truncated, garbage):
        with pytest.raises(InvalidParams, match="cannot read the init image"):
            load_image(path, "init image")
    with pytest.raises(InvalidParams, match="is not a file"):
        load_image(tmp_path / "missing.png")
    import base64

    assert load_image("data:image/png;base64," + base64.b64encode(good.read_bytes()).decode()).size == (64, 64)

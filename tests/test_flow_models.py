"""FLUX.1 and SD3.5: fixtures checked by diffusers / transformers, loading, errors, parity, T5 tokenizer."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from modules.checkpoints.mmdit import infer_flux_config, infer_sd3_config
from modules.checkpoints.mmdit_keys import flux_to_diffusers
from modules.checkpoints.read import read_state_dict
from modules.errors import CheckpointError
from modules.pipeline.params import Txt2ImgParams
from modules.sampling import flow
from modules.sampling.samplers import sample_euler
from modules.text.flow_encoder import T5_TOKENIZER_DIR, load_t5_tokenizer, t5_tokens
from tests.conftest import make_engine
from tests.fixtures.make_tiny_mmdit import (
    FLUX_REAL,
    KINDS,
    flux_shapes,
    make_all_in_one,
    make_split_files,
)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("flow")
    return {kind: make_all_in_one(kind, root / f"{kind}.safetensors") for kind in KINDS}


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return make_engine(tmp_path_factory.mktemp("flow-engine"))


def _load(engine, path: Path):
    engine.load_model(path)
    return engine.require_model()


def _params(**kw) -> Txt2ImgParams:
    base = dict(prompt="a (red:1.2) fox", steps=2, width=64, height=64, seed=3, save_images=False,
                sampler_name="Euler", cfg_scale=1.0)
    return Txt2ImgParams(**{**base, **kw})


# ---------------------------------------------------------------- fixtures against the references

@pytest.mark.parametrize("kind", ["sd35-medium", "sd35-large"])
def test_sd3_file_loads_in_diffusers_from_single_file(kind: str, tmp_path: Path, engine) -> None:
    from diffusers import SD3Transformer2DModel

    split = make_split_files(kind, tmp_path / "split")
    config = infer_sd3_config(read_state_dict(split["transformer"]))
    (tmp_path / "cfg" / "transformer").mkdir(parents=True)
    (tmp_path / "cfg" / "transformer" / "config.json").write_text(
        json.dumps({"_class_name": "SD3Transformer2DModel", **config}))
    ref = SD3Transformer2DModel.from_single_file(str(split["transformer"]), config=str(tmp_path / "cfg"),
                                                 subfolder="transformer", local_files_only=True,
                                                 torch_dtype=torch.float32).state_dict()
    ours = _load(engine, make_all_in_one(kind, tmp_path / "aio.safetensors")).unet.state_dict()
    assert set(ref) == set(ours)
    for k in ref:
        assert torch.equal(ref[k], ours[k]), k
    assert (kind == "sd35-medium") == bool(config["dual_attention_layers"])


def _thin(shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Each tensor with its real first dimension (the one converters split) and distinct values."""
    out = {}
    for i, (k, shape) in enumerate(sorted(shapes.items())):
        out[k] = (torch.arange(shape[0], dtype=torch.float64) + 1e6 * i).reshape(shape[0], *[1] * (len(shape) - 1))
    return out


@pytest.mark.parametrize("guidance", [True, False])
def test_flux_layout_matches_diffusers_at_real_width(guidance: bool) -> None:
    """diffusers' FLUX single-file converter is fixed to FLUX.1's 3072 width, so the fixture's layout is
    checked at that width: its keys and shapes (meta tensors) and our mapping's values (thin tensors)."""
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    shapes = flux_shapes(FLUX_REAL, guidance)
    meta = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    config = infer_flux_config(meta)
    assert config["axes_dims_rope"] == (16, 56, 56) and config["num_attention_heads"] == 24
    with torch.device("meta"):
        model = FluxTransformer2DModel(**config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    ref_meta = convert_flux_transformer_checkpoint_to_diffusers(dict(meta))
    assert {k: tuple(v.shape) for k, v in ref_meta.items()} == expected
    ours_meta = flux_to_diffusers(meta, 3072)
    assert {k: tuple(v.shape) for k, v in ours_meta.items()} == expected
    thin = _thin(shapes)
    ref = convert_flux_transformer_checkpoint_to_diffusers(dict(thin))
    ours = flux_to_diffusers(thin, 3072)
    assert set(ref) == set(ours)
    for k in ref:
        assert torch.equal(ref[k], ours[k]), k


@pytest.mark.parametrize("kind", ["flux-dev", "sd35-medium"])
def test_component_files_load_in_reference_libraries(kind: str, tmp_path: Path, engine) -> None:
    """The VAE through diffusers' from_single_file; CLIP and T5 through transformers, no missing/unexpected keys."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    split = make_split_files(kind, tmp_path / "split")
    model = _load(engine, make_all_in_one(kind, tmp_path / "aio.safetensors"))
    (tmp_path / "cfg" / "vae").mkdir(parents=True)
    (tmp_path / "cfg" / "vae" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL",
                                                                        **model.spec.vae_config}))
    ref = AutoencoderKL.from_single_file(str(split["vae"]), config=str(tmp_path / "cfg"), subfolder="vae",
                                         local_files_only=True, torch_dtype=torch.float32).state_dict()
    ours = model.vae.state_dict()
    assert set(ref) == set(ours) and all(torch.equal(ref[k], ours[k]) for k in ref)
    for name, spec in zip(model.spec.family.text_encoders, model.spec.text_encoders, strict=True):
        folder = tmp_path / name
        folder.mkdir()
        shutil.copy(split[name], folder / "model.safetensors")
        if name == "t5xxl":
            config = {k: v for k, v in spec.config.items() if k != "hidden_size"}
            T5Config(**config).save_pretrained(folder)
            cls = T5EncoderModel
        else:
            CLIPTextConfig(**spec.config).save_pretrained(folder)
            cls = CLIPTextModelWithProjection
        _, info = cls.from_pretrained(str(folder), local_files_only=True, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], (name, info)


# ---------------------------------------------------------------- families, detection, loading

def test_each_kind_is_detected_and_generates(files: dict[str, Path], engine) -> None:
    for kind, path in files.items():
        model = _load(engine, path)
        fam = model.spec.family
        assert model.spec.arch == kind and model.spec.prediction == "flow" and fam.latent.channels == 16
        result = engine.txt2img(_params(cfg_scale=fam.cfg_scale))
        text = result.infotexts[0]
        assert result.images[0].size == (64, 64)
        assert ("Distilled CFG Scale: 3.5" in text) == (kind == "flux-dev")
        assert ("Shift: 3" in text) == kind.startswith("sd35")


def test_img2img_inpaint_outpaint_and_hires_run_for_flow_models(files, engine) -> None:
    from PIL import Image

    from modules.pipeline.job import add_noise
    from modules.pipeline.params import Img2ImgParams

    _load(engine, files["flux-schnell"])
    base = dict(prompt="a fox", steps=4, width=64, height=64, seed=2, save_images=False, sampler_name="Euler",
                cfg_scale=1.0)
    init = Image.new("RGB", (64, 64), (200, 40, 40))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (32, 0, 64, 64))
    for extra, size in (({}, (64, 64)), ({"mask": mask}, (64, 64)), ({"outpaint": (16, 0, 0, 0)}, (80, 64))):
        result = engine.img2img(Img2ImgParams(**base, init_images=(init,), denoising_strength=0.5, **extra))
        assert result.images[0].size == size  # outpainting adds its padding to the init image
    hires = engine.txt2img(_params(enable_hr=True, hr_scale=1.5, denoising_strength=0.5, hr_second_pass_steps=2))
    assert hires.images[0].size == (96, 96)
    job = engine.new_job(Txt2ImgParams(**base))
    x0, eps = torch.ones(1, 16, 2, 2), torch.zeros(1, 16, 2, 2)
    torch.testing.assert_close(add_noise(job, x0, eps, torch.tensor(0.25)), x0 * 0.75)  # (1 - s) x0 + s noise


def test_split_files_load_from_component_folders(tmp_path: Path) -> None:
    eng = make_engine(tmp_path)
    models = tmp_path / "models"
    for kind, folder in (("flux-schnell", "unet"), ("sd35-large", "diffusion_models")):
        split = make_split_files(kind, tmp_path / "split" / kind)
        (models / folder).mkdir(parents=True, exist_ok=True)
        shutil.copy(split["transformer"], models / folder / split["transformer"].name)
        (models / "text_encoder").mkdir(exist_ok=True)
        for name in ("clip_l", "clip_g", "t5xxl"):
            if name in split:
                shutil.copy(split[name], models / "text_encoder" / split[name].name)
        (models / "VAE").mkdir(exist_ok=True)
        vae_name = "ae.safetensors" if kind.startswith("flux") else "sd3_vae.safetensors"
        shutil.copy(split["vae"], models / "VAE" / vae_name)
        model = _load(eng, f"tiny-{kind}")
        assert model.spec.arch == kind
        assert eng.txt2img(_params()).images[0].size == (64, 64)
        for name in ("clip_l", "clip_g", "t5xxl"):
            if name in split:
                (models / "text_encoder" / split[name].name).unlink()


def test_bad_sets_name_what_is_missing_and_keep_the_old_model(tmp_path: Path, files) -> None:
    eng = make_engine(tmp_path)
    old = _load(eng, files["flux-schnell"])
    split = make_split_files("flux-dev", tmp_path / "split")
    with pytest.raises(CheckpointError, match=r"this FLUX.1-dev transformer needs clip_l and t5xxl text encoders "
                                              r"\(models/text_encoder\) and the FLUX VAE \(ae.safetensors\) \(models/VAE\)"):
        eng.load_model(split["transformer"])
    assert eng.models.current is old
    te = tmp_path / "models" / "text_encoder"
    te.mkdir(parents=True)
    shutil.copy(split["clip_l"], te / "clip_l.safetensors")
    (tmp_path / "models" / "VAE").mkdir()
    shutil.copy(split["vae"], tmp_path / "models" / "VAE" / "ae.safetensors")
    with pytest.raises(CheckpointError, match=r"needs t5xxl text encoder \(models/text_encoder\)$"):
        eng.load_model(split["transformer"])
    sd3 = make_split_files("sd35-large", tmp_path / "sd3")  # its T5 is 64 wide; FLUX's is 32
    shutil.copy(sd3["t5xxl"], te / "t5xxl_fp16.safetensors")
    with pytest.raises(CheckpointError, match=r"t5xxl_fp16.safetensors is 64 wide.*needs a 32-wide T5"):
        eng.load_model(split["transformer"])
    data = files["flux-dev"].read_bytes()
    cut = tmp_path / "models" / "Stable-diffusion" / "cut.safetensors"
    cut.parent.mkdir(parents=True)
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        eng.load_model(cut)
    assert eng.models.current is old
    assert eng.txt2img(_params()).images[0].size == (64, 64)


# ---------------------------------------------------------------- sampling parity with diffusers

def _euler(denoiser, x, sigmas):
    return sample_euler(denoiser, x, sigmas, extra_args={}, disable=True)


def test_flux_matches_diffusers_flux_pipeline(files, engine) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    model = _load(engine, files["flux-dev"])
    cond = engine.text_conditioner(model).encode(["a fox"])
    noise = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    shift = flow.job_shift(model.spec.family, 64, 64, None)
    assert shift == pytest.approx(flow.math.exp(0.5 + (16 - 256) * (0.65 / 3840)))
    sigmas = flow.shift_sigma(torch.linspace(1.0, 0.25, 4, dtype=torch.float64), shift).float()
    den = flow.FlowDenoiser(model.unet, guidance=3.5)
    ours = _euler(lambda x, s: den(x, s.expand(x.shape[0]), cond.cross_attn, cond.pooled), noise,
                  torch.cat([sigmas, torch.zeros(1)]))
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0), vae=model.vae, text_encoder=None,
                        tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=model.unet)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(prompt_embeds=cond.cross_attn, pooled_prompt_embeds=cond.pooled, latents=flow.pack_latents(noise),
               sigmas=sigmas.tolist(), num_inference_steps=4, guidance_scale=3.5, height=64, width=64,
               output_type="latent").images
    torch.testing.assert_close(ours, flow.unpack_latents(ref, 8, 8), rtol=1e-5, atol=1e-5)
    one = pipe(prompt_embeds=cond.cross_attn, pooled_prompt_embeds=cond.pooled, latents=flow.pack_latents(noise),
               sigmas=[1.0], num_inference_steps=1, guidance_scale=3.5, height=64, width=64, output_type="latent").images
    v_ref = noise - flow.unpack_latents(one, 8, 8)  # one Euler step from sigma 1 to 0: x - v
    v = den.velocity(noise, torch.ones(1), cond.cross_attn, cond.pooled)
    torch.testing.assert_close(v, v_ref, rtol=1e-5, atol=1e-5)


def test_sd3_matches_diffusers_sd3_pipeline_with_cfg(files, engine) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    from modules.sampling.denoisers import CFGDenoiser, Cond

    model = _load(engine, files["sd35-medium"])
    text = engine.text_conditioner(model)
    pos, neg = text.encode(["a fox"]), text.encode(["blurry"])
    noise = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    sigmas = flow.shift_sigma(torch.linspace(1.0, 0.2, 5, dtype=torch.float64), 3.0).float()
    den = CFGDenoiser(flow.FlowDenoiser(model.unet), [[([(9, Cond(pos.cross_attn, pos.pooled))], 1.0)]],
                      [[(9, Cond(neg.cross_attn, neg.pooled))]], cfg_scale=4.5)
    ours = _euler(den, noise, torch.cat([sigmas, torch.zeros(1)]))
    pipe = StableDiffusion3Pipeline(transformer=model.unet, scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0),
                                    vae=model.vae, text_encoder=None, tokenizer=None, text_encoder_2=None,
                                    tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(prompt_embeds=pos.cross_attn, pooled_prompt_embeds=pos.pooled, negative_prompt_embeds=neg.cross_attn,
               negative_pooled_prompt_embeds=neg.pooled, latents=noise, sigmas=sigmas.tolist(),
               num_inference_steps=5, guidance_scale=4.5, height=64, width=64, output_type="latent").images
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- T5 tokenizer

PROMPTS = ("a photo of a cat", "ein Foto einer Katze, café, naïve — 東京 🌸",
           " ".join(["a very long prompt about mountains and rivers"] * 80))


def test_t5_tokenizer_matches_transformers_fast_tokenizer() -> None:
    from transformers import T5TokenizerFast

    ref = T5TokenizerFast.from_pretrained(str(T5_TOKENIZER_DIR), local_files_only=True)
    ours = load_t5_tokenizer()
    for prompt in PROMPTS:
        for limit in (256, 512):
            ids, weights = t5_tokens(ours, prompt, "None", 0, limit)
            assert ids == ref(prompt, truncation=True, max_length=limit)["input_ids"], prompt[:30]
            assert weights == [1.0] * len(ids)
    assert len(t5_tokens(ours, PROMPTS[2], "None", 0, 256)[0]) == 256  # cut at the limit, </s> kept
    ids, _ = t5_tokens(ours, "a cat", "None", 512, 512)
    assert len(ids) == 512 and ids[-1] == 0  # padded to the family's length


def test_t5_emphasis_tokenizes_fragments_like_forge() -> None:
    from transformers import T5TokenizerFast

    ref = T5TokenizerFast.from_pretrained(str(T5_TOKENIZER_DIR), local_files_only=True)
    ids, weights = t5_tokens(load_t5_tokenizer(), "a (red:1.5) cat BREAK [blue] dog", "Original", 0, 512)
    parts = [("a ", 1.0), ("red", 1.5), (" cat", 1.0), ("blue", 1 / 1.1), (" dog", 1.0)]
    want_ids, want_w = [], []
    for text, w in parts:
        piece = ref(text, add_special_tokens=False)["input_ids"]
        want_ids += piece
        want_w += [w] * len(piece)
    assert ids == want_ids + [1]
    assert weights == pytest.approx(want_w + [1.0])


# ---------------------------------------------------------------- HTTP API

def test_sdapi_takes_distilled_cfg_scale_and_shift(tmp_path: Path, files) -> None:
    import httpx

    from tests.api_server import start_server

    server = start_server(tmp_path, {"tiny-flux-dev": files["flux-dev"]})
    try:
        body = {"prompt": "a fox", "steps": 2, "width": 64, "height": 64, "seed": 5, "sampler_name": "Euler",
                "cfg_scale": 1, "distilled_cfg_scale": 2.5, "override_settings": {"sd_model_checkpoint": "tiny-flux-dev"}}
        first = httpx.post(f"{server.url}/sdapi/v1/txt2img", json=body, timeout=300)
        assert first.status_code == 200, first.text
        info = json.loads(first.json()["info"])["infotexts"][0]
        assert "Distilled CFG Scale: 2.5" in info and "Shift" not in info
        second = httpx.post(f"{server.url}/sdapi/v1/txt2img", json={**body, "shift": 2.0}, timeout=300)
        info2 = json.loads(second.json()["info"])["infotexts"][0]
        assert "Shift: 2" in info2
        assert first.json()["images"][0] != second.json()["images"][0]  # the shift changed the sigmas
    finally:
        server.stop()


def test_diffusers_folders_load_and_their_tokenizer_wins(tmp_path: Path, files) -> None:
    eng = make_engine(tmp_path)
    for kind in ("flux-dev", "sd35-medium"):
        model = _load(eng, files[kind])
        want = eng.txt2img(_params(cfg_scale=model.spec.family.cfg_scale)).images[0]
        folder = tmp_path / "models" / "Stable-diffusion" / f"{kind}-diffusers"
        model.unet.save_pretrained(folder / "transformer")
        model.vae.save_pretrained(folder / "vae")
        subs = ("text_encoder", "text_encoder_2", "text_encoder_3")
        for sub, enc in zip(subs, model.text_encoders, strict=False):
            enc.save_pretrained(folder / sub)
        (folder / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
        tok = folder / ("tokenizer_2" if kind.startswith("flux") else "tokenizer_3")
        shutil.copytree(T5_TOKENIZER_DIR, tok)
        loaded = _load(eng, folder)
        assert loaded.info.format == "diffusers" and loaded.spec.arch == kind
        got = eng.txt2img(_params(cfg_scale=model.spec.family.cfg_scale)).images[0]
        # same weights; the folder's encoders may pick another attention kernel: pixels within one level
        diff = np.abs(np.asarray(got, dtype=np.int16) - np.asarray(want, dtype=np.int16))
        assert diff.max() <= 1 and diff.mean() < 0.01
        text = eng.text_conditioner(loaded)
        assert text.t5_tokenizer.encode("x").ids  # read from the folder
        data = json.loads((tok / "tokenizer.json").read_text())
        data["model"]["vocab"][5][0] = "▁ZZZ"  # the folder's own file is the one used
        (tok / "tokenizer.json").write_text(json.dumps(data))
        eng.models.unload()
        assert eng.text_conditioner(_load(eng, folder)).t5_tokenizer.encode("ZZZ").ids[0] == 5


def test_chosen_text_encoder_wins_and_is_recorded(tmp_path: Path) -> None:
    split = make_split_files("flux-schnell", tmp_path / "split")
    wrong = make_split_files("sd35-large", tmp_path / "sd3")["t5xxl"]
    te = tmp_path / "models" / "text_encoder"
    te.mkdir(parents=True)
    shutil.copy(split["clip_l"], te / "clip_l.safetensors")
    shutil.copy(wrong, te / "t5xxl_a_fp16.safetensors")  # too wide
    shutil.copy(split["t5xxl"], te / "t5xxl_b_fp16.safetensors")
    (tmp_path / "models" / "VAE").mkdir()
    shutil.copy(split["vae"], tmp_path / "models" / "VAE" / "ae.safetensors")
    ambiguous = r"2 t5xxl text encoders found in models/text_encoder \(t5xxl_a_fp16.safetensors, t5xxl_b_fp16.safetensors\): choose one in the VAE / Text Encoder picker"
    with pytest.raises(CheckpointError, match=ambiguous):
        make_engine(tmp_path).load_model(split["transformer"])
    shutil.copy(split["t5xxl"], te / "t5xxl_c_fp8_e4m3fn.safetensors")  # another tier is no ambiguity
    (te / "t5xxl_b_fp16.safetensors").unlink()
    with pytest.raises(CheckpointError, match="t5xxl_a_fp16.safetensors is 64 wide"):  # float before fp8
        make_engine(tmp_path).load_model(split["transformer"])
    shutil.copy(split["t5xxl"], te / "t5xxl_b_fp16.safetensors")
    eng = make_engine(tmp_path, text_encoders=("t5xxl_b_fp16",))
    model = _load(eng, split["transformer"])
    assert model.modules == ("ae", "clip_l", "t5xxl_b_fp16")
    assert "Module 1: ae, Module 2: clip_l, Module 3: t5xxl_b_fp16" in eng.txt2img(_params()).infotexts[0]
    with pytest.raises(CheckpointError, match="'nope' not found"):
        make_engine(tmp_path, text_encoders=("nope",)).load_model(split["transformer"])

"""`--t5-after-encoding free` on a tiny split FLUX.1-dev: T5's weights are released after encoding (meta
tensors, the old ones unreferenced), read again from models/text_encoder for the next job with bit-identical
images, a T5 LoRA lands on the re-read weights once (also mid-job, in a hires pass) and is reverted, and a T5
file that is gone or changed gives a clear error from the API while the server keeps working.

The reference for every image is the same files loaded with T5 kept (`keep`), in another engine.
"""
from __future__ import annotations

import gc
import json
import shutil
import weakref
from pathlib import Path

import httpx
import pytest
from safetensors.torch import save_file

from modules.errors import CheckpointError
from modules.pipeline.params import Txt2ImgParams
from modules.pipeline.t5_release import is_freed
from tests.api_server import start_server
from tests.conftest import make_engine
from tests.fixtures import make_tiny_lora as mk
from tests.fixtures.make_tiny_mmdit import make_split_files

SMALL = dict(steps=2, width=64, height=64, seed=5, sampler_name="Euler", cfg_scale=1.0, save_images=False)
HIRES = dict(enable_hr=True, hr_scale=1.5, hr_prompt="a cat in the snow", hr_upscaler="Latent", denoising_strength=0.5)


def write_models(root: Path, seed: int = 0) -> Path:
    """A split tiny FLUX.1-dev as users keep it: transformer, ae.safetensors, clip_l and t5xxl files."""
    parts = make_split_files("flux-dev", root / "parts", seed=seed)
    models = root / "models"
    for folder, name, part in (("Stable-diffusion", "flux.safetensors", "transformer"),
                               ("VAE", "ae.safetensors", "vae"), ("text_encoder", "clip_l.safetensors", "clip_l"),
                               ("text_encoder", "t5xxl_fp16.safetensors", "t5xxl")):
        (models / folder).mkdir(parents=True, exist_ok=True)
        shutil.copy(parts[part], models / folder / name)
    return models


def engine_for(root: Path, t5: str):
    engine = make_engine(root, t5_after_encoding=t5)
    engine.load_model("flux")
    return engine


def t5_of(engine):
    model = engine.require_model()
    return model.text_encoders[[s.flavour for s in model.spec.text_encoders].index("t5xxl")]


def write_t5_lora(engine, loras: Path) -> None:
    layers = mk.select(mk.module_layers(t5_of(engine), "lora_te3_"), ["SelfAttention_q", "SelfAttention_v"])
    loras.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in mk.lora_tensors(layers, seed=31).items()},
              str(loras / "t5only.safetensors"))


def image(engine, prompt: str = "a fox", **extra) -> bytes:
    result = engine.txt2img(Txt2ImgParams(prompt=prompt, **{**SMALL, **extra}))
    assert not result.warnings, result.warnings
    return result.images[0].tobytes()


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    """The same files twice: T5 freed after encoding, and T5 kept (the reference)."""
    root = tmp_path_factory.mktemp("t5-free")
    write_models(root)
    free, keep = engine_for(root, "free"), engine_for(root, "keep")
    write_t5_lora(keep, root / "models" / "Lora")
    return free, keep


def test_t5_is_released_after_a_job_and_read_again_bit_identically(engines) -> None:
    free, keep = engines
    t5 = t5_of(free)
    old = weakref.ref(next(t5.parameters()))
    first = image(free)
    gc.collect()
    assert is_freed(t5) and all(p.is_meta for p in [*t5.parameters(), *t5.buffers()])
    assert old() is None  # the weights read at load are no longer referenced anywhere
    reloads = free.t5_release.reloads
    second = image(free)
    assert free.t5_release.reloads == reloads + 1 and is_freed(t5)
    assert first == second == image(keep)
    assert not is_freed(t5_of(keep))


def test_t5_lora_applies_to_the_reread_weights_once_and_reverts(engines) -> None:
    free, keep = engines
    plain = image(free)
    assert is_freed(t5_of(free))
    with_lora = image(free, "a fox <lora:t5only:1:0>")
    assert with_lora != plain
    assert with_lora == image(keep, "a fox <lora:t5only:1:0>")  # once: twice or not at all would differ
    assert image(free) == plain  # reverted (and read again clean)


def test_t5_lora_is_added_again_when_a_hires_pass_reads_t5_mid_job(engines) -> None:
    free, keep = engines
    reloads = free.t5_release.reloads
    got = image(free, "a fox <lora:t5only:1:0>", **HIRES)
    assert free.t5_release.reloads == reloads + 2  # at the job's start and for the hires prompt
    assert got == image(keep, "a fox <lora:t5only:1:0>", **HIRES)
    assert got != image(keep, "a fox", **HIRES)


def test_a_gone_or_changed_t5_file_is_named_and_the_model_recovers(tmp_path: Path) -> None:
    models = write_models(tmp_path)
    engine = engine_for(tmp_path, "free")
    expected = image(engine)
    t5_file = models / "text_encoder" / "t5xxl_fp16.safetensors"
    t5_file.rename(tmp_path / "aside.safetensors")
    with pytest.raises(CheckpointError, match="t5xxl_fp16.safetensors is gone since the model was loaded"):
        image(engine)
    (tmp_path / "aside.safetensors").rename(t5_file)
    assert image(engine) == expected
    other = make_split_files("flux-dev", tmp_path / "other", seed=9)["t5xxl"]
    shutil.copy(other, t5_file)
    with pytest.raises(CheckpointError, match="changed since the model was loaded.*load the model again"):
        image(engine)
    engine.load_model("flux")  # the new file, read at load
    assert image(engine) != expected


BODY = {"prompt": "a fox", "steps": 2, "width": 64, "height": 64, "seed": 5, "sampler_name": "Euler", "cfg_scale": 1}


def _post(server, body: dict) -> httpx.Response:
    return httpx.post(f"{server.url}/sdapi/v1/txt2img", json=body, timeout=300)


def test_api_option_frees_t5_keeps_the_infotext_and_reports_a_gone_file(tmp_path: Path) -> None:
    models = write_models(tmp_path)
    server = start_server(tmp_path)
    try:
        url = server.url
        kept = _post(server, BODY)
        assert kept.status_code == 200, kept.text
        set_free = httpx.post(f"{url}/sdapi/v1/options", json={"memory_t5_after_encoding": "free"}, timeout=300)
        assert set_free.status_code == 200, set_free.text
        assert httpx.get(f"{url}/sdapi/v1/options").json()["memory_t5_after_encoding"] == "free"
        freed = _post(server, BODY)
        assert freed.status_code == 200, freed.text
        engine = server.context.app.engine
        assert is_freed(t5_of(engine))
        assert freed.json()["images"] == kept.json()["images"]
        assert json.loads(freed.json()["info"])["infotexts"] == json.loads(kept.json()["info"])["infotexts"]
        t5_file = models / "text_encoder" / "t5xxl_fp16.safetensors"
        t5_file.rename(tmp_path / "aside.safetensors")
        refused = _post(server, BODY)
        assert refused.status_code in (400, 409, 422, 500), refused.text
        assert "is gone since the model was loaded" in refused.text and "Traceback" not in refused.text
        assert httpx.get(f"{url}/sdapi/v1/options").status_code == 200  # the server is still up
        (tmp_path / "aside.safetensors").rename(t5_file)
        again = _post(server, BODY)
        assert again.status_code == 200 and again.json()["images"] == kept.json()["images"]
    finally:
        server.stop()


def test_free_under_a_managing_policy_reads_t5_back_where_the_placement_expects(tmp_path: Path) -> None:
    from modules.pipeline.memory_policy import MemoryPolicy

    write_models(tmp_path)
    engine = engine_for(tmp_path, "keep")
    expected = image(engine)
    engine.manage_on_cpu = True  # CPU-only machine: the placement manages anyway, with real CPU-to-CPU moves
    engine.set_memory_policy(MemoryPolicy("low", 0.0, t5_after_encoding="free"))
    assert engine.placement.enabled and engine.t5_release is not None
    assert image(engine) == expected and image(engine) == expected
    report = engine.memory_report()
    assert report["t5_after_encoding"] == "free" and report["components"]["t5xxl"]["resident_bytes"] == 0
    assert is_freed(t5_of(engine))
    engine.set_memory_policy(MemoryPolicy("low", 0.0))  # back to keep: T5 is read back for good
    assert engine.t5_release is None and not is_freed(t5_of(engine))
    assert image(engine) == expected


def test_a_q8_0_gguf_t5_is_read_back_packed_and_its_lora_applies_once(tmp_path: Path) -> None:
    from modules.checkpoints.packed import packed_weight
    from tests.fixtures.make_tiny_gguf import write_t5_gguf
    from tests.fixtures.make_tiny_mmdit import component_state_dicts

    models = write_models(tmp_path, seed=0)
    (models / "text_encoder" / "t5xxl_fp16.safetensors").unlink()
    write_t5_gguf(models / "text_encoder" / "t5-v1_1-xxl-encoder-Q8_0.gguf",
                  component_state_dicts("flux-dev")["t5xxl"], "Q8_0")
    free, keep = engine_for(tmp_path, "free"), engine_for(tmp_path, "keep")
    write_t5_lora(keep, models / "Lora")
    plain = image(free)
    assert is_freed(t5_of(free))
    assert image(free) == plain == image(keep)
    q = t5_of(free).encoder.block[0].layer[0].SelfAttention.q
    assert packed_weight(q).format == "Q8_0" and q.parametrizations.weight.original.dtype.itemsize == 1
    with_lora = image(free, "a fox <lora:t5only:1:0>")
    assert with_lora == image(keep, "a fox <lora:t5only:1:0>") != plain
    assert image(free) == plain and packed_weight(q).delta is None


def test_sd35_t5_from_an_all_in_one_file_and_a_diffusers_folder_is_read_back(tmp_path: Path) -> None:
    from tests.fixtures.make_tiny_mmdit import make_all_in_one

    checkpoint = make_all_in_one("sd35-medium", tmp_path / "models" / "Stable-diffusion" / "sd35.safetensors")
    free, keep = make_engine(tmp_path, t5_after_encoding="free"), make_engine(tmp_path, t5_after_encoding="keep")
    keep.load_model(checkpoint)
    folder = tmp_path / "models" / "Stable-diffusion" / "sd35-diffusers"
    model = keep.require_model()
    model.unet.save_pretrained(folder / "transformer")
    model.vae.save_pretrained(folder / "vae")
    for sub, enc in zip(("text_encoder", "text_encoder_2", "text_encoder_3"), model.text_encoders, strict=True):
        enc.save_pretrained(folder / sub)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    for source in (checkpoint, folder):  # T5 inside the checkpoint ("embedded"), then text_encoder_3/
        keep.load_model(source)
        free.load_model(source)
        want = image(keep, cfg_scale=4.5, negative_prompt="blur")
        assert image(free, cfg_scale=4.5, negative_prompt="blur") == want
        assert is_freed(t5_of(free)) and free.t5_release.model.t5_source.path.name in ("sd35.safetensors",
                                                                                        "text_encoder_3")
        assert image(free, cfg_scale=4.5, negative_prompt="blur") == want


def test_leaving_free_while_the_t5_file_is_gone_names_it_and_a_reload_recovers(tmp_path: Path) -> None:
    from modules.pipeline.memory_policy import MemoryPolicy

    models = write_models(tmp_path)
    engine = engine_for(tmp_path, "free")
    expected = image(engine)
    t5_file = models / "text_encoder" / "t5xxl_fp16.safetensors"
    t5_file.rename(tmp_path / "aside.safetensors")
    with pytest.raises(CheckpointError, match="is gone since the model was loaded"):
        engine.set_memory_policy(MemoryPolicy("none", t5_after_encoding="keep"))
    with pytest.raises(CheckpointError, match="is gone since the model was loaded"):
        image(engine)  # still named, not a failure deep inside T5
    (tmp_path / "aside.safetensors").rename(t5_file)
    engine.load_model("flux")
    assert engine.t5_release is None and not is_freed(t5_of(engine))
    assert image(engine) == expected


def test_the_flag_sets_the_policy_choice() -> None:
    from modules.pipeline.memory_policy import policy_from_settings
    from modules.settings import parse_settings

    settings = parse_settings(["--memory-policy", "low", "--t5-after-encoding", "free"])
    assert policy_from_settings(settings).t5_after_encoding == "free"

"""--compile-freeze: inductor's frozen (prepacked) UNet and VAE decoder give eager's images, and a job
with a real LoRA file runs the patched UNet eagerly, then the frozen graph comes back unchanged.

This is real inductor code generation of the tiny SD1 checkpoint (frozen graphs bypass inductor's
on-disk FX graph cache, so it compiles in every run)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from modules.pipeline.compiled import FrozenCall, is_compiled
from tests.conftest import make_engine
from tests.fixtures import make_tiny_lora as mk
from tests.test_openvino import image, psnr

pytestmark = pytest.mark.slow
LORA = "a red circle <lora:style:1>"


@pytest.fixture(scope="module")
def engines(tmp_path_factory, tiny_sd1):
    torch._dynamo.reset()
    root = tmp_path_factory.mktemp("freeze")
    loras = root / "loras"
    eager = make_engine(root / "eager", lora_dirs=(loras,))
    eager.load_model(tiny_sd1)
    model = eager.models.current
    mk.write(mk.lora_tensors(mk.module_layers(model.unet, "lora_unet_"), seed=1), loras / "style.safetensors")
    frozen = make_engine(root / "frozen", lora_dirs=(loras,), compile=True, compile_freeze=True)
    frozen.load_model(tiny_sd1)
    yield eager, frozen
    torch._dynamo.reset()  # frees the frozen graphs' weight copies


def calls(engine) -> dict[str, FrozenCall]:
    model = engine.models.current
    return {"unet": model.unet._compiled_call_impl, "vae_decoder": model.vae.decoder._compiled_call_impl}


def test_frozen_images_match_eager(engines):
    eager, frozen = engines
    assert all(isinstance(c, FrozenCall) for c in calls(frozen).values())
    assert is_compiled(frozen.models.current.unet)
    assert psnr(image(frozen), image(eager)) >= 45
    assert all(c.eager_calls == 0 for c in calls(frozen).values())


def test_a_lora_job_runs_eagerly_and_the_frozen_graph_returns(engines):
    eager, frozen = engines
    before = image(frozen)
    styled = image(frozen, LORA)
    assert calls(frozen)["unet"].eager_calls > 0  # the patched weights are not the frozen constants
    assert psnr(styled, image(eager, LORA)) >= 45  # so the LoRA applies as in eager mode
    assert np.abs(styled - before).max() > 10
    eager_calls = calls(frozen)["unet"].eager_calls
    assert np.array_equal(image(frozen), before)  # the LoRA reverted: frozen again, the same image
    assert calls(frozen)["unet"].eager_calls == eager_calls


def test_the_load_keeps_the_weight_digests_by_checkpoint_hash(engines):
    _, frozen = engines
    saved = sorted(p.name for p in (frozen.settings.data_dir / "cache" / "frozen").glob("*.digests.json"))
    model = frozen.models.current
    assert len(saved) == 2 and all(name.startswith(model.model_hash) for name in saved), saved

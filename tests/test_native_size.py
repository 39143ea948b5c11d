"""A model's native size comes from its spec: the family's latent sample size, or the checkpoint's own
SAI ModelSpec `modelspec.resolution` (the bundled demo model declares 128x128)."""
from __future__ import annotations

import pytest
from safetensors import safe_open

from modules.checkpoints.detect import detect_model_spec
from modules.demo import DEMO_CHECKPOINT


def read(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}


@pytest.mark.parametrize("arch,force_v,size", [("sd1", False, 512), ("sd2", True, 768), ("sdxl", False, 1024)])
def test_family_native_sizes(tiny_checkpoints, arch, force_v, size):
    sd, metadata = read(tiny_checkpoints[arch])
    spec = detect_model_spec(sd, metadata=metadata, force_v=force_v)
    assert spec.default_size == size
    assert spec.vae_config["sample_size"] == size


def test_declared_resolution_wins(tiny_checkpoints):
    sd, _ = read(tiny_checkpoints["sd1"])
    assert detect_model_spec(sd, metadata={"modelspec.resolution": "256x256"}).default_size == 256
    for bad in ("huge", "8x8", ""):  # unreadable or absurd: the family's size stays
        assert detect_model_spec(sd, metadata={"modelspec.resolution": bad}).default_size == 512


@pytest.mark.skipif(not DEMO_CHECKPOINT.exists(), reason="bundled demo checkpoint missing")
def test_demo_model_is_128():
    sd, metadata = read(DEMO_CHECKPOINT)
    assert detect_model_spec(sd, metadata=metadata).default_size == 128


def test_flow_families_declare_their_size():
    from modules.checkpoints.families import FAMILIES
    from modules.checkpoints.model import ModelSpec

    for family in FAMILIES.values():
        spec = ModelSpec(arch=family.name, prediction="flow", unet_config={}, vae_config={}, text_encoders=(),
                         family=family)
        assert spec.default_size == family.size == 1024

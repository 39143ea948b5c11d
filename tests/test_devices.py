"""Device, dtype and layout choices: bf16 by default only on CPUs with bf16 hardware; explicit fp32 unchanged."""
from __future__ import annotations

import pytest
import torch

from modules.devices import cpu_flags, cpu_has_fast_bf16, device_config
from modules.errors import InvalidParams

ZEN4 = {"fpu", "avx2", "avx512f", "avx512_bf16"}
SAPPHIRE_RAPIDS = {"avx2", "avx512f", "amx_tile", "amx_bf16"}
OLD_XEON = {"avx2", "avx512f"}


def test_cpu_flags_read_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx2 avx512_bf16\n\n")
    assert cpu_flags(info) == {"fpu", "avx2", "avx512_bf16"}
    assert cpu_flags(tmp_path / "missing") == set()


@pytest.mark.parametrize(("flags", "fast"), [(ZEN4, True), (SAPPHIRE_RAPIDS, True), (OLD_XEON, False), (set(), False)])
def test_fast_bf16_needs_hardware(flags, fast):
    assert cpu_has_fast_bf16(flags) is fast


def test_auto_on_a_bf16_cpu_is_bf16_with_channels_last():
    config = device_config("cpu", "auto", flags=ZEN4)
    assert config.dtype == config.vae_dtype == torch.bfloat16
    assert config.channels_last and config.attention == "sdpa"


def test_auto_without_bf16_hardware_stays_fp32():
    config = device_config("cpu", "auto", flags=OLD_XEON)
    assert config.dtype == config.vae_dtype == torch.float32 and not config.channels_last


def test_explicit_fp32_ignores_the_cpu_flags():
    config = device_config("cpu", "fp32", flags=ZEN4)
    assert config.dtype == config.vae_dtype == torch.float32 and not config.channels_last


def test_explicit_bf16_on_any_cpu():
    assert device_config("cpu", "bf16", flags=OLD_XEON).dtype == torch.bfloat16


def test_fp16_refused_on_the_cpu():
    with pytest.raises(InvalidParams, match="fp16"):
        device_config("cpu", "fp16", flags=ZEN4)


def test_describe_names_the_choice():
    config = device_config("cpu", "auto", flags=ZEN4)
    assert "bfloat16" in config.describe() and "channels_last" in config.describe()
    assert config.pad_attention_heads and "heads padded to 16" in config.describe()
    fp32 = device_config("cpu", "fp32", flags=ZEN4)
    assert not fp32.pad_attention_heads and "padded" not in fp32.describe()

"""Reading a safetensors checkpoint straight into the compute dtype: same values, no second full copy."""
from __future__ import annotations

import pytest
import torch

from modules.checkpoints.read import read_state_dict
from modules.errors import CheckpointError


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_read_as_dtype_matches_read_then_convert(tiny_sd1, dtype):
    plain = read_state_dict(tiny_sd1)
    direct = read_state_dict(tiny_sd1, dtype=dtype)
    assert direct.keys() == plain.keys()
    for key, value in plain.items():
        want = value.to(dtype) if value.is_floating_point() else value
        assert direct[key].dtype == want.dtype and torch.equal(direct[key], want), key


def test_read_as_dtype_refuses_truncated_files(tiny_sd1, tmp_path):
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(tiny_sd1.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="truncated"):
        read_state_dict(cut, dtype=torch.bfloat16)

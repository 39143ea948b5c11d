"""api.flux_keys_to_diffusers (plugin API 1.11): Black Forest Labs' FLUX.1 names -> diffusers' names, checked
against diffusers' own single-file converter; tensors outside the layout are one InvalidParams naming them."""
from __future__ import annotations

import pytest
import torch

from modules.plugins import api
from tests.fixtures.make_tiny_mmdit import FLUX_REAL, flux_shapes
from tests.test_flow_models import _thin


def test_api_flux_keys_to_diffusers_matches_diffusers_converter():
    """At FLUX.1's real width (diffusers' converter is fixed to 3072): same names, same rows, width inferred."""
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    thin = _thin(flux_shapes(FLUX_REAL, guidance=True))
    ref = convert_flux_transformer_checkpoint_to_diffusers(dict(thin))
    ours = api.flux_keys_to_diffusers(thin)
    assert set(ours) == set(ref) and len(ours) > 40
    for key in ref:
        assert torch.equal(ours[key], ref[key]), key


def test_api_flux_keys_to_diffusers_takes_an_explicit_width():
    """Single blocks without img_in: `hidden` splits linear1 into q, k, v and the MLP's input."""
    state = {"single_blocks.0.linear1.weight": torch.arange(4 * 2 + 8).reshape(-1, 1)}
    out = api.flux_keys_to_diffusers(state, hidden=2)
    assert out["single_transformer_blocks.0.attn.to_k.weight"].flatten().tolist() == [2, 3]
    assert out["single_transformer_blocks.0.proj_mlp.weight"].shape[0] == 10


@pytest.mark.parametrize(("state", "named"), [
    ({"img_in.weight": torch.zeros(4, 2), "lora_up.weight": torch.zeros(1)}, "lora_up.weight"),
    ({"double_blocks.x.img_mod.lin.weight": torch.zeros(1)}, "block number"),
    ({"single_blocks.0.linear1.weight": torch.zeros(1)}, "hidden"),
])
def test_api_flux_keys_to_diffusers_names_what_does_not_fit(state, named):
    with pytest.raises(api.InvalidParams, match=named):
        api.flux_keys_to_diffusers(state)

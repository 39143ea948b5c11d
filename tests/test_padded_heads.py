"""Self-attention heads zero-padded to 16 dims (the frozen CPU path): the same outputs as diffusers' own
SDPA processor, in-place weight patches seen at once, and everything unusual left to the layer's processor."""
from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from modules.sampling.padded_heads import PaddedHeadsSelfAttention, pad_self_attention_heads


def attention(bias: bool = False, residual: bool = False) -> Attention:
    torch.manual_seed(0)
    layer = Attention(query_dim=40, heads=4, dim_head=10, bias=bias, out_bias=True, residual_connection=residual)
    return layer.eval().requires_grad_(False)


def both(layer: Attention, x: torch.Tensor, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    return AttnProcessor2_0()(layer, x, **kwargs), PaddedHeadsSelfAttention(AttnProcessor2_0())(layer, x, **kwargs)


@pytest.mark.parametrize("bias,residual", [(False, False), (True, True)])
def test_padded_heads_give_the_unpadded_output(bias, residual):
    layer = attention(bias, residual)
    x = torch.randn(2, 24, 40)
    plain, padded = both(layer, x)
    assert plain.shape == padded.shape
    torch.testing.assert_close(padded, plain, atol=1e-5, rtol=1e-5)


def test_an_in_place_weight_patch_applies_at_once():
    layer = attention()
    x = torch.randn(1, 16, 40)
    before = PaddedHeadsSelfAttention(AttnProcessor2_0())(layer, x)
    with torch.no_grad():
        layer.to_q.weight.add_(0.5 * torch.randn_like(layer.to_q.weight))  # what a LoRA patch does
        layer.to_out[0].weight.mul_(2)
    plain, padded = both(layer, x)
    torch.testing.assert_close(padded, plain, atol=1e-5, rtol=1e-5)
    assert (padded - before).abs().max() > 0.1


class Recorder:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        self.calls += 1
        return AttnProcessor2_0()(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


@pytest.mark.parametrize("case", ["context", "mask", "4-D input"])
def test_unusual_calls_go_to_the_layers_own_processor(case):
    layer, recorder = attention(), Recorder()
    x = torch.randn(1, 16, 40)
    kwargs = {"context": {"encoder_hidden_states": torch.randn(1, 5, 40)},
              "mask": {"attention_mask": torch.zeros(1, 16, 16)}, "4-D input": {}}[case]
    if case == "4-D input":
        x = torch.randn(1, 40, 4, 4)
    out = PaddedHeadsSelfAttention(recorder)(layer, x, **kwargs)
    assert recorder.calls == 1
    torch.testing.assert_close(out, AttnProcessor2_0()(layer, x, **kwargs))


def tiny_unet(head_channels: int) -> UNet2DConditionModel:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=24,
                                attention_head_dim=head_channels, norm_num_groups=8, sample_size=8,
                                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
    return unet.eval().requires_grad_(False)


def test_the_unet_pads_its_self_attention_only_and_keeps_its_output():
    unet = tiny_unet(8)  # 8 heads: dims 4 and 8
    x, t, context = torch.randn(2, 4, 8, 8), torch.tensor([10, 10]), torch.randn(2, 3, 24)
    plain = unet(x, t, context).sample
    count = pad_self_attention_heads(unet)
    layers = [m for m in unet.modules() if isinstance(m, Attention)]
    padded = [m for m in layers if isinstance(m.processor, PaddedHeadsSelfAttention)]
    assert count == len(padded) == len([m for m in layers if not m.is_cross_attention]) > 0
    assert all(not m.is_cross_attention for m in padded)
    assert pad_self_attention_heads(unet) == 0  # a second call pads nothing twice
    torch.testing.assert_close(unet(x, t, context).sample, plain, atol=1e-5, rtol=1e-4)


def test_heads_already_a_multiple_of_16_and_unusual_projections_stay_as_they_are():
    assert pad_self_attention_heads(tiny_unet(2)) == 0  # 2 heads: dims 16 and 32

    class PatchedLinear(torch.nn.Linear):  # a wrapper such as a packed-weight layer
        pass

    unet = tiny_unet(8)
    layer = next(m for m in unet.modules() if isinstance(m, Attention) and not m.is_cross_attention)
    old = layer.to_q
    layer.to_q = PatchedLinear(old.in_features, old.out_features, bias=False)
    selves = len([m for m in unet.modules() if isinstance(m, Attention) and not m.is_cross_attention])
    assert pad_self_attention_heads(unet) == selves - 1
    assert not isinstance(layer.processor, PaddedHeadsSelfAttention)


def test_a_frozen_padded_layer_matches_and_a_patch_runs_eagerly():
    """Under inductor's freezing the padded weights become constants; a patched weight sends the call to eager."""
    from modules.pipeline.compiled import freeze_module

    layer, x = attention(bias=True), torch.randn(1, 16, 40)
    plain = layer(x)
    layer.set_processor(PaddedHeadsSelfAttention(AttnProcessor2_0()))
    frozen = freeze_module(layer)
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), plain, atol=1e-5, rtol=1e-4)
        assert frozen.eager_calls == 0
        layer.to_v.weight.mul_(3)  # what a LoRA patch does, in place
        patched = layer(x)
    assert frozen.eager_calls == 1
    torch.testing.assert_close(patched, AttnProcessor2_0()(layer, x), atol=1e-5, rtol=1e-4)
    assert (patched - plain).abs().max() > 1e-2


def test_a_bf16_cpu_engine_pads_its_unet_and_fp32_does_not(tmp_path, tiny_sd1, sd1_engine):
    from tests.conftest import make_engine

    engine = make_engine(tmp_path, precision="bf16")
    engine.load_model(tiny_sd1)
    padded = [m for m in engine.models.current.unet.modules() if isinstance(getattr(m, "processor", None),
                                                                           PaddedHeadsSelfAttention)]
    assert engine.devices.pad_attention_heads and len(padded) > 0
    assert not any(isinstance(getattr(m, "processor", None), PaddedHeadsSelfAttention)
                   for m in sd1_engine.models.current.unet.modules())  # fp32: as it was


def test_flux_attention_layers_are_left_alone():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    flux = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                  attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                  pooled_projection_dim=8, axes_dims_rope=(2, 2, 4))
    assert pad_self_attention_heads(flux) == 0  # heads of 8 dims, but FluxAttention takes other arguments

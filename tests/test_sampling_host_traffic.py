"""A sampling step on an accelerator must not copy between host and device.

On CUDA every such copy waits for the GPU's queue to drain, so the CPU cannot queue the next
UNet call while the GPU runs this one. The meta device stands in for the accelerator: a copy
out of it fails, and a dispatch mode records every op that mixes host and device tensors.
"""
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from modules.sampling.denoisers import CFGDenoiser, Cond, ModelDenoiser
from modules.sampling.schedules import DiscreteSchedule, scaled_linear_alphas_cumprod

META = torch.device("meta")


class HostDeviceTraffic(TorchDispatchMode):
    """Records ops whose (non-scalar) inputs and outputs sit on different sides of the host boundary."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = {t.device.type for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.dim()}
        out = func(*args, **kwargs)
        outputs = {t.device.type for t in tree_leaves(out) if isinstance(t, torch.Tensor)}
        if ("cpu" in inputs and "meta" in outputs) or ("meta" in inputs and "cpu" in outputs):
            self.ops.append(str(func))
        return out


def _guided_denoiser(batch: int) -> CFGDenoiser:
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=32,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=2).to(META)
    schedule = DiscreteSchedule(scaled_linear_alphas_cumprod())
    conds = [[([(10, Cond(torch.zeros(1, 77, 32, device=META)))], 1.0)] for _ in range(batch)]
    unconds = [[(10, Cond(torch.zeros(1, 77, 32, device=META)))] for _ in range(batch)]
    return CFGDenoiser(ModelDenoiser(unet, schedule.sigma_to_t), conds, unconds, 7.0)


def test_a_guided_step_on_a_device_stays_on_the_device():
    denoiser = _guided_denoiser(batch=2)
    x = torch.zeros(2, 4, 8, 8, device=META)
    denoiser(x, x.new_full((2,), 3.0))  # the first step may place its tables on the device, once
    with HostDeviceTraffic() as traffic:
        out = denoiser(x, x.new_full((2,), 1.5))
    assert out.shape == x.shape and out.device == META
    assert traffic.ops == []


def test_sigma_to_t_on_the_device_matches_the_host():
    schedule = DiscreteSchedule(scaled_linear_alphas_cumprod())
    sigmas = torch.tensor([20.0, 3.0, 0.5, 0.001])
    assert schedule.sigma_to_t(sigmas.to(META)).device == META
    expected = torch.tensor([999.0, 673.1553, 169.3146, 0.0])
    torch.testing.assert_close(schedule.sigma_to_t(sigmas)[1:3], expected[1:3], atol=1e-3, rtol=0)
    assert schedule.sigma_to_t(sigmas)[0] == 999 and schedule.sigma_to_t(sigmas)[3] == 0  # clamped ends

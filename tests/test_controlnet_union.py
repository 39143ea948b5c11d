"""SDXL union/ProMax ControlNets (controlnet-union-sdxl-1.0's diffusers layout) in the controlnet extension:
residuals against diffusers' ControlNetUnionModel for the unit's control type, control types by name, number
or preprocessor, and the errors."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import save_file

diffusers = pytest.importorskip("diffusers")

from extensions.controlnet import control  # noqa: E402
from extensions.controlnet.models import ControlNetLibrary, read_controlnet  # noqa: E402
from extensions.controlnet.units import Unit, parse_unit  # noqa: E402
from modules.plugins import api  # noqa: E402
from tests.fixtures.make_tiny_controlnet import diffusers_config  # noqa: E402
from tests.test_controlnet import hint_image  # noqa: E402


def tiny_union(types: int, seed: int):
    """A tiny SDXL ControlNetUnionModel (diffusers' own class), every tensor random."""
    config = {k: v for k, v in diffusers_config("sdxl").items() if k != "_class_name"}
    config.update(num_control_type=types, num_trans_channel=32, num_trans_head=8, num_trans_layer=1,
                  num_proj_channel=32)
    torch.manual_seed(seed)
    model = diffusers.ControlNetUnionModel(**config)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * (p.shape[-1] ** -0.5 if p.ndim > 1 else 0.1))
    return model.eval()


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    folder = tmp_path_factory.mktemp("union")
    tiny_union(8, 1).save_pretrained(folder / "controlnet-union-promax-sdxl")
    six = tiny_union(6, 2)
    save_file({k: v.contiguous() for k, v in six.state_dict().items()}, str(folder / "union-sdxl.safetensors"))
    return ControlNetLibrary((folder,))


def residuals(library, unit):
    planned = control.plan_units([unit], library)
    control.check_arch(planned, library, "sdxl")
    context = api.DenoiserContext("txt2img", "first", None, 64, 64, (), (), 7.0, torch.linspace(10, 0, 5), arch="sdxl")
    return control.Residuals(planned, control.prepare_hints(planned, {}, context, library.roots[0], 0), library,
                             context)


def sdxl_call():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    added = {"text_embeds": torch.randn(2, 32, generator=gen), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)}
    return api.UNetCall(x=x, sigma=torch.full((2,), 2.0), model_in=x / 5 ** 0.5, timestep=torch.full((2,), 500.0),
                        cross_attn=torch.randn(2, 77, 64, generator=gen), added_cond=added,
                        uncond=torch.tensor([False, True]))


@pytest.mark.parametrize(("name", "types"), [("controlnet-union-promax-sdxl", 8), ("union-sdxl", 6)])
def test_residuals_match_diffusers_union_model(library, name, types):
    cn = read_controlnet(library.find(name))
    assert (cn.kind, cn.layout, cn.arch) == ("controlnet_union", "union", "sdxl")
    ref = diffusers.ControlNetUnionModel.from_pretrained(str(library.find(name)), local_files_only=True) \
        if library.find(name).is_dir() else tiny_union(types, 2)
    call = sdxl_call()
    hint = residuals(library, Unit(image=hint_image(), model=name, union_control_type="Depth")).hints[0]
    outs = {}
    for idx in (1, 3):
        ours = residuals(library, Unit(image=hint_image(), model=name, union_control_type=str(idx)))(call)
        one_hot = torch.zeros(2, types)
        one_hot[:, idx] = 1
        with torch.no_grad():
            down, mid = ref(call.model_in, call.timestep, encoder_hidden_states=call.cross_attn,
                            controlnet_cond=[hint.expand(2, -1, -1, -1)], control_type=one_hot, control_type_idx=[idx],
                            added_cond_kwargs=call.added_cond, return_dict=False)
        for a, b in zip((*ours.down, ours.mid), (*down, mid), strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        outs[idx] = ours.mid
    assert (outs[1] - outs[3]).abs().max() > 1e-4  # the control type matters


def test_control_type_by_name_number_or_preprocessor(library):
    name = "controlnet-union-promax-sdxl"
    by = [residuals(library, Unit(image=hint_image(), model=name, **kw)).union[0] for kw in
          ({"union_control_type": "Canny"}, {"union_control_type": "3"}, {"module": "canny"},
           {"union_control_type": "soft edge"}, {"module": "tile_resample"})]
    assert by == [3, 3, 3, 2, 6]
    assert parse_unit({"model": name, "union_control_type": "Depth"}, 0).union_control_type == "Depth"


def test_union_errors_name_the_field_and_both_architectures(library):
    with pytest.raises(api.InvalidParams, match="'union_control_type': 'Unknown' does not pick"):
        residuals(library, Unit(image=hint_image(), model="union-sdxl", module="none"))
    with pytest.raises(api.InvalidParams, match="knows 6 control types, not 'Tile'"):
        residuals(library, Unit(image=hint_image(), model="union-sdxl", union_control_type="Tile"))(sdxl_call())
    planned = control.plan_units([Unit(image=hint_image(), model="union-sdxl")], library)
    with pytest.raises(api.InvalidParams, match="is a SDXL ControlNet, but the loaded checkpoint is SD1.5"):
        control.check_arch(planned, library, "sd1")
    assert dataclasses.replace(planned[0].unit, union_control_type="Canny").union_control_type == "Canny"

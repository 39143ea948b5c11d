"""--medvram / --lowvram placement decisions, checked on the CPU with a recorder instead of real moves."""
from __future__ import annotations

import pytest
import torch

from modules.pipeline.offload import Placement, unet_blocks

GPU = torch.device("cuda", 0)  # only named: the recorder never moves anything
CPU = torch.device("cpu")


class Recorder:
    """Records (name, device) moves; keeps each module's notional device."""

    def __init__(self, names: dict[int, str]) -> None:
        self.names = names
        self.moves: list[tuple[str, str]] = []
        self.where: dict[str, str] = {}

    def __call__(self, module: torch.nn.Module, device: torch.device) -> None:
        name = self.names.get(id(module), type(module).__name__)
        self.moves.append((name, device.type))
        self.where[name] = device.type

    def on_gpu(self) -> set[str]:
        return {n for n, d in self.where.items() if d == "cuda"}


def parts(model):
    names = {id(model.unet): "unet", id(model.vae): "vae", id(model.text_encoders[0]): "text"}
    names.update({id(b): f"block{i}" for i, b in enumerate(unet_blocks(model.unet))})
    return names


def run_job(engine, model, size: int = 64) -> None:
    from modules.pipeline.params import Txt2ImgParams

    engine.txt2img(Txt2ImgParams(prompt="a red circle", steps=2, sampler_name="Euler", seed=1, width=size,
                                 height=size, save_images=False))
    del model


@pytest.fixture()
def tiny_model(sd1_engine):
    return sd1_engine.require_model()


def test_normal_and_cpu_placements_do_nothing(tiny_model):
    recorder = Recorder(parts(tiny_model))
    for placement in (Placement("normal", GPU, mover=recorder, move_inputs=False), Placement("medvram", CPU, mover=recorder, move_inputs=False)):
        assert not placement.enabled
        placement.attach(tiny_model.unet, tiny_model.vae, tiny_model.text_encoders)
        placement.detach()
    assert recorder.moves == []
    assert Placement("normal", GPU).load_device() == GPU
    assert Placement("lowvram", GPU).load_device() == CPU


def test_unknown_mode_refused():
    with pytest.raises(ValueError, match="VRAM mode"):
        Placement("tinyvram", GPU)


def test_medvram_keeps_one_part_on_the_gpu(sd1_engine, tiny_model):
    recorder = Recorder(parts(tiny_model))
    placement = Placement("medvram", GPU, mover=recorder, move_inputs=False)
    placement.attach(tiny_model.unet, tiny_model.vae, tiny_model.text_encoders)
    try:
        assert recorder.moves == [("text", "cpu"), ("vae", "cpu"), ("unet", "cpu")]  # parked
        recorder.moves.clear()
        seen: list[set[str]] = []
        tiny_model.unet.register_forward_pre_hook(lambda *_: seen.append(recorder.on_gpu()))
        run_job(sd1_engine, tiny_model)
    finally:
        placement.detach()
    # Text first, then the UNet (text back to the CPU), then the VAE (UNet back): one part at a time.
    assert recorder.moves == [("text", "cuda"), ("text", "cpu"), ("unet", "cuda"), ("unet", "cpu"), ("vae", "cuda")]
    assert all(s == {"unet"} for s in seen)


def test_lowvram_moves_the_unet_block_by_block(sd1_engine, tiny_model):
    names = parts(tiny_model)
    blocks = [names[id(b)] for b in unet_blocks(tiny_model.unet)]
    recorder = Recorder(names)
    placement = Placement("lowvram", GPU, mover=recorder, move_inputs=False)
    placement.attach(tiny_model.unet, tiny_model.vae, tiny_model.text_encoders)
    try:
        recorder.moves.clear()
        peak: list[int] = []
        for block in unet_blocks(tiny_model.unet):
            block.register_forward_hook(lambda *_: peak.append(len(recorder.on_gpu())))
        run_job(sd1_engine, tiny_model)
    finally:
        placement.detach()
    assert ("unet", "cuda") not in recorder.moves  # never the whole UNet
    to_gpu = [n for n, d in recorder.moves if d == "cuda"]
    assert to_gpu[0] == "text" and to_gpu[-1] == "vae"
    assert set(blocks) <= set(to_gpu)
    assert max(peak) == 1  # only the running block is on the GPU
    assert recorder.where["text"] == "cpu" and all(recorder.where[b] == "cpu" for b in blocks[:-1])


def test_detach_removes_the_hooks(sd1_engine, tiny_model):
    recorder = Recorder(parts(tiny_model))
    placement = Placement("medvram", GPU, mover=recorder, move_inputs=False)
    placement.attach(tiny_model.unet, tiny_model.vae, tiny_model.text_encoders)
    placement.detach()
    recorder.moves.clear()
    run_job(sd1_engine, tiny_model)
    assert recorder.moves == []


def test_settings_flags(tmp_path):
    from modules.settings import parse_settings

    assert parse_settings([]).vram == "normal"
    assert parse_settings(["--medvram"]).vram == "medvram"
    assert parse_settings(["--lowvram"]).vram == "lowvram"
    with pytest.raises(SystemExit):
        parse_settings(["--medvram", "--lowvram"])

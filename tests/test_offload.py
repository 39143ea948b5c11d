"""Memory policies (none / normal / low with a budget; --medvram, --lowvram, --offload), checked on the CPU.

A recorder stands in for the mover: it keeps each module's notional device and counts the bytes on the
"GPU" from the modules themselves (not from the placement's bookkeeping), so the tests see what a real
device would hold. The bit-identity tests run the real mover with CPU-to-CPU moves that copy every weight.
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from modules.pipeline.memory_policy import GIB, MemoryPolicy, policy_from_settings
from modules.pipeline.offload import Placement, build_component
from modules.pipeline.params import Txt2ImgParams

GPU = torch.device("cuda", 0)  # only named: the recorder never moves anything
CPU = torch.device("cpu")


def module_bytes(module: torch.nn.Module) -> dict[int, int]:
    return {id(t): t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()]}


class Recorder:
    """Records (name, device) moves and the peak of weight bytes on the GPU."""

    def __init__(self, names: dict[int, str] | None = None) -> None:
        self.names = names or {}
        self.moves: list[tuple[str, str]] = []
        self.on_gpu: dict[int, torch.nn.Module] = {}
        self.peak = 0

    def name(self, module: torch.nn.Module) -> str:
        return self.names.get(id(module), type(module).__name__)

    def __call__(self, module: torch.nn.Module, device: torch.device) -> None:
        self.moves.append((self.name(module), device.type))
        if device.type == "cuda":
            self.on_gpu[id(module)] = module
        else:
            self.on_gpu.pop(id(module), None)
        self.peak = max(self.peak, self.gpu_bytes())

    def gpu_bytes(self) -> int:
        tensors: dict[int, int] = {}
        for module in self.on_gpu.values():
            tensors.update(module_bytes(module))
        return sum(tensors.values())

    def gpu_names(self) -> set[str]:
        return {self.name(m) for m in self.on_gpu.values()}


def unit_names(placement: Placement) -> dict[int, str]:
    return {id(m): u.name for u in placement.units() for m in u.modules}


def attach(model, policy: MemoryPolicy, recorder: Recorder, free: int | None = None) -> Placement:
    placement = Placement(policy, GPU, mover=recorder, move_inputs=False, free_memory=lambda _d: free)
    names = [s.flavour for s in model.spec.text_encoders]
    placement.attach(model.unet, model.vae, model.text_encoders, names,
                     "transformer" if model.spec.family is not None else "unet")
    recorder.names.update(unit_names(placement))
    recorder.moves.clear()
    return placement


def run_job(engine, steps: int = 2, size: int = 64, **kw) -> object:
    return engine.txt2img(Txt2ImgParams(prompt="a red circle", steps=steps, sampler_name="Euler", seed=1, width=size,
                                        height=size, save_images=False, cfg_scale=kw.pop("cfg_scale", 7.0), **kw))


def component_of(name: str) -> str:
    return name.split(".", 1)[0]


@pytest.fixture(scope="module")
def flux_engine(tmp_path_factory):
    from tests.conftest import make_engine
    from tests.fixtures.make_tiny_mmdit import make_all_in_one

    root = tmp_path_factory.mktemp("flux-offload")
    engine = make_engine(root / "engine")
    engine.load_model(make_all_in_one("flux-dev", root / "flux-dev.safetensors"))
    return engine


@pytest.fixture()
def sd1_model(sd1_engine):
    return sd1_engine.require_model()


# ---------------------------------------------------------------- policies and flags

def test_flags_map_onto_policies():
    from modules.settings import parse_settings

    def policy(*argv):
        p = policy_from_settings(parse_settings(list(argv)))
        return p.mode, p.gpu_weights

    assert policy() == ("none", None)
    assert policy("--medvram") == ("low", math.inf) == policy("--offload", "model")
    assert policy("--lowvram") == ("low", 0.0) == policy("--offload", "sequential")
    assert policy("--offload", "none") == ("none", None)
    assert policy("--memory-policy", "normal") == ("normal", None)
    assert policy("--memory-policy", "low", "--gpu-weights", "6") == ("low", 6.0)
    assert policy("--medvram", "--gpu-weights", "3.5") == ("low", 3.5)
    settings = parse_settings(["--memory-policy", "normal", "--keep-free", "1.5", "--t5-after-encoding", "cpu"])
    assert policy_from_settings(settings) == MemoryPolicy("normal", None, 1.5, "cpu")
    for bad in (["--gpu-weights", "-1"], ["--keep-free", "nan"], ["--gpu-weights", "lots"]):
        with pytest.raises(SystemExit):
            parse_settings(bad)
    for clash in (["--medvram", "--lowvram"], ["--medvram", "--memory-policy", "low"], ["--offload", "model",
                                                                                          "--lowvram"]):
        with pytest.raises(SystemExit):
            parse_settings(clash)


@pytest.mark.parametrize("bad", [dict(mode="tiny"), dict(gpu_weights=-1), dict(keep_free=float("nan")),
                                 dict(t5_after_encoding="gpu"), dict(gpu_weights=True)])
def test_bad_policies_are_refused_by_name(bad):
    from modules.errors import InvalidParams

    with pytest.raises(InvalidParams, match="memory policy|gpu_weights|keep_free|t5_after_encoding"):
        MemoryPolicy(**bad)


def test_budget_is_free_memory_minus_the_target_unless_given():
    assert MemoryPolicy("normal", keep_free=2).budget(10 * GIB) == 8 * GIB
    assert MemoryPolicy("normal", keep_free=2).budget(GIB) == 0
    assert MemoryPolicy("normal", gpu_weights=5, keep_free=2).budget(10 * GIB) == 5 * GIB
    assert MemoryPolicy("normal").budget(None) == math.inf  # no free-memory query (not CUDA)


def test_none_and_cpu_placements_do_nothing(sd1_model):
    recorder = Recorder()
    for placement in (Placement(MemoryPolicy("none"), GPU, mover=recorder),
                      Placement(MemoryPolicy("low", 0.0), CPU, mover=recorder)):
        assert not placement.enabled
        placement.attach(sd1_model.unet, sd1_model.vae, sd1_model.text_encoders)
        placement.detach()
    assert recorder.moves == []
    assert Placement(MemoryPolicy("none"), GPU).load_device() == GPU
    assert Placement(MemoryPolicy("normal"), GPU).load_device() == CPU


def test_units_are_the_blocks_and_cover_every_weight(flux_engine, sd1_model):
    flux = flux_engine.require_model()
    transformer = build_component("transformer", flux.unet, [flux.unet])
    names = [u.name for u in transformer.units]
    n_double, n_single = len(flux.unet.transformer_blocks), len(flux.unet.single_transformer_blocks)
    assert sum(".transformer_blocks." in n for n in names) == n_double
    assert sum(".single_transformer_blocks." in n for n in names) == n_single
    t5 = build_component("t5xxl", flux.text_encoders[1], [flux.text_encoders[1]])
    shared = [u for u in t5.units if len(u.modules) > 1]  # shared + encoder.embed_tokens share storage: one unit
    assert len(shared) == 1 and flux.text_encoders[1].shared in shared[0].modules
    unet = build_component("unet", sd1_model.unet, [sd1_model.unet])
    assert len(unet.units) > 5
    for comp, module in ((transformer, flux.unet), (t5, flux.text_encoders[1]), (unet, sd1_model.unet)):
        assert comp.nbytes == sum(module_bytes(module).values())
        covered = {id(t) for u in comp.units for m in u.modules for t in [*m.parameters(), *m.buffers()]}
        assert covered == set(module_bytes(module))


# ---------------------------------------------------------------- the A1111 modes

def test_medvram_keeps_one_whole_component_on_the_gpu(sd1_engine, sd1_model):
    recorder = Recorder()
    placement = attach(sd1_model, MemoryPolicy("low", math.inf), recorder)
    seen: list[set[str]] = []
    handle = sd1_model.unet.register_forward_pre_hook(lambda *_: seen.append({component_of(n) for n in
                                                                               recorder.gpu_names()}))
    try:
        run_job(sd1_engine)
    finally:
        handle.remove()
        placement.detach()
    order = []
    for name, device in recorder.moves:
        if device == "cuda" and component_of(name) not in order:
            order.append(component_of(name))
    assert order == ["clip_l", "unet", "vae"]
    assert all(s == {"unet"} for s in seen)
    assert recorder.peak == sum(module_bytes(sd1_model.unet).values())  # the UNet whole, nothing else


def test_lowvram_streams_the_unet_block_by_block(sd1_engine, sd1_model):
    recorder = Recorder()
    placement = attach(sd1_model, MemoryPolicy("low", 0.0), recorder)
    largest = max(u.nbytes for u in placement.units())
    running: list[int] = []
    handles = [m.register_forward_pre_hook(lambda *_: running.append(len(recorder.on_gpu)))
               for u in placement.components["unet"].units for m in u.modules]
    try:
        run_job(sd1_engine)
    finally:
        for h in handles:
            h.remove()
        placement.detach()
    assert max(running) == 1  # only the running block
    assert recorder.peak <= largest
    assert {component_of(n) for n, d in recorder.moves if d == "cuda"} == {"clip_l", "unet", "vae"}


def test_detach_removes_the_hooks(sd1_engine, sd1_model):
    recorder = Recorder()
    attach(sd1_model, MemoryPolicy("low", math.inf), recorder).detach()
    recorder.moves.clear()
    run_job(sd1_engine)
    assert recorder.moves == []


# ---------------------------------------------------------------- budgets on FLUX

def flux_job(engine, steps: int = 2):
    return run_job(engine, steps=steps, cfg_scale=1.0)


def sizes(placement: Placement) -> dict[str, int]:
    return {name: comp.nbytes for name, comp in placement.components.items()}


def test_normal_keeps_everything_that_fits_and_moves_nothing_later(flux_engine):
    model = flux_engine.require_model()
    recorder = Recorder()
    placement = attach(model, MemoryPolicy("normal", keep_free=0), recorder, free=10 * GIB)
    try:
        flux_job(flux_engine)
        assert placement.budget == 10 * GIB
        assert {component_of(n) for n in recorder.gpu_names()} == {"clip_l", "t5xxl", "transformer", "vae"}
        assert all(d == "cuda" for _, d in recorder.moves)  # nothing went back
        recorder.moves.clear()
        flux_job(flux_engine)
        assert recorder.moves == []  # the second job finds it all resident
    finally:
        placement.detach()


def test_normal_evicts_the_least_recently_used_component_to_make_room(flux_engine):
    model = flux_engine.require_model()
    probe = attach(model, MemoryPolicy("normal"), Recorder())
    size = sizes(probe)
    probe.detach()
    budget = size["transformer"] + size["vae"] + size["clip_l"]  # all but T5 (the tiny VAE is the largest)
    assert budget < sum(size.values())
    recorder = Recorder()
    placement = attach(model, MemoryPolicy("normal", gpu_weights=budget / GIB), recorder)
    try:
        flux_job(flux_engine)
    finally:
        placement.detach()
    left = [component_of(n) for n, d in recorder.moves if d == "cpu"]
    assert set(left) == {"t5xxl"}  # the CLIP, used after T5, stays; T5 is the oldest and makes room
    assert {component_of(n) for n in recorder.gpu_names()} == {"clip_l", "transformer", "vae"}
    assert recorder.peak <= budget


@pytest.mark.parametrize("short", [0, 100_000])
def test_normal_streams_a_text_encoder_beside_the_transformer(flux_engine, short):
    """T5 does not fit beside the transformer: it streams through the room left, and the transformer stays
    (short=0) or gives back only its last blocks, as few as make room for T5's largest block."""
    model = flux_engine.require_model()
    probe = attach(model, MemoryPolicy("normal"), Recorder())
    transformer, t5 = probe.components["transformer"], probe.components["t5xxl"]
    largest = max(u.nbytes for u in t5.units)
    budget = transformer.nbytes + largest + 25_000 - short
    assert budget - transformer.nbytes < t5.nbytes  # T5 cannot be whole beside the transformer
    probe.detach()
    recorder = Recorder()
    placement = attach(model, MemoryPolicy("normal", gpu_weights=budget / GIB), recorder)
    try:
        flux_job(flux_engine)
        recorder.moves.clear()
        flux_job(flux_engine)
    finally:
        placement.detach()
    out = {n for n, d in recorder.moves if d == "cpu" and component_of(n) == "transformer"}
    assert ("t5xxl", "cuda") in {(component_of(n), d) for n, d in recorder.moves}
    if short:
        assert 0 < len(out) < len(transformer.units)
        last = [u.name for u in transformer.units][-len(out):]
        assert out == set(last)
    else:
        assert out == set()
    assert recorder.peak <= budget


@pytest.mark.parametrize("mode", ["normal", "low"])
def test_a_budget_below_the_transformer_streams_its_tail_in_call_order(flux_engine, mode):
    model = flux_engine.require_model()
    probe = attach(model, MemoryPolicy(mode), Recorder())
    units = probe.components["transformer"].units
    budget = sum(u.nbytes for u in units) // 2
    probe.detach()
    recorder = Recorder()
    placement = attach(model, MemoryPolicy(mode, gpu_weights=budget / GIB), recorder)
    events: list[tuple] = []
    transformer = placement.components["transformer"]
    placement_units = list(placement.units())
    handles = [model.unet.register_forward_pre_hook(lambda *_: events.append(("step",))),
               model.unet.register_forward_hook(lambda *_: events.append(("end",)))]
    for unit in transformer.units:
        for m in unit.modules:  # registered after the placement's hooks: runs after its moves
            handles.append(m.register_forward_pre_hook(
                lambda *_a, u=unit: events.append(("run", u.name, u.name in recorder.gpu_names(),
                                                   recorder.gpu_bytes()))))
    recorder_call = recorder.__call__
    placement.mover = lambda m, d: (recorder_call(m, d), events.append(("move", recorder.name(m), d.type)))
    try:
        flux_job(flux_engine, steps=3)
    finally:
        for h in handles:
            h.remove()
        placement.detach()
    assert max(e[3] for e in events if e[0] == "run") <= budget  # while the transformer runs
    assert recorder.peak <= max(budget, max(u.nbytes for u in placement_units))  # T5's embedding is one unit
    assert all(e[2] for e in events if e[0] == "run")  # every block is on the GPU when it runs
    steps = split_steps(events)
    assert len(steps) == 3 and steps[1] == steps[2]  # the same moves each step
    resident = [u.name for u in transformer.units if u.name in recorder.gpu_names() or u.on_device]
    streamed_in = [e[1] for e in steps[1] if e[0] == "move" and e[2] == "cuda"]
    ran = [e[1] for e in steps[1] if e[0] == "run"]
    assert streamed_in and streamed_in == [n for n in ran if n in streamed_in]  # in the order they run
    assert not set(streamed_in) & set(resident[:1])
    for i, event in enumerate(steps[1]):  # one streamed block at a time: each arrival follows a departure
        if event[0] == "move" and event[2] == "cuda" and i > 0:
            assert steps[1][i - 1][0] == "move" and steps[1][i - 1][2] == "cpu"


def split_steps(events: list[tuple]) -> list[list[tuple]]:
    """The events of each transformer call (its moves and its blocks' runs)."""
    steps: list[list[tuple]] = []
    inside = False
    for event in events:
        if event[0] in ("step", "end"):
            inside = event[0] == "step"
            steps += [[]] if inside else []
        elif inside:
            steps[-1].append(event)
    return steps


def test_low_mode_keeps_only_the_running_component(flux_engine):
    model = flux_engine.require_model()
    recorder = Recorder()
    placement = attach(model, MemoryPolicy("low", keep_free=1), recorder, free=10 * GIB)
    try:
        flux_job(flux_engine)
    finally:
        placement.detach()
    assert placement.budget == 9 * GIB
    assert {component_of(n) for n in recorder.gpu_names()} == {"vae"}  # the last one used
    on_order = []
    for name, d in recorder.moves:
        if d == "cuda" and component_of(name) not in on_order:
            on_order.append(component_of(name))
    assert on_order == ["t5xxl", "clip_l", "transformer", "vae"]


def test_t5_goes_back_to_the_cpu_after_encoding_when_asked(flux_engine):
    model = flux_engine.require_model()
    recorder = Recorder()
    placement = attach(model, MemoryPolicy("normal", math.inf, t5_after_encoding="cpu"), recorder)
    try:
        flux_job(flux_engine)
        report = placement.report()
    finally:
        placement.detach()
    assert {component_of(n) for n in recorder.gpu_names()} == {"clip_l", "transformer", "vae"}
    assert ("t5xxl", "cuda") in [(component_of(n), d) for n, d in recorder.moves]
    assert report["components"]["t5xxl"]["resident_bytes"] == 0
    assert report["components"]["transformer"]["resident_bytes"] == report["components"]["transformer"]["bytes"]
    assert report["t5_after_encoding"] == "cpu" and report["budget_bytes"] is None


# ---------------------------------------------------------------- outputs do not change

def copying_mover(module: torch.nn.Module, device: torch.device) -> None:
    """A CPU-to-CPU move that gives every weight new storage, as a real transfer does."""
    module.to(device)
    for tensor in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
        tensor.data = tensor.data.clone()
    for child in module.children():
        copying_mover(child, device)


@pytest.mark.parametrize("policy", [MemoryPolicy("low", 0.0), MemoryPolicy("normal", 1e-4),
                                    MemoryPolicy("low", math.inf)])
def test_images_are_bit_identical_to_no_offloading(flux_engine, policy):
    model = flux_engine.require_model()
    before = [list(m.state_dict().values())[0].clone() for m in (model.unet, model.vae, *model.text_encoders)]
    expected = flux_job(flux_engine).images[0]
    placement = Placement(policy, CPU, mover=copying_mover, always=True)
    placement.attach(model.unet, model.vae, model.text_encoders, ["clip_l", "t5xxl"], "transformer")
    moves: list = []
    placement.mover = lambda m, d: (moves.append(d), copying_mover(m, d))
    try:
        got = flux_job(flux_engine).images[0]
    finally:
        placement.detach()
    assert moves  # the policy really moved weights
    assert got.tobytes() == expected.tobytes()
    after = [list(m.state_dict().values())[0] for m in (model.unet, model.vae, *model.text_encoders)]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))


def test_engine_switches_policy_without_reloading(tmp_path: Path, tiny_sd1):
    from tests.conftest import make_engine

    engine = make_engine(tmp_path)
    engine.load_model(tiny_sd1)
    model = engine.require_model()
    engine.placement.always = True  # CPU-only machine: manage anyway, with real (CPU-to-CPU) moves
    expected = run_job(engine).images[0]
    engine.set_memory_policy(MemoryPolicy("low", 0.0))
    assert not engine.placement.enabled  # the compute device is the CPU: nothing to manage
    engine.placement.always = True
    engine._place(model)
    report = engine.memory_report()
    assert report["mode"] == "low" and report["enabled"] and set(report["components"]) == {"clip_l", "unet", "vae"}
    assert run_job(engine).images[0].tobytes() == expected.tobytes()
    assert engine.require_model() is model
    engine.set_memory_policy(MemoryPolicy("none"))
    assert engine.memory_report()["components"] == {} and run_job(engine).images[0].tobytes() == expected.tobytes()


def test_a_lora_delta_on_packed_weights_moves_with_its_layer():
    """A block streamed to the GPU during a LoRA job takes its packed weight's delta along."""
    from modules.checkpoints.packed import PackedTensor, pack_weights, packed_weight

    layer = torch.nn.Linear(8, 4)
    stored = layer.weight.detach().to(torch.float8_e4m3fn)
    pack_weights(layer, {"weight": PackedTensor(stored, "F8_E4M3", (4, 8))}, torch.float32)
    packed_weight(layer).delta = torch.ones(4, 8)
    layer.to("meta")
    assert packed_weight(layer).delta.device.type == "meta"
    packed_weight(layer).delta = None
    assert packed_weight(layer).delta is None


def test_sd3_joint_blocks_are_units():
    from diffusers import SD3Transformer2DModel

    model = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=16, num_layers=3, attention_head_dim=8,
                                  num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16,
                                  pooled_projection_dim=32, out_channels=16, pos_embed_max_size=16,
                                  dual_attention_layers=(0,))
    comp = build_component("transformer", model, [model])
    blocks = [u for u in comp.units if ".transformer_blocks." in u.name]
    assert [u.modules[0] for u in blocks] == list(model.transformer_blocks)
    assert comp.nbytes == sum(module_bytes(model).values())

"""--compile: compiled UNet and VAE decoder give eager's images, see in-place weight patches, cache on disk.

The engine-level tests use torch.compile's `eager` backend (the same tracing, graph capture and
in-place module compile, without code generation), so they take seconds; one small module goes
through inductor's real C++ code generation. The full-size compiled UNet is measured by bench/cpu.py.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from modules.pipeline.compiled import (
    CompileUnavailable,
    check_compiler,
    compile_module,
    freeze_module,
    is_compiled,
    use_cache_dir,
)
from modules.pipeline.params import Txt2ImgParams
from tests.conftest import make_engine


def params() -> Txt2ImgParams:
    return Txt2ImgParams(prompt="a red circle", negative_prompt="blue", steps=3, sampler_name="Euler",
                         width=64, height=64, seed=7, rng_source="cpu")


def image(engine) -> np.ndarray:
    return np.asarray(engine.txt2img(params()).images[0], dtype=np.int16)


@pytest.fixture(scope="module")
def engines(tmp_path_factory, tiny_sd1):
    eager = make_engine(tmp_path_factory.mktemp("eager"))
    eager.load_model(tiny_sd1)
    compiled = make_engine(tmp_path_factory.mktemp("compiled"), compile=True, compile_backend="eager")
    compiled.load_model(tiny_sd1)
    return eager, compiled


def test_compiled_images_match_eager(engines):
    eager, compiled = engines
    assert is_compiled(compiled.models.current.unet) and is_compiled(compiled.models.current.vae.decoder)
    assert not is_compiled(eager.models.current.unet)
    assert np.abs(image(eager) - image(compiled)).max() <= 1


def test_compiled_unet_sees_in_place_weight_patches(engines):
    """A LoRA patches weights in place (ModelPatch.apply); the compiled graph must read them, not constants."""
    eager, compiled = engines
    before = image(compiled)
    weights = [e.models.current.unet.conv_in.weight for e in (eager, compiled)]
    saved = weights[1].detach().clone()
    with torch.no_grad():
        for w in weights:
            w.add_(0.3)
    try:
        patched, reference = image(compiled), image(eager)
    finally:
        with torch.no_grad():
            for w in weights:
                w.copy_(saved)
    assert np.abs(patched - before).max() > 10  # the patch shows...
    assert np.abs(patched - reference).max() <= 1  # ...exactly as in eager mode
    assert np.array_equal(image(compiled), before)  # and reverting needs no recompile either


class Block(nn.Module):
    """The UNet's op mix in miniature: conv, group norm, SiLU, a linear on tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.norm = nn.GroupNorm(2, 8)
        self.proj = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = nn.functional.silu(self.norm(self.conv(x)))
        tokens = self.proj(h.flatten(2).transpose(1, 2))
        return tokens.transpose(1, 2).reshape(h.shape) + h


@pytest.mark.slow
def test_inductor_generates_cpp_reads_patched_weights_and_caches(tmp_path):
    torch.manual_seed(0)
    block, x = Block().eval(), torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        want = block(x)
        use_cache_dir(tmp_path / "inductor")
        compile_module(block)
        torch.testing.assert_close(block(x), want, rtol=1e-4, atol=1e-5)
        block.conv.weight.add_(0.5)
        torch.testing.assert_close(block(x), block._call_impl(x), rtol=1e-4, atol=1e-5)
        assert not torch.allclose(block(x), want, atol=1e-3)
    assert any(p.suffix in (".cpp", ".so", ".py") for p in (tmp_path / "inductor").rglob("*"))


def test_compile_without_a_cpp_compiler_is_refused(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(CompileUnavailable, match="C\\+\\+ compiler"):
        check_compiler(torch.device("cpu"))
    check_compiler(torch.device("cpu"), "aot_eager")  # no code generation, no compiler needed


def test_unknown_backend_is_refused_at_start(tmp_path):
    with pytest.raises(CompileUnavailable, match="'nosuch'.*known: .*inductor"):
        make_engine(tmp_path, compile=True, compile_backend="nosuch")


@pytest.mark.slow
def test_frozen_block_bakes_its_weights_and_runs_eagerly_while_patched(tmp_path):
    torch._dynamo.reset()  # a Block compiled earlier unfrozen would otherwise serve this one too
    torch.manual_seed(0)
    block, x = Block().eval(), torch.randn(1, 4, 8, 8)
    original = block.conv.weight.detach().clone()
    with torch.no_grad():
        want = block(x)
        use_cache_dir(tmp_path / "inductor")
        call = freeze_module(block)
        torch.testing.assert_close(block(x), want, rtol=1e-4, atol=1e-5)
        assert call.eager_calls == 0
        block.conv.weight.add_(0.5)  # a LoRA's in-place patch
        with torch._inductor.config.patch(freezing=True):  # frozen: the conv and linear weights are prepacked
            torch.testing.assert_close(call.compiled(x), want, rtol=1e-4, atol=1e-5)  # copies of the old ones
        torch.testing.assert_close(block(x), block._call_impl(x))  # so the patched call runs eagerly
        assert call.eager_calls == 1 and not torch.allclose(block(x), want, atol=1e-3)
        block.conv.weight.copy_(original)  # the patch reverted: the frozen graph is valid again
        calls = call.eager_calls
        torch.testing.assert_close(block(x), want, rtol=1e-4, atol=1e-5)
        assert call.eager_calls == calls
    block(x)  # with autograd on, freezing does not apply: eager
    assert call.eager_calls == calls + 1


def test_freezing_is_refused_outside_inductor(tmp_path):
    with pytest.raises(CompileUnavailable, match="--compile-freeze.*openvino"):
        check_compiler(torch.device("cpu"), "openvino", freeze=True)
    with pytest.raises(CompileUnavailable, match="--compile-freeze"):
        make_engine(tmp_path, compile=True, compile_freeze=True, compile_backend="aot_eager")
    with pytest.raises(CompileUnavailable, match="--compile-freeze.*--medvram"):
        check_compiler(torch.device("cuda"), freeze=True, moves_weights=True)


def test_compile_freeze_flag_implies_compile():
    from modules.settings import parse_settings

    frozen = parse_settings(["--compile-freeze"])
    assert frozen.compile and frozen.compile_freeze and frozen.compile_backend == "inductor"
    plain = parse_settings(["--compile"])
    assert plain.compile and not plain.compile_freeze


class ResidualBlock(Block):
    """A call that may pass extra inputs, as ControlNet passes residuals to the UNet."""

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        out = super().forward(x)
        return out if residual is None else out + residual


@pytest.mark.slow
def test_frozen_calls_of_another_structure_run_eagerly_without_compiling_again(tmp_path):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    torch.manual_seed(0)
    block, x = ResidualBlock().eval(), torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        use_cache_dir(tmp_path / "inductor")
        call = freeze_module(block)
        want = block(x)
        graphs = counters["stats"]["unique_graphs"]
        torch.testing.assert_close(block(x, residual=torch.ones_like(want)), want + 1)  # ControlNet-like inputs
        handle = block.norm.register_forward_hook(lambda _m, _i, out: out + 1)
        assert not torch.allclose(block(x), want, atol=1e-3)  # a hook the frozen graph never saw
        assert call.eager_calls == 2 and counters["stats"]["unique_graphs"] == graphs
        handle.remove()
        torch.testing.assert_close(block(x), want)
        assert call.eager_calls == 2  # the plain call is frozen again

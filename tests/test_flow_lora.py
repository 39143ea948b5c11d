"""LoRA for FLUX.1 and SD3.5 through `<lora:name:w>`: kohya (fused and split qkv / linear1), diffusers / PEFT and
BFL / ComfyUI key formats, text-encoder layers, the math, exact restore, a forward-time reference, wrong families.

Layer names come from the original-layout fixture (BFL / Stability names) or the loaded diffusers transformer
(diffusers names); expected weights are computed here row by row from the original layout, independently of
Atelier's converter.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from modules.pipeline.params import Txt2ImgParams
from modules.sampling import flow
from tests.conftest import make_engine
from tests.fixtures import make_tiny_lora as mk
from tests.fixtures.make_tiny_mmdit import FLUX_TINY, SD3_TINY, flux_shapes, make_all_in_one, sd3_shapes

H = FLUX_TINY.hidden  # 32, and SD3_TINY.hidden
SMALL = dict(steps=2, width=64, height=64, seed=5, sampler_name="Euler", cfg_scale=1.0, save_images=False)


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux-lora")
    engine = make_engine(root)
    engine.load_model(make_all_in_one("flux-dev", root / "models" / "Stable-diffusion" / "tiny-flux.safetensors"))
    return engine, root / "models" / "Lora"


def _originals(shapes: dict[str, tuple[int, ...]], prefix: str, dotted: bool) -> dict[str, tuple[int, ...]]:
    """Original-layout linear weights -> LoRA layer names (`lora_unet_a_b` or `diffusion_model.a.b`)."""
    out = {}
    for key, shape in shapes.items():
        if key.endswith(".weight") and len(shape) == 2:
            stem = key[:-len(".weight")]
            out[prefix + (stem if dotted else stem.replace(".", "_"))] = shape
    return out


def _split_tensors(layers: dict[str, tuple[int, ...]], parts: dict[str, list[int]], seed: int = 3):
    """kohya's `split_qkv` files: `lora_down.N` / `lora_up.N` per part of the fused weights named in `parts`."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in layers.items():
        sizes = next((p for word, p in parts.items() if name.endswith(word)), None)
        if sizes is None:
            continue
        for n, rows in enumerate(sizes):
            out[f"{name}.lora_down.{n}.weight"] = torch.randn(2, shape[1], generator=g) * 0.1
            out[f"{name}.lora_up.{n}.weight"] = torch.randn(rows, 2, generator=g) * 0.1
        out[f"{name}.alpha"] = torch.tensor(1.0)
    return out


def _write(tensors: dict[str, torch.Tensor], folder: Path, name: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / f"{name}.safetensors"))


def _job_weights(engine, prompt: str, modules: list[str], target: str = "unet"):
    """The named weights inside the job's patch, and after it is restored."""
    hooks = engine.job_hooks("txt2img")
    params = hooks.prepare(Txt2ImgParams(prompt=prompt, **SMALL))
    patch = hooks.patch(engine.require_model(), params)
    before = {m: patch.weight(target, m).detach().clone() for m in modules}
    with patch.applied():
        inside = {m: patch.weight(target, m).detach().clone() for m in modules}
    after = {m: patch.weight(target, m).detach().clone() for m in modules}
    return before, inside, after, params


def _lora_delta(sd: dict[str, torch.Tensor], name: str, down: str = "lora_down.weight", up: str = "lora_up.weight"):
    a, b = sd[f"{name}.{down}"].float(), sd[f"{name}.{up}"].float()
    alpha = float(sd[f"{name}.alpha"]) if f"{name}.alpha" in sd else a.shape[0]
    return (alpha / a.shape[0]) * (b @ a)


# Where the original FLUX rows go in diffusers' modules: (original, [(diffusers module, first row, last row)]).
def _flux_rows(i: int) -> dict[str, list[tuple[str, int, int]]]:
    mlp = 4 * H
    return {
        f"double_blocks.{i}.img_attn.qkv": [(f"transformer_blocks.{i}.attn.to_q", 0, H),
                                            (f"transformer_blocks.{i}.attn.to_k", H, 2 * H),
                                            (f"transformer_blocks.{i}.attn.to_v", 2 * H, 3 * H)],
        f"double_blocks.{i}.txt_attn.qkv": [(f"transformer_blocks.{i}.attn.add_q_proj", 0, H),
                                            (f"transformer_blocks.{i}.attn.add_k_proj", H, 2 * H),
                                            (f"transformer_blocks.{i}.attn.add_v_proj", 2 * H, 3 * H)],
        f"double_blocks.{i}.img_mlp.0": [(f"transformer_blocks.{i}.ff.net.0.proj", 0, mlp)],
        f"single_blocks.{i}.linear1": [(f"single_transformer_blocks.{i}.attn.to_q", 0, H),
                                       (f"single_transformer_blocks.{i}.attn.to_k", H, 2 * H),
                                       (f"single_transformer_blocks.{i}.attn.to_v", 2 * H, 3 * H),
                                       (f"single_transformer_blocks.{i}.proj_mlp", 3 * H, 3 * H + mlp)],
        f"single_blocks.{i}.linear2": [(f"single_transformer_blocks.{i}.proj_out", 0, H)],
    }


def _check_rows(engine, sd, prompt, file_name, weight: float, **keys) -> None:
    rows = {**_flux_rows(0), **_flux_rows(1)}
    modules = [m for parts in rows.values() for m, _, _ in parts] + ["norm_out.linear"]
    before, inside, after, _ = _job_weights(engine, prompt, modules)
    for original, parts in rows.items():
        delta = _lora_delta(sd, file_name(original), **keys)
        for module, first, last in parts:
            torch.testing.assert_close(inside[module] - before[module], weight * delta[first:last],
                                       rtol=1e-4, atol=1e-6, msg=module)
            assert torch.equal(after[module], before[module]), f"{module} must be restored bit for bit"
    # the final modulation is (shift, scale) in BFL's layout and (scale, shift) in diffusers'
    final = _lora_delta(sd, file_name("final_layer.adaLN_modulation.1"), **keys)
    torch.testing.assert_close(inside["norm_out.linear"] - before["norm_out.linear"],
                               weight * torch.cat([final[H:], final[:H]]), rtol=1e-4, atol=1e-6)


def test_kohya_flux_lora_splits_fused_qkv_and_linear1(flux) -> None:
    engine, loras = flux
    layers = _originals(flux_shapes(FLUX_TINY, guidance=True), "lora_unet_", dotted=False)
    sd = mk.lora_tensors(layers, rank=2, alpha=1.0, seed=11)
    _write(sd, loras, "kohya")
    _check_rows(engine, sd, "a fox <lora:kohya:0.7>", lambda o: "lora_unet_" + o.replace(".", "_"), 0.7)


def test_bfl_comfyui_formats_lora_a_b_and_up_down(flux) -> None:
    engine, loras = flux
    shapes = flux_shapes(FLUX_TINY, guidance=True)
    peft = mk.lora_tensors(_originals(shapes, "diffusion_model.", dotted=True), alpha=None, seed=12, peft=True)
    _write(peft, loras, "bfl-peft")
    _check_rows(engine, peft, "a fox <lora:bfl-peft:1>", lambda o: "diffusion_model." + o, 1.0,
                down="lora_A.weight", up="lora_B.weight")
    updown = mk.lora_tensors(_originals(shapes, "diffusion_model.", dotted=True), alpha=4.0, seed=13)
    _write(updown, loras, "bfl-updown")
    _check_rows(engine, updown, "a fox <lora:bfl-updown:-0.5>", lambda o: "diffusion_model." + o, -0.5)


def test_kohya_split_qkv_parts(flux) -> None:
    engine, loras = flux
    layers = _originals(flux_shapes(FLUX_TINY, guidance=True), "lora_unet_", dotted=False)
    sd = _split_tensors(layers, {"attn_qkv": [H, H, H], "linear1": [H, H, H, 4 * H]})
    _write(sd, loras, "split")
    q = "transformer_blocks.1.attn.to_v"
    mlp = "single_transformer_blocks.0.proj_mlp"
    before, inside, after, _ = _job_weights(engine, "<lora:split:1>", [q, mlp])
    for module, name, part in ((q, "lora_unet_double_blocks_1_img_attn_qkv", 2),
                               (mlp, "lora_unet_single_blocks_0_linear1", 3)):
        expected = 0.5 * sd[f"{name}.lora_up.{part}.weight"] @ sd[f"{name}.lora_down.{part}.weight"]  # alpha 1 / rank 2
        torch.testing.assert_close(inside[module] - before[module], expected, rtol=1e-4, atol=1e-6)
        assert torch.equal(after[module], before[module])


def _forward_lora(model, sd: dict[str, torch.Tensor], prefix: str, weight: float):
    """A reference that never merges: each named Linear gets `+ weight * x A^T B^T` at forward time (as PEFT runs)."""
    handles = []
    for name, module in model.named_modules():
        key = f"{prefix}{name}.lora_A.weight"
        if key in sd:
            a, b = sd[key].float(), sd[f"{prefix}{name}.lora_B.weight"].float()
            handles.append(module.register_forward_hook(
                lambda mod, args, out, a=a, b=b: out + weight * (args[0] @ a.T @ b.T)))
    return handles


def test_diffusers_peft_format_matches_a_forward_time_lora(flux) -> None:
    """diffusers' own loader needs `peft` (not installed here); the same adapter applied at forward time is the
    reference: the merged patch must predict the same velocity."""
    engine, loras = flux
    model = engine.require_model()
    layers = mk.module_layers(model.unet, "transformer.", dotted=True)
    te = mk.module_layers(model.text_encoders[0], "text_encoder.", dotted=True)
    sd = mk.lora_tensors({**layers, **te}, alpha=None, seed=21, peft=True)
    _write(sd, loras, "diffusers")
    x = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    ctx = torch.randn(1, 7, 32, generator=torch.Generator().manual_seed(2))
    pooled = torch.randn(1, 32, generator=torch.Generator().manual_seed(3))
    den = flow.FlowDenoiser(model.unet, guidance=3.5)
    sigma = torch.tensor([0.7])
    plain = den.velocity(x, sigma, ctx, pooled)
    handles = _forward_lora(model.unet, sd, "transformer.", 0.8)
    try:
        reference = den.velocity(x, sigma, ctx, pooled)
    finally:
        for handle in handles:
            handle.remove()
    hooks = engine.job_hooks("txt2img")
    patch = hooks.patch(model, hooks.prepare(Txt2ImgParams(prompt="<lora:diffusers:0.8>", **SMALL)))
    with patch.applied():
        merged = den.velocity(x, sigma, ctx, pooled)
    assert not torch.allclose(plain, reference, atol=1e-3)
    torch.testing.assert_close(merged, reference, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(den.velocity(x, sigma, ctx, pooled), plain, rtol=0, atol=0)
    assert len(patch) == len(layers) + len(te)  # the CLIP-L layers (`text_encoder.`) were queued too


def test_text_encoder_layers_clip_l_and_t5(flux) -> None:
    engine, loras = flux
    model = engine.require_model()
    clip = mk.module_layers(model.text_encoders[0], "lora_te1_text_model_")  # kohya's spelling
    t5 = mk.module_layers(model.text_encoders[1], "lora_te3_")
    sd = mk.lora_tensors({**mk.select(clip, ["q_proj"]), **mk.select(t5, ["SelfAttention_q"])}, seed=31)
    _write(sd, loras, "te")
    for target, module, key in (("te0", "encoder.layers.0.self_attn.q_proj",
                                 "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"),
                                ("te1", "encoder.block.1.layer.0.SelfAttention.q",
                                 "lora_te3_encoder_block_1_layer_0_SelfAttention_q")):
        before, inside, after, _ = _job_weights(engine, "<lora:te:0.5:0>", [module], target)
        torch.testing.assert_close(inside[module] - before[module], 0.5 * _lora_delta(sd, key), rtol=1e-4, atol=1e-6)
        assert torch.equal(after[module], before[module])


def test_flux_job_with_lora_records_hash_and_restores(flux) -> None:
    engine, loras = flux
    layers = _originals(flux_shapes(FLUX_TINY, guidance=True), "lora_unet_", dotted=False)
    _write(mk.lora_tensors(layers, rank=2, alpha=1.0, seed=11), loras, "kohya")
    plain = engine.txt2img(Txt2ImgParams(prompt="a fox", **SMALL))
    with_lora = engine.txt2img(Txt2ImgParams(prompt="a fox <lora:kohya:1>", **SMALL))
    again = engine.txt2img(Txt2ImgParams(prompt="a fox", **SMALL))
    assert 'Lora hashes: "kohya: ' in with_lora.infotexts[0] and not with_lora.warnings
    assert np.array_equal(np.asarray(plain.images[0]), np.asarray(again.images[0]))
    assert not np.array_equal(np.asarray(plain.images[0]), np.asarray(with_lora.images[0]))


def test_sd_lora_on_flux_names_both_architectures(flux, tiny_checkpoints) -> None:
    engine, loras = flux
    layers = mk.checkpoint_layers(tiny_checkpoints["sdxl"], mk.UNET, "lora_unet_")
    te2 = mk.checkpoint_layers(tiny_checkpoints["sdxl"], "conditioner.embedders.1.model.", "lora_te2_")
    _write(mk.lora_tensors({**mk.select(layers, ["input_blocks_4"]), **dict(list(te2.items())[:2])}), loras, "xl")
    result = engine.txt2img(Txt2ImgParams(prompt="a fox <lora:xl:1>", **SMALL))
    assert result.images
    assert any("'xl' is made for SD 1.x / 2.x / SDXL and the loaded model is FLUX.1-dev" in w for w in result.warnings), result.warnings


def test_sd3_kohya_and_diffusers_formats(tmp_path: Path) -> None:
    engine = make_engine(tmp_path)
    engine.load_model(make_all_in_one("sd35-medium", tmp_path / "models" / "Stable-diffusion" / "sd35.safetensors"))
    loras = tmp_path / "models" / "Lora"
    shapes = sd3_shapes(SD3_TINY, (0,))
    kohya = mk.lora_tensors(_originals(shapes, "lora_unet_", dotted=False), seed=41)
    _write(kohya, loras, "sd3-kohya")
    h = SD3_TINY.hidden
    rows = {"joint_blocks.0.x_block.attn.qkv": [("transformer_blocks.0.attn.to_q", 0, h),
                                                ("transformer_blocks.0.attn.to_k", h, 2 * h),
                                                ("transformer_blocks.0.attn.to_v", 2 * h, 3 * h)],
            "joint_blocks.0.x_block.attn2.qkv": [("transformer_blocks.0.attn2.to_v", 2 * h, 3 * h)],
            "joint_blocks.1.context_block.attn.qkv": [("transformer_blocks.1.attn.add_k_proj", h, 2 * h)]}
    modules = [m for parts in rows.values() for m, _, _ in parts] + ["transformer_blocks.1.norm1_context.linear"]
    before, inside, after, _ = _job_weights(engine, "<lora:sd3-kohya:1>", modules)
    for original, parts in rows.items():
        delta = _lora_delta(kohya, "lora_unet_" + original.replace(".", "_"))
        for module, first, last in parts:
            torch.testing.assert_close(inside[module] - before[module], delta[first:last], rtol=1e-4, atol=1e-6)
            assert torch.equal(after[module], before[module])
    last = _lora_delta(kohya, "lora_unet_joint_blocks_1_context_block_adaLN_modulation_1")  # the last block's: swapped
    torch.testing.assert_close(inside[modules[-1]] - before[modules[-1]], torch.cat([last[h:], last[:h]]),
                               rtol=1e-4, atol=1e-6)
    model = engine.require_model()
    dotted = mk.lora_tensors(mk.module_layers(model.unet, "transformer.", dotted=True), alpha=None, seed=42, peft=True)
    _write(dotted, loras, "sd3-diffusers")
    module = "transformer_blocks.0.attn.add_q_proj"
    before, inside, _, _ = _job_weights(engine, "<lora:sd3-diffusers:1>", [module])
    torch.testing.assert_close(inside[module] - before[module],
                               _lora_delta(dotted, f"transformer.{module}", "lora_A.weight", "lora_B.weight"),
                               rtol=1e-4, atol=1e-6)
    flux_lora = mk.lora_tensors(_originals(flux_shapes(FLUX_TINY, True), "lora_unet_", dotted=False))
    _write(flux_lora, loras, "flux-on-sd3")
    result = engine.txt2img(Txt2ImgParams(prompt="<lora:flux-on-sd3:1>", **SMALL))
    assert any("made for FLUX.1 and the loaded model is SD3.5 Medium" in w for w in result.warnings)


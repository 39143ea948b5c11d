"""FLUX.1-dev with A1111's composable prompts (AND) and RNG sources, on the tiny original-layout checkpoint.

AND: the CFG denoiser combines the parts in denoised space, uncond + sum_i w_i * cfg * (cond_i - uncond), and
runs the negative prompt's row whenever a prompt has more than one part, even at CFG 1 (FLUX.1-dev's default).
Every row gets the distilled guidance. One Euler step from sigma 1 to 0 lands on the denoised prediction, and
the VAE decoder's input is affine in the latent, so the decoder inputs of separate one-part jobs predict the
AND job's exactly. RNG: the first transformer input is the seeded noise (sigma_max is 1 for flow models),
unpacked here from FLUX's 2x2 patches and compared with noise drawn by an independent implementation of each
documented source on the 16-channel latent.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from modules.pipeline.params import Txt2ImgParams
from tests.conftest import make_engine
from tests.fixtures.make_tiny_mmdit import make_all_in_one
from tests.test_rng import CUDA_RANDN

SEED = 1234567890
ONE_STEP = dict(steps=1, width=64, height=64, seed=SEED, sampler_name="Euler", cfg_scale=1.0, save_images=False)


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux-and-rng")
    engine = make_engine(root)
    engine.load_model(make_all_in_one("flux-dev", root / "flux-dev.safetensors"))
    return engine


def run(engine, prompt: str, **extra) -> dict:
    """One job; what the transformer got per call and the VAE decoder's input."""
    model = engine.require_model()
    calls, decoded = [], []
    hooks = [model.unet.register_forward_pre_hook(
                 lambda _m, _a, k: calls.append({"x": k["hidden_states"].detach().clone(),
                                                 "guidance": k.get("guidance")}), with_kwargs=True),
             model.vae.decoder.register_forward_pre_hook(lambda _m, a: decoded.append(a[0].detach().clone()))]
    try:
        result = engine.txt2img(Txt2ImgParams(prompt=prompt, **{**ONE_STEP, **extra}))
    finally:
        for hook in hooks:
            hook.remove()
    return {"calls": calls, "z": decoded[0], "infotext": result.infotexts[0], "warnings": result.warnings}


def rows(job: dict) -> int:
    return sum(c["x"].shape[0] for c in job["calls"])


def test_and_on_flux_dev_combines_parts_in_denoised_space_at_cfg_1(flux) -> None:
    fox, cat, empty = run(flux, "a red fox"), run(flux, "a blue cat"), run(flux, "")
    both = run(flux, "a red fox AND a blue cat")
    assert [rows(j) for j in (fox, cat, empty, both)] == [1, 1, 1, 3]  # AND adds the uncond row at CFG 1
    assert all(float(g) == 3.5 for c in both["calls"] for g in c["guidance"])  # distilled guidance on every row
    torch.testing.assert_close(both["z"], fox["z"] + cat["z"] - empty["z"], atol=2e-4, rtol=0)
    weighted = run(flux, "a red fox :0.7 AND a blue cat :0.5")
    expected = empty["z"] + 0.7 * (fox["z"] - empty["z"]) + 0.5 * (cat["z"] - empty["z"])
    torch.testing.assert_close(weighted["z"], expected, atol=2e-4, rtol=0)
    assert (both["z"] - fox["z"]).abs().max() > 1e-2  # the second part really changed the result


def test_and_with_true_cfg_and_a_negative_prompt(flux) -> None:
    fox, cat = run(flux, "a red fox"), run(flux, "a blue cat")
    neg = run(flux, "blurry")
    both = run(flux, "a red fox AND a blue cat", cfg_scale=2.0, negative_prompt="blurry")
    assert rows(both) == 3
    expected = neg["z"] + 2.0 * (fox["z"] - neg["z"]) + 2.0 * (cat["z"] - neg["z"])
    torch.testing.assert_close(both["z"], expected, atol=5e-4, rtol=0)


# -- RNG sources on 16-channel latents ------------------------------------------------------

def unpack(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """FLUX's [B, (h/2)(w/2), 4C] patch sequence back to [B, C, h, w] (row-major 2x2 patches, channel first)."""
    b, _, d = x.shape
    c = d // 4
    return x.reshape(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


M0, M1, W0, W1 = 0xD2511F53, 0xCD9E8D57, 0x9E3779B9, 0xBB67AE85
MASK = 0xFFFFFFFF


def philox_normal(seed: int, n: int, offset: int = 0) -> np.ndarray:
    """A1111's NV source, written from its description: Philox 4x32-10 on counter [offset, 0, i, 0] with the
    seed's two 32-bit words as key, then the sine output of Box-Muller on the first two words (float64)."""
    c0 = np.full(n, offset, np.uint64)
    c1 = np.zeros(n, np.uint64)
    c2 = np.arange(n, dtype=np.uint64)
    c3 = np.zeros(n, np.uint64)
    k0, k1 = seed & MASK, (seed >> 32) & MASK
    for _ in range(10):
        p0, p1 = c0 * np.uint64(M0), c2 * np.uint64(M1)
        hi0, lo0, hi1, lo1 = p0 >> np.uint64(32), p0 & np.uint64(MASK), p1 >> np.uint64(32), p1 & np.uint64(MASK)
        c0, c1, c2, c3 = hi1 ^ c1 ^ np.uint64(k0), lo1, hi0 ^ c3 ^ np.uint64(k1), lo0
        k0, k1 = (k0 + W0) & MASK, (k1 + W1) & MASK
    u = c0.astype(np.float64) / 2**32 + 0.5 / 2**32
    v = c1.astype(np.float64) * (2 * np.pi / 2**32) + np.pi / 2**32
    return (np.sqrt(-2.0 * np.log(u)) * np.sin(v)).astype(np.float32)


def first_noise(flux, source: str) -> tuple[torch.Tensor, str]:
    job = run(flux, "a red fox", rng_source=source)
    return unpack(job["calls"][0]["x"], 8, 8)[0], job["infotext"]


def test_cpu_and_gpu_sources_draw_the_seeded_torch_noise_on_16_channels(flux) -> None:
    want = torch.randn((16, 8, 8), generator=torch.Generator("cpu").manual_seed(SEED))
    cpu, cpu_info = first_noise(flux, "cpu")
    torch.testing.assert_close(cpu, want, atol=1e-6, rtol=1e-6)
    assert "RNG: CPU" in cpu_info
    gpu, gpu_info = first_noise(flux, "gpu")  # without CUDA, "GPU" falls back to the CPU generator, as A1111 on MPS
    torch.testing.assert_close(gpu, want, atol=1e-6, rtol=1e-6)
    assert "RNG:" not in gpu_info  # GPU is the default and not written


def test_nv_source_draws_cuda_compatible_philox_noise_on_16_channels(flux) -> None:
    nv, info = first_noise(flux, "nv")
    want = torch.from_numpy(philox_normal(SEED, 16 * 8 * 8)).reshape(16, 8, 8)
    torch.testing.assert_close(nv, want, atol=1e-6, rtol=1e-6)
    recorded = torch.tensor(CUDA_RANDN[(SEED, (4, 8, 8))]["first"])  # CUDA's torch.randn, index by element
    torch.testing.assert_close(nv.flatten()[:8], recorded, atol=2e-6, rtol=0)
    assert "RNG: NV" in info
    cpu, _ = first_noise(flux, "cpu")
    assert not torch.allclose(nv, cpu)

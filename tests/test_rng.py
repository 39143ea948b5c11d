"""Seeds and noise: Philox known answers, A1111 batch/variation/resize/ENSD semantics."""

import math
import random

import numpy as np
import pytest
import torch

from modules.errors import InvalidParams
from modules.sampling import rng

# Random123's published known-answer vectors for Philox4x32-10 (kat_vectors; also in
# TensorFlow's stateful_random_ops tests): (counter, key, output).
PHILOX_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]

# A1111's modules/rng_philox.py docstring: Generator(seed=0).randn((3, 4)), which it
# documents as equal to torch.randn on CUDA after torch.manual_seed(0).
A1111_NV_SEED0 = [
    [-0.92466259, -0.42534415, -2.6438457, 0.14518388],
    [-0.12086647, -0.57972564, -0.62285122, -0.32838709],
    [-1.07454231, -0.36314407, -1.67105067, 2.26550497],
]

# The widely quoted CPU output of torch.manual_seed(0); torch.randn(3, 4).
TORCH_CPU_SEED0 = [
    [1.5410, -0.2934, -2.1788, 0.5684],
    [-1.0845, -1.3986, 0.4033, 0.8380],
    [-0.7193, -0.4033, -0.5966, 0.1820],
]

# Recorded on CUDA (torch 2.11.0+cu130, NVIDIA H200): g = torch.Generator("cuda").manual_seed(seed),
# then two torch.randn(shape, generator=g) draws; the first and last 8 values of each.
# fmt: off
CUDA_RANDN = {
    (1234567890, (4, 8, 8)): {
        "first": [0.23617812991142273, 1.263390302658081, -0.5422237515449524, -0.6837679743766785,
                  1.5004277229309082, 1.4775171279907227, -0.6750574111938477, 1.031153917312622],
        "last8": [0.4894455671310425, -1.1372681856155396, -0.7744573950767517, -0.4027807414531708,
                  -0.5723252296447754, -0.7643441557884216, -0.5315670371055603, -0.36409446597099304],
        "second": [1.53046715259552, -0.26408621668815613, -0.6652753353118896, 1.1442902088165283,
                   0.7047103643417358, 1.8100323677062988, 0.8851269483566284, 1.0426534414291382],
    },
    (2**33 + 7, (4, 8, 8)): {
        "first": [-0.28373175859451294, -1.4213227033615112, 0.7213319540023804, -1.0884500741958618,
                  -0.9498034715652466, 1.0184223651885986, 0.5125930905342102, 0.8499132990837097],
        "last8": [0.07814580947160721, -0.4729732275009155, -0.018428172916173935, 0.8641884326934814,
                  -1.9633232355117798, -0.41636618971824646, -0.443726122379303, 0.022928766906261444],
        "second": [0.18767909705638885, 0.6761639714241028, -0.06824903935194016, -0.18669122457504272,
                   0.6609916090965271, -0.6770276427268982, 0.09155262261629105, -0.3345954418182373],
    },
}
# fmt: on

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


# ---------------------------------------------------------------- Philox


@pytest.mark.parametrize(("counter", "key", "want"), PHILOX_KAT)
def test_philox_block_matches_random123_known_answers(counter, key, want):
    out = rng.philox4x32_10(np.array(counter, dtype=np.uint32).reshape(4, 1), key)
    assert tuple(int(v) for v in out[:, 0]) == want


def test_philox_block_is_vectorised_over_counters():
    counters = np.array([c for c, _, _ in PHILOX_KAT[:2]], dtype=np.uint32).T  # (4, 2)
    out = rng.philox4x32_10(counters, (0, 0))
    assert tuple(int(v) for v in out[:, 0]) == PHILOX_KAT[0][2]
    single = rng.philox4x32_10(counters[:, 1:], (0, 0))
    assert np.array_equal(out[:, 1:], single)


def test_nv_seed0_matches_a1111_documented_values():
    x = rng.randn(0, (3, 4), source="nv")
    assert x.dtype == torch.float32 and x.shape == (3, 4)
    # A1111 evaluates Box-Muller in float64, CUDA in float32: a few float32 ulps apart.
    torch.testing.assert_close(x, torch.tensor(A1111_NV_SEED0), atol=5e-7, rtol=0)


@pytest.mark.parametrize(("seed", "shape"), list(CUDA_RANDN))
def test_nv_matches_recorded_cuda_randn(seed, shape):
    ref = {k: torch.tensor(v) for k, v in CUDA_RANDN[(seed, shape)].items()}
    noise = rng.ImageNoise(shape, [seed], source="nv")  # the image stream: offset 0, then 1
    first, second = noise.first()[0].flatten(), noise.next()[0].flatten()
    # CUDA runs Box-Muller in float32 (A1111's NV, like ours, in float64): ~1e-6 apart.
    torch.testing.assert_close(first[:8], ref["first"], atol=2e-6, rtol=0)
    torch.testing.assert_close(first[-8:], ref["last8"], atol=2e-6, rtol=0)
    torch.testing.assert_close(second[:8], ref["second"], atol=2e-6, rtol=0)


def test_nv_stream_advances_the_counter_offset():
    g = rng.PhiloxGenerator(1234)
    a, b = g.randn((16,)), g.randn((16,))
    assert g.offset == 2
    # Element i of draw k is Box-Muller on Philox([k, 0, i, 0], key=(seed, 0)).
    block = rng.philox4x32_10(np.array([[1], [0], [5], [0]], dtype=np.uint32), (1234, 0))
    x, y = int(block[0, 0]), int(block[1, 0])
    u = (x + 0.5) * 2.0**-32
    v = (y + 0.5) * 2.0**-32 * 2 * math.pi
    assert b[5].item() == pytest.approx(math.sqrt(-2 * math.log(u)) * math.sin(v), abs=1e-6)
    assert not torch.equal(a, b)


def test_nv_key_uses_both_seed_words():
    low = rng.randn(7, (64,), source="nv")
    high = rng.randn(2**32 + 7, (64,), source="nv")
    assert not torch.equal(low, high)
    # Negative seeds wrap to uint64 as torch.Generator.manual_seed does.
    torch.testing.assert_close(rng.randn(-1, (8,), "nv"), rng.randn(2**64 - 1, (8,), "nv"), atol=0, rtol=0)


def test_nv_noise_is_standard_normal():
    x = rng.randn(42, (4, 64, 64), source="nv").double()
    assert abs(x.mean().item()) < 0.02
    assert abs(x.std().item() - 1.0) < 0.02


# ---------------------------------------------------------------- cpu / gpu sources


def test_cpu_source_equals_seeded_torch_generator():
    x = rng.randn(0, (3, 4), source="cpu")
    torch.testing.assert_close(x, torch.tensor(TORCH_CPU_SEED0), atol=1e-4, rtol=0)
    g = torch.Generator("cpu").manual_seed(987654321)
    assert torch.equal(rng.randn(987654321, (4, 8, 8), "cpu"), torch.randn((4, 8, 8), generator=g))


def test_gpu_source_falls_back_to_cpu_off_cuda():
    assert torch.equal(rng.randn(5, (4, 8, 8), "gpu", "cpu"), rng.randn(5, (4, 8, 8), "cpu"))


def test_source_names_are_case_insensitive():
    assert torch.equal(rng.randn(3, (10,), "NV"), rng.randn(3, (10,), "nv"))


@pytest.mark.parametrize("source", ["", "cuda", "philox", None])
def test_unknown_source_is_rejected(source):
    with pytest.raises(InvalidParams, match="RNG source"):
        rng.randn(1, (4,), source=source)


@pytest.mark.parametrize("seed", [1.5, "12", True, 2**64, -(2**63) - 1])
def test_randn_rejects_bad_seeds(seed):
    with pytest.raises(InvalidParams):
        rng.randn(seed, (4,))


@pytest.mark.parametrize("shape", [(), (4, 0), (4, -1), (4, 2.0)])
def test_randn_rejects_bad_shapes(shape):
    with pytest.raises(InvalidParams):
        rng.randn(1, shape)


# ---------------------------------------------------------------- slerp


def _slerp_rows(t: float, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Independent float64 slerp of 2-D arrays, one vector per row (for dim=1 of a (N, D) input)."""
    out = np.empty_like(a)
    for i in range(a.shape[0]):
        cos = a[i] @ b[i] / np.linalg.norm(a[i]) / np.linalg.norm(b[i])
        om = math.acos(cos)
        out[i] = (math.sin((1 - t) * om) * a[i] + math.sin(t * om) * b[i]) / math.sin(om)
    return out


def test_slerp_traces_the_unit_circle():
    low, high = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    for t in (0.0, 0.25, 0.5, 1.0):
        want = torch.tensor([[math.cos(t * math.pi / 2), math.sin(t * math.pi / 2)]])
        torch.testing.assert_close(rng.slerp(t, low, high), want, atol=1e-6, rtol=0)


def test_slerp_keeps_the_norm_of_equal_norm_vectors():
    a = torch.randn(6, 100, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    b = torch.randn(6, 100, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    a, b = a / a.norm(dim=1, keepdim=True), b / b.norm(dim=1, keepdim=True)
    mid = rng.slerp(0.5, a, b)
    torch.testing.assert_close(mid.norm(dim=1), torch.ones(6, dtype=torch.float64))
    assert (((a + b) / 2).norm(dim=1) < 0.9).all()  # a plain lerp would shrink it


def test_slerp_matches_an_independent_computation_along_dim1():
    a = torch.randn(4, 9, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    b = torch.randn(4, 9, 5, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    got = rng.slerp(0.3, a, b)
    # dim 1 of a (C, H, W) tensor: each (c, w) column over H is one vector.
    rows = lambda x: x.permute(0, 2, 1).reshape(-1, 9).numpy()  # noqa: E731
    want = _slerp_rows(0.3, rows(a), rows(b)).reshape(4, 5, 9).transpose(0, 2, 1)
    np.testing.assert_allclose(got.numpy(), want, atol=1e-12)
    torch.testing.assert_close(rng.slerp(0.0, a, b), a)
    torch.testing.assert_close(rng.slerp(1.0, a, b), b)


def test_slerp_falls_back_to_lerp_for_parallel_vectors():
    v = torch.tensor([[3.0, 4.0]])
    torch.testing.assert_close(rng.slerp(0.25, v, 2 * v), 1.25 * v)


# ---------------------------------------------------------------- ImageNoise


@pytest.mark.parametrize("source", ["cpu", "nv"])
def test_batch_size_never_changes_an_image(source):
    batch = rng.ImageNoise((4, 8, 8), [100, 101, 102, 103], source=source)
    alone = rng.ImageNoise((4, 8, 8), [102], source=source)
    first = batch.first()
    assert first.shape == (4, 4, 8, 8) and first.dtype == torch.float32
    assert torch.equal(first[2], alone.first()[0])
    assert torch.equal(batch.next()[2], alone.next()[0])
    assert torch.equal(first[0], rng.randn(100, (4, 8, 8), source))


def test_cpu_stream_continues_the_seeded_generator():
    g = torch.Generator("cpu").manual_seed(77)
    draws = [torch.randn((4, 6, 6), generator=g) for _ in range(3)]
    noise = rng.ImageNoise((4, 6, 6), [77])
    assert torch.equal(noise.first()[0], draws[0])
    assert torch.equal(noise.next()[0], draws[1])
    assert torch.equal(noise.next()[0], draws[2])


@pytest.mark.parametrize("source", ["cpu", "nv"])
def test_next_draws_differ_and_reproduce(source):
    def run():
        noise = rng.ImageNoise((4, 8, 8), [5, 6], source=source)
        return noise.first(), noise.next(), noise.next()

    a, b = run(), run()
    assert not torch.equal(a[1], a[2]) and not torch.equal(a[0], a[1])
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


def test_next_before_first_gives_the_first_noise():
    assert torch.equal(rng.ImageNoise((4, 8, 8), [9]).next(), rng.ImageNoise((4, 8, 8), [9]).first())


@pytest.mark.parametrize("source", ["cpu", "nv"])
def test_eta_noise_seed_delta_reseeds_after_the_first_draw(source):
    plain = rng.ImageNoise((4, 8, 8), [1000, 1001], source=source)
    ensd = rng.ImageNoise((4, 8, 8), [1000, 1001], source=source, eta_noise_seed_delta=31337)
    assert torch.equal(plain.first(), ensd.first())
    after = ensd.next()
    assert not torch.equal(plain.next(), after)
    # The new stream is a fresh generator of seed + delta.
    assert torch.equal(after[1], rng.randn(1001 + 31337, (4, 8, 8), source))


def test_variation_seed_slerps_seed_and_subseed_noise():
    shape = (4, 8, 8)
    noise = rng.ImageNoise(shape, [10, 10], subseeds=[20, 21], subseed_strength=0.3).first()
    a, b = rng.randn(10, shape).double().numpy(), rng.randn(21, shape).double().numpy()
    rows = lambda x: x.transpose(0, 2, 1).reshape(-1, 8)  # noqa: E731
    want = _slerp_rows(0.3, rows(a), rows(b)).reshape(4, 8, 8).transpose(0, 2, 1)
    np.testing.assert_allclose(noise[1].double().numpy(), want, atol=1e-5)
    full = rng.ImageNoise(shape, [10], subseeds=[20], subseed_strength=1.0).first()[0]
    torch.testing.assert_close(full, rng.randn(20, shape), atol=1e-5, rtol=0)
    none = rng.ImageNoise(shape, [10], subseeds=[20], subseed_strength=0.0).first()[0]
    assert torch.equal(none, rng.randn(10, shape))


def test_resize_seed_pastes_old_size_noise_centred():
    # New latent 8x8, original 4x6: offsets ((8-4)//2, (8-6)//2) = (2, 1).
    noise = rng.ImageNoise((4, 8, 8), [123], resize_from=(4, 6))
    got = noise.first()[0]
    g = torch.Generator().manual_seed(123)
    want = torch.randn((4, 8, 8), generator=g)
    want[:, 2:6, 1:7] = rng.randn(123, (4, 4, 6))
    assert torch.equal(got, want)
    # The image's stream has made exactly one new-size draw.
    assert torch.equal(noise.next()[0], torch.randn((4, 8, 8), generator=g))


def test_resize_seed_crops_larger_old_noise_like_a1111():
    # New 4x4, original 8x9: rows 2:6 of the old noise; the width difference is odd, so
    # (A1111's arithmetic) only old columns 3:6 land in new columns 0:3, column 3 stays.
    got = rng.ImageNoise((4, 4, 4), [55], resize_from=(8, 9)).first()[0]
    want = rng.randn(55, (4, 4, 4))
    want[:, 0:4, 0:3] = rng.randn(55, (4, 8, 9))[:, 2:6, 3:6]
    assert torch.equal(got, want)


def test_resize_seed_applies_the_variation_at_the_old_size():
    got = rng.ImageNoise((4, 6, 6), [1], subseeds=[2], subseed_strength=0.5, resize_from=(4, 4), source="nv")
    old = rng.slerp(0.5, rng.randn(1, (4, 4, 4), "nv"), rng.randn(2, (4, 4, 4), "nv"))
    want = rng.randn(1, (4, 6, 6), "nv")
    want[:, 1:5, 1:5] = old
    assert torch.equal(got.first()[0], want)


def test_resize_from_the_same_size_is_a_no_op():
    a = rng.ImageNoise((4, 8, 8), [3], resize_from=(8, 8))
    assert torch.equal(a.first(), rng.ImageNoise((4, 8, 8), [3]).first())


@pytest.mark.parametrize(
    "kwargs",
    [
        {"shape": (4, 8)},
        {"seeds": []},
        {"seeds": [1.0]},
        {"subseed_strength": 0.5},
        {"subseeds": [1], "subseed_strength": 0.5, "seeds": [1, 2]},
        {"subseeds": [1], "subseed_strength": 1.5},
        {"resize_from": (0, 8)},
        {"resize_from": (8,)},
        {"source": "tpu"},
        {"eta_noise_seed_delta": 0.5},
    ],
)
def test_image_noise_rejects_bad_input(kwargs):
    args = {"shape": (4, 8, 8), "seeds": [1]} | kwargs
    with pytest.raises(InvalidParams):
        rng.ImageNoise(**args)


# ---------------------------------------------------------------- seeds


def test_resolve_seed():
    assert rng.resolve_seed(0) == 0
    assert rng.resolve_seed(2**32 - 1) == 2**32 - 1
    r = random.Random(0)
    drawn = [rng.resolve_seed(-1, r), rng.resolve_seed(None, r)]
    r = random.Random(0)
    assert drawn == [r.randint(0, 2**32 - 2), r.randint(0, 2**32 - 2)]
    assert all(0 <= s <= 2**32 - 2 for s in drawn)


@pytest.mark.parametrize("seed", [-2, 2**32, 1.5, "7", True])
def test_resolve_seed_rejects_out_of_range(seed):
    with pytest.raises(InvalidParams):
        rng.resolve_seed(seed)


def test_batch_seeds_follow_a1111():
    assert rng.batch_seeds(100, 7, 0.0, 3) == ([100, 101, 102], [7, 8, 9])
    assert rng.batch_seeds(100, 7, 0.5, 3) == ([100, 100, 100], [7, 8, 9])
    seeds, subseeds = rng.batch_seeds(-1, -1, 0.0, 2, rng=random.Random(1))
    r = random.Random(1)
    assert seeds[0] == r.randint(0, 2**32 - 2) and seeds[1] == seeds[0] + 1
    assert subseeds[0] == r.randint(0, 2**32 - 2)


@pytest.mark.parametrize(("strength", "count"), [(0.0, 0), (1.5, 1), (-0.1, 1), (0.0, 2.0)])
def test_batch_seeds_rejects_bad_input(strength, count):
    with pytest.raises(InvalidParams):
        rng.batch_seeds(1, 1, strength, count)


# ---------------------------------------------------------------- CUDA (device only)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("seed", [0, 1234567890, 2**33 + 7])
def test_nv_reproduces_cuda_randn(seed):
    shapes = [(4, 64, 64), (4, 64, 64), (4, 8, 8)]
    g = torch.Generator("cuda").manual_seed(seed)
    want = [torch.randn(s, generator=g, device="cuda").cpu() for s in shapes]
    nv = rng.PhiloxGenerator(seed)
    for s, w in zip(shapes, want, strict=True):
        # float64 (A1111 NV) vs float32 (CUDA) Box-Muller: largest gaps seen ~4e-6 at 64x64.
        torch.testing.assert_close(nv.randn(s), w, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@cuda
def test_gpu_source_uses_the_cuda_generator():
    noise = rng.ImageNoise((4, 8, 8), [11, 12], source="gpu", device="cuda")
    g = torch.Generator("cuda").manual_seed(12)
    first = torch.randn((4, 8, 8), generator=g, device="cuda")
    x = noise.first()
    assert x.device.type == "cuda" and torch.equal(x[1], first)
    assert torch.equal(noise.next()[1], torch.randn((4, 8, 8), generator=g, device="cuda"))

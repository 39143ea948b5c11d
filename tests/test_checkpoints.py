"""Checkpoint discovery, reading, detection and loading, on tiny generated checkpoints."""
from __future__ import annotations

import builtins
import hashlib
import json
import os
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from modules.checkpoints import detect as detect_mod
from modules.checkpoints.detect import detect_model_spec, v_heuristic
from modules.checkpoints.discover import (
    find_checkpoints,
    find_vaes,
    model_hash,
    vae_beside_checkpoint,
    yaml_beside_checkpoint,
)
from modules.checkpoints.load import load_checkpoint
from modules.checkpoints.manager import ModelManager
from modules.checkpoints.model import ARCHES, CheckpointInfo
from modules.checkpoints.read import read_safetensors_metadata, read_state_dict
from modules.errors import CheckpointError, UnsafeCheckpointError
from tests.fixtures.make_tiny_checkpoint import make_tiny_checkpoint

os.environ.setdefault("HF_HUB_OFFLINE", "1")
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {arch: make_tiny_checkpoint(arch, root / f"{arch}.safetensors") for arch in ARCHES}


@pytest.fixture(scope="module")
def loaded(tiny: dict[str, Path]):
    """Tiny models loaded once per module (fp32, CPU); tests must not modify them."""
    cache: dict[str, object] = {}

    def get(arch: str):
        if arch not in cache:
            cache[arch] = _load(tiny[arch])
        return cache[arch]
    return get


def _info(path: Path, fmt: str = "safetensors") -> CheckpointInfo:
    return CheckpointInfo(path=path, name=path.stem, format=fmt)


def _load(path: Path, **kw):
    return load_checkpoint(_info(path, "ckpt" if path.suffix != ".safetensors" else "safetensors"),
                           device=CPU, dtype=torch.float32, **kw)


def _unet_inputs(model, size: int = 8):
    cfg = model.spec.unet_config
    x = torch.randn(1, cfg["in_channels"], size, size, generator=torch.Generator().manual_seed(0))
    ctx = torch.randn(1, 77, cfg["cross_attention_dim"], generator=torch.Generator().manual_seed(1))
    kw = {}
    if model.spec.is_sdxl:
        pooled = model.text_encoders[1].config.projection_dim
        kw["added_cond_kwargs"] = {"text_embeds": torch.randn(1, pooled),
                                   "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
    return x, ctx, kw


# ---------------------------------------------------------------- maker and detection

def test_maker_is_deterministic_and_small(tmp_path: Path) -> None:
    a = make_tiny_checkpoint("sd1", tmp_path / "a.safetensors", seed=3)
    b = make_tiny_checkpoint("sd1", tmp_path / "b.safetensors", seed=3)
    c = make_tiny_checkpoint("sd1", tmp_path / "c.safetensors", seed=4)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()
    assert a.stat().st_size < 30_000_000


EXPECTED = {
    "sd1": dict(arch="sd1", pred="eps", in_ch=4, heads=8, linear=False, flavours=("clip_l",)),
    "sd1-inpaint": dict(arch="sd1-inpaint", pred="eps", in_ch=9, heads=8, linear=False, flavours=("clip_l",)),
    "sd2": dict(arch="sd2", pred="eps", in_ch=4, heads=[1, 1, 2, 2], linear=True, flavours=("open_clip",)),
    "sd2-v": dict(arch="sd2-v", pred="v", in_ch=4, heads=[1, 1, 2, 2], linear=True, flavours=("open_clip",)),
    "sdxl": dict(arch="sdxl", pred="eps", in_ch=4, heads=[1, 1, 2], linear=True,
                 flavours=("clip_l", "open_clip")),
}


@pytest.mark.parametrize("arch", ARCHES)
def test_detect_each_arch(tiny: dict[str, Path], arch: str) -> None:
    sd = read_state_dict(tiny[arch])
    spec = detect_model_spec(sd, metadata=read_safetensors_metadata(tiny[arch]))
    exp = EXPECTED[arch]
    u = spec.unet_config
    assert (spec.arch, spec.prediction, u["in_channels"]) == (exp["arch"], exp["pred"], exp["in_ch"])
    assert u["attention_head_dim"] == exp["heads"] and u["use_linear_projection"] == exp["linear"]
    assert tuple(te.flavour for te in spec.text_encoders) == exp["flavours"]
    assert spec.vae_config["block_out_channels"] == [32, 64, 128, 128]
    assert spec.vae_config["latent_channels"] == 4 and spec.vae_config["layers_per_block"] == 1
    te = spec.text_encoders[-1].config
    assert (te["hidden_size"], te["num_hidden_layers"], te["vocab_size"], te["max_position_embeddings"]) == (
        32, 2, 49408, 77)
    assert te["intermediate_size"] == 128 and te["num_attention_heads"] == 1
    if arch == "sdxl":
        assert u["block_out_channels"] == [32, 64, 128] and u["layers_per_block"] == 2
        assert u["down_block_types"] == ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]
        assert u["cross_attention_dim"] == 64 and u["addition_time_embed_dim"] == 8
        assert u["projection_class_embeddings_input_dim"] == 80
        assert [t.layer for t in spec.text_encoders] == ["penultimate", "penultimate"]
        assert [t.pooled for t in spec.text_encoders] == [False, True]
        assert spec.vae_scale_factor == pytest.approx(0.13025)
    else:
        assert u["block_out_channels"] == [32, 64, 128, 128] and u["layers_per_block"] == 1
        assert u["cross_attention_dim"] == 32 and "addition_embed_type" not in u
        assert spec.vae_scale_factor == pytest.approx(0.18215)
    if arch.startswith("sd2"):
        assert te["hidden_act"] == "gelu" and spec.text_encoders[0].layer == "penultimate_norm"
        assert spec.text_encoders[0].pad_with_zero
    if arch.startswith("sd1"):
        assert te["hidden_act"] == "quick_gelu" and spec.text_encoders[0].layer == "last"


def test_unknown_layout_names_what_was_found() -> None:
    sd = {"foo.bar.weight": torch.zeros(2), "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 8, 3, 3)}
    with pytest.raises(CheckpointError, match=r"Unknown checkpoint architecture.*in_channels=8.*foo\.bar"):
        detect_model_spec(sd)


def test_prediction_priority(tiny: dict[str, Path], tmp_path: Path) -> None:
    sd1 = read_state_dict(tiny["sd1"])
    sd2v = read_state_dict(tiny["sd2-v"])
    meta_v = read_safetensors_metadata(tiny["sd2-v"])
    assert detect_model_spec(sd1, force_v=True).prediction == "v"
    v_yaml, eps_yaml = tmp_path / "v.yaml", tmp_path / "eps.yaml"
    v_yaml.write_text("model:\n  target: ldm.models.diffusion.ddpm.LatentDiffusion\n"
                      "  params:\n    parameterization: \"v\"\n")
    eps_yaml.write_text("model:\n  params:\n    linear_start: 0.00085\n")
    assert detect_model_spec(sd1, yaml_path=v_yaml).prediction == "v"
    # the yaml wins over force_v and over the file's own markers
    assert detect_model_spec(sd1, yaml_path=eps_yaml, force_v=True).prediction == "eps"
    spec = detect_model_spec(sd2v, yaml_path=eps_yaml, metadata=meta_v)
    assert (spec.arch, spec.prediction) == ("sd2", "eps")
    # each marker alone is enough
    no_key = {k: v for k, v in sd2v.items() if k != "v_pred"}
    assert detect_model_spec(no_key, metadata=meta_v).prediction == "v"
    assert detect_model_spec(sd2v, metadata=None).prediction == "v"


def test_unmarked_sd2_uses_the_unet_heuristic(tiny: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    sd = read_state_dict(tiny["sd2"])
    calls = []
    monkeypatch.setattr(detect_mod, "_probe_sd2_v", lambda sd, cfg: calls.append(cfg) or True)
    assert detect_model_spec(sd).arch == "sd2-v"  # no metadata: heuristic decides
    assert len(calls) == 1
    assert detect_model_spec(sd, metadata={"modelspec.prediction_type": "epsilon"}).prediction == "eps"
    assert len(calls) == 1
    monkeypatch.undo()
    assert isinstance(detect_mod._probe_sd2_v(sd, detect_model_spec(sd, force_v=True).unet_config), bool)


def test_v_heuristic_decision() -> None:
    assert v_heuristic(lambda x, t, c: x - 2.0, 8) is True
    assert v_heuristic(lambda x, t, c: x + 0.1, 8) is False
    seen = {}
    v_heuristic(lambda x, t, c: seen.update(x=x, t=t, c=c) or x, 16)
    assert seen["t"].tolist() == [999] and seen["c"].shape == (1, 2, 16)
    assert torch.all(seen["x"] == 0.5) and seen["x"].shape == (1, 4, 8, 8)


# ---------------------------------------------------------------- loading

@pytest.mark.parametrize("arch", ARCHES)
def test_load_each_arch_runs(tiny: dict[str, Path], loaded, arch: str) -> None:
    model = loaded(arch)
    assert model.spec.arch == arch and model.model_hash == hashlib.sha256(tiny[arch].read_bytes()).hexdigest()[:10]
    for m in (model.unet, model.vae, *model.text_encoders):
        assert not any(t.is_meta for t in [*m.parameters(), *m.buffers()])
        assert all(p.dtype == torch.float32 for p in m.parameters())
    x, ctx, kw = _unet_inputs(model)
    with torch.no_grad():
        out = model.unet(x, torch.tensor([500]), encoder_hidden_states=ctx, **kw).sample
        assert out.shape == (1, 4, 8, 8) and torch.isfinite(out).all() and out.std() > 1e-3
        img = model.vae.decode(torch.randn(1, 4, 8, 8)).sample
        assert img.shape == (1, 3, 64, 64) and torch.isfinite(img).all()
        ids = torch.tensor([[49406, 320, 1125, 49407] + [49407] * 73])
        for te in model.text_encoders:
            hs = te(ids, output_hidden_states=True).hidden_states
            assert len(hs) == 3 and torch.isfinite(hs[-1]).all()


def test_clip_mappings_match_diffusers(tiny: dict[str, Path], loaded) -> None:
    """Our OpenCLIP / CLIP-L key mapping against diffusers' converters, tensor by tensor."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    sd = read_state_dict(tiny["sdxl"])
    model = loaded("sdxl")
    te1, te2 = model.text_encoders
    ref = convert_open_clip_checkpoint(te2, sd, prefix="conditioner.embedders.1.model.")
    ours = te2.state_dict()
    assert len(ref) == len([k for k in ours if not k.endswith("position_ids")])
    for k, v in ref.items():
        assert torch.equal(ours[k], v.float()), k
    p = "conditioner.embedders.0.transformer.text_model."
    for k, v in te1.state_dict().items():
        if not k.endswith("position_ids"):
            assert torch.equal(v, sd[p + k].float()), k


def test_unet_and_vae_match_diffusers_from_single_file(tiny: dict[str, Path], loaded, tmp_path: Path) -> None:
    """The same file through diffusers' own single-file loader (offline, with local configs)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    model = loaded("sd1")
    for sub, cls, cfg in (("unet", UNet2DConditionModel, model.spec.unet_config),
                          ("vae", AutoencoderKL, model.spec.vae_config)):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "config.json").write_text(json.dumps({"_class_name": cls.__name__, **cfg}))
        ref = cls.from_single_file(str(tiny["sd1"]), config=str(tmp_path), subfolder=sub,
                                   local_files_only=True, torch_dtype=torch.float32).state_dict()
        ours = getattr(model, sub).state_dict()
        assert set(ref) == set(ours)
        for k in ref:
            assert torch.equal(ref[k], ours[k]), f"{sub}.{k}"


def test_incomplete_or_extra_tensors_are_refused(tiny: dict[str, Path], tmp_path: Path) -> None:
    sd = load_file(str(tiny["sd1"]))
    extra = dict(sd, **{"model.diffusion_model.input_blocks.1.2.weight": torch.zeros(3)})
    save_file(extra, str(tmp_path / "extra.safetensors"))
    with pytest.raises(CheckpointError, match="does not use"):
        _load(tmp_path / "extra.safetensors")
    missing = {k: v for k, v in sd.items() if not k.endswith("input_blocks.1.0.emb_layers.1.bias")}
    save_file(missing, str(tmp_path / "missing.safetensors"))
    with pytest.raises(CheckpointError, match="missing"):
        _load(tmp_path / "missing.safetensors")
    no_clip = {k: v for k, v in sd.items() if not k.endswith("encoder.layers.1.mlp.fc2.weight")}
    save_file(no_clip, str(tmp_path / "no_clip.safetensors"))
    with pytest.raises(CheckpointError, match="text encoder"):
        _load(tmp_path / "no_clip.safetensors")


def test_vae_override_in_three_layouts(tiny: dict[str, Path], tmp_path: Path) -> None:
    donor_path = make_tiny_checkpoint("sd1", tmp_path / "donor.safetensors", seed=7)
    donor = load_file(str(donor_path))
    donor_vae = _load(donor_path).vae.state_dict()
    vae_sd = {k: v for k, v in donor.items() if k.startswith("first_stage_model.")}
    files = {
        "prefixed.vae.safetensors": vae_sd,
        "bare.vae.pt": {"state_dict": {k.removeprefix("first_stage_model."): v for k, v in vae_sd.items()}},
        "diffusers.safetensors": {k: v.half() for k, v in donor_vae.items()},
    }
    for name, content in files.items():
        path = tmp_path / name
        torch.save(content, path) if name.endswith(".pt") else save_file(content, str(path))
        model = _load(tiny["sd1"], vae_path=path)
        assert model.vae_name == name and model.vae_hash == hashlib.sha256(path.read_bytes()).hexdigest()[:10]
        got = model.vae.state_dict()
        for k, v in donor_vae.items():
            assert torch.equal(got[k], v), (name, k)


# ---------------------------------------------------------------- reading and safety

class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (builtins.open, (str(self.marker), "w"))


def test_pickle_with_code_is_refused_and_never_run(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "payload": _Evil(marker)}, path)
    assert not marker.exists()
    with pytest.raises(UnsafeCheckpointError, match="refused: it contains code"):
        read_state_dict(path)
    with pytest.raises(UnsafeCheckpointError):
        _load(path)
    assert not marker.exists()


@pytest.mark.parametrize("legacy", [False, True])
def test_weights_only_ckpt_loads(tiny: dict[str, Path], tmp_path: Path, legacy: bool) -> None:
    sd = load_file(str(tiny["sd1"]))
    path = tmp_path / "plain.ckpt"
    torch.save({"state_dict": sd, "global_step": 10}, path, _use_new_zipfile_serialization=not legacy)
    got = read_state_dict(path)
    assert set(got) == set(sd) and all(torch.equal(got[k], sd[k]) for k in sd)
    model = _load(path)
    assert model.spec.arch == "sd1" and model.info.format == "ckpt"


def test_broken_files_give_checkpoint_errors(tiny: dict[str, Path], tmp_path: Path) -> None:
    data = tiny["sd1"].read_bytes()
    cases = {
        "truncated.safetensors": data[: len(data) // 2],
        "header_only.safetensors": data[:20],
        "random.safetensors": random.Random(0).randbytes(4096),
        "random.ckpt": random.Random(0).randbytes(4096),
        "empty.safetensors": b"",
        "notes.txt": b"hello",
    }
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(CheckpointError) as err:
            read_state_dict(tmp_path / name)
        assert not isinstance(err.value, UnsafeCheckpointError), name
        assert name in str(err.value)
    with pytest.raises(CheckpointError, match="not found"):
        read_state_dict(tmp_path / "nope.safetensors")
    with pytest.raises(CheckpointError, match="not found"):
        _load(tmp_path / "nope.safetensors")
    save_file({"a": torch.zeros(3)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match="Unknown checkpoint architecture"):
        _load(tmp_path / "other.safetensors")


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_garbage_files_always_give_checkpoint_errors(tmp_path: Path, suffix: str) -> None:
    """Random bytes make the unpickler fail with IndexError, KeyError, UnicodeDecodeError...: all must be
    CheckpointErrors, and never read as code (seeds 0-299 cover each of those error types)."""
    causes = set()
    for seed in range(300):
        path = tmp_path / f"garbage-{seed}{suffix}"
        path.write_bytes(random.Random(seed).randbytes(4096))
        with pytest.raises(CheckpointError) as err:
            read_state_dict(path)
        assert not isinstance(err.value, UnsafeCheckpointError), seed
        causes.add(type(err.value.__cause__).__name__)
    if suffix == ".ckpt":
        assert {"UnpicklingError", "IndexError", "KeyError"} <= causes


@pytest.mark.parametrize("entry", [
    {"dtype": "F16", "data_offsets": [0, 8]},  # no shape
    {"dtype": "F16", "shape": [4], "data_offsets": [0, "8"]},  # an offset that is text
    {"dtype": "F16", "shape": [-2, -2], "data_offsets": [0, 8]},  # negative sizes that multiply out
    {"dtype": "F16", "shape": [4], "data_offsets": [8, 0]},  # reversed offsets
    {"dtype": "F16", "shape": [4]},  # no offsets
    7,  # not an object
])
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_malformed_header_entries_give_checkpoint_errors(tmp_path: Path, entry, dtype) -> None:
    header = json.dumps({"w": entry, "ok": {"dtype": "F16", "shape": [4], "data_offsets": [0, 8]}}).encode()
    path = tmp_path / "bad-header.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + bytes(8))
    with pytest.raises(CheckpointError, match="bad-header.safetensors"):
        read_state_dict(path, dtype)


# ---------------------------------------------------------------- diffusers folders

@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_diffusers_folder_round_trip(loaded, tmp_path: Path, arch: str) -> None:
    model = loaded(arch)
    folder = tmp_path / "models" / f"tiny-{arch}"
    names = ["unet", "vae", "text_encoder", "text_encoder_2"]
    index = {"_class_name": "StableDiffusionXLPipeline" if arch == "sdxl" else "StableDiffusionPipeline"}
    for name, module in zip(names, [model.unet, model.vae, *model.text_encoders], strict=False):
        module.save_pretrained(folder / name)
        index[name] = ["diffusers" if name in ("unet", "vae") else "transformers", type(module).__name__]
    (folder / "model_index.json").write_text(json.dumps(index))
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({"prediction_type": "epsilon"}))
    [info] = find_checkpoints([tmp_path / "models"])
    assert (info.format, info.name) == ("diffusers", f"tiny-{arch}")
    back = load_checkpoint(info, device=CPU, dtype=torch.float32)
    assert back.spec.arch == arch and back.model_hash == ""
    assert back.spec.text_encoders == model.spec.text_encoders
    for a, b in zip([model.unet, model.vae, *model.text_encoders], [back.unet, back.vae, *back.text_encoders],
                    strict=True):
        sa, sb = a.state_dict(), b.state_dict()
        assert set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


# ---------------------------------------------------------------- discovery and hashing

def test_find_checkpoints_and_side_files(tmp_path: Path) -> None:
    root = tmp_path / "Stable-diffusion"
    for rel in ("a.safetensors", "sub/b.ckpt", "sub/deeper/c.pt", "a.vae.safetensors", "notes.txt",
                "a.yaml", "diff/unet/diffusion_pytorch_model.safetensors", "diff/model_index.json"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x")
    extra = tmp_path / "elsewhere" / "e.safetensors"
    extra.parent.mkdir()
    extra.write_bytes(b"x")
    found = find_checkpoints([root, tmp_path / "missing"], files=[extra, root / "a.safetensors"])
    assert [(i.name, i.format) for i in found] == [
        ("a", "safetensors"), ("diff", "diffusers"), ("e", "safetensors"), ("sub/b", "ckpt"),
        ("sub/deeper/c", "ckpt")]
    assert vae_beside_checkpoint(root / "a.safetensors") == root / "a.vae.safetensors"
    assert vae_beside_checkpoint(root / "sub" / "b.ckpt") is None
    assert yaml_beside_checkpoint(root / "a.safetensors") == root / "a.yaml"
    assert yaml_beside_checkpoint(root / "sub" / "b.ckpt") is None
    vae_dir = tmp_path / "VAE"
    (vae_dir / "x").mkdir(parents=True)
    for n in ("x/k.safetensors", "m.pt", "readme.md"):
        (vae_dir / n).write_bytes(b"v")
    assert find_vaes(vae_dir) == [vae_dir / "m.pt", vae_dir / "x" / "k.safetensors"]


def test_model_hash_and_cache(tmp_path: Path) -> None:
    path, cache = tmp_path / "m.safetensors", tmp_path / "cache" / "hashes.json"
    path.write_bytes(b"some weights" * 1000)
    expected = hashlib.sha256(path.read_bytes()).hexdigest()
    assert model_hash(path, None) == expected[:10]
    assert model_hash(path, cache) == expected[:10]
    entries = json.loads(cache.read_text())
    assert entries[str(path.resolve())]["sha256"] == expected
    entries[str(path.resolve())]["sha256"] = "f" * 64  # a cached value is used as is...
    cache.write_text(json.dumps(entries))
    assert model_hash(path, cache) == "f" * 10
    path.write_bytes(b"other weights" * 1000)  # ...until size or mtime change
    assert model_hash(path, cache) == hashlib.sha256(path.read_bytes()).hexdigest()[:10]


# ---------------------------------------------------------------- manager

def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")
def test_manager_reuses_and_releases(tiny: dict[str, Path], tmp_path: Path) -> None:
    manager = ModelManager(hash_cache=tmp_path / "h.json")
    a, b = _info(tiny["sd1"]), _info(tiny["sd2"])
    first = manager.load(a, device="cpu", dtype=torch.float32)
    assert manager.load(a, device="cpu", dtype=torch.float32) is first
    model_bytes = sum(p.numel() * 4 for m in (first.unet, first.vae, *first.text_encoders) for p in m.parameters())
    baseline = _rss()
    for info in (b, a, b):
        manager.load(info, device="cpu", dtype=torch.float32)
    assert first.unet.conv_in.weight.is_meta  # the replaced model's weights were released
    grown = _rss() - baseline  # without the release each switch adds a whole model (~45 MiB)
    assert grown < 0.5 * model_bytes, f"RSS grew {grown / 2**20:.1f} MiB over 3 switches"
    manager.unload()
    assert manager.current is None


def test_hash_cache_survives_threads_hashing_at_once(tmp_path):
    """Two workers of one process (--devices cpu,cpu) load, and so hash, at the same time; they once
    shared one temporary file name and the second rename failed."""
    import threading

    from modules.checkpoints.discover import file_sha256

    files = []
    for n in range(8):
        files.append(tmp_path / f"m{n}.bin")
        files[-1].write_bytes(bytes([n]) * 4096)
    cache, errors = tmp_path / "data" / "hashes.json", []

    def hash_all(offset: int) -> None:
        try:
            for k in range(40):
                file_sha256(files[(k + offset) % len(files)], cache)
                (files[(k + offset) % len(files)]).touch()  # a new mtime: the next call hashes and writes again
        except Exception as err:  # noqa: BLE001 - any failure is the bug
            errors.append(err)

    threads = [threading.Thread(target=hash_all, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert not list(cache.parent.glob("*.tmp"))

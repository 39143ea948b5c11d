"""Shared fixtures: offline environment, tiny checkpoints, a ready engine."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def share_cores_between_workers() -> None:
    """Under pytest-xdist each worker gets its share of the cores, for torch and the servers it starts:
    OpenMP threads spinning against another worker's cost far more than they gain on tiny models."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch

        threads = max(1, (os.cpu_count() or 1) // workers)
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
        torch.set_num_threads(threads)


share_cores_between_workers()

ARCHES = ("sd1", "sd1-inpaint", "sd2", "sd2-v", "sdxl")


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module of tiny networks: they run fastest so (and far faster on a loaded CPU)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """One tiny random checkpoint per architecture, in the original single-file layout."""
    from tests.fixtures.make_tiny_checkpoint import make_tiny_checkpoint

    folder = tmp_path_factory.mktemp("tiny-ckpts")
    return {arch: make_tiny_checkpoint(arch, folder / f"tiny-{arch}.safetensors") for arch in ARCHES}


@pytest.fixture(scope="session")
def tiny_sd1(tiny_checkpoints) -> Path:
    return tiny_checkpoints["sd1"]


def make_app(tmp_path: Path, **overrides):
    """An App on the CPU in fp32 whose folders all live under tmp_path."""
    from modules.app import build_app
    from modules.settings import Settings

    options = dict(models_dir=tmp_path / "models", outputs_dir=tmp_path / "outputs",
                   data_dir=tmp_path / "data", device="cpu", precision="fp32")
    return build_app(Settings(**{**options, **overrides}))


def make_engine(tmp_path: Path, **overrides):
    return make_app(tmp_path, **overrides).engine


@pytest.fixture(scope="session")
def sd1_engine(tmp_path_factory, tiny_sd1):
    """An engine with the tiny SD1 checkpoint loaded (shared: do not switch its model)."""
    engine = make_engine(tmp_path_factory.mktemp("engine"))
    engine.load_model(tiny_sd1)
    return engine

"""Which executor the server runs jobs on: one device (the default), every local device, or a Ray cluster."""
from __future__ import annotations

import logging
from pathlib import Path

from modules.app import App, build_engine
from modules.checkpoints.load import import_model_classes
from modules.errors import AtelierError
from modules.jobs.executor import Executor, LocalExecutor
from modules.jobs.pool import PoolExecutor

log = logging.getLogger(__name__)


def parse_devices(text: str | None, cuda_count: int | None = None) -> tuple[str, ...]:
    """--devices: 'all' (every CUDA device, else the CPU as one), or a list such as 'cuda:0,cuda:1'.

    The CPU counts as one device; 'cpu,cpu' (two CPU workers) is allowed for testing."""
    if not text:
        return ()
    if text.strip() == "all":
        if cuda_count is None:
            import torch

            cuda_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return tuple(f"cuda:{n}" for n in range(cuda_count)) or ("cpu",)
    devices = tuple(item.strip() for item in text.split(",") if item.strip())
    for device in devices:
        if device != "cpu" and not (device.startswith("cuda:") and device[5:].isdigit()) and device != "mps":
            raise AtelierError(f"--devices: {device!r} is not a device; use all, cpu or cuda:N "
                               "(comma-separated, e.g. cuda:0,cuda:1)")
    return devices


def worker_names(devices: tuple[str, ...]) -> list[str]:
    """cuda:0, cuda:1 ...; a device listed twice gets #2, #3."""
    names: list[str] = []
    for device in devices:
        count = sum(1 for d in devices[:len(names)] if d == device)
        names.append(device if count == 0 else f"{device}#{count + 1}")
    return names


def checkpoint_bytes(app: App):
    """A checkpoint's size on disk (a diffusers folder: its files), the cost of loading it."""
    def size(name: str) -> int:
        try:
            path = Path(app.engine.find_checkpoint(name).path)
        except AtelierError:
            return 0
        if path.is_dir():
            return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        return path.stat().st_size if path.exists() else 0

    return size


def local_devices_executor(app: App, devices: tuple[str, ...]) -> Executor:
    """One worker per device, each with its own engine and model cache, in this process."""
    job_images = app.settings.data_dir / "job-images"
    if len(devices) <= 1 and (not devices or str(app.engine.devices.device) == devices[0]):
        return LocalExecutor(app.engine, job_images)
    _share_cpu_threads(devices.count("cpu"))
    import_model_classes()  # before several workers can load at once
    workers = {}
    for n, (device, name) in enumerate(zip(devices, worker_names(devices), strict=True)):
        same = n == 0 and str(app.engine.devices.device) == device
        engine = app.engine if same else build_engine(app, device)
        workers[name] = LocalExecutor(engine, job_images, name=name)
    log.info("%d workers: %s", len(workers), ", ".join(workers))
    return PoolExecutor(workers, checkpoint_bytes(app))


def _share_cpu_threads(cpu_workers: int) -> None:
    """Several CPU workers in one process share its cores: each gets an equal part of torch's threads."""
    if cpu_workers > 1:
        import torch

        threads = max(1, torch.get_num_threads() // cpu_workers)
        torch.set_num_threads(threads)
        log.info("%d CPU workers share this process: %d torch threads", cpu_workers, threads)

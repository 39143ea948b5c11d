"""Scale-out: images/min on 1 and 2 workers (local, --devices cpu,cpu, Ray CPU actors), and the
scheduling overhead per job with a no-op model (Ray against local). Not a test.

    .venv/bin/python bench/cluster.py [--jobs 12] [--noop-jobs 200] [--out bench/cluster.json]

Every run goes through the real job manager (fair queue, SQLite history in memory) with tiny
64x64, 2-step jobs on the tiny SD1 fixture. Each worker runs torch on one thread, so N workers
need N free cores to scale; on a shared machine the numbers are noisy. Prints a table and JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


class NoopExecutor:
    """The local side of the overhead measure: a worker thread that returns at once."""

    slots = 1

    def __init__(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self._worker = ThreadPoolExecutor(max_workers=1)

    def run(self, spec, on_event):
        from modules.jobs.model import JobResult

        return self._worker.submit(lambda: JobResult(images=[], seeds=[1])).result()

    def interrupt(self, job_id): ...
    def skip(self, job_id): ...
    def loaded_model(self): return None
    def close(self): self._worker.shutdown()


class NoopActor:
    """The Ray side: an actor whose job stream yields the result at once."""

    def run(self, spec, inputs=None):
        yield {"result": {"images": [], "seeds": [1]}, "files": []}

    def hello(self):
        return {"pid": os.getpid(), "extensions": {}, "loads": 0}


def manager(executor):
    from modules.jobs.manager import JobManager
    from modules.jobs.store import JobStore

    jobs = JobManager(JobStore(":memory:"), executor)
    jobs.start()
    return jobs


def timed(jobs, submit, count: int) -> float:
    start = time.perf_counter()
    ids = [submit(jobs).id for _ in range(count)]
    for job_id in ids:
        assert jobs.wait(job_id, 600).state == "done"
    return time.perf_counter() - start


def image_runs(app, ray, count: int) -> list[dict]:
    from modules.jobs.executor import LocalExecutor
    from modules.jobs.model import Caller
    from modules.jobs.submit import Submission, SubmitService
    from modules.server.cluster import ray_executor
    from modules.server.executors import local_devices_executor

    values = {"prompt": "bench", "width": 64, "height": 64, "steps": 2, "sampler_name": "Euler", "seed": 1}
    name = app.engine.checkpoints()[0].name

    def submit(jobs):
        service = SubmitService(jobs, app.settings.limits, app.registries, lambda _c: {},
                                lambda _n: (name, name), app.settings.data_dir / "job-inputs")
        return service.submit(Caller("bench"), Submission("txt2img", values, checkpoint=name))

    configs = [("local", 1, lambda: LocalExecutor(app.engine, app.settings.data_dir / "job-images")),
               ("devices cpu,cpu", 2, lambda: local_devices_executor(app, ("cpu", "cpu"))),
               ("ray", 1, lambda: ray_executor(app, "local", ("cpu",))),
               ("ray", 2, lambda: ray_executor(app, "local", ("cpu", "cpu")))]
    rows = []
    for label, workers, make in configs:
        jobs = manager(make())
        timed(jobs, submit, workers)  # warm-up: each worker loads the model once
        seconds = timed(jobs, submit, count)
        jobs.close()
        rows.append({"executor": label, "workers": workers, "jobs": count, "seconds": round(seconds, 2),
                     "images_per_min": round(60 * count / seconds, 1)})
    return rows


def overhead_runs(app, ray, count: int) -> list[dict]:
    from modules.jobs.model import Caller
    from modules.jobs.pool import PoolExecutor
    from modules.server.cluster import RayWorker

    def submit(jobs):
        return jobs.submit(Caller("bench"), "txt2img", {"params": {"seed": 1}})

    actor = ray.remote(num_cpus=0, max_concurrency=4)(NoopActor).remote()
    worker = RayWorker(ray, actor, "noop", app.settings, ray.get(actor.hello.remote()))
    rows = []
    for label, executor in (("local", NoopExecutor()), ("ray", PoolExecutor({"noop": worker}))):
        jobs = manager(executor)
        timed(jobs, submit, 10)
        seconds = timed(jobs, submit, count)
        jobs.close()
        rows.append({"executor": label, "jobs": count, "ms_per_job": round(1000 * seconds / count, 2)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=12)
    parser.add_argument("--noop-jobs", type=int, default=200)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    import ray
    import torch

    from modules.app import build_app
    from modules.server.cluster import connect
    from modules.settings import Settings
    from tests.fixtures.make_tiny_checkpoint import make_tiny_checkpoint

    torch.set_num_threads(1)  # one core per worker, as the Ray CPU actors run
    tmp = Path(tempfile.mkdtemp(prefix="atelier-bench-cluster-"))
    make_tiny_checkpoint("sd1", tmp / "models" / "Stable-diffusion" / "tiny.safetensors")
    app = build_app(Settings(models_dir=tmp / "models", outputs_dir=tmp / "outputs", data_dir=tmp / "data",
                             device="cpu", precision="fp32"))
    os.environ.setdefault("ATELIER_RAY_CPUS", "2")
    connect(ray, "local")
    try:
        overhead = overhead_runs(app, ray, args.noop_jobs)
        images = image_runs(app, ray, args.jobs)
    finally:
        ray.shutdown()
    base = images[0]["images_per_min"]
    print(f"{'executor':<18}{'workers':>8}{'jobs':>6}{'s':>8}{'img/min':>9}{'x local':>9}")
    for row in images:
        print(f"{row['executor']:<18}{row['workers']:>8}{row['jobs']:>6}{row['seconds']:>8}"
              f"{row['images_per_min']:>9}{row['images_per_min'] / base:>9.2f}")
    print(f"\n{'no-op model':<18}{'jobs':>6}{'ms/job':>9}")
    for row in overhead:
        print(f"{row['executor']:<18}{row['jobs']:>6}{row['ms_per_job']:>9}")
    result = {"cores": os.cpu_count(), "torch_threads_per_worker": 1, "images": images, "overhead": overhead}
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()

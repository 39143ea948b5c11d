"""The web UI follows jobs from the event hub: no polling, previews every N steps, per-owner jobs."""
from __future__ import annotations

import asyncio
import queue
from collections import Counter
from types import SimpleNamespace

import pytest

from modules.jobs.manager import JobManager
from modules.jobs.model import CANCELLED, DONE, QUEUED, RUNNING, Caller, JobNotFound, JobResult
from modules.jobs.store import JobStore
from modules.server.events import EventHub
from modules.ui.follow import follow

ALICE, BOB = Caller("alice"), Caller("bob")
WAIT = 10.0


class CountingJobManager(JobManager):
    """The real JobManager; it only counts the reads a follower could poll with."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.reads: Counter = Counter()

    def get(self, job_id, caller):
        self.reads["get"] += 1
        return super().get(job_id, caller)

    def position(self, job_id):
        self.reads["position"] += 1
        return super().position(job_id)

    def preview(self, job_id):
        self.reads["preview"] += 1
        return super().preview(job_id)

    def list(self, *args, **kwargs):
        self.reads["list"] += 1
        return super().list(*args, **kwargs)


class SteppingExecutor:
    """Runs one job step by step: each `step()` from the test emits one progress event with a preview,
    and one more after the last step ends the job."""

    slots = 1

    def __init__(self, steps: int) -> None:
        self.steps = steps
        self._tokens: queue.Queue = queue.Queue()
        self.interrupted: set[str] = set()

    def step(self) -> None:
        self._tokens.put("step")

    def run(self, spec, on_event):
        for step in range(1, self.steps + 1):
            self._tokens.get(timeout=WAIT)
            if spec.id in self.interrupted:
                break
            on_event({"fraction": step / self.steps, "job_no": 0, "job_count": 1, "step": step,
                      "steps": self.steps, "preview": f"png-{step}".encode()})
        else:
            self._tokens.get(timeout=WAIT)  # one more step() lets the job finish
        return JobResult(images=[], seeds=[1], interrupted=spec.id in self.interrupted)

    def interrupt(self, job_id):
        self.interrupted.add(job_id)
        self._tokens.put("stop")

    def skip(self, job_id):
        pass

    def load_model(self, name):
        return name

    def unload_model(self):
        pass

    def loaded_model(self):
        return None

    def close(self):
        self._tokens.put("stop")


def setup(tmp_path, steps: int = 4) -> tuple[CountingJobManager, SteppingExecutor, EventHub, SimpleNamespace]:
    executor = SteppingExecutor(steps)
    jobs = CountingJobManager(JobStore(tmp_path / "jobs.sqlite3"), executor)
    hub = EventHub(jobs)
    hub.attach()
    return jobs, executor, hub, SimpleNamespace(jobs=jobs)


def test_follow_waits_on_events_and_reads_nothing_while_the_job_is_idle(tmp_path):
    jobs, _, hub, ctx = setup(tmp_path)  # not started: the job stays in the queue

    async def scenario() -> None:
        job = jobs.submit(ALICE, "txt2img", {})
        updates = follow(ctx, hub, ALICE, job.id)
        first = await asyncio.wait_for(updates.__anext__(), WAIT)
        assert first.job.state == QUEUED and first.position == 0
        reads = dict(jobs.reads)
        assert reads["get"] == 1

        pending = asyncio.ensure_future(updates.__anext__())
        await asyncio.sleep(1.0)  # a poller at 0.25 s would have read the job four times by now
        assert not pending.done(), "an update came without any job event"
        assert dict(jobs.reads) == reads, "follow read the job manager while no event arrived"

        jobs.submit(BOB, "txt2img", {})  # a queue change: a positions event
        second = await asyncio.wait_for(pending, WAIT)
        assert second.job.state == QUEUED and second.position == 0

        before = jobs.reads["get"]
        jobs.cancel(job.id, ALICE)  # cancel reads the job itself, once
        own_reads = jobs.reads["get"] - before
        last = await asyncio.wait_for(updates.__anext__(), WAIT)
        assert last.job.state == CANCELLED and last.preview is None
        with pytest.raises(StopAsyncIteration):
            await updates.__anext__()
        assert jobs.reads["get"] == 1 + own_reads, "the job is read once, when following starts"
        assert hub.subscriber_count() == 0

    asyncio.run(scenario())
    jobs.close(timeout=1)


@pytest.mark.parametrize(("every", "shown_at"), [(1, [1, 2, 3, 4, 5, 6]), (2, [1, 2, 4, 6]), (3, [1, 3, 6]),
                                                 (0, [])])
def test_previews_come_with_progress_events_every_n_steps(tmp_path, every, shown_at):
    jobs, executor, hub, ctx = setup(tmp_path, steps=6)
    jobs.start()

    async def scenario() -> None:
        job = jobs.submit(ALICE, "txt2img", {})
        updates = follow(ctx, hub, ALICE, job.id, preview_every=every)
        running = await asyncio.wait_for(updates.__anext__(), WAIT)
        if running.job.state == QUEUED:  # the dispatcher had not taken it yet
            running = await asyncio.wait_for(updates.__anext__(), WAIT)
        assert running.job.state == RUNNING and running.position is None
        assert running.job.progress.step == 0 and running.preview is None
        shown = []
        for step in range(1, 7):
            executor.step()
            update = await asyncio.wait_for(updates.__anext__(), WAIT)
            while step == 1 and update.job.progress.step == 0:  # a late second "running" event (the worker's)
                assert update.job.state == RUNNING and update.preview is None
                update = await asyncio.wait_for(updates.__anext__(), WAIT)
            assert update.job.progress.step == step
            if update.preview is not None:
                assert update.preview == f"png-{step}".encode()
                shown.append(step)
        executor.step()  # the executor returns
        last = await asyncio.wait_for(updates.__anext__(), WAIT)
        assert last.job.state == DONE and last.preview is None
        assert shown == shown_at
        assert jobs.reads["get"] == 1

    asyncio.run(scenario())
    jobs.close(timeout=1)


def test_interrupt_ends_the_followed_job(tmp_path):
    jobs, executor, hub, ctx = setup(tmp_path, steps=6)
    jobs.start()

    async def scenario() -> None:
        job = jobs.submit(ALICE, "txt2img", {})
        updates = follow(ctx, hub, ALICE, job.id)
        update = await asyncio.wait_for(updates.__anext__(), WAIT)
        while update.job.progress.step < 1:
            if update.job.state == RUNNING and update.job.progress.step == 0:
                executor.step()
            update = await asyncio.wait_for(updates.__anext__(), WAIT)
        with pytest.raises(JobNotFound):
            jobs.interrupt(job.id, BOB)  # another user cannot reach it
        jobs.interrupt(job.id, ALICE)
        rest = [update async for update in updates]
        assert rest[-1].job.state == DONE and rest[-1].job.result.interrupted

    asyncio.run(scenario())
    jobs.close(timeout=1)


def test_a_user_cannot_follow_another_users_job(tmp_path):
    jobs, _, hub, ctx = setup(tmp_path)

    async def scenario() -> None:
        job = jobs.submit(ALICE, "txt2img", {})
        with pytest.raises(JobNotFound):
            await follow(ctx, hub, BOB, job.id).__anext__()
        assert hub.subscriber_count() == 0

    asyncio.run(scenario())
    jobs.close(timeout=1)

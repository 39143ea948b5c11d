"""The job system without an engine: fair queue, owners, cancel/interrupt, durable history, recovery."""
from __future__ import annotations

import threading

import pytest

from modules.errors import InvalidParams
from modules.jobs.manager import JobManager
from modules.jobs.model import CANCELLED, DONE, FAILED, QUEUED, RUNNING, Caller, Job, JobNotFound, JobResult
from modules.jobs.queue import FairQueue
from modules.jobs.store import CRASH_REASON, JobStore

ALICE, BOB, CAROL, ADMIN = Caller("alice"), Caller("bob"), Caller("carol"), Caller("root", admin=True)


class FakeExecutor:
    """Runs a job by waiting until the test releases it; records the order it ran jobs in."""

    slots = 1

    def __init__(self, hold: bool = False) -> None:
        self.ran: list[str] = []
        self.gate = threading.Event()
        self.started = threading.Event()
        self.interrupted: set[str] = set()
        self.skipped: set[str] = set()
        if not hold:
            self.gate.set()

    def run(self, spec, on_event):
        self.ran.append(spec.id)
        self.started.set()
        on_event({"fraction": 0.5, "job_no": 0, "job_count": 1, "step": 1, "steps": 2, "preview": b"png"})
        self.gate.wait(10)
        if spec.params.get("fail"):
            raise InvalidParams("bad job")
        if spec.params.get("crash"):
            raise ZeroDivisionError("boom")
        return JobResult(images=[f"/x/{spec.id}.png"], seeds=[1], interrupted=spec.id in self.interrupted)

    def interrupt(self, job_id):
        self.interrupted.add(job_id)
        self.gate.set()

    def skip(self, job_id):
        self.skipped.add(job_id)

    def load_model(self, name):
        return name

    def unload_model(self):
        pass

    def loaded_model(self):
        return None

    def close(self):
        self.gate.set()


def manager(tmp_path, executor=None, start=True) -> JobManager:
    jm = JobManager(JobStore(tmp_path / "jobs.sqlite3"), executor or FakeExecutor())
    if start:
        jm.start()
    return jm


def test_fair_queue_round_robin_and_positions():
    q = FairQueue()
    for n in range(3):
        q.push("a", f"a{n}")
    q.push("b", "b0")
    q.push("c", "c0")
    q.push("b", "b1")
    assert q.order() == ["a0", "b0", "c0", "a1", "b1", "a2"]
    assert q.positions()["c0"] == 2
    assert [q.pop() for _ in range(6)] == ["a0", "b0", "c0", "a1", "b1", "a2"]
    assert q.pop() is None


def test_fair_queue_owner_arriving_late_is_not_stuck_behind_a_batch():
    q = FairQueue()
    for n in range(10):
        q.push("a", f"a{n}")
    assert q.pop() == "a0"
    q.push("b", "b0")
    assert q.positions()["b0"] <= 1
    assert q.remove("a5") and "a5" not in q and len(q) == 9


def test_jobs_run_and_are_recorded(tmp_path):
    jm = manager(tmp_path)
    job = jm.submit(ALICE, "txt2img", {"params": {"prompt": "x"}})
    done = jm.wait(job.id, 10)
    assert done.state == DONE and done.result.images == [f"/x/{job.id}.png"]
    assert done.started >= done.created and done.finished >= done.started
    assert [j.id for j in jm.list(ALICE)] == [job.id]
    assert jm.list(BOB) == []
    jm.close()


def test_owners_only_see_and_control_their_own_jobs(tmp_path):
    executor = FakeExecutor(hold=True)
    jm = manager(tmp_path, executor)
    running = jm.submit(ALICE, "txt2img", {})
    queued = jm.submit(ALICE, "txt2img", {})
    assert executor.started.wait(5)
    for action in (jm.get, jm.cancel, jm.interrupt, jm.skip):
        with pytest.raises(JobNotFound):
            action(running.id, BOB)
    assert executor.interrupted == set() and executor.skipped == set()
    jm.skip(running.id, ADMIN)
    assert executor.skipped == {running.id}
    assert jm.cancel(queued.id, ALICE).state == CANCELLED
    jm.interrupt(running.id, ALICE)
    finished = jm.wait(running.id, 10)
    assert finished.state == DONE and finished.result.interrupted and finished.result.images
    assert jm.get(queued.id, ALICE).state == CANCELLED and queued.id not in executor.ran
    assert len(jm.list(ADMIN, owner=None)) == 2
    jm.close()


def test_cancelling_a_running_job_keeps_its_images(tmp_path):
    executor = FakeExecutor(hold=True)
    jm = manager(tmp_path, executor)
    job = jm.submit(ALICE, "txt2img", {})
    assert executor.started.wait(5)
    jm.cancel(job.id, ALICE)
    final = jm.wait(job.id, 10)
    assert final.state == CANCELLED and final.result.images
    jm.close()


def test_failures_never_stop_the_worker(tmp_path):
    jm = manager(tmp_path)
    bad = jm.submit(ALICE, "txt2img", {"fail": True})
    crash = jm.submit(ALICE, "txt2img", {"crash": True})
    good = jm.submit(ALICE, "txt2img", {})
    assert jm.wait(bad.id, 10).error == "bad job"
    assert "ZeroDivisionError" in jm.wait(crash.id, 10).error and jm.get(crash.id, ALICE).state == FAILED
    assert jm.wait(good.id, 10).state == DONE
    jm.close()


def test_fair_dispatch_across_owners(tmp_path):
    executor = FakeExecutor(hold=True)
    jm = manager(tmp_path, executor)
    first = jm.submit(ALICE, "txt2img", {})
    assert executor.started.wait(5)
    alice = [jm.submit(ALICE, "txt2img", {}).id for _ in range(5)]
    bob = jm.submit(BOB, "txt2img", {}).id
    carol = jm.submit(CAROL, "txt2img", {}).id
    assert jm.position(bob) == 1 and jm.position(carol) == 2 and jm.position(alice[0]) == 0
    events = []
    jm.add_listener(events.append)
    executor.gate.set()
    jm.wait(alice[-1], 10)
    assert executor.ran == [first.id, alice[0], bob, carol, *alice[1:]]
    assert {e.type for e in events} >= {"running", "progress", "done", "positions"}
    jm.close()


def test_history_and_queue_survive_a_restart_and_running_jobs_fail(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite3")
    done = store.add(Job("a" * 32, "alice", "txt2img", {}, state=DONE, result=JobResult(images=["/i.png"])))
    running = store.add(Job("b" * 32, "alice", "txt2img", {}, state=RUNNING, started=1.0))
    queued = store.add(Job("c" * 32, "bob", "txt2img", {"n": 1}, state=QUEUED))
    store.close()
    executor = FakeExecutor()
    jm = manager(tmp_path, executor)
    assert jm.wait(queued.id, 10).state == DONE and executor.ran == [queued.id]
    crashed = jm.get(running.id, ALICE)
    assert crashed.state == FAILED and crashed.error == CRASH_REASON
    assert jm.get(done.id, ALICE).result.images == ["/i.png"]
    jm.close()

"""Jobs as plain, serialisable data: what was asked, by whom, and what came of it."""
from __future__ import annotations

import time
import uuid
from dataclasses import asdict, dataclass, field, replace
from typing import Any

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
STATES = (QUEUED, RUNNING, DONE, FAILED, CANCELLED)
FINISHED = (DONE, FAILED, CANCELLED)
KINDS = ("txt2img", "img2img")


def new_job_id() -> str:
    return uuid.uuid4().hex


def is_job_id(value: str) -> bool:
    """Job ids are 32 lowercase hex digits; anything else is refused before any lookup."""
    return len(value) == 32 and all(c in "0123456789abcdef" for c in value)


@dataclass(frozen=True)
class JobResult:
    """What a finished job produced. Image paths are local files written atomically."""

    images: list[str] = field(default_factory=list)
    infotexts: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    subseeds: list[int] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)
    negative_prompts: list[str] = field(default_factory=list)
    interrupted: bool = False
    warnings: list[str] = field(default_factory=list)
    model: str | None = None  # checkpoint title the job ran on

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> JobResult | None:
        if data is None:
            return None
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


@dataclass(frozen=True)
class Progress:
    """Live progress of a running job (not persisted step by step)."""

    fraction: float = 0.0
    job_no: int = 0
    job_count: int = 0
    step: int = 0
    steps: int = 0
    text: str = ""  # what a script is doing ("cell 3/12"); empty for a plain job

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Job:
    """One unit of work. `params` holds the typed params' fields by name, plus job-level keys."""

    id: str
    owner: str
    kind: str
    params: dict[str, Any]
    state: str = QUEUED
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    progress: Progress = field(default_factory=Progress)
    result: JobResult | None = None
    error: str | None = None
    seq: int = 0  # submission order, assigned by the store
    worker: str | None = None  # the executor's worker that runs (or ran) it
    error_kind: str | None = None  # "invalid": the job's parameters were refused while it ran (a 4xx)

    @property
    def is_finished(self) -> bool:
        return self.state in FINISHED

    @property
    def queue_wait(self) -> float | None:
        return None if self.started is None else self.started - self.created

    def evolve(self, **changes: Any) -> Job:
        return replace(self, **changes)

    def to_dict(self, with_params: bool = True) -> dict[str, Any]:
        data = {
            "id": self.id, "owner": self.owner, "kind": self.kind, "state": self.state,
            "created": self.created, "started": self.started, "finished": self.finished,
            "progress": self.progress.to_dict(), "error": self.error,
            "result": self.result.to_dict() if self.result else None, "worker": self.worker,
        }
        if self.error_kind:
            data["error_kind"] = self.error_kind
        if with_params:
            data["params"] = self.params
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Job:
        return cls(
            id=data["id"], owner=data["owner"], kind=data["kind"], params=dict(data.get("params") or {}),
            state=data.get("state", QUEUED), created=data.get("created", 0.0), started=data.get("started"),
            finished=data.get("finished"), progress=Progress(**(data.get("progress") or {})),
            result=JobResult.from_dict(data.get("result")), error=data.get("error"), seq=data.get("seq", 0),
            worker=data.get("worker"), error_kind=data.get("error_kind"))


@dataclass(frozen=True)
class JobSpec:
    """What an executor gets: only plain data, so a remote executor can take it over the wire."""

    id: str
    kind: str
    params: dict[str, Any]


@dataclass(frozen=True)
class Caller:
    """Who is asking: jobs belong to `owner`; an admin may act on everyone's jobs."""

    owner: str
    admin: bool = False

    def may_touch(self, job: Job) -> bool:
        return self.admin or job.owner == self.owner


class JobNotFound(LookupError):
    """No such job, or not one the caller may see."""


class NotAllowed(PermissionError):
    """The caller may not steer this job or queue (another user's job, or an admin-only action)."""


class NotQueued(RuntimeError):
    """The job is no longer waiting in the queue (it runs or has finished), so it cannot be steered."""


class QueueFull(RuntimeError):
    """The owner already has too many jobs waiting."""

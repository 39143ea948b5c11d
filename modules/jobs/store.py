"""Durable job history in SQLite: every state change is one transaction.

The database lives under the data folder. Queued jobs survive a restart and run
after it; jobs that were running when the process died are marked failed by
`recover()`, never silently lost.
"""
from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from modules.jobs.model import FAILED, QUEUED, RUNNING, Job

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    owner TEXT NOT NULL,
    kind TEXT NOT NULL,
    state TEXT NOT NULL,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    data TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_owner ON jobs (owner, seq);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state, seq);
CREATE TABLE IF NOT EXISTS queue_order (
    id TEXT PRIMARY KEY,
    rank INTEGER,
    priority INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS queue_flags (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""
PAUSED_ALL = "paused"
PAUSED_OWNER = "paused:"
CRASH_REASON = "The server stopped while this job was running; it did not finish."


class JobStore:
    """Thread-safe SQLite store of jobs (one connection, serialised by a lock)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: safe against a killed process
        self._db.executescript(SCHEMA)

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def add(self, job: Job) -> Job:
        """Insert a new job; returns it with its submission sequence number."""
        with self._transaction() as db:
            cur = db.execute(
                "INSERT INTO jobs (id, owner, kind, state, created, started, finished, data) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (job.id, job.owner, job.kind, job.state, job.created, job.started, job.finished,
                 json.dumps(job.to_dict())))
            return job.evolve(seq=int(cur.lastrowid or 0))

    def update(self, job: Job) -> None:
        with self._transaction() as db:
            db.execute("UPDATE jobs SET state=?, started=?, finished=?, data=? WHERE id=?",
                       (job.state, job.started, job.finished, json.dumps(job.to_dict()), job.id))

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            row = self._db.execute("SELECT seq, data FROM jobs WHERE id=?", (job_id,)).fetchone()
        return _job(row) if row else None

    def list(self, owner: str | None = None, state: str | None = None, limit: int = 100,
             before_seq: int | None = None) -> list[Job]:
        """Newest first; `owner` None lists everyone's (for admins)."""
        clauses, args = [], []
        for column, value in (("owner", owner), ("state", state)):
            if value is not None:
                clauses.append(f"{column}=?")
                args.append(value)
        if before_seq is not None:
            clauses.append("seq<?")
            args.append(before_seq)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        with self._lock:
            rows = self._db.execute(f"SELECT seq, data FROM jobs {where} ORDER BY seq DESC LIMIT ?",
                                    (*args, limit)).fetchall()
        return [_job(row) for row in rows]

    def queued(self) -> list[Job]:
        """Every queued job in submission order."""
        with self._lock:
            rows = self._db.execute("SELECT seq, data FROM jobs WHERE state=? ORDER BY seq",
                                    (QUEUED,)).fetchall()
        return [_job(row) for row in rows]

    # -- queue steering: order within an owner, admin priority, pauses (read back on start) --------
    def set_ranks(self, job_ids: list[str]) -> None:
        """One owner's queued jobs in their chosen order."""
        with self._transaction() as db:
            for rank, job_id in enumerate(job_ids):
                db.execute("INSERT INTO queue_order (id, rank) VALUES (?, ?) "
                           "ON CONFLICT(id) DO UPDATE SET rank=excluded.rank", (job_id, rank))

    def set_priority(self, job_id: str, priority: int) -> None:
        with self._transaction() as db:
            db.execute("INSERT INTO queue_order (id, priority) VALUES (?, ?) "
                       "ON CONFLICT(id) DO UPDATE SET priority=excluded.priority", (job_id, priority))

    def queue_order(self) -> dict[str, tuple[int | None, int]]:
        """Job id -> (rank or None, priority) for queued jobs that were steered."""
        with self._lock:
            rows = self._db.execute("SELECT q.id, q.rank, q.priority FROM queue_order q JOIN jobs j "
                                    "ON j.id = q.id WHERE j.state=?", (QUEUED,)).fetchall()
        return {job_id: (rank, priority) for job_id, rank, priority in rows}

    def set_paused(self, owner: str | None, paused: bool) -> None:
        """Pause or resume everyone (`owner` None) or one owner; kept across restarts."""
        key = PAUSED_ALL if owner is None else PAUSED_OWNER + owner
        with self._transaction() as db:
            if paused:
                db.execute("INSERT OR REPLACE INTO queue_flags (key, value) VALUES (?, '1')", (key,))
            else:
                db.execute("DELETE FROM queue_flags WHERE key=?", (key,))

    def paused(self) -> tuple[bool, set[str]]:
        """(everything paused, the owners paused)."""
        with self._lock:
            keys = [row[0] for row in self._db.execute("SELECT key FROM queue_flags").fetchall()]
        return PAUSED_ALL in keys, {k[len(PAUSED_OWNER):] for k in keys if k.startswith(PAUSED_OWNER)}

    def durations(self, limit: int = 20) -> list[float]:
        """Run times of the latest finished jobs (for ETAs)."""
        with self._lock:
            rows = self._db.execute("SELECT finished - started FROM jobs WHERE state='done' AND started "
                                    "IS NOT NULL AND finished IS NOT NULL ORDER BY seq DESC LIMIT ?",
                                    (limit,)).fetchall()
        return [float(row[0]) for row in rows]

    def recover(self, now: float) -> list[Job]:
        """Mark jobs left running by a dead process as failed; returns them."""
        with self._transaction() as db:
            rows = db.execute("SELECT seq, data FROM jobs WHERE state=?", (RUNNING,)).fetchall()
            failed = [_job(row).evolve(state=FAILED, finished=now, error=CRASH_REASON) for row in rows]
            for job in failed:
                db.execute("UPDATE jobs SET state=?, finished=?, data=? WHERE id=?",
                           (job.state, job.finished, json.dumps(job.to_dict()), job.id))
        return failed

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _job(row: tuple) -> Job:
    seq, data = row
    return Job.from_dict({**json.loads(data), "seq": seq})

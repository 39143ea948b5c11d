"""A fair queue people can steer: round-robin between owners, FIFO within one owner, plus
admin priority (jumps ahead of everyone), per-owner reordering, and pausing (all, or one owner).
"""
from __future__ import annotations

from collections import OrderedDict, deque


class FairQueue:
    """Job ids by owner. Not thread-safe: the job manager holds its lock around every call."""

    def __init__(self) -> None:
        self._by_owner: OrderedDict[str, deque[str]] = OrderedDict()  # order = whose turn is next
        self._priority: dict[str, int] = {}  # job id -> admin priority (only non-zero ones)
        self.paused_all = False
        self.paused_owners: set[str] = set()

    def __len__(self) -> int:
        return sum(len(ids) for ids in self._by_owner.values())

    def __contains__(self, job_id: str) -> bool:
        return any(job_id in ids for ids in self._by_owner.values())

    def push(self, owner: str, job_id: str, priority: int = 0) -> None:
        self._by_owner.setdefault(owner, deque()).append(job_id)
        if priority:
            self._priority[job_id] = priority

    def owner_of(self, job_id: str) -> str | None:
        return next((owner for owner, ids in self._by_owner.items() if job_id in ids), None)

    def priority(self, job_id: str) -> int:
        return self._priority.get(job_id, 0)

    def set_priority(self, job_id: str, priority: int) -> None:
        if priority:
            self._priority[job_id] = priority
        else:
            self._priority.pop(job_id, None)

    def move(self, job_id: str, index: int) -> list[str]:
        """Move a job to `index` among its owner's queued jobs (clamped); returns the owner's new order."""
        owner = self.owner_of(job_id)
        if owner is None:
            raise KeyError(job_id)
        ids = self._by_owner[owner]
        ids.remove(job_id)
        ids.insert(max(0, min(index, len(ids))), job_id)
        return list(ids)

    def lane(self, owner: str) -> list[str]:
        return list(self._by_owner.get(owner, ()))

    def _fair(self, owners: list[str]) -> list[str]:
        """These owners' jobs round-robin (whose turn first), admin priority jumping ahead."""
        lanes = [list(self._by_owner[owner]) for owner in owners]
        result: list[str] = []
        depth = 0
        while any(depth < len(lane) for lane in lanes):
            result.extend(lane[depth] for lane in lanes if depth < len(lane))
            depth += 1
        return sorted(result, key=lambda job_id: -self._priority.get(job_id, 0))  # stable

    def _unpaused(self) -> list[str]:
        return [owner for owner in self._by_owner if owner not in self.paused_owners]

    def runnable(self) -> list[str]:
        """Ids `pop` may return, in the order it would return them: priority first, then round-robin."""
        return [] if self.paused_all else self._fair(self._unpaused())

    def pop(self, job_id: str | None = None) -> str | None:
        """The next runnable job id (or `job_id`, one of the runnable ones); its owner goes to the back."""
        order = self.runnable()
        if not order:
            return None
        job_id = job_id if job_id in order else order[0]
        owner = self.owner_of(job_id)
        ids = self._by_owner.pop(owner)
        ids.remove(job_id)
        if ids:
            self._by_owner[owner] = ids
        self._priority.pop(job_id, None)
        return job_id

    def remove(self, job_id: str) -> bool:
        for owner, ids in self._by_owner.items():
            if job_id in ids:
                ids.remove(job_id)
                if not ids:
                    del self._by_owner[owner]
                self._priority.pop(job_id, None)
                return True
        return False

    def order(self) -> list[str]:
        """Every queued id in the order they would run once the whole queue is resumed; the jobs of
        paused owners come last."""
        paused = [owner for owner in self._by_owner if owner in self.paused_owners]
        return self._fair(self._unpaused()) + self._fair(paused)

    def positions(self) -> dict[str, int]:
        """Job id -> how many jobs run before it (0: it runs next)."""
        return {job_id: n for n, job_id in enumerate(self.order())}

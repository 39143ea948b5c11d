"""A fair queue: round-robin between owners, first in, first out within one owner."""
from __future__ import annotations

from collections import OrderedDict, deque


class FairQueue:
    """Job ids by owner. Not thread-safe: the job manager holds its lock around every call."""

    def __init__(self) -> None:
        self._by_owner: OrderedDict[str, deque[str]] = OrderedDict()  # order = whose turn is next

    def __len__(self) -> int:
        return sum(len(ids) for ids in self._by_owner.values())

    def __contains__(self, job_id: str) -> bool:
        return any(job_id in ids for ids in self._by_owner.values())

    def push(self, owner: str, job_id: str) -> None:
        self._by_owner.setdefault(owner, deque()).append(job_id)

    def pop(self) -> str | None:
        """The next job id: the first job of the owner whose turn it is; that owner goes to the back."""
        if not self._by_owner:
            return None
        owner, ids = next(iter(self._by_owner.items()))
        job_id = ids.popleft()
        del self._by_owner[owner]
        if ids:
            self._by_owner[owner] = ids
        return job_id

    def remove(self, job_id: str) -> bool:
        for owner, ids in self._by_owner.items():
            if job_id in ids:
                ids.remove(job_id)
                if not ids:
                    del self._by_owner[owner]
                return True
        return False

    def order(self) -> list[str]:
        """Every queued id in the order `pop` would return them, if nothing new arrived."""
        lanes = [list(ids) for ids in self._by_owner.values()]
        result: list[str] = []
        depth = 0
        while len(result) < len(self):
            result.extend(lane[depth] for lane in lanes if depth < len(lane))
            depth += 1
        return result

    def positions(self) -> dict[str, int]:
        """Job id -> how many jobs run before it (0: it runs next)."""
        return {job_id: n for n, job_id in enumerate(self.order())}

"""Growth checks for parsers that see untrusted text: linear, not quadratic.

Time is the calling thread's own CPU time with the garbage collector paused, so server
threads left by other tests (which take the GIL, not this thread's CPU) and collector
passes over many small objects do not count. The bound sits between linear and
quadratic growth: for text k times longer, k**1.5 times the time.
"""

import gc
import time
from collections.abc import Callable


def thread_seconds(run: Callable[[], object], repeats: int = 3) -> float:
    """The best of `repeats` runs, in CPU seconds of this thread."""
    best = float("inf")
    enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(repeats):
            start = time.thread_time()
            run()
            best = min(best, time.thread_time() - start)
    finally:
        if enabled:
            gc.enable()
    return best


def assert_linear_growth(run_at: Callable[[int], Callable[[], object]], small: int, large: int) -> None:
    """Fails when `run_at(large)` costs more than (large/small)**1.5 times `run_at(small)`."""
    small_s, large_s = thread_seconds(run_at(small)), thread_seconds(run_at(large))
    factor = (large / small) ** 1.5
    assert large_s < factor * small_s + 0.05, f"{small}: {small_s:.4f} s, {large}: {large_s:.4f} s"

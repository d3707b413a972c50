"""What an engine holds, released backwards, every wait bounded by one deadline.

Each resource is registered the moment it is acquired, so a constructor that fails halfway
releases exactly what exists. The atexit hook holds engines only weakly."""

from __future__ import annotations

import atexit
import logging
import time
import weakref
from collections.abc import Callable

log = logging.getLogger("tp_engine.lifecycle")


class Deadline:
    def __init__(self, seconds: float):
        self.seconds = seconds
        self.at = time.monotonic() + seconds

    def left(self, floor: float = 0.0) -> float:
        return max(floor, self.at - time.monotonic())


class Resources:
    def __init__(self) -> None:
        self._held: list[tuple[str, Callable[[Deadline], None]]] = []

    def acquired(self, name: str, release: Callable[[Deadline], None]) -> None:
        self._held.append((name, release))

    def release_all(self, deadline: Deadline) -> None:
        while self._held:
            name, release = self._held.pop()
            start = time.perf_counter()
            try:
                release(deadline)
            except Exception:  # one failed release must not keep the others held
                log.exception("releasing %s failed", name)
            log.debug("released %s in %.1f ms", name, (time.perf_counter() - start) * 1e3)


_live: weakref.WeakSet = weakref.WeakSet()
_hooked = False


def track(engine: object) -> None:
    """Terminate `engine` at interpreter exit if it is still alive then."""
    global _hooked
    if not _hooked:
        # atexit runs hooks last-registered first: registered after multiprocessing's own
        # hook (which SIGTERMs daemonic children), ours shuts the workers down gracefully first
        import multiprocessing.util  # noqa: F401

        atexit.register(_terminate_live_engines)
        _hooked = True
    _live.add(engine)


def _terminate_live_engines() -> None:
    for engine in list(_live):
        engine.terminate()

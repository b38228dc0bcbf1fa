"""The bounded queue between an ActorPool's actors (producers) and its trainer (the consumer).

When the queue is full, `on_full` decides: "block" makes the producing actor wait for room;
"drop_oldest" discards the oldest waiting trajectory to make room for the new one and counts it.
`stop()` wakes every blocked producer and consumer; a consumer still gets what is left in the
queue, then `PoolStopped` with the reason given to the first `stop` call (a default without one).
"""
from __future__ import annotations

import collections
import threading
from typing import Any

from rlbatch.errors import PoolStopped

__all__ = ["TrajectoryQueue", "ON_FULL"]

ON_FULL = ("block", "drop_oldest")


class TrajectoryQueue:
    """A bounded FIFO on one Condition, so that `stop()` can wake every waiter at once."""

    def __init__(self, maxsize: int, on_full: str):
        if not isinstance(maxsize, int) or maxsize < 1:
            raise ValueError(f"TrajectoryQueue: expected maxsize to be a positive int, got {maxsize!r}")
        if on_full not in ON_FULL:
            raise ValueError(f"TrajectoryQueue: expected on_full to be one of {ON_FULL}, got {on_full!r}")
        self._items: collections.deque = collections.deque()
        self._maxsize = maxsize
        self._drop_oldest = on_full == "drop_oldest"
        self._cond = threading.Condition(threading.Lock())
        self._stopped = False
        self._reason = "the actor pool was stopped and no trajectory is left"
        self._dropped = 0

    def put(self, item: Any, pause_while_blocked: Any = None) -> bool:
        """Appends `item`; False if the queue was stopped before there was room.

        `pause_while_blocked` (a policy caller, or None) is paused for as long as this put waits for
        room, so that the policy service does not hold batches back waiting for a request that
        cannot come.
        """
        with self._cond:
            paused = False
            while len(self._items) >= self._maxsize and not self._stopped:
                if self._drop_oldest:
                    self._items.popleft()
                    self._dropped += 1
                    break
                if not paused and pause_while_blocked is not None and hasattr(pause_while_blocked, "pause"):
                    pause_while_blocked.pause()  # takes the service's lock, never the other way round: no cycle
                    paused = True
                self._cond.wait()
            if paused:
                pause_while_blocked.resume()
            if self._stopped:
                return False
            self._items.append(item)
            self._cond.notify_all()
            return True

    def get(self, timeout: float | None = None) -> Any:
        """The oldest item; TimeoutError after `timeout` s; PoolStopped once stopped and empty."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._items or self._stopped, timeout):
                raise TimeoutError(f"no trajectory within {timeout} s")
            if not self._items:
                raise PoolStopped(self._reason)
            item = self._items.popleft()
            self._cond.notify_all()
            return item

    def stop(self, reason: str | None = None) -> None:
        """Refuses further puts and wakes every waiter; `reason` counts only on the first call."""
        with self._cond:
            if reason is not None and not self._stopped:
                self._reason = reason
            self._stopped = True
            self._cond.notify_all()

    @property
    def dropped(self) -> int:
        """Items discarded to make room (on_full="drop_oldest")."""
        return self._dropped

    def __len__(self) -> int:
        return len(self._items)

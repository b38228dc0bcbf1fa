"""RelayGate: the least a batched service makes each of n blocking threads do per round.

Each thread waits until all n wait; a gate thread then releases the round as relays, the way
BatchedService wakes its blocking callers (rlbatch.batching.relay). No data moves and nothing is
computed, so what it costs is the floor under any such service on the machine it runs on.
"""
from __future__ import annotations

import threading

from rlbatch.batching.relay import relay_width

__all__ = ["RelayGate"]


class RelayGate:
    """The least a batched service makes each of n threads do per step: wait until all n wait.

    A gate thread releases a full round as relays (each woken thread waking the next; as many
    chains as BatchedService would use for a batch of that size, unless `width` says), the way
    BatchedService wakes its blocking callers. No data moves and nothing is computed.
    """

    def __init__(self, n: int, width: int | None = None):
        self._n = n
        self._width = width
        self._cond = threading.Condition(threading.Lock())
        self._waiting: list = []
        self._closed = False
        self._thread = threading.Thread(target=self._release_rounds, name="relay-gate")
        self._thread.start()

    def wait(self) -> None:
        me = [threading.Lock(), None]
        me[0].acquire()
        with self._cond:
            if self._closed:
                return
            self._waiting.append(me)
            if len(self._waiting) >= self._n:
                self._cond.notify()
        me[0].acquire()
        if me[1] is not None:
            me[1][0].release()

    def leave(self) -> None:
        """A thread that will not wait again (it stopped or failed): rounds no longer need it."""
        with self._cond:
            self._n -= 1
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join()

    def _release_rounds(self):
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._closed or (self._waiting and len(self._waiting) >= self._n))
                batch, self._waiting = self._waiting, []
                closed = self._closed
            width = relay_width(len(batch), self._width)
            for a, b in zip(batch, batch[width:]):
                a[1] = b
            for head in batch[:width]:
                head[0].release()
            if closed:
                return


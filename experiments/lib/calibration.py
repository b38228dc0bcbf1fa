"""The machine calibration that every benchmark prints beside its numbers."""
from __future__ import annotations

import threading
import time

__all__ = ["handoff_round_trip_us"]


def handoff_round_trip_us(rounds: int = 5000) -> float:
    """Microseconds for two threads to wake each other once through a lock (a calibration).

    Thread hand-offs bound every threaded batcher. On a shared VM this figure varies several-fold
    over a day (14 to 90 us was seen on the same machine), so benchmark tables print it beside
    their numbers: compare runs only when it is similar, and compare within a run by ratios.
    """
    ping, pong = threading.Lock(), threading.Lock()
    ping.acquire()
    pong.acquire()

    def other():
        for _ in range(rounds):
            ping.acquire()
            pong.release()

    t = threading.Thread(target=other, name="handoff-calibration")
    t.start()
    t0 = time.perf_counter()
    for _ in range(rounds):
        ping.release()
        pong.acquire()
    elapsed = time.perf_counter() - t0
    t.join()
    return 1e6 * elapsed / rounds

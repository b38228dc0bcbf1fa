"""Client load: N threads each calling a service with one item in a loop, as actors do.

`run_clients` measures items/s, p50/p99 latency and CPU seconds per 1000 items of any callable
(an rlbatch service, a SeedStyleBatcher, a bare function); `run_client_floor` measures the same
load against a RelayGate (no queue, no data, no function): the ceiling of any batching service
whose callers block for their results.
"""
from __future__ import annotations

import dataclasses
import threading
import time
from typing import Any, Callable

import numpy as np

from experiments.lib.relay_gate import RelayGate

__all__ = ["ClientLoad", "run_client_floor", "run_clients"]

_clock = time.perf_counter


@dataclasses.dataclass(frozen=True)
class ClientLoad:
    """What `run_clients` measured. Latencies are per call (submit to result), in milliseconds."""

    items: int
    elapsed_s: float
    items_per_s: float
    p50_ms: float
    p99_ms: float
    cpu_s_per_1k: float  # process CPU seconds (all threads) per 1000 items


def run_clients(num_threads: int, make_call: Callable[[int], Callable], make_item: Callable[[int], Any],
                duration: float) -> ClientLoad:
    """`num_threads` threads, thread i calling `make_call(i)` with `make_item(i)` in a loop for `duration` s.

    Each thread waits for every result before its next call, as an actor does. A call with a
    `close` (a registered caller) is closed when its thread is done, so a service stops counting
    it for early flush: pass a bound method (`service.__call__`), not the service, for one object
    shared by every thread. The clock starts when every thread has its call and item ready.
    """
    if num_threads < 1:
        raise ValueError(f"run_clients: num_threads must be >= 1, got {num_threads!r}")
    barrier = threading.Barrier(num_threads + 1)
    latencies: list = [None] * num_threads
    failures: list = []
    stop_at = [0.0]

    def client(i):
        call = None
        try:
            call = make_call(i)
            item = make_item(i)
            barrier.wait()
            end = stop_at[0]
            lat = latencies[i] = []
            t = _clock()
            while t < end:
                call(item)
                t2 = _clock()
                lat.append(t2 - t)
                t = t2
        except threading.BrokenBarrierError:
            pass  # another client failed before the start: it is the one reported
        except BaseException as e:  # noqa: BLE001 - reported by the main thread, not lost
            failures.append(e)
            barrier.abort()
        finally:
            close = getattr(call, "close", None)
            if close is not None:
                close()

    threads = [threading.Thread(target=client, args=(i,), name=f"client-{i}") for i in range(num_threads)]
    for t in threads:
        t.start()
    stop_at[0] = _clock() + duration
    c0, t0 = time.process_time(), _clock()
    try:
        barrier.wait()
    except threading.BrokenBarrierError:
        pass
    for t in threads:
        t.join()
    elapsed, cpu = _clock() - t0, time.process_time() - c0
    if failures:
        raise RuntimeError(f"run_clients: a client thread failed: {failures[0]!r}") from failures[0]
    lat = np.concatenate([np.asarray(x, np.float64) for x in latencies if x is not None] or [np.zeros(0)])
    if not lat.size:
        raise RuntimeError(f"run_clients: no call finished within {duration} s")
    return ClientLoad(items=int(lat.size), elapsed_s=elapsed, items_per_s=lat.size / elapsed,
                      p50_ms=1e3 * float(np.median(lat)), p99_ms=1e3 * float(np.quantile(lat, 0.99)),
                      cpu_s_per_1k=1e3 * cpu / lat.size)


class _GateCall:
    """A client's 'call' in `run_client_floor`: wait for the round, return the item unchanged."""

    def __init__(self, gate: RelayGate):
        self._gate = gate

    def __call__(self, item):
        self._gate.wait()
        return item

    def close(self) -> None:
        self._gate.leave()


def run_client_floor(num_threads: int, duration: float) -> ClientLoad:
    """`run_clients` where each call only waits until all `num_threads` threads wait (`RelayGate`).

    The ceiling of any batching service whose callers each block for their result, on the machine
    it runs on: one thread hand-off per item and one gate wake-up per round of all threads, no
    queue, no data, no batch function. A service pays at least this and then its own work.
    """
    gate = RelayGate(num_threads)
    try:
        return run_clients(num_threads, lambda i: _GateCall(gate), lambda i: i, duration)
    finally:
        gate.close()


"""Keeping the threads that hold the GIL on one CPU.

Python threads take turns holding the GIL, so a process of actor threads and a batcher runs its
Python code on one CPU at a time whatever the machine has; what it pays for is every hand-off from
one thread to another (a request to the batcher's worker, a result back to its caller). When the
two threads sit on different CPUs, a hand-off wakes a CPU that went idle, which on a virtual machine
is an inter-processor interrupt through the hypervisor: on the 2-core machine of the README it cost
about 100 us per round trip, against 17 us for the same round trip with both threads on one CPU
(`experiments.lib.calibration.handoff_round_trip_us`). Confining the Python threads to one CPU turns every
hand-off into a plain context switch and leaves the other CPUs to the work that runs without the
GIL: XLA's own threads, the kernel, other processes.

It is an opt-in deployment choice, never made by the library on its own (Sample Factory offers the
same as `--set_workers_cpu_affinity`):

    import jax, rlbatch
    jax.devices()                  # start JAX first: its thread pools keep every CPU
    rlbatch.pin_threads({0})       # this thread and every thread it starts from now on: CPU 0

It helps when the threads mostly run Python (pure-Python environments such as CartPole, the
batcher, small policies) or wait (environments whose step sleeps in a remote call). It hurts when
environment steps release the GIL to compute (a physics engine in C): those steps could run on
several CPUs at once, and pinning puts them on one. Measure both ways (the experiment scripts pin
by default and take `--no-pin-python`).

Linux only (`os.sched_setaffinity` sets the calling thread's mask there, and new threads inherit
their creator's); elsewhere `pin_threads` raises NotImplementedError.
"""
from __future__ import annotations

import os
from typing import Iterable

__all__ = ["pin_threads", "thread_cpus"]


def thread_cpus() -> frozenset[int]:
    """The CPUs the calling thread may run on."""
    _require_support()
    return frozenset(os.sched_getaffinity(0))


def pin_threads(cpus: Iterable[int] | None = None) -> frozenset[int]:
    """Confines the calling thread, and every thread it starts afterwards, to `cpus`.

    `cpus` defaults to one CPU: the lowest the thread may use now. Threads started before the call
    keep their CPUs (start JAX before pinning so that XLA's thread pools keep all of them). Returns
    the CPUs the thread had before, so that `pin_threads(previous)` undoes it for this thread.
    Raises ValueError for an empty set or for CPUs the system refuses, naming them.
    """
    _require_support()
    allowed = frozenset(os.sched_getaffinity(0))
    if cpus is None:
        wanted = frozenset({min(allowed)})
    else:
        try:
            wanted = frozenset(int(c) for c in cpus)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"cpus must be CPU numbers (ints), got {cpus!r}") from exc
        if not wanted:
            raise ValueError("cpus must name at least one CPU, got an empty set")
    try:
        os.sched_setaffinity(0, wanted)
    except OSError as exc:
        raise ValueError(
            f"cannot pin to CPUs {sorted(wanted)} ({exc.strerror}); "
            f"this thread may use {sorted(allowed)} now"
        ) from exc
    return allowed


def _require_support() -> None:
    if not hasattr(os, "sched_setaffinity"):
        raise NotImplementedError(
            "thread CPU affinity needs os.sched_setaffinity (Linux); this platform has none"
        )

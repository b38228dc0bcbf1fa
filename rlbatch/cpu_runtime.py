"""JAX's CPU runtime set up for many small computations: a policy's batches, a small learner's steps.

On a CPU, JAX's defaults suit one large computation at a time, and cost a policy service dearly:

- asynchronous dispatch (`jax_cpu_enable_async_dispatch`): every call is handed to an XLA worker
  thread and the caller waits for it, two thread hand-offs per batch;
- the concurrency-optimised scheduler (XLA's `xla_cpu_enable_concurrency_optimized_scheduler`): the
  independent operations of one computation (a policy's actor and critic layers, its sampling) are
  spread over XLA's thread pool, one hand-off per operation.

Both are worth it for operations of milliseconds and cost more than they save for operations of
microseconds. Measured on the 2-core machine of the README (a 64x64 MLP actor-critic, HalfCheetah's
17 observations, batch 32): 109k rows/s keeping 1.42 CPUs busy with the defaults, 278k rows/s on
1.00 CPU with both off, so 13 us of CPU per row became 3.6. The Nature CNN on Breakout frames
(milliseconds per batch, its convolutions still use XLA's threads) was the same within the noise
both ways (2.4-2.8k rows/s). The whole computation then runs in the thread that called it, which
releases the GIL while it runs.

JAX reads both settings once, when it starts its backends (its first computation, or the first
`jax.devices()`), so `configure_cpu_jax` must come before that; afterwards it changes nothing and
says so. It is an opt-in choice for the process, as `rlbatch.pin_threads` is:

    import rlbatch
    print(rlbatch.configure_cpu_jax())   # first, before JAX computes anything
    ...

It touches only JAX's CPU backend: on a machine with a GPU the policy still runs there as before.
"""
from __future__ import annotations

import os

import jax

__all__ = ["configure_cpu_jax", "CONCURRENCY_FLAG"]

CONCURRENCY_FLAG = "xla_cpu_enable_concurrency_optimized_scheduler"


def _backends_started() -> bool:
    from jax._src import xla_bridge  # no public way to ask without starting them

    return xla_bridge.backends_are_initialized()


def configure_cpu_jax(*, sync_dispatch: bool = True, concurrent_ops: bool = False) -> str:
    """Sets up JAX's CPU backend for small computations before JAX starts (see the module
    docstring); returns a line saying what was done, for a script's report.

    Args:
      sync_dispatch: run each computation in the calling thread (`jax_cpu_enable_async_dispatch`
        off); False leaves JAX's setting as it is.
      concurrent_ops: keep XLA's concurrency-optimised scheduler, which runs the independent
        operations of one computation on several threads; False (the default) turns it off, unless
        XLA_FLAGS already names it (the user's own choice wins).

    Called after JAX has started its backends, it changes nothing (they have read their settings)
    and its line says so.
    """
    if _backends_started():
        return ("JAX CPU runtime left as it was: JAX had already started "
                "(call rlbatch.configure_cpu_jax before JAX computes anything)")
    done = []
    if sync_dispatch:
        jax.config.update("jax_cpu_enable_async_dispatch", False)
        done.append("synchronous dispatch")
    flags = os.environ.get("XLA_FLAGS", "")
    if not concurrent_ops and CONCURRENCY_FLAG not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --{CONCURRENCY_FLAG}=false".strip()
        done.append("one thread per computation")
    return "JAX CPU runtime: " + (", ".join(done) if done else "JAX's defaults")

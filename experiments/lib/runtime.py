"""Process-wide runtime settings that the experiment scripts choose at start, never the library.

All change the whole process (JAX's compilation cache, the CPUs of this thread and of every thread
it starts afterwards), so a script makes them once, before it builds any service or pool, and prints
what it did in its report. The scripts set JAX's CPU runtime up with `rlbatch.configure_cpu_jax`.
"""
from __future__ import annotations

import os

__all__ = ["DEFAULT_COMPILATION_CACHE", "cores", "enable_compilation_cache", "env_threads_per_actor",
           "pin_python_threads"]

# XDG's cache directory, as pip and JAX's own tools use it; RLBATCH_JAX_CACHE overrides it.
DEFAULT_COMPILATION_CACHE = os.environ.get(
    "RLBATCH_JAX_CACHE", os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "rlbatch", "jax"))


def cores() -> int:
    """The CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def env_threads_per_actor(num_actors: int) -> int:
    """Worker threads for each actor's EnvPool or AtariVectorEnv: the cores shared between the
    actors, at least one each. Both default to min(num_envs, cores) threads per environment, so t
    actors would start t x cores threads that all spin for the same cores: measured on the 2-core
    VM, HalfCheetah, 2 actor threads x EnvPool(16) with inline policies, 16.7k env steps/s with two
    threads each and 22.8k with one (medians of 3 alternating runs)."""
    return max(1, cores() // max(1, num_actors))


def compilation_cache_options(path: str | None) -> dict:
    """The jax.config settings of a persistent compilation cache in `path` ({} for None or ""):
    this process's (enable_compilation_cache) and a fleet's processes' (ActorFleet jax_options)."""
    if not path:
        return {}
    return {"jax_compilation_cache_dir": path, "jax_persistent_cache_min_compile_time_secs": 0.0,
            "jax_persistent_cache_min_entry_size_bytes": 0}


def enable_compilation_cache(path: str | None = DEFAULT_COMPILATION_CACHE) -> str:
    """Turns on JAX's persistent compilation cache in `path` (None or "": leaves it off); returns a
    line saying what was done, for the script's report.

    A script compiles the same programs every run (one per policy bucket, the learner's update): from
    the cache each loads in a fraction of its compile time (a 20-layer MLP's gradient, measured on
    the 2-core machine: 1.07 s compiled, 0.25-0.32 s from the cache, tracing included). Every program
    is cached, however fast it compiled: the scripts' programs are few and small.
    """
    if not path:
        return "JAX compilation cache off"
    import jax

    for name, value in compilation_cache_options(path).items():
        jax.config.update(name, value)
    return f"JAX compilation cache: {path}"


def pin_python_threads(pin: bool) -> str:
    """Starts JAX, then (when `pin`) confines this thread and the threads it starts afterwards to
    one CPU (`rlbatch.pin_threads`); returns a line saying what was done, for the script's report.

    JAX starts first so that XLA's thread pools keep every CPU. Where the platform has no thread
    affinity (Linux has it), the threads stay unpinned and the line says so: the scripts pin by
    default and must still run there.
    """
    import jax

    from rlbatch.affinity import pin_threads, thread_cpus

    jax.devices()
    if not hasattr(os, "sched_setaffinity"):
        return "Python threads not pinned: this platform has no thread CPU affinity (os.sched_setaffinity)"
    if not pin:
        return f"Python threads on CPUs {sorted(thread_cpus())} (not pinned)"
    before = pin_threads()
    return (f"Python threads pinned to CPU {sorted(thread_cpus())} of {sorted(before)} "
            f"(rlbatch.pin_threads; --no-pin-python to compare)")

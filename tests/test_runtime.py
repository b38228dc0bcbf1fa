"""The process-wide settings the scripts choose at start: thread pinning and JAX's CPU dispatch."""

import jax

from experiments.lib import runtime
from tests.conftest import in_thread
from rlbatch.affinity import thread_cpus


def test_pin_python_threads_pins_only_when_asked():
    line, cpus = in_thread(lambda: (runtime.pin_python_threads(False), thread_cpus()))
    assert "not pinned" in line and cpus == thread_cpus()
    line, cpus = in_thread(lambda: (runtime.pin_python_threads(True), thread_cpus()))
    assert "pinned to CPU" in line and cpus == {min(thread_cpus())}


def test_prefer_sync_cpu_dispatch_turns_async_dispatch_off_on_a_cpu():
    before = jax.config.read("jax_cpu_enable_async_dispatch")
    try:
        changed = runtime.prefer_sync_cpu_dispatch()
        assert changed == (jax.default_backend() == "cpu")
        if changed:
            assert jax.config.read("jax_cpu_enable_async_dispatch") is False
    finally:
        jax.config.update("jax_cpu_enable_async_dispatch", before)

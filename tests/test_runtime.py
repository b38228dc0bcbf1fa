"""The process-wide settings the scripts choose at start: thread pinning and JAX's persistent
compilation cache."""

import pathlib
import subprocess
import sys


from experiments.lib import runtime
from tests.conftest import in_thread
from rlbatch.affinity import thread_cpus


def test_pin_python_threads_pins_only_when_asked():
    line, cpus = in_thread(lambda: (runtime.pin_python_threads(False), thread_cpus()))
    assert "not pinned" in line and cpus == thread_cpus()
    line, cpus = in_thread(lambda: (runtime.pin_python_threads(True), thread_cpus()))
    assert "pinned to CPU" in line and cpus == {min(thread_cpus())}


_ROOT = str(pathlib.Path(__file__).parents[1])
_COMPILE = """
import sys, jax, jax.numpy as jnp
from experiments.lib import runtime
print(runtime.enable_compilation_cache(sys.argv[1]))
jax.jit(lambda x: jnp.tanh(x @ x).sum()).lower(jnp.ones((8, 8))).compile()
"""


def test_enable_compilation_cache_stores_programs_and_off_stores_none(tmp_path):
    cache = tmp_path / "cache"
    out = subprocess.run([sys.executable, "-c", _COMPILE, str(cache)], capture_output=True, text=True,
                         check=True, cwd=_ROOT)
    assert str(cache) in out.stdout
    assert any(cache.iterdir()), "a compiled program was not written to the cache"
    off = subprocess.run([sys.executable, "-c", _COMPILE, ""], capture_output=True, text=True, check=True,
                         cwd=_ROOT)
    assert "off" in off.stdout

"""rlbatch.configure_cpu_jax: JAX's CPU backend set up for small computations, before JAX starts.

JAX reads these settings once, when it starts its backends, and this test process started them long
ago: the effects are checked in fresh interpreters."""

import os
import pathlib
import subprocess
import sys

import jax

import rlbatch
from rlbatch.cpu_runtime import CONCURRENCY_FLAG

_ROOT = str(pathlib.Path(__file__).parents[1])

# A computation of about a hundred milliseconds on a CPU: still running when an asynchronous call
# returns, finished when a synchronous one does.
_PROBE = """
import os, sys
import rlbatch
kwargs = eval(sys.argv[1])
print(rlbatch.configure_cpu_jax(**kwargs))
import jax, jax.numpy as jnp
f = jax.jit(lambda a: (a @ a @ a @ a).sum())
x = jnp.ones((1200, 1200))
f(x).block_until_ready()
print("ready at return:", all(f(x).is_ready() for _ in range(3)))
print("XLA_FLAGS:", os.environ.get("XLA_FLAGS", ""))
print("async dispatch:", jax.config.read("jax_cpu_enable_async_dispatch"))
"""


def _probe(kwargs: str = "{}", xla_flags: str | None = None) -> str:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    if xla_flags is not None:
        env["XLA_FLAGS"] = xla_flags
    return subprocess.run([sys.executable, "-c", _PROBE, kwargs], capture_output=True, text=True, check=True,
                          cwd=_ROOT, env=env).stdout


def test_before_jax_starts_computations_finish_inside_the_call_on_one_thread():
    out = _probe()
    assert "JAX CPU runtime: synchronous dispatch, one thread per computation" in out
    assert "ready at return: True" in out
    assert f"--{CONCURRENCY_FLAG}=false" in out
    assert "async dispatch: False" in out


def test_jax_defaults_stay_where_asked_and_a_users_own_flag_wins():
    out = _probe("dict(sync_dispatch=False)", xla_flags=f"--{CONCURRENCY_FLAG}=true")
    assert "JAX CPU runtime: JAX's defaults" in out
    assert "ready at return: False" in out  # JAX's asynchronous dispatch, as without the call
    assert f"XLA_FLAGS: --{CONCURRENCY_FLAG}=true\n" in out
    out = _probe("dict(concurrent_ops=True)")
    assert "JAX CPU runtime: synchronous dispatch\n" in out
    assert "XLA_FLAGS: \n" in out


def test_after_jax_started_it_changes_nothing_and_says_so():
    jax.devices()  # started, as in any test process
    before = (jax.config.read("jax_cpu_enable_async_dispatch"), os.environ.get("XLA_FLAGS"))
    line = rlbatch.configure_cpu_jax()
    assert "left as it was" in line and "before JAX computes anything" in line
    assert (jax.config.read("jax_cpu_enable_async_dispatch"), os.environ.get("XLA_FLAGS")) == before

"""rlbatch.cli's process-wide JAX settings for experiment scripts."""
import json
import os
import subprocess
import sys
import textwrap

from rlbatch import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_sequential_cpu_schedule_is_set_only_before_jax_starts_and_never_overrides_the_user():
    # A fresh interpreter: whether JAX's backend has started is process state.
    script = textwrap.dedent("""
        import json, os
        os.environ.pop("XLA_FLAGS", None)
        from rlbatch import cli
        out = {}
        out["disabled"] = (cli.prefer_sequential_cpu_schedule(False), os.environ.get("XLA_FLAGS"))
        out["enabled"] = (cli.prefer_sequential_cpu_schedule(), os.environ.get("XLA_FLAGS"))
        os.environ["XLA_FLAGS"] = "--xla_cpu_enable_concurrency_optimized_scheduler=true"
        out["user_set"] = (cli.prefer_sequential_cpu_schedule(), os.environ.get("XLA_FLAGS"))
        os.environ["XLA_FLAGS"] = "--xla_cpu_enable_fast_math=false"
        import jax, jax.numpy as jnp
        out["result"] = float(jax.jit(lambda x: (x * 2).sum())(jnp.arange(3.0)))  # JAX starts here
        out["too_late"] = (cli.prefer_sequential_cpu_schedule(), os.environ.get("XLA_FLAGS"))
        print(json.dumps(out))
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["disabled"] == ["XLA CPU schedule: XLA's default (concurrency-optimized)", None]
    line, flags = out["enabled"]
    assert "sequential" in line and flags == cli.SEQUENTIAL_CPU_SCHEDULE
    line, flags = out["user_set"]
    assert "as XLA_FLAGS sets it" in line and flags == "--xla_cpu_enable_concurrency_optimized_scheduler=true"
    assert out["result"] == 6.0
    line, flags = out["too_late"]
    assert "already started" in line and flags == "--xla_cpu_enable_fast_math=false"

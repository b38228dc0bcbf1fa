"""Plumbing shared by the experiment scripts, never installed with the library.

- seed_style, client_load, relay_gate, env_loops, policy_step, calibration: the comparison
  baselines the benchmarks measure rlbatch against, and the loops that measure them;
- tuning: settings suggested from a measured sweep;
- runtime: the process-wide settings a script chooses at start (JAX's CPU dispatch, thread pinning).
"""

"""Gymnasium environments for exercising rlbatch; importing this package registers them.

Registered ids (`gymnasium.make(id, **overrides)`; defaults shown):

- `rlbatch/Catch-v0`: `CatchEnv(rows=10, columns=5, flatten=True)`. Flattened by default so an MLP
  can take the [50] observation directly; episodes last exactly rows - 1 = 9 steps, so no time limit.
- `rlbatch/Latency-v0`: `LatencyWrapper(gymnasium.make(env_id), step_latency, reset_latency)` with
  `env_id="CartPole-v1"`, `step_latency=0.001`, `reset_latency=0.0` (seconds, slept each call).

This package is plain gymnasium code: it does not import rlbatch.
"""
from __future__ import annotations

import gymnasium

from envs.catch import CatchEnv
from envs.latency import LatencyWrapper

__all__ = [
    "CatchEnv",
    "LatencyWrapper",
    "ENV_IDS",
]

_REGISTRATIONS: dict[str, dict] = {
    "rlbatch/Catch-v0": dict(entry_point="envs.catch:CatchEnv", kwargs={"flatten": True}),
    "rlbatch/Latency-v0": dict(
        entry_point="envs.latency:make_latency_env",
        kwargs={"env_id": "CartPole-v1", "step_latency": 0.001, "reset_latency": 0.0},
    ),
}

ENV_IDS: tuple[str, ...] = tuple(_REGISTRATIONS)

# The guard keeps a re-import (importlib.reload, or the package imported under two names) from
# re-registering, which gymnasium would warn about.
for _env_id, _registration in _REGISTRATIONS.items():
    if _env_id not in gymnasium.registry:
        gymnasium.register(_env_id, **_registration)

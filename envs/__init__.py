"""Gymnasium environments for exercising rlbatch; importing this package registers them.

Registered ids (`gymnasium.make(id, **overrides)`; defaults shown):

- `rlbatch/Catch-v0`: `CatchEnv(rows=10, columns=5, flatten=True)`. Flattened by default so an MLP
  can take the [50] observation directly; episodes last exactly rows - 1 = 9 steps, so no time limit.
- `rlbatch/Latency-v0`: `LatencyWrapper(gymnasium.make(env_id), step_latency, reset_latency)` with
  `env_id="CartPole-v1"`, `step_latency=0.001`, `reset_latency=0.0` (seconds, slept each call).
- `rlbatch/Atari-v0`: `make_atari_env(env_id="ALE/Breakout-v5", episodic_life=False, clip_rewards=False)`,
  an ALE game with the standard preprocessing, uint8 [4, 84, 84] (see envs.atari; needs the `atari`
  extra when made, not when registered). `make_envpool_atari` is EnvPool's counterpart (`envpool` extra).

This package is plain gymnasium code: it does not import rlbatch.
"""
from __future__ import annotations

import gymnasium

from envs.atari import make_atari_env, make_envpool_atari
from envs.catch import CatchEnv
from envs.latency import LatencyWrapper

__all__ = [
    "CatchEnv",
    "LatencyWrapper",
    "make_atari_env",
    "make_envpool_atari",
    "ENV_IDS",
]

_REGISTRATIONS: dict[str, dict] = {
    "rlbatch/Catch-v0": dict(entry_point="envs.catch:CatchEnv", kwargs={"flatten": True}),
    "rlbatch/Latency-v0": dict(
        entry_point="envs.latency:make_latency_env",
        kwargs={"env_id": "CartPole-v1", "step_latency": 0.001, "reset_latency": 0.0},
    ),
    # make_atari_env imports ale_py when called, so registering needs no extra.
    "rlbatch/Atari-v0": dict(
        entry_point="envs.atari:make_atari_env",
        kwargs={"env_id": "ALE/Breakout-v5", "episodic_life": False, "clip_rewards": False},
    ),
}

ENV_IDS: tuple[str, ...] = tuple(_REGISTRATIONS)

# The guard keeps a re-import (importlib.reload, or the package imported under two names) from
# re-registering, which gymnasium would warn about.
for _env_id, _registration in _REGISTRATIONS.items():
    if _env_id not in gymnasium.registry:
        gymnasium.register(_env_id, **_registration)

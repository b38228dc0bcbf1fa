"""An environment that takes wall-clock time per step, like a remote game session or a C simulator.

`LatencyWrapper` sleeps before delegating each call. `time.sleep` releases the GIL, so while one
actor thread waits in `step` the others (and the inference service) run: this is the regime where
batching the policy across actor threads pays off, and it can be reproduced on any machine.
"""
from __future__ import annotations

import math
import time
from typing import Any

import gymnasium
from gymnasium.utils import RecordConstructorArgs

__all__ = ["LatencyWrapper", "make_latency_env"]

_BAD_LATENCY = "LatencyWrapper: expected {name} to be a finite number of seconds >= 0, got {got!r}"


def _check_latency(name: str, value: float) -> float:
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise ValueError(_BAD_LATENCY.format(name=name, got=value)) from None
    # `not seconds >= 0` also rejects NaN.
    if not seconds >= 0 or not math.isfinite(seconds):
        raise ValueError(_BAD_LATENCY.format(name=name, got=value))
    return seconds


class LatencyWrapper(gymnasium.Wrapper, RecordConstructorArgs):
    """Sleeps `step_latency` seconds in every `step` and `reset_latency` in every `reset`, then delegates.

    A latency of 0 skips the sleep call entirely. Observations, rewards and spaces are the wrapped
    env's, unchanged.
    """

    def __init__(self, env: gymnasium.Env, step_latency: float = 0.001, reset_latency: float = 0.0):
        RecordConstructorArgs.__init__(self, step_latency=step_latency, reset_latency=reset_latency)
        gymnasium.Wrapper.__init__(self, env)
        self.step_latency = _check_latency("step_latency", step_latency)
        self.reset_latency = _check_latency("reset_latency", reset_latency)

    def step(self, action: Any):
        if self.step_latency:
            time.sleep(self.step_latency)
        return self.env.step(action)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        if self.reset_latency:
            time.sleep(self.reset_latency)
        return self.env.reset(seed=seed, options=options)


def make_latency_env(
    env_id: str = "CartPole-v1",
    step_latency: float = 0.001,
    reset_latency: float = 0.0,
    **make_kwargs: Any,
) -> LatencyWrapper:
    """Entry point of `rlbatch/Latency-v0`: `gymnasium.make(env_id, **make_kwargs)` behind a `LatencyWrapper`.

    `make_kwargs` (e.g. `render_mode`) go to the inner env.
    """
    return LatencyWrapper(gymnasium.make(env_id, **make_kwargs), step_latency=step_latency, reset_latency=reset_latency)

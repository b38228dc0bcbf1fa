"""An environment wrapper whose observations go bad now and then, as an unstable simulator's do.

`CorruptObservations` returns, from `step`, an observation full of NaN or one of the wrong shape
(one extra element) with given probabilities, only in mid-episode: a step that ends the episode and
every `reset` return the wrapped environment's own observation. So each corrupted observation is
one the actor will send to its policy, and a newly built environment's first observation is sound.
"""
from __future__ import annotations

from typing import Any

import gymnasium
import numpy as np

__all__ = ["CorruptObservations"]


class CorruptObservations(gymnasium.Wrapper):
    """Corrupts mid-episode `step` observations at random, reproducibly for a given `seed`.

    Step call n (n = 1, 2, ... over the wrapper's life) draws one `u` from a generator seeded with
    `seed` (one draw per call, whatever happens): if the step does not end the episode, `u < p_nan`
    gives an observation of NaNs and `p_nan <= u < p_nan + p_wrong_shape` one with an extra element.
    `corrupted` lists them in order as `(kind, n)` with kind "nan" or "wrong_shape".
    """

    def __init__(self, env: gymnasium.Env, p_nan: float = 0.0, p_wrong_shape: float = 0.0, seed: int | None = None):
        super().__init__(env)
        for name, p in (("p_nan", p_nan), ("p_wrong_shape", p_wrong_shape)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"CorruptObservations: expected {name} to be a probability in [0, 1], got {p!r}")
        if p_nan + p_wrong_shape > 1.0:
            raise ValueError(f"CorruptObservations: expected p_nan + p_wrong_shape <= 1, got {p_nan + p_wrong_shape}")
        self.p_nan, self.p_wrong_shape = float(p_nan), float(p_wrong_shape)
        self._rng = np.random.default_rng(seed)
        self.step_calls = 0
        self.corrupted: list[tuple[str, int]] = []

    def step(self, action: Any):
        obs, reward, terminated, truncated, info = self.env.step(action)
        self.step_calls += 1
        u = self._rng.random()
        if not (terminated or truncated):
            if u < self.p_nan:
                self.corrupted.append(("nan", self.step_calls))
                obs = np.full_like(obs, np.nan)
            elif u < self.p_nan + self.p_wrong_shape:
                self.corrupted.append(("wrong_shape", self.step_calls))
                obs = np.append(obs, np.zeros(1, obs.dtype))
        return obs, reward, terminated, truncated, info

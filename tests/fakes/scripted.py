"""A fully deterministic environment whose every output says where in its script it came from.

Made for testing trajectory recording: from any recorded observation, reward or flag a test can
compute what the actor must have seen, with the formulas below.
"""
from __future__ import annotations

import operator
from typing import Any, Sequence

import gymnasium
import numpy as np
from gymnasium import spaces

__all__ = ["ScriptedEnv"]


class ScriptedEnv(gymnasium.Env):
    """Episodes of scripted lengths that end by termination or truncation as scripted.

    Notation: `i` is the episode index, `n = len(episode_lengths)`, `L_i = episode_lengths[i % n]`,
    `t` the step index within the episode (0 after reset, t after the t-th step).

    - Episode index: the first `reset()` starts episode 0 and each later `reset()` starts the next
      one (i + 1), across the env's whole life. `reset(seed=...)` restarts the script: it starts
      episode 0 again (this keeps seeded resets deterministic, as gymnasium requires).
    - Observation at step t of episode i: float32 vector of length `obs_dim`,
      `obs[0] = i`, `obs[1] = t`, `obs[2:] = 0`. So reset returns `[i, 0, 0, ...]` and the k-th
      step returns `[i, k, 0, ...]`.
    - Reward of the step taken at observation t (the (t+1)-th step, t = 0 .. L_i - 1):
      `float(10 * i + t + 1)`.
    - Flags: the L_i-th step (the one returning t = L_i) ends the episode: `truncated =
      truncate[i % n]`, `terminated = not truncate[i % n]`; every earlier step returns both False.
    - Actions (Discrete(2)) do not change the dynamics.
    - info: reset returns `{"episode": i, "step": 0}`; step returns
      `{"episode": i, "step": t, "action": a}` with the new t and the action taken as an int.

    Stepping before the first reset or after the episode ended raises `RuntimeError`; an action
    outside {0, 1} raises `ValueError`.
    """

    metadata = {"render_modes": []}

    def __init__(
        self,
        episode_lengths: Sequence[int] = (3, 5, 2),
        truncate: Sequence[bool] = (False, True, False),
        obs_dim: int = 2,
    ):
        lengths = tuple(episode_lengths)
        flags = tuple(truncate)
        if not lengths:
            raise ValueError("ScriptedEnv: expected at least one episode length, got none")
        for length in lengths:
            if isinstance(length, bool) or not isinstance(length, (int, np.integer)) or length < 1:
                raise ValueError(f"ScriptedEnv: expected episode lengths to be ints >= 1, got {lengths!r}")
        if len(flags) != len(lengths):
            raise ValueError(
                f"ScriptedEnv: expected one truncate flag per episode length ({len(lengths)}), got {len(flags)}"
            )
        if isinstance(obs_dim, bool) or not isinstance(obs_dim, (int, np.integer)) or obs_dim < 2:
            raise ValueError(f"ScriptedEnv: expected obs_dim to be an int >= 2, got {obs_dim!r}")
        self.episode_lengths = tuple(int(length) for length in lengths)
        self.truncate = tuple(bool(flag) for flag in flags)
        self.obs_dim = int(obs_dim)
        # Observations hold non-negative counters; the finite bound keeps check_env from warning.
        self.observation_space = spaces.Box(
            0.0, float(np.finfo(np.float32).max), shape=(self.obs_dim,), dtype=np.float32
        )
        self.action_space = spaces.Discrete(2)
        self._next_episode = 0
        self._episode = -1
        self._step = 0
        self._done = True  # no episode until the first reset

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        if seed is not None:
            self._next_episode = 0
        self._episode = self._next_episode
        self._next_episode += 1
        self._step = 0
        self._done = False
        return self._observation(), {"episode": self._episode, "step": 0}

    def step(self, action: Any):
        if self._done:
            raise RuntimeError("ScriptedEnv.step: expected a running episode, got none; call reset() first")
        try:
            taken = operator.index(action)
        except TypeError:
            taken = -1
        if taken not in (0, 1):
            raise ValueError(f"ScriptedEnv.step: expected an integer action in {{0, 1}}, got {action!r}")
        i = self._episode
        reward = float(10 * i + self._step + 1)
        self._step += 1
        ended = self._step == self.episode_lengths[i % len(self.episode_lengths)]
        truncated = ended and self.truncate[i % len(self.truncate)]
        terminated = ended and not truncated
        self._done = ended
        info = {"episode": i, "step": self._step, "action": taken}
        return self._observation(), reward, terminated, truncated, info

    def _observation(self) -> np.ndarray:
        obs = np.zeros(self.obs_dim, dtype=np.float32)
        obs[0] = self._episode
        obs[1] = self._step
        return obs

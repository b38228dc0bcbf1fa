"""ScriptedAsyncPool: EnvPool's asynchronous send/recv interface over n ScriptedEnvs.

Environment id j follows `ScriptedEnv(*scripts[j % len(scripts)])`, reset with seed `seed + j` (so
its script restarts at episode 0 in every new pool). EnvPool's autoreset, as found with the real
one (see rlbatch.actors.async_slot): the step that ends an episode returns its last observation;
the next `send` for that id resets it (its action ignored), and the following recv of that id gives
the new episode's first observation with reward 0 and both flags False.

`recv` returns b results drawn among those waiting by a generator seeded with `seed`, in the
order drawn, environment j with weight 1 / (j + 1) (a low id runs faster): the ids of a recv are
unsorted, and one environment may come back twice before another once. A recv with fewer than b results waiting raises RuntimeError: the
real EnvPool would block forever. `send` for an id that is not the actor's to send (still in
flight) raises RuntimeError too.

`episodes` logs (return, length) of every episode whose ending step a recv returned, with
the environment's own rewards. Faults: `fail_at={"recv": r, "send": s}` raises InjectedFault on
the r-th recv (or s-th send) of the shared `calls` counter, `nan_at_recv` puts NaN in the
observations of that recv (counted the same way).
"""
from __future__ import annotations

import collections
from typing import Sequence

import gymnasium
import numpy as np

from tests.fakes.faults import InjectedFault
from tests.fakes.scripted import ScriptedEnv

__all__ = ["ScriptedAsyncPool"]


class ScriptedAsyncPool:
    def __init__(self, num_envs: int, batch_size: int, seed: int, scripts: Sequence[tuple], *,
                 calls: collections.Counter | None = None, fail_at: dict | None = None, nan_at_recv: int = 0,
                 episodes: list | None = None):
        self.num_envs, self.batch_size = num_envs, batch_size
        self.config = {"num_envs": num_envs, "batch_size": batch_size, "seed": seed}
        self.single_observation_space = gymnasium.spaces.Box(-np.inf, np.inf, (2,), np.float32)
        self.single_action_space = gymnasium.spaces.Discrete(2)
        self.envs = [ScriptedEnv(*scripts[j % len(scripts)]) for j in range(num_envs)]
        self.seed = seed
        self.calls = calls if calls is not None else collections.Counter()
        self.fail_at = fail_at or {}
        self.nan_at_recv = nan_at_recv
        self.episodes = episodes if episodes is not None else []
        self.closed = False
        self._rng = np.random.default_rng(seed)
        self._waiting: list[tuple] = []  # (id, obs, reward, terminated, truncated, a step, not a reset)
        self._needs_reset = [False] * num_envs
        self._with_actor = [False] * num_envs  # returned by recv, not yet sent an action
        self._return = [0.0] * num_envs
        self._length = [0] * num_envs

    def async_reset(self) -> None:
        for j, env in enumerate(self.envs):
            obs, _ = env.reset(seed=self.seed + j)
            self._waiting.append((j, obs, 0.0, False, False, False))

    def send(self, actions, env_id) -> None:
        self.calls["send"] += 1
        if self.calls["send"] == self.fail_at.get("send"):
            raise InjectedFault(f"send #{self.calls['send']}")
        actions, env_id = np.asarray(actions), np.asarray(env_id)
        if actions.shape[:1] != env_id.shape:
            raise ValueError(f"send: expected one action per env id, got {actions.shape} for {env_id.tolist()}")
        for a, j in zip(actions.tolist(), env_id.tolist()):
            if not self._with_actor[j]:
                raise RuntimeError(f"send: environment {j} is still in flight")
            self._with_actor[j] = False
            if self._needs_reset[j]:
                obs, _ = self.envs[j].reset()
                self._needs_reset[j] = False
                self._waiting.append((j, obs, 0.0, False, False, False))
                continue
            obs, reward, terminated, truncated, _ = self.envs[j].step(a)
            self._needs_reset[j] = terminated or truncated
            self._waiting.append((j, obs, float(reward), terminated, truncated, True))

    def recv(self):
        self.calls["recv"] += 1
        if self.calls["recv"] == self.fail_at.get("recv"):
            raise InjectedFault(f"recv #{self.calls['recv']}")
        b = self.batch_size
        if len(self._waiting) < b:
            raise RuntimeError(f"recv: expected at least {b} environments in flight, got {len(self._waiting)}: "
                               f"the real EnvPool would block forever")
        weights = np.array([1.0 / (w[0] + 1) for w in self._waiting])
        picks = self._rng.choice(len(self._waiting), b, replace=False, p=weights / weights.sum())
        rows = [self._waiting[p] for p in picks]
        for p in sorted(picks, reverse=True):
            del self._waiting[p]
        ids = np.array([r[0] for r in rows], np.int32)
        obs = np.stack([r[1] for r in rows])
        elapsed_step = obs[:, 1].astype(np.int32)
        if self.calls["recv"] == self.nan_at_recv:
            obs[:] = np.nan
        reward = np.array([r[2] for r in rows], np.float32)
        terminated = np.array([r[3] for r in rows])
        truncated = np.array([r[4] for r in rows])
        for j, _, r, term, trunc, stepped in rows:
            self._with_actor[j] = True
            if stepped:
                self._return[j] += r
                self._length[j] += 1
            if term or trunc:
                self.episodes.append((self._return[j], self._length[j]))
                self._return[j], self._length[j] = 0.0, 0
        return obs, reward, terminated, truncated, {"env_id": ids, "elapsed_step": elapsed_step}

    def close(self) -> None:
        self.closed = True

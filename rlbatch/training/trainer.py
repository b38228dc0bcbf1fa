"""Trainer: consumes trajectories from an ActorPool, updates a Learner, publishes parameters.

    state = learner.init(key, example_obs, action_space)
    policy = PolicyService(learner.policy.apply, learner.params(state), example_obs=example_obs)
    pool = ActorPool(env_id, policy, num_actors=256, unroll_length=32)
    report = Trainer(learner, pool, policy, state=state, batch_size=16).run(total_steps=10**6)

Each iteration takes `batch_size` trajectories from the pool's queue, stacks them time-major
[T, B, ...], runs the learner's jitted update and publishes the new parameters to the policy
service (every `publish_every` updates) while the actors keep playing.

Policy lag of a sample = learner updates done when it is trained on - learner updates behind the
parameters that chose its action. With `max_policy_lag`, a trajectory holding any step staler than
that is dropped whole (a trajectory is the unit a learner consumes: dropping single steps would cut
it), and its steps are counted in `stale_steps_dropped`.

`run` always stops the pool and closes the service on the way out: on its budget, on its condition,
on Ctrl-C and on an exception.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

import jax
import numpy as np

from rlbatch.actors.pool import ActorPool, PoolStopped
from rlbatch.training.checkpoint import load_checkpoint, save_checkpoint
from rlbatch.training.learner import Learner
from rlbatch.actors.trajectory import stack_trajectories

__all__ = ["Trainer", "TrainReport", "Progress"]

_clock = time.perf_counter


@dataclasses.dataclass(frozen=True)
class Progress:
    """What a stopping condition sees after each update."""

    env_steps: int
    episodes: int
    recent_return_mean: float
    updates: int
    elapsed: float
    metrics: dict


@dataclasses.dataclass(frozen=True)
class TrainReport:
    env_steps: int
    elapsed: float
    steps_per_sec: float
    updates: int
    episodes: int
    recent_return_mean: float
    stop_reason: str  # "budget", "condition", "time", "interrupted", "error", "pool stopped"
    solved_at_steps: int | None  # env steps when `until` first held (None if it never did)
    solved_at_seconds: float | None
    samples_trained: int
    stale_steps_dropped: int
    policy_lag_min: float
    policy_lag_mean: float
    policy_lag_max: float
    time_waiting_for_trajectories: float
    time_learner_update: float
    time_publish: float
    last_metrics: dict
    error: str | None = None

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


class Trainer:
    """Closes the loop between an ActorPool, a Learner and a PolicyService.

    Args:
      learner: the Learner (init/update/params/policy).
      actor_pool: the ActorPool whose trajectories are consumed (started by `run` if needed).
      policy_service: the PolicyService the actors play with; receives the new parameters.
      state: the learner state to start from (learner.init(...) or a restored checkpoint).
      batch_size: B, trajectories per update.
      max_policy_lag: drop trajectories with steps staler than this many updates (None: keep all).
      publish_every: publish parameters every n updates.
      checkpoint_path: where `run` saves the learner state every `checkpoint_every` updates and at
        the end (None: no checkpoints).
    """

    def __init__(self, learner: Learner, actor_pool: ActorPool, policy_service, *, state: Any, batch_size: int,
                 max_policy_lag: int | None = None, publish_every: int = 1, checkpoint_path: str | None = None,
                 checkpoint_every: int | None = None):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"Trainer: batch_size must be a positive int, got {batch_size!r}")
        if not isinstance(publish_every, int) or publish_every < 1:
            raise ValueError(f"Trainer: publish_every must be a positive int, got {publish_every!r}")
        if max_policy_lag is not None and max_policy_lag < 0:
            raise ValueError(f"Trainer: max_policy_lag must be >= 0 or None, got {max_policy_lag!r}")
        self.learner = learner
        self.pool = actor_pool
        self.policy = policy_service
        self.state = state
        self.batch_size = batch_size
        self.max_policy_lag = max_policy_lag
        self.publish_every = publish_every
        self.checkpoint_path = checkpoint_path
        self.checkpoint_every = checkpoint_every
        self.updates = 0
        # service version -> learner updates behind it; version 0 is the starting parameters.
        self._updates_at_version = {policy_service.version: 0}
        self._lag_sum = 0.0
        self._lag_count = 0
        self._lag_min = float("inf")
        self._lag_max = float("-inf")
        self.stale_steps_dropped = 0
        self.samples_trained = 0
        self.history: list[dict] = []  # one entry per update: env steps, time, metrics

    # ------------------------------------------------------------------ checkpoints

    def save(self, path: str | None = None) -> str:
        path = path or self.checkpoint_path
        if path is None:
            raise ValueError("Trainer.save: no path given and no checkpoint_path set")
        return save_checkpoint(path, self.state, {"updates": self.updates,
                                                 "env_steps": self.pool.stats.env_steps})

    def restore(self, path: str) -> dict:
        """Loads the learner state from `path` and publishes its parameters to the service."""
        self.state, metadata = load_checkpoint(path, self.state)
        self.updates = int(metadata.get("updates", 0))
        version = self.policy.update_params(self.learner.params(self.state))
        self._updates_at_version[version] = self.updates
        return metadata

    # ------------------------------------------------------------------ the loop

    def _take_batch(self):
        trajectories = []
        while len(trajectories) < self.batch_size:
            traj = self.pool.get()
            versions, steps = np.unique(traj.policy_version, return_counts=True)
            lag = np.array([self.updates - self._updates_at_version[int(v)] for v in versions])
            if self.max_policy_lag is not None and lag.max() > self.max_policy_lag:
                self.stale_steps_dropped += traj.reward.size
                continue
            self._lag_sum += float((lag * steps).sum())
            self._lag_count += int(steps.sum())
            self._lag_min = min(self._lag_min, float(lag.min()))
            self._lag_max = max(self._lag_max, float(lag.max()))
            trajectories.append(traj)
        return stack_trajectories(trajectories)

    def run(self, total_steps: int | None = None, until: Callable[[Progress], bool] | None = None,
            progress: bool = True, max_seconds: float | None = None, close: bool = True,
            on_update: Callable[[Progress], None] | None = None) -> TrainReport:
        """Trains until `total_steps` env steps, `until(progress)` holds, or `max_seconds` pass."""
        from tqdm.auto import tqdm

        if not self.pool.started:
            self.pool.start()
        t_start = _clock()
        wait_t = update_t = publish_t = 0.0
        metrics: dict = {}
        stop_reason, error = "budget", None
        solved_steps = solved_seconds = None
        bar = tqdm(total=total_steps, unit="step", unit_scale=True, disable=not progress, dynamic_ncols=True)
        shown = 0
        try:
            while True:
                t0 = _clock()
                try:
                    batch = self._take_batch()
                except PoolStopped:
                    stop_reason = "pool stopped"
                    break
                t1 = _clock()
                self.state, metrics = self.learner.update(self.state, batch)
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}  # waits for the update
                t2 = _clock()
                self.updates += 1
                self.samples_trained += int(batch.reward.size)
                if self.updates % self.publish_every == 0:
                    version = self.policy.update_params(self.learner.params(self.state))
                    self._updates_at_version[version] = self.updates
                t3 = _clock()
                wait_t += t1 - t0
                update_t += t2 - t1
                publish_t += t3 - t2
                stats = self.pool.stats
                elapsed = t3 - t_start
                prog = Progress(stats.env_steps, stats.episodes, stats.recent_return_mean, self.updates, elapsed,
                                metrics)
                self.history.append(dict(env_steps=stats.env_steps, elapsed=elapsed, updates=self.updates,
                                         recent_return_mean=stats.recent_return_mean, **metrics))
                if on_update is not None:
                    on_update(prog)
                bar.update(stats.env_steps - shown)
                shown = stats.env_steps
                bar.set_postfix(sps=f"{stats.env_steps / max(elapsed, 1e-9):,.0f}",
                                ret=f"{stats.recent_return_mean:.1f}", refresh=False)
                if self.checkpoint_path and self.checkpoint_every and self.updates % self.checkpoint_every == 0:
                    self.save()
                if until is not None and until(prog):
                    stop_reason, solved_steps, solved_seconds = "condition", stats.env_steps, elapsed
                    break
                if total_steps is not None and stats.env_steps >= total_steps:
                    stop_reason = "budget"
                    break
                if max_seconds is not None and elapsed >= max_seconds:
                    stop_reason = "time"
                    break
        except KeyboardInterrupt:
            stop_reason = "interrupted"
        except Exception as e:  # noqa: BLE001 - reported, and the pool and service still shut down
            stop_reason, error = "error", repr(e)
            raise
        finally:
            elapsed = _clock() - t_start
            bar.close()
            if close:
                self.pool.stop()
                self.policy.close()
            if self.checkpoint_path:
                self.save()
        stats = self.pool.stats
        return TrainReport(
            env_steps=stats.env_steps, elapsed=elapsed, steps_per_sec=stats.env_steps / max(elapsed, 1e-9),
            updates=self.updates, episodes=stats.episodes, recent_return_mean=stats.recent_return_mean,
            stop_reason=stop_reason, solved_at_steps=solved_steps, solved_at_seconds=solved_seconds,
            samples_trained=self.samples_trained, stale_steps_dropped=self.stale_steps_dropped,
            policy_lag_min=self._lag_min if self._lag_count else float("nan"),
            policy_lag_mean=self._lag_sum / self._lag_count if self._lag_count else float("nan"),
            policy_lag_max=self._lag_max if self._lag_count else float("nan"),
            time_waiting_for_trajectories=wait_t, time_learner_update=update_t, time_publish=publish_t,
            last_metrics=metrics, error=error)


def solved(threshold: float, window: int = 100) -> Callable[[Progress], bool]:
    """A stopping condition: at least `window` episodes finished and their recent mean >= threshold."""

    def condition(p: Progress) -> bool:
        return p.episodes >= window and p.recent_return_mean >= threshold

    return condition

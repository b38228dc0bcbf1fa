"""Trainer: takes trajectories from a source, updates a Learner, publishes parameters.

    state = learner.init(key, example_obs, action_space)
    policy = PolicyService(learner.policy.apply, learner.params(state), example_obs=example_obs)
    pool = ActorPool(env_id, policy, num_actors=256, unroll_length=32)
    report = Trainer(learner, pool, policy, state=state, batch_size=16).run(total_steps=10**6)

Each update takes `batch_size` trajectories from the source (any `TrajectorySource`, such as an
`ActorPool`), stacks them time-major [T, B, ...], runs the learner's jitted update and publishes
the new parameters to the policy service (every `publish_every` updates) while the actors keep
playing. Trajectories staler than `max_policy_lag` are dropped (`rlbatch.training.lag`).

After each update, in this order: the checkpoint (every `checkpoint_every` updates), `on_update`,
then the stopping checks: `until`, then `total_steps`, then `max_seconds`.

`run` always stops the source and closes the service on the way out (unless `close=False`): on
its budget, on its condition, on its time limit, on Ctrl-C and on an exception.
"""
from __future__ import annotations

import dataclasses
import time
import warnings
from typing import Any, Callable

import jax
import numpy as np

from rlbatch.actors.trajectory import Trajectory, stack_trajectories
from rlbatch.errors import PoolStopped
from rlbatch.training.checkpoint import load_checkpoint, save_checkpoint
from rlbatch.training.interfaces import PolicySink, TrajectorySource
from rlbatch.training.lag import PolicyLag
from rlbatch.training.learner import Learner
from rlbatch.training.results import Progress, StopReason, TrainReport

__all__ = ["Trainer"]


@dataclasses.dataclass
class _StageTimes:
    """Seconds spent in each stage of the loop, summed over updates."""

    waiting: float = 0.0
    update: float = 0.0
    publish: float = 0.0


class _ProgressBar:
    """A tqdm bar over environment steps (drawn nowhere when disabled)."""

    def __init__(self, total_steps: int | None, enabled: bool):
        from tqdm.auto import tqdm

        class Bar(tqdm):
            # tqdm's monitor thread (tqdm >= 4.70 starts it for every bar, disabled ones too, and
            # never stops it) only thins out the redraws of bars updated in a hot loop; this one is
            # updated once per learner update, and the trainer leaves no thread behind.
            monitor_interval = 0

        self._bar = Bar(total=total_steps, unit="step", unit_scale=True, disable=not enabled, dynamic_ncols=True)
        self._shown = 0

    def show(self, p: Progress) -> None:
        self._bar.update(p.env_steps - self._shown)
        self._shown = p.env_steps
        self._bar.set_postfix(sps=f"{p.env_steps / max(p.elapsed, 1e-9):,.0f}", ret=f"{p.recent_return_mean:.1f}",
                              refresh=False)

    def close(self) -> None:
        self._bar.close()


def _check_positive_int(name: str, value, allow_none: bool = False) -> None:
    if allow_none and value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        expected = "a positive int or None" if allow_none else "a positive int"
        raise ValueError(f"Trainer: {name} must be {expected}, got {value!r}")


class Trainer:
    """Closes the loop between a trajectory source, a Learner and a policy service.

    Args:
      learner: the Learner (init/update/params/policy).
      source: where trajectories come from (an `ActorPool`, or any `TrajectorySource`); `run`
        starts it if it has not been started.
      policy_service: the service the actors play with (a `PolicyService`, or any `PolicySink`);
        receives the new parameters.
      state: the learner state to start from (learner.init(...) or a restored checkpoint).
      batch_size: B, trajectories per update.
      max_policy_lag: drop trajectories with steps staler than this many updates (None: keep all).
      publish_every: publish parameters every n updates.
      checkpoint_path: where `run` saves the learner state every `checkpoint_every` updates and at
        the end (None: no checkpoints).
      checkpoint_every: save every n updates as well as at the end (None: only at the end); needs
        `checkpoint_path`.
      clock: the seconds clock for elapsed times and stage times (tests pass a fake one).

    Attributes read after or during `run`: `state`, `updates`, `samples_trained`,
    `stale_steps_dropped`, `lag` (the PolicyLag tracker, `lag.stats`) and `history` (the Progress
    of every update).
    """

    def __init__(self, learner: Learner, source: TrajectorySource, policy_service: PolicySink, *, state: Any,
                 batch_size: int, max_policy_lag: int | None = None, publish_every: int = 1,
                 checkpoint_path: str | None = None, checkpoint_every: int | None = None,
                 clock: Callable[[], float] = time.perf_counter):
        _check_positive_int("batch_size", batch_size)
        _check_positive_int("publish_every", publish_every)
        _check_positive_int("checkpoint_every", checkpoint_every, allow_none=True)
        if max_policy_lag is not None and (not isinstance(max_policy_lag, int) or max_policy_lag < 0):
            raise ValueError(f"Trainer: max_policy_lag must be an int >= 0 or None, got {max_policy_lag!r}")
        if checkpoint_every is not None and checkpoint_path is None:
            raise ValueError(f"Trainer: checkpoint_every={checkpoint_every} needs a checkpoint_path, got None")
        self.learner = learner
        self.source = source
        self.policy = policy_service
        self.state = state
        self.batch_size = batch_size
        self.publish_every = publish_every
        self.checkpoint_path = checkpoint_path
        self.checkpoint_every = checkpoint_every
        self.clock = clock
        self.updates = 0
        self.samples_trained = 0
        self.lag = PolicyLag(policy_service.version, max_policy_lag=max_policy_lag)
        self.history: list[Progress] = []

    @property
    def max_policy_lag(self) -> int | None:
        return self.lag.max_policy_lag

    @property
    def stale_steps_dropped(self) -> int:
        return self.lag.stats.stale_steps_dropped

    # ------------------------------------------------------------------ checkpoints

    def save(self, path: str | None = None) -> str:
        """Saves the learner state with metadata {"updates", "env_steps"}; returns the path."""
        path = path or self.checkpoint_path
        if path is None:
            raise ValueError("Trainer.save: expected a path or a checkpoint_path, got neither")
        return save_checkpoint(path, self.state, {"updates": self.updates,
                                                 "env_steps": self.source.stats.env_steps})

    def restore(self, path: str) -> dict:
        """Loads the learner state from `path`, publishes its parameters; returns the file's metadata."""
        self.state, metadata = load_checkpoint(path, self.state)
        self.updates = int(metadata.get("updates", 0))
        self._publish()
        return metadata

    # ------------------------------------------------------------------ one update

    def _take_batch(self) -> tuple[Trajectory, list[np.ndarray]]:
        """B fresh-enough trajectories stacked [T, B, ...], and the per-step lags of each."""
        trajectories, lags = [], []
        while len(trajectories) < self.batch_size:
            trajectory = self.source.get()
            lag = self.lag.admit(trajectory, self.updates)
            if lag is not None:
                trajectories.append(trajectory)
                lags.append(lag)
        return stack_trajectories(trajectories), lags

    def _update(self, batch: Trajectory, lags: list[np.ndarray]) -> dict[str, float]:
        self.state, metrics = self.learner.update(self.state, batch)
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}  # waits for the update
        self.updates += 1
        self.samples_trained += int(batch.reward.size)
        self.lag.trained(lags)
        return metrics

    def _publish(self) -> None:
        version = self.policy.update_params(self.learner.params(self.state))
        self.lag.published(version, self.updates)

    def _progress(self, elapsed: float, metrics: dict[str, float]) -> Progress:
        stats = self.source.stats
        return Progress(env_steps=stats.env_steps, episodes=stats.episodes,
                        recent_return_mean=stats.recent_return_mean, updates=self.updates, elapsed=elapsed,
                        metrics=metrics)

    def _shut_down(self) -> None:
        try:
            if not self.source.stop():
                warnings.warn(f"Trainer.run: the trajectory source {self.source!r} did not stop within its "
                              f"timeout; its threads or processes may still run", RuntimeWarning, stacklevel=3)
        finally:
            self.policy.close()

    def _step(self, times: _StageTimes, t_start: float) -> Progress:
        """One update: a batch from the source, the learner's update, a publish when one is due."""
        t0 = self.clock()
        batch, lags = self._take_batch()
        t1 = self.clock()
        metrics = self._update(batch, lags)
        t2 = self.clock()
        if self.updates % self.publish_every == 0:
            self._publish()
        t3 = self.clock()
        times.waiting += t1 - t0
        times.update += t2 - t1
        times.publish += t3 - t2
        return self._progress(t3 - t_start, metrics)

    # ------------------------------------------------------------------ the loop

    def run(self, total_steps: int | None = None, until: Callable[[Progress], bool] | None = None,
            progress: bool = True, max_seconds: float | None = None, close: bool = True,
            on_update: Callable[[Progress], None] | None = None) -> TrainReport:
        """Trains until `total_steps` env steps, `until(progress)` holds, or `max_seconds` pass.

        `on_update(progress)` is called after every update. With `close` (the default) the source
        is stopped and the service closed on every way out. An exception from the learner, the
        source or a callback is re-raised after that; KeyboardInterrupt ends the run with
        stop_reason "interrupted".
        """
        times = _StageTimes()
        bar = _ProgressBar(total_steps, enabled=progress)
        last = solved_at = None
        t_start = self.clock()
        try:
            if not self.source.started:
                self.source.start()
            while True:
                try:
                    last = self._step(times, t_start)
                except PoolStopped:
                    reason = StopReason.SOURCE_STOPPED
                    break
                self.history.append(last)
                if self.checkpoint_every and self.updates % self.checkpoint_every == 0:
                    self.save()
                if on_update is not None:
                    on_update(last)
                bar.show(last)
                reason = _stop_reason(last, until, total_steps, max_seconds)
                if reason is not None:
                    solved_at = last if reason == StopReason.CONDITION else None
                    break
        except KeyboardInterrupt:
            reason = StopReason.INTERRUPTED
        finally:
            elapsed = self.clock() - t_start
            bar.close()
            try:
                if close:
                    self._shut_down()
            finally:
                if self.checkpoint_path:
                    self.save()
        return self._report(reason, solved_at, elapsed, times, {} if last is None else last.metrics)

    def _report(self, reason: str, solved_at: Progress | None, elapsed: float, times: _StageTimes,
                metrics: dict[str, float]) -> TrainReport:
        stats, lag = self.source.stats, self.lag.stats
        return TrainReport(
            env_steps=stats.env_steps, elapsed=elapsed, steps_per_sec=stats.env_steps / max(elapsed, 1e-9),
            updates=self.updates, episodes=stats.episodes, recent_return_mean=stats.recent_return_mean,
            stop_reason=reason,
            solved_at_steps=None if solved_at is None else solved_at.env_steps,
            solved_at_seconds=None if solved_at is None else solved_at.elapsed,
            samples_trained=self.samples_trained, stale_steps_dropped=lag.stale_steps_dropped,
            policy_lag_min=lag.min, policy_lag_mean=lag.mean, policy_lag_max=lag.max,
            time_waiting_for_trajectories=times.waiting, time_learner_update=times.update,
            time_publish=times.publish, last_metrics=metrics)


def _stop_reason(p: Progress, until, total_steps: int | None, max_seconds: float | None) -> str | None:
    """Why the run stops after the update `p` describes, or None; checked in this order."""
    if until is not None and until(p):
        return StopReason.CONDITION
    if total_steps is not None and p.env_steps >= total_steps:
        return StopReason.BUDGET
    if max_seconds is not None and p.elapsed >= max_seconds:
        return StopReason.TIME
    return None

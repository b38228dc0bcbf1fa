"""What a training run reports: `Progress` after each update, `TrainReport` at the end.

Times are seconds on the trainer's clock (`time.perf_counter` unless the Trainer was given
another); step counts are environment steps as the trajectory source counts them.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Mapping

__all__ = ["Progress", "StopReason", "TrainReport", "solved"]


class StopReason:
    """The values of `TrainReport.stop_reason`: plain strings, so a report stays JSON."""

    BUDGET = "budget"  # the source counted `total_steps` environment steps
    CONDITION = "condition"  # `until(progress)` held
    TIME = "time"  # `max_seconds` passed
    INTERRUPTED = "interrupted"  # KeyboardInterrupt (Ctrl-C, or raised by the learner or on_update)
    ERROR = "error"  # an exception; `run` re-raises it after shutting down
    SOURCE_STOPPED = "pool stopped"  # the source stopped (every actor exited) and was drained

    ALL = (BUDGET, CONDITION, TIME, INTERRUPTED, ERROR, SOURCE_STOPPED)


@dataclasses.dataclass(frozen=True)
class Progress:
    """What a stopping condition and `on_update` see after each learner update.

    Attributes:
      env_steps: environment steps the source has counted.
      episodes: episodes the source has seen finish.
      recent_return_mean: mean return of the source's recent episodes (nan before any).
      updates: learner updates done, this one included.
      elapsed: seconds since `run` started.
      metrics: the learner's metrics of this update, as floats (names chosen by the learner).
    """

    env_steps: int
    episodes: int
    recent_return_mean: float
    updates: int
    elapsed: float
    metrics: Mapping[str, float]


@dataclasses.dataclass(frozen=True)
class TrainReport:
    """The outcome of `Trainer.run`.

    Attributes:
      env_steps: environment steps the source counted by the end.
      elapsed: seconds from the start of `run` to the end of its shutdown.
      steps_per_sec: env_steps / elapsed.
      updates: learner updates done (over every `run` of this trainer, and a restored checkpoint's).
      episodes: episodes the source saw finish.
      recent_return_mean: mean return of the source's recent episodes at the end.
      stop_reason: why the run stopped, one of `StopReason.ALL`.
      solved_at_steps: env_steps of the first Progress for which `until` held (None if it never did).
      solved_at_seconds: elapsed of that Progress (None if `until` never held).
      samples_trained: steps in the batches the learner was given (B * T per update).
      stale_steps_dropped: steps in trajectories refused by `max_policy_lag`.
      policy_lag_min, policy_lag_mean, policy_lag_max: lag in updates of the steps trained on
        (see `rlbatch.training.lag`); nan if none was.
      time_waiting_for_trajectories: seconds blocked on the source for batches.
      time_learner_update: seconds in the learner's update (until its metrics were on the host).
      time_publish: seconds publishing parameters to the policy service.
      last_metrics: the learner's metrics of the last update ({} if there was none).
      error: repr of the exception that ended a run with stop_reason "error". `run` re-raises such
        an exception after shutting down instead of returning, so a report it returns holds None.
    """

    env_steps: int
    elapsed: float
    steps_per_sec: float
    updates: int
    episodes: int
    recent_return_mean: float
    stop_reason: str
    solved_at_steps: int | None
    solved_at_seconds: float | None
    samples_trained: int
    stale_steps_dropped: int
    policy_lag_min: float
    policy_lag_mean: float
    policy_lag_max: float
    time_waiting_for_trajectories: float
    time_learner_update: float
    time_publish: float
    last_metrics: Mapping[str, float]
    error: str | None = None

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def solved(threshold: float, window: int = 100) -> Callable[[Progress], bool]:
    """A stopping condition: at least `window` episodes finished and their recent mean >= threshold."""

    def condition(p: Progress) -> bool:
        return p.episodes >= window and p.recent_return_mean >= threshold

    return condition

"""TensorBoard scalars of a training run through tensorboardX (the `tensorboard` extra), in the
layout CleanRL's scripts write, so that their users' dashboards and habits carry over:

    charts/episodic_return     mean return of the pool's last 100 finished episodes
    charts/episodic_length     their mean length
    charts/SPS                 env steps per second since the run started
    charts/learning_rate       when the run gives a schedule
    charts/policy_lag_mean     learner updates between acting and training, over the steps trained so far
    charts/policy_lag_max
    charts/batch_fill          valid rows / all rows the policy service ran (1 - padding)
    charts/mean_batch_size     valid rows per policy batch
    charts/trajectory_queue    trajectories waiting for the learner
    losses/<name>              every metric of the learner's update (policy_loss, value_loss,
                               entropy, approx_kl, clip_fraction, grad_norm, ...)

The global step of every scalar is the env step count (counted from the first run of a resumed
chain). tensorboardX imports PyTorch, when it is installed, only to recognise torch tensors; a run
that writes floats does not need it, and the import costs 2 to 5 s of start-up on the 2-core
machine (against 0.2 s without it), so `import_summary_writer` hides an unimported torch from
tensorboardX while it imports, which its own no-torch fallback handles.
"""
from __future__ import annotations

import math
import sys
from typing import Any, Callable, Optional

from rlbatch.training.results import Progress

__all__ = ["TensorBoardLog", "import_summary_writer", "tensorboard_available"]


def tensorboard_available() -> bool:
    """Whether tensorboardX can be imported (without importing it)."""
    import importlib.util

    return importlib.util.find_spec("tensorboardX") is not None


def import_summary_writer():
    """tensorboardX's SummaryWriter, imported without importing PyTorch unless it is imported already."""
    if "torch" in sys.modules:
        from tensorboardX import SummaryWriter

        return SummaryWriter
    sys.modules["torch"] = None  # makes `import torch` raise ImportError: tensorboardX's no-torch path
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


class TensorBoardLog:
    """Writes one set of scalars per learner update through the Trainer's `on_update` callback.

    pool, policy, lag: the run's ActorPool, PolicyService and the Trainer's PolicyLag tracker (their
    public `stats`); each may be None. learning_rate_fn: update count -> the learning rate in use.
    """

    def __init__(self, log_dir: str, *, pool=None, policy=None, lag=None, env_steps_offset: int = 0,
                 learning_rate_fn: Optional[Callable[[int], float]] = None, config: Optional[dict] = None):
        try:
            summary_writer = import_summary_writer()
        except ImportError as e:
            raise ImportError("TensorBoard scalars need tensorboardX: pip install -e \".[tensorboard]\"") from e
        self.log_dir = log_dir
        self.writer = summary_writer(log_dir)
        self._pool, self._policy, self._lag = pool, policy, lag
        self._offset = env_steps_offset
        self._learning_rate_fn = learning_rate_fn
        if config:  # CleanRL writes its arguments as a markdown table under "hyperparameters"
            rows = "\n".join(f"|{k}|{v}|" for k, v in config.items())
            self.writer.add_text("hyperparameters", f"|param|value|\n|-|-|\n{rows}")

    def _scalar(self, tag: str, value: Any, step: int) -> None:
        value = float(value)
        if not math.isnan(value):
            self.writer.add_scalar(tag, value, step)

    def on_update(self, progress: Progress) -> None:
        step = self._offset + progress.env_steps
        self._scalar("charts/episodic_return", progress.recent_return_mean, step)
        self._scalar("charts/SPS", progress.env_steps / max(progress.elapsed, 1e-9), step)
        if self._learning_rate_fn is not None:
            self._scalar("charts/learning_rate", self._learning_rate_fn(progress.updates), step)
        for name, value in progress.metrics.items():
            self._scalar(f"losses/{name}", value, step)
        if self._pool is not None:
            stats = self._pool.stats
            self._scalar("charts/episodic_length", stats.recent_length_mean, step)
            self._scalar("charts/trajectory_queue", stats.queue_depth, step)
        if self._lag is not None:
            lag = self._lag.stats
            self._scalar("charts/policy_lag_mean", lag.mean, step)
            self._scalar("charts/policy_lag_max", lag.max, step)
        if self._policy is not None:
            stats = self._policy.stats
            self._scalar("charts/batch_fill", 1.0 - stats.padding_fraction, step)
            self._scalar("charts/mean_batch_size", stats.mean_batch_size, step)

    def close(self) -> None:
        self.writer.close()

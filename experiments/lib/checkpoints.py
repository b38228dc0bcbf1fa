"""Checkpoints of the main job: the learner state (rlbatch.save_checkpoint's .npz, no pickle) with
the run's env step count, update count and arguments as its metadata.

    saver = RunCheckpoints("runs/x/checkpoint.npz", every=100, args=args_dict, env_steps_offset=0)
    saver.on_update(trainer, progress)     # saves every `every` updates (counted over a resumed chain)
    saver.save(trainer, env_steps)         # at the end
    meta = read_metadata("runs/x/checkpoint.npz")   # {"env_steps", "updates", "args"} without a template

`env_steps` counts from the first run of a resumed chain; `updates` is the Trainer's count, which
`Trainer.restore` reads back. `args` is what `experiments.evaluate` rebuilds the network from.
"""
from __future__ import annotations

import json
from typing import Any, Mapping, Optional

import numpy as np

import rlbatch
from rlbatch.errors import CheckpointError
from rlbatch.training.results import Progress

__all__ = ["RunCheckpoints", "read_metadata"]

# The key under which rlbatch.save_checkpoint stores its metadata as a JSON string
# (rlbatch/training/checkpoint.py); read directly because rlbatch offers no metadata-only load.
_METADATA_KEY = "__metadata__"


def read_metadata(path: str) -> dict:
    """The metadata of a checkpoint written by `RunCheckpoints`, without loading its arrays."""
    try:
        with np.load(path, allow_pickle=False) as data:
            if _METADATA_KEY not in data.files:
                raise CheckpointError(f"checkpoint {path}: expected a {_METADATA_KEY} entry "
                                      f"(rlbatch.save_checkpoint's), got entries {sorted(data.files)[:5]}...")
            metadata = json.loads(str(data[_METADATA_KEY]))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path}: expected an .npz written by rlbatch.save_checkpoint, "
                              f"got {e!r}") from e
    missing = {"env_steps", "updates", "args"} - set(metadata)
    if missing:
        raise CheckpointError(f"checkpoint {path}: expected metadata env_steps, updates and args "
                              f"(experiments.train's), missing {sorted(missing)}")
    return metadata


class RunCheckpoints:
    """Saves the Trainer's learner state to one path, every `every` updates and when asked."""

    def __init__(self, path: str, *, every: Optional[int], args: Mapping[str, Any], env_steps_offset: int = 0):
        if every is not None and (not isinstance(every, int) or every < 1):
            raise ValueError(f"--checkpoint-every: expected a positive int or None, got {every!r}")
        self.path = path
        self.every = every
        self.args = dict(args)
        self.env_steps_offset = env_steps_offset
        self.saves = 0

    def save(self, trainer: rlbatch.Trainer, env_steps: int) -> str:
        """Writes `trainer.state` with {"env_steps": offset + env_steps, "updates", "args"}."""
        self.saves += 1
        return rlbatch.save_checkpoint(self.path, trainer.state, {
            "env_steps": self.env_steps_offset + env_steps, "updates": trainer.updates, "args": self.args})

    def on_update(self, trainer: rlbatch.Trainer, progress: Progress) -> None:
        if self.every is not None and progress.updates % self.every == 0:
            self.save(trainer, progress.env_steps)

"""The errors rlbatch raises, in one small hierarchy.

Every message says what was expected, what came, and which request, actor or call it concerns.
"""
from __future__ import annotations

import concurrent.futures

__all__ = [
    "RLBatchError",
    "ServiceClosed",
    "QueueFull",
    "DeadlineExceeded",
    "InvalidRequest",
    "BatchOutputError",
    "ParamsMismatch",
    "PoolStopped",
    "CheckpointError",
    "TrajectoryRefused",
]


class RLBatchError(Exception):
    """Base class of every error rlbatch raises itself."""


class ServiceClosed(RLBatchError, RuntimeError):
    """The service was closed (or failed to start) before this request could run."""


class QueueFull(RLBatchError):
    """The service's queue holds `max_queue` requests and `on_full="raise"` was chosen."""


# concurrent.futures.TimeoutError is the builtin TimeoutError from Python 3.11 on, a separate
# class before; derive from both so `except TimeoutError` works on every supported version.
_TIMEOUT_BASES = tuple(dict.fromkeys((TimeoutError, concurrent.futures.TimeoutError)))


class DeadlineExceeded(RLBatchError, *_TIMEOUT_BASES):
    """A request's deadline (`submit(..., timeout=s)`) passed before it ran; it was not run."""


class InvalidRequest(RLBatchError, ValueError):
    """One request's inputs do not fit the service (arguments, shape, dtype, tree structure).

    Only the request that carried them fails; the rest of its batch runs.
    """


class BatchOutputError(RLBatchError, ValueError):
    """The batch function returned something that cannot be split back into one result per caller."""


class ParamsMismatch(RLBatchError, ValueError):
    """New policy parameters do not have the structure, shapes or dtypes of the current ones."""


class PoolStopped(RLBatchError):
    """An ActorPool was stopped (or every actor exited) and its trajectory queue is empty."""


class CheckpointError(RLBatchError, ValueError):
    """A checkpoint does not match the template it is loaded into."""


class TrajectoryRefused(RLBatchError, ValueError):
    """A process of a fleet (rlbatch.distributed) sent trajectories that do not have the fleet's
    structure, shapes or dtypes."""

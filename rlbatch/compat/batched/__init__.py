"""Drop-in for users of batched 0.1.5 (mixedbread): `from rlbatch.compat import batched`.

    @batched.dynamically(batch_size=32, timeout_ms=5.0)          # thread version, blocking calls
    @batched.aio.dynamically(...)                                 # `await fn(x)`
    @batched.inference.dynamically(pad_tokens={"input_ids": 0})  # feature rows, padded
    @batched.aio.inference.dynamically(...)

batched's rule for arguments is kept: a `list` is many items and gives a list of results;
anything else (tuple, array, dict, str) is one item. `timeout_ms` is in milliseconds. Every
processor runs on an rlbatch.BatchedService; see the submodules for what differs on purpose.
"""
from rlbatch.compat.batched import aio, inference, types, utils
from rlbatch.compat.batched.batch_processor import BatchProcessor, dynamically

__all__ = ["BatchProcessor", "aio", "dynamically", "inference", "types", "utils"]

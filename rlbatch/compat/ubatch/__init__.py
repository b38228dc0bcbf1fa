"""Drop-in for uBatch 1.0.0 (`ubatch`): `from rlbatch.compat.ubatch import UBatch, ubatch_decorator`.

The submodules keep uBatch's layout: `rlbatch.compat.ubatch.ubatch` (UBatch and the errors) and
`rlbatch.compat.ubatch.decorators` (ubatch_decorator). See rlbatch.compat.ubatch.ubatch for the
rules kept and what differs.
"""
from rlbatch.compat.ubatch.decorators import ubatch_decorator
from rlbatch.compat.ubatch.ubatch import BadBatchOutputSize, HandlerAlreadySet, HandlerNotSet, UBatch

__all__ = [
    "UBatch",
    "HandlerNotSet",
    "HandlerAlreadySet",
    "BadBatchOutputSize",
    "ubatch_decorator",
]

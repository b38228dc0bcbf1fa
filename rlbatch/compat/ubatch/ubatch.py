"""uBatch's `UBatch` class and errors (module `ubatch.ubatch`), over rlbatch's BatchedService.

    mb = UBatch(max_size=50, timeout=0.01)       # timeout: seconds
    mb.set_handler(model.batch_predict)          # gets one list per argument
    mb.start()
    y = mb.ubatch(x)                             # one input per call, blocks for its result
    mb.stop()

uBatch's rules, kept here:
- one call of `ubatch(*args, **kwargs)` is one input whatever its type; the handler receives one
  Python list per argument, positional as positional, keyword as keyword, in arrival order, and
  returns one result per input;
- a batch goes when it holds `max_size` inputs or when its oldest input has waited `timeout`
  seconds, counted from the `ubatch()` call (independent callers never cause an early flush);
- UBatch does not start itself: inputs sent before `start()` wait in the queue, and a backlog
  goes out in full batches, oldest first;
- the handler is looked up when each batch runs (whatever `_handler` is then);
- an exception from the handler reaches every caller of that batch, and the worker goes on.

What differs, all of it in places where uBatch hangs or mixes inputs up:
- `stop()` runs every input already queued before it returns (uBatch left them waiting
  forever), and `ubatch()` on a stopped UBatch raises ServiceClosed at once (uBatch hung until
  the next `start()`); `start()` after `stop()` serves again, as in uBatch;
- every input must have the argument layout (number of positional arguments, keyword names) of
  the first input since `start()`; another layout fails that input alone with InvalidRequest
  (uBatch failed or silently dropped arguments of its whole batch);
- an exception instance in the handler's output fails that caller (uBatch returned it);
- nothing polls: an idle UBatch uses no CPU.
"""
from __future__ import annotations

import logging
import threading
from typing import Callable, Generic, List, Optional, TypeVar

from rlbatch.batching.collate import ArgSpec, ListCollator
from rlbatch.batching.options import check_positive_int, check_seconds
from rlbatch.batching.service import BatchedService
from rlbatch.batching.stats import ServiceStats
from rlbatch.errors import BatchOutputError, RLBatchError, ServiceClosed

__all__ = ["BadBatchOutputSize", "HandlerAlreadySet", "HandlerNotSet", "UBatch", "S", "T"]

T = TypeVar("T")  # one input
S = TypeVar("S")  # one output

logger = logging.getLogger(__name__)


class BadBatchOutputSize(BatchOutputError):
    """The handler returned a different number of outputs than it got inputs (every caller of
    that batch gets it). Also an rlbatch BatchOutputError."""

    def __init__(self, input_size: int, output_size: int):
        self.input_size = input_size
        self.output_size = output_size
        self.message = f"Output size: {output_size} differs from the input size: {input_size}"
        super().__init__(self.message)


class HandlerNotSet(RLBatchError):
    """`start()` (or a batch) found no handler: call `set_handler(handler)` first."""

    def __init__(self, message: str = "UBatch has no handler; call set_handler(handler) before start()"):
        super().__init__(message)


class HandlerAlreadySet(RLBatchError):
    """`set_handler` was called on a UBatch that already has a handler."""

    def __init__(self, message: str = "UBatch already has a handler; set_handler may be called once"):
        super().__init__(message)


class _UBatchCollator(ListCollator):
    """ListCollator with uBatch's error for a wrong number of outputs."""

    def scatter(self, output, requests, num_rows, ctx):
        try:
            got = len(output)
        except TypeError:  # not a sequence: ListCollator says so
            got = num_rows
        if got != num_rows:
            raise BadBatchOutputSize(num_rows, got)
        return super().scatter(output, requests, num_rows, ctx)


class UBatch(Generic[T, S]):
    """Joins single inputs from many threads into batches for one handler.

    Args:
      max_size: most inputs in one handler call (settable while running, as `max_size`).
      timeout: seconds the oldest input of a batch may wait for more (settable, as `timeout`).
    """

    def __init__(self, max_size: int, timeout: float):
        check_positive_int("max_size", max_size)
        check_seconds("timeout", timeout)
        self._max_size = max_size
        self._timeout = float(timeout)
        self._handler: Optional[Callable[..., List[S]]] = None
        # Guards the service swap in start() after stop(); calls read self._service without it.
        self._lock = threading.Lock()
        self._running = False
        self._service = self._new_service()

    def _new_service(self) -> BatchedService:
        # One service per run: a stopped (closed) service cannot start again, uBatch can.
        # implicit_callers=False: uBatch's rule, a batch waits for max_size or timeout only.
        # start=False: inputs queue until start(), as in uBatch.
        collator = _UBatchCollator(ArgSpec(self._call_handler))
        return BatchedService(self._call_handler, self._max_size, self._timeout, collator=collator,
                              implicit_callers=False, start=False, name="ubatch")

    def _call_handler(self, *args, **kwargs):
        # Read at every batch, not captured by set_handler: uBatch looks the handler up each time,
        # and users (and mocker.spy) replace `_handler` after set_handler.
        handler = self._handler
        if handler is None:
            raise HandlerNotSet("UBatch has no handler to run this batch; call set_handler(handler)")
        return handler(*args, **kwargs)

    # ------------------------------------------------------------------ settings

    @property
    def max_size(self) -> int:
        return self._max_size

    @max_size.setter
    def max_size(self, value: int) -> None:
        check_positive_int("max_size", value)
        with self._lock:
            self._max_size = value
            self._service.max_batch_size = value

    @property
    def timeout(self) -> float:
        return self._timeout

    @timeout.setter
    def timeout(self, value: float) -> None:
        check_seconds("timeout", value)
        with self._lock:
            self._timeout = float(value)
            self._service.max_delay = float(value)

    def set_handler(self, handler: Callable[..., List[S]]) -> None:
        """Sets the function that processes batches: it gets one list per argument and returns a
        sequence with one output per input. HandlerAlreadySet if a handler is set already."""
        if self._handler is not None:
            raise HandlerAlreadySet()
        if not callable(handler):
            raise TypeError(f"handler must be callable, got {type(handler).__name__}")
        self._handler = handler

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> "UBatch[T, S]":
        """Starts the worker thread (idempotent); inputs queued before run now. Returns self."""
        if self._handler is None:
            raise HandlerNotSet()
        with self._lock:
            if self._service.closed:  # start() after stop(): a fresh service
                self._service = self._new_service()
            self._service.start()
            self._running = True
        return self

    def stop(self) -> None:
        """Runs every input already queued, then stops the worker thread and waits for it.
        Later `ubatch()` calls raise ServiceClosed until `start()` is called again."""
        with self._lock:
            service = self._service
            self._running = False
            # Closed under the lock, so that a start() racing with this one makes a new service
            # instead of reviving this one; joined outside it, so that a handler that calls
            # start() or stop() does not deadlock with the thread waiting for it.
            service.close(wait=False)
        service.close(wait=True)

    @property
    def stats(self) -> ServiceStats:
        """rlbatch's statistics of the current run (not in uBatch): batches, sizes, why each
        batch went, inputs pending."""
        return self._service.stats

    # ------------------------------------------------------------------ calls

    def ubatch(self, *args: T, **kwargs: T) -> S:
        """Queues one input (each argument is one item of its list) and returns its output.

        Blocks until its batch ran; raises what the handler raised for that batch.
        """
        service = self._service
        if service.closed:
            raise ServiceClosed("UBatch is stopped; call start() before ubatch()")
        if not self._running:
            logger.warning("ubatch is not running")
        # call_request, not service(...): a keyword argument named `timeout` or `priority`
        # belongs to the handler here, not to the service.
        return service.call_request(args, kwargs)

    def __repr__(self):
        state = "running" if self._running else "stopped" if self._service.closed else "not started"
        return f"UBatch(max_size={self._max_size}, timeout={self._timeout}, {state})"

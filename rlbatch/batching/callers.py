"""Known callers: the callers a service counts on for early flush.

When every known caller has a request waiting, nothing more can come from them until a batch runs,
so the batch goes at once instead of waiting out max_delay. Two kinds:

- registered (`service.register()`): exact. Counts from registration until `close()`; `pause()`
  stops counting it for a while (an actor blocked elsewhere). Use it for a fixed set of callers
  that call in a loop, such as actor threads.
- implicit: every thread that makes a blocking call (`service(x)`, `call_rows`) becomes a known
  caller by itself, with no ceremony. It stops counting when its thread ends, or once it has made
  no call for `idle_horizon` seconds (see rlbatch.batching.worker); its next call counts it again.
  Futures and asyncio calls never make their caller known: one task may have many in flight.
"""
from __future__ import annotations

import concurrent.futures
import threading
import weakref

__all__ = ["Caller", "ThreadCallers"]


class Caller:
    """A known caller of a BatchedService (see the module docstring). `register()` returns one."""

    __slots__ = ("service", "outstanding", "active", "closed", "implicit", "last_call", "spares",
                 "_held", "__weakref__")

    def __init__(self, service, implicit: bool = False, holds=None):
        self.service = service
        self.outstanding = 0  # this caller's requests in the queue (kept by RequestQueue)
        self.active = False  # counted towards early flush (kept by RequestQueue.set_active)
        self.closed = False
        self.implicit = implicit
        self.last_call = 0.0  # arrival time of its last request
        # Blocking calls reuse the request object of the caller's last call (no allocation per
        # call); a list, because list.pop is atomic should two threads share one Caller.
        self.spares: list = []
        self._held = holds  # kept alive while the caller is open (a decorated method's instance)

    def submit(self, *args, priority: int = 0, timeout: float | None = None, **kwargs) -> concurrent.futures.Future:
        return self.service.submit_request(args, kwargs, priority=priority, timeout=timeout, caller=self)

    def submit_rows(self, *args, priority: int = 0, timeout: float | None = None, **kwargs) -> concurrent.futures.Future:
        return self.service.submit_request(args, kwargs, rows=True, priority=priority, timeout=timeout, caller=self)

    def __call__(self, *args, timeout: float | None = None, priority: int = 0, **kwargs):
        return self.service.call_request(args, kwargs, timeout=timeout, priority=priority, caller=self)

    def call_rows(self, *args, timeout: float | None = None, priority: int = 0, **kwargs):
        return self.service.call_request(args, kwargs, rows=True, timeout=timeout, priority=priority, caller=self)

    def pause(self) -> None:
        """Stops counting this caller towards early flush (it will be busy elsewhere for a while,
        e.g. an actor blocked on a full trajectory queue), until `resume()`."""
        self.service.set_caller_active(self, False)

    def resume(self) -> None:
        self.service.set_caller_active(self, True)

    def close(self) -> None:
        """Stops counting this caller for good. Idempotent."""
        self.service.remove_caller(self)
        self._held = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        kind = "implicit" if self.implicit else "registered"
        state = "closed" if self.closed else ("active" if self.active else "inactive")
        return f"<Caller {kind} {state} outstanding={self.outstanding}>"


class _Seat:
    """Lives in one thread's local storage; when the thread ends, the storage is cleared and the
    seat's finalizer closes the thread's implicit caller."""

    __slots__ = ("caller", "__weakref__")

    def __init__(self, caller: Caller):
        self.caller = caller


def _release(service_ref, caller) -> None:
    service = service_ref()
    if service is not None:
        service.remove_caller(caller)


class ThreadCallers:
    """Each thread's implicit Caller of one service, made on the thread's first blocking call."""

    def __init__(self, service):
        self._service_ref = weakref.ref(service)
        self._local = threading.local()

    def get(self) -> Caller | None:
        """This thread's caller, made and counted on first use; None once the service is closed."""
        try:
            return self._local.seat.caller
        except AttributeError:
            return self._new()

    def _new(self) -> Caller | None:
        service = self._service_ref()
        if service is None or service.closed:
            return None
        caller = Caller(service, implicit=True)
        service.add_caller(caller)
        seat = _Seat(caller)
        weakref.finalize(seat, _release, self._service_ref, caller)
        self._local.seat = seat
        return caller

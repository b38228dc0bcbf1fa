"""PolicyService: a jit-compiled JAX policy behind a BatchedService, compiled once per bucket.

Shapes: `example_obs` is ONE observation (no batch axis); a request carries one observation or k
of them stacked on a new leading axis (see rlbatch.policy.collate). Batches are padded to bucket
sizes, each compiled ahead of time (rlbatch.policy.compile).

Parameters: `update_params` validates the new tree against the current one, copies it to the
device and waits until the copy is complete, and only then publishes (params, version) as one
tuple; a batch reads that tuple once, so it never sees half-updated parameters and inference never
waits for a transfer. Versions start at 0 and only grow; every result carries the version that
produced it.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import itertools
import operator
import threading
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np

from rlbatch.batching.arrays import to_host
from rlbatch.batching.callers import Caller
from rlbatch.batching.service import BatchedService
from rlbatch.batching.stats import ServiceStats
from rlbatch.errors import InvalidRequest, ParamsMismatch
from rlbatch.policy.collate import ObservationCollator, leaf_specs
from rlbatch.policy.compile import compile_step
from rlbatch.policy.output import PolicyOutput

__all__ = ["PolicyService", "PolicyCaller", "InlinePolicyCaller", "PolicyOutput", "PolicyStats", "DEFAULT_BUCKETS"]

DEFAULT_BUCKETS = (8, 16, 32, 64, 128, 256)
_clock = time.perf_counter


@dataclasses.dataclass(frozen=True)
class PolicyStats(ServiceStats):
    """ServiceStats plus what is particular to a bucketed JAX policy. Times are in seconds."""

    compile_count: int = 0
    params_version: int = 0
    num_updates: int = 0
    bucket_padding: dict = dataclasses.field(default_factory=dict)  # bucket -> padded fraction
    host_prep_time: float = 0.0  # total: rows into buffers, transfer and dispatch
    device_time: float = 0.0  # total: waiting for the device's outputs
    mean_host_prep_time: float = 0.0  # per batch
    mean_device_time: float = 0.0  # per batch


def _check_buckets(buckets) -> tuple:
    """The buckets sorted and deduplicated, or ValueError/TypeError saying what came instead."""
    try:
        sizes = tuple(sorted(set(operator.index(b) for b in buckets)))
    except TypeError:
        raise TypeError(f"buckets must be a sequence of positive ints, got {buckets!r}") from None
    if not sizes or sizes[0] < 1:
        raise ValueError(f"buckets must be a non-empty sequence of positive ints, got {tuple(buckets)}")
    return sizes


class PolicyService:
    """Serves `apply_fn(params, obs, key) -> (action, extras)` to many callers, batched and bucketed.

    Args:
      apply_fn: a pure JAX function; obs leaves have the batch axis first; extras is a dict of
        per-row arrays. Recurrent: `apply_fn(params, obs, state, key) -> (action, extras, state)`
        when `example_state` is given.
      params: the initial parameters (any pytree of arrays).
      example_obs: one observation (no batch axis): fixes shapes, dtypes and tree structure.
      buckets: the padded batch sizes, each compiled once at start.
      max_delay: seconds the oldest request of a batch may wait for more (see BatchedService).
      seed: seeds the per-batch key schedule.
      device: a jax.Device (default: JAX's default device, the GPU where there is one).
      example_state: one row of recurrent state; turns on the recurrent signature.
      check_finite: refuse observations with NaN or inf (default: pass them through).
      max_in_flight: batches dispatched to the device and not yet returned (pipelining). Default:
        2 where dispatch is asynchronous (an accelerator, or a CPU with JAX's async CPU dispatch
        on), 1 where the computation finishes inside the call (a second thread would only add a
        hand-off per batch).
      **batching_options: max_batch_size, max_queue, on_full, starvation_timeout, ... as for
        BatchedService.
    """

    def __init__(
        self,
        apply_fn: Callable,
        params: Any,
        *,
        example_obs: Any,
        buckets: Sequence[int] = DEFAULT_BUCKETS,
        max_delay: float = 0.002,
        seed: int = 0,
        device: jax.Device | None = None,
        example_state: Any = None,
        check_finite: bool = False,
        max_in_flight: int | None = None,
        name: str = "policy",
        **batching_options: Any,
    ):
        self.apply_fn = apply_fn
        self.device = device if device is not None else jax.devices()[0]
        # Checked before anything is compiled: a batch of more rows than the largest bucket would
        # have no executable to run on (BatchedService checks the same for its own buckets).
        self.buckets = _check_buckets(buckets)
        max_batch_size = batching_options.get("max_batch_size")
        if isinstance(max_batch_size, int) and max_batch_size > self.buckets[-1]:
            raise ValueError(f"the largest bucket must hold max_batch_size={max_batch_size} rows, "
                             f"got buckets {self.buckets}")
        self.seed = seed
        self._stateful = example_state is not None
        self._example_obs = jax.tree_util.tree_map(np.asarray, example_obs)
        # One row of recurrent state, what an actor starts each episode with (None: feed-forward).
        self._example_state = None if example_state is None else jax.tree_util.tree_map(np.asarray, example_state)
        self._publish_lock = threading.Lock()
        self._version = 0
        self._num_updates = 0
        self._current = (self._to_device(params), 0)
        # update_params checks new parameters against those that run (on the device, where
        # float64 became float32 unless x64 is on), not against the ones given here.
        self._params_treedef = jax.tree_util.tree_structure(self._current[0])
        self._params_specs = leaf_specs(self._current[0])
        self._key = jax.device_put(jax.random.PRNGKey(seed), self.device)
        self._on_cpu = self.device.platform == "cpu"  # outputs are in host memory already
        self._batch_index = itertools.count()  # next() is one atomic step: inline callers share it

        batch_fn = self._batch_recurrent if self._stateful else self._batch
        self._collator = ObservationCollator(batch_fn, self.buckets, self._example_obs, self._example_state,
                                             check_finite)
        self._compiled = {b: compile_step(apply_fn, self._current[0], self._example_obs, self._example_state,
                                          self._key, b, self.device) for b in self.buckets}
        self.compile_count = len(self._compiled)
        # The call fast path takes what the collator's own fast path takes (one plain array of the
        # example's shape and dtype: feed-forward policies only), unless every row must be checked.
        self._fast_obs = None if check_finite else self._collator.fast_spec
        batching_options.setdefault("max_batch_size", max(self.buckets))
        if max_in_flight is None:
            asynchronous = self.device.platform != "cpu" or jax.config.read("jax_cpu_enable_async_dispatch")
            max_in_flight = 2 if asynchronous else 1
        self._service = BatchedService(batch_fn, max_delay=max_delay, max_in_flight=max_in_flight, name=name,
                                       collator=self._collator, **batching_options)
        self._begin_own_batch, self._end_own_batch = self._service.own_batch_hooks()  # see _own_batch

    # ------------------------------------------------------------------ batches

    def _dispatch(self, args):
        t0 = _clock()
        params, version = self._current  # one read: params and version always belong together
        bucket = jax.tree_util.tree_leaves(args[0])[0].shape[0]
        i = next(self._batch_index)
        # The compiled executable copies its numpy inputs to the device itself, once per batch
        # (cheaper than a separate jax.device_put); the buffers are not reused before the batch's
        # results are back, so the copy can never see them change.
        out = self._compiled[bucket](params, *args, self._key, np.uint32(i))
        elapsed = _clock() - t0
        with self._collator.counts_lock:
            self._collator.prep_time += elapsed
        return out, version

    def _batch(self, obs, num_valid):
        return self._dispatch((obs,))

    def _batch_recurrent(self, obs, state, num_valid):
        return self._dispatch((obs, state))

    def key_for_batch(self, i: int):
        """The PRNG key batch i runs with (see rlbatch.policy.compile)."""
        return jax.random.fold_in(jax.random.PRNGKey(self.seed), np.uint32(i))

    # ------------------------------------------------------------------ calling

    def __call__(self, obs, state=None, *, timeout: float | None = None, caller: Caller | None = None) -> PolicyOutput:
        """`action, extras = svc(obs)`: blocks until this observation's batch ran. `obs` may be a
        stack of k observations (one request of k rows). `caller`: the registered caller to call
        on behalf of (default: the calling thread's own known caller)."""
        fast = self._fast_obs
        if fast is not None and state is None and type(obs) is np.ndarray and obs.shape == fast[0] and obs.dtype == fast[1]:
            # The hot path of an actor: one plain array observation of exactly the expected shape and
            # dtype, nothing else to check (the collator's own fast path).
            return self._service.call_prepared(obs, None, timeout, 0, caller)
        try:
            args, rows = self._collator.request(obs, state)
        except InvalidRequest:
            self._service.record_invalid()  # as the service counts those the collator refuses
            raise
        return self._service.call_request(args, {}, rows=rows, timeout=timeout, caller=caller)

    def submit(self, obs, state=None, *, timeout: float | None = None, priority: int = 0,
               caller: Caller | None = None) -> concurrent.futures.Future:
        """A concurrent.futures.Future of the PolicyOutput; invalid input gives a Future that
        already holds InvalidRequest."""
        try:
            args, rows = self._collator.request(obs, state)
        except InvalidRequest as e:
            self._service.record_invalid()
            future = concurrent.futures.Future()
            future.set_exception(e)
            return future
        return self._service.submit_request(args, {}, rows=rows, priority=priority, timeout=timeout, caller=caller)

    async def acall(self, obs, state=None, *, timeout: float | None = None):
        return await asyncio.wrap_future(self.submit(obs, state, timeout=timeout))

    def register(self, *, inline: bool = False) -> "PolicyCaller | InlinePolicyCaller":
        """A registered caller (one per actor thread): see BatchedService.register (early flush).

        `inline=True`: a caller that runs each of its requests as a batch of its own, in its own
        thread (`BatchedService.call_inline`): no queue, no hand-off to the service's worker, and
        it never holds other callers' batches back (it is not a known caller). For an actor whose
        request fills a batch by itself, a vector environment's k observations: each actor thread
        then runs inference on its own batch, as Sebulba's actor threads do, and several actors'
        batches run at once. Its `timeout` bounds only a request of more rows than the largest
        bucket, which still goes through the queue, split over several batches (an inline batch
        waits for nothing but its own computation)."""
        if inline:
            return InlinePolicyCaller(self)
        return PolicyCaller(self, self._service.register(), self._fast_obs)

    def _call_inline(self, obs, state, timeout=None):
        """One request run as a batch of its own in the calling thread (see register)."""
        fast = self._fast_obs
        collator = self._collator
        if fast is not None and state is None and type(obs) is np.ndarray and obs.dtype == fast[1] \
                and obs.shape[1:] == fast[0] and 0 < obs.shape[0] <= self._service.max_batch_size:
            return self._own_batch(obs, obs.shape[0])  # k plain observations: nothing to check
        try:
            args, is_rows = collator.request(obs, state)
            rows = collator.count_rows(args, {}) if is_rows else None
            if rows is not None and rows > self._service.max_batch_size:
                return self._service.call_request(args, {}, rows=True, timeout=timeout)
            values = collator.prepare(args, {}, rows)
        except InvalidRequest:
            self._service.record_invalid()
            raise
        return self._service.call_inline(values, rows)

    def _own_batch(self, obs: np.ndarray, rows: int) -> PolicyOutput:
        """The inline fast path: a plain stack of `rows` observations run as a batch of its own, in
        the calling thread, with the compiled step called directly. It does what the service's
        general path does for one such request (pad to the bucket, key schedule, statistics, the
        outputs' first `rows` rows) without a request object or collation, which on the CPU cost
        more than the 64x64 MLP's batch itself (measured: about 260 against 120 us per call)."""
        collator = self._collator
        t0 = self._begin_own_batch(rows)
        bucket = collator.bucket_for(rows)
        failed = True
        try:
            if bucket == rows:
                x = obs
            else:
                x = np.empty((bucket,) + obs.shape[1:], obs.dtype)
                x[:rows] = obs
                collator.pad_rows(x, rows)
            params, version = self._current
            out = self._compiled[bucket](params, x, self._key, np.uint32(next(self._batch_index)))
            t1 = _clock()
            leaves, treedef = jax.tree_util.tree_flatten(out)
            # (the executable's outputs are its own buffers, never the caller's array: the test
            # test_inline_outputs_are_the_callers_own_even_where_the_policy_returns_its_input)
            host = [a[:rows] for a in to_host(leaves, self._on_cpu)]
            action, extras = treedef.unflatten(host)
            collator.count_batch(bucket, rows, t1 - t0, _clock() - t1)
            failed = False
        finally:
            self._end_own_batch(rows, bucket, t0, failed)
        return PolicyOutput((action, extras), version)

    # ------------------------------------------------------------------ parameters

    def _to_device(self, params):
        params = jax.device_put(params, self.device)
        return jax.block_until_ready(params)

    def update_params(self, params) -> int:
        """Publishes new parameters atomically; returns their version."""
        treedef = jax.tree_util.tree_structure(params)
        if treedef != self._params_treedef:
            raise ParamsMismatch(f"update_params: expected a parameter tree of structure {self._params_treedef}, "
                                 f"got {treedef}; the old parameters stay in use")
        for (path, shape, dtype), (_, got_shape, got_dtype) in zip(self._params_specs, leaf_specs(params)):
            # Compared as it will be on the device: with x64 off, float64 runs as float32.
            if shape != got_shape or dtype != jax.dtypes.canonicalize_dtype(got_dtype):
                raise ParamsMismatch(f"update_params: parameter {path} expected {dtype}{list(shape)}, "
                                     f"got {got_dtype}{list(got_shape)}; the old parameters stay in use")
        on_device = self._to_device(params)  # ready before anyone can see it
        with self._publish_lock:
            self._version += 1
            self._num_updates += 1
            self._current = (on_device, self._version)
            return self._version

    @property
    def params(self):
        return self._current[0]

    @property
    def version(self) -> int:
        return self._current[1]

    # ------------------------------------------------------------------ lifecycle and stats

    @property
    def stats(self) -> PolicyStats:
        base = self._service.stats
        collator = self._collator
        batches = max(collator.batches, 1)
        padding = {b: 1.0 - valid / (b * n) for b, (valid, n) in collator.bucket_rows.items() if n}
        return PolicyStats(
            **dataclasses.asdict(base),
            compile_count=self.compile_count,
            params_version=self.version,
            num_updates=self._num_updates,
            bucket_padding=padding,
            host_prep_time=collator.prep_time,
            device_time=collator.device_time,
            mean_host_prep_time=collator.prep_time / batches,
            mean_device_time=collator.device_time / batches,
        )

    @property
    def service(self) -> BatchedService:
        return self._service

    @property
    def max_batch_size(self) -> int:
        return self._service.max_batch_size

    def close(self, wait: bool = True, *, cancel_pending: bool = False) -> None:
        """Stops the service (see BatchedService.close)."""
        self._service.close(wait, cancel_pending=cancel_pending)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """`close` under `concurrent.futures.Executor.shutdown`'s name and arguments."""
        self._service.close(wait, cancel_pending=cancel_futures)

    @property
    def example_obs(self):
        """One observation (no batch axis) as numpy arrays: the shapes, dtypes and structure accepted."""
        return self._example_obs

    @property
    def example_state(self):
        """A recurrent policy's state for one row at the start of an episode (None if feed-forward)."""
        return self._example_state

    @property
    def closed(self) -> bool:
        return self._service.closed

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()




class PolicyCaller:
    """A registered caller of a PolicyService (see PolicyService.register); close it when done."""

    def __init__(self, policy: PolicyService, caller: Caller, fast_obs):
        self._policy = policy
        self._caller = caller
        self._shape, self._dtype = fast_obs or (None, None)
        self._call_prepared = policy.service.call_prepared

    def __call__(self, obs, state=None, *, timeout: float | None = None) -> PolicyOutput:
        if state is None and type(obs) is np.ndarray and obs.shape == self._shape and obs.dtype == self._dtype:
            # An actor's step: PolicyService.__call__'s fast path, one call frame shorter.
            return self._call_prepared(obs, None, timeout, 0, self._caller)
        return self._policy(obs, state, timeout=timeout, caller=self._caller)

    def submit(self, obs, state=None, *, timeout: float | None = None, priority: int = 0):
        return self._policy.submit(obs, state, timeout=timeout, priority=priority, caller=self._caller)

    def pause(self) -> None:
        self._caller.pause()

    def resume(self) -> None:
        self._caller.resume()

    def close(self) -> None:
        self._caller.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class InlinePolicyCaller:
    """A caller of a PolicyService that runs its requests in its own thread (PolicyService.register
    with inline=True). `submit` still goes through the queue."""

    def __init__(self, policy: PolicyService):
        self._policy = policy
        self._call = policy._call_inline

    def __call__(self, obs, state=None, *, timeout: float | None = None) -> PolicyOutput:
        return self._call(obs, state, timeout)

    def submit(self, obs, state=None, *, timeout: float | None = None, priority: int = 0):
        return self._policy.submit(obs, state, timeout=timeout, priority=priority)

    def pause(self) -> None:
        """Nothing to pause: an inline caller never holds other callers' batches back."""

    def resume(self) -> None:
        """See pause."""

    def close(self) -> None:
        """Nothing to release: an inline caller is not a known caller of the service."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

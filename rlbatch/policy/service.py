"""PolicyService: a jit-compiled JAX policy behind a BatchedService, compiled once per bucket.

Shapes: `example_obs` is ONE observation (no batch axis). A request carries one observation of
that shape, or k observations stacked on a new leading axis (an actor with k environments).
Every batch is padded to a bucket size B (the smallest bucket >= the rows it holds), so
`apply_fn(params, obs, key)` only ever sees obs with leaves [B, ...] for B in `buckets`, and each
bucket is compiled ahead of time, when the service starts, and never again.

Randomness: batch i (counted from 0 over the service's life) runs with
    key_i = jax.random.fold_in(jax.random.PRNGKey(seed), i)
so with one caller and a fixed seed a run is reproducible.

Parameters: `update_params` validates the new tree against the current one, copies it to the
device and waits until the copy is complete, and only then publishes (params, version) as one
tuple; a batch reads that tuple once, so it never sees half-updated parameters and inference never
waits for a transfer. Versions start at 0 and only grow; every result carries the version that
produced it.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import operator
import threading
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np

from rlbatch.batching.service import BatchedService
from rlbatch.batching.collate import ArgSpec, ArrayCodec, row_selectors, to_host
from rlbatch.errors import InvalidRequest, ParamsMismatch
from rlbatch.policy.types import Policy
from rlbatch.batching.stats import ServiceStats

__all__ = ["Policy", "PolicyService", "PolicyOutput", "PolicyStats", "DEFAULT_BUCKETS"]

DEFAULT_BUCKETS = (8, 16, 32, 64, 128, 256)
_clock = time.perf_counter


class PolicyOutput(tuple):
    """One request's result: unpacks as `action, extras` (or `action, extras, state` for a
    recurrent policy); `.version` is the parameter version that produced it.

    The version is a class attribute of a subclass made once per version (`_output_class`), so a
    result is a bare tuple, with no attribute dict to allocate per row on the service's hot path.
    """

    __slots__ = ()
    version: int

    def __new__(cls, items, version):
        return tuple.__new__(_output_class(version), items)

    def __reduce__(self):
        return PolicyOutput, (tuple(self), self.version)

    action = property(lambda self: self[0])
    extras = property(lambda self: self[1])
    state = property(lambda self: self[2] if len(self) > 2 else None)

    def __repr__(self):
        return f"PolicyOutput({tuple.__repr__(self)}, version={self.version})"


_output_classes: dict = {}  # version -> PolicyOutput subclass; the newest _KEEP_CLASSES are kept
_output_classes_lock = threading.Lock()
_KEEP_CLASSES = 64


def _output_class(version: int) -> type:
    cls = _output_classes.get(version)
    if cls is None:
        with _output_classes_lock:
            cls = _output_classes.get(version)
            if cls is None:
                cls = type("PolicyOutput", (PolicyOutput,), {
                    "__slots__": (), "version": version, "__module__": __name__, "__qualname__": "PolicyOutput"})
                if len(_output_classes) >= _KEEP_CLASSES:  # results still held keep their own class
                    del _output_classes[next(iter(_output_classes))]
                _output_classes[version] = cls
    return cls


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


class _PolicyCodec(ArrayCodec):
    """ArrayCodec whose outputs are (device outputs, version), split into PolicyOutputs."""

    def __init__(self, argspec, buckets, example, check_finite):
        super().__init__(argspec, buckets, pad="repeat", example=example)
        self.check_finite = check_finite
        self.prep_time = 0.0
        self.device_time = 0.0
        self.batches = 0
        self.bucket_rows = {b: [0, 0] for b in self.buckets}  # bucket -> [valid rows, batches]

    def prepare(self, args, kwargs, rows):
        values = super().prepare(args, kwargs, rows)
        if self.check_finite:
            leaves = [values] if self._fast is not None else [leaf for leaves in values for leaf in leaves]
            for leaf in leaves:
                if leaf.dtype.kind in "fc" and not np.isfinite(leaf).all():
                    raise InvalidRequest("observation contains NaN or inf (check_finite=True refuses it)")
        return values

    def gather(self, requests, num_rows):
        t0 = _clock()
        out = super().gather(requests, num_rows)
        self.prep_time += _clock() - t0
        return out

    def scatter(self, output, requests, num_rows, ctx):
        device_out, version, stateful = output
        bucket = ctx[0]
        t0 = _clock()
        leaves, treedef = jax.tree_util.tree_flatten(device_out)
        host = treedef.unflatten(to_host(leaves))  # one transfer back per batch, never per row
        self.device_time += _clock() - t0
        self.batches += 1
        counts = self.bucket_rows[bucket]
        counts[0] += num_rows
        counts[1] += 1
        action, extras = host[0], host[1]
        keys = list(extras)
        columns = [np.asarray(extras[k]) for k in keys]
        action = np.asarray(action)
        state_leaves, state_def = jax.tree_util.tree_flatten(host[2]) if stateful else ((), None)
        if not stateful and all(r.rows is None for r in requests):
            # One row per request (actors with one environment): split each column once with
            # numpy's own iteration instead of indexing it per row, and fill the extras dicts a
            # column at a time (measured: half the time of building each row's dict from a zip).
            dicts = [{} for _ in range(num_rows)]
            for k, c in zip(keys, columns):
                for d, x in zip(dicts, c[:num_rows]):
                    d[k] = x
            make, cls = tuple.__new__, _output_class(version)
            return [make(cls, item) for item in zip(action[:num_rows], dicts)]
        results = []
        for sl in row_selectors(requests):
            items = [action[sl], dict(zip(keys, [c[sl] for c in columns]))]
            if stateful:
                items.append(state_def.unflatten([leaf[sl] for leaf in state_leaves]))
            results.append(PolicyOutput(items, version))
        return results


    @staticmethod
    def join(parts):
        # A request larger than max_batch_size ran in several batches: concatenate its rows. If a
        # parameter update fell between them, report the oldest version (the conservative lag).
        items = [tuple(p) for p in parts]
        joined = jax.tree_util.tree_map(lambda *xs: np.concatenate(xs), *items)
        return PolicyOutput(joined, min(p.version for p in parts))


def _check_buckets(buckets) -> tuple:
    """The buckets sorted and deduplicated, or ValueError/TypeError saying what came instead."""
    try:
        sizes = tuple(sorted(set(operator.index(b) for b in buckets)))
    except TypeError:
        raise TypeError(f"buckets must be a sequence of positive ints, got {buckets!r}") from None
    if not sizes or sizes[0] < 1:
        raise ValueError(f"buckets must be a non-empty sequence of positive ints, got {tuple(buckets)}")
    return sizes


def _leaf_specs(tree):
    return [(jax.tree_util.keystr(path), np.shape(x), x.dtype if hasattr(x, "dtype") else np.result_type(x))
            for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]]


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
        # One row of recurrent state, what an actor starts each episode with (None: feed-forward).
        self._example_state = None if example_state is None else jax.tree_util.tree_map(np.asarray, example_state)
        self._example_obs = jax.tree_util.tree_map(np.asarray, example_obs)
        obs_leaves, self._obs_treedef = jax.tree_util.tree_flatten(self._example_obs)
        if not obs_leaves:
            raise ValueError(f"example_obs must hold at least one array, got {example_obs!r}")
        self._obs_ndim = obs_leaves[0].ndim
        self._obs_desc = _leaf_specs(self._example_obs)
        self._publish_lock = threading.Lock()
        self._version = 0
        self._num_updates = 0
        self._current = (self._to_device(params), 0)
        # update_params checks new parameters against those that run (on the device, where
        # float64 became float32 unless x64 is on), not against the ones given here.
        self._params_treedef = jax.tree_util.tree_structure(self._current[0])
        self._params_specs = _leaf_specs(self._current[0])
        self._key = jax.device_put(jax.random.PRNGKey(seed), self.device)
        self._batch_index = 0

        self.compile_count = 0
        self._compiled = {b: self._compile(b, example_state) for b in self.buckets}

        example = (self._example_obs,) if not self._stateful else (
            self._example_obs, jax.tree_util.tree_map(np.asarray, example_state))
        batch_fn = self._batch_recurrent if self._stateful else self._batch
        self._codec = _PolicyCodec(ArgSpec(batch_fn, reserved=("num_valid",)), self.buckets, example, check_finite)
        # The call fast path takes what the codec's own fast path takes (one plain array of the
        # example's shape and dtype: feed-forward policies only), unless every row must be checked.
        self._fast_obs = None if check_finite else self._codec._fast
        batching_options.setdefault("max_batch_size", max(self.buckets))
        if max_in_flight is None:
            asynchronous = self.device.platform != "cpu" or jax.config.read("jax_cpu_enable_async_dispatch")
            max_in_flight = 2 if asynchronous else 1
        self._service = BatchedService(batch_fn, max_delay=max_delay, max_in_flight=max_in_flight, name=name,
                                       _codec=self._codec, **batching_options)
        self.max_batch_size = self._service.max_batch_size

    # ------------------------------------------------------------------ compilation

    def _compile(self, bucket: int, example_state):
        sharding = jax.sharding.SingleDeviceSharding(self.device)

        def spec(x, batch=None):
            shape = np.shape(x) if batch is None else (batch,) + np.shape(x)
            dtype = x.dtype if hasattr(x, "dtype") else np.result_type(x)
            return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

        params = jax.tree_util.tree_map(spec, self._current[0])
        obs = jax.tree_util.tree_map(lambda x: spec(x, bucket), self._example_obs)
        key = spec(self._key)
        index = jax.ShapeDtypeStruct((), np.uint32, sharding=sharding)
        if self._stateful:
            state = jax.tree_util.tree_map(lambda x: spec(np.asarray(x), bucket), example_state)

            def step(params, obs, state, key, i):
                return self.apply_fn(params, obs, state, jax.random.fold_in(key, i))

            lowered = jax.jit(step).lower(params, obs, state, key, index)
        else:
            def step(params, obs, key, i):
                return self.apply_fn(params, obs, jax.random.fold_in(key, i))

            lowered = jax.jit(step).lower(params, obs, key, index)
        self._check_outputs(lowered.out_info, bucket)
        compiled = lowered.compile()
        self.compile_count += 1
        return compiled

    def _check_outputs(self, out_info, bucket):
        want = 3 if self._stateful else 2
        what = "(action, extras, state)" if self._stateful else "(action, extras)"
        if not isinstance(out_info, (tuple, list)) or len(out_info) != want or not isinstance(out_info[1], dict):
            raise TypeError(f"apply_fn must return {what} with extras a dict, got {jax.tree_util.tree_structure(out_info)}")
        for path, leaf in jax.tree_util.tree_flatten_with_path(out_info)[0]:
            if not leaf.shape or leaf.shape[0] != bucket:
                raise TypeError(f"apply_fn output {jax.tree_util.keystr(path)} must have the batch axis first "
                                f"(leading dimension {bucket}), got shape {leaf.shape}")

    # ------------------------------------------------------------------ batches

    def _dispatch(self, args):
        t0 = _clock()
        params, version = self._current  # one read: params and version always belong together
        bucket = jax.tree_util.tree_leaves(args[0])[0].shape[0]
        i = self._batch_index
        self._batch_index += 1
        # The compiled executable copies its numpy inputs to the device itself, once per batch
        # (cheaper than a separate jax.device_put); the buffers are not reused before the batch's
        # results are back, so the copy can never see them change.
        out = self._compiled[bucket](params, *args, self._key, np.uint32(i))
        self._codec.prep_time += _clock() - t0
        return out, version, self._stateful

    def _batch(self, obs, num_valid):
        return self._dispatch((obs,))

    def _batch_recurrent(self, obs, state, num_valid):
        return self._dispatch((obs, state))

    def key_for_batch(self, i: int):
        """The PRNG key batch i runs with (see the module docstring)."""
        return jax.random.fold_in(jax.random.PRNGKey(self.seed), np.uint32(i))

    # ------------------------------------------------------------------ calling

    def _request(self, obs, state):
        """(args, is_rows): the service's arguments for one observation or a stack of k of them,
        or InvalidRequest naming what was expected and what came. (Not on the fast path.)"""
        if self._stateful:
            if state is None:
                raise InvalidRequest("this policy is recurrent: pass the caller's state with its observation, "
                                     "got state=None")
        elif state is not None:
            raise InvalidRequest(f"this policy is not recurrent (no example_state): it takes no state, "
                                 f"got a {type(state).__name__}")
        obs, rows = self._check_obs(obs)
        return ((obs, state) if self._stateful else (obs,)), rows

    def _check_obs(self, obs):
        """(obs, is_rows); shapes, dtypes and the other leaves are the codec's to check."""
        path, shape, dtype = self._obs_desc[0]
        if type(obs) is np.ndarray:
            leaf = obs
        elif self._obs_treedef.num_nodes == 1 and isinstance(obs, (list, tuple)):
            # The example is one array, so a list is that array written out (as a tree its numbers
            # would be separate leaves, and the first of them would stand for the whole).
            try:
                obs = leaf = np.asarray(obs)
            except ValueError as e:  # ragged, say
                raise InvalidRequest(f"expected an observation {dtype}{list(shape)} or a stack of k of them, "
                                     f"got a {type(obs).__name__} that does not form one array ({e})") from None
        else:
            leaves, treedef = jax.tree_util.tree_flatten(obs)
            if treedef != self._obs_treedef:
                want = f"{dtype}{list(shape)}" if not path else f"of structure {self._obs_treedef}"
                got = f"{obs!r} (no arrays)" if not leaves else f"structure {treedef}"
                raise InvalidRequest(f"expected an observation {want} or a stack of k of them, got {got}")
            leaf = leaves[0]
        nd = np.ndim(leaf)
        if nd == self._obs_ndim:
            return obs, False
        if nd == self._obs_ndim + 1:
            return obs, True
        leaf = np.asarray(leaf)
        one, stack = f"{dtype}{list(shape)}", f"{dtype}[{', '.join(['k', *map(str, shape)])}]"
        want = (f"an observation {one} or a stack of k of them {stack}" if not path else
                f"observation leaf {path} to be {one} ({stack} in a stack of k observations)")
        raise InvalidRequest(f"expected {want}, got {leaf.dtype}{list(leaf.shape)}")

    def __call__(self, obs, state=None, *, timeout: float | None = None) -> PolicyOutput:
        """`action, extras = svc(obs)`: blocks until this observation's batch ran."""
        return _call(self._service, self, obs, state, timeout, None)

    def submit(self, obs, state=None, *, timeout: float | None = None, priority: int = 0):
        """A concurrent.futures.Future of the PolicyOutput."""
        return _submit(self._service, self, obs, state, timeout, priority)

    async def acall(self, obs, state=None, *, timeout: float | None = None):
        import asyncio

        return await asyncio.wrap_future(self.submit(obs, state, timeout=timeout))

    def register(self) -> "PolicyCaller":
        """A registered caller (one per actor thread): see BatchedService.register (early flush)."""
        return PolicyCaller(self, self._service.register())

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
        for (path, shape, dtype), (_, got_shape, got_dtype) in zip(self._params_specs, _leaf_specs(params)):
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
        codec = self._codec
        batches = max(codec.batches, 1)
        padding = {b: 1.0 - valid / (b * n) for b, (valid, n) in codec.bucket_rows.items() if n}
        return PolicyStats(
            **dataclasses.asdict(base),
            compile_count=self.compile_count,
            params_version=self.version,
            num_updates=self._num_updates,
            bucket_padding=padding,
            host_prep_time=codec.prep_time,
            device_time=codec.device_time,
            mean_host_prep_time=codec.prep_time / batches,
            mean_device_time=codec.device_time / batches,
        )

    @property
    def service(self) -> BatchedService:
        return self._service

    def close(self, wait: bool = True, cancel_pending: bool = False) -> None:
        self._service.close(wait=wait, cancel_pending=cancel_pending)

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


def _call(target, policy, obs, state, timeout, caller):
    fast = policy._fast_obs
    if fast is not None and state is None and type(obs) is np.ndarray and obs.shape == fast[0] and obs.dtype == fast[1]:
        # The hot path of an actor: one plain array observation of exactly the expected shape and
        # dtype, nothing else to check (the codec's own fast path, without the layers above it).
        return policy._service._call_prepared(obs, None, _clock(), timeout, 0, caller)
    try:
        args, rows = policy._request(obs, state)
    except InvalidRequest:
        policy._service._count_invalid()  # as the service counts those its codec refuses
        raise
    if rows:
        return target.call_rows(*args, timeout=timeout)
    return target(*args, timeout=timeout)


def _submit(target, policy, obs, state, timeout, priority):
    try:
        args, rows = policy._request(obs, state)
    except InvalidRequest as e:
        # As BatchedService.submit: invalid input gives a Future that already holds the error.
        policy._service._count_invalid()
        future = concurrent.futures.Future()
        future.set_exception(e)
        return future
    if rows:
        return target.submit_rows(*args, timeout=timeout, priority=priority)
    return target.submit(*args, timeout=timeout, priority=priority)


class PolicyCaller:
    """A registered caller of a PolicyService (see PolicyService.register); close it when done."""

    def __init__(self, policy: PolicyService, caller):
        self._policy = policy
        self._caller = caller
        self._shape, self._dtype = policy._fast_obs or (None, None)
        self._call_prepared = policy._service._call_prepared

    def __call__(self, obs, state=None, *, timeout: float | None = None) -> PolicyOutput:
        if state is None and type(obs) is np.ndarray and obs.shape == self._shape and obs.dtype == self._dtype:
            # An actor's step: `_call`'s fast path, one call frame shorter.
            return self._call_prepared(obs, None, _clock(), timeout, 0, self._caller)
        return _call(self._caller, self._policy, obs, state, timeout, self._caller)

    def submit(self, obs, state=None, *, timeout: float | None = None, priority: int = 0):
        return _submit(self._caller, self._policy, obs, state, timeout, priority)

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

"""How observations become a policy batch, and a batch's outputs become PolicyOutputs.

Shapes: `example_obs` is ONE observation (no batch axis). A request carries one observation of
that shape, or k observations stacked on a new leading axis (an actor with k environments); a
recurrent policy's request also carries the state of each of its rows.
"""
from __future__ import annotations

import threading
import time

import jax
import numpy as np

from rlbatch.batching.arrays import ArrayCollator, to_host
from rlbatch.batching.collate import ArgSpec, row_selectors
from rlbatch.errors import InvalidRequest
from rlbatch.policy.output import PolicyOutput, output_class

__all__ = ["ObservationCollator", "leaf_specs"]

_clock = time.perf_counter


def leaf_specs(tree) -> list:
    """(path, shape, dtype) of every leaf of a pytree."""
    return [(jax.tree_util.keystr(path), np.shape(x), x.dtype if hasattr(x, "dtype") else np.result_type(x))
            for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]]


class ObservationCollator(ArrayCollator):
    """An ArrayCollator for a policy's batch function, whose output is (device outputs, version):
    checks observations (and recurrent states) against the examples, and splits each batch's
    outputs into one PolicyOutput per request. Counts the host and device time it sees."""

    def __init__(self, batch_fn, buckets, example_obs, example_state, check_finite: bool):
        self.stateful = example_state is not None
        example = (example_obs,) if not self.stateful else (example_obs, example_state)
        super().__init__(ArgSpec(batch_fn, reserved=("num_valid",)), buckets, pad="repeat", example=example)
        self.check_finite = check_finite
        obs_leaves, self._obs_treedef = jax.tree_util.tree_flatten(example_obs)
        if not obs_leaves:
            raise ValueError(f"example_obs must hold at least one array, got {example_obs!r}")
        self._obs_ndim = obs_leaves[0].ndim
        self._obs_desc = leaf_specs(example_obs)
        self.prep_time = 0.0  # rows into buffers, transfer and dispatch
        self.device_time = 0.0  # waiting for the device's outputs
        self.batches = 0
        self.bucket_rows = {b: [0, 0] for b in self.buckets}  # bucket -> [valid rows, batches]
        # Batches may run in several threads at once (callers running their own, inline).
        self.counts_lock = threading.Lock()

    # ------------------------------------------------------------------ checking (caller's thread)

    def request(self, obs, state):
        """(args, is_rows): the batch function's arguments for one observation or a stack of k of
        them, or InvalidRequest naming what was expected and what came. Shapes and dtypes are
        checked next, by `prepare`."""
        if self.stateful:
            if state is None:
                raise InvalidRequest("this policy is recurrent: pass the caller's state with its observation, "
                                     "got state=None")
        elif state is not None:
            raise InvalidRequest(f"this policy is not recurrent (no example_state): it takes no state, "
                                 f"got a {type(state).__name__}")
        obs, rows = self._check_obs(obs)
        return ((obs, state) if self.stateful else (obs,)), rows

    def _check_obs(self, obs):
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

    def prepare(self, args, kwargs, rows):
        values = super().prepare(args, kwargs, rows)
        if self.check_finite:
            leaves = [values] if self.fast_spec is not None else [leaf for leaves in values for leaf in leaves]
            for leaf in leaves:
                if leaf.dtype.kind in "fc" and not np.isfinite(leaf).all():
                    raise InvalidRequest("observation contains NaN or inf (check_finite=True refuses it)")
        return values

    # ------------------------------------------------------------------ batches (worker's threads)

    def gather(self, requests, num_rows):
        t0 = _clock()
        out = super().gather(requests, num_rows)
        elapsed = _clock() - t0
        with self.counts_lock:
            self.prep_time += elapsed
        return out

    def scatter(self, output, requests, num_rows, ctx):
        device_out, version = output
        bucket = ctx[0]
        t0 = _clock()
        leaves, treedef = jax.tree_util.tree_flatten(device_out)
        host = treedef.unflatten(to_host(leaves))  # one transfer back per batch, never per row
        self.count_batch(bucket, num_rows, 0.0, _clock() - t0)
        action, extras = host[0], host[1]
        keys = list(extras)
        columns = [np.asarray(extras[k]) for k in keys]
        action = np.asarray(action)
        stateful = self.stateful
        state_leaves, state_def = jax.tree_util.tree_flatten(host[2]) if stateful else ((), None)
        if not stateful and all(r.rows is None for r in requests):
            # One row per request (actors with one environment): split each column once with
            # numpy's own iteration instead of indexing it per row, and fill the extras dicts a
            # column at a time (measured: half the time of building each row's dict from a zip).
            dicts = [{} for _ in range(num_rows)]
            for k, c in zip(keys, columns):
                for d, x in zip(dicts, c[:num_rows]):
                    d[k] = x
            make, cls = tuple.__new__, output_class(version)
            return [make(cls, item) for item in zip(action[:num_rows], dicts)]
        results = []
        for sl in row_selectors(requests):
            items = [action[sl], dict(zip(keys, [c[sl] for c in columns]))]
            if stateful:
                items.append(state_def.unflatten([leaf[sl] for leaf in state_leaves]))
            results.append(PolicyOutput(items, version))
        return results

    def count_batch(self, bucket, num_rows, prep_time, device_time):
        """Counts one batch of num_rows rows in `bucket`, and the host and device time it took."""
        with self.counts_lock:
            self.prep_time += prep_time
            self.device_time += device_time
            self.batches += 1
            counts = self.bucket_rows[bucket]
            counts[0] += num_rows
            counts[1] += 1

    @staticmethod
    def join(parts):
        # A request larger than max_batch_size ran in several batches: concatenate its rows. If a
        # parameter update fell between them, report the oldest version (the conservative lag).
        items = [tuple(p) for p in parts]
        joined = jax.tree_util.tree_map(lambda *xs: np.concatenate(xs), *items)
        return PolicyOutput(joined, min(p.version for p in parts))

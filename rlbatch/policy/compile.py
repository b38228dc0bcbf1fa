"""Ahead-of-time compilation of a policy step, once per bucket size.

Every batch is padded to a bucket B (the smallest bucket >= the rows it holds), so the policy only
ever sees observations with leaves [B, ...] for B in the buckets: each bucket is lowered and
compiled when the service starts, and never again (a compilation takes 0.3-1 s on a CPU).

Batch i (counted from 0 over the service's life) runs with the key
`jax.random.fold_in(key, i)`, so with one caller and a fixed seed a run is reproducible.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np

__all__ = ["compile_step"]


def compile_step(apply_fn: Callable, params: Any, example_obs: Any, example_state: Any, key: Any,
                 bucket: int, device: jax.Device):
    """The compiled `step(params, obs[, state], key, i) -> apply_fn(params, obs[, state], fold_in(key, i))`
    for batches of `bucket` rows on `device`. Raises TypeError when apply_fn's outputs are not
    `(action, extras)` (or `(action, extras, state)` with `example_state`) with the batch axis first."""
    sharding = jax.sharding.SingleDeviceSharding(device)

    def spec(x, batch=None):
        shape = np.shape(x) if batch is None else (batch,) + np.shape(x)
        dtype = x.dtype if hasattr(x, "dtype") else np.result_type(x)
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

    params_spec = jax.tree_util.tree_map(spec, params)
    obs_spec = jax.tree_util.tree_map(lambda x: spec(x, bucket), example_obs)
    key_spec = spec(key)
    index_spec = jax.ShapeDtypeStruct((), np.uint32, sharding=sharding)
    if example_state is not None:
        state_spec = jax.tree_util.tree_map(lambda x: spec(np.asarray(x), bucket), example_state)

        def step(params, obs, state, key, i):
            return apply_fn(params, obs, state, jax.random.fold_in(key, i))

        lowered = jax.jit(step).lower(params_spec, obs_spec, state_spec, key_spec, index_spec)
    else:
        def step(params, obs, key, i):
            return apply_fn(params, obs, jax.random.fold_in(key, i))

        lowered = jax.jit(step).lower(params_spec, obs_spec, key_spec, index_spec)
    _check_outputs(lowered.out_info, bucket, recurrent=example_state is not None)
    return lowered.compile()


def _check_outputs(out_info, bucket: int, recurrent: bool) -> None:
    want = 3 if recurrent else 2
    what = "(action, extras, state)" if recurrent else "(action, extras)"
    if not isinstance(out_info, (tuple, list)) or len(out_info) != want or not isinstance(out_info[1], dict):
        raise TypeError(f"apply_fn must return {what} with extras a dict, got {jax.tree_util.tree_structure(out_info)}")
    for path, leaf in jax.tree_util.tree_flatten_with_path(out_info)[0]:
        if not leaf.shape or leaf.shape[0] != bucket:
            raise TypeError(f"apply_fn output {jax.tree_util.keystr(path)} must have the batch axis first "
                            f"(leading dimension {bucket}), got shape {leaf.shape}")

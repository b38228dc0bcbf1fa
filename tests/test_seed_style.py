"""The seed-style batcher the benchmarks compare against: how it gathers, answers and fails."""
import threading

import jax.numpy as jnp
import numpy as np
import pytest

from experiments.lib import seed_style


def test_seed_style_batcher_gathers_and_answers_each_item(no_thread_leak):
    calls = []
    gate = threading.Event()

    def batch_fn(items):
        gate.wait(10)  # the first batch holds the worker until every item is queued
        calls.append(list(items))
        return [x * 10 for x in items]

    with seed_style.SeedStyleBatcher(batch_fn, max_batch_size=4, max_delay=0.05) as b:
        futures = [b.submit(i) for i in range(9)]
        gate.set()
        assert [f.result(10) for f in futures] == [10 * i for i in range(9)]
    # in order, at most 4 a batch, and a full 4 once the queue holds more than that
    assert [x for c in calls for x in c] == list(range(9))
    assert max(len(c) for c in calls) == 4 and b.items == 9 and b.batches == len(calls)
    assert b.mean_batch_size == pytest.approx(9 / len(calls))


def test_seed_style_batcher_errors_reach_every_caller_and_close_is_final(no_thread_leak):
    def batch_fn(items):
        raise KeyError("boom")

    b = seed_style.SeedStyleBatcher(batch_fn, max_batch_size=8, max_delay=0.001)
    with pytest.raises(KeyError, match="boom"):
        b(1)
    with pytest.raises(KeyError):
        b(2)  # the worker survived the first error
    b.close()
    b.close()  # safe twice
    with pytest.raises(RuntimeError, match="closed"):
        b.submit(3)


def test_stacked_policy_batch_pads_and_splits_rows():
    def step(params, obs, key, i):
        return obs[:, 0] * 2, {"i": jnp.full(obs.shape[0], i), "n": jnp.full(obs.shape[0], obs.shape[0])}

    batch_fn = seed_style.StackedPolicyBatch(step, None, None, pad_to=4)
    out = batch_fn([np.array([1.0, 0.0]), np.array([2.0, 0.0])])
    assert [float(a) for a, _ in out] == [2.0, 4.0]
    assert [int(e["n"]) for _, e in out] == [4, 4] and int(out[0][1]["i"]) == 0  # padded to 4, batch 0
    assert int(batch_fn([np.zeros(2)])[0][1]["i"]) == 1
    assert batch_fn.batch_sizes == {4}
    exact = seed_style.StackedPolicyBatch(step, None, None)
    exact([np.zeros(2)] * 3)
    assert exact.batch_sizes == {3}

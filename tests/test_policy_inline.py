"""Callers that run their own batches (PolicyService.register(inline=True), BatchedService.call_inline,
ActorPool(inline_policy=True)): the same results as the queue, the same refusals, faults that reach
their caller alone, and no thread hand-off at all."""
import asyncio
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rlbatch
from tests import test_actors_vector
from tests.test_actors import counter_service
from tests.test_policy import BUCKETS, buggy_apply, linear_apply, make_params, pad, sampling_apply


def _worker_started(svc) -> bool:
    service = svc.service if isinstance(svc, rlbatch.PolicyService) else svc
    return service._worker._thread is not None


@pytest.mark.parametrize("apply_fn", [linear_apply, sampling_apply], ids=["deterministic", "stochastic"])
def test_inline_calls_match_direct_apply_with_the_key_schedule_and_never_wake_the_worker(apply_fn):
    params = make_params()
    rng = np.random.default_rng(3)
    with rlbatch.PolicyService(apply_fn, params, example_obs=np.zeros(4, np.float32), buckets=BUCKETS,
                               seed=5) as svc:
        caller = svc.register(inline=True)
        sizes = list(range(1, svc.max_batch_size + 1))
        for i, n in enumerate(sizes):
            rows = rng.normal(size=(n, 4)).astype(np.float32)
            out = caller(rows)
            bucket = min(b for b in BUCKETS if b >= n)
            want_action, want_extras = apply_fn(params, pad(rows, bucket), svc.key_for_batch(i))
            np.testing.assert_array_equal(out.action, np.asarray(want_action)[:n])
            for name, value in want_extras.items():
                np.testing.assert_allclose(out.extras[name], np.asarray(value)[:n], rtol=1e-6)
            assert out.version == 0
        one = rng.normal(size=4).astype(np.float32)  # one observation, no batch axis
        action, _ = caller(one)
        want, _ = apply_fn(params, pad(one[None], BUCKETS[0]), svc.key_for_batch(len(sizes)))
        assert np.shape(action) == () and action == np.asarray(want)[0]
        stats = svc.stats
        assert stats.requests == stats.batches == len(sizes) + 1
        assert stats.rows == sum(sizes) + 1
        assert stats.compile_count == len(BUCKETS)
        assert not _worker_started(svc)
        caller.close()


def test_many_threads_calling_inline_at_once_each_get_their_own_rows_and_every_batch_counts():
    params = make_params()
    calls, threads_n = 60, 8
    wrong, errors = [], []
    with rlbatch.PolicyService(linear_apply, params, example_obs=np.zeros(4, np.float32), buckets=BUCKETS) as svc:

        def actor(a):
            caller = svc.register(inline=True)
            rng = np.random.default_rng(a)
            try:
                for _ in range(calls):
                    rows = rng.normal(size=(1 + a, 4)).astype(np.float32)
                    action, extras = caller(rows)
                    bucket = min(b for b in BUCKETS if b >= len(rows))  # the shape the service ran
                    want_action, want_extras = linear_apply(params, pad(rows, bucket), None)
                    if not (np.array_equal(action, np.asarray(want_action)[:len(rows)])
                            and np.allclose(extras["logits"], want_extras["logits"][:len(rows)], rtol=1e-6)):
                        wrong.append(a)
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=actor, args=(a,)) for a in range(threads_n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        stats = svc.stats
    assert not errors and not wrong
    assert stats.requests == stats.batches == calls * threads_n
    assert stats.rows == calls * sum(1 + a for a in range(threads_n))
    assert sum(stats.bucket_hist.values()) == calls * threads_n


def test_inline_refusals_are_the_queues_and_counted():
    with rlbatch.PolicyService(linear_apply, make_params(), example_obs=np.zeros(4, np.float32),
                               buckets=BUCKETS, check_finite=True) as svc:
        caller = svc.register(inline=True)
        for obs, match in [(np.zeros(3, np.float32), r"float32\[4\], got float32\[3\]"),
                           (np.zeros((2, 4), np.float64), r"float32\[2, 4\], got float64\[2, 4\]"),
                           (None, r"got None \(no arrays\)"),
                           (np.array([np.nan, 0, 0, 0], np.float32), "NaN or inf")]:
            with pytest.raises(rlbatch.InvalidRequest, match=match):
                caller(obs)
        assert svc.stats.invalid == 4 and svc.stats.requests == 0
        assert caller(np.zeros((2, 4), np.float32)).action.shape == (2,)  # and it serves on


def test_a_request_beyond_the_largest_bucket_is_split_through_the_queue():
    params = make_params()
    rows = np.random.default_rng(0).normal(size=(40, 4)).astype(np.float32)
    with rlbatch.PolicyService(linear_apply, params, example_obs=np.zeros(4, np.float32), buckets=BUCKETS) as svc:
        action, extras = svc.register(inline=True)(rows)
        assert svc.stats.batches == 3  # 16 + 16 + 8
    np.testing.assert_array_equal(action, np.asarray(linear_apply(params, rows, None)[0]))
    assert extras["logits"].shape == (40, 3)


def echo_apply(params, obs, key):
    return jnp.argmax(obs @ params["w"], axis=-1), {"obs": obs}


def test_inline_outputs_are_the_callers_own_even_where_the_policy_returns_its_input():
    # On the CPU an output that is the input itself may share the caller's memory: the caller
    # writing its next observations into the same array must not change a result already given.
    with rlbatch.PolicyService(echo_apply, make_params(), example_obs=np.zeros(4, np.float32),
                               buckets=BUCKETS) as svc:
        caller = svc.register(inline=True)
        for n in (BUCKETS[1], BUCKETS[1] - 1):  # a full bucket (no padding copy) and a padded one
            obs = np.arange(n * 4, dtype=np.float32).reshape(n, 4)
            out = caller(obs)
            obs[:] = -1.0
            np.testing.assert_array_equal(out.extras["obs"], np.arange(n * 4, dtype=np.float32).reshape(n, 4))
        stats = svc.stats
        assert stats.batches == 2 and stats.rows == 2 * BUCKETS[1] - 1
        assert stats.bucket_hist == {BUCKETS[1]: 2} and stats.host_prep_time > 0 and stats.device_time > 0


def test_a_failing_policy_fails_its_inline_caller_alone_and_the_service_serves_on():
    with rlbatch.PolicyService(buggy_apply, make_params(), example_obs=np.zeros(4, np.float32),
                               buckets=BUCKETS) as svc:
        caller = svc.register(inline=True)
        with pytest.raises(Exception, match="observation too large"):
            caller(np.full((2, 4), 1000, np.float32))
        assert caller(np.zeros((2, 4), np.float32)).action.shape == (2,)
        assert svc(np.zeros(4, np.float32)).version == 0  # the queued way too
        assert svc.stats.errors == 1 and svc.stats.batches == 3  # the failed request, and its batch


def test_inline_results_carry_the_version_that_produced_them_and_closing_ends_them():
    params = make_params()
    svc = rlbatch.PolicyService(linear_apply, params, example_obs=np.zeros(4, np.float32), buckets=BUCKETS)
    caller = svc.register(inline=True)
    obs = np.ones((3, 4), np.float32)
    assert caller(obs).version == 0
    new = jax.tree_util.tree_map(lambda x: x + 1.0, params)
    assert svc.update_params(new) == 1
    out = caller(obs)
    assert out.version == 1
    np.testing.assert_allclose(out.extras["logits"], np.asarray(linear_apply(new, obs, None)[1]["logits"]), rtol=1e-6)
    svc.close()
    with pytest.raises(rlbatch.ServiceClosed):
        caller(obs)


def test_recurrent_state_round_trips_inline():
    with counter_service() as svc:
        caller = svc.register(inline=True)
        state = np.zeros(3, np.int32)
        for step in range(5):
            action, extras, state = caller(np.zeros((3, 2), np.float32), state)
            np.testing.assert_array_equal(extras["count"], [step] * 3)  # counter_apply: steps so far
            np.testing.assert_array_equal(action, [step % 2] * 3)
        with pytest.raises(rlbatch.InvalidRequest, match="recurrent"):
            caller(np.zeros((3, 2), np.float32))


def test_call_inline_refuses_services_whose_batches_need_the_worker_thread():
    with rlbatch.BatchedService(lambda ctx, xs: [x + ctx for x in xs], setup=lambda: 1) as svc:
        with pytest.raises(TypeError, match="worker thread"):
            svc.call_inline([2])
        assert svc(2) == 3  # the queued way works

    async def double(xs):
        await asyncio.sleep(0)
        return [2 * x for x in xs]

    with rlbatch.BatchedService(double) as svc:
        with pytest.raises(TypeError, match="worker thread"):
            svc.call_inline([2])
    with rlbatch.BatchedService(lambda xs: [x + 1 for x in xs], max_batch_size=4) as svc:
        assert svc.call_inline([5]) == 6
        assert svc.call_inline([[1, 2, 3]], rows=3) == [2, 3, 4]
        with pytest.raises(rlbatch.InvalidRequest, match="at most max_batch_size=4 rows, got 5"):
            svc.call_inline([[1] * 5], rows=5)
        assert not _worker_started(svc)


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_actors_with_an_inline_policy_record_the_same_trajectories(kind):
    trajs, pool = test_actors_vector.run_pool(6, vector_env_fn=test_actors_vector.scripted_vector(kind),
                                              inline_policy=True)
    test_actors_vector.assert_matches_scripts(trajs)
    assert pool.inline_policy and pool.stats.env_errors == 0 and pool.envs_open == 0

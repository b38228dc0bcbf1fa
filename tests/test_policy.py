"""PolicyService: bucket equivalence, compile-once, bad input, parameter updates, recurrent state."""
import re
import threading
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rlbatch
from rlbatch.batching.arrays import _in_host_memory, to_host

BUCKETS = (4, 8, 16)


def linear_apply(params, obs, key):
    logits = obs @ params["w"] + params["b"]
    return jnp.argmax(logits, axis=-1), {"logits": logits, "value": logits.sum(-1)}


def sampling_apply(params, obs, key):
    logits = obs @ params["w"] + params["b"]
    action = jax.random.categorical(key, logits)
    logp = jax.nn.log_softmax(logits)[jnp.arange(obs.shape[0]), action]
    return action, {"log_prob": logp, "noise": jax.random.normal(key, (obs.shape[0],))}


def make_params(seed=0, dim=4, actions=3):
    rng = np.random.default_rng(seed)
    return {"w": jnp.asarray(rng.normal(size=(dim, actions)), jnp.float32),
            "b": jnp.asarray(rng.normal(size=(actions,)), jnp.float32)}


def pad(rows, bucket):
    return np.concatenate([rows, np.repeat(rows[-1:], bucket - len(rows), axis=0)])


def compile_events():
    events = []

    def listener(name, duration, **kwargs):
        if "backend_compile" in name or "compile_time" in name:
            events.append(name)

    jax.monitoring.register_event_duration_secs_listener(listener)
    return events, listener


@pytest.mark.parametrize("apply_fn", [linear_apply, sampling_apply], ids=["deterministic", "stochastic"])
def test_every_bucket_and_batch_size_matches_direct_apply(apply_fn):
    params = make_params()
    rng = np.random.default_rng(1)
    with rlbatch.PolicyService(apply_fn, params, example_obs=np.zeros(4, np.float32), buckets=BUCKETS,
                               max_delay=0.0, seed=7) as svc:
        for i, n in enumerate(range(1, svc.max_batch_size + 1)):
            rows = rng.normal(size=(n, 4)).astype(np.float32)
            action, extras = svc(rows)  # one request of n rows: one batch, bucket = smallest >= n
            bucket = min(b for b in BUCKETS if b >= n)
            want_action, want_extras = apply_fn(params, pad(rows, bucket), svc.key_for_batch(i))
            np.testing.assert_array_equal(action, np.asarray(want_action)[:n])
            assert set(extras) == set(want_extras)
            for k in extras:
                np.testing.assert_allclose(extras[k], np.asarray(want_extras[k])[:n], rtol=1e-6)
        assert svc.stats.bucket_hist == {4: 4, 8: 4, 16: 8}


def test_single_caller_with_fixed_seed_is_reproducible():
    def run():
        with rlbatch.PolicyService(sampling_apply, make_params(), example_obs=np.zeros(4, np.float32),
                                   buckets=BUCKETS, seed=3, max_delay=0.0) as svc:
            return [int(svc(np.full(4, i, np.float32)).action) for i in range(30)]

    assert run() == run()


def test_compile_count_equals_buckets_after_many_random_requests_from_many_threads():
    events, listener = compile_events()
    svc = rlbatch.PolicyService(linear_apply, make_params(), example_obs=np.zeros(4, np.float32), buckets=BUCKETS,
                                max_delay=0.001)
    assert svc.compile_count == len(BUCKETS)
    compiled_at_start = len(events)
    errors = []

    def client(seed):
        rng = np.random.default_rng(seed)
        for _ in range(150):
            k = int(rng.integers(0, 21))
            obs = rng.normal(size=(4,) if k == 0 else (k, 4)).astype(np.float32)
            action, extras = svc(obs)
            want = np.argmax(obs @ np.asarray(make_params()["w"]) + np.asarray(make_params()["b"]), axis=-1)
            if not np.array_equal(action, want):
                errors.append((seed, k))

    threads = [threading.Thread(target=client, args=(s,)) for s in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stats = svc.stats
    svc.close()
    jax.monitoring.unregister_event_duration_listener(listener)
    assert not errors
    # A request of k > 16 rows (the largest bucket) is split into parts, each queued as a request.
    expected = 0
    for s in range(16):
        rng = np.random.default_rng(s)
        for _ in range(150):
            k = int(rng.integers(0, 21))
            rng.normal(size=(4,) if k == 0 else (k, 4))
            expected += 1 if k <= 16 else -(-k // 16)
    assert stats.requests == expected
    assert svc.compile_count == len(BUCKETS)
    assert len(events) == compiled_at_start  # JAX itself compiled nothing after start


def test_bad_observation_fails_only_its_caller():
    svc = rlbatch.PolicyService(linear_apply, make_params(), example_obs=np.zeros(4, np.float32), buckets=BUCKETS,
                                max_delay=0.005)
    results = {}
    barrier = threading.Barrier(8)

    def client(i):
        obs = np.ones(4, np.float32) if i != 3 else np.ones(4, np.int32)
        barrier.wait()
        try:
            results[i] = svc(obs)
        except rlbatch.InvalidRequest as e:
            results[i] = e

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    svc.close()
    assert isinstance(results[3], rlbatch.InvalidRequest)
    assert "expected an array of dtype and shape float32[4], got int32[4]" in str(results[3])
    assert all(isinstance(results[i], rlbatch.PolicyOutput) for i in range(8) if i != 3)
    assert svc.compile_count == len(BUCKETS)


@pytest.mark.parametrize("obs, match", [
    (np.zeros(5, np.float32), r"float32\[5\]"),
    (np.zeros((2, 2, 4), np.float32), r"float32\[4\] or a stack of k of them float32\[k, 4\], got float32\[2, 2, 4\]"),
])
def test_wrong_shape_is_refused_with_expected_and_got(obs, match):
    with rlbatch.PolicyService(linear_apply, make_params(), example_obs=np.zeros(4, np.float32),
                               buckets=BUCKETS) as svc:
        with pytest.raises(rlbatch.InvalidRequest, match=match):
            svc(obs)


def _refusals(svc, obs, state=None):
    """The errors of one invalid observation through every way in: call and submit, on the
    service and on a registered caller (a refused submit gives a Future holding the error)."""
    errors = []
    with svc.register() as caller:
        for target in (svc, caller):
            with pytest.raises(rlbatch.InvalidRequest) as info:
                target(obs, state, timeout=5)
            errors.append(info.value)
            future = target.submit(obs, state, timeout=5)
            errors.append(future.exception(timeout=5))
    return errors


@pytest.mark.parametrize("obs, match", [
    (None, r"expected an observation float32\[4\] or a stack of k of them, got None \(no arrays\)"),
    ({}, r"got \{\} \(no arrays\)"),
    ({"a": np.zeros(4, np.float32)}, r"expected an observation float32\[4\].*got structure PyTreeDef\(\{'a': \*\}\)"),
    ([0.0, 0.0, 0.0, 0.0], r"expected an array of dtype and shape float32\[4\], got float64\[4\]"),  # not "[]"
    ([[0.0] * 4] * 2, r"float32\[2, 4\], got float64\[2, 4\]"),  # a list of lists is a stack
    ([[0.0] * 4, [0.0]], r"got a list that does not form one array"),
    ("abc", r"float32\[k, 4\], got <U3\[\]"),
    (np.zeros((2, 2, 4), np.float32), r"got float32\[2, 2, 4\]"),
    (np.zeros(3, np.float32), r"float32\[4\], got float32\[3\]"),
])
def test_every_invalid_observation_is_refused_the_same_way_everywhere_and_counted_once(obs, match):
    with rlbatch.PolicyService(linear_apply, make_params(), example_obs=np.zeros(4, np.float32),
                               buckets=BUCKETS) as svc:
        errors = _refusals(svc, obs)
        assert all(isinstance(e, rlbatch.InvalidRequest) for e in errors), errors
        for e in errors:
            assert re.search(match, str(e)), str(e)
        assert svc.stats.invalid == len(errors) == 4
        assert svc.stats.requests == 0  # none of them reached a batch
        assert svc(np.ones(4, np.float32)).version == 0  # and the service serves on


def test_invalid_pytree_observations_and_state_are_refused_and_counted():
    def apply_fn(params, obs, state, key):
        return obs["pos"].sum(-1), {}, state

    example = {"pos": np.zeros(3, np.float32), "scale": np.float32(1)}
    with rlbatch.PolicyService(apply_fn, {}, example_obs=example, buckets=BUCKETS,
                               example_state=np.float32(0)) as svc:
        good = {"pos": np.ones(3, np.float32), "scale": np.float32(2)}
        errors = _refusals(svc, {"pos": np.zeros((2, 2, 3), np.float32), "scale": np.float32(1)}, np.float32(0))
        assert all("expected observation leaf ['pos'] to be float32[3] (float32[k, 3] in a stack of k "
                   "observations), got float32[2, 2, 3]" in str(e) for e in errors), errors
        errors = _refusals(svc, {"pos": [1.0, 2.0, 3.0], "scale": np.float32(1)}, np.float32(0))
        assert all("got structure PyTreeDef({'pos': [*, *, *], 'scale': *})" in str(e) for e in errors), errors
        errors = _refusals(svc, good)  # no state
        assert all("recurrent" in str(e) and "got state=None" in str(e) for e in errors), errors
        assert svc.stats.invalid == 12
        assert float(svc(good, np.float32(0)).action) == 3.0


def test_check_finite_refuses_nan_only_when_asked():
    obs = np.array([np.nan, 0, 0, 0], np.float32)
    with rlbatch.PolicyService(linear_apply, make_params(), example_obs=np.zeros(4, np.float32),
                               buckets=BUCKETS) as svc:
        svc(obs)  # passed through by default
    with rlbatch.PolicyService(linear_apply, make_params(), example_obs=np.zeros(4, np.float32),
                               buckets=BUCKETS, check_finite=True) as svc:
        with pytest.raises(rlbatch.InvalidRequest, match="NaN or inf"):
            svc(obs)
        assert svc(np.zeros(4, np.float32)).version == 0


def _refuse_large(x):
    if (x > 100).any():
        raise ValueError("policy bug: observation too large")
    return x


def buggy_apply(params, obs, key):
    """linear_apply, except that it raises at run time (on the host) for an observation above 100."""
    checked = jax.pure_callback(_refuse_large, jax.ShapeDtypeStruct(obs.shape, obs.dtype), obs)
    return linear_apply(params, checked, key)


def test_apply_fn_error_at_run_time_reaches_callers_and_service_keeps_serving():
    with rlbatch.PolicyService(buggy_apply, make_params(), example_obs=np.zeros(4, np.float32),
                               buckets=BUCKETS, max_delay=0.0) as svc:
        with pytest.raises(Exception, match="observation too large"):
            svc(np.full(4, 1000, np.float32))
        action, _ = svc(np.zeros(4, np.float32))
        assert svc.stats.errors == 1


def test_update_params_under_load_versions_monotone_and_never_mixed():
    def apply_fn(params, obs, key):
        n = obs.shape[0]
        return jnp.zeros(n, jnp.int32), {"a": jnp.broadcast_to(params["a"], (n,)) + 0 * obs[:, 0],
                                         "b": jnp.broadcast_to(params["b"], (n,))}

    svc = rlbatch.PolicyService(apply_fn, {"a": jnp.float32(0), "b": jnp.float32(0)},
                                example_obs=np.zeros(2, np.float32), buckets=BUCKETS, max_delay=0.0005)
    stop = threading.Event()
    seen = {i: [] for i in range(8)}

    def client(i):
        while not stop.is_set():
            out = svc(np.zeros(2, np.float32))
            seen[i].append((out.version, float(out.extras["a"]), float(out.extras["b"])))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    versions = [svc.update_params({"a": jnp.float32(v), "b": jnp.float32(v)}) for v in range(1, 60)]
    stop.set()
    for t in threads:
        t.join()
    svc.close()
    assert versions == list(range(1, 60))
    assert svc.stats.num_updates == 59 and svc.stats.params_version == 59
    for results in seen.values():
        assert results
        vs = [v for v, _, _ in results]
        assert vs == sorted(vs)  # never backwards
        for v, a, b in results:
            assert a == b == v  # one parameter set, the one its version names


def test_results_keep_their_version_across_many_updates_and_survive_pickle_and_copy():
    import copy
    import pickle

    from rlbatch.policy import output as policy_module

    params = make_params()
    with rlbatch.PolicyService(linear_apply, params, example_obs=np.zeros(4, np.float32), buckets=BUCKETS) as svc:
        kept = [svc(np.ones(4, np.float32))]
        for _ in range(policy_module.KEEP_CLASSES + 36):  # more versions than classes are cached
            svc.update_params(params)
            kept.append(svc(np.ones(4, np.float32)))
        kept.extend(svc.register()(np.ones((2, 4), np.float32)[i]) for i in range(2))
    assert [out.version for out in kept] == list(range(len(kept) - 2)) + [len(kept) - 3] * 2
    assert len(policy_module._classes) <= policy_module.KEEP_CLASSES
    first = kept[0]
    assert first.version == 0 and isinstance(first, rlbatch.PolicyOutput)  # its class outlived the cache
    assert not hasattr(first, "__dict__")  # a bare tuple: nothing allocated per result but the tuple
    for out in (first, kept[-1]):
        for twin in (pickle.loads(pickle.dumps(out)), copy.deepcopy(out), copy.copy(out)):
            assert isinstance(twin, rlbatch.PolicyOutput) and twin.version == out.version
            action, extras = twin
            assert action == out.action and extras.keys() == out.extras.keys()
    assert repr(kept[-1]).endswith(f"version={kept[-1].version})")


def test_update_params_with_wrong_tree_is_refused_and_old_params_stay():
    params = make_params()
    with rlbatch.PolicyService(linear_apply, params, example_obs=np.zeros(4, np.float32), buckets=BUCKETS) as svc:
        with pytest.raises(rlbatch.ParamsMismatch, match=r"\['w'\] expected float32\[4, 3\], got float32\[4, 2\]"):
            svc.update_params({"w": jnp.zeros((4, 2)), "b": jnp.zeros(3)})
        with pytest.raises(rlbatch.ParamsMismatch, match="structure"):
            svc.update_params({"w": jnp.zeros((4, 3))})
        with pytest.raises(rlbatch.ParamsMismatch, match="float16"):
            svc.update_params({"w": jnp.zeros((4, 3), jnp.float16), "b": jnp.zeros(3)})
        assert svc.version == 0
        np.testing.assert_array_equal(svc.params["w"], params["w"])
        assert svc(np.ones(4, np.float32)).version == 0


def test_update_params_checks_against_the_params_as_they_run_on_the_device():
    assert not jax.config.read("jax_enable_x64")  # float64 parameters run as float32
    p64 = {"w": np.ones((4, 3)), "b": np.zeros(3)}  # numpy's default float64
    with rlbatch.PolicyService(linear_apply, p64, example_obs=np.zeros(4, np.float32), buckets=BUCKETS) as svc:
        assert {k: v.dtype for k, v in svc.params.items()} == {"w": np.float32, "b": np.float32}
        assert svc.update_params(svc.params) == 1  # what runs is accepted back
        learned = jax.tree_util.tree_map(lambda x: x * 2, svc.params)  # a JAX learner's float32 output
        assert svc.update_params(learned) == 2
        np.testing.assert_array_equal(svc(np.ones(4, np.float32)).extras["logits"], [8.0] * 3)
        assert svc.update_params({"w": np.full((4, 3), 3.0), "b": np.zeros(3)}) == 3  # float64 still works
        assert svc.params["w"].dtype == np.float32
        np.testing.assert_array_equal(svc(np.ones(4, np.float32)).extras["logits"], [12.0] * 3)
        with pytest.raises(rlbatch.ParamsMismatch, match=r"\['b'\] expected float32\[3\], got float16\[3\]"):
            svc.update_params({"w": np.ones((4, 3), np.float32), "b": np.zeros(3, np.float16)})
        with pytest.raises(rlbatch.ParamsMismatch, match=r"\['w'\] expected float32\[4, 3\], got int64\[4, 3\]"):
            svc.update_params({"w": np.ones((4, 3), np.int64), "b": np.zeros(3, np.float32)})
        assert svc.version == 3


def test_bad_buckets_and_max_batch_size_beyond_the_largest_bucket_are_refused_before_compiling():
    traced = []

    def apply_fn(params, obs, key):
        traced.append(obs.shape)
        return linear_apply(params, obs, key)

    def make(**kwargs):
        return rlbatch.PolicyService(apply_fn, make_params(), example_obs=np.zeros(4, np.float32), **kwargs)

    with pytest.raises(ValueError, match=r"the largest bucket must hold max_batch_size=8 rows, got buckets \(4,\)"):
        make(buckets=(4,), max_batch_size=8)
    for buckets in [(), (0, 4), (-4,)]:
        with pytest.raises(ValueError, match=r"buckets must be a non-empty sequence of positive ints, got"):
            make(buckets=buckets)
    for buckets in [8, (2.5, 4)]:
        with pytest.raises(TypeError, match=r"buckets must be a sequence of positive ints, got"):
            make(buckets=buckets)
    with pytest.raises(ValueError, match="example_obs must hold at least one array, got None"):
        rlbatch.PolicyService(apply_fn, make_params(), example_obs=None, buckets=(4,))
    assert traced == []  # refused before anything was compiled
    with make(buckets=(4, 8), max_batch_size=4, max_delay=0.0) as svc:  # smaller than a bucket: fine
        assert svc(np.ones((6, 4), np.float32)).action.shape == (6,)  # split over two batches
        assert svc.stats.batches == 2


def test_recurrent_counter_state_round_trip():
    def counter_apply(params, obs, state, key):
        new_state = {"count": state["count"] + 1, "total": state["total"] + obs.sum(-1)}
        return state["count"], {"total": new_state["total"]}, new_state

    example_state = {"count": np.int32(0), "total": np.float32(0)}
    svc = rlbatch.PolicyService(counter_apply, {}, example_obs=np.zeros(2, np.float32), buckets=BUCKETS,
                                example_state=example_state, max_delay=0.002)
    out = {}

    def actor(i):
        state = example_state
        seen = []
        for step in range(10):
            action, extras, state = svc(np.full(2, i, np.float32), state)
            seen.append(int(action))
        out[i] = (seen, state)

    threads = [threading.Thread(target=actor, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with pytest.raises(rlbatch.InvalidRequest, match="recurrent"):
        svc(np.zeros(2, np.float32))
    svc.close()
    for i, (seen, state) in out.items():
        assert seen == list(range(10))
        assert int(state["count"]) == 10 and float(state["total"]) == pytest.approx(10 * 2 * i)


def test_pytree_observations_and_multi_row_requests():
    def apply_fn(params, obs, key):
        v = obs["pos"].sum(-1) * obs["scale"]
        return (v > 0).astype(jnp.int32), {"v": v}

    example = {"pos": np.zeros(3, np.float32), "scale": np.float32(1)}
    with rlbatch.PolicyService(apply_fn, {}, example_obs=example, buckets=BUCKETS, max_delay=0.0) as svc:
        action, extras = svc({"pos": np.ones(3, np.float32), "scale": np.float32(2)})
        assert int(action) == 1 and float(extras["v"]) == 6.0
        rows = {"pos": -np.ones((5, 3), np.float32), "scale": np.ones(5, np.float32)}
        action, extras = svc(rows)
        assert action.shape == (5,) and extras["v"].tolist() == [-3.0] * 5


def test_output_without_batch_axis_is_rejected_at_start():
    with pytest.raises(TypeError, match="batch axis first"):
        rlbatch.PolicyService(lambda p, o, k: (jnp.int32(0), {}), {}, example_obs=np.zeros(2, np.float32),
                              buckets=(4,))


def test_stats_report_policy_fields():
    with rlbatch.PolicyService(linear_apply, make_params(), example_obs=np.zeros(4, np.float32),
                               buckets=BUCKETS, max_delay=0.0) as svc:
        svc(np.zeros((3, 4), np.float32))
        st = svc.stats
    assert st.compile_count == 3 and st.bucket_padding == {4: 0.25}
    assert st.host_prep_time > 0 and st.device_time > 0 and st.batches == 1


def test_pipelining_only_where_dispatch_is_asynchronous():
    def make():
        return rlbatch.PolicyService(linear_apply, make_params(), example_obs=np.zeros(4, np.float32), buckets=(4,))

    before = jax.config.read("jax_cpu_enable_async_dispatch")
    try:
        jax.config.update("jax_cpu_enable_async_dispatch", True)
        with make() as svc:
            assert svc.service.max_in_flight == 2  # the device returns before it has computed
            action, _ = svc(np.ones(4, np.float32))
        jax.config.update("jax_cpu_enable_async_dispatch", False)
        with make() as svc:
            assert svc.service.max_in_flight == 1  # the computation ends inside the call
            action2, _ = svc(np.ones(4, np.float32))
        assert action == action2
    finally:
        jax.config.update("jax_cpu_enable_async_dispatch", before)


def test_to_host_reads_cpu_arrays_directly_and_starts_copies_elsewhere():
    class Offhost:  # stands for an accelerator array: its copy must be started before it is read
        started = 0

        def __init__(self, value):
            self.value = value
            self.device = types.SimpleNamespace(platform="gpu")

        def copy_to_host_async(self):
            Offhost.started += 1

        def __array__(self, dtype=None, copy=None):
            return np.asarray(self.value, dtype)

    cpu = jax.devices("cpu")[0]
    on_cpu = [jax.device_put(np.arange(3), cpu), jax.device_put(np.ones((2, 2), np.float32), cpu)]
    assert _in_host_memory(on_cpu[0]) and not _in_host_memory(np.arange(3))
    got = to_host(on_cpu + [np.zeros(1)])
    assert all(type(g) is np.ndarray for g in got)
    np.testing.assert_array_equal(got[0], np.arange(3))
    got = to_host([Offhost(np.arange(2)), Offhost(np.ones(2))])
    assert Offhost.started == 2
    np.testing.assert_array_equal(got[0], np.arange(2))

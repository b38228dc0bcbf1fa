"""RaggedCollator: variable-length feature dicts padded per key into (rows, length) buckets."""
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rlbatch
from rlbatch.batching import RaggedCollator

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


class Recorder:
    """A batch function that keeps a copy of every call's arguments and returns `ids` as it came."""

    def __init__(self):
        self.calls = []

    def __call__(self, features, num_valid, **kw):
        self.calls.append(({k: v.copy() for k, v in features.items()},
                           {k: v.copy() for k, v in kw.items()}, num_valid))
        return features["ids"]


def one_batch(collator, items, fn=None, **options):
    """Runs `items` (single requests) as one batch: they are all queued before the worker starts."""
    fn = fn or Recorder()
    svc = rlbatch.BatchedService(fn, collator=collator, max_delay=0, start=False, **options)
    futures = [svc.submit(item) for item in items]
    svc.start()
    svc.close()
    return fn, futures


def three_items():
    return [
        {"ids": np.array([1, 2, 3], np.int32), "vec": np.array([[1, 1], [2, 2], [3, 3]], np.float32)},
        {"ids": np.array([4], np.int32), "vec": np.array([[4, 4]], np.float32)},
        {"ids": np.array([5, 6], np.int32), "vec": np.array([[5, 5], [6, 6]], np.float32)},
    ]


# --------------------------------------------------------------------------- padding, lengths, mask

P = -1  # the pad value of "ids"
Q = 0.5  # the pad value of "vec"

EXPECTED = {
    # B = 4 (the row bucket for 3 rows), L = 4 (the length bucket for the longest item, 3);
    # row 3 repeats row 2.
    "right": dict(
        ids=[[1, 2, 3, P], [4, P, P, P], [5, 6, P, P], [5, 6, P, P]],
        vec=[[[1, 1], [2, 2], [3, 3], [Q, Q]],
             [[4, 4], [Q, Q], [Q, Q], [Q, Q]],
             [[5, 5], [6, 6], [Q, Q], [Q, Q]],
             [[5, 5], [6, 6], [Q, Q], [Q, Q]]],
        mask=[[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0]],
    ),
    "left": dict(
        ids=[[P, 1, 2, 3], [P, P, P, 4], [P, P, 5, 6], [P, P, 5, 6]],
        vec=[[[Q, Q], [1, 1], [2, 2], [3, 3]],
             [[Q, Q], [Q, Q], [Q, Q], [4, 4]],
             [[Q, Q], [Q, Q], [5, 5], [6, 6]],
             [[Q, Q], [Q, Q], [5, 5], [6, 6]]],
        mask=[[0, 1, 1, 1], [0, 0, 0, 1], [0, 0, 1, 1], [0, 0, 1, 1]],
    ),
}


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_arrays_lengths_and_mask_per_side_with_per_key_pad_values(side):
    collator = RaggedCollator(pad_value={"ids": P, "vec": Q}, side=side, buckets=(2, 4, 8),
                              length_buckets=(4, 8), pass_mask=True)
    fn, futures = one_batch(collator, three_items())
    [(features, kw, num_valid)] = fn.calls
    want = EXPECTED[side]
    assert list(features) == ["ids", "vec"]
    assert features["ids"].dtype == np.int32 and features["vec"].dtype == np.float32
    np.testing.assert_array_equal(features["ids"], np.array(want["ids"], np.int32))
    np.testing.assert_array_equal(features["vec"], np.array(want["vec"], np.float32))
    assert kw["lengths"].dtype == np.int32 and kw["mask"].dtype == bool
    np.testing.assert_array_equal(kw["lengths"], [3, 1, 2, 2])
    np.testing.assert_array_equal(kw["mask"], np.array(want["mask"], bool))
    assert num_valid == 3
    # Each request gets its own row, padded length axis and all; the repeated row is not returned.
    for f, row in zip(futures, want["ids"]):
        np.testing.assert_array_equal(f.result(), row)


def test_one_pad_value_for_every_feature_and_zero_for_features_not_named():
    for pad_value, want_ids, want_vec in [(7, 7, 7.0), ({"vec": 9.0}, 0, 9.0)]:
        fn, futures = one_batch(RaggedCollator(pad_value=pad_value), three_items()[:2])
        [(features, kw, num_valid)] = fn.calls
        assert features["ids"][1, 1:].tolist() == [want_ids, want_ids]
        assert np.all(features["vec"][1, 1:] == want_vec)


def test_without_buckets_shapes_are_exact_rows_and_longest_item():
    fn, futures = one_batch(RaggedCollator(), three_items()[1:])
    [(features, kw, num_valid)] = fn.calls
    assert features["ids"].shape == (2, 2) and features["vec"].shape == (2, 2, 2)
    assert num_valid == 2 and set(kw) == {"lengths"}
    np.testing.assert_array_equal(kw["lengths"], [1, 2])


def test_generated_mask_matches_a_tokenizer_attention_mask_padded_with_zero():
    items = [{"input_ids": np.arange(1, n + 1, dtype=np.int32), "attention_mask": np.ones(n, np.int32)}
             for n in (5, 1, 3)]
    for side in ("right", "left"):
        fn, _ = one_batch(RaggedCollator(pad_value={"input_ids": 0}, side=side, length_buckets=(8,),
                                         pass_lengths=False, pass_mask=True), items)
        [(features, kw, _)] = fn.calls
        assert set(kw) == {"mask"} and features["input_ids"].shape == (3, 8)
        np.testing.assert_array_equal(features["attention_mask"], kw["mask"].astype(np.int32))
        assert features["input_ids"][kw["mask"]].tolist() == [1, 2, 3, 4, 5, 1, 1, 2, 3]


def test_no_lengths_and_no_mask_calls_fn_with_features_and_num_valid_only():
    fn, futures = one_batch(RaggedCollator(pass_lengths=False), three_items()[:1])
    assert fn.calls[0][1] == {} and fn.calls[0][2] == 1
    np.testing.assert_array_equal(futures[0].result(), [1, 2, 3])


def test_length_zero_items():
    items = [{"ids": np.zeros(0, np.int32)}, {"ids": np.array([3], np.int32)}]
    fn, futures = one_batch(RaggedCollator(length_buckets=(2,), trim_outputs=True), items)
    np.testing.assert_array_equal(fn.calls[0][1]["lengths"], [0, 1])
    assert futures[0].result().shape == (0,)
    np.testing.assert_array_equal(futures[1].result(), [3])


# --------------------------------------------------------------------------- outputs

@pytest.mark.parametrize("side", ["right", "left"])
def test_trim_outputs_cuts_each_row_to_its_item_and_splits_pytrees(side):
    def fn(features, lengths, num_valid):
        x = features["vec"].sum(axis=2)  # [B, L]
        return {"per_position": x, "doubled": features["vec"] * 2}

    collator = RaggedCollator(side=side, buckets=(4,), length_buckets=(8,), trim_outputs=True)
    _, futures = one_batch(collator, three_items(), fn=fn)
    for f, item in zip(futures, three_items()):
        out = f.result()
        np.testing.assert_array_equal(out["per_position"], item["vec"].sum(axis=1))
        np.testing.assert_array_equal(out["doubled"], item["vec"] * 2)


def test_output_without_length_axis_is_split_by_rows_and_refused_by_trim_outputs():
    def pooled(features, lengths, num_valid):
        return features["vec"].sum(axis=(1, 2)) / np.maximum(lengths, 1)

    _, futures = one_batch(RaggedCollator(buckets=(4,)), three_items(), fn=pooled)
    assert [float(f.result()) for f in futures] == [4.0, 8.0, 11.0]
    _, futures = one_batch(RaggedCollator(buckets=(4,), trim_outputs=True), three_items(), fn=pooled)
    for f in futures:
        with pytest.raises(rlbatch.BatchOutputError, match=r"trim_outputs=True needs outputs of shape "
                                                           r"\[B, L, \.\.\.\] = \[4, 3, \.\.\.\], got .*\[4\]"):
            f.result()


def test_output_with_wrong_leading_axis_fails_the_batch():
    _, futures = one_batch(RaggedCollator(buckets=(4,)), three_items(),
                           fn=lambda features, lengths, num_valid: features["ids"][:num_valid])
    with pytest.raises(rlbatch.BatchOutputError, match=r"row count B=4 \(num_valid=3\), got .*\[3, 3\]"):
        futures[0].result()


def test_output_aliasing_a_reused_buffer_is_not_overwritten_by_the_next_batch():
    svc = rlbatch.BatchedService(lambda features, lengths, num_valid: features,
                                 collator=RaggedCollator(buckets=(2,), length_buckets=(4,)), max_delay=0)
    first = svc({"ids": np.array([1, 2], np.int32)})
    second = svc({"ids": np.array([3], np.int32)})  # the same (B, L): the same buffers
    svc.close()
    np.testing.assert_array_equal(first["ids"], [1, 2, 0, 0])
    np.testing.assert_array_equal(second["ids"], [3, 0, 0, 0])


def test_outputs_reach_their_own_callers_from_many_threads():
    def fn(features, lengths, num_valid):
        return features["ids"] * 10

    svc = rlbatch.BatchedService(fn, collator=RaggedCollator(side="left", buckets=(2, 4, 8), length_buckets=(4, 16),
                                                             trim_outputs=True), max_delay=0.001)
    wrong = []

    def caller(k):
        rng = np.random.default_rng(k)
        for _ in range(25):
            ids = rng.integers(0, 1000, size=rng.integers(0, 17)).astype(np.int32)
            out = svc(ids=ids)  # the features as keyword arguments
            if out.tolist() != (ids * 10).tolist():
                wrong.append((k, ids, out))

    threads = [threading.Thread(target=caller, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert svc.stats.requests == 150
    svc.close()
    assert wrong == []


# --------------------------------------------------------------------------- refused items

def test_refused_items_fail_alone_while_the_rest_of_the_batch_runs():
    collator = RaggedCollator(buckets=(8,), length_buckets=(4,),
                              example={"ids": np.zeros(0, np.int32), "vec": np.zeros((0, 2), np.float32)})
    good = three_items()
    bad = [
        ({"ids": np.array([1], np.int32), "vec": np.zeros((1, 3), np.float32)},
         r"feature 'vec': expected float32\[T, 2\] \(T: any length\), got float32\[1, 3\]"),
        ({"ids": np.array([1], np.int64), "vec": np.zeros((1, 2), np.float32)},
         r"feature 'ids': expected int32\[T\] \(T: any length\), got int64\[1\]"),
        ({"ids": np.array([1], np.int32)},
         r"expected features \['ids', 'vec'\], got \['ids'\] \(missing \['vec'\], unexpected \[\]\)"),
        ({"ids": np.array([1, 2], np.int32), "vec": np.zeros((3, 2), np.float32)},
         r"feature 'vec': expected length 2 \(as feature 'ids'; .*\), got 3"),
        ({"ids": np.arange(5, dtype=np.int32), "vec": np.zeros((5, 2), np.float32)},
         r"expected an item of at most 4 positions \(the largest length bucket\), got length 5"),
        ({"ids": np.int32(1), "vec": np.zeros((1, 2), np.float32)},
         r"feature 'ids': expected int32\[T\] \(T: any length\), got int32\[\]"),
        ([1, 2, 3], r"expected an item: a dict of features \{name: sequence\}, got list"),
    ]
    items = [good[0], bad[0][0], good[1], *[b for b, _ in bad[1:]], good[2]]
    fn, futures = one_batch(collator, items)
    [(features, kw, num_valid)] = fn.calls
    assert num_valid == 3
    np.testing.assert_array_equal(kw["lengths"][:3], [3, 1, 2])
    results = [futures[0], futures[2], futures[-1]]
    for f, want in zip(results, [[1, 2, 3, 0], [4, 0, 0, 0], [5, 6, 0, 0]]):
        np.testing.assert_array_equal(f.result(), want)
    refused = [futures[1], *futures[3:-1]]
    for f, (_, message) in zip(refused, bad):
        with pytest.raises(rlbatch.InvalidRequest, match=message):
            f.result()


def test_lists_are_converted_to_the_feature_dtype_only_without_loss():
    collator = RaggedCollator(example={"ids": np.zeros(0, np.int32), "x": np.zeros(0, np.float32)})
    _, futures = one_batch(collator, [{"ids": [1, 2], "x": [0.1, 2]}, {"ids": [1.5], "x": [1.0]},
                                      {"ids": [2 ** 40], "x": [1.0]}, {"ids": [[1], [2]], "x": [1.0, 2.0]}])
    np.testing.assert_array_equal(futures[0].result(), np.array([1, 2], np.int32))
    with pytest.raises(rlbatch.InvalidRequest, match=r"expected int32\[T\] .*got float64\[1\]"):
        futures[1].result()
    with pytest.raises(rlbatch.InvalidRequest, match=r"expected int32\[T\] .*got int64\[1\]"):
        futures[2].result()
    with pytest.raises(rlbatch.InvalidRequest, match=r"expected int32\[T\] .*got int32\[2, 1\]"):
        futures[3].result()


def test_first_item_fixes_the_features_when_no_example_is_given():
    collator = RaggedCollator()
    _, futures = one_batch(collator, [{"a": np.zeros(2, np.float32)}, {"a": np.zeros(2, np.float64)}])
    assert collator.features == {"a": ((), np.dtype(np.float32), 0.0)}
    with pytest.raises(rlbatch.InvalidRequest, match=r"feature 'a': expected float32\[T\]"):
        futures[1].result()


def test_bad_settings_are_refused_when_the_collator_is_made():
    with pytest.raises(ValueError, match=r"side must be one of \('right', 'left'\), got 'middle'"):
        RaggedCollator(side="middle")
    with pytest.raises(ValueError, match="length_buckets must be a sequence of positive integers"):
        RaggedCollator(length_buckets=(0, 4))
    with pytest.raises(ValueError, match=r"pad value -1 cannot fill feature 'ids' of dtype uint8"):
        RaggedCollator(pad_value=-1, example={"ids": np.zeros(0, np.uint8)})
    with pytest.raises(ValueError, match=r"pad_value names features \['idz'\] that the example does not have"):
        RaggedCollator(pad_value={"idz": 1}, example={"ids": np.zeros(0, np.int32)})
    with pytest.raises(ValueError, match=r"feature 'ids' of the example: expected a sequence \[T, \.\.\.\]"):
        RaggedCollator(example={"ids": np.int32(0)})


def test_a_pad_value_that_does_not_fit_the_first_item_fails_that_request():
    svc = rlbatch.BatchedService(Recorder(), collator=RaggedCollator(pad_value=np.nan), max_delay=0)
    with pytest.raises(rlbatch.InvalidRequest, match=r"pad value nan cannot fill feature 'ids' of dtype int32"):
        svc({"ids": np.array([1], np.int32)})
    np.testing.assert_array_equal(svc({"ids": np.array([1.0], np.float32)}), [1.0])
    assert svc.stats.invalid == 1
    svc.close()


# --------------------------------------------------------------------------- multi-row requests

def test_multi_row_requests_return_one_result_per_item_and_are_split_and_joined():
    items = [{"ids": np.arange(n, dtype=np.int32) + 1} for n in (3, 1, 4, 2, 5)]
    fn = Recorder()
    collator = RaggedCollator(buckets=(2, 4), length_buckets=(4, 8), trim_outputs=True)
    svc = rlbatch.BatchedService(fn, collator=collator, max_batch_size=2, max_delay=0)
    out = svc.call_rows(items)  # 5 rows over batches of at most 2, reassembled in order
    assert [o.tolist() for o in out] == [it["ids"].tolist() for it in items]
    assert [c[2] for c in fn.calls] == [2, 2, 1]
    assert [c[0]["ids"].shape for c in fn.calls] == [(2, 4), (2, 4), (2, 8)]
    with pytest.raises(rlbatch.InvalidRequest, match=r"item 1 of 2: feature 'ids': expected int32\[T\]"):
        svc.call_rows([items[0], {"ids": np.zeros(1, np.float32)}])
    with pytest.raises(rlbatch.InvalidRequest, match="a multi-row request takes one list of items"):
        svc.call_rows(items[0])
    with pytest.raises(rlbatch.InvalidRequest, match="at least one row"):
        svc.call_rows([])
    svc.close()


def test_multi_row_and_single_requests_share_a_batch():
    items = three_items()
    fn = Recorder()
    svc = rlbatch.BatchedService(fn, collator=RaggedCollator(buckets=(4,)), max_delay=0, start=False)
    rows = svc.submit_rows([items[0], items[2]])
    single = svc.submit(items[1])
    svc.start()
    svc.close()
    assert len(fn.calls) == 1 and fn.calls[0][2] == 3
    assert [r.tolist() for r in rows.result()] == [[1, 2, 3], [5, 6, 0]]
    assert single.result().tolist() == [4, 0, 0]


# --------------------------------------------------------------------------- jit: one compile per (B, L)

def test_jitted_function_compiles_once_per_rows_and_length_bucket():
    @jax.jit
    def masked_sum(features, mask):
        return jnp.where(mask, features["ids"], 0).sum(axis=1)

    shapes = []

    def fn(features, mask, num_valid):
        shapes.append(features["ids"].shape)
        return masked_sum(features, mask)

    compiles = []

    def listener(event, duration, **kwargs):
        if event == COMPILE_EVENT:
            compiles.append(event)

    collator = RaggedCollator(side="left", buckets=(2, 4), length_buckets=(4, 8, 16), pass_lengths=False,
                              pass_mask=True, example={"ids": np.zeros(0, np.int32)})
    svc = rlbatch.BatchedService(fn, collator=collator, max_delay=0)
    rng = np.random.default_rng(0)

    def run(lengths):
        items = [{"ids": rng.integers(-50, 50, size=n).astype(np.int32)} for n in lengths]
        out = svc.call_rows(items)
        assert [int(o) for o in out] == [int(it["ids"].sum()) for it in items]

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        for rows in (1, 3):  # B = 2 and 4
            for longest in (3, 8, 16):  # L = 4, 8 and 16
                run([longest] + [0] * (rows - 1))
        assert sorted(set(shapes)) == [(2, 4), (2, 8), (2, 16), (4, 4), (4, 8), (4, 16)]
        assert len(compiles) == 6
        for _ in range(60):
            run(rng.integers(0, 17, size=rng.integers(1, 5)).tolist())
        futures = svc.submit_many({"ids": rng.integers(0, 9, size=n).astype(np.int32)}
                                  for n in rng.integers(0, 17, size=40))
        for f in futures:
            f.result()
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
        svc.close()
    assert len(shapes) > 70 and len(set(shapes)) == 6
    assert len(compiles) == 6

"""rlbatch.compat.batched.inference and aio.inference: feature rows, padded per feature (numpy only)."""
import asyncio

import numpy as np
import pytest

from rlbatch.compat import batched
from rlbatch.compat.batched.inference.helper import stack_features

NEVER_MS = 600_000.0  # a delay no test reaches: batches go when full


def identity(seen=None):
    def fn(features):
        if seen is not None:
            seen.append({k: v.copy() for k, v in features.items()})
        return features["ids"]

    return fn


def together(processor, *calls):
    """Runs the calls (feature dicts) as concurrent awaits on an aio processor."""

    async def main():
        return await asyncio.gather(*[processor(c) for c in calls])

    return asyncio.run(main())


def test_a_call_is_a_batch_of_rows_and_gets_its_rows_back_stacked():
    f = batched.inference.dynamically(lambda feats: feats["ids"] * 2, batch_size=4, timeout_ms=1.0)
    out = f(ids=np.array([[1, 2, 3], [4, 5, 6]]))
    np.testing.assert_array_equal(out, [[2, 4, 6], [8, 10, 12]])
    np.testing.assert_array_equal(f({"ids": np.array([[7, 8, 9]])}), [[14, 16, 18]])
    f.shutdown()


def test_rows_of_different_lengths_are_padded_right_by_default_with_each_features_pad_token():
    seen = []
    f = batched.inference.ModelBatchProcessor(identity(seen), batch_size=2, timeout_ms=NEVER_MS,
                                              pad_tokens={"ids": 9})
    out = f(ids=[np.array([1, 2, 3]), np.array([4])], mask=[np.array([1, 1, 1]), np.array([1])])
    np.testing.assert_array_equal(out, [[1, 2, 3], [4, 9, 9]])
    np.testing.assert_array_equal(seen[0]["mask"], [[1, 1, 1], [1, 0, 0]])  # not named: pads with 0
    assert f.pad_tokens == {"ids": 9} and f.padding_side == "right"
    f.shutdown()


def test_left_padding_puts_the_pad_before_each_row():
    f = batched.aio.inference.dynamically(identity(), batch_size=2, timeout_ms=NEVER_MS, padding_side="left",
                                          pad_tokens={"ids": 0})
    short, long_ = together(f, {"ids": np.array([[4, 5]])}, {"ids": np.array([[1, 2, 3]])})
    np.testing.assert_array_equal(short, [[0, 4, 5]])  # callers share the batch's padded length
    np.testing.assert_array_equal(long_, [[1, 2, 3]])
    f.shutdown()


def test_the_rows_of_one_call_may_go_in_several_batches():
    seen = []
    f = batched.aio.inference.AsyncModelBatchProcessor(identity(seen), batch_size=3, timeout_ms=1.0)
    out = asyncio.run(f(ids=np.arange(8).reshape(4, 2)))
    np.testing.assert_array_equal(out, np.arange(8).reshape(4, 2))
    assert [len(b["ids"]) for b in seen] == [3, 1]
    assert (f.stats.total_batches, f.stats.total_processed) == (2, 4)
    assert f.pad_tokens == {}
    f.shutdown()


def test_dtypes_are_kept():
    f = batched.inference.dynamically(identity(), batch_size=2, timeout_ms=1.0)
    out = f(ids=np.array([[0.5, 1.75]], dtype=np.float32))
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, [[0.5, 1.75]])
    f.shutdown()


def test_dict_and_list_outputs_come_back_per_caller():
    def two_outputs(features):
        return {"double": features["ids"] * 2, "sum": features["ids"].sum(axis=1)}

    f = batched.aio.inference.dynamically(two_outputs, batch_size=2, timeout_ms=NEVER_MS)
    a, b = together(f, {"ids": np.array([[1, 2]])}, {"ids": np.array([[3, 4]])})
    np.testing.assert_array_equal(a["double"], [[2, 4]])
    np.testing.assert_array_equal(b["sum"], [7])
    g = batched.inference.dynamically(lambda feats: [feats["ids"], feats["ids"] + 1], batch_size=2, timeout_ms=1.0)
    first, second = g(ids=np.array([[1], [2]]))
    np.testing.assert_array_equal(second, [[2], [3]])
    f.shutdown()
    g.shutdown()


def test_spread_kwargs_passes_features_as_keyword_arguments():
    f = batched.inference.dynamically(lambda ids, mask: ids * mask, batch_size=2, timeout_ms=1.0,
                                      spread_kwargs=True)
    np.testing.assert_array_equal(f(ids=np.array([[3, 4]]), mask=np.array([[1, 0]])), [[3, 0]])
    f.shutdown()


def test_pad_token_is_accepted_as_the_readmes_spelling_of_pad_tokens():
    f = batched.inference.dynamically(identity(), batch_size=2, timeout_ms=NEVER_MS, pad_token={"ids": 7})
    np.testing.assert_array_equal(f(ids=[np.array([1, 2]), np.array([3])]), [[1, 2], [3, 7]])
    f.shutdown()
    with pytest.raises(TypeError, match="not both"):
        batched.inference.dynamically(identity(), pad_token={"ids": 7}, pad_tokens={"ids": 7})


def test_errors_and_wrong_row_counts_reach_the_caller_instead_of_hanging():
    def fail(features):
        raise ValueError("Test error")

    f = batched.inference.dynamically(fail, batch_size=2, timeout_ms=1.0)
    with pytest.raises(ValueError, match="Test error"):
        f(ids=np.array([[1]]))
    g = batched.inference.dynamically(lambda feats: feats["ids"][:1], batch_size=2, timeout_ms=NEVER_MS)
    with pytest.raises(ValueError):  # batched left the second row's caller waiting forever
        g(ids=np.array([[1], [2]]))
    f.shutdown()
    g.shutdown()


def test_acall_on_the_thread_inference_processor():
    f = batched.inference.dynamically(lambda feats: feats["ids"] + 1, batch_size=3, timeout_ms=1.0)
    out = asyncio.run(f.acall(ids=np.arange(5).reshape(5, 1)))
    np.testing.assert_array_equal(out, np.arange(1, 6).reshape(5, 1))
    f.shutdown()


def test_stack_features_pads_per_key_on_either_side():
    rows = [{"ids": np.array([1, 2, 3]), "mask": np.array([1, 1, 1])},
            {"ids": np.array([4]), "mask": np.array([1])}]
    right = stack_features(rows, {"ids": 9})
    np.testing.assert_array_equal(right["ids"], [[1, 2, 3], [4, 9, 9]])
    np.testing.assert_array_equal(right["mask"], [[1, 1, 1], [1, 0, 0]])
    left = stack_features(rows, {"ids": 9}, padding_side="left")
    np.testing.assert_array_equal(left["ids"], [[1, 2, 3], [9, 9, 4]])

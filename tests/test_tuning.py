"""suggest_settings: hand-made sweep rows whose right answer is worked out by hand."""
import dataclasses
import json

import numpy as np
import pytest

import rlbatch
from experiments.lib.tuning import SweepRow, expected_padding, suggest_settings


def row(steps_per_s, p99_ms, max_delay, hist, buckets=(8, 16, 32, 64), **extra):
    total = sum(hist.values())
    return SweepRow(steps_per_s=steps_per_s, latency_p99_ms=p99_ms, max_delay=max_delay, buckets=buckets,
                    mean_batch=sum(int(k) * v for k, v in hist.items()) / total, batch_size_hist=hist, **extra)


ROWS = [
    row(30_000, 12.0, 0.004, {64: 90, 60: 10}, env="E"),  # the fastest, and over a 5 ms budget
    row(20_000, 4.0, 0.002, {12: 4, 16: 95, 40: 1}),  # 99 of 100 batches have <= 16 rows
    row(10_000, 1.0, 0.0005, {4: 100}),
]


def padded_fraction(hist, buckets, max_batch_size):
    """Reference: every batch in the smallest bucket >= its rows; larger than the max: split."""
    valid = padded = 0
    for size, count in hist.items():
        full, rest = divmod(size, max_batch_size)
        runs = [max_batch_size] * full + ([rest] if rest else [])
        valid += count * size
        padded += count * sum(min(b for b in buckets if b >= r) for r in runs)
    return (padded - valid) / padded


def test_sweep_tooling_is_not_part_of_the_library():
    assert "suggest_settings" not in rlbatch.__all__ and not hasattr(rlbatch, "suggest_settings")


def test_budget_excludes_the_fastest_row():
    s = suggest_settings(ROWS, latency_budget_ms=5.0)
    assert (s.row_index, s.steps_per_s, s.latency_p99_ms, s.max_delay) == (1, 20_000, 4.0, 0.002)
    assert s.rows_over_budget == 1 and s.row is ROWS[1]
    # p99 of the batch sizes is 16 (the one batch of 40 is above it): max_batch_size 16, not 64
    assert s.batch_size_quantile == 16 and s.max_batch_size == 16
    assert s.buckets == (8, 16)
    # 40 rows run as 16 + 16 + 8: (64 + 1520 + 40 padded to 1624) vs 1608 valid rows
    assert s.expected_padding == pytest.approx(16 / 1624)
    assert "row 1" in s.reason and "row 0" in s.reason and "over the budget" in s.reason


def test_a_wider_budget_takes_the_fastest_row():
    s = suggest_settings(ROWS, latency_budget_ms=20.0)
    assert s.row_index == 0 and s.max_delay == 0.004 and s.rows_over_budget == 0
    assert s.max_batch_size == 64 and s.buckets == (8, 16, 32, 64)
    assert s.expected_padding == pytest.approx(40 / 6400)  # the ten batches of 60 pad to 64
    assert "env E" in s.reason


def test_equal_throughput_prefers_the_lower_p99():
    rows = [row(1000, 3.0, 0.002, {8: 1}), row(1000, 2.0, 0.001, {8: 1})]
    assert suggest_settings(rows, 5.0).row_index == 1


def test_padding_bound_holds_with_buckets_added_at_observed_sizes():
    hist = {3: 1, 33: 40, 37: 30, 40: 20, 45: 9}  # p99 45 -> max_batch_size 64
    assert padded_fraction(hist, (8, 16, 32, 64), 64) > 0.25  # powers of two alone pad too much
    for bound in (0.25, 0.1, 0.0):
        s = suggest_settings([row(100, 1.0, 0.001, hist)], 5.0, max_padding=bound)
        assert s.max_batch_size == 64 and s.buckets[-1] == 64 and list(s.buckets) == sorted(set(s.buckets))
        assert {8, 16, 32, 64} <= set(s.buckets)
        assert set(s.buckets) - {8, 16, 32, 64} <= set(hist)  # added buckets are batch sizes seen
        assert s.expected_padding == pytest.approx(padded_fraction(hist, s.buckets, 64))
        assert s.expected_padding <= bound


def test_padding_bound_holds_for_random_histograms():
    rng = np.random.default_rng(0)
    for _ in range(200):
        sizes = rng.integers(1, 300, size=rng.integers(1, 12))
        hist = {int(k): int(c) for k, c in zip(sizes, rng.integers(1, 50, size=sizes.size))}
        s = suggest_settings([row(1.0, 1.0, 0.002, hist)], 5.0)
        m = s.max_batch_size
        assert m & (m - 1) == 0 and m >= s.batch_size_quantile and m < 2 * s.batch_size_quantile
        assert s.buckets[-1] == m
        assert s.expected_padding <= 0.25
        assert s.expected_padding == pytest.approx(padded_fraction(hist, s.buckets, m))


def test_rows_from_json_have_string_keys():
    record = dict(steps_per_s=100, latency_p99_ms=1.0, max_delay=0.001, buckets=[8, 16], mean_batch=14.7,
                  batch_size_hist={"16": 10, "8": 2}, env="E", padding_fraction=0.0)  # other keys are ignored
    measured = SweepRow.from_json(record)
    assert measured == SweepRow(max_delay=0.001, buckets=(8, 16), mean_batch=14.7, latency_p99_ms=1.0,
                                steps_per_s=100.0, batch_size_hist={16: 10, 8: 2}, env="E")
    s = suggest_settings([measured], 5.0)
    assert s.max_batch_size == 16 and s.buckets == (8, 16) and s.expected_padding == 0.0
    d = s.as_dict()
    assert d["buckets"] == [8, 16] and d["row"]["env"] == "E" and d["row"]["batch_size_hist"] == {16: 10, 8: 2}
    assert json.loads(json.dumps(d))["row"]["batch_size_hist"] == {"16": 10, "8": 2}


def test_no_row_fits_names_the_smallest_p99():
    with pytest.raises(ValueError, match=r"no configuration's p99 latency fits the budget of 0.5 ms; "
                                         r"the smallest p99 seen was 1 ms \(row 2"):
        suggest_settings(ROWS, latency_budget_ms=0.5)


def test_bad_input_is_named():
    record = dataclasses.asdict(ROWS[0])
    del record["batch_size_hist"]
    with pytest.raises(ValueError, match="row 3 lacks batch_size_hist"):
        SweepRow.from_json(record, 3)
    with pytest.raises(TypeError, match=r"row 1: expected a SweepRow .* got dict"):
        suggest_settings([ROWS[0], dataclasses.asdict(ROWS[1])], 5.0)
    with pytest.raises(ValueError, match="at least one measured row"):
        suggest_settings([], 5.0)
    with pytest.raises(ValueError, match="latency_budget_ms must be a positive number"):
        suggest_settings(ROWS, 0)


def test_expected_padding_of_uniform_sizes_over_the_default_buckets():
    # sizes 1..256, one batch each, over buckets 8..256: 10816 padded rows in 43712 (as bench_policy's check)
    hist = {k: 1 for k in range(1, 257)}
    assert expected_padding(hist, rlbatch.DEFAULT_BUCKETS) == pytest.approx(10816 / 43712)

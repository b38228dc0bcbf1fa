"""Service statistics: counters written by the worker, read as frozen snapshots.

Only the service's worker thread writes the recorder, so the hot path takes no lock for it;
`snapshot()` copies numbers that may be one batch apart, which is what a monitor wants.
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Mapping

import numpy as np

__all__ = ["ServiceStats", "StatsRecorder"]

_WINDOW = 8192  # recent samples kept for each latency quantile


@dataclasses.dataclass(frozen=True)
class ServiceStats:
    """A frozen snapshot of a BatchedService's counters. Times are in seconds."""

    requests: int  # requests accepted by submit (a multi-row request counts once)
    rows: int  # rows those requests carried
    batches: int  # batch function calls
    mean_batch_size: float  # valid rows per batch
    batch_size_hist: Mapping[int, int]  # valid rows -> number of batches
    bucket_hist: Mapping[int, int]  # padded size -> number of batches (bucketed services)
    padding_fraction: float  # padded rows / all rows passed to the function
    queue_wait_p50: float
    queue_wait_p99: float
    run_time_p50: float  # batch function (and result split) time per batch
    run_time_p99: float
    latency_p50: float  # request latency: submit to result ready
    latency_p99: float
    errors: int  # requests that failed with an error from the batch function or its output
    invalid: int  # requests refused for their inputs (wrong arguments, shape, dtype)
    cancelled: int  # requests cancelled before they ran
    timed_out: int  # requests whose deadline passed before they ran
    rejected: int  # submits refused: queue full, or service closed
    pending: int  # requests waiting in the queue at snapshot time
    in_flight: int  # batches dispatched and not yet completed
    # Why each batch went: "full" (max_batch_size rows), "callers" (every known caller waited:
    # early flush), "delay" (its oldest request waited max_delay), "closing" (the queue drained).
    batch_triggers: Mapping[str, int] = dataclasses.field(default_factory=dict)
    known_callers: int = 0  # callers counted towards early flush at snapshot time
    processing_time_total: float = 0.0  # seconds in batches: collation, the function, the split
    processing_time_mean: float = 0.0  # per batch

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["batch_size_hist"] = {int(k): int(v) for k, v in self.batch_size_hist.items()}
        d["bucket_hist"] = {int(k): int(v) for k, v in self.bucket_hist.items()}
        d["batch_triggers"] = dict(self.batch_triggers)
        return d


def _quantile(samples, q: float) -> float:
    if not samples:
        return float("nan")
    return float(np.quantile(np.fromiter(samples, dtype=np.float64, count=len(samples)), q))


class StatsRecorder:
    """Mutable counters behind ServiceStats; written by the worker thread only."""

    def __init__(self, max_batch_size: int):
        self.requests = 0
        self.rows = 0
        self.padded_rows = 0
        self.errors = 0
        self.invalid = 0
        self.cancelled = 0
        self.timed_out = 0
        self.rejected = 0
        self.size_hist = np.zeros(max_batch_size + 1, dtype=np.int64)
        self.bucket_hist: dict[int, int] = {}
        self.queue_waits: collections.deque = collections.deque(maxlen=_WINDOW)
        self.run_times: collections.deque = collections.deque(maxlen=_WINDOW)
        self.latencies: collections.deque = collections.deque(maxlen=_WINDOW)
        self.triggers = {"full": 0, "callers": 0, "delay": 0, "closing": 0}
        self.processing_time = 0.0

    def grow(self, max_batch_size: int) -> None:
        """Makes room in the size histogram for batches of up to max_batch_size rows."""
        if max_batch_size + 1 > self.size_hist.size:
            hist = np.zeros(max_batch_size + 1, dtype=np.int64)
            hist[:self.size_hist.size] = self.size_hist
            self.size_hist = hist

    def record_batch(self, valid: int, padded: int | None, run_time: float) -> None:
        """`padded` is the bucket the batch was padded to, None for a service without buckets."""
        self.padded_rows += valid if padded is None else padded
        self.size_hist[valid] += 1
        if padded is not None:
            # Replacing the dict (not mutating it) keeps a concurrent snapshot's iteration safe.
            hist = dict(self.bucket_hist)
            hist[padded] = hist.get(padded, 0) + 1
            self.bucket_hist = hist
        self.run_times.append(run_time)
        self.processing_time += run_time

    def snapshot(self, pending: int, in_flight: int, known_callers: int = 0) -> ServiceStats:
        hist = self.size_hist.copy()
        batches = int(hist.sum())
        valid = int((hist * np.arange(hist.size)).sum())
        padded = self.padded_rows
        return ServiceStats(
            requests=self.requests,
            rows=self.rows,
            batches=batches,
            mean_batch_size=valid / batches if batches else 0.0,
            batch_size_hist={int(i): int(c) for i, c in enumerate(hist) if c},
            bucket_hist=dict(self.bucket_hist),
            padding_fraction=(padded - valid) / padded if padded > valid else 0.0,
            queue_wait_p50=_quantile(list(self.queue_waits), 0.5),
            queue_wait_p99=_quantile(list(self.queue_waits), 0.99),
            run_time_p50=_quantile(list(self.run_times), 0.5),
            run_time_p99=_quantile(list(self.run_times), 0.99),
            latency_p50=_quantile(list(self.latencies), 0.5),
            latency_p99=_quantile(list(self.latencies), 0.99),
            errors=self.errors,
            invalid=self.invalid,
            cancelled=self.cancelled,
            timed_out=self.timed_out,
            rejected=self.rejected,
            pending=pending,
            in_flight=in_flight,
            batch_triggers=dict(self.triggers),
            known_callers=known_callers,
            processing_time_total=self.processing_time,
            processing_time_mean=self.processing_time / batches if batches else 0.0,
        )

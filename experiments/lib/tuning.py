"""Settings from a short measured sweep: max_batch_size, max_delay and buckets for a p99 budget.

    rows = [SweepRow.from_json(r, i) for i, r in enumerate(json.load(f)["rows"])]  # throughput.py's JSON
    s = suggest_settings(rows, latency_budget_ms=5.0)
    PolicyService(apply, params, example_obs=obs, buckets=s.buckets, max_delay=s.max_delay,
                  max_batch_size=s.max_batch_size)
    print(s.reason)

A `SweepRow` is one measured configuration: the max_delay and buckets it ran with, and what it
reached (steps/s, p99 latency, mean batch and the batch-size histogram); env, num_actors and
envs_per_actor, when given, are named in the reasoning.

The rule: among the rows whose p99 latency fits the budget, take the one with the most steps/s
(ties: the lower p99) and keep its max_delay. max_batch_size is the `quantile` (0.99) of its batch
sizes, counted per batch, rounded up to a power of two: rarer, larger batches are split, so they
cost a little throughput, not a bigger compiled shape. Buckets are the powers of two from
`smallest_bucket` up to max_batch_size; while the padding expected for the row's batch sizes
exceeds `max_padding`, the observed batch size that lowers it most is added as a bucket (each
added bucket is one more compilation at start, so only as many as the bound needs).

Padding is counted as PolicyService counts it: padded rows / rows passed to the policy, a batch of
s rows running in the smallest bucket >= s, and a batch larger than max_batch_size as full
batches of max_batch_size plus the rest.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterable, Mapping, Optional, Sequence

__all__ = ["SweepRow", "Suggestion", "expected_padding", "suggest_settings"]

_REQUIRED = ("max_delay", "buckets", "mean_batch", "latency_p99_ms", "steps_per_s", "batch_size_hist")


@dataclasses.dataclass(frozen=True)
class SweepRow:
    """One measured configuration of a sweep (a row of experiments/throughput.py's JSON)."""

    max_delay: float  # seconds the configuration ran with
    buckets: tuple[int, ...]
    mean_batch: float  # mean valid rows per batch
    latency_p99_ms: float  # p99 request latency
    steps_per_s: float  # the throughput it reached
    batch_size_hist: Mapping[int, int] = dataclasses.field(hash=False)  # valid rows per batch -> batches
    env: Optional[str] = None
    num_actors: Optional[int] = None
    envs_per_actor: Optional[int] = None

    @classmethod
    def from_json(cls, record: Mapping[str, Any], index: int = 0) -> "SweepRow":
        """The row of a JSON record (row `index` of its file, for messages); other keys are ignored.

        JSON writes the histogram's sizes as strings; they become ints here.
        """
        missing = [k for k in _REQUIRED if k not in record]
        if missing:
            raise ValueError(f"SweepRow.from_json: row {index} lacks {', '.join(missing)} (a row needs "
                             f"{', '.join(_REQUIRED)})")
        return cls(max_delay=float(record["max_delay"]), buckets=tuple(int(b) for b in record["buckets"]),
                   mean_batch=float(record["mean_batch"]), latency_p99_ms=float(record["latency_p99_ms"]),
                   steps_per_s=float(record["steps_per_s"]),
                   batch_size_hist={int(k): int(v) for k, v in dict(record["batch_size_hist"]).items()},
                   env=record.get("env"), num_actors=record.get("num_actors"),
                   envs_per_actor=record.get("envs_per_actor"))


@dataclasses.dataclass(frozen=True)
class Suggestion:
    """Suggested service settings and how they were reached (see the module docstring)."""

    max_batch_size: int
    max_delay: float  # seconds
    buckets: tuple[int, ...]
    expected_padding: float  # padded rows / rows, for the chosen row's batch sizes and these buckets
    row_index: int  # which row of the input was chosen
    row: SweepRow = dataclasses.field(hash=False)  # that row (its histogram is a dict: not hashed)
    steps_per_s: float  # the chosen row's throughput
    latency_p99_ms: float  # the chosen row's p99 latency
    latency_budget_ms: float
    batch_size_quantile: int  # the chosen row's `quantile` batch size, before rounding up
    rows_over_budget: int
    reason: str

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["buckets"] = list(self.buckets)
        return d


def _hist(row_index: int, hist: Mapping) -> dict[int, int]:
    out: dict[int, int] = {}
    for size, count in dict(hist).items():
        size, count = int(size), int(count)
        if size < 1 or count < 0:
            raise ValueError(f"suggest_settings: row {row_index}: batch_size_hist expected positive sizes and "
                             f"counts >= 0, got {size}: {count}")
        if count:
            out[size] = out.get(size, 0) + count
    return out


def _quantile(hist: Mapping[int, int], q: float) -> int:
    """The smallest batch size s with at least a fraction q of the batches of size <= s."""
    total = sum(hist.values())
    seen = 0
    for size in sorted(hist):
        seen += hist[size]
        if seen >= q * total:
            return size
    return max(hist)


def expected_padding(batch_size_hist: Mapping, buckets: Iterable[int], max_batch_size: int | None = None) -> float:
    """Padded rows / rows passed to the policy, for batches of the histogram's sizes in `buckets`.

    A batch of s rows runs in the smallest bucket >= s; with max_batch_size (default: the largest
    bucket), a larger batch runs as full batches of max_batch_size and one of the rest.
    """
    sizes = sorted(set(int(b) for b in buckets))
    if not sizes or sizes[0] < 1:
        raise ValueError(f"expected_padding: buckets must be positive ints, got {list(buckets)}")
    largest = sizes[-1] if max_batch_size is None else int(max_batch_size)
    if largest > sizes[-1]:
        raise ValueError(f"expected_padding: max_batch_size {largest} exceeds the largest bucket {sizes[-1]}")
    valid = padded = 0
    for size, count in batch_size_hist.items():
        size, count = int(size), int(count)
        full, rest = divmod(size, largest)
        run = full * _bucket_for(largest, sizes) + (_bucket_for(rest, sizes) if rest else 0)
        valid += count * size
        padded += count * run
    return (padded - valid) / padded if padded else 0.0


def _bucket_for(rows: int, sizes: Sequence[int]) -> int:
    return next(b for b in sizes if b >= rows)


def _rows(n: int) -> str:
    return f"{n} row" if n == 1 else f"{n} rows"


def _describe(row: SweepRow) -> str:
    parts = [f"{k} {getattr(row, k)}" for k in ("env", "num_actors", "envs_per_actor") if getattr(row, k) is not None]
    parts.append(f"max_delay {1e3 * row.max_delay:g} ms")
    parts.append(f"buckets {tuple(int(b) for b in row.buckets)}")
    return ", ".join(parts)


def suggest_settings(rows: Sequence[SweepRow], latency_budget_ms: float, *, max_padding: float = 0.25,
                     quantile: float = 0.99, smallest_bucket: int = 8) -> Suggestion:
    """max_batch_size, max_delay and buckets for a p99 latency budget, from measured rows.

    Raises TypeError for a row that is not a SweepRow, ValueError when no row's p99 latency fits
    the budget (the message names the smallest p99 seen).
    """
    if not (isinstance(latency_budget_ms, (int, float)) and latency_budget_ms > 0 and math.isfinite(latency_budget_ms)):
        raise ValueError(f"suggest_settings: latency_budget_ms must be a positive number of milliseconds, "
                         f"got {latency_budget_ms!r}")
    if not 0 <= max_padding < 1:
        raise ValueError(f"suggest_settings: max_padding must be in [0, 1), got {max_padding!r}")
    if not 0 < quantile <= 1:
        raise ValueError(f"suggest_settings: quantile must be in (0, 1], got {quantile!r}")
    rows = list(rows)
    if not rows:
        raise ValueError("suggest_settings: expected at least one measured row, got none")
    for i, row in enumerate(rows):
        if not isinstance(row, SweepRow):
            raise TypeError(f"suggest_settings: row {i}: expected a SweepRow (SweepRow.from_json reads a JSON "
                            f"record), got {type(row).__name__}")

    p99s = [r.latency_p99_ms for r in rows]
    fits = [i for i, p in enumerate(p99s) if p <= latency_budget_ms]  # NaN (no requests) never fits
    if not fits:
        seen = [(p, i) for i, p in enumerate(p99s) if not math.isnan(p)]
        smallest = (f"the smallest p99 seen was {min(seen)[0]:.3g} ms (row {min(seen)[1]}: {_describe(rows[min(seen)[1]])})"
                    if seen else "no row has a p99 latency")
        raise ValueError(f"suggest_settings: no configuration's p99 latency fits the budget of "
                         f"{latency_budget_ms:g} ms; {smallest}. Raise the budget, or measure smaller "
                         f"max_delay values or fewer environments per batch")
    best = max(fits, key=lambda i: (rows[i].steps_per_s, -p99s[i]))
    row = rows[best]
    hist = _hist(best, row.batch_size_hist)
    if not hist:
        raise ValueError(f"suggest_settings: row {best} ({_describe(row)}) has no batches in its batch_size_hist")

    size_q = _quantile(hist, quantile)
    max_batch_size = 1 << (size_q - 1).bit_length()  # the power of two >= size_q
    buckets = {b for b in (1 << k for k in range(max_batch_size.bit_length()))
               if min(smallest_bucket, max_batch_size) <= b <= max_batch_size}
    padding = expected_padding(hist, buckets, max_batch_size)
    # Candidates: the row counts batches actually run with (a larger batch's rest after splitting).
    candidates = {s if s <= max_batch_size else s % max_batch_size for s in hist} - {0}
    while padding > max_padding:
        candidates -= buckets
        # Never empty here: with every run size a bucket, nothing is padded.
        add = min(candidates, key=lambda s: (expected_padding(hist, buckets | {s}, max_batch_size), s))
        buckets.add(add)
        padding = expected_padding(hist, buckets, max_batch_size)
    buckets_t = tuple(sorted(buckets))

    over = len(rows) - len(fits)
    fastest = max(range(len(rows)), key=lambda i: rows[i].steps_per_s)
    excluded = ""
    if fastest not in fits:
        excluded = (f"; the fastest row overall, row {fastest} ({rows[fastest].steps_per_s:,.0f} steps/s), "
                    f"is over the budget at p99 {p99s[fastest]:.3g} ms")
    reason = (f"row {best} ({_describe(row)}) has the most steps/s ({row.steps_per_s:,.0f}) of the "
              f"{_rows(len(fits))} whose p99 latency fits {latency_budget_ms:g} ms (p99 {p99s[best]:.3g} ms; "
              f"{_rows(over)} over the budget{excluded}). Its {quantile:.0%} batch size is {size_q} rows (mean "
              f"{row.mean_batch:.1f}), rounded up to max_batch_size {max_batch_size}; buckets "
              f"{buckets_t} pad {padding:.1%} of rows for its batch sizes (bound {max_padding:.0%}).")
    return Suggestion(max_batch_size=max_batch_size, max_delay=row.max_delay, buckets=buckets_t,
                      expected_padding=padding, row_index=best, row=row, steps_per_s=row.steps_per_s,
                      latency_p99_ms=p99s[best], latency_budget_ms=float(latency_budget_ms),
                      batch_size_quantile=size_q, rows_over_budget=over, reason=reason)

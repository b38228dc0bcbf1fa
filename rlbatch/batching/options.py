"""Checks of a BatchedService's options: each refusal names the option, what it must be and what came."""
from __future__ import annotations

__all__ = ["check_max_batch_size", "check_options", "check_positive_int", "check_seconds"]


def check_positive_int(name: str, value, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        more = " or None" if allow_none else ""
        raise ValueError(f"{name} must be a positive int{more}, got {value!r}")


def check_seconds(name: str, value) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name} must be a number of seconds >= 0, got {value!r}")


def check_max_batch_size(value, buckets) -> None:
    check_positive_int("max_batch_size", value)
    if buckets and max(buckets) < value:
        raise ValueError(f"the largest bucket must hold max_batch_size={value} rows, got buckets {tuple(buckets)}")


def check_options(*, max_batch_size, buckets, max_delay, on_full, max_queue, max_in_flight, wake_width,
                  starvation_timeout, idle_horizon, small_batch_threshold) -> None:
    check_max_batch_size(max_batch_size, buckets)
    check_seconds("max_delay", max_delay)
    if on_full not in ("block", "raise"):
        raise ValueError(f'on_full must be "block" or "raise", got {on_full!r}')
    check_positive_int("max_queue", max_queue, allow_none=True)
    check_positive_int("max_in_flight", max_in_flight)
    check_positive_int("wake_width", wake_width, allow_none=True)
    check_seconds("starvation_timeout", starvation_timeout)
    check_seconds("idle_horizon", idle_horizon)
    if small_batch_threshold is not None and (
            not isinstance(small_batch_threshold, int) or isinstance(small_batch_threshold, bool)
            or small_batch_threshold < 0):
        raise ValueError(f"small_batch_threshold must be an int >= 0 or None, got {small_batch_threshold!r}")

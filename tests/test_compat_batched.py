"""rlbatch.compat.batched (thread and aio processors): batched 0.1.5's public behaviour.

Batches are made deterministic without timing: either `timeout_ms` is so long that only a full
batch goes, or the batch function holds the worker on an Event while the next calls queue.
"""
import asyncio
import threading

import numpy as np
import pytest

from rlbatch.compat import batched
from rlbatch.compat.batched.types import BatchProcessorStats, CacheStats, PriorityStrategy
from rlbatch.errors import BatchOutputError

NEVER_MS = 600_000.0  # a delay no test reaches: batches go when full


def recording(batches, fn=lambda x: x * 2):
    def batch_fn(items):
        batches.append(list(items))
        return [fn(x) for x in items]

    return batch_fn


class Gate:
    """A batch function whose first batch holds the worker until `open()`."""

    def __init__(self):
        self.batches, self.entered, self.released = [], threading.Event(), threading.Event()

    def __call__(self, items):
        self.batches.append(list(items))
        if len(self.batches) == 1:
            self.entered.set()
            assert self.released.wait(30), "the test never opened the gate"
        return list(items)

    def open(self):
        self.released.set()


# ---------------------------------------------------------------------------- thread processor

def test_one_item_gives_one_result_and_a_list_gives_a_list():
    f = batched.dynamically(recording([]), batch_size=4, timeout_ms=1.0)
    assert f(3) == 6
    assert f([1, 2, 3]) == [2, 4, 6]
    assert f([]) == []
    f.shutdown()


def test_only_a_real_list_is_many_items():
    seen = []
    f = batched.dynamically(recording(seen, fn=lambda x: x), batch_size=4, timeout_ms=1.0)
    assert f((1, 2)) == (1, 2)
    array = np.arange(3)
    assert f(array) is array
    assert f({"a": 1}) == {"a": 1}
    assert [len(b) for b in seen] == [1, 1, 1]
    f.shutdown()


def test_the_items_of_a_list_call_are_split_into_batches_of_batch_size():
    seen = []
    f = batched.BatchProcessor(recording(seen), batch_size=2, timeout_ms=NEVER_MS)
    assert f([1, 2, 3, 4]) == [2, 4, 6, 8]
    assert seen == [[1, 2], [3, 4]]
    f.shutdown()


def test_stats_is_a_snapshot_with_batcheds_names():
    f = batched.BatchProcessor(recording([]), batch_size=2, timeout_ms=NEVER_MS)
    assert f.stats == BatchProcessorStats()
    f([1, 2, 3, 4])
    s = f.stats
    assert isinstance(s, BatchProcessorStats)
    assert (s.queue_size, s.total_processed, s.total_batches, s.avg_batch_size) == (0, 4, 2, 2.0)
    assert s.avg_processing_time > 0 and s.cache_stats is None
    f([5, 6])
    assert s.total_batches == 2  # the earlier snapshot does not change
    assert f.stats.total_batches == 3
    f.shutdown()


def test_an_error_of_the_batch_function_reaches_every_caller_and_the_worker_goes_on():
    def fail_on_negative(items):
        if any(x < 0 for x in items):
            raise ValueError("Test error")
        return items

    f = batched.BatchProcessor(fail_on_negative, batch_size=2, timeout_ms=NEVER_MS)
    with pytest.raises(ValueError, match="Test error"):
        f([1, -1])
    assert f([1, 2]) == [1, 2]
    assert f.stats.total_batches == 2  # a failed batch counts, as in batched
    f.shutdown()


def test_an_output_of_the_wrong_length_fails_the_callers():
    f = batched.BatchProcessor(lambda items: items[:1], batch_size=2, timeout_ms=NEVER_MS)
    with pytest.raises(BatchOutputError):
        f([1, 2])
    f.shutdown()


def test_an_async_batch_function_works_on_the_thread_processor():
    async def double(items):
        await asyncio.sleep(0)
        return [x * 2 for x in items]

    f = batched.dynamically(double, batch_size=2, timeout_ms=NEVER_MS)
    assert f([1, 2]) == [2, 4]
    f.shutdown()


def test_acall_awaits_one_item_or_a_list():
    f = batched.dynamically(recording([]), batch_size=3, timeout_ms=NEVER_MS)

    async def main():
        return await asyncio.gather(f.acall([1, 2]), f.acall(3))

    assert asyncio.run(main()) == [[2, 4], 6]
    f.shutdown()


def test_a_small_call_goes_before_the_items_of_a_larger_one():
    gate = Gate()
    f = batched.BatchProcessor(gate, batch_size=4, timeout_ms=1.0, small_batch_threshold=2)

    async def main():
        first = asyncio.ensure_future(f.acall("first"))
        await asyncio.to_thread(gate.entered.wait, 30)
        big = asyncio.ensure_future(f.acall(list(range(6))))
        small = asyncio.ensure_future(f.acall(["s1", "s2"]))
        await asyncio.sleep(0)  # both calls have queued their items (acall queues before it awaits)
        await asyncio.sleep(0)
        gate.open()
        return await asyncio.gather(first, big, small)

    assert asyncio.run(main()) == ["first", list(range(6)), ["s1", "s2"]]
    assert gate.batches[1] == ["s1", "s2", 0, 1]
    assert gate.batches[2] == [2, 3, 4, 5]
    f.shutdown()


def test_a_call_after_shutdown_starts_a_new_worker_and_stats_keep_counting(no_thread_leak):
    f = batched.BatchProcessor(recording([]), batch_size=2, timeout_ms=NEVER_MS)
    f.start()
    assert f._running
    assert f([1, 2]) == [2, 4]
    f.shutdown()
    f.shutdown()  # twice is fine
    assert not f._running
    assert f([3, 4]) == [6, 8]
    assert f.stats.total_batches == 2
    f.shutdown()


def test_dynamically_bare_called_or_with_positional_settings_keeps_the_function_metadata():
    @batched.dynamically
    def bare(items):
        """Doubles."""
        return [x * 2 for x in items]

    def plain(items):
        return [x + 1 for x in items]

    positional = batched.dynamically(plain, 64, 5.0, 2)
    assert isinstance(bare, batched.BatchProcessor)
    assert (bare.__name__, bare.__doc__) == ("bare", "Doubles.")
    assert positional.__wrapped__ is plain
    assert (positional.batch_size, positional.timeout_ms, positional.small_batch_threshold) == (64, 5.0, 2)
    assert bare(2) == 4 and positional([1]) == [2]
    bare.shutdown()
    positional.shutdown()


def test_a_decorated_method_gets_one_processor_per_instance():
    class Model:
        def __init__(self, k):
            self.k = k

        @batched.dynamically(batch_size=2, timeout_ms=1.0)
        def scale(self, items):
            return [x * self.k for x in items]

    a, b = Model(2), Model(3)
    assert a.scale([1, 2]) == [2, 4]
    assert b.scale(1) == 3
    assert a.scale.stats.total_processed == 2 and b.scale.stats.total_processed == 1
    assert Model(5).scale(1) == 5  # a temporary instance lives until its call returns
    a.scale.shutdown()
    b.scale.shutdown()


@pytest.mark.parametrize("settings, name", [({"batch_size": 0}, "batch_size"), ({"timeout_ms": -1}, "timeout_ms"),
                                            ({"small_batch_threshold": -1}, "small_batch_threshold")])
def test_bad_settings_are_refused_by_name(settings, name):
    with pytest.raises(ValueError, match=name):
        batched.dynamically(lambda items: items, **settings)


# ---------------------------------------------------------------------------- aio processor

def test_aio_awaits_one_item_or_a_list_with_sync_or_async_functions():
    def sync_double(items):
        return [x * 2 for x in items]

    async def async_double(items):
        return [x * 2 for x in items]

    for fn in (sync_double, async_double):
        f = batched.aio.dynamically(fn, batch_size=3, timeout_ms=1.0)
        assert asyncio.run(f(2)) == 4
        assert asyncio.run(f([1, 2, 3, 4])) == [2, 4, 6, 8]
        f.shutdown()
    assert batched.aio.AsyncBatchProcessor(async_double).batch_func is async_double


def test_aio_processor_serves_several_event_loops():
    f = batched.aio.dynamically(recording([]), batch_size=2, timeout_ms=1.0)
    assert asyncio.run(f(1)) == 2
    assert asyncio.run(f([2, 3])) == [4, 6]  # batched bound the processor to the first loop

    async def from_a_thread():
        return await f(5)

    assert asyncio.run(asyncio.to_thread(asyncio.run, from_a_thread())) == 10
    f.shutdown()


def test_aio_gathered_calls_share_batches_and_stats_count_them():
    seen = []
    f = batched.aio.AsyncBatchProcessor(recording(seen), batch_size=5, timeout_ms=NEVER_MS)

    async def main():
        return await asyncio.gather(*[f(i) for i in range(10)])

    assert asyncio.run(main()) == [2 * i for i in range(10)]
    assert sorted(len(b) for b in seen) == [5, 5]
    s = f.stats
    assert (s.total_batches, s.total_processed, s.avg_batch_size) == (2, 10, 5.0)
    f.clear_stats()
    assert (f.stats.total_batches, f.stats.total_processed) == (0, 0)
    f.shutdown()


def _aio_order(strategy):
    gate = Gate()
    f = batched.aio.AsyncBatchProcessor(gate, batch_size=4, timeout_ms=1.0, small_batch_threshold=1,
                                        priority_strategy=strategy)

    async def main():
        first = asyncio.ensure_future(f("first"))
        await asyncio.to_thread(gate.entered.wait, 30)
        big = asyncio.ensure_future(f(["ccc", "a", "bb", "dddd"]))
        small = asyncio.ensure_future(f("s"))
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        gate.open()
        await asyncio.gather(first, big, small)

    asyncio.run(main())
    f.shutdown()
    return gate.batches[1:]


def test_aio_priority_strategies():
    assert _aio_order(PriorityStrategy.NONE) == [["ccc", "a", "bb", "dddd"], ["s"]]  # first come, first served
    assert _aio_order(PriorityStrategy.PRIORITY) == [["s", "ccc", "a", "bb"], ["dddd"]]
    assert _aio_order(PriorityStrategy.LENGTH) == [["s", "a", "bb", "ccc"], ["dddd"]]


class DictCache:
    def __init__(self):
        self.data, self.counts = {}, CacheStats()

    async def get(self, key):
        value = self.data.get(key)
        self.counts.update_get(hit=value is not None, time_taken=0.0)
        return value

    async def set(self, key, value):
        self.data[key] = value
        self.counts.update_set(time_taken=0.0)

    async def clear(self):
        self.data.clear()

    def stats(self):
        return self.counts


def test_aio_cache_answers_known_items_without_batching_them():
    seen, cache = [], DictCache()
    f = batched.aio.dynamically(recording(seen), batch_size=2, timeout_ms=1.0, cache=cache)
    assert asyncio.run(f([1, 2])) == [2, 4]
    assert asyncio.run(f([2, 3])) == [4, 6]
    assert sorted(x for b in seen for x in b) == [1, 2, 3]
    assert f.stats.cache_stats == CacheStats(gets=4, hits=1, sets=3)
    f.shutdown()


def test_aio_max_batch_length_is_refused_rather_than_ignored():
    with pytest.raises(NotImplementedError, match="max_batch_length"):
        batched.aio.dynamically(lambda items: items, max_batch_length=100)


def test_aio_decorated_method():
    class Model:
        @batched.aio.dynamically(batch_size=2, timeout_ms=1.0)
        async def run(self, items):
            return [(self, x) for x in items]

    m = Model()
    assert asyncio.run(m.run(1)) == (m, 1)
    m.run.shutdown()

"""BatchedService, @batched and @service: the seeds' examples, their known faults, and the contract."""
import asyncio
import concurrent.futures
import dataclasses
import gc
import sys
import threading
import time

import numpy as np
import pytest

import rlbatch
from tests.conftest import wait_until



class Gate:
    """A service of max batch 1 whose function waits for `release`, recording what it ran.

    `hold(x)` submits x and waits until the worker is inside the function with it, so that the
    requests submitted next queue up behind it.
    """

    def __init__(self, **options):
        self.release = threading.Event()
        self.ran = []
        options.setdefault("max_batch_size", 1)
        options.setdefault("max_delay", 0)
        self.svc = rlbatch.BatchedService(self._fn, **options)

    def _fn(self, xs):
        self.release.wait()
        self.ran.extend(xs)
        return xs

    def hold(self, x):
        f = self.svc.submit(x)
        wait_until(lambda: self.svc.stats.pending == 0)
        return f


# --------------------------------------------------------------------------- the seeds' examples

def test_as_a_service_square_example(capsys):
    @rlbatch.batched(max_batch_size=3, max_delay=0.1)
    def square(batch_xs):
        print("processing...", batch_xs)
        return [x_i ** 2 for x_i in batch_xs]

    futures = square.submit_many(range(10))
    print([f.result() for f in futures])
    assert square(2.0) == 4.0
    square.close()
    out = capsys.readouterr().out.splitlines()
    assert out[:5] == [
        "processing... [0, 1, 2]",
        "processing... [3, 4, 5]",
        "processing... [6, 7, 8]",
        "processing... [9]",
        "[0, 1, 4, 9, 16, 25, 36, 49, 64, 81]",
    ]


def test_as_a_service_game_threads_example():
    service = rlbatch.BatchedService(lambda xs: [x * 10 for x in xs], max_batch_size=32, max_delay=1.0)
    results = {}

    def game(i):
        results[i] = [service(i + step) for step in range(5)]

    threads = [threading.Thread(target=game, args=(i,)) for i in range(100)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    service.stop()
    assert results == {i: [10 * (i + s) for s in range(5)] for i in range(100)}


def test_ubatch_two_parameter_example(capsys):
    # uBatch's semantics: one-shot threads, batches by size or delay only. With implicit callers
    # (the default) the first thread would be a known caller waiting alone and go at once.
    @rlbatch.batched(max_batch_size=5, max_delay=1.0, implicit_callers=False)
    def squared_cube(a, mode):
        print(a)
        print(mode)
        return [x ** 2 if y == "square" else x ** 3 for x, y in zip(a, mode)]

    inputs = list(range(10))
    modes = ["square" if i % 2 == 0 else "cube" for i in inputs]
    got = {}

    def thread_function(number, mode):
        got[number] = squared_cube(number, mode)

    threads = [threading.Thread(target=thread_function, args=(i, j)) for i, j in zip(inputs, modes)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    squared_cube.close()
    assert got == {i: i ** 2 if i % 2 == 0 else i ** 3 for i in inputs}
    lines = capsys.readouterr().out.splitlines()
    batches = [eval(line) for line in lines[0::2]]
    batch_modes = [eval(line) for line in lines[1::2]]
    assert [len(b) for b in batches] == [5, 5]  # max size 5, never waiting out the 1 s delay twice
    assert sorted(x for b in batches for x in b) == inputs
    for b, m in zip(batches, batch_modes):  # each row's mode travels with its value
        assert m == ["square" if x % 2 == 0 else "cube" for x in b]


def test_ubatch_partial_binds_a_model():
    import functools

    def squared_cube(model, a, mode):
        return [(model, x ** 2 if y == "square" else x ** 3) for x, y in zip(a, mode)]

    fn = rlbatch.batched(max_batch_size=5, max_delay=0.01)(functools.partial(squared_cube, "m"))
    assert fn(3, "cube") == ("m", 27)
    fn.close()


def test_batched_single_item_and_list_calls_and_acall():
    class Embedder:
        def __init__(self, k):
            self.k = k

        @rlbatch.batched(max_batch_size=64, max_delay=0.001)
        def embed(self, items):
            return [f"{self.k}:{item * 2}" for item in items]

    e = Embedder("a")
    assert e.embed(2) == "a:4"
    assert list(e.embed.map([2, 3, 4])) == ["a:4", "a:6", "a:8"]
    assert asyncio.run(e.embed.acall(2)) == "a:4"
    assert e.embed.stats.requests == 5  # 1 + 3 + 1
    assert Embedder("b").embed(1) == "b:2"  # one service per instance
    e.embed.close()


def test_batched_fn_back_pressure_full_queue_raises_queue_full():
    gate = Gate(max_queue=2, on_full="raise")
    svc, release = gate.svc, gate.release
    first = gate.hold(0)  # the worker holds request 0 inside the function
    queued = [svc.submit(1), svc.submit(2)]
    with pytest.raises(rlbatch.QueueFull, match="max_queue=2"):
        svc.submit(3)
    release.set()
    assert [f.result() for f in [first] + queued] == [0, 1, 2]
    assert svc.stats.rejected == 1
    svc.close()


def test_back_pressure_block_waits_for_room_and_respects_timeout():
    gate = Gate(max_queue=1)
    svc, release = gate.svc, gate.release
    first = gate.hold(0)
    second = svc.submit(1)
    with pytest.raises(TimeoutError):
        svc.submit(2, timeout=0.05)  # blocks for room, then gives up at its deadline
    threading.Timer(0.05, release.set).start()
    third = svc.submit(3)  # blocks until the worker takes request 1
    assert [f.result() for f in (first, second, third)] == [0, 1, 3]
    svc.close()


# --------------------------------------------------------------------------- the seeds' faults

def test_delay_clock_starts_at_first_item_not_at_construction():
    svc = rlbatch.BatchedService(lambda xs: xs, max_batch_size=10, max_delay=0.3)
    time.sleep(0.4)  # as_a_service started its timer here and sent the first item early
    f = svc.submit(1)
    assert f.result() == 1
    assert svc.stats.queue_wait_p50 >= 0.3 * 0.99  # it waited its full max_delay for company
    svc.close()


def test_exception_reaches_every_caller_of_the_batch_and_service_keeps_serving():
    calls = []

    def fn(xs):
        calls.append(list(xs))
        if 13 in xs:
            raise ValueError("unlucky batch")
        return xs

    svc = rlbatch.BatchedService(fn, max_batch_size=3, max_delay=1.0)
    bad = svc.submit_many([1, 13, 2])
    for f in bad:
        with pytest.raises(ValueError, match="unlucky batch"):
            f.result()
    assert list(svc.map([4, 5, 6])) == [4, 5, 6]
    assert svc.stats.errors == 3
    svc.close()


def test_base_exception_in_batch_function_does_not_kill_worker():
    class Abort(BaseException):
        pass

    def fn(xs):
        if xs == [0]:
            raise Abort("boom")
        return xs

    svc = rlbatch.BatchedService(fn, max_batch_size=1, max_delay=0)
    with pytest.raises(Abort):
        svc(0)
    assert svc(1) == 1
    svc.close()


def test_cancelled_future_is_skipped_and_cannot_crash_worker():
    gate = Gate()
    svc = gate.svc
    first = gate.hold("a")
    doomed = svc.submit("b")
    assert doomed.cancel()
    last = svc.submit("c")
    gate.release.set()
    assert first.result() == "a" and last.result() == "c"
    assert doomed.cancelled() and "b" not in gate.ran
    assert svc.stats.cancelled == 1
    assert svc("d") == "d"
    svc.close()


def test_close_completes_the_gathered_batch():
    svc = rlbatch.BatchedService(lambda xs: [x + 1 for x in xs], max_batch_size=100, max_delay=60.0)
    futures = svc.submit_many(range(5))  # waiting for company for a minute
    svc.close()  # as_a_service's stop() dropped these
    assert [f.result(timeout=5) for f in futures] == [1, 2, 3, 4, 5]


def test_close_cancel_pending_fails_waiting_requests_with_service_closed():
    svc = rlbatch.BatchedService(lambda xs: xs, max_batch_size=100, max_delay=60.0)
    futures = svc.submit_many(range(3))
    svc.close(cancel_pending=True)
    for f in futures:
        with pytest.raises(rlbatch.ServiceClosed):
            f.result(timeout=5)


def test_close_cancel_pending_finishes_a_split_request_that_already_started():
    # A request split over batches must not be told "not run" after its first part ran.
    entered, release, ran = threading.Event(), threading.Event(), []

    def fn(xs):
        entered.set()
        release.wait()
        ran.extend(xs)
        return [x * 10 for x in xs]

    svc = rlbatch.BatchedService(fn, max_batch_size=2, max_delay=0)
    started = svc.submit_rows([1, 2, 3])  # parts [1, 2] and [3]
    entered.wait(5)
    waiting = svc.submit_rows([4, 5, 6])  # nothing of it has run
    svc.close(cancel_pending=True, wait=False)
    release.set()
    assert started.result(timeout=5) == [10, 20, 30]
    with pytest.raises(rlbatch.ServiceClosed):
        waiting.result(timeout=5)
    svc.close()
    assert ran == [1, 2, 3]


def test_blocked_caller_is_released_by_close():
    # implicit_callers=False: the lone caller must wait in the queue, not go at once as the only known one.
    svc = rlbatch.BatchedService(lambda xs: xs, max_batch_size=100, max_delay=60.0, implicit_callers=False)
    out = {}

    def caller():
        try:
            out["value"] = svc(7)
        except rlbatch.ServiceClosed as e:
            out["error"] = e

    t = threading.Thread(target=caller)
    t.start()
    wait_until(lambda: svc.stats.pending == 1)
    svc.close(cancel_pending=True)  # uBatch's callers blocked forever after stop()
    t.join(5)
    assert not t.is_alive() and isinstance(out.get("error"), rlbatch.ServiceClosed)


def test_submit_after_close_raises_and_close_is_idempotent():
    svc = rlbatch.BatchedService(lambda xs: xs, max_batch_size=4, max_delay=0.01)
    assert svc(1) == 1
    svc.close()
    svc.close()
    with pytest.raises(rlbatch.ServiceClosed):
        svc.submit(1)
    with pytest.raises(rlbatch.ServiceClosed):
        svc(1)  # batched's restart after shutdown hung here
    assert svc.stats.rejected == 2


def test_keyword_arguments_are_batched_per_request():
    seen = []

    def fn(a, mode):
        seen.append((list(a), list(mode)))
        return [x if m == "id" else -x for x, m in zip(a, mode)]

    svc = rlbatch.BatchedService(fn, max_batch_size=4, max_delay=1.0)
    fs = [svc.submit(1, mode="id"), svc.submit(2, mode="neg"), svc.submit(mode="neg", a=3), svc.submit(4, "id")]
    assert [f.result() for f in fs] == [1, -2, -3, 4]
    assert seen == [([1, 2, 3, 4], ["id", "neg", "neg", "id"])]
    svc.close()


def test_missing_or_extra_argument_fails_alone():
    svc = rlbatch.BatchedService(lambda a, mode: [x for x in a], max_batch_size=3, max_delay=0.2)
    good = svc.submit(1, "x")
    missing = svc.submit(2)
    extra = svc.submit(3, "x", colour="red")
    good2 = svc.submit(4, mode="y")
    with pytest.raises(rlbatch.InvalidRequest, match="missing argument 'mode'"):
        missing.result()
    with pytest.raises(rlbatch.InvalidRequest, match="unexpected keyword argument 'colour'"):
        extra.result()
    assert good.result() == 1 and good2.result() == 4
    with pytest.raises(rlbatch.InvalidRequest):
        svc(1, 2, 3)  # too many: the blocking call raises at once
    assert svc.stats.invalid == 3
    svc.close()


def test_padding_keeps_float_dtype_exactly():
    got = []

    def fn(x, num_valid):
        got.append((x.dtype, x.shape, num_valid))
        return x

    svc = rlbatch.BatchedService(fn, max_delay=0.05, buckets=(4, 8))
    rows = [np.array([0.25, 0.75, 1.5]), np.array([1.0, 2.0, 3.0])]
    fs = [svc.submit(r) for r in rows]
    out = [f.result() for f in fs]
    svc.close()
    np.testing.assert_array_equal(out[0], [0.25, 0.75, 1.5])  # batched made these 0, 0, 1
    assert out[0].dtype == np.float64
    assert got == [(np.float64, (4, 3), 2)]


def test_decorated_methods_do_not_leak_threads(no_thread_leak):
    class Model:
        @rlbatch.batched(max_batch_size=8, max_delay=0.001)
        def predict(self, xs):
            return [x + 1 for x in xs]

    for i in range(200):
        m = Model()
        assert m.predict(i) == i + 1
        del m
    gc.collect()


def test_fifo_within_priority_and_higher_priority_first():
    gate = Gate()
    svc, release, order = gate.svc, gate.release, gate.ran
    gate.hold("first")
    items = [("low", 0), ("high1", 5), ("mid1", 2), ("high2", 5), ("mid2", 2), ("low2", 0), ("high3", 5)]
    fs = [svc.submit(name, priority=p) for name, p in items]
    release.set()
    for f in fs:
        f.result()
    svc.close()
    assert order == ["first", "high1", "high2", "high3", "mid1", "mid2", "low", "low2"]


def test_starving_low_priority_request_is_served_after_starvation_timeout():
    gate = Gate(starvation_timeout=0.05)
    svc, release, order = gate.svc, gate.release, gate.ran
    gate.hold("first")
    low = svc.submit("low", priority=0)
    time.sleep(0.1)  # `low` is now older than the starvation timeout
    highs = [svc.submit(f"high{i}", priority=9) for i in range(3)]
    release.set()
    low.result()
    for f in highs:
        f.result()
    svc.close()
    assert order[1] == "low"


def test_output_length_mismatch_fails_batch_with_clear_error_not_assert():
    svc = rlbatch.BatchedService(lambda xs: xs[:-1], max_batch_size=3, max_delay=1.0)
    fs = svc.submit_many([1, 2, 3])
    for f in fs:  # batched-fn zipped outputs with callers and silently dropped the last one
        with pytest.raises(rlbatch.BatchOutputError, match="returned 2 results for a batch of 3"):
            f.result()
    svc.close()


def test_handler_panic_message_is_kept_and_later_calls_work():
    def fn(xs):
        if "panic" in xs:
            raise RuntimeError("handler panicked: bad input")
        return xs

    svc = rlbatch.BatchedService(fn, max_batch_size=1, max_delay=0)
    with pytest.raises(RuntimeError, match="handler panicked: bad input"):
        svc("panic")
    assert [svc(i) for i in range(3)] == [0, 1, 2]  # batched-fn said "disconnected" from here on
    svc.close()


def test_exception_instance_in_place_of_a_result_fails_that_item_alone():
    svc = rlbatch.BatchedService(lambda xs: [ValueError(f"no {x}") if x < 0 else x for x in xs],
                                 max_batch_size=3, max_delay=1.0)
    a, b, c = svc.submit_many([1, -2, 3])
    assert a.result() == 1 and c.result() == 3
    with pytest.raises(ValueError, match="no -2"):
        b.result()
    svc.close()


def test_none_is_a_result_like_any_other():
    # A batch function run for its side effects returns None per input; every kind of caller gets
    # None back, not CancelledError (None used to mean "cancelled" inside the worker).
    with rlbatch.BatchedService(lambda xs: [None for _ in xs], max_batch_size=4, max_delay=0.001) as svc:
        assert svc(1) is None
        assert svc.submit(2).result(timeout=10) is None
        assert svc(3, timeout=10) is None
        with svc.register() as caller:
            assert caller(4) is None
            assert caller(5) is None  # the registered caller's reused request, second time
        assert list(svc.map([6, 7, 8])) == [None, None, None]


# --------------------------------------------------------------------------- the contract

def test_submit_returns_stdlib_future_and_context_manager_closes():
    with rlbatch.BatchedService(lambda xs: xs, max_batch_size=2, max_delay=0.01) as svc:
        f = svc.submit(1)
        assert isinstance(f, concurrent.futures.Future)
        assert f.result() == 1
    assert svc.closed


def test_deadline_fails_request_without_running_it():
    gate = Gate()
    svc, release, ran = gate.svc, gate.release, gate.ran
    gate.hold("blocker")
    late = svc.submit("late", timeout=0.01)
    time.sleep(0.05)
    release.set()
    with pytest.raises(rlbatch.DeadlineExceeded):
        late.result()
    with pytest.raises(TimeoutError):
        late.result()
    assert "late" not in ran and svc.stats.timed_out == 1
    svc.close()


def test_blocking_call_timeout_raises_timeout_error():
    gate = Gate()
    svc = gate.svc
    gate.hold(0)
    with pytest.raises(TimeoutError):
        svc(1, timeout=0.02)
    gate.release.set()
    assert svc(2) == 2
    svc.close()


def test_setup_runs_once_on_worker_thread_and_reaches_the_function():
    threads = []

    def setup():
        threads.append(threading.current_thread())
        return {"scale": 3}

    def fn(ctx, xs):
        assert threading.current_thread() is threads[0]
        return [ctx["scale"] * x for x in xs]

    svc = rlbatch.BatchedService(fn, max_batch_size=4, max_delay=0.01, setup=setup)
    assert list(svc.map(range(10))) == [3 * x for x in range(10)]
    assert len(threads) == 1 and threads[0] is not threading.current_thread()
    svc.close()


def test_setup_failure_fails_callers_with_service_closed_and_cause():
    def setup():
        raise OSError("no device")

    svc = rlbatch.BatchedService(lambda ctx, xs: xs, max_batch_size=4, max_delay=0.01, setup=setup)
    with pytest.raises(rlbatch.ServiceClosed, match="no device"):
        svc(1)
    with pytest.raises(rlbatch.ServiceClosed):
        svc.submit(2)
    svc.close()


def test_multi_row_request_stays_together_and_large_one_is_split_and_reassembled():
    batches = []

    def fn(xs):
        batches.append(list(xs))
        return [x * 2 for x in xs]

    svc = rlbatch.BatchedService(fn, max_batch_size=4, max_delay=0.05)
    small = svc.submit_rows([1, 2, 3])
    other = svc.submit_rows([10, 20])
    assert small.result() == [2, 4, 6] and other.result() == [20, 40]
    assert [1, 2, 3] in batches and [10, 20] in batches  # three rows never split, 3 + 2 > 4
    big = svc.submit_rows(list(range(10)))
    assert big.result() == [2 * x for x in range(10)]
    assert all(len(b) <= 4 for b in batches)
    svc.close()


def test_array_rows_split_and_reassembled():
    svc = rlbatch.BatchedService(lambda x, num_valid: x + 1, max_batch_size=8, max_delay=0.01, buckets=(4, 8))
    out = svc.call_rows(np.arange(40, dtype=np.int32).reshape(20, 2))
    np.testing.assert_array_equal(out, np.arange(40).reshape(20, 2) + 1)
    assert out.dtype == np.int32
    svc.close()


def test_early_flush_when_all_registered_callers_wait():
    svc = rlbatch.BatchedService(lambda xs: xs, max_batch_size=64, max_delay=30.0)
    callers = [svc.register() for _ in range(4)]
    results = [None] * 4

    def run(i):
        results[i] = callers[i](i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)  # without early flush each would wait out the 30 s delay
    assert results == [0, 1, 2, 3]
    for c in callers:
        c.close()
    svc.close()


def test_unregistered_caller_does_not_block_early_flush_of_registered_ones():
    svc = rlbatch.BatchedService(lambda xs: xs, max_batch_size=64, max_delay=30.0)
    with svc.register() as caller:
        assert caller(5) == 5  # the only registered caller is waiting: go at once
    svc.close()


def test_asyncio_callers():
    svc = rlbatch.BatchedService(lambda xs: [x * x for x in xs], max_batch_size=16, max_delay=0.01)

    async def main():
        return await asyncio.gather(*[svc.acall(i) for i in range(20)])

    assert asyncio.run(main()) == [i * i for i in range(20)]
    assert svc.stats.batches <= 4
    svc.close()


def test_service_decorator_runs_calls_one_at_a_time_on_its_own_thread():
    active, peak, threads = [0], [0], set()
    lock = threading.Lock()

    @rlbatch.service
    def work(x, scale=1):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        threads.add(threading.get_ident())
        time.sleep(0.001)
        with lock:
            active[0] -= 1
        return x * scale

    out = [None] * 20

    def run(i):
        out[i] = work(i, scale=2)

    ts = [threading.Thread(target=run, args=(i,)) for i in range(20)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert out == [2 * i for i in range(20)]
    assert peak[0] == 1 and len(threads) == 1 and threading.get_ident() not in threads
    assert work([1, 2]) == [1, 2]  # no batching: a list is one input
    work.close()


def test_thousands_of_services_leak_no_thread(no_thread_leak):
    for i in range(2000):
        svc = rlbatch.BatchedService(lambda xs: xs, max_batch_size=2, max_delay=0.0)
        if i % 10 == 0:
            assert svc(i) == i
        svc.close()


def _wakeups(thread):
    """Voluntary context switches of one thread (Linux /proc): each time it blocked and woke."""
    with open(f"/proc/self/task/{thread.native_id}/status") as f:
        for line in f:
            if line.startswith("voluntary_ctxt_switches"):
                return int(line.split()[1])
    raise AssertionError("no voluntary_ctxt_switches in /proc")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads per-thread counters from /proc")
def test_idle_service_never_wakes():
    svc = rlbatch.BatchedService(lambda xs: xs, max_batch_size=8, max_delay=0.001)
    assert svc(1) == 1  # the worker is started and now idle
    wait_until(lambda: svc._worker.idle)  # set under the lock just before the worker blocks
    before = _wakeups(svc._worker.threads[0])
    time.sleep(0.5)
    woke = _wakeups(svc._worker.threads[0]) - before
    svc.close()
    # At most the one switch of going to sleep, if the first reading came just before it.
    assert woke <= 1, f"an idle worker woke {woke} times in 0.5 s"  # uBatch polled every 2 ms: ~250


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads per-thread counters from /proc")
def test_a_polling_thread_would_be_caught():
    # The measure above is sensitive: a thread that polls every 2 ms wakes about 250 times.
    stop = threading.Event()
    poller = threading.Thread(target=lambda: [None for _ in iter(lambda: stop.wait(0.002), True)])
    poller.start()
    time.sleep(0.05)
    before = _wakeups(poller)
    time.sleep(0.5)
    woke = _wakeups(poller) - before
    stop.set()
    poller.join()
    assert woke > 50


def test_stats_snapshot_counts():
    svc = rlbatch.BatchedService(lambda xs: xs, max_batch_size=4, max_delay=1.0)
    list(svc.map(range(10)))
    st = svc.stats
    assert (st.requests, st.rows, st.batches) == (10, 10, 3)
    assert st.batch_size_hist == {4: 2, 2: 1}
    assert st.mean_batch_size == pytest.approx(10 / 3)
    assert st.queue_wait_p99 >= st.queue_wait_p50 > 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        st.requests = 0
    assert set(st.as_dict()) >= {"requests", "batches", "padding_fraction", "rejected", "timed_out"}
    svc.close()


# --------------------------------------------------------------------------- array mode

def test_buckets_pick_smallest_fitting_bucket_and_pad_by_repeating_last_row():
    seen = []

    def fn(x, num_valid):
        seen.append((x.shape[0], num_valid, x[num_valid:].copy()))
        return x * 10

    svc = rlbatch.BatchedService(fn, max_batch_size=8, max_delay=1.0, buckets=(2, 4, 8))
    fs = [svc.submit(np.array([i], dtype=np.float32)) for i in range(3)]
    assert [float(f.result()[0]) for f in fs] == [0.0, 10.0, 20.0]
    bucket, n, pad = seen[0]
    assert (bucket, n) == (4, 3)
    np.testing.assert_array_equal(pad, [[2.0]])
    assert svc.stats.padding_fraction == pytest.approx(0.25)
    assert svc.stats.bucket_hist == {4: 1}
    svc.close()


@pytest.mark.parametrize("pad, expected", [("zeros", 0.0), (-1.5, -1.5)])
def test_padding_modes(pad, expected):
    seen = []

    def fn(x, num_valid):
        seen.append(x[num_valid:].copy())
        return x

    svc = rlbatch.BatchedService(fn, max_batch_size=4, max_delay=0.01, buckets=(4,), pad=pad)
    svc(np.array([7.0, 8.0]))
    svc.close()
    assert np.all(seen[0] == expected)


def test_wrong_shape_or_dtype_fails_alone_in_array_mode():
    svc = rlbatch.BatchedService(lambda x, num_valid: x, max_batch_size=4, max_delay=0.05, buckets=(4,),
                                 example=(np.zeros(3, np.float32),))
    good = svc.submit(np.ones(3, np.float32))
    bad_shape = svc.submit(np.ones(4, np.float32))
    bad_dtype = svc.submit(np.ones(3, np.float64))
    with pytest.raises(rlbatch.InvalidRequest, match=r"expected .*float32\[3\], got float32\[4\]"):
        bad_shape.result()
    with pytest.raises(rlbatch.InvalidRequest, match=r"got float64\[3\]"):
        bad_dtype.result()
    np.testing.assert_array_equal(good.result(), np.ones(3))
    svc.close()


def test_pytree_inputs_and_outputs():
    def fn(obs, num_valid):
        return {"sum": obs["a"].sum(axis=1) + obs["b"], "a": obs["a"]}

    svc = rlbatch.BatchedService(fn, max_batch_size=4, max_delay=0.05, buckets=(4,))
    fs = [svc.submit({"a": np.full(2, i, np.float32), "b": np.float32(i)}) for i in range(3)]
    outs = [f.result() for f in fs]
    assert [float(o["sum"]) for o in outs] == [0.0, 3.0, 6.0]
    np.testing.assert_array_equal(outs[2]["a"], [2.0, 2.0])
    bad = svc.submit({"a": np.zeros(2, np.float32)})
    with pytest.raises(rlbatch.InvalidRequest, match="expected structure"):
        bad.result()
    svc.close()


def test_output_aliasing_input_buffer_is_not_overwritten_by_next_batch():
    svc = rlbatch.BatchedService(lambda x, num_valid: x, max_batch_size=2, max_delay=0.01, buckets=(2,))
    first = svc(np.array([1.0]))
    second = svc(np.array([2.0]))  # reuses the same preallocated buffer
    assert first[0] == 1.0 and second[0] == 2.0
    svc.close()


def test_wrong_leading_dimension_of_output_fails_batch():
    svc = rlbatch.BatchedService(lambda x, num_valid: x[:num_valid], max_batch_size=4, max_delay=0.01, buckets=(4,))
    with pytest.raises(rlbatch.BatchOutputError, match="bucket size 4"):
        svc(np.array([1.0]))
    svc.close()


@pytest.mark.parametrize("wake_width, n", [(1, 13), (2, 13), (5, 13), (None, 13), (None, 200)])
def test_every_blocked_caller_of_a_batch_is_woken_whatever_the_wake_width(wake_width, n):
    # Registered callers and a long max_delay: the n requests go as one batch when the last
    # arrives, so its n callers are woken through the relays (200 callers: 4 automatic relays).
    svc = rlbatch.BatchedService(lambda xs: [x + 1 for x in xs], max_batch_size=256, max_delay=30,
                                 wake_width=wake_width)
    out = [None] * n
    callers = [svc.register() for _ in range(n)]

    def call(i):
        out[i] = callers[i](i)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert svc.stats.batches == 1
    svc.close()
    assert out == [i + 1 for i in range(n)]
    with pytest.raises(ValueError, match="wake_width"):
        rlbatch.BatchedService(lambda xs: xs, wake_width=0)


# --------------------------------------------------------------------------- faults found in review

def test_array_output_with_no_arrays_fails_its_batch_instead_of_hanging():
    with rlbatch.BatchedService(lambda x, num_valid: None, max_batch_size=4, max_delay=0.001, buckets=(4,)) as svc:
        with pytest.raises(rlbatch.BatchOutputError, match="0 results for 1 requests"):
            svc.submit(np.zeros(3, np.float32)).result(timeout=10)
        with pytest.raises(rlbatch.BatchOutputError):
            svc(np.zeros(3, np.float32))


def test_future_callback_raising_base_exception_does_not_kill_the_worker():
    class Boom(BaseException):
        pass

    def explode(_):
        raise Boom("from a done-callback")

    with rlbatch.BatchedService(lambda xs: [x * 2 for x in xs], max_batch_size=8, max_delay=0.05) as svc:
        f1 = svc.submit(1)
        f1.add_done_callback(explode)
        f2 = svc.submit(2)
        assert f1.result(timeout=10) == 2 and f2.result(timeout=10) == 4
        assert svc(3) == 6  # the worker is alive
    gate = Gate(max_batch_size=4)
    gate.hold("blocker")
    late = gate.svc.submit("late", timeout=0.01)  # expires while the worker is held
    late.add_done_callback(explode)
    other = gate.svc.submit("other")  # same batch as the expired one
    time.sleep(0.05)
    gate.release.set()
    with pytest.raises(rlbatch.DeadlineExceeded):
        late.result(timeout=10)
    assert other.result(timeout=10) == "other" and gate.svc("after") == "after"
    gate.svc.close()


def test_split_multi_row_call_honours_its_timeout():
    # The batch function blocks until released; a call that honours its timeout gives up while it
    # is still blocked (the safety timer only keeps a broken build from hanging the suite).
    release = threading.Event()
    safety = threading.Timer(30, release.set)
    safety.start()

    def blocked(xs):
        release.wait()
        return xs

    with rlbatch.BatchedService(blocked, max_batch_size=4, max_delay=0) as svc:
        with pytest.raises(rlbatch.DeadlineExceeded):
            svc.call_rows(list(range(6)), timeout=0.2)  # two batches of 4 and 2
        gave_up_first = not release.is_set()
        release.set()
    safety.cancel()
    assert gave_up_first


def test_blocking_timeout_counts_the_wait_for_room_and_negative_means_expired():
    # "running" holds the worker; "queued" fills the queue. Room appears at 0.6 s, when "running"
    # ends and "queued" starts (and blocks). A call with timeout=1.0 made at 0 must give up at 1.0 s,
    # not wait a second full timeout after it got into the queue (which would end at 1.6 s).
    first, second = threading.Event(), threading.Event()
    events = {"running": first, "queued": second}

    def fn(xs):
        for x in xs:
            events.get(x, threading.Event()).wait(30)
        return xs

    svc = rlbatch.BatchedService(fn, max_batch_size=1, max_delay=0, max_queue=1, on_full="block")
    running = svc.submit("running")
    wait_until(lambda: svc.stats.pending == 0)
    queued = svc.submit("queued")
    too_late = threading.Event()
    timers = [threading.Timer(0.6, first.set), threading.Timer(1.45, too_late.set)]
    for t in timers:
        t.start()
    with pytest.raises(rlbatch.DeadlineExceeded):
        svc("late", timeout=1.0)
    in_time = not too_late.is_set()
    with pytest.raises(rlbatch.DeadlineExceeded):
        svc("never", timeout=-1)  # -1 is a deadline in the past, not "wait forever"
    second.set()
    for t in timers:
        t.cancel()
    assert running.result(timeout=10) == "running" and queued.result(timeout=10) == "queued"
    assert in_time
    svc.close()


def test_submit_many_into_a_full_queue_returns_every_future():
    gate = Gate(max_queue=3, on_full="raise")
    gate.hold("running")
    futures = gate.svc.submit_many(range(10))
    assert len(futures) == 10
    refused = [f for f in futures if f.done() and isinstance(f.exception(), rlbatch.QueueFull)]
    assert len(refused) == 7
    gate.release.set()
    assert [f.result(timeout=10) for f in futures[:3]] == [0, 1, 2]
    gate.svc.close()


def test_rest_of_a_started_split_request_runs_past_its_deadline():
    seen = []

    def slow(xs):
        time.sleep(0.3)
        seen.append(list(xs))
        return xs

    with rlbatch.BatchedService(slow, max_batch_size=4, max_delay=0) as svc:
        f = svc.submit_rows(list(range(6)), timeout=0.1)  # the second part expires while the first runs
        assert f.result(timeout=10) == list(range(6))
        assert seen == [[0, 1, 2, 3], [4, 5]]


def test_first_multi_row_request_without_a_row_axis_is_refused_alone():
    with rlbatch.BatchedService(lambda x, y, num_valid: x + y[:, None], max_batch_size=4, buckets=(4,)) as svc:
        with pytest.raises(rlbatch.InvalidRequest, match="2 rows"):
            svc.call_rows(np.zeros((2, 3), np.float32), np.float32(1))
        out = svc.call_rows(np.zeros((2, 3), np.float32), np.ones(2, np.float32))
        assert out.shape == (2, 3) and (out == 1).all()


def test_pad_value_that_does_not_fit_the_dtype_is_refused_up_front():
    with pytest.raises(ValueError, match="pad=-1 cannot fill argument 'x' of dtype uint8"):
        rlbatch.BatchedService(lambda x, num_valid: x, buckets=(4,), pad=-1, example=(np.zeros(2, np.uint8),))
    with rlbatch.BatchedService(lambda x, num_valid: x, buckets=(4,), pad=np.nan) as svc:
        with pytest.raises(rlbatch.InvalidRequest, match="pad=nan cannot fill"):
            svc(np.zeros(2, np.int32))
        assert (svc(np.ones(2, np.float32)) == 1).all()  # a dtype nan can fill: the first that fits


def test_ctrl_c_in_a_blocking_caller_leaves_at_once_and_its_relay_still_wakes_the_rest():
    """KeyboardInterrupt (twice, as an impatient user sends it) in a caller that heads a relay:
    the call raises at once, while its batch still runs, and the callers behind it in the relay
    still get their results (a helper takes its turn)."""
    import signal

    entered, release = threading.Event(), threading.Event()

    def fn(xs):
        entered.set()
        release.wait(10)
        return xs

    # One relay of 4; plain calls must wait for the batch to fill (no early flush by known threads).
    svc = rlbatch.BatchedService(fn, max_batch_size=4, max_delay=5.0, wake_width=1, implicit_callers=False)
    inside = threading.Event()

    def on_sigint(signum, frame):
        if inside.is_set():  # only while the main thread waits in its call
            raise KeyboardInterrupt

    results = {}
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, svc(i))) for i in (1, 2, 3)]

    def queue_behind_main_then_interrupt():
        wait_until(lambda: svc.stats.pending == 1)  # the main thread's request is first: it heads the relay
        for k, t in enumerate(threads):
            t.start()
            if k < 2:
                wait_until(lambda: svc.stats.pending == k + 2)
        entered.wait(10)  # the batch of four is running
        for _ in range(2):
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
            time.sleep(0.05)

    old_handler = signal.signal(signal.SIGINT, on_sigint)
    try:
        helper = threading.Thread(target=queue_behind_main_then_interrupt)
        helper.start()
        inside.set()
        with pytest.raises(KeyboardInterrupt):
            svc(0)
        inside.clear()
        assert entered.is_set() and not release.is_set()  # it left while its batch still ran
        helper.join(10)
        release.set()
        for t in threads:
            t.join(10)
            assert not t.is_alive(), "a caller behind the interrupted one was left waiting"
        assert results == {1: 1, 2: 2, 3: 3}
    finally:
        inside.clear()
        release.set()
        signal.signal(signal.SIGINT, old_handler)
        svc.close()
    assert not [t for t in threading.enumerate() if t.name.endswith("-relay")]  # close joined the helper


def test_a_queued_request_fails_at_its_deadline_not_when_its_batch_would_have_gone():
    """max_delay is long and nothing else arrives: the Future still fails at its own deadline; the
    requests beside it without a deadline stay queued and run; the queue's books balance."""
    ran = []
    svc = rlbatch.BatchedService(lambda xs: ran.extend(xs) or xs, max_batch_size=8, max_delay=60.0)
    try:
        patient = svc.submit("patient")
        wait_until(lambda: svc._worker.waiting)  # the worker already waits for the batch to fill
        hasty = svc.submit("hasty", timeout=0.05)
        rows = svc.submit_rows(list(range(5)), timeout=0.05)  # 7 rows queued: the batch waits
        # The batch itself would go only after 60 s: exception() would time out first.
        assert isinstance(hasty.exception(timeout=10), rlbatch.DeadlineExceeded)
        assert isinstance(rows.exception(timeout=10), rlbatch.DeadlineExceeded)
        assert not patient.done() and svc.stats.pending == 1 and svc.stats.timed_out == 2
        again = svc.submit("again", timeout=30)  # a later deadline does not disturb the rest
        svc.close()  # drains: the two left run now
        assert patient.result(timeout=10) == "patient" and again.result(timeout=10) == "again"
        assert ran == ["patient", "again"]
        svc._worker.queue.check()
        assert (svc._worker.queue.pending, svc._worker.queue.pending_rows) == (0, 0)
    finally:
        svc.close()


def test_registered_callers_with_deadlines_keep_early_flush_and_get_their_results():
    """Timed blocking calls from registered callers: a request past its deadline is dropped from
    the queue, and the caller counts stay right, so the others' batches still go at once."""
    svc = rlbatch.BatchedService(lambda xs: xs, max_batch_size=64, max_delay=60.0)
    callers = [svc.register() for _ in range(4)]
    results, errors = [], []

    def loop(c, i):
        for k in range(50):
            try:
                results.append(c((i, k), timeout=30))
            except Exception as e:  # noqa: BLE001 - collected for the assertion below
                errors.append(e)

    threads = [threading.Thread(target=loop, args=(c, i)) for i, c in enumerate(callers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
        assert not t.is_alive()  # early flush kept working: max_delay is 60 s
    for c in callers:
        c.close()
    svc.close()
    assert not errors and sorted(results) == sorted((i, k) for i in range(4) for k in range(50))
    q = svc._worker.queue
    assert (q.pending, q.special, q.waiting_callers) == (0, 0, 0)


# --------------------------------------------------------------------------- executor semantics and more


def test_max_delay_counts_from_the_oldest_request_while_requests_keep_arriving():
    # Futures arrive every max_delay / 4 for 10 * max_delay: batches must go while they keep coming.
    max_delay = 0.2
    svc = rlbatch.BatchedService(lambda xs: xs, max_batch_size=1000, max_delay=max_delay)
    futures = []
    end = time.perf_counter() + 10 * max_delay
    while time.perf_counter() < end:
        futures.append(svc.submit(len(futures)))
        time.sleep(max_delay / 4)
    assert [f.result(10) for f in futures] == list(range(len(futures)))
    st = svc.stats
    svc.close()
    # Counted from the newest request, no batch would go before the stream stops: one batch.
    assert st.batches >= 5 and st.batch_triggers["delay"] == st.batches, st


def test_one_failed_row_fails_its_multi_row_request_and_only_that_request():
    def fn(xs):
        return [ValueError(f"bad {x}") if x == "bad" else x.upper() for x in xs]

    svc = rlbatch.BatchedService(fn, max_batch_size=8, max_delay=0.05)
    mixed = svc.submit_rows(["a", "bad", "c"])
    fine = svc.submit_rows(["d", "e"])
    single = svc.submit("f")
    with pytest.raises(ValueError, match="bad bad"):
        mixed.result(10)
    assert fine.result(10) == ["D", "E"] and single.result(10) == "F"
    svc.close()


def test_map_is_lazy_like_executor_map_zips_iterables_and_raises_where_the_error_is():
    def fn(xs, ys):
        return [ZeroDivisionError("y is 0") if y == 0 else x / y for x, y in zip(xs, ys)]

    svc = rlbatch.BatchedService(fn, max_batch_size=8, max_delay=0.01)
    results = svc.map([1, 2, 3], [1, 0, 3])
    assert not isinstance(results, list)
    assert next(results) == 1.0
    with pytest.raises(ZeroDivisionError, match="y is 0"):
        next(results)
    assert list(svc.map([4, 9], [2, 3])) == [2.0, 3.0]
    svc.close()


def test_map_timeout_raises_timeout_error_and_closing_the_iterator_cancels_the_rest():
    release = threading.Event()
    ran = []

    def fn(xs):
        release.wait(10)
        ran.extend(xs)
        return xs

    svc = rlbatch.BatchedService(fn, max_batch_size=1, max_delay=0.0)
    results = svc.map(range(5), timeout=0.05)
    with pytest.raises(TimeoutError):
        next(results)
    results.close()  # the iterator is done: requests not yet run are cancelled
    release.set()
    svc.close()
    assert len(ran) < 5 and svc.stats.cancelled == 5 - len(ran)


def test_shutdown_is_close_with_executor_arguments():
    release = threading.Event()
    svc = rlbatch.BatchedService(lambda xs: release.wait(10) and xs, max_batch_size=1, max_delay=0.0)
    running = svc.submit(1)
    wait_until(lambda: svc.stats.pending == 0)  # request 1 is in the batch function
    queued = svc.submit(2)
    threading.Timer(0.05, release.set).start()
    svc.shutdown(wait=True, cancel_futures=True)
    assert running.result(0) == 1
    with pytest.raises(rlbatch.ServiceClosed):
        queued.result(0)
    svc.shutdown()  # twice is fine
    with pytest.raises(rlbatch.ServiceClosed):
        svc.submit(3)


def test_a_split_request_larger_than_max_queue_waits_for_room_when_blocking():
    svc = rlbatch.BatchedService(lambda xs: [x * 2 for x in xs], max_batch_size=2, max_delay=0.0, max_queue=2)
    assert svc.submit_rows(list(range(9))).result(10) == [x * 2 for x in range(9)]  # 5 parts, 2 queued at most
    assert svc.call_rows(list(range(7))) == [x * 2 for x in range(7)]
    svc.close()
    strict = rlbatch.BatchedService(lambda xs: xs, max_batch_size=2, max_queue=2, on_full="raise")
    with pytest.raises(rlbatch.QueueFull):
        strict.call_rows(list(range(9)))
    strict.close()


def test_max_batch_size_and_max_delay_change_on_a_running_service():
    svc = rlbatch.BatchedService(lambda xs: xs, max_batch_size=2, max_delay=60.0, implicit_callers=False)
    first = [svc.submit(i) for i in range(2)]  # a full batch of 2
    assert [f.result(10) for f in first] == [0, 1]
    svc.max_batch_size = 4
    svc.max_delay = 0.01  # the queued request must not wait the old 60 s
    assert [f.result(10) for f in [svc.submit(i) for i in range(3)]] == [0, 1, 2]
    svc.max_batch_size = 8
    assert [f.result(10) for f in svc.submit_many(range(8))] == list(range(8))
    assert svc.stats.batch_size_hist.get(8) == 1
    with pytest.raises(ValueError, match="max_batch_size must be a positive int, got 0"):
        svc.max_batch_size = 0
    svc.close()


def test_small_calls_go_before_larger_calls_of_the_same_priority_with_small_batch_threshold():
    order = []
    svc = rlbatch.BatchedService(lambda xs: order.extend(xs) or xs, max_batch_size=4, max_delay=0.0,
                                 small_batch_threshold=2, start=False)
    bulk = svc.submit_many(range(10, 16))  # a call of 6 inputs: large
    small = svc.submit(1)  # a call of 1: small, queued after the bulk
    urgent = svc.submit_many([100], priority=1)  # a higher priority goes first whatever its size
    svc.start()
    assert [f.result(10) for f in bulk] == list(range(10, 16)) and small.result(10) == 1
    assert urgent[0].result(10) == 100
    assert order == [100, 1, 10, 11, 12, 13, 14, 15]
    st = svc.stats
    svc.close()
    assert st.processing_time_total > 0 and st.processing_time_mean == pytest.approx(st.processing_time_total / st.batches)
    with pytest.raises(ValueError, match="small_batch_threshold must be an int >= 0 or None, got -1"):
        rlbatch.BatchedService(lambda xs: xs, small_batch_threshold=-1)

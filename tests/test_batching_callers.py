"""Known callers: threads that make blocking calls count by themselves; register() is exact."""
import threading
import time

import pytest

import rlbatch
from tests.conftest import wait_until


def run_threads(n, target):
    threads = [threading.Thread(target=target, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    return threads


def test_sixteen_plain_threads_calling_in_a_loop_keep_getting_batches_of_sixteen():
    # max_delay=60 and room for 64 rows: only early flush can send these batches in time.
    svc = rlbatch.BatchedService(lambda xs: xs, max_batch_size=64, max_delay=60.0)
    results = {}
    start = threading.Barrier(16)

    def caller(i):  # a thread is known from its first call until it ends
        start.wait()
        results[i] = [svc(i * 1000 + j) for j in range(100)]

    for t in run_threads(16, caller):
        t.join(30)
        assert not t.is_alive()
    st = svc.stats
    svc.close()
    assert results == {i: [i * 1000 + j for j in range(100)] for i in range(16)}
    assert st.batch_triggers["delay"] == 0 and st.batch_triggers["full"] == 0
    # Once all are known, a batch goes when every known caller waits: all 16 (fewer only while
    # the threads start and end).
    assert st.batch_size_hist.get(16, 0) >= 50, st.batch_size_hist


def test_a_thread_counts_from_its_first_call_until_it_ends():
    svc = rlbatch.BatchedService(lambda xs: xs, max_batch_size=8, max_delay=60.0)
    called, finish = threading.Event(), threading.Event()

    def caller(_):
        assert svc(1) == 1  # alone and known: goes at once, not after 60 s
        called.set()
        finish.wait(10)

    (t,) = run_threads(1, caller)
    called.wait(10)
    assert svc.stats.known_callers == 1
    finish.set()
    t.join(10)
    wait_until(lambda: svc.stats.known_callers == 0)  # the thread ended: it is forgotten
    svc.close()


def test_a_thread_that_stops_calling_holds_the_others_back_at_most_once_past_the_horizon():
    max_delay, horizon = 1.0, 0.2
    svc = rlbatch.BatchedService(lambda xs: xs, max_batch_size=64, max_delay=max_delay, idle_horizon=horizon)
    stop_idle, go, stop = threading.Event(), threading.Barrier(4), threading.Event()
    counts = {}

    def idle(_):
        svc(0)
        go.wait()
        stop_idle.wait(30)  # alive, known, and silent

    def busy(i):
        svc(i)
        go.wait()
        n = 0
        while not stop.is_set():
            svc(i)
            n += 1
        counts[i] = n

    threads = run_threads(1, idle) + [threading.Thread(target=busy, args=(i,)) for i in (1, 2, 3)]
    for t in threads[1:]:
        t.start()
    # The busy three make progress past the silent one: after one batch by delay it is forgotten.
    wait_until(lambda: svc.stats.batch_triggers["callers"] >= 200, timeout=30)
    st = svc.stats
    stop.set()
    for t in threads[1:]:
        t.join(10)
    assert st.batch_triggers["delay"] <= 2, st.batch_triggers
    assert st.known_callers == 3  # the silent thread stopped counting; the busy ones still count
    stop_idle.set()
    threads[0].join(10)
    svc.close()


def test_a_forgotten_thread_counts_again_when_it_calls_again():
    horizon = 1.0
    svc = rlbatch.BatchedService(lambda xs: xs, max_batch_size=64, max_delay=0.05, idle_horizon=horizon)
    answered, release, finish = threading.Semaphore(0), threading.Event(), threading.Event()

    def caller(i):
        svc(i)
        answered.release()
        release.wait(10)
        svc(i)
        answered.release()
        finish.wait(10)

    threads = run_threads(2, caller)
    for _ in threads:
        assert answered.acquire(timeout=10)
    time.sleep(horizon * 1.1)  # both threads silent past the horizon
    svc.submit(99).result(10)  # a batch by delay: both forgotten
    assert svc.stats.known_callers == 0
    release.set()
    for _ in threads:
        assert answered.acquire(timeout=10)
    assert svc.stats.known_callers == 2
    finish.set()
    for t in threads:
        t.join(10)
    svc.close()


def test_implicit_callers_off_counts_only_registered_callers():
    svc = rlbatch.BatchedService(lambda xs: xs, max_batch_size=8, max_delay=0.05, implicit_callers=False)
    (t,) = run_threads(1, lambda _: svc(1))
    t.join(10)
    assert svc.stats.known_callers == 0 and svc.stats.batch_triggers["delay"] == 1
    with svc.register() as caller:
        assert svc.stats.known_callers == 1
        assert caller(2) == 2
    assert svc.stats.known_callers == 0 and svc.stats.batch_triggers["callers"] == 1
    svc.close()


def test_a_registered_caller_is_never_forgotten_by_the_idle_horizon():
    svc = rlbatch.BatchedService(lambda xs: xs, max_batch_size=64, max_delay=0.05, idle_horizon=0.0,
                                 implicit_callers=False)
    silent = svc.register()
    busy = svc.register()
    for i in range(3):
        assert busy(i) == i  # each waits out max_delay: the silent registered caller still counts
    st = svc.stats
    assert st.known_callers == 2 and st.batch_triggers == {"full": 0, "callers": 0, "delay": 3, "closing": 0}
    silent.close()
    assert busy(3) == 3
    assert svc.stats.batch_triggers["callers"] == 1
    busy.close()
    svc.close()


def test_register_after_close_raises_service_closed():
    svc = rlbatch.BatchedService(lambda xs: xs)
    svc.close()
    with pytest.raises(rlbatch.ServiceClosed):
        svc.register()

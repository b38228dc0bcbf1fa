"""@batched methods: one service per instance, which works on a temporary instance and ends with it."""
import asyncio
import gc
import threading
import weakref

import rlbatch
from tests.conftest import wait_until


class Model:
    def __init__(self, k):
        self.k = k

    @rlbatch.batched(max_batch_size=4, max_delay=0.001)
    def predict(self, xs):
        return [x + self.k for x in xs]


def test_method_on_a_temporary_instance_works_every_way_in(no_thread_leak):
    # Nothing but the call itself holds the instance: it used to be collected between the attribute
    # lookup and the call, and its finalizer closed the service (ServiceClosed).
    assert Model(1).predict(1) == 2
    assert list(Model(1).predict.map([1, 2])) == [2, 3]
    assert list(Model(1).predict.map([1, 2])) == [2, 3]
    assert Model(1).predict.call_rows([1, 2, 3, 4, 5, 6]) == [2, 3, 4, 5, 6, 7]  # split over two batches
    assert asyncio.run(Model(1).predict.acall(1)) == 2
    assert Model(1).predict.submit(1).result(timeout=5) == 2
    assert [f.result(timeout=5) for f in Model(1).predict.submit_many([1, 2])] == [2, 3]
    assert Model(1).predict.submit_rows([1, 2, 3, 4, 5]).result(timeout=5) == [2, 3, 4, 5, 6]


def test_one_service_per_instance_closed_when_the_instance_is_collected(no_thread_leak):
    m = Model(10)
    svc = m.predict.service
    assert m.predict.service is svc and Model(20).predict.service is not svc
    ref = weakref.ref(m)
    future = m.predict.submit(1)
    del m  # the pending request keeps the instance until it is done, not longer
    assert future.result(timeout=5) == 11
    wait_until(lambda: ref() is None)
    wait_until(lambda: svc.closed)
    wait_until(lambda: not svc._worker.threads[0].is_alive())


def test_fire_and_forget_submits_on_temporaries_run_and_leave_no_thread(no_thread_leak):
    # The last reference to each Future (and so to its instance) goes on the worker thread,
    # which then closes its own service; the fixture checks that every worker ended.
    results = []
    lock = threading.Lock()

    def record(future):
        with lock:
            results.append(future.result())

    for i in range(20):
        Model(i).predict.submit(i).add_done_callback(record)
    wait_until(lambda: len(results) == 20)
    assert sorted(results) == [2 * i for i in range(20)]


def test_register_on_a_temporary_instance_keeps_the_instance_until_the_caller_closes():
    class Model:
        @rlbatch.batched(max_batch_size=4, max_delay=0.01)
        def predict(self, xs):
            return [x + 1 for x in xs]

    caller = Model().predict.register()
    gc.collect()
    assert caller(1) == 2  # the instance (and its service) is still there
    caller.close()


def test_a_list_argument_is_one_input_for_the_decorator_as_for_the_class():
    @rlbatch.batched(max_batch_size=4, max_delay=0.01)
    def lengths(items):
        return [len(x) for x in items]

    @rlbatch.batched(max_batch_size=4, max_delay=0.01)
    def total(items):
        return [sum(x) for x in items]

    svc = rlbatch.BatchedService(lambda items: [len(x) for x in items], max_batch_size=4, max_delay=0.01)
    assert lengths(["ab", "cde"]) == 2 and svc(["ab", "cde"]) == 2
    assert total([1, 2, 3]) == 6
    assert list(lengths.map(["ab", "cde"])) == [2, 3]  # many inputs: map
    for f in (lengths, total, svc):
        f.close()

"""The worker never dies and no caller waits forever, whatever raises where."""
import asyncio
import threading

import pytest

import rlbatch
from rlbatch.batching.collate import ListCollator


class Boom(Exception):
    pass


def serve_three(svc):
    """Three requests (two Futures, one blocking call in a thread): each gets a result or an error."""
    futures = [svc.submit(1), svc.submit(2)]
    out = {}

    def call():
        try:
            out["value"] = svc(3)
        except BaseException as e:  # noqa: BLE001
            out["error"] = e

    t = threading.Thread(target=call)
    t.start()
    t.join(10)
    assert not t.is_alive(), "a blocking caller was left waiting"
    for f in futures:
        f.exception(timeout=10)  # done, one way or the other
    return futures, out


@pytest.mark.parametrize("stage", ["gather", "scatter"])
def test_a_fault_in_collation_fails_its_batch_and_the_service_serves_on(monkeypatch, stage):
    svc = rlbatch.BatchedService(lambda xs: xs, max_batch_size=8, max_delay=0.01, implicit_callers=False)
    original = getattr(ListCollator, stage)
    failing = {"left": 1}

    def faulty(self, *args):
        if failing["left"]:
            failing["left"] -= 1
            raise Boom(stage)
        return original(self, *args)

    monkeypatch.setattr(ListCollator, stage, faulty)
    futures, out = serve_three(svc)
    errors = [f.exception() for f in futures] + [out.get("error")]
    assert any(isinstance(e, Boom) for e in errors)
    assert svc(4) == 4 and svc.submit(5).result(10) == 5  # the worker is alive
    svc.close()


def test_a_fault_in_the_statistics_costs_no_caller_its_result(monkeypatch):
    svc = rlbatch.BatchedService(lambda xs: xs, max_batch_size=8, max_delay=0.01)

    def broken(*args):
        raise Boom("stats")

    monkeypatch.setattr(svc._stats, "record_batch", broken)
    futures, out = serve_three(svc)
    assert [f.result() for f in futures] == [1, 2] and out == {"value": 3}
    svc.close()


def test_a_fault_while_forming_a_batch_fails_the_queued_requests_and_serving_goes_on(monkeypatch):
    svc = rlbatch.BatchedService(lambda xs: xs, max_batch_size=8, max_delay=0.05, implicit_callers=False)
    queue = svc._worker.queue
    original = queue.take
    failing = {"left": 1}

    def faulty(*args):
        if failing["left"]:
            failing["left"] -= 1
            raise Boom("take")
        return original(*args)

    monkeypatch.setattr(queue, "take", faulty)
    futures, out = serve_three(svc)
    errors = [f.exception() for f in futures] + [out.get("error")]
    assert any(isinstance(e, Boom) for e in errors)
    assert svc.submit(4).result(10) == 4
    svc.close()


def test_a_done_callback_that_raises_base_exception_does_not_stop_the_others():
    svc = rlbatch.BatchedService(lambda xs: xs, max_batch_size=8, max_delay=0.05)
    first = svc.submit(1)
    first.add_done_callback(lambda f: (_ for _ in ()).throw(KeyboardInterrupt()))
    second = svc.submit(2)
    assert first.result(10) == 1 and second.result(10) == 2
    assert svc.submit(3).result(10) == 3
    svc.close()


def test_close_fails_every_request_left_whatever_the_worker_is_doing():
    entered, release = threading.Event(), threading.Event()

    def stuck(xs):
        entered.set()
        release.wait(10)
        return xs

    svc = rlbatch.BatchedService(stuck, max_batch_size=1, max_delay=0.0)
    running = svc.submit("running")
    entered.wait(10)
    queued = [svc.submit(i) for i in range(3)]
    assert svc.close(timeout=0.05) is False  # the worker is inside the batch function
    release.set()
    assert svc.close(timeout=10) is True
    assert running.result(0) == "running" and [f.result(0) for f in queued] == [0, 1, 2]


def test_deferred_start_queues_until_start_and_close_runs_what_was_queued():
    ran = []
    svc = rlbatch.BatchedService(lambda xs: ran.extend(xs) or xs, max_batch_size=4, max_delay=0.0, start=False)
    first = svc.submit(1)
    assert not first.done() and svc._worker.threads == () and ran == []
    svc.start()
    assert first.result(10) == 1
    later = rlbatch.BatchedService(lambda xs: xs, start=False)
    queued = later.submit(2)
    later.close()  # never started: the queue still runs
    assert queued.result(0) == 2
    hard = rlbatch.BatchedService(lambda xs: xs, start=False)
    dropped = hard.submit(3)
    hard.close(cancel_pending=True)
    with pytest.raises(rlbatch.ServiceClosed):
        dropped.result(0)
    with pytest.raises(rlbatch.ServiceClosed):
        hard.start()


def test_an_async_batch_function_runs_on_the_workers_own_loop():
    loops = []

    async def double(xs):
        loops.append(asyncio.get_running_loop())
        await asyncio.sleep(0)
        return [2 * x for x in xs]

    svc = rlbatch.BatchedService(double, max_batch_size=4, max_delay=0.01)
    assert svc(3) == 6
    assert [f.result(10) for f in svc.submit_many([1, 2])] == [2, 4]

    async def from_a_caller_loop():
        return await svc.acall(5)

    assert asyncio.run(from_a_caller_loop()) == 10
    assert len(set(map(id, loops))) == 1  # one loop, the worker's
    svc.close()
    assert loops[0].is_closed()

"""Property test: random concurrent submit / cancel / deadline / close from many threads.

Whatever happens, every request ends with exactly f(its own input) or a typed error; nothing is
lost, nothing runs twice, and each thread's requests of one priority run in submission order.
"""
import concurrent.futures
import threading

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rlbatch

OPS = st.tuples(st.sampled_from(["call", "submit", "cancel", "deadline", "rows", "timed-call"]), st.integers(0, 2))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    plans=st.lists(st.lists(OPS, min_size=1, max_size=12), min_size=1, max_size=6),
    max_batch_size=st.integers(1, 5),
    max_delay=st.sampled_from([0.0, 0.001, 0.01]),
    close_after=st.one_of(st.none(), st.integers(0, 30)),
    cancel_pending=st.booleans(),
)
def test_every_request_gets_its_own_result_or_a_typed_error(plans, max_batch_size, max_delay, close_after,
                                                              cancel_pending):
    ran = []
    ran_lock = threading.Lock()

    def fn(xs):
        with ran_lock:
            ran.extend(xs)
        return [("f", x) for x in xs]

    svc = rlbatch.BatchedService(fn, max_batch_size=max_batch_size, max_delay=max_delay)
    outcomes = {}  # value -> ("ok", result) | ("error", exception type)
    submitted = threading.Semaphore(0)

    def record(value, fut_or_call):
        try:
            outcomes[value] = ("ok", fut_or_call())
        except (rlbatch.ServiceClosed, concurrent.futures.CancelledError, rlbatch.DeadlineExceeded) as e:
            outcomes[value] = ("error", type(e))

    def worker(t, plan):
        futures = []
        for i, (kind, priority) in enumerate(plan):
            value = (t, i, priority)
            try:
                if kind == "call":
                    record(value, lambda: svc(value, priority=priority))
                elif kind == "timed-call":  # a blocking call with a deadline it always meets here
                    record(value, lambda: svc(value, priority=priority, timeout=30))
                elif kind == "rows":
                    f = svc.submit_rows([value, value + ("r",)], priority=priority)
                    futures.append((value, f))
                else:
                    f = svc.submit(value, priority=priority, timeout=0.0005 if kind == "deadline" else None)
                    if kind == "cancel":
                        f.cancel()
                    futures.append((value, f))
            except rlbatch.ServiceClosed as e:
                outcomes[value] = ("refused", type(e))
            submitted.release()
        for value, f in futures:
            record(value, f.result)

    threads = [threading.Thread(target=worker, args=(t, plan)) for t, plan in enumerate(plans)]
    for th in threads:
        th.start()
    if close_after is not None:
        for _ in range(min(close_after, sum(map(len, plans)))):
            submitted.acquire()
        svc.close(cancel_pending=cancel_pending)
    for th in threads:
        th.join(30)
        assert not th.is_alive(), "a caller was left waiting"
    svc.close()

    expected = {(t, i, p) for t, plan in enumerate(plans) for i, (_, p) in enumerate(plan)}
    assert set(outcomes) == expected  # nothing lost
    assert len(ran) == len(set(ran))  # nothing ran twice
    # the queue's books are balanced: nothing counted as queued, plain or not, once all is done
    svc._worker.queue.check()
    assert (svc._worker.queue.pending, svc._worker.queue.pending_rows) == (0, 0)
    ran_set = set(ran)
    for t, plan in enumerate(plans):
        for i, (kind, p) in enumerate(plan):
            value = (t, i, p)
            status, detail = outcomes[value]
            if status == "ok":
                want = [("f", value), ("f", value + ("r",))] if kind == "rows" else ("f", value)
                assert detail == want  # exactly f(its own input)
                assert value in ran_set
            else:
                assert value not in ran_set or kind in ("cancel", "deadline")
                if kind not in ("cancel", "deadline"):
                    assert detail is rlbatch.ServiceClosed
    # FIFO within one thread and one priority (requests that ran)
    for t, plan in enumerate(plans):
        for p in range(3):
            seq = [v[1] for v in ran if len(v) == 3 and v[0] == t and v[2] == p]
            assert seq == sorted(seq)

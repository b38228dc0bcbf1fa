"""RequestQueue without threads: order, counters, known callers, deadlines and their invariants."""
import concurrent.futures
import threading

import pytest

from rlbatch.batching.callers import Caller
from rlbatch.batching.queue import RequestQueue
from rlbatch.batching.request import PENDING, TAKEN, Request, SplitRequest, is_special


def blocking(value, t0=0.0, priority=0, caller=None, deadline=None, rows=None):
    """A request as a blocking call makes it (it waits on its own lock)."""
    r = Request(value, rows, priority, t0, deadline, caller, None)
    r.lock = threading.Lock()
    r.lock.acquire()
    return r


def future(value, t0=0.0, priority=0, caller=None, deadline=None, rows=None):
    return Request(value, rows, priority, t0, deadline, caller, concurrent.futures.Future())


def counted_caller(q):
    c = Caller(service=None)
    q.set_active(c, True)
    return c


def values(requests):
    return [r.values for r in requests]


def test_plain_requests_are_taken_oldest_first_in_batches_of_max_rows():
    q = RequestQueue()
    for i in range(10):
        q.push(blocking(i, t0=i), special=False)
    taken, rows, plain = q.take(4, now=10.0, starvation_timeout=1.0)
    assert (values(taken), rows, plain) == ([0, 1, 2, 3], 4, True)
    assert values(q.take(4, 10.0, 1.0)[0]) == [4, 5, 6, 7]
    assert values(q.take(4, 10.0, 1.0)[0]) == [8, 9]
    assert (q.pending, q.pending_rows) == (0, 0)
    q.check()


def test_mixed_requests_keep_fifo_and_say_they_are_not_plain():
    q = RequestQueue()
    reqs = [blocking(0), future(1), blocking(2, deadline=5.0), blocking(3)]
    for r in reqs:
        q.push(r, is_special(r))
    assert q.special == 2
    taken, rows, plain = q.take(3, 0.0, 1.0)
    assert (values(taken), rows, plain) == ([0, 1, 2], 3, False)
    assert all(r.state == TAKEN for r in taken)
    assert q.take(3, 0.0, 1.0)[2] is True  # what is left is plain again
    q.check()


def test_priorities_go_first_fifo_within_a_level_and_a_starving_level_goes_before_them():
    q = RequestQueue()
    q.push_many([future("low0", t0=0.0), future("high0", t0=1.0, priority=5), future("low1", t0=2.0),
                 future("high1", t0=3.0, priority=5)])
    assert values(q.take(3, now=3.5, starvation_timeout=10.0)[0]) == ["high0", "high1", "low0"]
    q.push(future("high2", t0=4.0, priority=5), special=True)
    # low1 has waited 9 s > starvation_timeout=5 s: its level goes first.
    assert values(q.take(1, now=11.0, starvation_timeout=5.0)[0]) == ["low1"]
    q.check()


def test_a_multi_row_request_stays_whole_and_stops_its_level():
    q = RequestQueue()
    q.push_many([future("a", rows=3), future("b", rows=3), future("c")])
    taken, rows, _ = q.take(4, 0.0, 1.0)
    assert (values(taken), rows) == (["a"], 3)  # b does not fit in the 1 row left, c waits behind it
    assert (q.pending, q.pending_rows) == (2, 4)
    q.check()


def test_known_callers_all_waiting_only_while_each_has_a_request_queued():
    q = RequestQueue()
    a, b = counted_caller(q), counted_caller(q)
    q.push(blocking(1, caller=a), special=False)
    assert not q.all_callers_waiting
    q.push(blocking(2, caller=b), special=False)
    q.push(blocking(3, caller=b), special=False)
    assert q.all_callers_waiting and (q.waiting_callers, a.outstanding, b.outstanding) == (2, 1, 2)
    q.take(2, 0.0, 1.0)  # takes a's request and b's first: b still waits
    assert (q.waiting_callers, a.outstanding, b.outstanding) == (1, 0, 1)
    assert not q.all_callers_waiting
    q.check(callers=[a, b])


def test_a_paused_caller_does_not_count_and_counts_again_when_resumed():
    q = RequestQueue()
    a, b = counted_caller(q), counted_caller(q)
    q.push(blocking(1, caller=a), special=False)
    q.set_active(b, False)  # b is busy elsewhere
    assert q.all_callers_waiting and q.active_callers == 1
    q.set_active(b, True)
    assert not q.all_callers_waiting
    q.push(blocking(2, caller=b), special=False)
    q.set_active(b, False)  # paused with a request queued: neither active nor waiting
    assert (q.active_callers, q.waiting_callers) == (1, 1)
    q.check(callers=[a, b])


def test_a_callers_request_that_expires_stops_counting_the_caller_as_waiting():
    q = RequestQueue()
    a, b = counted_caller(q), counted_caller(q)
    q.push(future(1, caller=a, deadline=1.0), special=True)
    q.push(future(2, caller=b), special=True)
    assert q.all_callers_waiting
    expired = q.expire(now=2.0)
    assert values(expired) == [1] and expired[0].state == TAKEN
    # a has nothing queued any more: the others must not be flushed early on its account.
    assert (a.outstanding, q.waiting_callers, q.all_callers_waiting) == (0, 1, False)
    q.check(callers=[a, b])


def test_expire_takes_only_due_requests_and_skips_those_already_taken():
    q = RequestQueue()
    early, late = future("early", deadline=1.0), future("late", deadline=9.0)
    q.push(early, special=True)
    assert q.push(late, special=True) is False  # not the earliest deadline
    assert q.push(future("earliest", deadline=0.5), special=True) is True
    q.take(1, 0.0, 1.0)  # takes "early" (FIFO), whose heap entry stays behind
    assert values(q.expire(now=2.0)) == ["earliest"]
    assert q.next_deadline() == 9.0 and late.state == PENDING
    q.check()


def test_drain_empties_the_queue_but_can_keep_the_rest_of_a_split_request_that_started():
    q = RequestQueue()
    started = SplitRequest(concurrent.futures.Future(), 2, join=list)
    started.claim_part()
    part = future("part", rows=2)
    part.future, part.parent, part.index = None, started, 1
    q.push_many([future("x"), part, future("y")])
    drained = q.drain(keep_started=True)
    assert values(drained) == ["x", "y"] and (q.pending, q.pending_rows) == (1, 2)
    assert values(q.drain()) == ["part"]
    q.check()


def test_check_names_a_broken_counter():
    q = RequestQueue()
    q.push(blocking(1), special=False)
    q.pending_rows += 1
    with pytest.raises(AssertionError, match="pending_rows is 2, expected 1"):
        q.check()

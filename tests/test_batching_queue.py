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
    q.take(2, 0.0, 1.0)  # b's last request: nobody waits
    assert (q.waiting_callers, b.outstanding) == (0, 0)
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


def test_plain_requests_at_two_priority_levels_are_all_taken_highest_first():
    q = RequestQueue()
    q.push(blocking("low"), special=False)
    q.push(blocking("high", priority=5), special=False)
    taken, rows, plain = q.take(8, 0.0, 1.0)
    assert (values(taken), rows, plain) == (["high", "low"], 2, True)
    q.check()


def test_a_blocking_call_with_a_deadline_is_not_plain():
    q = RequestQueue()
    q.push(blocking("a", deadline=9.0), special=True)
    assert q.take(8, 0.0, 1.0)[2] is False


def test_a_level_starves_only_past_the_starvation_timeout_and_the_oldest_starving_level_goes_first():
    q = RequestQueue()
    q.push_many([future("low", t0=100.0), future("high", t0=100.5, priority=5)])
    assert values(q.take(1, now=101.0, starvation_timeout=50.0)[0]) == ["high"]  # 1 s < 50 s: no starvation
    q.take(1, 101.0, 50.0)
    q.push_many([future("mid-older", t0=-1.0, priority=1), future("low-old", t0=0.0), future("top", t0=5.0, priority=9)])
    # Both lower levels starve; the one whose oldest request is older goes first, then the other.
    assert values(q.take(3, now=10.0, starvation_timeout=2.0)[0]) == ["mid-older", "low-old", "top"]


def test_a_request_expires_at_its_deadline_exactly_and_equal_deadlines_are_not_earlier():
    q = RequestQueue()
    assert q.push(future("a", deadline=2.0), special=True) is True
    assert q.push(future("b", deadline=2.0), special=True) is False
    assert values(q.expire(now=2.0)) == ["a", "b"]


def test_the_rest_of_a_split_request_that_started_does_not_expire_and_survives_a_drain():
    q = RequestQueue()
    started = SplitRequest(concurrent.futures.Future(), 2, join=list)
    started.claim_part()
    part = future("part", deadline=1.0)
    part.future, part.parent, part.index = None, started, 1
    q.push(part, special=True)
    assert q.expire(now=5.0) == [] and q.pending == 1
    assert q.drain(keep_started=True) == [] and q.pending == 1  # a level holding only that part
    q.check()


def test_taking_the_last_requests_of_callers_paused_or_not_keeps_the_counts():
    q = RequestQueue()
    a, b = counted_caller(q), counted_caller(q)
    q.push(blocking(1, caller=a), special=False)
    q.push(blocking(2, caller=b), special=False)
    q.set_active(b, False)  # paused with a request queued
    q.take(8, 0.0, 1.0)
    assert (q.waiting_callers, a.outstanding, b.outstanding) == (0, 0, 0)
    q.check(callers=[a, b])


def test_several_callers_leaving_in_one_batch_of_futures_all_stop_waiting():
    q = RequestQueue()
    a, b, c = counted_caller(q), counted_caller(q), counted_caller(q)
    q.push_many([future(1, caller=a), future(2, caller=b), future(3, caller=c), future(4, caller=c)])
    assert q.waiting_callers == 3
    q.take(3, 0.0, 1.0)
    assert (q.waiting_callers, c.outstanding) == (1, 1)
    q.set_active(c, False)
    q.take(3, 0.0, 1.0)  # a paused caller's last request: it was not counted as waiting
    assert q.waiting_callers == 0
    q.check(callers=[a, b, c])


def test_push_many_says_whether_any_request_has_the_earliest_deadline():
    q = RequestQueue()
    q.push(future("x", deadline=3.0), special=True)
    assert q.push_many([future("b", deadline=1.0), future("a", deadline=5.0)]) is True
    assert RequestQueue().next_deadline() is None
    assert q.push_many([future("c", deadline=7.0), future("d")]) is False


def test_expire_looks_past_entries_of_requests_already_taken():
    q = RequestQueue()
    q.push_many([future("first", deadline=1.0), future("second", deadline=2.0)])
    q.take(1, 0.0, 1.0)  # "first" leaves its heap entry on top
    expired = q.expire(now=3.0)
    assert values(expired) == ["second"]
    drained_queue = RequestQueue()
    kept = future("kept")
    drained_queue.push(kept, special=True)
    drained_queue.drain()
    assert kept.state == TAKEN  # off the queue: a later expire or take must not see it as queued


def test_two_callers_leaving_in_one_batch_of_plain_calls_both_stop_waiting():
    q = RequestQueue()
    a, b = counted_caller(q), counted_caller(q)
    q.push(blocking(1, caller=a), special=False)
    q.push(blocking(2, caller=b), special=False)
    assert q.take(8, 0.0, 1.0)[2] is True and q.waiting_callers == 0
    q.check(callers=[a, b])


def test_expire_looks_past_a_started_split_part_whose_deadline_has_passed():
    q = RequestQueue()
    started = SplitRequest(concurrent.futures.Future(), 2, join=list)
    started.claim_part()
    part = future("part", deadline=1.0)
    part.future, part.parent, part.index = None, started, 1
    q.push(part, special=True)
    q.push(future("due", deadline=2.0), special=True)
    assert values(q.expire(now=3.0)) == ["due"] and q.pending == 1

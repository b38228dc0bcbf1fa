"""TrajectoryQueue: FIFO order, the on_full policies, stop, and pausing a blocked producer."""
import threading

import pytest

from rlbatch.actors.queue import TrajectoryQueue
from rlbatch.errors import PoolStopped


def test_items_come_out_in_the_order_they_went_in():
    q = TrajectoryQueue(3, "block")
    for item in "abc":
        assert q.put(item)
    assert len(q) == 3
    assert [q.get(timeout=0) for _ in range(3)] == ["a", "b", "c"]
    assert len(q) == 0


def test_drop_oldest_discards_the_oldest_item_and_counts_each():
    q = TrajectoryQueue(2, "drop_oldest")
    for item in range(5):
        assert q.put(item)
    assert q.dropped == 3
    assert [q.get(timeout=0), q.get(timeout=0)] == [3, 4]  # the newest two are kept


def test_get_on_an_empty_queue_times_out():
    q = TrajectoryQueue(1, "block")
    with pytest.raises(TimeoutError, match="no trajectory within 0 s"):
        q.get(timeout=0)


def test_a_stopped_queue_hands_out_what_is_left_then_raises_with_the_first_reason():
    q = TrajectoryQueue(2, "block")
    q.put("a")
    q.stop("the first reason")
    q.stop("a later reason")
    assert not q.put("b")
    assert q.get(timeout=0) == "a"
    with pytest.raises(PoolStopped, match="^the first reason$"):
        q.get(timeout=0)


def test_stop_without_a_reason_says_the_pool_was_stopped():
    q = TrajectoryQueue(1, "block")
    q.stop()
    q.stop("too late to count")
    with pytest.raises(PoolStopped, match="^the actor pool was stopped and no trajectory is left$"):
        q.get(timeout=0)


class _PauseRecorder:
    def __init__(self):
        self.calls = []
        self.paused = threading.Event()

    def pause(self):
        self.calls.append("pause")
        self.paused.set()

    def resume(self):
        self.calls.append("resume")


def test_a_blocked_producer_pauses_its_caller_until_there_is_room():
    q = TrajectoryQueue(1, "block")
    q.put("first")
    caller = _PauseRecorder()
    result = []
    producer = threading.Thread(target=lambda: result.append(q.put("second", caller)))
    producer.start()
    assert caller.paused.wait(10)  # the producer is blocked on the full queue
    assert q.get(timeout=10) == "first"
    producer.join(10)
    assert not producer.is_alive()
    assert result == [True] and caller.calls == ["pause", "resume"]
    assert q.get(timeout=0) == "second"


def test_stop_wakes_a_blocked_producer_which_reports_the_item_not_queued():
    q = TrajectoryQueue(1, "block")
    q.put("first")
    caller = _PauseRecorder()
    result = []
    producer = threading.Thread(target=lambda: result.append(q.put("second", caller)))
    producer.start()
    assert caller.paused.wait(10)
    q.stop()
    producer.join(10)
    assert not producer.is_alive()
    assert result == [False] and caller.calls == ["pause", "resume"]


def test_a_producer_that_does_not_block_never_pauses_its_caller():
    q = TrajectoryQueue(1, "drop_oldest")
    caller = _PauseRecorder()
    q.put("a", caller)
    q.put("b", caller)
    assert caller.calls == []


@pytest.mark.parametrize("maxsize, on_full, message", [
    (0, "block", "expected maxsize to be a positive int, got 0"),
    (2, "drop_newest", "expected on_full to be one of .*, got 'drop_newest'"),
])
def test_bad_settings_are_refused(maxsize, on_full, message):
    with pytest.raises(ValueError, match=message):
        TrajectoryQueue(maxsize, on_full)

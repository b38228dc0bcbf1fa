"""rlbatch.compat.ubatch: uBatch 1.0.0's public behaviour, and the faults it fixes.

No test measures time: batches are made deterministic by queueing inputs before start() (uBatch
queues them), by max_size (a full batch goes at once) or by a timeout long enough never to pass.
"""
import functools
import logging
import threading

import pytest

from rlbatch.errors import BatchOutputError, InvalidRequest, ServiceClosed
from rlbatch.compat import ubatch as ubatch_pkg
from rlbatch.compat.ubatch import BadBatchOutputSize, HandlerAlreadySet, HandlerNotSet, UBatch, ubatch_decorator
from tests.conftest import wait_until

NEVER = 600.0  # a timeout no batch in these tests waits out


def squares(xs):
    return [x * x for x in xs]


class Calls:
    """Runs `fn(i)` for each input on its own thread; keeps each thread's result or exception."""

    def __init__(self):
        self.results, self.errors, self.threads = {}, {}, []

    def start(self, fn, *args, key=None, **kwargs):
        key = args[0] if key is None else key

        def run():
            try:
                self.results[key] = fn(*args, **kwargs)
            except BaseException as e:  # noqa: BLE001 - the test looks at it
                self.errors[key] = e

        t = threading.Thread(target=run)
        self.threads.append(t)
        t.start()

    def join(self):
        for t in self.threads:
            t.join(60)
        assert not any(t.is_alive() for t in self.threads), "a caller still waits"


def queue_in_order(mb, calls, inputs, **kwargs):
    """Queues one input per thread before start(), in the given order."""
    for n, x in enumerate(inputs, 1):
        calls.start(mb.ubatch, x, **kwargs)
        wait_until(lambda: mb.stats.pending == n)


def recording(fn):
    """A handler that records the arguments of each call."""
    seen = []

    def handler(*args, **kwargs):
        seen.append((args, kwargs))
        return fn(*args, **kwargs)

    handler.seen = seen
    return handler


# ---------------------------------------------------------------------------- public names


def test_public_names_and_module_layout():
    assert ubatch_pkg.__all__ == ["UBatch", "HandlerNotSet", "HandlerAlreadySet", "BadBatchOutputSize",
                                  "ubatch_decorator"]
    from rlbatch.compat.ubatch.decorators import UBatchWrapper, ubatch_decorator as deco
    from rlbatch.compat.ubatch.ubatch import UBatch as cls

    assert cls is UBatch and deco is ubatch_decorator
    assert isinstance(ubatch_decorator(max_size=2, timeout=NEVER)(squares), UBatchWrapper)


def test_ubatch_is_generic_as_in_type_annotations():
    mb = UBatch[int, int](max_size=3, timeout=0.5)
    assert isinstance(mb, UBatch)
    assert (mb.max_size, mb.timeout) == (3, 0.5)


# ---------------------------------------------------------------------------- batches


def test_backlog_queued_before_start_goes_in_full_batches_oldest_first():
    mb = UBatch(max_size=5, timeout=0.0)
    handler = recording(squares)
    mb.set_handler(handler)
    calls = Calls()
    queue_in_order(mb, calls, range(11))
    assert handler.seen == []  # not started by use
    mb.start()
    calls.join()
    mb.stop()
    assert [args for args, _ in handler.seen] == [([0, 1, 2, 3, 4],), ([5, 6, 7, 8, 9],), ([10],)]
    assert calls.results == {i: i * i for i in range(11)}


def test_handler_gets_plain_lists_positional_and_keyword_as_called():
    mb = UBatch(max_size=3, timeout=0.0)
    handler = recording(lambda xs, mode: [x if m == "id" else -x for x, m in zip(xs, mode)])
    mb.set_handler(handler)
    calls = Calls()
    for n, (x, m) in enumerate([(1, "id"), (2, "neg"), (3, "id")], 1):
        calls.start(mb.ubatch, x, mode=m)
        wait_until(lambda: mb.stats.pending == n)
    mb.start()
    calls.join()
    mb.stop()
    assert handler.seen == [(([1, 2, 3],), {"mode": ["id", "neg", "id"]})]
    args, kwargs = handler.seen[0]
    assert type(args[0]) is list and type(kwargs["mode"]) is list
    assert calls.results == {1: 1, 2: -2, 3: 3}


def test_a_list_argument_is_one_input():
    mb = UBatch(max_size=4, timeout=0.0)
    handler = recording(lambda xs: [len(x) for x in xs])
    mb.set_handler(handler)
    mb.start()
    try:
        assert mb.ubatch([1, 2, 3]) == 3
    finally:
        mb.stop()
    assert handler.seen == [(([[1, 2, 3]],), {})]


def test_a_full_batch_goes_without_waiting_for_the_timeout():
    mb = UBatch(max_size=3, timeout=NEVER)
    mb.set_handler(squares)
    mb.start()
    calls = Calls()
    for i in range(3):
        calls.start(mb.ubatch, i)
    calls.join()
    mb.stop()
    assert calls.results == {0: 0, 1: 1, 2: 4}
    assert mb.stats.batch_triggers["full"] == 1 and mb.stats.batches == 1


def test_independent_callers_never_flush_early():
    # Ten threads, max_size 5 and a timeout that never passes: only full batches can go, even
    # when each thread waits alone (rlbatch's own services would flush a lone known caller).
    mb = UBatch(max_size=5, timeout=NEVER)
    handler = recording(squares)
    mb.set_handler(handler)
    mb.start()
    calls = Calls()
    for i in range(10):
        calls.start(mb.ubatch, i)
    calls.join()
    mb.stop()
    batches = [args[0] for args, _ in handler.seen]
    assert [len(b) for b in batches] == [5, 5]
    assert sorted(batches[0] + batches[1]) == list(range(10))
    assert calls.results == {i: i * i for i in range(10)}


def test_a_lone_input_goes_by_its_timeout():
    mb = UBatch(max_size=10, timeout=0.01)
    mb.set_handler(squares)
    mb.start()
    try:
        assert mb.ubatch(7) == 49
        triggers = {k: n for k, n in mb.stats.batch_triggers.items() if n}
        assert triggers == {"delay": 1}
    finally:
        mb.stop()


def test_max_size_and_timeout_can_change_while_running():
    mb = UBatch(max_size=10, timeout=NEVER)
    mb.set_handler(squares)
    mb.start()
    calls = Calls()
    calls.start(mb.ubatch, 3)
    wait_until(lambda: mb.stats.pending == 1)
    mb.max_size = 1  # the waiting input now makes a full batch
    calls.join()
    assert calls.results == {3: 9} and mb.max_size == 1
    mb.timeout = 0.0
    assert mb.ubatch(4) == 16 and mb.timeout == 0.0
    mb.stop()
    with pytest.raises(ValueError, match="max_size must be a positive int, got 0"):
        mb.max_size = 0
    with pytest.raises(ValueError, match="timeout must be a number of seconds >= 0, got -1"):
        mb.timeout = -1


def test_constructor_checks_its_arguments():
    with pytest.raises(ValueError, match="max_size must be a positive int, got 0"):
        UBatch(max_size=0, timeout=1.0)
    with pytest.raises(ValueError, match=r"timeout must be a number of seconds >= 0, got '1'"):
        UBatch(max_size=1, timeout="1")


# ---------------------------------------------------------------------------- the handler


def test_the_handler_is_looked_up_when_each_batch_runs():
    mb = UBatch(max_size=1, timeout=0.0)
    mb.set_handler(squares)
    mb._handler = recording(lambda xs: [-x for x in xs])  # as mocker.spy(mb, "_handler") does
    mb.start()
    try:
        assert mb.ubatch(2) == -2
        assert mb._handler.seen == [(([2],), {})]
    finally:
        mb.stop()


def test_set_handler_twice_raises_handler_already_set():
    mb = UBatch(max_size=1, timeout=0.0)
    mb.set_handler(squares)
    with pytest.raises(HandlerAlreadySet, match="already has a handler"):
        mb.set_handler(squares)
    with pytest.raises(TypeError, match="handler must be callable, got int"):
        UBatch(max_size=1, timeout=0.0).set_handler(3)


def test_start_without_handler_raises_handler_not_set():
    with pytest.raises(HandlerNotSet, match="call set_handler"):
        UBatch(max_size=1, timeout=0.0).start()


def test_a_handler_exception_reaches_every_caller_of_its_batch_and_the_worker_goes_on():
    class Boom(Exception):
        pass

    def handler(xs):
        if 1 in xs:
            raise Boom(xs)
        return squares(xs)

    mb = UBatch(max_size=2, timeout=0.0)
    mb.set_handler(handler)
    calls = Calls()
    queue_in_order(mb, calls, [0, 1, 2])
    mb.start()
    calls.join()
    try:
        assert set(calls.errors) == {0, 1} and calls.results == {2: 4}
        assert calls.errors[0] is calls.errors[1] and isinstance(calls.errors[0], Boom)
        assert mb.ubatch(5) == 25  # the worker survived
    finally:
        mb.stop()


def test_a_wrong_number_of_outputs_is_bad_batch_output_size_for_the_whole_batch():
    mb = UBatch(max_size=2, timeout=0.0)
    mb.set_handler(lambda xs: xs[:1])
    calls = Calls()
    queue_in_order(mb, calls, [1, 2])
    mb.start()
    calls.join()
    mb.stop()
    assert set(calls.errors) == {1, 2}
    err = calls.errors[1]
    assert isinstance(err, BadBatchOutputSize) and isinstance(err, BatchOutputError)
    assert (err.input_size, err.output_size) == (2, 1)
    assert err.message == str(err) == "Output size: 1 differs from the input size: 2"


def test_an_output_without_length_fails_its_batch():
    mb = UBatch(max_size=1, timeout=0.0)
    mb.set_handler(lambda xs: 5)
    mb.start()
    try:
        with pytest.raises(BatchOutputError, match="must return a sequence of 1 results"):
            mb.ubatch(1)
    finally:
        mb.stop()


def test_an_exception_instance_among_the_outputs_fails_that_caller_alone():
    mb = UBatch(max_size=2, timeout=0.0)
    mb.set_handler(lambda xs: [ValueError(f"bad {x}") if x < 0 else x for x in xs])
    calls = Calls()
    queue_in_order(mb, calls, [-1, 1])
    mb.start()
    calls.join()
    mb.stop()
    assert calls.results == {1: 1}
    assert str(calls.errors[-1]) == "bad -1"


def test_every_input_needs_the_argument_layout_of_the_first():
    mb = UBatch(max_size=1, timeout=0.0)
    mb.set_handler(lambda xs, mode=None: xs)
    mb.start()
    try:
        assert mb.ubatch(1, mode="a") == 1
        with pytest.raises(InvalidRequest, match=r"expected 1 positional and keyword arguments \['mode'\]"):
            mb.ubatch(2)
        assert mb.ubatch(3, mode="b") == 3
    finally:
        mb.stop()


def test_keywords_named_like_rlbatch_options_reach_the_handler():
    mb = UBatch(max_size=1, timeout=0.0)
    mb.set_handler(lambda xs, timeout, priority: [(x, t, p) for x, t, p in zip(xs, timeout, priority)])
    mb.start()
    try:
        assert mb.ubatch(1, timeout=5, priority="high") == (1, 5, "high")
    finally:
        mb.stop()


# ---------------------------------------------------------------------------- start and stop


def test_start_returns_self_and_is_idempotent(no_thread_leak):
    mb = UBatch(max_size=1, timeout=0.0)
    mb.set_handler(squares)
    assert mb.start() is mb
    assert mb.start() is mb
    assert mb.ubatch(3) == 9
    mb.stop()


def test_calls_before_start_warn_that_ubatch_is_not_running(caplog):
    mb = UBatch(max_size=1, timeout=0.0)
    mb.set_handler(squares)
    calls = Calls()
    with caplog.at_level(logging.WARNING, logger="rlbatch.compat.ubatch.ubatch"):
        queue_in_order(mb, calls, [2])
    assert "ubatch is not running" in caplog.messages
    mb.start()
    calls.join()
    mb.stop()
    assert calls.results == {2: 4}


def test_stop_runs_every_input_already_queued(no_thread_leak):
    mb = UBatch(max_size=10, timeout=NEVER)
    mb.set_handler(squares)
    mb.start()
    calls = Calls()
    for i in range(3):
        calls.start(mb.ubatch, i)
    wait_until(lambda: mb.stats.pending == 3)
    mb.stop()  # does not wait out the timeout, and leaves nobody waiting
    calls.join()
    assert calls.results == {0: 0, 1: 1, 2: 4}


def test_stop_before_start_runs_the_queued_inputs(no_thread_leak):
    mb = UBatch(max_size=10, timeout=NEVER)
    mb.set_handler(squares)
    calls = Calls()
    queue_in_order(mb, calls, [4, 5])
    mb.stop()
    calls.join()
    assert calls.results == {4: 16, 5: 25}


def test_queued_inputs_without_a_handler_fail_with_handler_not_set_on_stop(no_thread_leak):
    mb = UBatch(max_size=10, timeout=NEVER)
    calls = Calls()
    queue_in_order(mb, calls, [1])
    mb.stop()
    calls.join()
    assert isinstance(calls.errors[1], HandlerNotSet)


def test_ubatch_after_stop_raises_and_start_serves_again(no_thread_leak):
    mb = UBatch(max_size=1, timeout=0.0)
    mb.set_handler(squares)
    mb.start()
    assert mb.ubatch(2) == 4
    mb.stop()
    with pytest.raises(ServiceClosed, match=r"UBatch is stopped; call start\(\) before ubatch\(\)"):
        mb.ubatch(3)
    mb.start()
    assert mb.ubatch(3) == 9
    mb.stop()
    mb.stop()  # twice is fine


# ---------------------------------------------------------------------------- the decorator


def test_decorated_function_called_directly_runs_on_lists_in_the_calling_thread():
    threads = []

    @ubatch_decorator(max_size=5, timeout=NEVER)
    def squared_cube(xs, modes):
        threads.append(threading.current_thread())
        return [x ** 2 if m == "square" else x ** 3 for x, m in zip(xs, modes)]

    try:
        assert squared_cube([1, 2, 3], ["square", "cube", "square"]) == [1, 8, 9]
        assert squared_cube(xs=[2], modes=["cube"]) == [8]
        assert threads == [threading.current_thread()] * 2
        assert squared_cube.__name__ == "squared_cube"
    finally:
        squared_cube.stop()


def test_decorated_ubatch_batches_one_input_per_call_with_several_parameters(no_thread_leak):
    seen = []

    @ubatch_decorator(max_size=4, timeout=NEVER)
    def squared_cube(xs, modes):
        seen.append((list(xs), list(modes)))
        return [x ** 2 if m == "square" else x ** 3 for x, m in zip(xs, modes)]

    calls = Calls()
    for i in range(8):
        calls.start(squared_cube.ubatch, i, "square" if i % 2 == 0 else "cube")
    calls.join()
    squared_cube.stop()
    assert calls.results == {i: i ** 2 if i % 2 == 0 else i ** 3 for i in range(8)}
    assert [len(xs) for xs, _ in seen] == [4, 4]
    for xs, modes in seen:
        assert modes == ["square" if x % 2 == 0 else "cube" for x in xs]


def test_decorating_a_partial_binds_the_unbatched_argument():
    def predict(model, xs):
        return [model + x for x in xs]

    wrapped = ubatch_decorator(max_size=1, timeout=0.0)(functools.partial(predict, 100))
    try:
        assert wrapped([1, 2]) == [101, 102]
        assert wrapped.ubatch(5) == 105
        assert (wrapped.max_size, wrapped.timeout) == (1, 0.0)
    finally:
        wrapped.stop()


def test_ubatch_decorator_needs_both_settings():
    with pytest.raises(TypeError):
        ubatch_decorator(max_size=5)
    with pytest.raises(TypeError, match="ubatch_decorator needs a callable, got int"):
        ubatch_decorator(max_size=5, timeout=0.1)(3)

"""rlbatch.compat.as_a_service: what as_a_service 1.0.3's README, docstrings and example notebook
show a user (the notebook's outputs are the expected results), then each fault of the original
that the compat fixes (the original would hang or lose the result in those tests).

No test waits out a delay to prove something: delays that must not matter are LONG, so a result
that arrives at all came by batch size, by a settings change or by stop().
"""
import concurrent.futures
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest

from rlbatch.compat.as_a_service import BatchedService, ServiceClosing, as_batched_service, as_service
from rlbatch.errors import BatchOutputError, ServiceClosed

LONG = 60.0
pytestmark = pytest.mark.usefixtures("no_thread_leak")  # every service is stopped and its worker joined


def recording(batches, fn=lambda xs: xs):
    """A batch function that records each batch it gets (as a list) and returns fn(batch)."""

    def batch_fn(xs):
        batches.append(list(xs))
        return fn(xs)

    return batch_fn


def blocking_first_batch(batches):
    """A batch function (identity) whose first batch waits for `release`; `started` says it runs."""
    started, release = threading.Event(), threading.Event()

    def batch_fn(xs):
        batches.append(list(xs))
        if len(batches) == 1:
            started.set()
            release.wait(LONG)
        return xs

    return batch_fn, started, release


# ---------------------------------------------------------------------- README

def test_readme_square_example_prints_its_batches_then_the_squares(capsys):
    @as_batched_service(batch_size=3, max_delay=0.1)
    def square(batch_xs):
        print("processing...", batch_xs)
        return [x_i ** 2 for x_i in batch_xs]

    futures = square.submit_many(range(10))
    print([f.result() for f in futures])
    square.stop()
    assert capsys.readouterr().out == (
        "processing... [0, 1, 2]\n"
        "processing... [3, 4, 5]\n"
        "processing... [6, 7, 8]\n"
        "processing... [9]\n"
        "[0, 1, 4, 9, 16, 25, 36, 49, 64, 81]\n")


def test_the_decorated_function_is_called_with_one_item_and_a_list_is_one_item():
    batches = []
    square = as_batched_service(batch_size=3, max_delay=0.01)(recording(batches, lambda xs: [x ** 2 for x in xs]))
    assert square(2.0) == 4.0
    lengths = as_batched_service(batch_size=3, max_delay=0.01)(recording(batches, lambda xs: [len(x) for x in xs]))
    assert lengths([1, 2, 3]) == 3
    assert lengths((4, 5)) == 2
    assert [f.result(LONG) for f in lengths.submit_many([[1], [2, 3]])] == [1, 2]
    square.stop()
    lengths.stop()
    assert batches[:3] == [[2.0], [[1, 2, 3]], [(4, 5)]]
    assert batches[3] == [[1], [2, 3]]


def test_readme_game_threads_share_one_service_then_stop():
    batches = []
    service = BatchedService(recording(batches, lambda xs: [2 * x for x in xs]), batch_size=32, max_delay=0.01)
    results = {}

    def play(i):
        results[i] = [service(100 * i + step) for step in range(5)]

    threads = [threading.Thread(target=play, args=(i,)) for i in range(100)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    service.stop()
    assert results == {i: [2 * (100 * i + step) for step in range(5)] for i in range(100)}
    assert sum(len(b) for b in batches) == 500
    assert max(len(b) for b in batches) <= 32
    assert not service.is_alive()


# ---------------------------------------------------------------------- the example notebook

W = np.random.default_rng(0).normal(size=(4, 2)).astype(np.float32)


def predict_action_probs_batch(observations):
    """The notebook's agent without torch: a list of observations -> (n, 2) action probabilities."""
    logits = np.asarray(observations, dtype=np.float32) @ W
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def play_a_game(predict_action_probs, seed, steps=20):
    """The notebook's agent-environment loop with random observations; returns the probabilities
    it got next to the ones the agent gives that observation alone."""
    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(steps):
        obs = rng.normal(size=4)
        pairs.append((predict_action_probs(obs), predict_action_probs_batch([obs])[0]))
    return pairs


@pytest.mark.parametrize("style", ["class", "decorator"])
def test_notebook_64_threads_each_get_their_own_row_of_probabilities(style):
    if style == "class":
        service = BatchedService(predict_action_probs_batch, batch_size=64, max_delay=1e-3)
    else:
        service = as_batched_service(batch_size=64, max_delay=1e-3)(predict_action_probs_batch)
    one = service(np.random.default_rng(1).normal(size=4))  # "works just like naive function"
    assert one.shape == (2,) and one.dtype == np.float32
    assert np.isclose(one.sum(), 1.0)
    with concurrent.futures.ThreadPoolExecutor(64) as pool:
        games = list(pool.map(lambda seed: play_a_game(service, seed), range(128)))
    service.stop()
    for pairs in games:
        for got, alone in pairs:
            assert got.shape == (2,)
            np.testing.assert_allclose(got, alone, rtol=1e-5)


def test_a_2d_array_result_gives_each_item_its_row():
    service = BatchedService(lambda xs: np.stack(xs) * 2, batch_size=2, max_delay=LONG)
    futures = service.submit_many([np.array([1, 2]), np.array([3, 4])])
    results = [f.result(LONG) for f in futures]  # a full batch goes without the delay
    service.stop()
    assert len(results) == 2
    np.testing.assert_array_equal(results[0], [2, 4])
    np.testing.assert_array_equal(results[1], [6, 8])


# ---------------------------------------------------------------------- docstrings

def test_as_service_runs_calls_one_at_a_time_in_submission_order():
    lock = threading.Lock()
    active, most_active, order = [0], [0], []

    @as_service()
    def write_read(value):
        with lock:
            active[0] += 1
            most_active[0] = max(most_active[0], active[0])
        order.append(value)
        with lock:
            active[0] -= 1
        return f"read {value}"

    assert [f.result(LONG) for f in write_read.submit_many(range(20))] == [f"read {i}" for i in range(20)]
    assert order == list(range(20))
    with concurrent.futures.ThreadPoolExecutor(5) as pool:
        assert list(pool.map(write_read, range(20, 30))) == [f"read {i}" for i in range(20, 30)]
    write_read.stop()
    assert most_active[0] == 1
    assert sorted(order) == list(range(30))


def test_start_false_queues_items_until_start():
    batches = []
    service = BatchedService(recording(batches), batch_size=3, max_delay=LONG, start=False)
    futures = [service.submit(i) for i in range(3)]
    assert not service.is_alive()
    assert service.queue.qsize() == 3 and not service.queue.empty()
    assert not any(f.done() for f in futures)
    assert batches == []
    service.start()
    assert service.is_alive()
    assert [f.result(LONG) for f in futures] == [0, 1, 2]  # a full batch goes without the delay
    service.stop()
    assert batches == [[0, 1, 2]]


def test_join_says_to_use_stop():
    service = BatchedService(lambda xs: xs, batch_size=2, max_delay=0.01)
    with pytest.raises(ValueError, match=r"Please use \.stop\(\.\.\.\) instead of \.join"):
        service.join()
    service.stop()


def test_submitting_after_stop_raises_assertion_error():
    service = BatchedService(lambda xs: xs, batch_size=2, max_delay=0.01)
    service.stop()
    for submit in (service.submit, service, lambda x: service.submit_many([x])):
        with pytest.raises(AssertionError, match="Service is closing, no new requests can be submitted"):
            submit(1)


def test_batch_size_changed_on_a_running_service_forms_the_next_batches():
    batches = []
    batch_fn, started, release = blocking_first_batch(batches)
    service = BatchedService(batch_fn, batch_size=1, max_delay=LONG)
    first = service.submit("a")
    assert started.wait(LONG)
    rest = service.submit_many(range(6))  # queued while the first batch runs
    service.batch_size = 3
    assert service.batch_size == 3
    release.set()
    assert [f.result(LONG) for f in rest] == list(range(6))
    assert first.result() == "a"
    service.stop()
    assert batches == [["a"], [0, 1, 2], [3, 4, 5]]


@pytest.mark.parametrize("max_delay", [0, -1.0])
def test_max_delay_must_be_positive(max_delay):
    with pytest.raises(AssertionError, match=r"delay must be non-negative\. Please set some small number"):
        BatchedService(lambda xs: xs, batch_size=2, max_delay=max_delay)
    with pytest.raises(AssertionError, match="delay must be non-negative"):
        as_batched_service(batch_size=2, max_delay=max_delay)(lambda xs: xs)


def test_a_call_that_times_out_raises_timeout_error_and_its_item_never_runs():
    batches = []
    service = BatchedService(recording(batches), batch_size=2, max_delay=LONG)
    with pytest.raises(concurrent.futures.TimeoutError):
        service("late", timeout=0.01)
    service.stop()
    assert batches == []


def test_max_queued_bounds_the_backlog():
    service = BatchedService(lambda xs: xs, batch_size=2, max_delay=LONG, max_queued=2, start=False)
    futures = service.submit_many([1, 2])
    assert service.queue.full() and service.queue.maxsize == 2
    service.start()
    assert [f.result(LONG) for f in futures] == [1, 2]
    service.stop()


def test_extra_results_are_ignored_and_any_iterable_is_read():
    # The original paired futures and results with zip: a padded output or a generator works.
    padded = BatchedService(lambda xs: list(xs) + ["pad"] * 3, batch_size=2, max_delay=LONG)
    assert [f.result(LONG) for f in padded.submit_many([1, 2])] == [1, 2]
    padded.stop()
    generated = BatchedService(lambda xs: (x * 10 for x in xs), batch_size=2, max_delay=LONG)
    assert [f.result(LONG) for f in generated.submit_many([1, 2])] == [10, 20]
    generated.stop()


# ---------------------------------------------------------------------- the original's faults, fixed

def test_soft_stop_runs_every_queued_item():
    # The original's stop() dropped the items its worker had gathered: these never resolved.
    batches = []
    service = BatchedService(recording(batches), batch_size=10, max_delay=LONG)
    futures = service.submit_many(range(5))
    service.stop()
    assert [f.result() for f in futures] == list(range(5))
    assert batches == [[0, 1, 2, 3, 4]]


def test_soft_stop_during_a_batch_runs_the_rest_in_batches_of_batch_size():
    # The original completed only the batch in flight ([0, 1]) and stranded 2..6.
    batches = []
    batch_fn, started, release = blocking_first_batch(batches)
    service = BatchedService(batch_fn, batch_size=2, max_delay=LONG)
    futures = service.submit_many(range(7))
    assert started.wait(LONG)
    service.stop(wait=False)
    release.set()
    service.stop()
    assert [f.result() for f in futures] == list(range(7))
    assert batches == [[0, 1], [2, 3], [4, 5], [6]]


def test_stop_of_a_service_never_started_runs_its_queue():
    # The original raised RuntimeError (cannot join thread before it is started).
    service = BatchedService(lambda xs: [x + 1 for x in xs], batch_size=5, max_delay=LONG, start=False)
    futures = service.submit_many(range(3))
    service.stop()
    assert [f.result() for f in futures] == [1, 2, 3]
    service.stop()  # twice is fine


def test_hard_stop_fails_queued_items_and_finishes_the_running_batch():
    # The original dropped the queued futures without resolving them.
    batches = []
    batch_fn, started, release = blocking_first_batch(batches)
    service = BatchedService(batch_fn, batch_size=1, max_delay=LONG)
    running = service.submit("running")
    assert started.wait(LONG)
    queued = service.submit_many(["q1", "q2"])
    service.stop(wait=False, hard=True)
    for f in queued:
        with pytest.raises(ServiceClosed, match="closed before this request ran"):
            f.result(LONG)
    release.set()
    service.stop()
    assert running.result() == "running"
    assert batches == [["running"]]


def test_an_exception_reaches_its_batch_and_the_service_keeps_serving():
    # The original's worker thread died: this batch and every later request hung.
    def fragile(xs):
        if "bad" in xs:
            raise KeyError("bad item")
        return [x.upper() for x in xs]

    service = BatchedService(fragile, batch_size=2, max_delay=LONG, start=False)
    failed = service.submit_many(["ok", "bad"])
    service.start()
    for f in failed:
        with pytest.raises(KeyError, match="bad item"):
            f.result(LONG)
    assert [f.result(LONG) for f in service.submit_many(["x", "y"])] == ["X", "Y"]
    service.stop()


def test_a_cancelled_future_is_skipped():
    # The original's set_result on a cancelled future raised in the worker and killed it.
    batches = []
    service = BatchedService(recording(batches), batch_size=3, max_delay=LONG, start=False)
    futures = service.submit_many(["a", "b", "c"])
    assert futures[1].cancel()
    service.start()
    service.stop()
    assert futures[0].result() == "a" and futures[2].result() == "c"
    assert batches == [["a", "c"]]


def test_too_few_results_fail_the_batch():
    # The original left the callers without a result waiting forever.
    short = BatchedService(lambda xs: xs[:-1], batch_size=2, max_delay=LONG)
    futures = short.submit_many([1, 2])
    for f in futures:
        with pytest.raises(BatchOutputError, match="returned 1 results for a batch of 2 items; expected one per item"):
            f.result(LONG)
    not_iterable = BatchedService(lambda xs: None, batch_size=1, max_delay=LONG)
    with pytest.raises(BatchOutputError, match="must return an iterable of 1 results .*got NoneType"):
        not_iterable(1)
    short.stop()
    not_iterable.stop()


def test_a_script_that_never_calls_stop_exits():
    # The original's worker was not a daemon thread: the interpreter waited for it forever.
    script = textwrap.dedent("""
        from rlbatch.compat.as_a_service import as_batched_service

        @as_batched_service(batch_size=4, max_delay=0.01)
        def double(xs):
            return [2 * x for x in xs]

        print(double(21))
    """)
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "42\n"


# ---------------------------------------------------------------------- rlbatch's own, beyond the original

def test_a_submit_after_stop_is_also_rlbatchs_service_closed():
    service = BatchedService(lambda xs: xs, batch_size=2, max_delay=0.01)
    service.stop()
    with pytest.raises(ServiceClosed, match=r"Service is closing.*expected submits before stop\(\)"):
        service.submit(1)
    assert issubclass(ServiceClosing, AssertionError) and issubclass(ServiceClosing, ServiceClosed)


def test_invalid_settings_are_value_errors_naming_what_came():
    with pytest.raises(ValueError, match="Expected max_delay > 0 seconds, got 0"):
        BatchedService(lambda xs: xs, batch_size=2, max_delay=0)
    with pytest.raises(ValueError, match="batch_size must be a positive int, got 'two'"):
        BatchedService(lambda xs: xs, batch_size="two", max_delay=0.01)
    service = BatchedService(lambda xs: xs, batch_size=np.int64(2), max_delay=np.float32(0.5), start=False)
    assert service.batch_size == 2 and isinstance(service.batch_size, int)
    with pytest.raises(ValueError, match="max_batch_size must be a positive int, got 0"):
        service.batch_size = 0  # the original's worker spun without serving anyone
    service.stop()


def test_max_delay_changed_on_a_running_service_applies_to_items_already_waiting():
    # The original read max_delay when its worker began gathering, so an item already waiting
    # kept the old (here: LONG) window.
    service = BatchedService(lambda xs: xs, batch_size=10, max_delay=LONG)
    future = service.submit("waiting")
    service.max_delay = 0.01
    assert service.max_delay == 0.01
    assert future.result(LONG) == "waiting"
    service.stop()


def test_rlbatch_stats_are_there_too():
    service = BatchedService(lambda xs: xs, batch_size=3, max_delay=LONG, start=False)
    futures = service.submit_many(range(6))
    service.start()
    assert [f.result(LONG) for f in futures] == list(range(6))
    service.stop()
    stats = service.stats
    assert (stats.requests, stats.batches, stats.pending) == (6, 2, 0)

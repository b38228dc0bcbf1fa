"""rlbatch.pin_threads: per-thread CPU affinity, inherited by threads started afterwards."""
import os

import pytest

import rlbatch
from rlbatch.affinity import pin_threads, thread_cpus
from tests.conftest import in_thread

pytestmark = pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="Linux-only API")


def test_exported_from_rlbatch():
    assert rlbatch.pin_threads is pin_threads


def test_pins_the_calling_thread_and_the_threads_it_starts_but_not_others():
    all_cpus = thread_cpus()
    target = max(all_cpus)

    def body():
        before = pin_threads({target})
        child = in_thread(thread_cpus)
        return before, thread_cpus(), child

    before, mine, child = in_thread(body)
    assert before == all_cpus
    assert mine == {target}
    assert child == {target}  # inherited by a thread started after the pin
    assert thread_cpus() == all_cpus  # the test's own thread is untouched


def test_default_is_one_cpu_the_lowest_allowed():
    assert in_thread(lambda: (pin_threads(), thread_cpus())[1]) == {min(thread_cpus())}


def test_returned_set_undoes_the_pin():
    def body():
        previous = pin_threads()
        pin_threads(previous)
        return previous, thread_cpus()

    previous, after = in_thread(body)
    assert after == previous


@pytest.mark.parametrize("cpus, match", [
    (set(), "at least one CPU"),
    (["a"], "CPU numbers"),
    ({10 ** 6}, r"cannot pin to CPUs \[1000000\]"),
])
def test_bad_cpu_sets_are_refused_with_what_was_given(cpus, match):
    def body():
        with pytest.raises(ValueError, match=match):
            pin_threads(cpus)
        return thread_cpus()

    assert in_thread(body) == thread_cpus()  # a refused pin changes nothing

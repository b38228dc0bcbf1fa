"""Client load generators: what they count and how they fail (never how fast anything is)."""
import pytest

from experiments.lib import client_load


def test_run_clients_counts_every_call_and_closes_registered_callers(no_thread_leak):
    closed = []

    class Call:
        def __init__(self, i):
            self.i = i

        def __call__(self, item):
            return item

        def close(self):
            closed.append(self.i)

    load = client_load.run_clients(3, Call, lambda i: i, duration=0.05)
    assert load.items > 0 and load.items_per_s == pytest.approx(load.items / load.elapsed_s)
    assert 0 < load.p50_ms <= load.p99_ms and load.cpu_s_per_1k >= 0
    assert sorted(closed) == [0, 1, 2]


def test_run_clients_raises_a_client_failure(no_thread_leak):
    def make_call(i):
        if i == 1:
            raise ValueError("no caller for 1")
        return lambda x: x

    with pytest.raises(RuntimeError, match="no caller for 1"):
        client_load.run_clients(3, make_call, lambda i: i, duration=0.05)


def test_client_floor_releases_every_thread_each_round(no_thread_leak):
    # 130 threads: the gate releases each round as three relays (relay_width(130) == 3).
    load = client_load.run_client_floor(130, 1.0)
    assert load.items >= 130 and load.items_per_s > 0 and load.p99_ms >= load.p50_ms > 0

"""RelayGate: threads released in full rounds, as relays of the service's width."""
import threading

from experiments.lib.relay_gate import RelayGate
from rlbatch.batching.relay import relay_width


def test_relay_gate_releases_threads_in_full_rounds(no_thread_leak):
    n, rounds = 4, 25
    gate = RelayGate(n)
    lock = threading.Lock()
    arrived = [0]
    early = []

    def worker():
        for r in range(rounds):
            with lock:
                arrived[0] += 1
            gate.wait()
            with lock:
                if arrived[0] < n * (r + 1):  # released before every thread reached round r
                    early.append((r, arrived[0]))

    threads = [threading.Thread(target=worker) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    gate.close()
    assert not any(t.is_alive() for t in threads) and early == []
    assert arrived[0] == n * rounds


def test_relay_width_matches_the_service_rule():
    assert [relay_width(n) for n in (1, 64, 128, 129, 256)] == [2, 2, 2, 3, 4]
    assert relay_width(256, wake_width=1) == 1

import gc
import threading
import time

import pytest


def wait_until(predicate, timeout=10.0):
    """Test helper: waits for a condition another thread makes true (tests only, never library code)."""
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError("condition not reached in time")
        time.sleep(0.001)


@pytest.fixture
def no_thread_leak():
    """Asserts that the test leaves no thread behind."""
    gc.collect()
    before = {t.ident for t in threading.enumerate()}
    yield
    gc.collect()
    end = time.monotonic() + 10
    while True:
        extra = [t for t in threading.enumerate() if t.ident not in before and t.is_alive()]
        if not extra or time.monotonic() > end:
            break
        time.sleep(0.01)
    assert not extra, f"threads left running: {[t.name for t in extra]}"

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


def in_thread(fn):
    """Runs fn in a fresh thread (pinning it never touches pytest's own thread); returns its result."""
    out = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the test's thread
            out["error"] = e

    t = threading.Thread(target=run)
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


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

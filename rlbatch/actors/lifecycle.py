"""The context-manager protocol that trajectory sources share (ActorPool, ActorFleet)."""
from __future__ import annotations

__all__ = ["StartStopContext"]


class StartStopContext:
    """`with source:` starts the source unless it has started, and stops it on the way out, whatever
    happened inside. The class supplies `start()`, `stop()` and the `started` property."""

    def __enter__(self):
        if not self.started:
            self.start()
        return self

    def __exit__(self, *exc):
        self.stop()

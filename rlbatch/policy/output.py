"""PolicyOutput: one request's result from a PolicyService, with the parameter version behind it."""
from __future__ import annotations

import threading

__all__ = ["KEEP_CLASSES", "PolicyOutput", "output_class"]


class PolicyOutput(tuple):
    """One request's result: unpacks as `action, extras` (or `action, extras, state` for a
    recurrent policy); `.version` is the parameter version that produced it.

    The version is a class attribute of a subclass made once per version (`output_class`), so a
    result is a bare tuple, with no attribute dict to allocate per row on the service's hot path.
    """

    __slots__ = ()
    version: int

    def __new__(cls, items, version):
        return tuple.__new__(output_class(version), items)

    def __reduce__(self):
        return PolicyOutput, (tuple(self), self.version)

    action = property(lambda self: self[0])
    extras = property(lambda self: self[1])
    state = property(lambda self: self[2] if len(self) > 2 else None)

    def __repr__(self):
        return f"PolicyOutput({tuple.__repr__(self)}, version={self.version})"


_classes: dict = {}  # version -> PolicyOutput subclass; the newest KEEP_CLASSES are kept
_classes_lock = threading.Lock()
KEEP_CLASSES = 64


def output_class(version: int) -> type:
    cls = _classes.get(version)
    if cls is None:
        with _classes_lock:
            cls = _classes.get(version)
            if cls is None:
                cls = type("PolicyOutput", (PolicyOutput,), {
                    "__slots__": (), "version": version, "__module__": __name__, "__qualname__": "PolicyOutput"})
                if len(_classes) >= KEEP_CLASSES:  # results still held keep their own class
                    del _classes[next(iter(_classes))]
                _classes[version] = cls
    return cls

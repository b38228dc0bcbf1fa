"""Environments that fail or get stuck on purpose, to test how actors report and survive it.

`FaultInjection` raises `InjectedFault` from `step` or `reset` with given probabilities and can make
`step` block, as a hung simulator or a lost remote session would.
"""
from __future__ import annotations

import math
import threading
from typing import Any

import gymnasium
import numpy as np
from gymnasium.utils import RecordConstructorArgs

__all__ = ["InjectedFault", "FaultInjection", "make_faulty_env"]


class InjectedFault(RuntimeError):
    """Raised by `FaultInjection` in place of a `step` or `reset` call, on purpose."""


_BAD_PROBABILITY = "FaultInjection: expected {name} to be a probability in [0, 1], got {got!r}"


def _check_probability(name: str, value: float) -> float:
    try:
        p = float(value)
    except (TypeError, ValueError):
        raise ValueError(_BAD_PROBABILITY.format(name=name, got=value)) from None
    if not 0.0 <= p <= 1.0:  # also rejects NaN
        raise ValueError(_BAD_PROBABILITY.format(name=name, got=value))
    return p


class FaultInjection(gymnasium.Wrapper, RecordConstructorArgs):
    """Makes `step` and `reset` raise `InjectedFault` at random, and optionally makes `step` hang.

    Faults. Call n of `step` (n = 1, 2, ... over the wrapper's whole life, across episodes) raises
    iff the n-th draw `u` of a step generator satisfies `u < p_step`, and likewise for `reset` with
    its own generator and `p_reset`. Both generators are spawned from `numpy.random.SeedSequence(seed)`
    at construction, one draw is made per call whatever the probability, so for a fixed `seed` the
    calls that fault are fixed: they depend neither on `reset(seed=...)` nor on how many resets happen
    between steps. `p = 0` never faults and `p = 1` always does. A faulting call raises before
    delegating, so the wrapped env is left exactly as it was.

    Hangs. With `hang_after=N`, every `step` call after the first N (N = 0: from the first call on)
    blocks for `hang_seconds` (`math.inf`: until released) before doing anything else. `release()`
    (or `close()`) ends a hang in progress and disables hanging for good, so a test can show an actor
    stuck and then let it finish without waiting on a timer.

    `faults` lists every fault raised, in order, as `(method, call)`: `("step", n)` or `("reset", n)`
    with n the call's number for that method.
    """

    def __init__(
        self,
        env: gymnasium.Env,
        p_step: float = 0.0,
        p_reset: float = 0.0,
        seed: int | None = None,
        hang_after: int | None = None,
        hang_seconds: float = math.inf,
    ):
        RecordConstructorArgs.__init__(
            self, p_step=p_step, p_reset=p_reset, seed=seed, hang_after=hang_after, hang_seconds=hang_seconds
        )
        gymnasium.Wrapper.__init__(self, env)
        self.p_step = _check_probability("p_step", p_step)
        self.p_reset = _check_probability("p_reset", p_reset)
        if hang_after is not None and (
            isinstance(hang_after, bool) or not isinstance(hang_after, (int, np.integer)) or hang_after < 0
        ):
            raise ValueError(f"FaultInjection: expected hang_after to be None or an int >= 0, got {hang_after!r}")
        try:
            valid_hang = float(hang_seconds) >= 0  # False for NaN
        except (TypeError, ValueError):
            valid_hang = False
        if not valid_hang:
            raise ValueError(
                f"FaultInjection: expected hang_seconds to be a number of seconds >= 0 (math.inf: until release()), "
                f"got {hang_seconds!r}"
            )
        self.hang_after = None if hang_after is None else int(hang_after)
        self.hang_seconds = float(hang_seconds)
        step_seed, reset_seed = np.random.SeedSequence(seed).spawn(2)
        self._step_rng = np.random.default_rng(step_seed)
        self._reset_rng = np.random.default_rng(reset_seed)
        self._released = threading.Event()
        self.step_calls = 0
        self.reset_calls = 0
        self.faults: list[tuple[str, int]] = []

    def step(self, action: Any):
        self.step_calls += 1
        if self.hang_after is not None and self.step_calls > self.hang_after and not self._released.is_set():
            # An Event rather than time.sleep, so release() can end the hang early.
            self._released.wait(None if math.isinf(self.hang_seconds) else self.hang_seconds)
        if self._step_rng.random() < self.p_step:
            self.faults.append(("step", self.step_calls))
            raise InjectedFault(
                f"FaultInjection.step: injected fault on step call {self.step_calls} (p_step={self.p_step})"
            )
        return self.env.step(action)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        self.reset_calls += 1
        if self._reset_rng.random() < self.p_reset:
            self.faults.append(("reset", self.reset_calls))
            raise InjectedFault(
                f"FaultInjection.reset: injected fault on reset call {self.reset_calls} (p_reset={self.p_reset})"
            )
        return self.env.reset(seed=seed, options=options)

    def release(self) -> None:
        """Ends a hang in progress and stops any later step from hanging. Safe to call from any thread, twice."""
        self._released.set()

    def close(self) -> None:
        self.release()
        super().close()


def make_faulty_env(
    env_id: str = "CartPole-v1",
    p_step: float = 0.01,
    p_reset: float = 0.0,
    seed: int | None = None,
    hang_after: int | None = None,
    hang_seconds: float = math.inf,
    **make_kwargs: Any,
) -> FaultInjection:
    """Entry point of `fakes/Faulty-v0`: `gymnasium.make(env_id, **make_kwargs)` behind a `FaultInjection`."""
    return FaultInjection(
        gymnasium.make(env_id, **make_kwargs),
        p_step=p_step,
        p_reset=p_reset,
        seed=seed,
        hang_after=hang_after,
        hang_seconds=hang_seconds,
    )

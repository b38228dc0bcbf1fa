"""Test fakes: environments that follow a script or fail on purpose. Importing registers them.

- `fakes/Faulty-v0`: `FaultInjection(gymnasium.make(env_id), p_step, p_reset, seed, ...)` with
  `env_id="CartPole-v1"`, `p_step=0.01`, `p_reset=0.0`, `seed=None`; `hang_after` and
  `hang_seconds` may be passed too.
- `fakes/Scripted-v0`: `ScriptedEnv(episode_lengths=(3, 5, 2), truncate=(False, True, False),
  obs_dim=2)`; see its docstring for the exact observation, reward and flag formulas.

Not registered: `CorruptObservations(env, p_nan, p_wrong_shape, seed)`, observations that go bad
in mid-episode (NaN, or the wrong shape), as an unstable simulator's do.
"""
from __future__ import annotations

import gymnasium

from tests.fakes.faults import FaultInjection, InjectedFault
from tests.fakes.observations import CorruptObservations
from tests.fakes.scripted import ScriptedEnv

__all__ = ["CorruptObservations", "FaultInjection", "InjectedFault", "ScriptedEnv", "FAKE_ENV_IDS"]

_REGISTRATIONS: dict[str, dict] = {
    "fakes/Faulty-v0": dict(
        entry_point="tests.fakes.faults:make_faulty_env",
        kwargs={"env_id": "CartPole-v1", "p_step": 0.01, "p_reset": 0.0},
    ),
    "fakes/Scripted-v0": dict(entry_point="tests.fakes.scripted:ScriptedEnv"),
}

FAKE_ENV_IDS: tuple[str, ...] = tuple(_REGISTRATIONS)

for _env_id, _registration in _REGISTRATIONS.items():
    if _env_id not in gymnasium.registry:
        gymnasium.register(_env_id, **_registration)

"""The policy interface: a NamedTuple of pure JAX functions (optax style).

    params = policy.init(key, example_obs)
    action, extras = policy.apply(params, obs, key)                 # feed-forward
    action, extras, state = policy.apply(params, obs, state, key)   # recurrent (`initial_state` set)

`obs` is a pytree whose leaves have the batch axis first; `action` has the batch axis first and
`extras` is a dict of per-row arrays. By convention agents return `extras["log_prob"]` (log-prob of
the chosen action under the behaviour policy) and `extras["value"]` when they have them.
Any JAX library (flax, equinox, haiku, plain jax) plugs in through these signatures.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

__all__ = ["Policy"]


class Policy(NamedTuple):
    init: Callable[..., Any]
    apply: Callable[..., Any]
    # For recurrent policies: initial_state(num_rows) -> state pytree with batch axis first (what
    # a new episode starts from; pass initial_state(1)'s row as PolicyService's example_state).
    initial_state: Optional[Callable[[int], Any]] = None

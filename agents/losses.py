"""Return and advantage estimators: rlax's, with episode ends inside an unroll handled around them.

Every array is [T, B] (time first, batch second); step t is the transition
(obs[t], action[t]) -> (reward[t], obs[t+1]) of a `rlbatch.Trajectory`. Names carry the time index:

- `v_tm1[t]`: V(obs[t]), the value of the state the action was taken in;
- `v_t[t]`: the value of the state that followed: V(obs[t+1]) inside an episode, V(final_obs[t])
  when the episode ended at t (`bootstrap_values` builds both from a Trajectory's values);
- `r_t[t]`: the reward; `discount_t[t] = gamma * (1 - terminated[t])`;
- `cut_t[t]`: True where an episode ended at t (terminated or truncated).

Episode ends inside an unroll. After a termination there is nothing to bootstrap: the discount is 0.
After a truncation the episode is bootstrapped with V(final_obs[t]) (through `v_t`, discount
unchanged), but obs[t+1] already belongs to the next episode, so the multi-step trace must stop
there: `cut_t` zeroes the lambda-trace across the boundary without touching the one-step bootstrap.
Without `cut_t` a truncated step would leak the next episode's returns into this one.

rlax computes on one time axis (we vmap it over the batch axis) and knows neither truncations nor
a bootstrap value that differs from the next step's value: its estimators read the value after step
t from one sequence, values[t+1]. Two exact rewrites make them compute ours:
- the trace is cut by a per-step lambda, `lambda_ * (1 - cut_t)`;
- where v_t[t] differs from v_tm1[t+1] (only at an episode end), the difference enters through the
  reward, r_t + discount_t * (v_t - v_tm1[t+1]), so that every one-step target r + discount * V uses
  V(final_obs) while the sequence of values stays the one rlax expects.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import rlax

__all__ = ["VTraceOutput", "bootstrap_values", "gae", "vtrace"]


class VTraceOutput(NamedTuple):
    vs: jnp.ndarray  # [T, B] V-trace value targets for v_tm1
    pg_advantage: jnp.ndarray  # [T, B] clipped-rho-weighted policy-gradient advantages


def bootstrap_values(values, final_values, cut_t):
    """Returns (v_tm1, v_t) from values of a Trajectory's observations.

    values: [T+1, B] V(obs); final_values: [T, B] V(final_obs); cut_t: [T, B] episode ended at t.
    v_tm1 = values[:-1]; v_t = final_values where an episode ended, values[1:] elsewhere.
    rlax has no counterpart: its sequences never hold a value that is not the next step's.
    """
    return values[:-1], jnp.where(cut_t, final_values, values[1:])


def _rlax_inputs(v_tm1, v_t, r_t, discount_t, lambda_, cut_t):
    """(values [T+1, B], r_t, lambda_t [T, B]) in rlax's one-sequence convention (module docstring)."""
    values = jnp.concatenate([v_tm1, v_t[-1:]])
    r_t = r_t + discount_t * (v_t - values[1:])
    lambda_t = jnp.broadcast_to(jnp.asarray(lambda_, v_tm1.dtype), v_tm1.shape)
    if cut_t is not None:
        lambda_t = lambda_t * (1.0 - jnp.asarray(cut_t, v_tm1.dtype))
    return values, r_t, lambda_t


def gae(v_tm1, v_t, r_t, discount_t, lambda_, cut_t: Optional[jnp.ndarray] = None):
    """Generalized advantage estimation (Schulman et al. 2016), [T, B] -> advantages [T, B].

    A[t] = delta[t] + discount_t[t] * lambda_ * (1 - cut_t[t]) * A[t+1], A[T] = 0, where
    delta[t] = r_t[t] + discount_t[t] * v_t[t] - v_tm1[t]. Value targets are A + v_tm1.
    `lambda_` is a scalar or [T, B]. Computed by rlax.truncated_generalized_advantage_estimation.
    """
    values, r_t, lambda_t = _rlax_inputs(v_tm1, v_t, r_t, discount_t, lambda_, cut_t)
    per_column = jax.vmap(rlax.truncated_generalized_advantage_estimation, in_axes=1, out_axes=1)
    return per_column(r_t, discount_t, lambda_t, values)


def vtrace(
    v_tm1,
    v_t,
    r_t,
    discount_t,
    log_rho_t,
    lambda_=1.0,
    clip_rho_threshold: float = 1.0,
    clip_pg_rho_threshold: float = 1.0,
    cut_t: Optional[jnp.ndarray] = None,
    stop_target_gradients: bool = True,
) -> VTraceOutput:
    """V-trace targets and policy-gradient advantages (Espeholt et al. 2018), all [T, B].

    log_rho_t = log pi(a_t|x_t) - log mu(a_t|x_t) (target minus behaviour policy).
    rho = min(clip_rho_threshold, exp(log_rho)), c = lambda_ * min(1, exp(log_rho)):
        vs[t] - v_tm1[t] = rho[t] * delta[t] + discount_t[t] * c[t] * (1 - cut_t[t]) * (vs[t+1] - v_tm1[t+1])
    with delta[t] = r_t[t] + discount_t[t] * v_t[t] - v_tm1[t] and the correction 0 after step T-1.
    As in rlax, the advantage bootstraps from a lambda-mix of the next target and value:
        q[t] = r_t[t] + discount_t[t] * (v_t[t] + (1 - cut_t[t]) * lambda_ * (vs[t+1] - v_tm1[t+1]))
        pg_advantage[t] = min(clip_pg_rho_threshold, exp(log_rho[t])) * (q[t] - v_tm1[t])
    which is the paper's r + gamma * vs[t+1] when lambda_ = 1 (and V(final_obs) after an episode end).
    Computed by rlax.vtrace_td_error_and_advantage; stop_target_gradients stops the gradient through
    pg_advantage as well (rlax stops it through the value targets only), since the advantage is
    a fixed weight of the policy gradient.
    """
    values, r_t, lambda_t = _rlax_inputs(v_tm1, v_t, r_t, discount_t, lambda_, cut_t)
    per_column = jax.vmap(
        lambda v_tm1, v_t, r_t, discount_t, rho_tm1, lambda_t: rlax.vtrace_td_error_and_advantage(
            v_tm1, v_t, r_t, discount_t, rho_tm1, lambda_t, clip_rho_threshold, clip_pg_rho_threshold,
            stop_target_gradients,
        ),
        in_axes=1,
        out_axes=1,
    )
    out = per_column(v_tm1, values[1:], r_t, discount_t, jnp.exp(log_rho_t), lambda_t)
    vs, pg_advantage = out.errors + v_tm1, out.pg_advantage
    if stop_target_gradients:
        vs, pg_advantage = jax.lax.stop_gradient(vs), jax.lax.stop_gradient(pg_advantage)
    return VTraceOutput(vs=vs, pg_advantage=pg_advantage)

"""IMPALA (Espeholt et al. 2018) as an `rlbatch.Learner`: V-trace actor-critic, one step per batch.

    network = make_actor_critic(env.action_space, example_obs)
    learner = make_impala(network, learning_rate=6e-4)
    state = learner.init(key, example_obs, env.action_space)
    state, metrics = learner.update(state, batch)   # batch: Trajectory [T+1 / T, B, ...]

The behaviour policy is `batch.extras["log_prob"]` (log-probs the actors' possibly stale params gave
the actions); V-trace corrects for the gap to the current params. Truncated episodes are
bootstrapped from V(final_obs) and cut the trace (see `agents.losses`, which runs
rlax.vtrace_td_error_and_advantage). `normalize_obs` / `normalize_reward` as in `make_ppo`.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax

from agents import losses
from agents._batch import LearnerBatch, check_action_space, learner_batch
from agents._learner_norm import NormState, make_batch_normalizer
from agents.networks import ActorCritic
from rlbatch import Learner, Trajectory

__all__ = ["ImpalaState", "make_impala"]


class ImpalaState(NamedTuple):
    params: Any
    opt_state: optax.OptState
    step: jax.Array  # int32 scalar: updates done
    norm: NormState = NormState()  # observation / return statistics, when normalised


def make_impala(
    network: ActorCritic,
    *,
    learning_rate: Union[float, optax.Schedule] = 6e-4,
    gamma: float = 0.99,
    lambda_: float = 1.0,
    clip_rho_threshold: float = 1.0,
    clip_pg_rho_threshold: float = 1.0,
    ent_coef: float = 0.01,
    vf_coef: float = 0.5,
    max_grad_norm: float = 40.0,
    optimizer: Optional[optax.GradientTransformation] = None,
    normalize_obs: bool = False,
    normalize_reward: bool = False,
    max_envs: int = 4096,
    on_trace: Optional[Callable[[], None]] = None,
) -> Learner:
    """Builds an IMPALA learner around `network` (any `ActorCritic`: policy, evaluate, value).

    optimizer: replaces the default chain(clip_by_global_norm(max_grad_norm), adam(learning_rate)),
        e.g. optax.chain(optax.clip_by_global_norm(40.0), optax.rmsprop(6e-4, decay=0.99, eps=1e-5)).
    normalize_obs: keep running observation statistics in the state, normalise the batches with them
        and publish them with the params: `learner.params(state)` is then {"params", "obs_norm"} and
        `learner.policy` normalises before the network (`agents.normalize`).
    normalize_reward: divide rewards by the running std of the discounted return (CleanRL's
        NormalizeReward), per environment, for environment indices below `max_envs`.
    on_trace: called with no arguments each time `update` is traced; tests count compilations.
    """
    if optimizer is None:
        optimizer = optax.chain(optax.clip_by_global_norm(max_grad_norm), optax.adam(learning_rate, eps=1e-5))
    normalizer = make_batch_normalizer(network.policy, normalize_obs=normalize_obs, normalize_reward=normalize_reward,
                                       gamma=gamma, max_envs=max_envs, who="make_impala")

    def init(key, example_obs, action_space=None) -> ImpalaState:
        check_action_space(network, action_space, "make_impala")
        params = network.policy.init(key, example_obs)
        return ImpalaState(params=params, opt_state=optimizer.init(params), step=jnp.zeros((), jnp.int32),
                           norm=normalizer.init(example_obs))

    def loss_fn(params, batch: LearnerBatch):
        obs_tm1 = jax.tree_util.tree_map(lambda o: o[:-1], batch.obs)
        log_prob, entropy, v_tm1 = network.evaluate(params, obs_tm1, batch.action)
        # One value call for the bootstrap obs[T] and every final_obs: [1 + T, B].
        next_obs = jax.tree_util.tree_map(lambda o, f: jnp.concatenate([o[-1:], f]), batch.obs, batch.final_obs)
        next_values = network.value(params, next_obs)
        cut_t = batch.terminated | batch.truncated
        values = jnp.concatenate([v_tm1, next_values[:1]])
        _, v_t = losses.bootstrap_values(values, next_values[1:], cut_t)
        discount_t = gamma * (1.0 - batch.terminated.astype(jnp.float32))
        log_rho_t = jax.lax.stop_gradient(log_prob) - batch.behaviour_log_prob
        targets = losses.vtrace(
            v_tm1, v_t, batch.reward, discount_t, log_rho_t, lambda_, clip_rho_threshold, clip_pg_rho_threshold, cut_t
        )
        policy_loss = -jnp.mean(targets.pg_advantage * log_prob)
        value_loss = jnp.mean(optax.l2_loss(v_tm1, targets.vs))
        entropy = jnp.mean(entropy)
        loss = policy_loss + vf_coef * value_loss - ent_coef * entropy
        rho = jnp.exp(log_rho_t)
        metrics = {
            "loss": loss,
            "policy_loss": policy_loss,
            "value_loss": value_loss,
            "entropy": entropy,
            "rho_mean": jnp.mean(rho),
            "rho_clip_fraction": jnp.mean((rho > clip_rho_threshold).astype(jnp.float32)),
            "approx_kl": jnp.mean((rho - 1) - log_rho_t),  # behaviour -> current policy
        }
        return loss, metrics

    def update_step(state: ImpalaState, batch: LearnerBatch):
        if on_trace is not None:
            on_trace()
        norm, batch = normalizer.apply(state.norm, batch)
        grads, metrics = jax.grad(loss_fn, has_aux=True)(state.params, batch)
        metrics["grad_norm"] = optax.tree.norm(grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return ImpalaState(params, opt_state, state.step + 1, norm), metrics

    update_jit = jax.jit(update_step)

    def update(state: ImpalaState, batch: Trajectory):
        batch = learner_batch(batch)
        normalizer.check(batch)
        return update_jit(state, batch)

    return Learner(init=init, update=update, params=lambda state: normalizer.published(state.params, state.norm),
                   policy=normalizer.policy)

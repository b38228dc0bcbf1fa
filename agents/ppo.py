"""PPO (Schulman et al. 2017) as an `rlbatch.Learner`: clipped objective, GAE, minibatch epochs.

    network = make_actor_critic(env.action_space, example_obs)
    learner = make_ppo(network, learning_rate=2.5e-4)
    state = learner.init(key, example_obs, env.action_space)
    state, metrics = learner.update(state, batch)   # batch: Trajectory [T+1 / T, B, ...]

One `update` is one jitted call: GAE with the current value net over the whole [T, B] batch
(truncated episodes bootstrapped from `final_obs`), then `num_epochs` passes over `num_minibatches`
shuffled minibatches of the T * B transitions. `batch.extras["log_prob"]` are the behaviour log-probs
of the actions; they are the "old" policy of the ratio even when the actors' params are stale
(so `approx_kl` and `clip_fraction` include that staleness). GAE and the clipped surrogate are
rlax's (`agents.losses` adds the truncation handling); the entropy comes from the network, which
knows its distribution.

With `normalize_obs` / `normalize_reward` the update first merges the batch into the running
statistics kept in `PPOState.norm`, then trains on the normalised batch (`agents.normalize`).
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax
import rlax

from agents import losses
from agents._batch import LearnerBatch, check_action_space, learner_batch
from agents._learner_norm import NormState, make_batch_normalizer
from agents.networks import ActorCritic
from rlbatch import Learner, Trajectory

__all__ = ["PPOState", "make_ppo"]


class PPOState(NamedTuple):
    params: Any
    opt_state: optax.OptState
    key: jax.Array  # shuffles minibatches
    step: jax.Array  # int32 scalar: updates done
    norm: NormState = NormState()  # observation / return statistics, when normalised


def make_ppo(
    network: ActorCritic,
    *,
    learning_rate: Union[float, optax.Schedule] = 2.5e-4,
    num_epochs: int = 4,
    num_minibatches: int = 4,
    clip_eps: float = 0.2,
    gamma: float = 0.99,
    gae_lambda: float = 0.95,
    ent_coef: float = 0.01,
    vf_coef: float = 0.5,
    max_grad_norm: float = 0.5,
    normalize_advantages: bool = True,
    clip_value_loss: bool = False,
    normalize_obs: bool = False,
    normalize_reward: bool = False,
    max_envs: int = 4096,
    unroll: bool = False,
    on_trace: Optional[Callable[[], None]] = None,
) -> Learner:
    """Builds a PPO learner around `network` (any `ActorCritic`: policy, evaluate, value).

    learning_rate: a float or an optax schedule over minibatch steps
        (num_epochs * num_minibatches per update).
    clip_value_loss: CleanRL's clipped value loss around the values at the start of the update.
    normalize_obs: keep running observation statistics in the state, normalise the batches with them
        and publish them with the params: `learner.params(state)` is then {"params", "obs_norm"} and
        `learner.policy` normalises before the network (`agents.normalize`).
    normalize_reward: divide rewards by the running std of the discounted return (CleanRL's
        NormalizeReward), per environment, for environment indices below `max_envs`.
    unroll: trace the epochs and minibatches as straight-line code instead of `lax.scan` loops. XLA's
        CPU backend runs convolutions inside a loop far slower than outside one (the Nature CNN's
        gradient on 4 x 256 frames, 2-core machine: 37 samples/s in a scan, 520 unrolled, same
        result); compile time grows with num_epochs * num_minibatches, so it suits pixel networks
        on a CPU with few of both (the Atari presets: 4 x 4).
    on_trace: called with no arguments each time `update` is traced; tests count compilations.
    """
    optimizer = optax.chain(optax.clip_by_global_norm(max_grad_norm), optax.adam(learning_rate, eps=1e-5))
    normalizer = make_batch_normalizer(network.policy, normalize_obs=normalize_obs, normalize_reward=normalize_reward,
                                       gamma=gamma, max_envs=max_envs, who="make_ppo")

    def init(key, example_obs, action_space=None) -> PPOState:
        check_action_space(network, action_space, "make_ppo")
        params_key, key = jax.random.split(key)
        params = network.policy.init(params_key, example_obs)
        return PPOState(params=params, opt_state=optimizer.init(params), key=key, step=jnp.zeros((), jnp.int32),
                        norm=normalizer.init(example_obs))

    def loss_fn(params, mb):
        log_prob, entropy, value = network.evaluate(params, mb["obs"], mb["action"])
        log_ratio = log_prob - mb["behaviour_log_prob"]
        ratio = jnp.exp(log_ratio)
        advantages = mb["advantages"]
        if normalize_advantages:
            advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
        policy_loss = rlax.clipped_surrogate_pg_loss(ratio, advantages, clip_eps)
        value_loss = optax.l2_loss(value, mb["returns"])
        if clip_value_loss:
            clipped = mb["values"] + jnp.clip(value - mb["values"], -clip_eps, clip_eps)
            value_loss = jnp.maximum(value_loss, optax.l2_loss(clipped, mb["returns"]))
        value_loss = jnp.mean(value_loss)
        entropy = jnp.mean(entropy)
        loss = policy_loss + vf_coef * value_loss - ent_coef * entropy
        metrics = {
            "loss": loss,
            "policy_loss": policy_loss,
            "value_loss": value_loss,
            "entropy": entropy,
            "approx_kl": jnp.mean((ratio - 1) - log_ratio),
            "clip_fraction": jnp.mean((jnp.abs(ratio - 1) > clip_eps).astype(jnp.float32)),
        }
        return loss, metrics

    def update_step(state: PPOState, batch: LearnerBatch):
        if on_trace is not None:
            on_trace()
        norm, batch = normalizer.apply(state.norm, batch)
        num_steps, num_envs = batch.reward.shape
        batch_size = num_steps * num_envs
        if batch_size % num_minibatches:
            raise ValueError(
                f"make_ppo: expected T * B divisible by num_minibatches={num_minibatches}, "
                f"got T={num_steps}, B={num_envs}"
            )
        cut_t = batch.terminated | batch.truncated
        values = network.value(state.params, batch.obs)
        final_values = network.value(state.params, batch.final_obs)
        v_tm1, v_t = losses.bootstrap_values(values, final_values, cut_t)
        discount_t = gamma * (1.0 - batch.terminated.astype(jnp.float32))
        advantages = losses.gae(v_tm1, v_t, batch.reward, discount_t, gae_lambda, cut_t)
        returns = advantages + v_tm1
        flat = jax.tree_util.tree_map(
            lambda x: x.reshape((batch_size, *x.shape[2:])),
            {
                "obs": jax.tree_util.tree_map(lambda o: o[:-1], batch.obs),
                "action": batch.action,
                "behaviour_log_prob": batch.behaviour_log_prob,
                "advantages": advantages,
                "returns": returns,
                "values": v_tm1,
            },
        )

        def minibatch_step(carry, idx):
            params, opt_state = carry
            mb = jax.tree_util.tree_map(lambda x: x[idx], flat)
            grads, metrics = jax.grad(loss_fn, has_aux=True)(params, mb)
            metrics["grad_norm"] = optax.tree.norm(grads)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), metrics

        def epoch_step(carry, key):
            order = jax.random.permutation(key, batch_size).reshape(num_minibatches, -1)
            return loop(minibatch_step, carry, order)

        key, epochs_key = jax.random.split(state.key)
        (params, opt_state), metrics = loop(
            epoch_step, (state.params, state.opt_state), jax.random.split(epochs_key, num_epochs)
        )
        metrics = jax.tree_util.tree_map(jnp.mean, metrics)  # over epochs and minibatches
        metrics["explained_variance"] = 1.0 - jnp.var(returns - v_tm1) / (jnp.var(returns) + 1e-8)
        return PPOState(params, opt_state, key, state.step + 1, norm), metrics

    loop = _unrolled_scan if unroll else jax.lax.scan
    update_jit = jax.jit(update_step)

    def update(state: PPOState, batch: Trajectory):
        batch = learner_batch(batch)
        normalizer.check(batch)
        return update_jit(state, batch)

    return Learner(init=init, update=update, params=lambda state: normalizer.published(state.params, state.norm),
                   policy=normalizer.policy)


def _unrolled_scan(step, carry, xs):
    """`jax.lax.scan(step, carry, xs)` traced as a Python loop: the same carry and stacked outputs,
    no loop in the compiled program."""
    outputs = []
    for i in range(jax.tree_util.tree_leaves(xs)[0].shape[0]):
        carry, out = step(carry, jax.tree_util.tree_map(lambda x: x[i], xs))
        outputs.append(out)
    return carry, jax.tree_util.tree_map(lambda *o: jnp.stack(o), *outputs)

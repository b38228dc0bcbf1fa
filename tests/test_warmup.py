"""experiments.lib.warmup: the learner's update compiled ahead, on a batch exactly like the actors'."""

import gymnasium
import jax
import numpy as np
import pytest

import agents
import rlbatch
from experiments.lib.warmup import UpdateWarmUp, example_batch


def _learner(traces):
    space = gymnasium.make("CartPole-v1").action_space
    network = agents.make_actor_critic(space, np.zeros(4, np.float32), hidden=(8, 8))
    return agents.make_ppo(network, num_epochs=1, num_minibatches=1, on_trace=lambda: traces.append(1)), space


def test_the_trainers_first_update_reuses_the_warm_up_compilation():
    traces = []
    learner, space = _learner(traces)
    obs = np.zeros(4, np.float32)
    state = learner.init(jax.random.PRNGKey(0), obs, space)
    UpdateWarmUp(learner, state, obs, unroll_length=4, columns=2 * 3).start().join()
    assert len(traces) == 1
    policy = rlbatch.PolicyService(learner.policy.apply, learner.params(state), example_obs=obs, buckets=(4,),
                                   max_delay=0.001)
    with policy, rlbatch.ActorPool("CartPole-v1", policy, num_actors=2, unroll_length=4, envs_per_actor=3) as pool:
        batch = rlbatch.stack_trajectories([pool.get(timeout=30), pool.get(timeout=30)])
    warm = example_batch(learner, learner.params(state), obs, 4, 6)
    for field in ("obs", "action", "reward", "terminated", "truncated", "final_obs", "policy_version", "episode_id"):
        got, want = getattr(batch, field), getattr(warm, field)
        assert (got.shape, got.dtype) == (want.shape, want.dtype), field
    assert {k: (v.shape, v.dtype) for k, v in batch.extras.items()} == {
        k: (v.shape, v.dtype) for k, v in warm.extras.items()}
    new_state, _ = learner.update(state, batch)
    jax.block_until_ready(new_state)
    assert len(traces) == 1  # no second trace: the warm-up's program served the real batch


def test_a_warm_up_that_fails_raises_in_the_joining_thread():
    space, obs = gymnasium.make("CartPole-v1").action_space, np.zeros(4, np.float32)
    learner = agents.make_ppo(agents.make_actor_critic(space, obs, hidden=(8, 8)), num_minibatches=2)
    # T * B = 3 * 1 rows cannot make 2 minibatches: the learner refuses the shape.
    warm = UpdateWarmUp(learner, learner.init(jax.random.PRNGKey(0), obs, space), obs, unroll_length=3, columns=1)
    with pytest.raises(ValueError, match="divisible by num_minibatches=2"):
        warm.start().join()

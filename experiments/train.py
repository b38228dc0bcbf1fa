"""The main job: train an agent on a gymnasium environment through the batched policy service.

A couple of hundred actor threads play the environment, asking a shared PolicyService for actions;
a Trainer consumes their trajectories, updates the learner (PPO or IMPALA) and publishes new
parameters while they play. Stops when solved (mean return of the last 100 episodes >= the
threshold) or at the step or time budget, then prints the throughput report and writes it as JSON.

    python -m experiments.train                          # CartPole-v1, PPO, 256 actors
    python -m experiments.train --seed 1 --agent impala
    python -m experiments.train --env rlbatch/Catch-v0 --solve-return 0.9
"""
from __future__ import annotations

import dataclasses
import os
from typing import Literal, Optional

import gymnasium
import jax
import numpy as np
import tyro

import agents
import envs  # noqa: F401 - registers the rlbatch/ environments
import rlbatch
from experiments.lib import runtime
from rlbatch import report


@dataclasses.dataclass(frozen=True)
class Args:
    env: str = "CartPole-v1"
    """gymnasium id of the environment"""
    agent: Literal["ppo", "impala"] = "ppo"
    """learner"""
    num_actors: int = 256
    """actor threads"""
    envs_per_actor: int = 1
    """environments per actor thread, sent to the policy as one request"""
    unroll_length: int = 16
    """T: steps per trajectory"""
    batch_size: int = 64
    """B: trajectories per learner update (times envs_per_actor columns)"""
    buckets: tuple[int, ...] = (8, 16, 32, 64, 128, 256)
    """padded batch sizes of the policy service, each compiled once"""
    max_delay: float = 0.002
    """seconds a request may wait for its batch to fill"""
    seed: int = 0
    """seeds the parameters, the policy's key schedule and the environments"""
    # Seed 0 solved CartPole in 23.3 s pinned against 32.2 s not, on the 2-core machine.
    pin_python: bool = True
    """confine the Python threads to one CPU after JAX starts (rlbatch.pin_threads)"""
    total_steps: int = 2_000_000
    """env step budget"""
    max_seconds: float = 300.0
    """wall-clock budget in seconds"""
    solve_return: Optional[float] = None
    """stop once the mean return of the last 100 episodes reaches this; None: the env's reward threshold"""
    learning_rate: float = 2e-3
    """optimizer step size"""
    num_epochs: int = 4
    """PPO: passes over each batch"""
    num_minibatches: int = 4
    """PPO: minibatches per pass"""
    ent_coef: float = 0.01
    """entropy bonus"""
    gamma: float = 0.99
    """discount"""
    max_policy_lag: Optional[int] = None
    """drop trajectories staler than this many updates"""
    hidden: int = 64
    """width of the two hidden layers"""
    out: str = "runs/train"
    """directory for the report (JSON) and plots"""
    progress: bool = True
    """show the tqdm bar"""
    plots: bool = True
    """draw PNG plots (needs matplotlib)"""


def make_learner(args: Args, network):
    if args.agent == "ppo":
        return agents.make_ppo(network, learning_rate=args.learning_rate, num_epochs=args.num_epochs,
                               num_minibatches=args.num_minibatches, ent_coef=args.ent_coef, gamma=args.gamma)
    if args.agent == "impala":
        return agents.make_impala(network, learning_rate=args.learning_rate, ent_coef=args.ent_coef, gamma=args.gamma)
    raise ValueError(f"--agent: expected ppo or impala, got {args.agent!r}")


def main(args: Args) -> report.Summary:
    runtime.prefer_sync_cpu_dispatch()
    print(runtime.pin_python_threads(args.pin_python))
    probe = gymnasium.make(args.env)
    example_obs = np.asarray(probe.observation_space.sample())
    action_space = probe.action_space
    threshold = args.solve_return
    if threshold is None:
        threshold = probe.spec.reward_threshold if probe.spec and probe.spec.reward_threshold else float("inf")
    probe.close()

    network = agents.make_actor_critic(action_space, example_obs, hidden=(args.hidden, args.hidden))
    learner = make_learner(args, network)
    state = learner.init(jax.random.PRNGKey(args.seed), example_obs, action_space)
    policy = rlbatch.PolicyService(learner.policy.apply, learner.params(state), example_obs=example_obs,
                                   buckets=args.buckets, max_delay=args.max_delay, seed=args.seed)
    pool = rlbatch.ActorPool(args.env, policy, num_actors=args.num_actors, unroll_length=args.unroll_length,
                             envs_per_actor=args.envs_per_actor, seed=args.seed, max_queue=4 * args.batch_size)
    trainer = rlbatch.Trainer(learner, pool, policy, state=state, batch_size=args.batch_size,
                              max_policy_lag=args.max_policy_lag)
    from tqdm.auto import tqdm

    recorder = report.Recorder(pool, policy, echo=tqdm.write)  # a periodic line above the bar
    result = trainer.run(total_steps=args.total_steps, until=rlbatch.solved(threshold), progress=args.progress,
                         max_seconds=args.max_seconds, on_update=recorder.on_update)
    summary = recorder.finish(result, config=dataclasses.asdict(args))
    print(report.format_table(summary))
    os.makedirs(args.out, exist_ok=True)
    path = report.write(summary, args.out, plots=args.plots)
    print(f"report: {path}")
    return summary


if __name__ == "__main__":
    main(tyro.cli(Args, prog="python -m experiments.train", description=__doc__))

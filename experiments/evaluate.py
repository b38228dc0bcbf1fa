"""Play a checkpoint of the main job: N episodes of the saved policy, the mean and spread of their returns.

The network is rebuilt from the arguments saved in the checkpoint (experiments.train writes them),
so only the path is needed. Episodes are whole games with the environment's own rewards (Atari
through ale-py with the training preprocessing, without episodic life or reward clipping);
continuous actions are clipped to the action space, as the actors do.

    python -m experiments.evaluate --checkpoint runs/train/checkpoint.npz --episodes 10
    python -m experiments.evaluate --checkpoint runs/train/checkpoint.npz --episodes 3 --greedy --capture-video
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional

import gymnasium
import jax
import numpy as np
import tyro

import rlbatch
from experiments import train
from experiments.lib import checkpoints, tasks


@dataclasses.dataclass(frozen=True)
class Args:
    checkpoint: str
    """a checkpoint written by experiments.train (checkpoint.npz)"""
    episodes: int = 10
    """episodes to play"""
    greedy: bool = False
    """take the most likely action (the Gaussian's mean) instead of sampling"""
    capture_video: bool = False
    """record every episode as MP4 with gymnasium's RecordVideo (needs moviepy)"""
    video_dir: Optional[str] = None
    """where the videos go; None: videos/ beside the checkpoint"""
    seed: int = 0
    """seeds the environment's resets and the sampled actions"""
    max_steps: Optional[int] = None
    """end an episode after this many steps (None: the environment's own limit)"""


def saved_args(path: str) -> train.Args:
    """The (resolved) train.Args stored in a checkpoint."""
    stored = checkpoints.read_metadata(path)["args"]
    fields = {f.name for f in dataclasses.fields(train.Args)}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in stored.items() if k in fields}
    return train.Args(**values)


def load_policy(path: str, greedy: bool):
    """(act(obs [B, ...], key) -> actions [B, ...], the train.Args, the task) of a checkpoint."""
    args = saved_args(path)
    task = tasks.probe(args.env)
    network = train.make_network(args, task)
    learner = train.make_learner(args, network)
    template = learner.init(jax.random.PRNGKey(0), task.example_obs, task.action_space)
    state, _ = rlbatch.load_checkpoint(path, template)
    params = learner.params(state)
    policy = network.greedy_policy if greedy else network.policy
    if policy is None:
        raise ValueError(f"--greedy: the network of {path} offers no greedy policy")
    apply = jax.jit(policy.apply)
    return (lambda obs, key: np.asarray(apply(params, obs, key)[0])), args, task


def play(env: gymnasium.Env, act, task: tasks.Task, episodes: int, seed: int,
         max_steps: Optional[int] = None) -> list[float]:
    """The returns of `episodes` episodes of `act` in `env`."""
    key = jax.random.PRNGKey(seed)
    space = task.action_space
    returns = []
    for episode in range(episodes):
        obs, _ = env.reset(seed=seed + episode)
        total, steps, done = 0.0, 0, False
        while not done and (max_steps is None or steps < max_steps):
            key, step_key = jax.random.split(key)
            batch = np.asarray(obs, task.example_obs.dtype)[None]
            action = act(batch, step_key)[0]
            if isinstance(space, gymnasium.spaces.Box):
                action = np.clip(action, space.low, space.high)
            obs, reward, terminated, truncated, _ = env.step(action)
            total += float(reward)
            steps += 1
            done = terminated or truncated
        returns.append(total)
    return returns


def main(args: Args) -> dict:
    if args.episodes < 1:
        raise SystemExit(f"--episodes: expected a positive int, got {args.episodes}")
    act, train_args, task = load_policy(args.checkpoint, args.greedy)
    env = tasks.make_eval_env(train_args.env, render_mode="rgb_array" if args.capture_video else None)
    video_dir = None
    if args.capture_video:
        video_dir = args.video_dir or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), "videos")
        env = gymnasium.wrappers.RecordVideo(env, video_dir, episode_trigger=lambda _: True, disable_logger=True)
    try:
        returns = play(env, act, task, args.episodes, args.seed, args.max_steps)
    finally:
        env.close()
    result = {"env": train_args.env, "checkpoint": args.checkpoint, "episodes": args.episodes,
              "greedy": args.greedy, "mean": float(np.mean(returns)), "std": float(np.std(returns)),
              "min": float(np.min(returns)), "max": float(np.max(returns)), "returns": returns,
              "video_dir": video_dir}
    print(f"{train_args.env}: mean return {result['mean']:.2f} +- {result['std']:.2f} over {args.episodes} "
          f"episodes (min {result['min']:.2f}, max {result['max']:.2f}; {'greedy' if args.greedy else 'sampled'})")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(tyro.cli(Args, prog="python -m experiments.evaluate", description=__doc__))

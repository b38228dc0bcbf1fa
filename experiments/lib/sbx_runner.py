"""SBX PPO on a gymnasium task with rl-baselines3-zoo's settings, stopped by compare_peers' solve rule.

    python -m experiments.lib.sbx_runner --env CartPole-v1 --seed 0 --total-steps 200000

Run by `experiments.compare_peers` as a subprocess (needs `pip install -e .[peers]`, see README,
"Comparing with SBX"). The environments are built as the zoo builds them: `make_vec_env` (a
`DummyVecEnv` of Monitor-wrapped gymnasium envs), with `VecNormalize` where the zoo normalizes. A
callback reads the Monitor's episode returns (the raw returns, before any normalisation), applies
`experiments.lib.peers.rule_holds` after every finished episode and stops training the first time
it holds, or at the step or time budget. The last stdout line is one JSON object:

    {"peer": "sbx", "env", "seed", "started_at", "training_started_at", "solved_at",
     "steps_to_threshold", "env_steps", "stop_reason", "episodes", "recent_return_mean"}

`started_at` (this module's first line), `training_started_at` (the callback's start of training)
and `solved_at` are Unix times (`solved_at` null when the rule never held), so the launching
process can measure them from its own launch.
"""
from __future__ import annotations

import time

STARTED_AT = time.time()  # before the heavy imports below: they are part of the start-up measured

import dataclasses  # noqa: E402
import json  # noqa: E402
from typing import Optional  # noqa: E402

import tyro  # noqa: E402

from experiments.lib.peers import SolveRule, rule_for, rule_holds  # noqa: E402
from experiments.lib.zoo import ZOO_PPO  # noqa: E402

@dataclasses.dataclass(frozen=True)
class Args:
    env: str = "CartPole-v1"
    """gymnasium id; one of ZOO_PPO's tasks"""
    seed: int = 0
    """seeds the environments and SBX"""
    total_steps: int = 1_000_000
    """env step budget (training never runs past the zoo's n_timesteps, which sets its schedules)"""
    max_seconds: float = 600.0
    """wall-clock budget in seconds from process start"""
    solve_return: Optional[float] = None
    """threshold of the solve rule; None: the task's (experiments.lib.peers.SOLVE_RULES)"""
    solve_window: Optional[int] = None
    """episodes in the solve rule's mean; None: the task's"""


def _schedule(value):
    """The zoo's "lin_x": x * progress_remaining (1 at the start, 0 at n_timesteps); a number stays."""
    if isinstance(value, str) and value.startswith("lin_"):
        initial = float(value[len("lin_"):])
        return lambda progress_remaining: progress_remaining * initial
    return value


def _policy_kwargs(kwargs: dict) -> dict:
    import flax.linen as nn

    out = dict(kwargs)
    if "activation" in out:
        out["activation_fn"] = getattr(nn, out.pop("activation"))
    return out


def main(args: Args) -> dict:
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.vec_env import DummyVecEnv, VecNormalize

    from sbx import PPO

    if args.env not in ZOO_PPO:
        raise ValueError(f"sbx_runner --env: expected one of {sorted(ZOO_PPO)}, got {args.env!r}")
    rule: SolveRule = rule_for(args.env, args.solve_return, args.solve_window)
    settings = dict(ZOO_PPO[args.env])
    normalize, n_envs, n_timesteps = settings.pop("normalize"), settings.pop("n_envs"), settings.pop("n_timesteps")
    settings["learning_rate"] = _schedule(settings["learning_rate"])
    settings["clip_range"] = _schedule(settings["clip_range"])
    if "policy_kwargs" in settings:
        settings["policy_kwargs"] = _policy_kwargs(settings["policy_kwargs"])

    class SolveRuleCallback(BaseCallback):
        """Stops training the first time the rule holds, or at the step or time budget."""

        def __init__(self):
            super().__init__()
            self.returns: list[float] = []
            self.training_started_at: Optional[float] = None
            self.solved_at: Optional[float] = None
            self.steps_to_threshold: Optional[int] = None
            self.stop_reason = "budget"

        def _on_training_start(self) -> None:
            self.training_started_at = time.time()

        def _on_step(self) -> bool:
            finished = [info["episode"]["r"] for info in self.locals["infos"] if "episode" in info]
            if finished:
                self.returns.extend(float(r) for r in finished)
                if rule_holds(self.returns, rule, self.num_timesteps):
                    self.solved_at, self.steps_to_threshold = time.time(), self.num_timesteps
                    self.stop_reason = "condition"
                    return False
            if self.num_timesteps >= args.total_steps:
                return False
            if time.time() - STARTED_AT >= args.max_seconds:
                self.stop_reason = "time"
                return False
            return True

    env = make_vec_env(args.env, n_envs=n_envs, seed=args.seed, vec_env_cls=DummyVecEnv)
    if normalize:
        env = VecNormalize(env, gamma=settings["gamma"])
    model = PPO("MlpPolicy", env, seed=args.seed, verbose=0, **settings)
    callback = SolveRuleCallback()
    model.learn(total_timesteps=n_timesteps, callback=callback)  # the zoo's schedules; the callback stops at the budget
    env.close()
    recent = callback.returns[-rule.window:]
    result = {"peer": "sbx", "env": args.env, "seed": args.seed, "started_at": STARTED_AT,
              "training_started_at": callback.training_started_at,
              "solved_at": callback.solved_at, "steps_to_threshold": callback.steps_to_threshold,
              "env_steps": int(model.num_timesteps), "stop_reason": callback.stop_reason,
              "episodes": len(callback.returns),
              "recent_return_mean": sum(recent) / len(recent) if recent else None}
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main(tyro.cli(Args, prog="python -m experiments.lib.sbx_runner", description=__doc__))

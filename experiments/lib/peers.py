"""What `experiments.compare_peers` compares: the solve rule both peers apply, and their results.

One rule per task (`SOLVE_RULES`): the mean return of the last `window` finished episodes reaches
`threshold`. rlbatch's main job applies it through `rlbatch.solved`; the SBX runner applies the
same function to its Monitor returns through `rule_holds`, so the two cannot drift apart.

A `PeerRun` is one peer's run on one seed, all times in seconds from the moment its process was
launched (start-up, imports and compilation included); `format_markdown` and `as_json` lay runs
out per seed with a mean row per peer.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

import rlbatch
from rlbatch.training.results import Progress

__all__ = ["PeerRun", "SOLVE_RULES", "SolveRule", "as_json", "format_markdown", "mean_row", "rule_for",
           "rule_holds"]


@dataclasses.dataclass(frozen=True)
class SolveRule:
    """Solved once `window` episodes have finished and the mean return of the last `window` >= threshold."""

    threshold: float
    window: int


# CartPole: gymnasium's reward threshold over the last 100 episodes. MuJoCo: CleanRL's published
# 1M-step PPO returns (ppo_continuous_action, v4 tasks) over the last 20 episodes, the targets of
# issue 15 for the v5 tasks.
SOLVE_RULES: dict[str, SolveRule] = {
    "CartPole-v1": SolveRule(threshold=475.0, window=100),
    "HalfCheetah-v5": SolveRule(threshold=1442.6, window=20),
    "Hopper-v5": SolveRule(threshold=2383.0, window=20),
}


def rule_for(env: str, threshold: Optional[float] = None, window: Optional[int] = None) -> SolveRule:
    """The task's rule from `SOLVE_RULES`, with `threshold` or `window` overriding it when given.

    A task outside the table needs both.
    """
    base = SOLVE_RULES.get(env)
    if base is None and (threshold is None or window is None):
        raise ValueError(f"solve rule for {env!r}: expected a task of {sorted(SOLVE_RULES)} or both a "
                         f"threshold and a window, got threshold={threshold!r} window={window!r}")
    rule = SolveRule(threshold=base.threshold if threshold is None else float(threshold),
                     window=base.window if window is None else int(window))
    if rule.window < 1:
        raise ValueError(f"solve rule for {env!r}: expected a window of at least 1 episode, got {rule.window}")
    return rule


def rule_holds(returns: Sequence[float], rule: SolveRule, env_steps: int = 0) -> bool:
    """Whether `rule` holds after these finished episodes' returns (oldest first).

    Goes through `rlbatch.solved`, the condition rlbatch's main job stops on, with the mean taken
    over the last `rule.window` returns as the actor pool's recent window does.
    """
    recent = list(returns[-rule.window:])
    mean = math.fsum(recent) / len(recent) if recent else float("nan")
    progress = Progress(env_steps=env_steps, episodes=len(returns), recent_return_mean=mean, updates=0,
                        elapsed=0.0, metrics={})
    return rlbatch.solved(rule.threshold, window=rule.window)(progress)


@dataclasses.dataclass(frozen=True)
class PeerRun:
    """One peer's process on one seed.

    Attributes:
      peer: "rlbatch" or "sbx".
      seed: the seed both peers were given.
      process_seconds: launch to exit of the whole process.
      seconds_to_threshold: launch to the moment the rule first held (None: it never did).
      steps_to_threshold: env steps at that moment (None: never).
      env_steps: env steps when the run stopped.
      stop_reason: why the run stopped ("condition", "budget", "time", ...; "failed" if the process failed).
      seconds_to_training: launch to the start of the training loop, the start-up both peers pay
        (imports, building environments and networks, compiling what comes first); None: unknown.
      note: what a reader needs to weigh the figures (how a time was measured, why a run failed).
    """

    peer: str
    seed: int
    process_seconds: float
    seconds_to_threshold: Optional[float]
    steps_to_threshold: Optional[int]
    env_steps: Optional[int]
    stop_reason: str
    seconds_to_training: Optional[float] = None
    note: str = ""


def mean_row(runs: Sequence[PeerRun]) -> dict:
    """One peer's means over its runs: process seconds over all, threshold figures over the solved ones."""
    solved = [r for r in runs if r.seconds_to_threshold is not None and r.steps_to_threshold is not None]

    def mean(values):
        return math.fsum(values) / len(values) if values else None

    started = [r.seconds_to_training for r in runs if r.seconds_to_training is not None]
    return {"runs": len(runs), "solved": len(solved),
            "process_seconds": mean([r.process_seconds for r in runs]), "seconds_to_training": mean(started),
            "seconds_to_threshold": mean([r.seconds_to_threshold for r in solved]),
            "steps_to_threshold": mean([r.steps_to_threshold for r in solved])}


def _peers_in_order(runs: Sequence[PeerRun]) -> list[str]:
    return list(dict.fromkeys(r.peer for r in runs))


def as_json(env: str, rule: SolveRule, runs: Sequence[PeerRun]) -> dict:
    """The comparison as a JSON-ready dict: the task, the rule, every run and each peer's means."""
    return {"env": env, "rule": dataclasses.asdict(rule), "runs": [dataclasses.asdict(r) for r in runs],
            "mean": {peer: mean_row([r for r in runs if r.peer == peer]) for peer in _peers_in_order(runs)}}


def _cell(value, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:,.{digits}f}"


def format_markdown(env: str, rule: SolveRule, runs: Sequence[PeerRun]) -> str:
    """A Markdown table: a row per peer and seed, then a mean row per peer."""
    lines = [f"{env}: solved when the mean return of the last {rule.window} episodes >= {rule.threshold:g}; "
             f"seconds from process launch",
             "",
             "| peer | seed | process s | s to training | s to threshold | env steps at threshold | env steps | stop |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for r in runs:
        lines.append(f"| {r.peer} | {r.seed} | {_cell(r.process_seconds)} | {_cell(r.seconds_to_training)} | "
                     f"{_cell(r.seconds_to_threshold)} | "
                     f"{_cell(r.steps_to_threshold)} | {_cell(r.env_steps)} | {r.stop_reason} |")
    for peer in _peers_in_order(runs):
        m = mean_row([r for r in runs if r.peer == peer])
        steps = None if m["steps_to_threshold"] is None else round(m["steps_to_threshold"])
        lines.append(f"| {peer} | mean | {_cell(m['process_seconds'])} | {_cell(m['seconds_to_training'])} | "
                     f"{_cell(m['seconds_to_threshold'])} | "
                     f"{_cell(steps)} | | solved {m['solved']}/{m['runs']} |")
    return "\n".join(lines)

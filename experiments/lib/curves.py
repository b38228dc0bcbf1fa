"""The learning curve of a training run: the recent mean return after each learner update, against
environment steps and against seconds, as JSON and as PNG plots.

    curve = LearningCurve(env_steps_offset=saved_steps)   # steps done before this run (a resume)
    trainer.run(..., on_update=curve.on_update)
    curve.as_json()                                       # {"seconds": [...], "env_steps": [...], "return": [...]}
    curve.plot("runs/x")                                  # learning_curve_steps.png, learning_curve_seconds.png

A point is (seconds since `Trainer.run` started, env steps counted from the first run of a resumed
chain, mean return of the pool's last 100 finished episodes); updates before the first finished
episode give nan returns, kept in the JSON and left out of the plots.
"""
from __future__ import annotations

import math
import os

from rlbatch.training.results import Progress

__all__ = ["LearningCurve"]


class LearningCurve:
    """Records one point per learner update through the Trainer's `on_update` callback."""

    def __init__(self, env_steps_offset: int = 0):
        self.env_steps_offset = env_steps_offset
        self.seconds: list[float] = []
        self.env_steps: list[int] = []
        self.returns: list[float] = []

    def on_update(self, progress: Progress) -> None:
        self.seconds.append(round(progress.elapsed, 3))
        self.env_steps.append(self.env_steps_offset + progress.env_steps)
        self.returns.append(progress.recent_return_mean)

    def as_json(self) -> dict:
        return {"seconds": list(self.seconds), "env_steps": list(self.env_steps), "return": list(self.returns)}

    def plot(self, out_dir: str, title: str = "", name: str = "learning_curve") -> list[str]:
        """Draws return against env steps and against seconds; returns the PNG paths (none before
        any finished episode). Needs matplotlib."""
        import matplotlib

        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt

        points = [(t, s, r) for t, s, r in zip(self.seconds, self.env_steps, self.returns) if not math.isnan(r)]
        if not points:
            return []
        os.makedirs(out_dir, exist_ok=True)
        paths = []
        for axis, label, suffix in ((1, "env steps", "steps"), (0, "seconds", "seconds")):
            fig, ax = plt.subplots(figsize=(6, 3.5))
            ax.plot([p[axis] for p in points], [p[2] for p in points])
            ax.set_xlabel(label)
            ax.set_ylabel("mean return (last 100 episodes)")
            ax.set_title(f"{title} return against {label}".strip())
            fig.tight_layout()
            path = os.path.join(out_dir, f"{name}_{suffix}.png")
            fig.savefig(path, dpi=100)
            plt.close(fig)
            paths.append(path)
        return paths

"""Catch: a ball falls down a small grid and a paddle in the bottom row must be under it when it lands.

The classic bsuite / DeepMind control benchmark, in pure numpy (a step costs about a microsecond).

Grid coordinates are (row, column), row 0 at the top. Observation: float32 board of shape
[rows, columns] with 1.0 at the ball's cell and at the paddle's cell, 0.0 elsewhere (when the ball
is caught both are the same cell); with `flatten=True` the board is flattened row-major to
[rows * columns], index `row * columns + column`.
"""
from __future__ import annotations

import operator
from typing import Any

import gymnasium
import numpy as np
from gymnasium import spaces

__all__ = ["CatchEnv"]

LEFT, STAY, RIGHT = 0, 1, 2
_BAD_ACTION = "CatchEnv.step: expected an integer action in {{0, 1, 2}}, got {got!r}"


def _action_index(action: Any) -> int:
    # operator.index accepts Python and numpy integers and 0-d integer arrays, and rejects floats
    # that int() would silently truncate.
    try:
        return operator.index(action)
    except TypeError:
        raise ValueError(_BAD_ACTION.format(got=action)) from None


class CatchEnv(gymnasium.Env):
    """Catch on a `rows` x `columns` grid.

    - reset: the ball is in row 0 at a column drawn uniformly by `self.np_random`; the paddle is in
      row `rows - 1` at column `columns // 2`.
    - step(action): action 0 moves the paddle one column left, 1 keeps it, 2 moves it right; the
      paddle stops at the walls. Then the ball falls one row.
    - When the ball reaches row `rows - 1` (after exactly `rows - 1` steps) the episode terminates
      with reward +1.0 if the paddle's column is the ball's, else -1.0. Every other step gives 0.0.
      Episodes never truncate, so no time limit is needed.

    `info` is always empty. Stepping a finished episode raises `RuntimeError`.
    """

    metadata = {"render_modes": ["ansi"], "render_fps": 10}

    def __init__(self, rows: int = 10, columns: int = 5, flatten: bool = False, render_mode: str | None = None):
        if isinstance(rows, bool) or not isinstance(rows, (int, np.integer)) or rows < 2:
            raise ValueError(f"CatchEnv: expected rows to be an int >= 2, got {rows!r}")
        if isinstance(columns, bool) or not isinstance(columns, (int, np.integer)) or columns < 1:
            raise ValueError(f"CatchEnv: expected columns to be an int >= 1, got {columns!r}")
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(
                f"CatchEnv: expected render_mode in {self.metadata['render_modes']} or None, got {render_mode!r}"
            )
        self.rows = int(rows)
        self.columns = int(columns)
        self.flatten = bool(flatten)
        self.render_mode = render_mode
        shape = (self.rows * self.columns,) if self.flatten else (self.rows, self.columns)
        self.observation_space = spaces.Box(0.0, 1.0, shape=shape, dtype=np.float32)
        self.action_space = spaces.Discrete(3)
        self._ball_row = 0
        self._ball_column = 0
        self._paddle_column = self.columns // 2
        self._done = True  # no episode until the first reset

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        self._ball_row = 0
        self._ball_column = int(self.np_random.integers(self.columns))
        self._paddle_column = self.columns // 2
        self._done = False
        return self._observation(), {}

    def step(self, action: Any):
        if self._done:
            raise RuntimeError("CatchEnv.step: expected a running episode, got a finished one; call reset() first")
        move = _action_index(action)
        if not LEFT <= move <= RIGHT:
            raise ValueError(_BAD_ACTION.format(got=action))
        self._paddle_column = min(max(self._paddle_column + move - 1, 0), self.columns - 1)
        self._ball_row += 1
        terminated = self._ball_row == self.rows - 1
        reward = 0.0
        if terminated:
            reward = 1.0 if self._paddle_column == self._ball_column else -1.0
            self._done = True
        return self._observation(), reward, terminated, False, {}

    def render(self) -> str | None:
        if self.render_mode != "ansi":
            return None
        lines = []
        for row in range(self.rows):
            cells = ["."] * self.columns
            if row == self.rows - 1:
                cells[self._paddle_column] = "="
            if row == self._ball_row:
                cells[self._ball_column] = "o"
            lines.append("".join(cells))
        return "\n".join(lines) + "\n"

    def _observation(self) -> np.ndarray:
        # A fresh array every call: callers keep observations (trajectories), so none may be reused.
        board = np.zeros((self.rows, self.columns), dtype=np.float32)
        board[self._ball_row, self._ball_column] = 1.0
        board[self.rows - 1, self._paddle_column] = 1.0
        return board.reshape(-1) if self.flatten else board

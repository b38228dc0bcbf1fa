"""What an actor sends to the policy and what it makes of the answer, for its k environments.

- `PolicyRequests`: the k current observations (k arrays, or a vector environment's batch [k, ...])
  as one request (one observation when k = 1, else a stack [k, ...]), converted to the policy's dtype; and, once the policy refused a request, which
  of its rows did not fit the policy's example observation and why.
- `RecurrentRows`: the recurrent state of the k rows, reset row by row as episodes start.
- `env_actions_fn`: turns the policy's action output into the k actions the environments take.

The policy is known only through its public interface: `example_obs` (one observation, absent for
a policy that is not an rlbatch PolicyService: then nothing is converted or checked) and
`example_state` (one row of recurrent state, None for a feed-forward policy).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import gymnasium
import jax
import numpy as np

from rlbatch.errors import InvalidRequest

__all__ = ["PolicyRequests", "RecurrentRows", "env_actions_fn"]


def _describe(x) -> str:
    a = np.asarray(x)
    return f"{a.dtype}{list(a.shape)}"


class PolicyRequests:
    """Builds an actor's requests from its k observations and explains a refused one."""

    def __init__(self, example_obs: Any, k: int):
        self.k = k
        self._example = None if example_obs is None else jax.tree_util.tree_map(np.asarray, example_obs)
        if self._example is None:
            self._leaves, self._treedef, self._dtype = None, None, None
            return
        self._leaves, self._treedef = jax.tree_util.tree_flatten_with_path(self._example)
        single = self._treedef.num_nodes == 1
        # Environments often return float64 for a float32 policy: a plain-array observation is
        # converted, never refused, for that.
        self._dtype = self._leaves[0][1].dtype if single else None

    def request(self, obs: Sequence[Any]) -> Any:
        """The policy request for `obs`, the k current observations (column j: environment j).

        InvalidRequest if the k observations do not stack into one request (shapes differ).
        `obs` may also be a vector environment's batch, one array [k, ...]: it is converted (and
        copied, since the environment may write its next batch into the same buffer) in one pass.
        """
        if type(obs) is np.ndarray:
            batch = obs.astype(self._dtype if self._dtype is not None else obs.dtype)
            return batch[0] if self.k == 1 else batch
        if self.k == 1:
            x = obs[0]
            if self._dtype is not None and type(x) is np.ndarray and x.dtype != self._dtype:
                x = x.astype(self._dtype)
            return x
        try:
            if type(obs[0]) is np.ndarray:
                # One allocation: stacked and converted in the same pass.
                return np.stack(obs, dtype=self._dtype, casting="unsafe")
            return jax.tree_util.tree_map(lambda *xs: np.stack(xs), *obs)
        except ValueError as e:  # shapes or tree structures differ between the k observations
            raise InvalidRequest(f"the {self.k} observations do not stack into one request: "
                                 f"{', '.join(_describe_tree(o) for o in obs)} ({e})") from None

    def misfit(self, obs: Any) -> str | None:
        """Why one observation does not fit the policy's example ('expected ..., got ...'), or None
        if it fits (or the policy gives no example to compare with)."""
        if self._example is None:
            return None
        try:
            leaves, treedef = jax.tree_util.tree_flatten(obs)
            if treedef != self._treedef:
                return f"expected an observation of structure {self._treedef}, got {treedef}"
            for (path, want), leaf in zip(self._leaves, leaves):
                got = np.asarray(leaf)
                where = f" at {jax.tree_util.keystr(path)}" if path else ""
                if got.shape != want.shape or (self._dtype is None and got.dtype != want.dtype):
                    return f"expected an observation{where} {_describe(want)}, got {_describe(got)}"
                if got.dtype.kind in "fc" and not np.isfinite(got).all():
                    return f"expected finite values{where}, got NaN or inf in {_describe(got)}"
        except (TypeError, ValueError) as e:  # not even an array
            return f"expected an observation {_describe_tree(self._example)}, got {type(obs).__name__} ({e})"
        return None

    def refused_columns(self, obs: Sequence[Any]) -> list[tuple[int, str | None]]:
        """(column, reason) of each observation that does not fit; every column (reason None) when
        no single observation can be blamed: a request of k rows is refused as a whole."""
        misfits = [(j, self.misfit(o)) for j, o in enumerate(obs)]
        blamed = [(j, why) for j, why in misfits if why is not None]
        return blamed or [(j, None) for j in range(len(obs))]


def _describe_tree(obs) -> str:
    leaves = jax.tree_util.tree_leaves(obs)
    if len(leaves) == 1 and not isinstance(obs, (dict, list, tuple)):
        return _describe(leaves[0])
    return str(jax.tree_util.tree_map(_describe, obs))


class RecurrentRows:
    """The recurrent state for k rows: `initial` at the start, a row reset as its episode starts.

    With k = 1 the state has no row axis (one request of one observation), as `example_state`.
    """

    def __init__(self, example_state: Any, k: int):
        self.k = k
        self._row = None if example_state is None else jax.tree_util.tree_map(np.asarray, example_state)

    @property
    def recurrent(self) -> bool:
        return self._row is not None

    @property
    def initial(self) -> Any:
        """The state of k rows that all start an episode (None for a feed-forward policy)."""
        if self._row is None or self.k == 1:
            return self._row
        return jax.tree_util.tree_map(lambda x: np.repeat(x[None], self.k, axis=0), self._row)

    def reset(self, state: Any, column: int) -> Any:
        """`state` with row `column` back at its episode start; the other rows are kept."""
        if self._row is None or self.k == 1:
            return self._row

        def reset_leaf(s, initial):
            s = np.array(s, copy=True)  # the policy's output may be read-only, or shared with a batch
            s[column] = initial
            return s

        return jax.tree_util.tree_map(reset_leaf, state, self._row)


def env_actions_fn(action_space: gymnasium.Space, action: Any, k: int) -> Callable[[Any], Sequence[Any]]:
    """A function from the policy's action output (as `action`, the first one) to the k actions,
    indexable by column, that the environments take."""
    a = np.asarray(action)
    if isinstance(action, (np.integer, np.ndarray)) and a.dtype.kind in "iu" and a.ndim == (0 if k == 1 else 1):
        # Plain Python ints: gymnasium's Discrete.contains checks a numpy integer through
        # np.issubdtype, several times slower than an int.
        return (lambda x: [x.item()]) if k == 1 else (lambda x: x.tolist())
    if isinstance(action_space, gymnasium.spaces.Box):
        low, high = action_space.low, action_space.high
        # The environment gets the action clipped to its Box; the trajectory keeps the policy's
        # own sample, whose log-prob the learner needs.
        return (lambda x: np.clip(x, low, high)[None]) if k == 1 else (lambda x: np.clip(x, low, high))
    return (lambda x: [x]) if k == 1 else (lambda x: x)

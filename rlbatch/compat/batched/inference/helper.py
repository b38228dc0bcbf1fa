"""Feature helpers of batched's inference processors: rows in, padded batches, rows out.

A call's features are a dict `{name: rows}`; `rows` is an array or tensor whose axis 0 is the row
(`[n, T, ...]`), or a list of n per-row sequences of different lengths (the ragged case). A batch
is a dict of `[rows, L, ...]` arrays, each feature padded to the batch's longest row with its pad
token (`pad_tokens[name]`, default 0), on the right or, with `padding_side="left"`, on the left.

Difference from batched 0.1.5, on purpose: dtypes are kept (batched turned every feature into
int64, truncating floats) and rows may carry trailing dimensions (batched required 1-D rows).
numpy and torch are both supported; torch is only imported when a torch tensor is passed.
"""
from __future__ import annotations

import sys
from typing import Any, Mapping, Sequence

import numpy as np

__all__ = ["torch_or_np", "is_torch", "stack_features", "unstack_features", "stack_outputs", "unstack_outputs"]


def is_torch(x) -> bool:
    """True for a torch tensor, without importing torch (a tensor's module is loaded already)."""
    torch = sys.modules.get("torch")
    return torch is not None and torch.is_tensor(x)


def _first_leaf(x):
    while isinstance(x, (Mapping, list, tuple)) and len(x):
        x = next(iter(x.values())) if isinstance(x, Mapping) else x[0]
    return x


def torch_or_np(x) -> Any:
    """The module (torch or numpy) of the first array or tensor in `x` (a dict, list or array)."""
    leaf = _first_leaf(x)
    if is_torch(leaf):
        return sys.modules["torch"]
    if isinstance(leaf, (np.ndarray, np.generic)):
        return np
    raise ValueError(f"Unsupported input type: expected a numpy array or a torch tensor, got {type(leaf).__name__}")


def to_numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if is_torch(x) else np.asarray(x)


def stack_features(inputs: Sequence[Mapping[str, Any]], pad_tokens: Mapping[str, Any] | None,
                   padding_side: str = "right") -> dict:
    """Pads and stacks per-row feature dicts into `{name: [len(inputs), L, ...]}` (numpy or torch,
    as the first row's first feature), keeping each feature's dtype."""
    if not inputs:
        raise ValueError("stack_features needs at least one row, got none")
    lib = torch_or_np(inputs[0])
    pad_tokens = pad_tokens or {}
    left = padding_side == "left"
    out = {}
    for key in inputs[0]:
        rows = [row[key] for row in inputs]
        longest = max(r.shape[0] for r in rows)
        trailing = tuple(rows[0].shape[1:])
        shape = (len(rows), longest) + trailing
        padded = lib.full(shape, pad_tokens.get(key, 0), dtype=rows[0].dtype)
        for i, r in enumerate(rows):
            n = r.shape[0]
            if left:
                padded[i, longest - n:] = r
            else:
                padded[i, :n] = r
        out[key] = padded
    return out


def unstack_features(inputs: Mapping[str, Any]) -> list[dict]:
    """One dict per row of a call's features (axis 0 of each value, or its list entries)."""
    if not isinstance(inputs, Mapping) or not inputs:
        raise ValueError(f"expected the features as a non-empty dict {{name: rows}} or keyword "
                         f"arguments, got {inputs!r}")
    n = len(next(iter(inputs.values())))
    for key, value in inputs.items():
        if len(value) != n:
            raise ValueError(f"every feature must have the same number of rows: expected {n} "
                             f"(as the first feature), got {len(value)} for {key!r}")
    return [{key: value[i] for key, value in inputs.items()} for i in range(n)]


def stack_outputs(rows: list, lib: Any = np):
    """A call's result from its rows' results: arrays stacked on a new axis 0; dicts and lists of
    arrays stacked per entry."""
    head = rows[0]
    if isinstance(head, Mapping):
        return {key: stack_outputs([r[key] for r in rows], lib) for key in head}
    if isinstance(head, (list, tuple)):
        return [stack_outputs([r[i] for r in rows], lib) for i in range(len(head))]
    stacked = np.stack([to_numpy(r) for r in rows])
    return sys.modules["torch"].from_numpy(stacked) if lib is not np else stacked


def unstack_outputs(outputs) -> list:
    """The rows of a batch function's output: an array or tensor, or a dict or list of them."""
    if isinstance(outputs, Mapping):
        per_key = {key: unstack_outputs(value) for key, value in outputs.items()}
        n = len(next(iter(per_key.values())))
        return [{key: rows[i] for key, rows in per_key.items()} for i in range(n)]
    if isinstance(outputs, (list, tuple)):
        columns = [unstack_outputs(value) for value in outputs]
        return [[column[i] for column in columns] for i in range(len(columns[0]))]
    return list(outputs)

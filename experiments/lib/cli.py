"""Experiment plumbing shared by the scripts in experiments/: `Args` dataclasses become CLIs.

    @dataclasses.dataclass(frozen=True)
    class Args:
        num_actors: int = 256
        \"\"\"actor threads\"\"\"

    args = experiments.lib.cli.parse(Args)   # --num-actors 64, --help shows the docstring of every field

Field docstrings (a string literal right under the field, as CleanRL writes them) become the help
text. Booleans take `--flag` / `--no-flag`; tuples take several values (`--buckets 8 16 32`).
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import textwrap
import typing
from typing import Any, Sequence, TypeVar

__all__ = ["parse", "field_docs", "pin_python_threads", "prefer_sync_cpu_dispatch"]

T = TypeVar("T")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the description's own line breaks and shows every option's default."""


def field_docs(cls) -> dict[str, str]:
    """The docstring written under each field of a dataclass, by name."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    docs = {}
    body = tree.body[0].body
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _bool(text: str) -> bool:
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {text!r}")


def parse(cls: type[T], argv: Sequence[str] | None = None, description: str | None = None) -> T:
    """Builds an argparse CLI from a dataclass and returns the parsed instance."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    if description is None:
        doc = (cls.__doc__ or "").strip()
        if doc.startswith(cls.__name__ + "("):  # dataclasses' generated signature, not a docstring
            import sys

            doc = (getattr(sys.modules.get(cls.__module__), "__doc__", None) or "").strip()
        description = doc or None
    parser = argparse.ArgumentParser(description=description, formatter_class=_HelpFormatter)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        flag = "--" + f.name.replace("_", "-")
        kwargs: dict[str, Any] = dict(default=default, help=docs.get(f.name, " "), dest=f.name)
        origin = typing.get_origin(hint)
        args = typing.get_args(hint)
        if origin is typing.Union and type(None) in args:  # Optional[X]
            hint = next(a for a in args if a is not type(None))
            origin, args = typing.get_origin(hint), typing.get_args(hint)
        if hint is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
            continue
        if origin in (tuple, list):
            kwargs.update(nargs="+", type=args[0] if args else str)
            parser.add_argument(flag, **kwargs)
            continue
        kwargs["type"] = hint if hint in (int, float, str) else str
        parser.add_argument(flag, **kwargs)
    ns = parser.parse_args(argv)
    values = vars(ns)
    for f in dataclasses.fields(cls):
        if typing.get_origin(hints[f.name]) is tuple and values[f.name] is not None:
            values[f.name] = tuple(values[f.name])
    return cls(**values)


def prefer_sync_cpu_dispatch() -> bool:
    """On a CPU-only JAX, runs computations in the calling thread (`jax_cpu_enable_async_dispatch`
    off). Returns whether it changed the setting.

    The policy service's computations are tiny on a CPU; dispatching each to an XLA worker thread
    and waiting for it costs two thread hand-offs per batch, which with hundreds of actor threads
    wanting the GIL take longer than the computation (measured: 24.6k -> 34k requests/s with 16
    callers, an earlier version of the service). The GIL is still released while a computation
    runs. This is a process-wide JAX setting, so the library never changes it on its own. The actor
    and training scripts call this at start; `experiments.bench_policy` no longer does by default,
    since at 256 callers its paired runs favour asynchronous dispatch, which lets PolicyService
    pipeline two batches (see README, policy service): measure both for your own policy.
    """
    import jax

    if jax.default_backend() != "cpu":
        return False
    jax.config.update("jax_cpu_enable_async_dispatch", False)
    return True


def pin_python_threads(pin: bool) -> str:
    """Starts JAX, then (when `pin`) confines this thread and the threads it starts afterwards to
    one CPU (`rlbatch.pin_threads`); returns a line saying what was done, for the script's report.

    JAX starts first so that XLA's thread pools keep every CPU.
    """
    import jax

    from rlbatch.affinity import pin_threads, thread_cpus

    jax.devices()
    if not pin:
        return f"Python threads on CPUs {sorted(thread_cpus())} (not pinned)"
    before = pin_threads()
    return (f"Python threads pinned to CPU {sorted(thread_cpus())} of {sorted(before)} "
            f"(rlbatch.pin_threads; --no-pin-python to compare)")

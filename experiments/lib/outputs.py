"""A benchmark's files: its result as JSON and its table as Markdown, beside each other.

    outputs.write(args.out, result, table)      # args.out + ".json", args.out + ".md"
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Mapping, Optional

__all__ = ["write"]


def write(stem: str, result: Mapping[str, Any], table: str, default: Optional[Callable[[Any], Any]] = None) -> None:
    """Writes `result` to `stem`.json and `table` to `stem`.md, making `stem`'s directory if needed;
    `default` converts what json cannot (as json.dump takes it)."""
    os.makedirs(os.path.dirname(stem) or ".", exist_ok=True)
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=1, default=default)
    with open(stem + ".md", "w") as f:
        f.write(table + "\n")

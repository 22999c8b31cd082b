"""Benchmarks: each a `python -m benchmarks.NAME` command that prints figures (and --json)."""

from __future__ import annotations

import json
from typing import Any


def metric(text: str, name: str) -> float:
    """The sum of a Prometheus text page's samples whose line starts with `name` (all labels)."""
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


def print_result(result: dict[str, Any], as_json: bool) -> None:
    """A benchmark's figures: one JSON object, or one aligned `name value` line each."""
    if as_json:
        print(json.dumps(result))
        return
    for k, v in result.items():
        print(f"{k:22s} {v}")

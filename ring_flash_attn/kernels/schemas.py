"""Checks, once per process, that the private ATen ops a backend calls still have the arguments it
passes. A PyTorch upgrade that renames or reorders them then shows up as "backend unavailable:
..." in the selection report instead of a wrong call deep in a kernel."""

from __future__ import annotations

from functools import lru_cache
from typing import Dict, Sequence, Tuple

import torch

# op name -> (names of the leading positional arguments, in order; names of keyword arguments used)
OpSpec = Dict[str, Tuple[Sequence[str], Sequence[str]]]


@lru_cache(maxsize=None)
def _schema_problem(op_name: str, positional: Tuple[str, ...], keywords: Tuple[str, ...]) -> str:
    packet = getattr(torch.ops.aten, op_name, None)
    if packet is None:
        return f"torch {torch.__version__} has no aten.{op_name}"
    try:
        args = packet.default._schema.arguments
    except (AttributeError, RuntimeError) as err:  # op present but not loadable on this build
        return f"aten.{op_name} unavailable ({err})"
    names = [a.name for a in args]
    if tuple(names[: len(positional)]) != positional:
        return f"aten.{op_name} arguments changed: expected {list(positional)} first, found {names}"
    missing = [k for k in keywords if k not in names]
    if missing:
        return f"aten.{op_name} has no argument(s) {missing}"
    return ""


def missing_ops(spec: OpSpec) -> list[str]:
    """Human-readable problems with the ops in ``spec``; empty when all match."""
    problems = (_schema_problem(name, tuple(pos), tuple(kw)) for name, (pos, kw) in spec.items())
    return [p for p in problems if p]

"""How public functions meet ``torch.compile``.

The public functions are traced: their work is custom ops (:mod:`ring_flash_attn.ring.ops`,
:mod:`ring_flash_attn.allgather.ops`; dropout included, its seed an op output), so a compiled caller
keeps one graph (``fullgraph=True`` works). Only ``llama3_flash_attn_prepare_cu_seqlens`` (host work
on ``cu_seqlens``) is not: it runs eagerly inside compiled code, with a graph break around the call,
exactly as in eager mode on every rank whatever the shapes -- so a compiled step gives the eager
result and never leaves one rank compiling while the others wait in a collective.
"""

from __future__ import annotations

import functools
import inspect
from typing import Callable, TypeVar

import torch

F = TypeVar("F", bound=Callable)


def eager_under_compile(fn: F) -> F:
    """``fn`` unchanged in eager mode; under ``torch.compile`` called as is, never traced. A plain
    function around the disabled one: ``torch.compile(fn)`` unwraps a disabled function itself and
    would trace it, but not one it finds inside a function it compiles."""
    disabled = torch.compiler.disable(fn, recursive=True)

    @functools.wraps(fn)
    def run_eagerly(*args, **kwargs):
        return disabled(*args, **kwargs)

    return run_eagerly  # type: ignore[return-value]


def public(argument_docs: str) -> Callable[[F], F]:
    """Decorator of the public functions: ``fn`` with ``argument_docs`` (the arguments and returns
    that a family's functions share) appended to its docstring."""

    def wrap(fn: F) -> F:
        fn.__doc__ = inspect.cleandoc(fn.__doc__ or "") + "\n\n" + inspect.cleandoc(argument_docs)
        return fn

    return wrap

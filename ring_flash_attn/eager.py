"""Public functions run eagerly inside ``torch.compile``d code.

Dynamo does not trace into them (their host-side planning, collectives and autograd Function are
not traceable yet): a compiled caller gets a graph break around each call and the call runs exactly
as in eager mode, on every rank, whatever the shapes -- so a compiled step gives the eager result
and never leaves one rank compiling while the others wait in a collective.
"""

from __future__ import annotations

from typing import Callable, TypeVar

import torch

F = TypeVar("F", bound=Callable)


def eager_under_compile(fn: F) -> F:
    """``fn`` unchanged in eager mode; under ``torch.compile`` called as is, never traced."""
    return torch.compiler.disable(fn, recursive=True)

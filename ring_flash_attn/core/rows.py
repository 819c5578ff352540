"""Rows of the sequence dimension that a block job, a gather or a scatter selects: a ``slice`` (a view,
no copy) or an int64 index tensor (gathered); :func:`take` reads either."""

from __future__ import annotations

from typing import Union

import torch

Tensor = torch.Tensor
Rows = Union[slice, Tensor]


def take(x: Tensor, rows: Rows, dim: int = 1) -> Tensor:
    """``x``'s ``rows`` along ``dim`` (negative: from the end), for reading: ``x`` itself when they
    are all of its rows."""
    if not isinstance(rows, slice):
        return x.index_select(dim, rows)
    if not rows.start and rows.step in (None, 1) and (rows.stop is None or rows.stop >= x.shape[dim]):
        return x
    return x[(slice(None),) * (dim % x.dim()) + (rows,)]

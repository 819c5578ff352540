"""Rows of the sequence dimension that a block job, a gather or a scatter selects: a ``slice`` (a view,
no copy) or an int64 index tensor (gathered); :func:`take` reads either."""

from __future__ import annotations

from typing import Union

import torch

Tensor = torch.Tensor
Rows = Union[slice, Tensor]


def take(x: Tensor, rows: Rows, dim: int = 1) -> Tensor:
    return x[(slice(None),) * dim + (rows,)] if isinstance(rows, slice) else x.index_select(dim, rows)

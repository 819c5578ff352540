"""Summing block results with one rounding and as few memory passes as possible.

A rank's queries get one partial result per job: ``(out, lse)`` to merge in the forward, ``dq`` to
add in the backward. Summing in float32 and casting once costs a copy into float32, a pass per job
and a final cast. The schedule says beforehand how many jobs touch each row, so:

* the first job that covers every row hands over its kernel output as the result (no copy);
* rows touched by exactly two jobs are combined in place in the input dtype -- the arithmetic runs
  in float32 and rounds once, which is bit for bit what float32 accumulation and a final cast give;
* rows touched three or more times get a float32 accumulator from their second contribution on.

:func:`sum_dtype` states that rule once; the ring's dK/dV messages and the all-gather family's
reduce-scatters use it too.

Packed jobs (rows gathered by index) and kernels that answer in a wider dtype take the plain path:
float32 accumulators for every row. Rows are the third dimension from the end (``(B, S, H, D)`` or a
packed ``(T, H, D)``), the lse's last (``(B, H, S)`` or ``(H, T)``): batch and packed results go
through the same code, without a batch dimension added to packed ones.
"""

from __future__ import annotations

from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch

from .merge import accumulator_dtype, merge_into
from .rows import Rows

Tensor = torch.Tensor


def sum_dtype(dtype: torch.dtype, terms: Optional[int], kernel_in_input_dtype: bool = True) -> torch.dtype:
    """The one rule for when a sum of partial results is held in the input dtype ``dtype``: at most
    two terms, each a kernel output in the input dtype, added with float32 math and rounded once, give
    bit for bit what float32 accumulation and a final cast give. More terms, an unknown count
    (``None``) or a kernel answering in a wider dtype: float32 (float64 for float64 inputs)."""
    if terms is not None and terms <= 2 and kernel_in_input_dtype:
        return dtype
    return accumulator_dtype(dtype)


def row_intervals(job_rows: Sequence[slice], length: int) -> List[Tuple[int, int, int]]:
    """``(start, stop, jobs touching it)`` for the pieces the jobs' row slices cut ``[0, length)`` into."""
    cuts = sorted({0, length, *(r.start for r in job_rows), *(r.stop for r in job_rows)})
    pieces = []
    for a, b in zip(cuts[:-1], cuts[1:]):
        count = sum(1 for r in job_rows if r.start <= a and b <= r.stop)
        if count:
            pieces.append((a, b, count))
    return pieces


def slice_rows(all_rows: Sequence[Rows], length: int) -> Optional[List[slice]]:
    """The rows as plain unit-step slices within ``[0, length)``, or None if any is an index tensor."""
    out = []
    for rows in all_rows:
        if not isinstance(rows, slice):
            return None
        start, stop, step = rows.indices(length)
        if step != 1:
            return None
        out.append(slice(start, stop))
    return out


def disjoint(rows: Sequence[slice]) -> bool:
    ordered = sorted(rows, key=lambda r: r.start)
    return all(a.stop <= b.start for a, b in zip(ordered[:-1], ordered[1:]))


class JobRows(NamedTuple):
    """The query rows of one rank's jobs in schedule order, with what summing over them needs:
    derived once per plan (:func:`job_rows`), read at every call."""

    rows: Tuple[Rows, ...]
    pieces: Optional[List[Tuple[int, int, int]]]  # :func:`row_intervals` of the rows; None if any is an index
    first_covers_all: bool  # the first job's rows are every row


def job_rows(rows: Sequence[Rows], length: int) -> JobRows:
    slices = slice_rows(rows, length)
    return JobRows(tuple(rows), None if slices is None else row_intervals(slices, length),
                   bool(rows) and covers_all(rows[0], length))


class RowCombiner:
    """The sum (``merge=False``) or online-softmax merge (``merge=True``) of job results over rows.

    ``first`` is the result of a job covering every row, in the input dtype: it becomes the result.
    Then :meth:`add` each later job's result for its rows, in schedule order.
    """

    def __init__(self, pieces: List[Tuple[int, int, int]], first: Tensor, first_lse: Optional[Tensor] = None,
                 merge: bool = False) -> None:
        self.pieces = pieces  # :func:`row_intervals` of the jobs' rows
        self.seen = [1] * len(self.pieces)  # the first job touched every piece
        self.wide: Dict[int, Tensor] = {}  # float32 accumulators of pieces with three or more jobs
        self.result, self.lse, self.merge = first, first_lse, merge

    def add(self, rows: slice, value: Tensor, value_lse: Optional[Tensor] = None) -> None:
        for i, (a, b, count) in enumerate(self.pieces):
            if b <= rows.start or a >= rows.stop:
                continue
            self.seen[i] += 1
            part = value[..., a - rows.start : b - rows.start, :, :]
            part_lse = None if value_lse is None else value_lse[..., a - rows.start : b - rows.start]
            target = self.result[..., a:b, :, :]
            wide = sum_dtype(target.dtype, count)
            if wide != target.dtype and self.seen[i] == 2:
                self.wide[i] = target.to(wide)
            acc = self.wide.get(i, target)
            if self.merge:
                merge_into(acc, self.lse[..., a:b], part, part_lse)
            else:
                acc += part  # in place: float32 math, one rounding to acc's dtype
            if i in self.wide and self.seen[i] == count:
                target.copy_(self.wide.pop(i))


def add_rows(acc: Tensor, rows: Rows, value: Tensor) -> None:
    """``acc[rows] += value`` along the rows dimension (``-3``)."""
    if isinstance(rows, slice):
        acc[..., rows, :, :] += value
    else:
        acc.index_add_(acc.dim() - 3, rows, value.to(acc.dtype))


def merge_rows(out: Tensor, lse: Tensor, rows: Rows, block_out: Tensor, block_lse: Tensor) -> None:
    """Fold a block's result into the accumulators at ``rows`` (in place)."""
    if isinstance(rows, slice):
        merge_into(out[..., rows, :, :], lse[..., rows], block_out, block_lse)
        return
    out_dim, lse_dim = out.dim() - 3, lse.dim() - 1
    out_rows, lse_rows = out.index_select(out_dim, rows), lse.index_select(lse_dim, rows)
    merge_into(out_rows, lse_rows, block_out, block_lse)
    out.index_copy_(out_dim, rows, out_rows)
    lse.index_copy_(lse_dim, rows, lse_rows)


class WideAccumulator:
    """Float32 (float64 for float64 inputs) accumulators for every row; rows may be index tensors."""

    def __init__(self, like: Tensor, lse_like: Optional[Tensor], length: int, first_rows: Rows, merge: bool) -> None:
        shape = (*like.shape[:-3], length, *like.shape[-2:])
        dtype = accumulator_dtype(like.dtype)
        self.merge = merge
        if covers_all(first_rows, length):  # the first result is copied in, not merged into zeros
            self.result = like.to(dtype, copy=True)
            self.lse = None if lse_like is None else lse_like.to(dtype, copy=True)
            return
        self.result = torch.zeros(shape, dtype=dtype, device=like.device)
        self.lse = None
        if merge:
            self.lse = torch.full((*like.shape[:-3], like.shape[-2], length), float("-inf"), dtype=dtype,
                                  device=like.device)
        self.add(first_rows, like, lse_like)

    def add(self, rows: Rows, value: Tensor, value_lse: Optional[Tensor] = None) -> None:
        if self.merge:
            merge_rows(self.result, self.lse, rows, value, value_lse)
        else:
            add_rows(self.result, rows, value)


def covers_all(rows: Rows, length: int) -> bool:
    return isinstance(rows, slice) and rows.indices(length) == (0, length, 1)


def start_sum(rows: JobRows, length: int, value: Tensor, value_lse: Optional[Tensor], dtype: torch.dtype,
              merge: bool) -> Union[RowCombiner, WideAccumulator]:
    """The accumulator of one rank's results, begun with the first job's. ``rows``: the rows of every
    job in schedule order, the first included (:func:`job_rows`, derived once per plan); ``length``
    local rows; ``dtype`` is the result's."""
    if rows.pieces is not None and rows.first_covers_all and value.dtype == dtype and value.is_contiguous():
        return RowCombiner(rows.pieces, value, value_lse, merge)
    return WideAccumulator(value, value_lse, length, rows.rows[0], merge)

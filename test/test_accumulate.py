"""The one-rounding accumulators: same bits as float32 accumulation and a final cast."""

from __future__ import annotations

import pytest
import torch

from ring_flash_attn.core.accumulate import RowCombiner, WideAccumulator, job_rows, row_intervals, start_sum
from ring_flash_attn.core.merge import _merge

JOBS = [slice(0, 12), slice(4, 12), slice(0, 4), slice(6, 10), slice(8, 12), slice(6, 8)]  # 1 to 4 jobs per row


def test_row_intervals_count_the_jobs_on_each_piece():
    assert row_intervals(JOBS, 12) == [(0, 4, 2), (4, 6, 2), (6, 8, 4), (8, 10, 4), (10, 12, 3)]
    assert row_intervals([slice(2, 5)], 8) == [(2, 5, 1)]


def _results(dtype, merge, seed=0):
    g = torch.Generator().manual_seed(seed)
    parts = [torch.randn(2, r.stop - r.start, 3, 8, generator=g).to(dtype) for r in JOBS]
    lses = [torch.randn(2, 3, r.stop - r.start, generator=g) * 3 for r in JOBS] if merge else [None] * len(JOBS)
    return parts, lses


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("merge", [False, True])
def test_combiner_matches_float32_accumulation_bitwise(dtype, merge):
    parts, lses = _results(dtype, merge)
    wide = torch.float32
    acc = parts[0].to(wide, copy=True)
    acc_lse = lses[0].clone() if merge else None
    for rows, part, lse in zip(JOBS[1:], parts[1:], lses[1:]):
        if merge:
            _merge(acc[:, rows], acc_lse[:, :, rows], part, lse)
        else:
            acc[:, rows] += part
    combined = start_sum(job_rows(JOBS, 12), 12, parts[0].clone(), None if not merge else lses[0].clone(), dtype,
                         merge)
    assert isinstance(combined, RowCombiner)
    for rows, part, lse in zip(JOBS[1:], parts[1:], lses[1:]):
        combined.add(rows, part, lse)
    assert combined.result.dtype == dtype
    assert torch.equal(combined.result, acc.to(dtype))
    if merge:
        assert torch.equal(combined.lse, acc_lse)


def test_index_rows_and_wider_results_take_the_float32_path():
    parts, _ = _results(torch.bfloat16, False)
    index_jobs = [slice(0, 12), torch.tensor([1, 3, 5])]
    for rows, first in ((index_jobs, parts[0]), (JOBS, parts[0].float())):
        assert isinstance(start_sum(job_rows(rows, 12), 12, first, None, torch.bfloat16, False), WideAccumulator)
    partial_first = start_sum(job_rows([slice(4, 12), slice(0, 12)], 12), 12, parts[1], None, torch.bfloat16,
                              False)
    assert isinstance(partial_first, WideAccumulator)
    assert torch.equal(partial_first.result[:, :4], torch.zeros(2, 4, 3, 8))

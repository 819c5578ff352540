"""Dropout on the ring (see dropout_cases.py for the checks): float64 through the reference kernel on
CPU, W = 1..4, batch and packed documents; on GPUs through PyTorch's FA2 (test_ring_gpu runs
GPU_CASES)."""

from __future__ import annotations

import itertools

import pytest
import torch

from helpers.dropout_cases import DropoutCase, check_dropout

CPU_CASES = [
    DropoutCase(layout=layout, causal=causal, world_size=w, seed=n)
    for n, (w, layout, causal) in enumerate(itertools.product((1, 2, 3, 4), ("ring", "zigzag", "stripe"), (True, False)))
    if w > 1 or layout == "ring"
] + [
    DropoutCase(layout="zigzag", causal=True, world_size=2, doc_lengths=(8, 20, 4), seed=40),
    DropoutCase(layout="stripe", causal=False, world_size=3, doc_lengths=(6, 12), seed=41),
    DropoutCase(layout="zigzag", causal=True, world_size=3, window=(5, 0), seed=42),
    DropoutCase(layout="llama3", causal=True, world_size=2, doc_lengths=(5, 9, 2), seed=43),
    DropoutCase(layout="zigzag_llama3", causal=False, world_size=3, doc_lengths=(6, 12), seed=44),  # heads_k_stride 1
    DropoutCase(layout="packed_zigzag", causal=True, world_size=2, doc_lengths=(7, 9), seed=45),
]


@pytest.mark.parametrize("case", CPU_CASES, ids=[c.id() for c in CPU_CASES])
def test_dropout_is_replayed_exactly(dist_pool, case):
    check_dropout(case, dist_pool(case.world_size).run("helpers.dropout_cases:run_rank", case=case))


def test_dropout_without_grad_and_twice_backward():
    """No backward at all, and a second backward of the same graph, both fine."""
    import ring_flash_attn as rfa

    q, k, v = (torch.randn(1, 8, 2, 16, dtype=torch.float64, requires_grad=True) for _ in range(3))
    with torch.no_grad():
        rfa.ring_flash_attn_func(q, k, v, dropout_p=0.5, causal=True)
    out = rfa.ring_flash_attn_func(q, k, v, dropout_p=0.5, causal=True)
    first = torch.autograd.grad(out.sum(), (q, k, v), retain_graph=True)
    second = torch.autograd.grad(out.sum(), (q, k, v))
    for a, b in zip(first, second):
        assert torch.equal(a, b)

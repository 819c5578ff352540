"""ALiBi (``alibi_slopes``) on the ring: the bias depends on global positions, so every block gets
the positions of its queries and keys; computed by the reference kernel. float64 reference on the
whole sequence, W = 1..4, every layout, causal and not, batch and packed documents."""

from __future__ import annotations

import itertools

import pytest
import torch

import ring_flash_attn as rfa
from helpers.cases import Case, check, fit_documents

CASES = [
    Case(layout=layout, packing=packing, causal=causal, dtype=dtype, backend="auto", world_size=w, nheads=4,
         nheads_k=2 if packing != "qkvpacked" else 4, alibi=True, seed=n)
    for n, (w, layout, causal, packing, dtype) in enumerate(itertools.product(
        (1, 2, 3, 4), ("ring", "zigzag", "stripe"), (True, False), ("func", "qkvpacked"), ("fp64", "fp32")))
    if (w == 1) == (layout == "ring") or w > 1
] + [
    Case(layout="zigzag", packing="func", causal=True, dtype="fp64", backend="reference", world_size=3, alibi=True,
         window=(5, 0), softcap=3.0, q_scale=3.0, seed=90),
    Case(layout="stripe", packing="kvpacked", causal=True, dtype="bf16", backend="reference", world_size=2,
         alibi=True, seed=91),
]
PACKED = [
    Case(layout=layout, packing="func", causal=causal, dtype="fp64", backend="auto", world_size=w,
         documents=(4 * w, 10 * w, 2 * w), nheads_k=2, alibi=True, seed=n)
    for n, (w, layout, causal) in enumerate(itertools.product((2, 3), ("ring", "zigzag", "stripe"), (True, False)))
] + [  # the all-gather family: documents cross rank boundaries; head chunks cut the slopes
    Case(layout=layout, packing="func", causal=causal, dtype="fp64", backend="auto", world_size=w,
         documents=fit_documents(layout, w, (5, 3 * w + 1, 2 * w)), nheads_k=2, heads_k_stride=stride, alibi=True,
         seed=n)
    for n, (w, layout, causal, stride) in enumerate(itertools.product(
        (2, 3), ("llama3", "zigzag_llama3", "packed_zigzag"), (True, False), (1, None)))
]


@pytest.mark.parametrize("case", CASES + PACKED, ids=[c.id() for c in CASES + PACKED])
def test_alibi_matches_float64_reference(dist_pool, case):
    check(case, dist_pool(case.world_size).run("helpers.cases:run_rank", case=case))


def test_alibi_errors():
    q, k, v = (torch.randn(2, 8, 4, 16) for _ in range(3))
    with pytest.raises(TypeError, match="float32"):
        rfa.ring_flash_attn_func(q, k, v, alibi_slopes=torch.ones(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="shape"):
        rfa.ring_flash_attn_func(q, k, v, alibi_slopes=torch.ones(3))
    with pytest.raises(ValueError, match="no ALiBi"):
        rfa.ring_flash_attn_func(q, k, v, alibi_slopes=torch.ones(4), backend="torch_cpu_flash")
    cu = torch.tensor([0, 8], dtype=torch.int32)
    with pytest.raises(ValueError, match="shape"):  # packed documents: one slope per head
        rfa.ring_flash_attn_varlen_func(q[0], k[0], v[0], cu, 8, alibi_slopes=torch.ones(2, 4))

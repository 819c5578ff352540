"""Attention sinks (``sinks=``, gpt-oss) on every family over gloo on CPU: batch ring / zigzag / stripe
for W = 1..4, every packed family for W = 2 and 3, Ulysses and Ulysses x ring; causal and not, GQA,
windows, soft-capping, ALiBi, fp32 / bf16 / fp16 / fp64, every packing, a loss that uses lse too --
out, lse, dq, dk, dv and the sinks' gradient (summed over the ranks) against a float64 reference
that appends the sink as one more key column."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

import ring_flash_attn as rfa
from helpers.attention_cases import PACKINGS
from helpers.cases import Case, check, packed_lengths
from test_varlen_cpu import doc_lengths

DTYPES = ("fp32", "bf16", "fp16")
WINDOWS = ((-1, -1), (5, 0), (3, 2))

BATCH = [
    Case(layout=layout, packing=PACKINGS[n % 3], causal=causal, dtype=DTYPES[n % 3], backend=("auto", "reference")[n % 2],
         world_size=w, nheads=4, nheads_k=4 if n % 3 == 2 else (2, 1)[n % 2], local_len=6,
         window=WINDOWS[n % 3] if causal or n % 3 != 1 else (-1, -1), softcap=(0.0, 5.0)[n % 4 == 1],
         q_scale=(1.0, 3.0)[n % 4 == 1], lse_grad=n % 5 == 0, sinks=True, seed=n)
    for n, (w, layout, causal) in enumerate(itertools.product((1, 2, 3, 4), ("ring", "zigzag", "stripe"), (True, False)))
] + [
    Case(layout="zigzag", packing="func", causal=True, dtype="fp64", backend="reference", world_size=3, nheads=4,
         nheads_k=2, alibi=True, lse_grad=True, sinks=True, seed=90),
]

PACKED = [
    Case(layout=layout, packing=PACKINGS[n % 3], causal=causal, dtype=DTYPES[n % 3], backend="auto", world_size=w,
         documents=doc_lengths(layout, w, random.Random(n), n % 4 == 0), nheads=4, nheads_k=4 if n % 3 == 2 else 2,
         window=((-1, -1), (4, 0))[n % 2] if causal else (-1, -1), lse_grad=n % 3 == 1, sinks=True, seed=n)
    for n, (w, layout, causal) in enumerate(itertools.product(
        (2, 3), ("ring", "zigzag", "stripe", "llama3", "zigzag_llama3", "packed_zigzag"), (True, False)))
]

ULYSSES = [
    Case(layout=layout, packing="func", causal=causal, dtype=("fp32", "bf16")[n % 2], backend="auto", world_size=u * r,
         nheads=4, nheads_k=(1, 2)[n % 2], window=(4, 0) if n % 3 == 0 else (-1, -1), lse_grad=n % 2 == 0, sinks=True,
         seed=n, ulysses_degree=u)
    for n, ((u, r), layout, causal) in enumerate(itertools.product(((2, 1), (2, 2)), ("zigzag", "stripe"), (True, False)))
] + [
    Case(layout=layout, packing="kvpacked", causal=True, dtype="fp32", backend="auto", world_size=u * r,
         documents=packed_lengths(layout, u, r, random.Random(u + r), single=False), nheads=4, nheads_k=2, sinks=True,
         seed=u + r, ulysses_degree=u)
    for (u, r), layout in (((2, 1), "llama3"), ((2, 2), "zigzag_llama3"), ((2, 2), "ring"))
] + [  # two head chunks per rank (8 heads, 4 K/V heads over 2 Ulysses ranks)
    Case(layout="zigzag", packing="func", causal=True, dtype="fp32", backend="auto", world_size=4, nheads=8,
         nheads_k=4, lse_grad=True, sinks=True, seed=70, ulysses_degree=2, head_chunks=2),
    Case(layout="stripe", packing="func", causal=False, dtype="fp32", backend="auto", world_size=2, documents=(6, 10),
         nheads=8, nheads_k=4, sinks=True, seed=71, ulysses_degree=2, head_chunks=2),
]


CASES = BATCH + PACKED + ULYSSES


@pytest.mark.parametrize("case", CASES, ids=[c.id() for c in CASES])
def test_sinks(dist_pool, case):
    check(case, dist_pool(case.world_size).run("helpers.cases:run_rank", case=case))


def test_sinks_of_any_float_dtype_and_bad_shapes():
    """bf16 sinks on fp32 inputs: their gradient comes back in bf16; wrong shapes / types are refused."""
    q, k, v = (torch.randn(1, 8, 4, 16, requires_grad=True) for _ in range(3))
    sinks = torch.zeros(4, dtype=torch.bfloat16, requires_grad=True)
    out = rfa.ring_flash_attn_func(q, k, v, causal=True, sinks=sinks)
    out.sum().backward()
    assert sinks.grad.dtype == torch.bfloat16 and sinks.grad.shape == (4,)
    with pytest.raises(ValueError, match=r"sinks must have shape \(nheads,\)"):
        rfa.ring_flash_attn_func(q, k, v, sinks=torch.zeros(2))
    with pytest.raises(TypeError, match="floating-point"):
        rfa.ring_flash_attn_func(q, k, v, sinks=torch.zeros(4, dtype=torch.int64))

"""Packed sequences on CPU over gloo: every varlen family (ring, zigzag, stripe, zigzag_llama3 per
document; llama3 and packed_zigzag over the whole pack) x packing x causal, W in {1, 2, 3, 4}, random
document lengths (length-1 documents and single documents included), GQA, fp32 / bf16 / fp16,
heads_k_stride 1 and nheads_k: out, lse, dq, dk, dv against a float64 per-document reference."""

from __future__ import annotations

import itertools
import random

import pytest

from helpers.attention_cases import PACKINGS
from helpers.cases import Case, check

WORLD_SIZES = (1, 2, 3, 4)
LAYOUTS = ("ring", "zigzag", "stripe", "llama3", "zigzag_llama3", "packed_zigzag")
DTYPES = ("fp32", "bf16", "fp16")
BACKENDS = ("torch_cpu_flash", "reference")


def doc_lengths(layout: str, world_size: int, rng: random.Random, shape: int) -> tuple:
    """Random document lengths the layout accepts; shape 0: a single document, 1: many short ones."""
    if layout in ("ring", "zigzag", "stripe", "zigzag_llama3"):
        unit = world_size * (2 if "zigzag" in layout else 1)  # each document splits over the ranks
        if shape == 0:
            return (unit * rng.randint(2, 6),)
        return tuple(unit * rng.choice([1, 1, 2, 3, 5]) for _ in range(rng.randint(2, 5)))
    unit = world_size * (2 if layout == "packed_zigzag" else 1)  # the whole pack splits over the ranks
    if shape == 0:
        return (unit * rng.randint(3, 8),)
    lengths = [rng.choice([1, 1, 2, 3, 7, 11]) for _ in range(rng.randint(2, 7))]
    lengths[-1] += -sum(lengths) % unit
    return tuple(lengths)


def _cases() -> list:
    cases = []
    for n, (w, layout, packing, causal) in enumerate(itertools.product(WORLD_SIZES, LAYOUTS, PACKINGS, (True, False))):
        rng = random.Random(n)
        heads = (4, 4) if packing == "qkvpacked" else ((4, 2), (6, 3), (4, 1), (4, 4))[n % 4]
        stride = (None, 1)[n % 2] if heads[1] > 1 else None
        cases.append(Case(
            layout=layout, packing=packing, causal=causal, dtype=DTYPES[n % 3], backend=BACKENDS[(n // 3) % 2],
            world_size=w, documents=doc_lengths(layout, w, rng, n % 5 == 0), nheads=heads[0], nheads_k=heads[1],
            head_dim=(16, 32, 64)[n % 3], heads_k_stride=stride, return_lse=n % 4 != 3, seed=n,
        ))
    return cases


CASES = _cases() + [  # sliding windows on the all-gather family (documents cross rank boundaries)
    Case(layout=layout, packing=("func", "kvpacked")[w % 2], causal=causal, dtype=("fp32", "bf16")[w % 2],
         backend="auto", world_size=w, documents=doc_lengths(layout, w, random.Random(100 + w), 1), nheads_k=2,
         window=window, heads_k_stride=1, seed=w)
    for w, layout, causal, window in itertools.product((2, 3), ("llama3", "zigzag_llama3", "packed_zigzag"), (True, False),
                                                       ((3, -1), (5, 2), (40, 0), (-1, 4)))
] + [  # float64 stays float64 through the windowed calls' dK/dV sums (non-causal windows, several documents)
    Case(layout=layout, packing="func", causal=False, dtype="fp64", backend="auto", world_size=w,
         documents=doc_lengths(layout, w, random.Random(300 + w), 1), nheads_k=2, window=window, seed=w)
    for w, layout, window in itertools.product((2, 3), ("llama3", "zigzag_llama3", "packed_zigzag"), ((5, 2), (-1, 4)))
] + [  # sliding windows on the ring family: the window in tokens, each document its own schedule
    Case(layout=layout, packing=("func", "kvpacked")[n % 2], causal=causal, dtype=("fp64", "bf16")[n % 2],
         backend="auto", world_size=w, documents=doc_lengths(layout, w, random.Random(200 + n), 1), nheads_k=2,
         window=window, seed=n)
    for n, (w, layout, causal, window) in enumerate(itertools.product(
        (1, 2, 3, 4), ("ring", "zigzag", "stripe"), (True, False), ((3, -1), (5, 2), (40, 0), (0, 7))))
    if causal or window[1] != 0
] + [  # soft-capped logits through the reference kernel, every family
    Case(layout=layout, packing="func", causal=causal, dtype="fp32", backend="reference", world_size=w,
         documents=tuple(m * w * (2 if "zigzag" in layout else 1) for m in (3, 1, 2)), nheads_k=2, softcap=4.0,
         q_scale=4.0, seed=w)
    for w, layout, causal in itertools.product((2, 3), LAYOUTS, (True, False))
]


@pytest.mark.parametrize("case", CASES, ids=[c.id() for c in CASES])
def test_varlen_matches_float64_reference(dist_pool, case):
    check(case, dist_pool(case.world_size).run("helpers.cases:run_rank", case=case))


def test_allgather_attends_own_keys_first_unless_windowed(monkeypatch):
    """Without a sliding window the all-gather family runs the OwnKeysFirst strategy (own keys while the
    others are gathered); with one it keeps the plain path. The cases above check both for exactness."""
    import torch

    import ring_flash_attn as rfa
    from ring_flash_attn.allgather.own_keys_first import OwnKeysFirst

    used = []
    forward = OwnKeysFirst.forward
    monkeypatch.setattr(OwnKeysFirst, "forward", lambda self, *a: used.append(1) or forward(self, *a))
    x = torch.randn(12, 2, 16)
    cu = torch.tensor([0, 4, 12], dtype=torch.int32)
    rfa.zigzag_llama3_flash_attn_varlen_func(x, x, x, cu, 8, causal=True)
    assert used == [1]
    rfa.zigzag_llama3_flash_attn_varlen_func(x, x, x, cu, 8, causal=True, window_size=(3, 0))
    assert used == [1]


@pytest.mark.parametrize("heads_k_stride", [1, 2])
def test_allgather_window_that_leaves_every_query_without_keys(heads_k_stride):
    """Caller-built cu_seqlens_q/k where the sliding window keeps no (query, key) pair on this rank: no
    varlen call is left to run; the rows come back as rows without keys do (0, lse -inf, zero gradients)."""
    import torch

    import ring_flash_attn as rfa

    q = torch.randn(5, 4, 8, requires_grad=True)
    k, v = (torch.randn(5, 2, 8, requires_grad=True) for _ in range(2))
    cu_q = torch.tensor([0, 0, 0, 4, 5], dtype=torch.int32)
    cu_k = torch.tensor([0, 2, 4, 5, 5], dtype=torch.int32)
    out, lse, _ = rfa.llama3_flash_attn_varlen_func(
        q, k, v, cu_q, cu_k, 4, 2, heads_k_stride=heads_k_stride, local_k_slice=slice(0, 5), causal=False,
        window_size=(0, 0), return_attn_probs=True)
    assert torch.equal(out, torch.zeros_like(out)) and bool(torch.isneginf(lse).all())
    out.sum().backward()
    for t in (q, k, v):
        assert torch.equal(t.grad, torch.zeros_like(t))

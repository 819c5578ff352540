"""Ulysses (all-to-all) and Ulysses x ring over gloo on CPU: every ring layout (batch: ring, zigzag,
stripe; packed documents: those and llama3, zigzag_llama3, packed_zigzag) as U x R in {1 x W, W x 1,
2 x 2, 2 x 3, 4 x 2}, causal and not, GQA with nheads_k below, at and above the Ulysses degree,
fp32 / bf16 / fp16, every packing, head chunks 1 / 2 / 4 -- out, lse, dq, dk, dv against the float64
reference on the whole sequence; then windows, soft-capping, ALiBi, lse gradients, length-1
documents, deterministic runs (bitwise), dropout (replayed exactly) and bad input."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

import ring_flash_attn as rfa
from helpers.attention_cases import PACKINGS
from helpers.cases import Case, check, packed_lengths
from helpers.dropout_cases import DropoutCase, check_dropout

GRIDS = ((1, 2), (1, 3), (2, 1), (3, 1), (4, 1), (2, 2), (2, 3), (4, 2))  # (U, R)
BATCH_LAYOUTS = ("ring", "zigzag", "stripe")
PACKED_LAYOUTS = BATCH_LAYOUTS + ("llama3", "zigzag_llama3", "packed_zigzag")
DTYPES = ("fp32", "bf16", "fp16")
BACKENDS = ("torch_cpu_flash", "reference")


def heads_for(u: int, n: int) -> tuple:
    """(nheads, nheads_k) with nheads_k below, at or above the Ulysses degree (cycling with n)."""
    options = {1: ((4, 2), (4, 1), (4, 4)), 2: ((4, 1), (4, 2), (8, 4)), 3: ((6, 1), (6, 3), (6, 6)),
               4: ((8, 2), (8, 4), (8, 8))}[u]
    return options[n % 3]


def _cases() -> list:
    cases = []
    for n, ((u, r), layout, causal) in enumerate(itertools.product(GRIDS, BATCH_LAYOUTS, (True, False))):
        w = u * r
        packing = PACKINGS[n % 3]
        heads = heads_for(u, n) if packing != "qkvpacked" else (heads_for(u, n)[0],) * 2
        cases.append(Case(
            layout=layout, packing=packing, causal=causal, dtype=DTYPES[n % 3], backend=BACKENDS[(n // 3) % 2],
            world_size=w, batch=(1, 2)[n % 2], local_len=(4, 6)[n % 2], nheads=heads[0], nheads_k=heads[1],
            head_dim=(16, 32)[n % 2], return_lse=n % 4 != 3, seed=n, ulysses_degree=u, head_chunks=(2, 1, 4)[n % 3]))
    for n, ((u, r), layout, causal) in enumerate(itertools.product(GRIDS, PACKED_LAYOUTS, (True, False))):
        w = u * r
        packing = PACKINGS[n % 3]
        heads = heads_for(u, n) if packing != "qkvpacked" else (heads_for(u, n)[0],) * 2
        lengths = packed_lengths(layout, u, r, random.Random(n), single=n % 5 == 0)
        cases.append(Case(
            layout=layout, packing=packing, causal=causal, dtype=DTYPES[n % 3], backend=BACKENDS[(n // 3) % 2],
            world_size=w, documents=lengths, nheads=heads[0], nheads_k=heads[1], head_dim=(16, 32)[n % 2],
            return_lse=n % 4 != 3, seed=n, ulysses_degree=u, head_chunks=(2, 1, 4)[n % 3]))
    return cases


def _option_cases() -> list:
    """Windows, soft-capping, ALiBi, lse gradients, float64 end to end, length-1 documents."""
    cases = []
    for n, ((u, r), layout, causal, window) in enumerate(itertools.product(
            ((2, 1), (2, 2), (1, 2)), BATCH_LAYOUTS, (True, False), ((3, -1), (5, 2), (-1, 4)))):
        cases.append(Case(layout=layout, packing="func", causal=causal, dtype=("fp32", "bf16")[n % 2], backend="auto",
                          world_size=u * r, window=window, local_len=6, nheads=4, nheads_k=(1, 2, 4)[n % 3], seed=n,
                          ulysses_degree=u))
    for n, ((u, r), layout) in enumerate(itertools.product(((2, 1), (2, 2)), ("zigzag_llama3", "llama3", "zigzag"))):
        cases.append(Case(layout=layout, packing="func", causal=n % 2 == 0, dtype="fp32", backend="auto",
                          world_size=u * r, documents=(4 * u * r, 8 * u * r), nheads_k=2,
                          window=(5, 0) if n % 2 == 0 else (3, 6), seed=n, ulysses_degree=u))
    for u, r in ((2, 1), (2, 2), (4, 2)):
        w = u * r
        cases += [
            Case(layout="zigzag", packing="func", causal=True, dtype="fp32", backend="reference", world_size=w,
                 softcap=5.0, q_scale=4.0, alibi=True, nheads=8, nheads_k=2, seed=w, ulysses_degree=u),
            Case(layout="stripe", packing="kvpacked", causal=False, dtype="fp64", backend="reference", world_size=w,
                 nheads=4, nheads_k=1, lse_grad=True, seed=w, ulysses_degree=u),
            Case(layout="zigzag_llama3", packing="func", causal=True, dtype="fp32", backend="reference", world_size=w,
                 documents=(2 * r, 4 * r * u, 2 * r * (u + 1)), softcap=4.0, q_scale=4.0, alibi=True, lse_grad=True,
                 nheads=8, nheads_k=2, seed=w, ulysses_degree=u),
        ]
    for layout in ("llama3", "zigzag_llama3"):  # float64 through the all-gather ring's windowed dK/dV sums
        cases.append(Case(layout=layout, packing="func", causal=False, dtype="fp64", backend="auto", world_size=4,
                          documents=(4, 12, 8), nheads_k=2, window=(5, 2), seed=7, ulysses_degree=2))
    for u, r in ((2, 1), (3, 1), (4, 1)):  # pure Ulysses: documents of any length, length-1 ones included
        w = u * r
        cases.append(Case(layout="ring", packing="func", causal=True, dtype="fp32", backend="torch_cpu_flash",
                          world_size=w, documents=(1, 5, 1, 1, 3 * w - 8 + w * 2), nheads=12,
                          nheads_k=(1, 3, 12)[u - 2], seed=u, ulysses_degree=u))
    return cases


CASES = _cases()
OPTION_CASES = _option_cases()


@pytest.mark.parametrize("case", CASES, ids=[c.id() for c in CASES])
def test_ulysses_matches_float64_reference(dist_pool, case):
    check(case, dist_pool(case.world_size).run("helpers.cases:run_rank", case=case))


@pytest.mark.parametrize("case", OPTION_CASES, ids=[c.id() for c in OPTION_CASES])
def test_ulysses_options_match_float64_reference(dist_pool, case):
    check(case, dist_pool(case.world_size).run("helpers.cases:run_rank", case=case))


DETERMINISTIC = [
    Case(layout="zigzag", packing="func", causal=True, dtype="bf16", backend="reference", world_size=4, nheads=8,
         nheads_k=2, deterministic=True, seed=3, ulysses_degree=2),
    Case(layout="ring", packing="qkvpacked", causal=False, dtype="fp32", backend="torch_cpu_flash", world_size=4,
         nheads=4, nheads_k=4, deterministic=True, seed=4, ulysses_degree=4),
]


@pytest.mark.parametrize("case", DETERMINISTIC, ids=[c.id() for c in DETERMINISTIC])
def test_deterministic_is_bitwise_reproducible(dist_pool, case):
    per_rank = dist_pool(case.world_size).run("helpers.cases:run_twice", case=case)
    check(case, per_rank)
    for r in per_rank:
        for name in ("out", "lse", "dq", "dk", "dv"):
            assert torch.equal(r[name], r[f"{name}_again"]), f"{name} differs between two identical calls"


DROPOUT = [
    DropoutCase(layout="zigzag", causal=True, world_size=4, ulysses_degree=2, seed=50),
    DropoutCase(layout="ring", causal=False, world_size=2, ulysses_degree=2, seed=51),
    DropoutCase(layout="stripe", causal=True, world_size=3, ulysses_degree=3, nheads=6, nheads_k=3, seed=52),
    DropoutCase(layout="zigzag_llama3", causal=True, world_size=4, ulysses_degree=2, doc_lengths=(8, 4, 12),
                seed=53),
    DropoutCase(layout="llama3", causal=False, world_size=2, ulysses_degree=2, doc_lengths=(5, 1, 6), seed=54),
]


@pytest.mark.parametrize("case", DROPOUT, ids=[c.id() for c in DROPOUT])
def test_dropout_is_replayed_exactly(dist_pool, case):
    check_dropout(case, dist_pool(case.world_size).run("helpers.dropout_cases:run_rank", case=case))


def test_bad_input_gets_a_clear_error():
    q = torch.randn(1, 8, 6, 16)
    kv = torch.randn(1, 8, 2, 16)
    with pytest.raises(TypeError, match="UlyssesRingGroups"):
        rfa.ulysses_flash_attn_func(q, kv, kv, group=object())
    with pytest.raises(ValueError, match="ring_layout"):
        rfa.ulysses_flash_attn_func(q, kv, kv, ring_layout="llama3")
    with pytest.raises(ValueError, match="head_chunks"):
        rfa.ulysses_flash_attn_func(q, kv, kv, head_chunks=0)
    with pytest.raises(ValueError, match="ulysses_degree"):
        rfa.make_ulysses_ring_groups(2, 2)
    with pytest.raises(ValueError, match="ends at"):
        rfa.ulysses_flash_attn_varlen_func(q[0], kv[0], kv[0], torch.tensor([0, 4, 9], dtype=torch.int32), 5)
    with pytest.raises(ValueError, match="max_seqlen"):
        rfa.ulysses_flash_attn_varlen_func(q[0], kv[0], kv[0], torch.tensor([0, 4, 8], dtype=torch.int32), 3)
    with pytest.raises(ValueError, match="ulysses_degree"):
        rfa.shard(q, "ring", 0, 4, ulysses_degree=3)


def test_bad_input_across_ranks(dist_pool):
    for errors in dist_pool(4).run("helpers.ulysses_cases:bad_input"):
        assert all(errors.values()), errors


def test_world_size_one_matches_sdpa():
    q, k, v = (torch.randn(2, 10, h, 16, dtype=torch.float64) for h in (4, 2, 2))
    out = rfa.ulysses_flash_attn_func(q, k, v, causal=True)
    ref = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), is_causal=True,
                                                           enable_gqa=True).transpose(1, 2)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("ulysses_degree,world_size", [(2, 4), (4, 4), (3, 6)])
def test_layout_helpers_know_the_2d_layout(ulysses_degree, world_size):
    """shard / unshard / position ids, batch and packed: rank r holds the (r % U)-th contiguous part
    of ring rank r // U's tokens, and unshard inverts shard."""
    r_degree = world_size // ulysses_degree
    x = torch.arange(4 * world_size * 3)[None]
    for layout in BATCH_LAYOUTS:
        parts = [rfa.shard(x, layout, rank, world_size, ulysses_degree=ulysses_degree) for rank in range(world_size)]
        assert torch.equal(rfa.unshard(parts, layout, ulysses_degree=ulysses_degree), x)
        for rank, part in enumerate(parts):
            ring_part = rfa.shard(x, layout if r_degree > 1 else "ring", rank // ulysses_degree, r_degree)
            piece = ring_part.shape[1] // ulysses_degree
            u = rank % ulysses_degree
            assert torch.equal(part, ring_part[:, u * piece:(u + 1) * piece])
            assert torch.equal(part[0], rfa.position_ids(layout, rank, world_size, x.shape[1],
                                                         ulysses_degree=ulysses_degree))
    cu = torch.tensor([0, 2 * world_size, 6 * world_size], dtype=torch.int32)
    from ring_flash_attn.layouts import shard_varlen, unshard_varlen, varlen_position_ids
    t = torch.arange(6 * world_size)
    for layout in PACKED_LAYOUTS:
        parts = [shard_varlen(t, cu, layout, rank, world_size, ulysses_degree=ulysses_degree)
                 for rank in range(world_size)]
        assert torch.equal(unshard_varlen(parts, cu, layout, ulysses_degree=ulysses_degree), t)
        positions = torch.cat([varlen_position_ids(cu, layout, rank, world_size, ulysses_degree=ulysses_degree)
                               for rank in range(world_size)])
        assert sorted(positions.tolist()) == sorted(list(range(2 * world_size)) + list(range(4 * world_size)))

"""The balanced layout (any document lengths, zigzag per document, chunks differing by at most one
token) on CPU over gloo: both families (``balanced_ring_flash_attn_varlen_*``, P2P ring;
``balanced_llama3_flash_attn_varlen_*``, all-gather) x func / kvpacked / qkvpacked x causal / full at
W = 1..5, over random packs with length-1 documents, primes, documents shorter than W and than 2W
(empty chunks), one longer than the rest and the end padding of ``pad_pack``: out, lse, dq, dk, dv
(and dsinks, lse gradients) against the float64 per-document reference; MHA and GQA, fp32 / bf16 /
fp16 / fp64, both CPU backends, windows, softcap, ALiBi, deterministic (bitwise), heads_k_stride.
Then dropout (replayed exactly), Ulysses x ring with ``ring_layout="balanced"`` / ``"balanced_llama3"``,
torch.compile (one graph, no recompilation when the documents change), bad input (a clear error on
every rank) and the layout helpers."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

import ring_flash_attn as rfa
from helpers.attention_cases import PACKINGS
from helpers.balanced_cases import BALANCED, random_pack
from helpers.compile_cases import check_compiled
from helpers.cases import Case, check
from helpers.dropout_cases import DropoutCase, check_dropout
from ring_flash_attn.layouts import (balanced_bounds, balanced_local_offsets, balanced_pieces, pad_pack, shard_varlen,
                                     unshard_varlen, varlen_position_ids, varlen_token_index)

DTYPES = ("fp32", "bf16", "fp16")
BACKENDS = ("torch_cpu_flash", "reference")
HEADS = ((4, 2), (6, 3), (4, 1), (4, 4))  # (nheads, nheads_k): GQA and MHA


def _stride(layout: str, nheads_k: int, n: int):
    """heads_k_stride of the all-gather family: None (all heads at once), 1, or a proper divisor."""
    if layout != "balanced_llama3" or nheads_k == 1:
        return None
    return (None, 1, nheads_k // 2 if nheads_k % 2 == 0 else None)[n % 3]


def _cases() -> list:
    cases = []
    for n, (w, layout, packing, causal) in enumerate(itertools.product((1, 2, 3, 4, 5), BALANCED, PACKINGS,
                                                                       (True, False))):
        heads = (4, 4) if packing == "qkvpacked" else HEADS[n % 4]
        cases.append(Case(
            layout=layout, packing=packing, causal=causal, dtype=DTYPES[n % 3], backend=BACKENDS[(n // 3) % 2],
            world_size=w, documents=random_pack(w, random.Random(n), empty_document=n % 7 == 3),
            nheads=heads[0], nheads_k=heads[1], head_dim=(16, 32)[n % 2], heads_k_stride=_stride(layout, heads[1], n),
            return_lse=n % 4 != 3, lse_grad=n % 5 == 1 and n % 4 != 3, sinks=n % 6 == 2, seed=n))
    return cases


def _option_cases() -> list:
    """Windows, soft-capping with ALiBi, deterministic runs, lse gradients with sinks, float64."""
    cases = []
    windows = ((3, 0), (5, 2), (1, 7), (-1, 4), (40, 0))
    for n, (w, layout, causal) in enumerate(itertools.product((2, 3, 5), BALANCED, (True, False))):
        window = windows[n % len(windows)]
        if not causal and window == (3, 0):
            window = (2, 3)
        cases.append(Case(
            layout=layout, packing=PACKINGS[n % 2], causal=causal, dtype=("fp32", "bf16")[n % 2], backend="auto",
            world_size=w, documents=random_pack(w, random.Random(100 + n)), nheads_k=2, window=window,
            heads_k_stride=1 if layout == "balanced_llama3" else None, seed=100 + n))
    for n, (w, layout, causal) in enumerate(itertools.product((2, 4), BALANCED, (True, False))):
        cases.append(Case(layout=layout, packing="func", causal=causal, dtype="fp64", backend="reference",
                          world_size=w, documents=random_pack(w, random.Random(200 + n)), nheads_k=2,
                          window=(4, 3 * causal + 1), lse_grad=True, sinks=n % 2 == 0, seed=200 + n))
    for n, (w, layout, causal) in enumerate(itertools.product((2, 3), BALANCED, (True, False))):
        cases.append(Case(
            layout=layout, packing=PACKINGS[n % 3], causal=causal, dtype="fp32", backend="reference", world_size=w,
            documents=random_pack(w, random.Random(300 + n)), softcap=4.0, q_scale=4.0, alibi=True,
            nheads=4, nheads_k=4 if n % 3 == 2 else 2, seed=300 + n))
    for w, layout in itertools.product((3, 5), BALANCED):
        cases.append(Case(layout=layout, packing="kvpacked", causal=True, dtype="fp64", backend="auto",
                          world_size=w, documents=random_pack(w, random.Random(w)), nheads=6, nheads_k=2,
                          lse_grad=True, sinks=True, seed=400 + w))
    return cases


def _id(case) -> str:
    return (case.values[0] if hasattr(case, "values") else case).id()


CASES = _cases()
OPTION_CASES = _option_cases()


@pytest.mark.parametrize("case", CASES, ids=[c.id() for c in CASES])
def test_balanced_matches_float64_reference(dist_pool, case):
    check(case, dist_pool(case.world_size).run("helpers.cases:run_rank", case=case))


@pytest.mark.parametrize("case", OPTION_CASES, ids=[_id(c) for c in OPTION_CASES])
def test_balanced_options_match_float64_reference(dist_pool, case):
    check(case, dist_pool(case.world_size).run("helpers.cases:run_rank", case=case))


DETERMINISTIC = [
    Case(layout=layout, packing="func", causal=True, dtype=dtype, backend=backend, world_size=3,
         documents=random_pack(3, random.Random(500 + n)), nheads_k=2, deterministic=True, seed=500 + n)
    for n, (layout, dtype, backend) in enumerate(zip(BALANCED, ("bf16", "fp32"), BACKENDS))
]


@pytest.mark.parametrize("case", DETERMINISTIC, ids=[c.id() for c in DETERMINISTIC])
def test_deterministic_is_bitwise_reproducible(dist_pool, case):
    per_rank = dist_pool(case.world_size).run("helpers.cases:run_twice", case=case)
    check(case, per_rank)
    for r in per_rank:
        for name in ("out", "lse", "dq", "dk", "dv"):
            assert torch.equal(r[name], r[f"{name}_again"]), f"{name} differs between two identical calls"


DROPOUT = [  # (layout, causal, W, Ulysses degree, documents, window); the mean over 60 seeds
    DropoutCase(layout=layout, causal=causal, world_size=w, ulysses_degree=u, doc_lengths=docs, window=window,
                mean_samples=60, seed=60 + n)
    for n, (layout, causal, w, u, docs, window) in enumerate((
        ("balanced", True, 3, 0, (1, 7, 2, 11, 3), (-1, -1)),
        ("balanced", False, 2, 0, (5, 1, 3, 1), (3, 2)),
        ("balanced_llama3", True, 2, 0, (3, 13, 1, 1), (-1, -1)),
        ("balanced_llama3", False, 3, 0, (2, 1, 9, 5, 1), (-1, -1)),
        ("balanced", True, 4, 2, (5, 2, 9), (-1, -1)),
        ("balanced_llama3", False, 2, 1, (3, 1, 6), (-1, -1)),
    ))
]


@pytest.mark.parametrize("case", DROPOUT, ids=[c.id() for c in DROPOUT])
def test_dropout_is_replayed_exactly(dist_pool, case):
    check_dropout(case, dist_pool(case.world_size).run("helpers.dropout_cases:run_rank", case=case))


def _ulysses_cases() -> list:
    cases = []
    for n, ((u, r), layout, causal) in enumerate(itertools.product(((2, 1), (1, 2), (2, 2)), BALANCED, (True, False))):
        w = u * r
        packing = PACKINGS[n % 3]
        heads = (4, 4) if packing == "qkvpacked" else ((4, 2), (4, 1), (8, 4))[n % 3]
        window = (5, 0 if causal else 3) if n % 3 == 1 else (-1, -1)
        cases.append(Case(
            layout=layout, packing=packing, causal=causal, dtype=DTYPES[(n + n // 3) % 3],
            backend="reference" if window != (-1, -1) or n % 5 == 3 else "torch_cpu_flash", world_size=w,
            documents=random_pack(w, random.Random(700 + n)), nheads=heads[0], nheads_k=heads[1],
            head_dim=16, window=window, lse_grad=n % 4 == 1, sinks=n % 4 == 2,
            alibi=n % 5 == 3, seed=700 + n, ulysses_degree=u, head_chunks=(2, 1)[n % 2]))
    return cases


ULYSSES_CASES = _ulysses_cases()


@pytest.mark.parametrize("case", ULYSSES_CASES, ids=[c.id() for c in ULYSSES_CASES])
def test_ulysses_ring_matches_float64_reference(dist_pool, case):
    check(case, dist_pool(case.world_size).run("helpers.cases:run_rank", case=case))


# documents of any lengths (totals multiples of 2), changing from batch to batch
COMPILE_DOCUMENTS = ((1, 6, 3), (7, 2, 1, 2), (13, 1), (2, 1, 1, 3, 5))


@pytest.mark.parametrize("world_size,packings", [(1, ("func", "qkvpacked")), (2, ("kvpacked",))])
def test_fullgraph_compile_without_recompiling(dist_pool, world_size, packings):
    """Both families (causal and full, a loss with and without lse; W = 1: func, qkvpacked; W = 2:
    kvpacked): one graph (``fullgraph=True``, dynamic shapes), forward and backward equal to eager,
    the same graph for every new set of documents."""
    results = dist_pool(world_size).run("helpers.compile_cases:compiled_packed_blocks", layouts=list(BALANCED),
                                        documents=COMPILE_DOCUMENTS, packings=packings, timeout=600)
    for rank_results in results:
        check_compiled(rank_results)


def test_ulysses_ring_fullgraph(dist_pool):
    """Ulysses x ring (one Ulysses rank per ring rank) with ``ring_layout="balanced"``: the same."""
    for results in dist_pool(2).run("helpers.compile_cases:compiled_ulysses", ulysses_degree=1, ring_layout="balanced",
                                    packed=True, documents=COMPILE_DOCUMENTS, packings=("func",), timeout=600):
        check_compiled(results)


@pytest.mark.parametrize("layout,ulysses", [("balanced", False), ("balanced_llama3", False), ("balanced", True),
                                            ("balanced_llama3", True)])
def test_bad_input_gets_a_clear_error_on_every_rank(dist_pool, layout, ulysses):
    for answers in dist_pool(3).run("helpers.balanced_cases:bad_input", layout=layout, ulysses=ulysses):
        wrong_tokens = "pass the global cu_seqlens"  # Ulysses of one rank per ring rank: the ring's own check
        assert wrong_tokens in answers["local cu_seqlens"], answers
        assert wrong_tokens in answers["whole pack on every rank"], answers
        assert "multiple of the world size 3" in answers["total not a multiple of W"], answers
        assert "pad_pack" in answers["total not a multiple of W"], answers
        assert "max_seqlen" in answers["max_seqlen too small"], answers
        assert "different attention calls" in answers["one rank one token short (check)"], answers
        assert "q.shape: [(6, 2, 8), (5, 2, 8), (6, 2, 8)]" in answers["one rank one token short (check)"], answers
        differ = answers["cu_seqlens differ across ranks (check)"]
        assert "different attention calls" in differ and "cu_seqlens: [(0, 1, 8, 17, 18), (0, 1, 17, 18)" in differ, \
            answers
        assert answers["group usable after"] == "yes", answers


def test_bad_input_on_one_process():
    x = torch.randn(10, 2, 8)
    cu = torch.tensor([0, 3, 10], dtype=torch.int32)
    for fn in (rfa.balanced_ring_flash_attn_varlen_func, rfa.balanced_llama3_flash_attn_varlen_func):
        with pytest.raises(ValueError, match="max_seqlen"):
            fn(x, x, x, cu, 6)
        with pytest.raises(ValueError, match="cu_seqlens"):
            fn(x[:9], x[:9], x[:9], cu, 7)
        with pytest.raises(ValueError, match="cu_seqlens"):
            fn(x, x, x, torch.tensor([0, 6, 3, 10], dtype=torch.int32), 7)


# ---- layout helpers --------------------------------------------------------------------------------

def _packs():
    rng = random.Random(7)
    packs = [(1,), (1, 1, 1), (5,), (2, 3, 5, 7, 11, 13), (0, 4, 0, 9)]
    packs += [tuple(rng.choice((1, 1, 2, 3, 7, 11, 40, 97)) for _ in range(rng.randint(1, 9))) for _ in range(12)]
    return packs


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 5, 8])
def test_chunks_tokens_and_round_trip(world_size):
    """Chunks of a document differ by at most one token and tile it; rank r holds chunks r and 2W-1-r
    of every document, in document order; every rank holds total / W tokens; shard / unshard round
    trip; position ids are the positions inside each document."""
    for lengths in _packs():
        cu, pad = pad_pack(torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32), world_size)
        offsets, total = tuple(cu.tolist()), int(cu[-1])
        bounds = balanced_bounds(offsets, world_size)
        assert len(bounds) == len(offsets) - 1
        for (start, stop), edges in zip(zip(offsets[:-1], offsets[1:]), bounds):
            sizes = [b - a for a, b in zip(edges[:-1], edges[1:])]
            assert edges[0] == start and edges[-1] == stop and len(sizes) == 2 * world_size
            assert min(sizes) >= 0 and max(sizes) - min(sizes) <= 1, (lengths, sizes)
        x = torch.randn(total, 3, 2)
        parts = [shard_varlen(x, cu, "balanced", r, world_size) for r in range(world_size)]
        assert {p.shape[0] for p in parts} == {total // world_size}
        assert torch.equal(unshard_varlen(parts, cu, "balanced"), x)
        in_document = torch.cat([torch.arange(b - a) for a, b in zip(offsets[:-1], offsets[1:])])
        for r in range(world_size):
            expected = torch.cat([torch.arange(edges[c], edges[c + 1]) for edges in bounds
                                  for c in (r, 2 * world_size - 1 - r)]).long()
            index = varlen_token_index(cu, "balanced", r, world_size)
            assert torch.equal(index, expected)
            assert torch.equal(varlen_token_index(cu, "balanced_llama3", r, world_size), expected)
            assert torch.equal(varlen_position_ids(cu, "balanced", r, world_size), in_document[expected])
            pieces = balanced_pieces(offsets, r, world_size)
            assert all(length > 0 for _, length in pieces)
            assert torch.equal(torch.cat([torch.arange(s, s + n) for s, n in pieces]) if pieces
                               else torch.zeros(0, dtype=torch.int64), expected)
            local = balanced_local_offsets(offsets, r, world_size)
            assert len(local) == len(offsets) and local[-1] == total // world_size


@pytest.mark.parametrize("ulysses_degree,world_size", [(2, 2), (2, 4), (1, 3), (3, 6)])
def test_helpers_with_ulysses_degree(ulysses_degree, world_size):
    """Rank r holds the (r % U)-th contiguous part of ring rank r // U's balanced shard (the ring
    layout with one ring rank); round trip and position ids."""
    ring = world_size // ulysses_degree
    for lengths in _packs():
        cu, _ = pad_pack(torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32), world_size)
        total = int(cu[-1])
        x = torch.arange(total)
        in_document = torch.cat([torch.arange(b - a) for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())])
        parts = [shard_varlen(x, cu, "balanced", r, world_size, ulysses_degree=ulysses_degree)
                 for r in range(world_size)]
        assert {p.shape[0] for p in parts} == {total // world_size}
        assert torch.equal(unshard_varlen(parts, cu, "balanced", ulysses_degree=ulysses_degree), x)
        for r, part in enumerate(parts):
            ring_part = shard_varlen(x, cu, "balanced" if ring > 1 else "ring", r // ulysses_degree, ring)
            piece = ring_part.shape[0] // ulysses_degree
            assert torch.equal(part, ring_part[(r % ulysses_degree) * piece:(r % ulysses_degree + 1) * piece])
            assert torch.equal(varlen_position_ids(cu, "balanced", r, world_size, ulysses_degree=ulysses_degree),
                               in_document[part])


def test_pad_pack():
    cu = torch.tensor([0, 3, 10], dtype=torch.int32)
    for world_size, pad in ((1, 0), (2, 0), (3, 2), (4, 2), (7, 4), (11, 1)):
        padded, got = pad_pack(cu, world_size)
        assert got == pad and got < world_size and int(padded[-1]) % world_size == 0
        assert padded.dtype == cu.dtype
        assert padded.tolist() == ([0, 3, 10] + ([10 + pad] if pad else []))  # its own document, at the end
    padded, pad = pad_pack(torch.tensor([0, 5, 12], dtype=torch.int64), 4)
    assert padded.tolist() == [0, 5, 12] and pad == 0 and padded.dtype == torch.int64
    assert pad_pack([0, 1, 4], 3)[0].tolist() == [0, 1, 4, 6]
    with pytest.raises(ValueError, match="pad_pack"):
        varlen_token_index(cu, "balanced", 0, 3)
    with pytest.raises(ValueError, match="world_size"):
        pad_pack(cu, 0)


def test_balanced_layout_balances_causal_work():
    """Equal tokens per rank and near-equal causal (query, key) pairs on a mix of odd lengths, where
    the whole-pack layouts are far off."""
    rng = random.Random(3)
    lengths = [rng.randint(1, 400) for _ in range(60)]
    for world_size in (2, 4, 8):
        cu, _ = pad_pack(torch.tensor([0, *itertools.accumulate(lengths)]), world_size)
        position = varlen_position_ids(cu, "balanced", 0, 1)
        work = [int((varlen_position_ids(cu, "balanced", r, world_size) + 1).sum()) for r in range(world_size)]
        assert sum(work) == int((position + 1).sum())
        assert max(work) / (sum(work) / world_size) <= 1.02, work

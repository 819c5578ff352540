"""Unit tests of the engines' pieces, beside the end-to-end tests: the ring's K/V rotation (every
block a job needs arrives, pruned hops are not sent, at most two receive buffers), the dK/dV folding
and its dtypes, the all-gather family's chunked K/V gather, and the own-keys-first split of the keys."""

from __future__ import annotations

import itertools

import pytest
import torch

from helpers.engine_cases import tagged
from ring_flash_attn.allgather.own_keys_first import own_keys_split
from ring_flash_attn.allgather.plan import document_meta
from ring_flash_attn.core.layouts import local_pieces, shard_positions
from ring_flash_attn.kernels import BACKENDS, BlockOptions
from ring_flash_attn.ring.engine import RingPlan, fold_dkv, query_rows
from ring_flash_attn.ring.schedules import ring_schedule

CPU = torch.device("cpu")


@pytest.mark.parametrize("world_size", [2, 3, 4])
@pytest.mark.parametrize("layout,causal", [("ring", True), ("ring", False), ("zigzag", True), ("stripe", True)])
def test_rotation_delivers_every_needed_block(dist_pool, world_size, layout, causal):
    for rank, got in enumerate(dist_pool(world_size).run("helpers.engine_cases:rotation_blocks", layout=layout,
                                                         causal=causal)):
        for step, k_owner, v_owner in got["held"]:
            assert k_owner == v_owner == (rank - step) % world_size, (rank, step, got)
        if layout == "ring" and causal:  # rank r needs the blocks of ranks r, r-1, ..., 0 only
            assert got["needed"] == list(range(rank + 1))
        assert got["buffers"][0] <= 2


@pytest.mark.parametrize("world_size", [1, 3])
@pytest.mark.parametrize("stride", [1, 2, 4])
def test_kv_gather_yields_every_ranks_heads_in_rank_order(dist_pool, world_size, stride):
    per_rank = dist_pool(world_size).run("helpers.engine_cases:gathered_chunks", stride=stride)
    for chunks in per_rank:
        assert [c["kv_heads"] for c in chunks] == [(h, h + stride) for h in range(0, 4, stride)]
        assert [c["q_heads"] for c in chunks] == [(2 * h, 2 * (h + stride)) for h in range(0, 4, stride)]
        for c in chunks:
            heads = slice(*c["kv_heads"])
            expect = torch.cat([tagged(r, 3, 4)[0][:, heads] for r in range(world_size)])
            assert torch.equal(c["k"], expect) and torch.equal(c["v"], -expect)


def _plan(world_size: int, layout: str = "ring", causal: bool = False, backend: str = "torch_cpu_flash") -> RingPlan:
    schedule = ring_schedule(layout, world_size, 8, causal)
    return RingPlan(rank=0, world_size=world_size, comm=None, schedule=schedule, backend=BACKENDS[backend],
                    options=BlockOptions(1.0), rows=query_rows(schedule, 0, world_size, 8))


def test_fold_dkv_keeps_the_single_kernel_output_of_the_own_block():
    """Own block, one job over all keys, kernel answers in the input dtype: its dK/dV are the
    accumulator as they are (no copy, no float32)."""
    k = torch.zeros(1, 8, 2, 4, dtype=torch.bfloat16)
    dk, dv = torch.randn(1, 8, 2, 4).bfloat16(), torch.randn(1, 8, 2, 4).bfloat16()
    acc = fold_dkv(_plan(2), 0, None, [(slice(0, 8), dk, dv)], k)
    assert acc[0] is dk and acc[1] is dv


def test_fold_dkv_sums_in_float32_except_two_terms_on_the_last_hop():
    """A block's dK/dV arrive in the input dtype after one contribution; added to on a middle hop they
    become float32 (a partial sum that travels on); on the last hop, with this rank's jobs on disjoint
    keys (two terms per key), they stay in the input dtype: float32 math, rounded once."""
    k = torch.zeros(1, 8, 2, 4, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    grad = lambda n: torch.randn(1, n, 2, 4, generator=g).bfloat16()  # noqa: E731
    incoming = [grad(8), grad(8)]
    halves = [(slice(0, 4), grad(4), grad(4)), (slice(4, 8), grad(4), grad(4))]
    middle = fold_dkv(_plan(3), 1, [t.clone() for t in incoming], halves, k)
    assert middle[0].dtype == torch.float32
    assert torch.equal(middle[0], incoming[0].float() + torch.cat([halves[0][1], halves[1][1]], 1).float())
    last = fold_dkv(_plan(3), 2, [t.clone() for t in incoming], halves, k)
    assert last[1].dtype == torch.bfloat16
    assert torch.equal(last[1], (incoming[1].float() + torch.cat([halves[0][2], halves[1][2]], 1).float()).bfloat16())
    overlapping = [(slice(0, 8), grad(8), grad(8)), (slice(2, 6), grad(4), grad(4))]  # three terms on keys 2..5
    assert fold_dkv(_plan(3), 2, [t.clone() for t in incoming], overlapping, k)[0].dtype == torch.float32


def _allowed(layout: str, offsets, rank: int, world_size: int, causal: bool) -> torch.Tensor:
    """(local queries, global keys): same document, and key <= query when causal."""
    positions = shard_positions(layout, offsets, world_size)[rank]
    doc = torch.bucketize(torch.arange(offsets[-1]), torch.tensor(offsets[1:]), right=True)
    allowed = doc[positions][:, None] == doc[None, :]
    if causal:
        allowed &= torch.arange(offsets[-1])[None, :] <= positions[:, None]
    return allowed


@pytest.mark.parametrize("layout,world_size,causal", list(itertools.product(
    ("llama3", "zigzag_llama3", "packed_zigzag"), (2, 3), (True, False))))
def test_own_keys_split_covers_each_allowed_key_once(layout, world_size, causal):
    """The local call (this rank's tokens against themselves) and the remote call (against keys other
    ranks hold) together see exactly the pairs the mask allows, none twice."""
    unit = 2 * world_size
    for offsets in [(0, 6 * unit), (0, 2 * unit, 3 * unit, 6 * unit), (0, unit, 2 * unit, 3 * unit, 4 * unit)]:
        for rank in range(world_size):
            pieces = local_pieces(layout, offsets, rank, world_size)
            meta, _, starts = document_meta(offsets, pieces, causal, CPU)
            key_ranges = tuple((ks, ks + lk) for (_, ks), (_, lk) in zip(starts, meta.lengths))
            local_meta, remote_meta, _, _, remote_positions = own_keys_split(
                layout, offsets, rank, world_size, meta.offsets_q, key_ranges, causal, CPU)
            positions = shard_positions(layout, offsets, world_size)[rank]
            seen = torch.zeros(len(positions), offsets[-1], dtype=torch.int64)
            seen.index_add_(1, positions, local_meta.dense_mask(CPU).long())
            if remote_positions.numel():  # a key can serve two pieces: a column each
                seen.index_add_(1, remote_positions, remote_meta.dense_mask(CPU).long())
            expect = _allowed(layout, offsets, rank, world_size, causal)
            assert seen.max() <= 1, (layout, offsets, rank)
            assert torch.equal(seen.bool(), expect), (layout, offsets, rank)

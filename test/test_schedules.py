"""The schedules cover the attention mask exactly: over all (rank, K/V source) pairs, the jobs'
bands mark every allowed (query, key) pair of the global sequence exactly once, and no job is
empty. Also: hops that are skipped are not needed by anyone downstream."""

from __future__ import annotations

import itertools

import pytest
import torch

from ring_flash_attn.core.mask import Band, trim_to_top_left_causal
from ring_flash_attn.layouts import LAYOUTS, position_ids, segments
from ring_flash_attn.ring.schedules import BlockJob, block_jobs, ring_schedule, segment_band


def covered(layout: str, world_size: int, local_len: int, causal: bool, window=(-1, -1)) -> torch.Tensor:
    """How many times each global (query, key) pair is computed by the schedule the ring runs."""
    seqlen = world_size * local_len
    count = torch.zeros(seqlen, seqlen, dtype=torch.int64)
    pos = [position_ids(layout, r, world_size, seqlen) for r in range(world_size)]
    schedule = ring_schedule(layout, world_size, local_len, causal, window)
    for rank, src in itertools.product(range(world_size), repeat=2):
        for job in schedule.jobs_for(rank, src):
            qpos, kpos = pos[rank][job.q], pos[src][job.kv]
            assert len(qpos) and len(kpos)
            allowed = job.band.allowed(len(qpos), len(kpos))
            assert allowed.any(), f"empty job {job}"
            count[qpos[:, None], kpos[None, :]] += allowed.long()
    return count


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("local_len", [2, 6, 8])
def test_jobs_cover_mask_exactly_once(layout, world_size, causal, local_len):
    seqlen = world_size * local_len
    expected = torch.ones(seqlen, seqlen, dtype=torch.int64)
    if causal:
        expected = expected.tril()
    assert torch.equal(covered(layout, world_size, local_len, causal), expected)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("window", [(0, 0), (3, -1), (-1, 2), (5, 1), (7, 7), (30, 30)])
def test_windowed_jobs_cover_mask_exactly_once(layout, world_size, causal, window):
    from helpers.attention_cases import mask

    local_len = 6
    expected = mask(world_size * local_len, causal, window).long()
    assert torch.equal(covered(layout, world_size, local_len, causal, window), expected)


def test_small_window_sends_only_the_hops_it_needs():
    # contiguous chunks of 8 and a window of 3: each rank needs its own block and its left neighbour's
    sched = ring_schedule("ring", 6, 8, True, (3, -1))
    for rank in range(6):
        assert [bool(sched.jobs_for(rank, (rank - s) % 6)) for s in range(6)] == [True, rank > 0] + [False] * 4
        assert all(not sched.forwards_kv(rank, step) for step in range(1, 5))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_positions_increase_within_a_rank(layout):
    # the single-call diagonal job relies on it
    for w, r in [(4, 0), (4, 3), (3, 1)]:
        pos = position_ids(layout, r, w, w * 8)
        assert bool((pos[1:] > pos[:-1]).all())


def test_few_kernel_calls():
    # zigzag: one call per hop, as in the hand-written schedule of ring-flash-attn
    for rank, src in itertools.product(range(4), repeat=2):
        assert len(block_jobs("zigzag", rank, src, 4, 8, True)) == 1
        assert len(block_jobs("zigzag", rank, src, 4, 8, False)) == 1
    # stripe: strictly-causal band below the diagonal when the source is later in the stripe,
    # run as an aligned causal block without the first query row and the last key
    assert block_jobs("stripe", 0, 1, 2, 4, True)[0].band == Band(None, -1)
    assert ring_schedule("stripe", 2, 4, True).jobs_for(0, 1) == (BlockJob(slice(1, 4), slice(0, 3), Band(None, 0)),)
    # ring: nothing to do for later blocks
    assert block_jobs("ring", 0, 1, 2, 4, True) == ()


def test_skipped_hops_are_not_needed_downstream():
    for layout, w in itertools.product(LAYOUTS, [2, 3, 4, 6]):
        sched = ring_schedule(layout, w, 4, True)
        for sender, step in itertools.product(range(w), range(w - 1)):
            origin = (sender - step) % w
            needed = any(sched.jobs_for((sender + u) % w, origin) for u in range(1, w - step))
            assert sched.forwards_kv(sender, step) == needed
    # causal ring: the hop that wraps around from the last rank to rank 0 is never sent
    sched = ring_schedule("ring", 4, 4, True)
    assert not sched.forwards_kv(3, 0)
    assert sched.forwards_kv(0, 0)


def test_segment_band_strided():
    w = 4
    q, k = segments("stripe", 1, w, 5)[0], segments("stripe", 2, w, 5)[0]
    assert segment_band(q, k, None, 0) == Band(None, -1)
    assert segment_band(k, q, None, 0) == Band(None, 0)


def test_band_normalized_and_trim():
    assert Band(None, 5).normalized(4, 4) == Band()
    assert Band(None, -4).normalized(4, 4) is None
    assert Band(-10, 1).normalized(4, 4) == Band(None, 1)
    assert Band(2, 1).normalized(4, 4) is None
    trim = trim_to_top_left_causal(Band(None, -1), 4, 4)
    assert (trim.first_row, trim.key_end, trim.causal) == (1, 3, True)
    assert trim_to_top_left_causal(Band(None, 1), 4, 4) is None
    assert trim_to_top_left_causal(Band(-1, None), 4, 4) is None


def test_windowed_varlen_schedule_skips_hops_beyond_the_window():
    """Packed documents with a causal window shorter than a rank's share of each document: only the
    previous rank's K/V is needed, so the ring stops after one hop."""
    import torch

    from ring_flash_attn.ring.packed import varlen_ring_schedule

    schedule = varlen_ring_schedule("ring", (0, 8, 24), 4, True, torch.device("cpu"), (3, 0))
    assert all(schedule.forwards_kv(rank, 0) for rank in range(3))
    assert not any(schedule.forwards_kv(rank, step) for rank in range(4) for step in (1, 2))
    assert all(not schedule.jobs_for(rank, src) for rank in range(4) for src in range(4)
               if (rank - src) % 4 not in (0, 1) or src > rank)
    assert any(band.lo is not None for band in schedule.bands())  # kernels without windows are not chosen

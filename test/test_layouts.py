"""Layout helpers: shard/unshard round trip, position ids, divisibility errors."""

from __future__ import annotations

import pytest
import torch

from ring_flash_attn import position_ids, shard, unshard
from ring_flash_attn.layouts import LAYOUTS


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("dim", [0, 1, 2])
def test_round_trip(layout, world_size, dim):
    shape = [3, 5, 7]
    shape[dim] = 2 * world_size * 3
    x = torch.randn(*shape)
    shards = [shard(x, layout, r, world_size, dim=dim) for r in range(world_size)]
    assert all(s.is_contiguous() and s.shape[dim] == shape[dim] // world_size for s in shards)
    assert torch.equal(unshard(shards, layout, dim=dim), x)


def test_positions():
    assert position_ids("ring", 1, 4, 16).tolist() == [4, 5, 6, 7]
    assert position_ids("zigzag", 1, 4, 16).tolist() == [2, 3, 12, 13]
    assert position_ids("stripe", 1, 4, 16).tolist() == [1, 5, 9, 13]
    x = torch.arange(16)[None]
    for layout in LAYOUTS:
        assert torch.equal(shard(x, layout, 2, 4)[0], position_ids(layout, 2, 4, 16))


@pytest.mark.parametrize("layout,world_size,seqlen", [("ring", 4, 10), ("zigzag", 4, 12), ("stripe", 3, 10), ("ring", 2, 0)])
def test_not_divisible(layout, world_size, seqlen):
    with pytest.raises(ValueError, match="multiple of"):
        shard(torch.zeros(1, seqlen), layout, 0, world_size)


def test_bad_layout_and_ragged_shards():
    with pytest.raises(ValueError, match="unknown layout"):
        position_ids("spiral", 0, 2, 8)
    with pytest.raises(ValueError, match="differ in length"):
        unshard([torch.zeros(1, 4), torch.zeros(1, 3)], "ring")


def test_row_repeats_scatter_is_index_add():
    from ring_flash_attn.allgather.plan import RowRepeats

    rows = torch.tensor([5, 0, 1, 2, 0, 1, 7, 2, 2])
    values = torch.randn(len(rows), 3, dtype=torch.float64)
    expected = torch.zeros(9, 3, dtype=torch.float64).index_add_(0, rows, values)
    got = torch.zeros(9, 3, dtype=torch.float64)
    RowRepeats.of(rows).scatter_into(got, values)
    assert torch.allclose(got, expected, rtol=0, atol=1e-12)
    strided = torch.zeros(9, 2, 3, dtype=torch.float64)  # a view, as gather_backward passes it
    RowRepeats.of(rows).scatter_into(strided[:, 1], values)
    assert torch.allclose(strided[:, 1], expected) and not strided[:, 0].any()


@pytest.mark.parametrize("layout", ["llama3", "zigzag_llama3", "packed_zigzag"])
@pytest.mark.parametrize("causal", [True, False])
def test_two_ranks_need_each_remote_key_once(layout, causal):
    """OwnKeysFirst sends dK/dV in the input dtype at W = 2: it relies on no remote key being used
    twice by one rank (pieces of a document with the same remote keys are one call document)."""
    from ring_flash_attn.allgather.own_keys_first import own_keys_split
    from ring_flash_attn.allgather.plan import document_meta
    from ring_flash_attn.core.layouts import local_pieces

    for offsets in [(0, 24, 40, 48), (0, 8, 16, 24, 32, 40, 48), (0, 48)]:
        for rank in range(2):
            meta, _, starts = document_meta(offsets, local_pieces(layout, offsets, rank, 2), causal, torch.device("cpu"))
            key_ranges = tuple((ks, ks + lk) for (_, ks), (_, lk) in zip(starts, meta.lengths))
            _, remote_meta, rows, repeats, _ = own_keys_split(layout, offsets, rank, 2, tuple(meta.offsets_q),
                                                              key_ranges, causal, torch.device("cpu"))
            assert repeats is None or repeats.repeat_rows.numel() == 0, (offsets, rank)


def test_every_layout_helper_refuses_a_rank_outside_the_world():
    """rank >= world_size or < 0 (and a world size below 1) is refused with a clear error, never served
    another rank's tokens or an index error from deep inside."""
    from ring_flash_attn.core.layouts import local_pieces
    from ring_flash_attn.layouts import position_ids, shard, shard_varlen, varlen_position_ids, varlen_token_index

    x = torch.arange(16.0)[None, :, None]
    cu = torch.tensor([0, 5, 16])
    calls = [
        lambda r, w: shard(x, "zigzag", r, w),
        lambda r, w: shard(x, "ring", r, w, ulysses_degree=1),
        lambda r, w: position_ids("zigzag", r, w, 16),
        lambda r, w: position_ids("stripe", r, w, 16, ulysses_degree=2) if w % 2 == 0 else position_ids("stripe", r, w, 16),
        lambda r, w: shard_varlen(x[0], cu, "balanced", r, w),
        lambda r, w: shard_varlen(x[0], cu, "llama3", r, w),
        lambda r, w: varlen_token_index(cu, "zigzag_llama3", r, w),
        lambda r, w: varlen_position_ids(cu, "balanced", r, w),
        lambda r, w: local_pieces("balanced_llama3", (0, 5, 16), r, w),
    ]
    for call in calls:
        for rank, world in ((2, 2), (-1, 2), (0, 0), (4, 2)):
            with pytest.raises(ValueError, match="rank must be in"):
                call(rank, world)
    with pytest.raises(TypeError, match="rank must be an int"):
        shard(x, "zigzag", 0.0, 2)
    assert shard(x, "zigzag", 1, 2).shape == (1, 8, 1)  # in range: unchanged


def test_ulysses_packs_are_documented_with_ulysses_degree():
    """A Ulysses pack is sharded with shard_varlen(..., ulysses_degree=U); shard_varlen(x, cu, "ring", r, W)
    splits every document instead (the same token count, so no function can tell). The functions' help
    and docs/usage.md show the right call and name the wrong one; and the right call is the contiguous
    r-th 1/W of the pack for pure Ulysses (U = W)."""
    import pathlib

    import ring_flash_attn as rfa
    from ring_flash_attn.layouts import shard_varlen

    help_text = rfa.ulysses_flash_attn_varlen_func.__doc__
    assert "ulysses_degree=U" in help_text and "splits every document instead" in help_text
    usage = (pathlib.Path(__file__).parents[1] / "docs" / "usage.md").read_text()
    assert "shard_varlen(x, cu_seqlens, ring_layout, rank, W, ulysses_degree=U)" in usage
    assert "splits *every document* over the" in usage
    x, cu = torch.arange(12), torch.tensor([0, 4, 12])
    for layout in ("ring", "zigzag", "balanced"):
        assert shard_varlen(x, cu, layout, 1, 3, ulysses_degree=3).tolist() == [4, 5, 6, 7]
    assert shard_varlen(x, cu, "ring", 1, 2).tolist() != shard_varlen(x, cu, "ring", 1, 2, ulysses_degree=2).tolist()

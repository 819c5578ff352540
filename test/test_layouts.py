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

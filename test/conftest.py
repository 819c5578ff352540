"""Shared fixtures: one pool of worker processes per (world size, gloo/nccl), started on first use and
kept for the whole session (restarted if a case killed it)."""

from __future__ import annotations

import pytest

from helpers.dist_pool import DistPool

_POOLS: dict = {}


@pytest.fixture(scope="session")
def dist_pool():
    def get(world_size: int, backend: str = "gloo") -> DistPool:
        pool = _POOLS.get((world_size, backend))
        if pool is None or not pool.alive:
            pool = _POOLS[(world_size, backend)] = DistPool(world_size, backend)
        return pool

    yield get
    for pool in _POOLS.values():
        pool.close()

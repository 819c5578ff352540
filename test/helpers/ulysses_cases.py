"""Worker-side checks of test_ulysses.py that are not attention cases (those are
:class:`helpers.cases.Case` with ``ulysses_degree``)."""

from __future__ import annotations

from typing import Dict

import torch

import ring_flash_attn as rfa
from helpers.cases import groups


def bad_input(rank: int, world_size: int) -> Dict[str, bool]:
    """Inputs every rank gets wrong the same way, each answered by a clear error before any
    communication (so nothing hangs): whether each raised the expected message."""
    two_by_two = groups(2, world_size)
    q, kv = torch.randn(1, 4, 6, 16), torch.randn(1, 4, 2, 16)
    cu = torch.tensor([0, 6, 16], dtype=torch.int32)  # documents of 6 and 10 tokens, 4 per rank
    x = torch.randn(4, 4, 16)
    attempts = {
        "heads not divisible by the Ulysses degree": (lambda: rfa.ulysses_flash_attn_func(q, kv, kv, group=None),
                                                      "multiple of the Ulysses degree"),
        "zigzag ring shard of odd length": (lambda: rfa.ulysses_flash_attn_func(
            x[None, :3], x[None, :3], x[None, :3], group=groups(1, world_size), ring_layout="zigzag"),
            "multiple of 2"),
        "document not split over the ring": (lambda: rfa.ulysses_flash_attn_varlen_func(
            x, x, x, cu, 10, group=two_by_two, ring_layout="zigzag"), "multiple of 4"),
        "pack total not W x local tokens": (lambda: rfa.ulysses_flash_attn_varlen_func(
            x[:3], x[:3], x[:3], cu, 10, group=two_by_two), "ends at 16"),
    }
    answers = {}
    for name, (call, message) in attempts.items():
        try:
            call()
            answers[name] = False
        except (ValueError, TypeError) as err:
            answers[name] = message in str(err)
    return answers

"""``benchmark/balance.py``: its per-rank pair counts against a dense-mask count over the library's own
token assignment, the balanced layout's balance on the built-in mixes, and the command line."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from typing import List

import pytest
import torch

from ring_flash_attn.layouts import pad_cu_seqlens, pad_pack, varlen_token_index

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "benchmark", "balance.py")
_spec = importlib.util.spec_from_file_location("balance_tool", TOOL)
balance = sys.modules["balance_tool"] = importlib.util.module_from_spec(_spec)  # dataclasses look it up
_spec.loader.exec_module(balance)

SMALL_PACK = [5, 1, 12, 7, 3, 9, 2]  # 39 tokens: end padding at W = 2 and 3, document padding too
WINDOW = 3


def padded_offsets(lengths: List[int], layout: str, world_size: int) -> torch.Tensor:
    """The library's padding for ``layout``: documents padded by ``pad_cu_seqlens``, the pack by ``pad_pack``."""
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    document_multiple = {"zigzag": 2 * world_size, "ring": world_size, "stripe": world_size}
    if layout in document_multiple:
        return pad_cu_seqlens(cu, document_multiple[layout])[0]
    return pad_pack(cu, 2 * world_size if layout == "packed_zigzag" else world_size)[0]


def dense_pairs(offsets: torch.Tensor, mode: str, window: int) -> torch.Tensor:
    """Keys attended by every token of the pack, from a dense (query, key) mask."""
    lengths = (offsets[1:] - offsets[:-1]).long()
    document = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
    index = torch.arange(int(offsets[-1]))
    mask = document[:, None] == document[None, :]
    if mode != "full":
        distance = index[:, None] - index[None, :]
        mask &= distance >= 0
        if mode == "window":
            mask &= distance <= window
    return mask.sum(1)


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("layout", balance.PACKED_LAYOUTS)
def test_pairs_match_dense_mask(layout: str, world_size: int):
    counted = balance.count_layout(SMALL_PACK, layout, world_size, balance.MODES, WINDOW)
    offsets = padded_offsets(SMALL_PACK, layout, world_size)
    added = int(offsets[-1]) - sum(SMALL_PACK)
    assert counted.pad_inside + counted.pad_end == added
    for mode in balance.MODES:
        per_token = dense_pairs(offsets, mode, WINDOW)
        expected = [int(per_token[varlen_token_index(offsets, layout, rank, world_size)].sum())
                    for rank in range(world_size)]
        assert counted.pairs[mode].tolist() == expected, (layout, world_size, mode)
    tokens = [varlen_token_index(offsets, layout, rank, world_size).numel() for rank in range(world_size)]
    assert counted.tokens.tolist() == tokens


def test_mix_lengths_fill_the_pack_reproducibly():
    for mix in balance.MIXES:
        lengths = balance.mix_lengths(mix, 4, 1000, seed=3)
        assert sum(lengths) == 4000 and min(lengths) >= 1
        assert lengths == balance.mix_lengths(mix, 4, 1000, seed=3)
    assert max(balance.mix_lengths(balance.MIX_BY_NAME["tiny"], 8, 1000, seed=0)) < 16


@pytest.mark.parametrize("world_size", [2, 8, 64])
@pytest.mark.parametrize("mix", balance.MIXES, ids=lambda mix: mix.name)
def test_balanced_layout_is_balanced_on_builtin_mixes(mix, world_size: int):
    lengths = balance.mix_lengths(mix, world_size, 8192, seed=0)
    counted = balance.count_layout(lengths, "balanced", world_size, ("causal", "full"))
    assert counted.pad_inside == 0 and counted.pad_end == 0
    assert counted.equal_tokens()
    for mode in ("causal", "full"):
        assert counted.balance(mode) <= 1.02, (mix.name, world_size, mode, counted.balance(mode))


def test_command_line_with_lengths_and_markdown():
    result = subprocess.run(
        [sys.executable, TOOL, "--lengths", "300", "5000", "17", "--world-sizes", "2", "4", "--window", "64",
         "--markdown"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": ROOT},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("balance: attended (query, key) pairs")
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| W | layout | causal balance")
    assert len(rows) == 2 + 2 * len(balance.PACKED_LAYOUTS)
    assert "| 4 | balanced | 1.000 | 1.00 |" in result.stdout

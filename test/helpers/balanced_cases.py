"""The balanced layout's test helpers (test_balanced.py): random packs of the shapes the layout must
handle, and bad input run on every rank of a pool."""

from __future__ import annotations

import os
import random
from typing import Dict, Tuple

import torch
import torch.distributed as dist

import ring_flash_attn as rfa
from helpers.attention_cases import public_function
from helpers.cases import fit_documents, groups
from ring_flash_attn.layouts import balanced_local_offsets, shard_varlen

PRIMES = (2, 3, 5, 7, 11, 13, 17, 19, 23)
BALANCED = ("balanced", "balanced_llama3")


def random_pack(world_size: int, rng: random.Random, empty_document: bool = False) -> Tuple[int, ...]:
    """Document lengths, shuffled: a length-1 document, two primes, one shorter than W (W > 1), one
    shorter than 2W (some of its chunks empty), a few small ones, and one longer than all the others;
    then the end padding of ``pad_pack`` (a document of < W tokens). ``empty_document``: a 0-length one
    too."""
    w = world_size
    docs = [1, rng.choice(PRIMES), rng.choice(PRIMES), rng.randint(1, 2 * w - 1)]
    if w > 1:
        docs.append(rng.randint(1, w - 1))
    docs += [rng.randint(1, 9) for _ in range(rng.randint(0, 2))]
    docs.append(max(docs) + rng.randint(3, 3 + 4 * w))
    if empty_document:
        docs.append(0)
    rng.shuffle(docs)
    return fit_documents("balanced", w, tuple(docs))


# ---- bad input --------------------------------------------------------------------------------------

def _attempt(call, env: Dict[str, str] = None) -> str:
    """The error text of ``call()`` (``"no error"`` if none) with ``env`` set meanwhile."""
    env = env or {}
    os.environ.update(env)
    try:
        call()
        return "no error"
    except (ValueError, TypeError, RuntimeError) as err:
        return f"{type(err).__name__}: {err}"
    finally:
        for name in env:
            del os.environ[name]


def _call(layout: str, q, cu, max_seqlen, group, ulysses: bool = False, **kw):
    if ulysses:
        return rfa.ulysses_flash_attn_varlen_func(q, q, q, cu, max_seqlen, causal=True, ring_layout=layout,
                                                  group=groups(1, dist.get_world_size()), **kw)
    return public_function(layout, varlen=True)(q, q, q, cu, max_seqlen, causal=True, group=group, **kw)


def bad_input(rank: int, world_size: int, layout: str, ulysses: bool = False) -> Dict[str, str]:
    """Calls that must fail on every rank with a clear error, and a correct call after them (is the
    group still usable?). ``ulysses``: the same through ``ulysses_flash_attn_varlen_func`` with one
    Ulysses rank per ring rank (``ring_layout=layout``)."""
    group = dist.group.WORLD
    lengths = (1, 7, 2 * world_size + 3, 1)
    lengths = lengths + ((-sum(lengths)) % world_size,) * bool(sum(lengths) % world_size)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    total, longest = int(cu[-1]), max(lengths)
    x = torch.randn(total, 2, 8, generator=torch.Generator().manual_seed(0))
    mine = shard_varlen(x, cu, layout, rank, world_size)
    local_cu = torch.tensor(balanced_local_offsets(tuple(cu.tolist()), rank, world_size), dtype=torch.int32)
    check = {"RING_FLASH_ATTN_CHECK": "1"}
    run = lambda *a, **k: _call(layout, *a, group=group, ulysses=ulysses, **k)  # noqa: E731
    answers = {
        # every rank wrong the same way: an error before any communication
        "local cu_seqlens": _attempt(lambda: run(mine, local_cu, int((local_cu[1:] - local_cu[:-1]).max()))),
        "whole pack on every rank": _attempt(lambda: run(x, cu, longest)),
        "total not a multiple of W": _attempt(lambda: run(mine[:-1], torch.cat([cu[:-1], cu[-1:] - 1]), longest)),
        "max_seqlen too small": _attempt(lambda: run(mine, cu, longest - 1)),
        # ranks that disagree: caught on every rank by the cross-rank check
        "one rank one token short (check)": _attempt(lambda: run(mine[:-1] if rank == 1 else mine, cu, longest),
                                                      check),
    }
    # the same total and tokens per rank, the documents cut differently on rank 1
    other = torch.tensor([0, 1, total - 1, total], dtype=torch.int32) if rank == 1 else cu
    answers["cu_seqlens differ across ranks (check)"] = _attempt(
        lambda: run(mine, other, max(longest, total - 2)), check)
    out = run(mine, cu, longest)
    full = torch.cat([torch.nn.functional.scaled_dot_product_attention(*(x[a:b].transpose(0, 1),) * 3, is_causal=True)
                      .transpose(0, 1) for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())])
    error = (out - shard_varlen(full, cu, layout, rank, world_size)).abs().max().item()
    answers["group usable after"] = "yes" if error < 1e-5 else f"no (error {error:.3g})"
    return answers

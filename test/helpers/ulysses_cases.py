"""Ulysses and Ulysses x ring test cases: a batch :class:`Case` or a packed :class:`VarlenCase` (its
layout the ring layout, its world size ``W = U x R``) run through the ``ulysses_*`` functions with
``ulysses_degree = U``, every rank's shards put back together and compared with the same float64
reference as the ring families."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Dict, List, Optional, Union

import torch

import ring_flash_attn as rfa
from helpers import attention_cases, varlen_cases
from helpers.attention_cases import Case, alibi_slopes, as_view, compare, put_together, results_on_cpu
from helpers.varlen_cases import VarlenCase
from ring_flash_attn.layouts import shard_varlen, unshard_varlen

_GROUPS: Dict[tuple, rfa.UlyssesRingGroups] = {}  # per worker process: groups are made once per (U, R)


@dataclass(frozen=True)
class UlyssesCase:
    base: Union[Case, VarlenCase]
    ulysses_degree: int
    head_chunks: int = 2

    @property
    def packed(self) -> bool:
        return isinstance(self.base, VarlenCase)

    @property
    def ring_degree(self) -> int:
        return self.base.world_size // self.ulysses_degree

    def id(self) -> str:
        return f"U{self.ulysses_degree}xR{self.ring_degree}-chunks{self.head_chunks}-{self.base.id()}"


def packed_lengths(layout: str, ulysses_degree: int, ring_degree: int, rng: random.Random, single: bool) -> tuple:
    """Random document lengths a packed Ulysses x ring call accepts: per-document ring layouts split
    every document over the ring ranks, whole-pack layouts any lengths (length-1 documents too); the
    pack's total a multiple of the world size (twice that for packed_zigzag)."""
    world_size = ulysses_degree * ring_degree
    if layout in ("ring", "zigzag", "stripe", "zigzag_llama3"):
        unit = ring_degree * (2 if "zigzag" in layout else 1)
        counts = [rng.randint(2, 6)] if single else [rng.choice([1, 1, 2, 3, 5]) for _ in range(rng.randint(2, 5))]
        lengths = [unit * c for c in counts]
    else:
        unit = 1
        lengths = [rng.randint(3, 8)] if single else [rng.choice([1, 1, 2, 3, 7, 11]) for _ in range(rng.randint(2, 7))]
    total_unit = world_size * (2 if layout == "packed_zigzag" else 1)
    while sum(lengths) % total_unit:
        lengths[-1] += unit
    return tuple(lengths)


def groups(ulysses_degree: int, world_size: int) -> rfa.UlyssesRingGroups:
    key = (ulysses_degree, world_size // ulysses_degree)
    if key not in _GROUPS:
        _GROUPS[key] = rfa.make_ulysses_ring_groups(*key)
    return _GROUPS[key]


def _function(packing: str, packed: bool):
    suffix = "func" if packing == "func" else f"{packing}_func"
    return getattr(rfa, f"ulysses_flash_attn_{'varlen_' if packed else ''}{suffix}")


def _shard(case: UlyssesCase, name: str, x: torch.Tensor, rank: int) -> torch.Tensor:
    base, u = case.base, case.ulysses_degree
    if name == "sinks":
        return x
    if case.packed:
        return shard_varlen(x, base.cu_seqlens, base.layout, rank, base.world_size, dim=1 if name == "dlse" else 0,
                            ulysses_degree=u)
    return rfa.shard(x, base.layout, rank, base.world_size, dim=2 if name == "dlse" else 1, ulysses_degree=u)


def run_rank(rank: int, world_size: int, case: UlyssesCase, deterministic_twice: bool = False,
             group: Optional[rfa.UlyssesRingGroups] = None) -> Dict[str, torch.Tensor]:
    """This rank's out, lse and input gradients (``deterministic_twice``: the call made twice, both results;
    ``group``: the groups to run over, default ``make_ulysses_ring_groups`` of the whole world)."""
    base = case.base
    assert world_size == base.world_size
    device = torch.device("cuda", rank) if base.device == "cuda" else torch.device("cpu")
    inputs = (varlen_cases if case.packed else attention_cases).global_inputs(base)
    x = {name: _shard(case, name, t, rank).to(device) for name, t in inputs.items()}
    pack_dim = 1 if case.packed else 2
    kwargs = dict(causal=base.causal, window_size=base.window, softcap=base.softcap, return_attn_probs=base.return_lse,
                  group=group or groups(case.ulysses_degree, world_size), backend=base.backend, ring_layout=base.layout,
                  head_chunks=case.head_chunks, deterministic=getattr(base, "deterministic", False))
    if base.alibi:
        kwargs["alibi_slopes"] = alibi_slopes(base.nheads, None if case.packed else base.batch).to(device)
    fn = _function(base.packing, case.packed)
    extra = (base.cu_seqlens.to(device), max(base.doc_lengths)) if case.packed else ()

    def call() -> Dict[str, torch.Tensor]:
        q, k, v = (x[n].detach().requires_grad_() for n in "qkv")
        sinks = x["sinks"].detach().requires_grad_() if base.sinks else None
        if sinks is not None:
            kwargs["sinks"] = sinks
        if base.packing == "func":
            leaves, result = (q, k, v), fn(*as_view(base, q, k, v), *extra, **kwargs)
        elif base.packing == "kvpacked":
            kv = torch.stack([k, v], dim=pack_dim).detach().requires_grad_()
            leaves, result = (q, kv), fn(q, kv, *extra, **kwargs)
        else:
            qkv = torch.stack([q, k, v], dim=pack_dim).detach().requires_grad_()
            leaves, result = (qkv,), fn(qkv, *extra, **kwargs)
        out, lse = (result[0], result[1]) if base.return_lse else (result, None)
        assert out.shape == q.shape and out.dtype == q.dtype
        return results_on_cpu(out, lse, leaves, x["dout"], base.packing, pack_dim=pack_dim, dlse=x.get("dlse"),
                              sinks=sinks)

    first = call()
    if deterministic_twice:
        first.update({f"{name}_again": t for name, t in call().items()})
    return first


def check(case: UlyssesCase, per_rank: List[Dict[str, torch.Tensor]]) -> Dict[str, float]:
    """Every rank's shards, put together, against the float64 reference on the whole sequence."""
    base, u = case.base, case.ulysses_degree
    if case.packed:
        got = put_together(per_rank, lambda n, parts: unshard_varlen(parts, base.cu_seqlens, base.layout,
                                                                     dim=1 if n == "lse" else 0, ulysses_degree=u))
        ref = varlen_cases.reference(base)
    else:
        got = put_together(per_rank, lambda n, parts: rfa.unshard(parts, base.layout, dim=2 if n == "lse" else 1,
                                                                  ulysses_degree=u))
        ref = attention_cases.reference(base)
    return compare(case.id(), got, ref, base.dtype, base.q_scale)


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

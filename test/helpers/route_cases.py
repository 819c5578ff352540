"""Multi-rank cases of test_plans_and_routes.py: the plain eager route, the custom ops and
torch.compile on calls with sinks (their gradient), dropout and lse in the loss; ready plans
across a default process group destroyed and made again."""

from __future__ import annotations

import os
from typing import List

import torch
import torch.distributed as dist

import ring_flash_attn as rfa
from helpers.plan_cache_cases import _cu, clear_plan_caches

Tensor = torch.Tensor
HEADS, KV_HEADS, HEAD_DIM = 4, 2, 8
DOCS = (8, 16, 8)


def _call(family: str, rank: int, world_size: int, sinks: bool, dropout_p: float, lse: bool) -> List[Tensor]:
    """``[out, (lse), dq, dk, dv, (dsinks)]`` of one forward + backward on this rank (float64,
    reference kernel), the loss using lse when ``lse``."""
    gen = torch.Generator().manual_seed(11 + rank)
    tokens = sum(DOCS) // world_size
    batch = family in ("ring", "zigzag", "ulysses")
    shape = (lambda h: (1, tokens, h, HEAD_DIM)) if batch else (lambda h: (tokens, h, HEAD_DIM))
    q, k, v = (torch.randn(shape(h), generator=gen, dtype=torch.float64).requires_grad_()
               for h in (HEADS, KV_HEADS, KV_HEADS))
    s = torch.randn(HEADS, generator=gen, dtype=torch.float64).requires_grad_() if sinks else None
    common = dict(dropout_p=dropout_p, causal=True, return_attn_probs=lse, backend="reference", sinks=s)
    if family == "ring":
        r = rfa.ring_flash_attn_func(q, k, v, **common)
    elif family == "zigzag":
        r = rfa.zigzag_ring_flash_attn_func(q, k, v, **common)
    elif family == "ulysses":
        r = rfa.ulysses_flash_attn_func(q, k, v, **common)
    elif family == "ulysses_packed":
        r = rfa.ulysses_flash_attn_varlen_func(q, k, v, _cu(DOCS), max(DOCS), **common)
    elif family == "llama3":
        cu_q, cu_k, max_q, max_k, k_slice = rfa.llama3_flash_attn_prepare_cu_seqlens(_cu(DOCS), True, rank, world_size)
        r = rfa.llama3_flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, heads_k_stride=1,
                                              local_k_slice=k_slice, **common)
    elif family == "zigzag_llama3":
        r = rfa.zigzag_llama3_flash_attn_varlen_func(q, k, v, _cu(DOCS), max(DOCS), **common)
    else:
        raise ValueError(family)
    out, lse_t = (r[0], r[1]) if lse else (r, None)
    loss = (out * out).sum() + (out.sum() * 0.5)
    if lse_t is not None:
        loss = loss + (lse_t * lse_t).sum() * 0.1
    leaves = [q, k, v] + ([s] if s is not None else [])
    grads = torch.autograd.grad(loss, leaves)
    return [out.detach()] + ([lse_t.detach()] if lse_t is not None else []) + list(grads)


def routes_with_sinks_dropout_lse(family: str, rank: int = 0, world_size: int = 1) -> List[str]:
    """Plain eager route vs custom ops vs torch.compile (fullgraph, aot_eager) of ``family`` with
    sinks (and their gradient), dropout and lse in the loss, every combination: what differs."""
    from ring_flash_attn.core import function
    wrong = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for sinks in (False, True):
            for dropout_p in (0.0, 0.3):
                for lse in (False, True):
                    results = {}
                    for route in ("plain", "op", "compile"):
                        function.PLAIN_EAGER = route == "plain"
                        try:
                            torch.manual_seed(5)
                            if route == "compile":
                                torch._dynamo.reset()
                                fn = torch.compile(_call, fullgraph=False, backend="aot_eager")
                                results[route] = fn(family, rank, world_size, sinks, dropout_p, lse)
                            else:
                                results[route] = _call(family, rank, world_size, sinks, dropout_p, lse)
                        except Exception as e:  # noqa: BLE001 - reported
                            results[route] = f"{type(e).__name__}: {str(e)[:300]}"
                        finally:
                            function.PLAIN_EAGER = True
                    base = results["plain"]
                    for route in ("op", "compile"):
                        got = results[route]
                        name = f"sinks={sinks} dropout={dropout_p} lse={lse} {route}"
                        if isinstance(got, str) or isinstance(base, str):
                            wrong.append(f"{name}: {base if isinstance(base, str) else got}")
                        elif len(got) != len(base) or not all(torch.equal(a, b) for a, b in zip(base, got)):
                            wrong.append(f"{name}: differs from plain "
                                         f"{[float((a - b).abs().max()) for a, b in zip(base, got)]}")
    finally:
        torch.set_num_threads(threads)
    return wrong


def _zigzag_result(rank: int, world_size: int) -> List[Tensor]:
    return _call("zigzag", rank, world_size, sinks=False, dropout_p=0.0, lse=True)


def default_group_made_again(rank: int, world_size: int, store_dir: str) -> List[str]:
    """With the ready plans kept: this pool's default group destroyed, a one-process default group
    made in its place (the same group name), then a ``world_size`` one again; each call compared with
    a computation with every cache cleared. Leaves a working default group of ``world_size``."""
    wrong = []
    cached = _zigzag_result(rank, world_size)
    clear_plan_caches()
    if not all(torch.equal(a, b) for a, b in zip(cached, _zigzag_result(rank, world_size))):
        wrong.append("before")
    _zigzag_result(rank, world_size)  # cached again
    name_before = dist.group.WORLD.group_name
    dist.barrier()
    dist.destroy_process_group()
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(store_dir, f'alone{rank}')}", rank=0,
                            world_size=1)
    names = [name_before, dist.group.WORLD.group_name]
    alone = _call("zigzag", 0, 1, sinks=False, dropout_p=0.0, lse=True)  # the whole sequence, one rank
    clear_plan_caches()
    if not all(torch.equal(a, b) for a, b in zip(alone, _call("zigzag", 0, 1, sinks=False, dropout_p=0.0, lse=True))):
        wrong.append("alone after the W group")
    # the W call's local shapes, now in a one-rank group: the same spec and shapes, another group object
    local = _zigzag_result(rank, world_size)
    clear_plan_caches()
    if not all(torch.equal(a, b) for a, b in zip(local, _zigzag_result(rank, world_size))):
        wrong.append("alone, the W call's shapes")
    _zigzag_result(rank, world_size)  # cache the W=1 plan of these shapes
    dist.destroy_process_group()
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(store_dir, 'again')}", rank=rank,
                            world_size=world_size)
    names.append(dist.group.WORLD.group_name)
    again = _zigzag_result(rank, world_size)
    if not all(torch.equal(a, b) for a, b in zip(again, cached)):
        wrong.append(f"W group made again (group names {names})")
    return wrong

"""Worker-side functions of test_robustness.py: each runs on every rank of a gloo pool."""

from __future__ import annotations

import os
from typing import Dict

import torch
import torch.distributed as dist
import torch.utils.checkpoint

import ring_flash_attn as rfa
from ring_flash_attn.core.validation import CHECK_ENV

GROUP = None  # the default group


def _inputs(rank: int, world: int, seqlen: int = 24, heads=(4, 2), seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, seqlen, heads[0], 32, generator=gen)
    k, v = (torch.randn(2, seqlen, heads[1], 32, generator=gen) for _ in range(2))
    dout = torch.randn(2, seqlen, heads[0], 32, generator=gen)
    return [rfa.shard(t, "zigzag", rank, world) for t in (q, k, v, dout)]


def mismatched_call(rank: int, world_size: int) -> str:
    """Rank 1 passes a different local length; with the check on, every rank gets a ValueError."""
    os.environ["RING_FLASH_ATTN_CHECK"] = "1"
    try:
        q, k, v, _ = _inputs(rank, world_size)
        if rank == 1:
            q, k, v = (t[:, :4] for t in (q, k, v))
        rfa.zigzag_ring_flash_attn_func(q, k, v, causal=True, group=dist.group.WORLD)
        return "no error"
    except ValueError as err:
        return str(err)
    finally:
        del os.environ["RING_FLASH_ATTN_CHECK"]


def _checked(fn):
    """Run ``fn()`` with the cross-rank check on; the error text, or "no error"."""
    os.environ["RING_FLASH_ATTN_CHECK"] = "1"
    try:
        fn()
        return "no error"
    except ValueError as err:
        return str(err)
    finally:
        del os.environ["RING_FLASH_ATTN_CHECK"]


def _layers(q, k, v, skip_first: bool):
    """Two attention "layers" and a backward of their sum; rank 1 may skip the first layer."""
    out = 0
    for layer in range(2):
        if layer == 0 and skip_first:
            continue
        out = out + rfa.zigzag_ring_flash_attn_func(q, k, v, causal=True, group=dist.group.WORLD)
    out.sum().backward()


def mismatch_cases(rank: int, world_size: int) -> Dict[str, str]:
    """Call patterns the check must catch on every rank, then a correct call (is the group usable?)."""
    q, k, v, _ = _inputs(rank, world_size)
    leaves = lambda: [t.clone().requires_grad_() for t in (q, k, v)]  # noqa: E731
    answers = {}
    answers["skipped layer"] = _checked(lambda: _layers(*leaves(), skip_first=rank == 1))

    def no_grad_on_rank_1():
        with torch.set_grad_enabled(rank != 1):
            rfa.zigzag_ring_flash_attn_func(*leaves(), causal=True, group=dist.group.WORLD)
    answers["no_grad forward"] = _checked(no_grad_on_rank_1)

    def skipped_backward():
        out = rfa.zigzag_ring_flash_attn_func(*leaves(), causal=True, group=dist.group.WORLD)
        if rank == 0:
            out.sum().backward()
        rfa.zigzag_ring_flash_attn_func(q, k, v, causal=True, group=dist.group.WORLD)  # rank 1 goes on
    answers["skipped backward"] = _checked(skipped_backward)

    def different_options():
        rfa.zigzag_ring_flash_attn_func(*(t.to(torch.bfloat16 if rank else torch.float16) for t in (q, k, v)),
                                        causal=True, softmax_scale=0.125 * (rank + 1), group=dist.group.WORLD)
    answers["options"] = _checked(different_options)

    x = leaves()
    out = rfa.zigzag_ring_flash_attn_func(*x, causal=True, group=dist.group.WORLD)
    out.sum().backward()
    plain = rfa.zigzag_ring_flash_attn_func(q, k, v, causal=True, group=dist.group.WORLD)
    answers["group usable after"] = "yes" if torch.equal(out.detach(), plain) and x[0].grad is not None else "no"
    return answers


def skipped_call(rank: int, world_size: int) -> str:
    """Rank 1 never calls; rank 0 must fail within the check's timeout instead of hanging."""
    if rank == 1:
        return "skipped"
    os.environ.update(RING_FLASH_ATTN_CHECK="1", RING_FLASH_ATTN_CHECK_TIMEOUT="3")
    try:
        q, k, v, _ = _inputs(rank, world_size)
        rfa.zigzag_ring_flash_attn_func(q, k, v, causal=True, group=dist.group.WORLD)
        return "no error"
    except RuntimeError as err:
        return str(err)


def _run(q, k, v, dout, **kw) -> Dict[str, torch.Tensor]:
    leaves = [t for t in (q, k, v) if t.requires_grad]
    out = rfa.zigzag_ring_flash_attn_func(q, k, v, causal=True, group=dist.group.WORLD, **kw)
    grads = torch.autograd.grad(out, leaves, dout) if leaves else ()
    return {"out": out.detach(), **{f"g{i}": g for i, g in enumerate(grads)}}


def input_forms(rank: int, world_size: int) -> Dict[str, Dict[str, torch.Tensor]]:
    """The same attention through contiguous tensors, views of a fused projection, q-only grads,
    no_grad, inference_mode and activation checkpointing."""
    q, k, v, dout = _inputs(rank, world_size)
    results = {"plain": _run(*(t.clone().requires_grad_() for t in (q, k, v)), dout)}
    fused = torch.cat([q, k, v], dim=2).requires_grad_()  # (B, S, H + 2 Hk, D): q/k/v are strided views
    views = fused[:, :, :4], fused[:, :, 4:6], fused[:, :, 6:]
    out = rfa.zigzag_ring_flash_attn_func(*views, causal=True, group=dist.group.WORLD)
    grad = torch.autograd.grad(out, fused, dout)[0]
    results["views"] = {"out": out.detach(), "g0": grad[:, :, :4], "g1": grad[:, :, 4:6], "g2": grad[:, :, 6:]}
    results["q_only"] = _run(q.clone().requires_grad_(), k, v, dout)
    with torch.no_grad():
        results["no_grad"] = {"out": rfa.zigzag_ring_flash_attn_func(q, k, v, causal=True, group=dist.group.WORLD)}
    with torch.inference_mode():
        results["inference"] = {"out": rfa.zigzag_ring_flash_attn_func(q, k, v, causal=True,
                                                                       group=dist.group.WORLD).clone()}
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = torch.utils.checkpoint.checkpoint(
        lambda a, b, c: rfa.zigzag_ring_flash_attn_func(a, b, c, causal=True, group=dist.group.WORLD),
        *leaves, use_reentrant=False)
    grads = torch.autograd.grad(out, leaves, dout)
    results["checkpoint"] = {"out": out.detach(), **{f"g{i}": g for i, g in enumerate(grads)}}
    return results


def deterministic_runs(rank: int, world_size: int) -> Dict[str, torch.Tensor]:
    """Two runs with deterministic=True: bitwise equal outputs and gradients."""
    q, k, v, dout = _inputs(rank, world_size, seed=3)
    first = _run(*(t.clone().requires_grad_() for t in (q, k, v)), dout, deterministic=True)
    second = _run(*(t.clone().requires_grad_() for t in (q, k, v)), dout, deterministic=True)
    return {name: torch.equal(first[name], second[name]) for name in first}


def lse_only_loss(rank: int, world_size: int) -> Dict[str, tuple]:
    """Each rank's gradients from a loss of lse alone and of out alone, next to float64 autograd of
    the same loss on the whole sequence (every rank computes it)."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 6 * world_size, 2, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    dlse = torch.randn(1, 2, 6 * world_size, generator=gen, dtype=torch.float64)
    dout = torch.randn(1, 6 * world_size, 2, 8, generator=gen, dtype=torch.float64)
    pairs = {}
    for use in ("lse", "out"):
        full = [t.clone().requires_grad_() for t in (q, k, v)]
        scores = torch.einsum("bihd,bjhd->bhij", full[0], full[1]) * 8 ** -0.5
        scores = scores.masked_fill(~torch.ones(scores.shape[-2:], dtype=torch.bool).tril(), float("-inf"))
        out = torch.einsum("bhij,bjhd->bihd", scores.softmax(-1), full[2])
        loss = (scores.logsumexp(-1) * dlse).sum() if use == "lse" else (out * dout).sum()
        ref = [torch.zeros_like(t) if g is None else g  # lse does not depend on v
               for t, g in zip(full, torch.autograd.grad(loss, full, allow_unused=True))]
        local = [rfa.shard(t.float(), "zigzag", rank, world_size).requires_grad_() for t in (q, k, v)]
        out, lse, _ = rfa.zigzag_ring_flash_attn_func(*local, causal=True, return_attn_probs=True,
                                                      group=dist.group.WORLD)
        if use == "lse":
            loss = (lse * rfa.shard(dlse.float(), "zigzag", rank, world_size, dim=2)).sum()
        else:
            loss = (out * rfa.shard(dout.float(), "zigzag", rank, world_size)).sum()
        got = torch.autograd.grad(loss, local)
        for name, g, r in zip("qkv", got, ref):
            pairs[f"{use}: d{name}"] = (g, rfa.shard(r, "zigzag", rank, world_size).float())
    return pairs


def unchecked_length_mismatch(rank: int, world_size: int, family: str) -> None:
    """Without the check, rank 0 holds 8 local tokens and the others 4 (each call consistent on its
    own rank): forward and backward of ``family`` (zigzag, zigzag_llama3 or ulysses). Raises."""
    assert CHECK_ENV not in os.environ
    n = 8 if rank == 0 else 4
    gen = torch.Generator().manual_seed(rank)
    if family == "zigzag_llama3":
        q, k, v = (torch.randn(n, 2, 16, generator=gen, requires_grad=True) for _ in range(3))
        cu_seqlens = torch.tensor([0, n * world_size], dtype=torch.int32)
        out = rfa.zigzag_llama3_flash_attn_varlen_func(q, k, v, cu_seqlens, n * world_size, causal=True,
                                                       group=dist.group.WORLD)
    else:
        q, k, v = (torch.randn(1, n, 2, 16, generator=gen, requires_grad=True) for _ in range(3))
        fn = rfa.ulysses_flash_attn_func if family == "ulysses" else rfa.zigzag_ring_flash_attn_func
        out = fn(q, k, v, causal=True, group=dist.group.WORLD)
    out.sum().backward()

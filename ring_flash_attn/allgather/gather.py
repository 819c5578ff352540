"""Gathering K/V for the all-gather family, and the plain strategy on top of it.

:class:`KVGather` all-gathers K/V ``heads_k_stride`` heads at a time into two alternating buffers,
the next chunk's collective in flight while the current chunk computes; memory grows with the
stride, not with all heads. :class:`PlainGather` runs a plan's varlen calls over the gathered keys
and, backward, reduce-scatters dK/dV back to their owners (float32, float64 for float64 inputs; the
input dtype where each key gets only two terms).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist

from ..core.accumulate import sum_dtype
from ..core.comm import all_gather_async, reduce_scatter_async, wait
from ..core.merge import accumulator_dtype, in_dtype, merge_into
from ..core.rows import take
from ..kernels import BlockOptions
from ..kernels.dropout import cuda_rng_sandbox
from .plan import AllGatherPlan

Tensor = torch.Tensor


class KVGather:
    """All-gathers K/V ``heads_k_stride`` heads at a time into two alternating buffers (one rank:
    nothing to gather, the caller's k / v are read in place)."""

    def __init__(self, plan: AllGatherPlan, k: Tensor, v: Tensor) -> None:
        self.plan, self.k, self.v = plan, k, v
        self.works: List[Optional[dist.Work]] = [None, None]
        if plan.world_size == 1:
            return
        shape = (k.shape[0], 2, plan.heads_k_stride, k.shape[2])
        self.local = [torch.empty(shape, dtype=k.dtype, device=k.device) for _ in range(2)]
        self.gathered = [torch.empty((plan.world_size * shape[0], *shape[1:]), dtype=k.dtype, device=k.device)
                         for _ in range(2)]

    def start(self, chunk: int) -> None:
        if self.plan.world_size == 1:
            return
        slot, heads = chunk % 2, self.heads(chunk)
        self.local[slot][:, 0].copy_(self.k[:, heads])
        self.local[slot][:, 1].copy_(self.v[:, heads])
        self.works[slot] = all_gather_async(self.gathered[slot], self.local[slot], self.plan.group)

    def heads(self, chunk: int) -> slice:
        return slice(chunk * self.plan.heads_k_stride, (chunk + 1) * self.plan.heads_k_stride)

    def keys(self, chunk: int) -> Tuple[Tensor, Tensor]:
        """Wait for ``chunk``'s gather; its K and V rows that this rank's queries need."""
        if self.plan.world_size == 1:
            heads = self.heads(chunk)
            return take(self.k[:, heads], self.plan.k_rows, dim=0), take(self.v[:, heads], self.plan.k_rows, dim=0)
        slot = chunk % 2
        wait(self.works[slot])
        self.works[slot] = None
        kv = take(self.gathered[slot], self.plan.k_rows, dim=0)
        return kv[:, 0], kv[:, 1]

    def chunks(self, group_size: int):
        """Yield ``(kv_heads, q_heads, fetch)`` per head chunk; ``fetch()`` waits for the chunk's gather
        and returns its selected K and V. The next chunk's gather is in flight meanwhile."""
        count = self.k.shape[1] // self.plan.heads_k_stride
        self.start(0)
        for c in range(count):
            if c + 1 < count:
                self.start(c + 1)
            kv_heads = self.heads(c)
            yield kv_heads, slice(kv_heads.start * group_size, kv_heads.stop * group_size), functools.partial(
                self.keys, c)


@dataclass(frozen=True, eq=False)
class PlainGather:
    """The plain strategy: every chunk of K/V heads is gathered, then this rank's queries attend to
    the keys the plan selects (one varlen call, or the windowed calls); backward gathers again and
    reduce-scatters dK/dV to their owners, the next chunk's collective overlapping this chunk's work."""

    plan: AllGatherPlan

    @property
    def group(self) -> Optional[dist.ProcessGroup]:
        return self.plan.group

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tuple[Tensor, Tensor]:
        return gather_forward(self.plan, q, k, v)

    def backward(self, dout, q, k, v, out, lse) -> Tuple[Tensor, Tensor, Tensor]:
        return gather_backward(self.plan, dout, q, k, v, out, lse)


def gather_forward(plan: AllGatherPlan, q: Tensor, k: Tensor, v: Tensor) -> Tuple[Tensor, Tensor]:
    """``(out (T, H, D), lse (H, T))`` for packed local queries ``q (T, H, D)``."""
    group_size = q.shape[1] // k.shape[1]
    with cuda_rng_sandbox(plan.options.dropout, q.device):
        if plan.heads_k_stride == k.shape[1]:  # one chunk: the kernel's output is the result
            (_, heads, fetch), = KVGather(plan, k, v).chunks(group_size)
            out, lse = attend(plan, plan.options, q, *fetch())
            return in_dtype(out, q.dtype), lse
        out = torch.empty_like(q)
        lse = torch.empty((q.shape[1], q.shape[0]), dtype=accumulator_dtype(q.dtype), device=q.device)
        for _, heads, fetch in KVGather(plan, k, v).chunks(group_size):
            out[:, heads], lse[heads] = attend(plan, plan.options.for_heads(heads), q[:, heads], *fetch())
    return out, lse


def attend(plan: AllGatherPlan, options: BlockOptions, q: Tensor, k: Tensor, v: Tensor) -> Tuple[Tensor, Tensor]:
    """The varlen calls of the plan; their rows are disjoint, so merging them is exact. A window that
    keeps no pair (caller-built cu_seqlens) leaves no call: every row sees no key, 0 / -inf."""
    if not plan.metas:
        lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=accumulator_dtype(q.dtype), device=q.device)
        return torch.zeros_like(q), lse
    out, lse = plan.backend.forward_varlen(q, k, v, plan.metas[0], options)
    for meta in plan.metas[1:]:
        out_m, lse_m = plan.backend.forward_varlen(q, k, v, meta, options)
        merge_into(out[None], lse[None], out_m[None], lse_m[None])
    return out, lse


def attend_backward(plan: AllGatherPlan, options: BlockOptions, dout, q, k, v, out, lse) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients of :func:`attend`: dq over disjoint rows; dK/dV summed over the calls in float32
    (float64 for float64 inputs)."""
    grads = [plan.backend.backward_varlen(dout, q, k, v, out, lse, meta, options) for meta in plan.metas]
    if not grads:  # no call (see attend): no gradients
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    if len(grads) == 1:
        return grads[0]
    wide = accumulator_dtype(k.dtype)
    dq, dk, dv = grads[0][0].clone(), grads[0][1].to(wide), grads[0][2].to(wide)
    for dq_m, dk_m, dv_m in grads[1:]:
        dq += dq_m  # each row's gradient comes from one call: adding zeros, exact
        dk += dk_m
        dv += dv_m
    return dq, dk, dv


def start_backward(plan: AllGatherPlan, q: Tensor, k: Tensor) -> int:
    """Query heads per K/V head; dropout replays from the forward's first call."""
    if plan.options.dropout is not None:
        plan.options.dropout.rewind()
    return q.shape[1] // k.shape[1]


def gather_backward(
    plan: AllGatherPlan, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor
) -> Tuple[Tensor, Tensor, Tensor]:
    group_size = start_backward(plan, q, k)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    w, tokens = plan.world_size, k.shape[0]
    pending: Optional[Tuple[dist.Work, Tensor, slice]] = None

    def finish(work_result):
        work, result, kv_heads = work_result
        wait(work)
        dk[:, kv_heads], dv[:, kv_heads] = result[:, 0], result[:, 1]

    # Each rank adds at most one partial per key where the keys are a slice and one call selects them:
    # the reduce-scatter sums W terms (core.accumulate.sum_dtype). Zigzag layouts (a rank's two chunks
    # can both need a key) and windowed calls: float32 (float64 for float64). Every rank evaluates the same.
    terms = w if isinstance(plan.k_rows, slice) and not plan.windowed else None
    reduce_dtype = sum_dtype(k.dtype, terms, plan.backend.results_in_input_dtype)
    for kv_heads, heads, fetch in KVGather(plan, k, v).chunks(group_size):
        dq[:, heads], dk_c, dv_c = attend_backward(plan, plan.options.for_heads(heads), dout[:, heads], q[:, heads],
                                                   *fetch(), out[:, heads], lse[heads])
        full = torch.zeros((w * tokens, 2, *dk_c.shape[1:]), dtype=reduce_dtype, device=k.device)
        for i, grad in enumerate((dk_c, dv_c)):
            if isinstance(plan.k_rows, slice):
                full[plan.k_rows, i] = grad
            else:  # an index (zigzag layouts), split by gathered_keys
                plan.k_repeats.scatter_into(full[:, i], grad)
        if pending is not None:
            finish(pending)
        if w == 1:
            pending = (None, full, kv_heads)
            continue
        mine = torch.empty((tokens, *full.shape[1:]), dtype=reduce_dtype, device=k.device)
        pending = (reduce_scatter_async(mine, full, plan.group), mine, kv_heads)
    finish(pending)
    return dq, dk, dv

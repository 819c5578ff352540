"""The P2P ring engine and its autograd Function.

Forward: each rank keeps its queries; K/V blocks travel ``rank -> rank + 1`` for ``W - 1`` hops,
the next hop's transfer in flight while the current block computes. Each block's ``(out, lse)``
is merged into float32 accumulators. Backward rotates K/V again; the float32 dK/dV accumulator of
each block travels with it and arrives home after ``W`` hops. The engine knows nothing about
layouts: it asks the schedule which jobs to run for each (rank, K/V source) pair.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple, Union

import torch
import torch.distributed as dist

from .comm import RingComm
from .kernels import Backend
from .merge import merge_into, start_from
from .schedules import BlockJob, RingSchedule

Tensor = torch.Tensor
Rows = Union[slice, Tensor]  # a job's rows of the sequence dim (dim 1): a view, or gathered by index


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """Partial results accumulate in float32 (float64 for float64 inputs)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class RingPlan:
    """Everything a ring call needs besides the tensors; the same on every rank of the group."""

    rank: int
    world_size: int
    comm: Optional[RingComm]  # None when the world size is 1
    schedule: RingSchedule  # or a VarlenRingSchedule: anything with jobs_for() and forwards_kv()
    backend: Backend
    softmax_scale: float

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tuple[Tensor, Tensor]:
        return ring_forward(self, q, k, v)

    def backward(self, dout, q, k, v, out, lse) -> Tuple[Tensor, Tensor, Tensor]:
        return ring_backward(self, dout, q, k, v, out, lse)


class KVRotation:
    """The K/V block of the current hop, and the receive of the next one into a second buffer.

    K and V travel as one message in a ``(2, *k.shape)`` buffer; the two buffers are allocated once
    per call. Hops the schedule says nobody downstream needs are neither sent nor received.
    """

    def __init__(self, plan: RingPlan, k: Tensor, v: Tensor) -> None:
        self.plan = plan
        self.k, self.v = k, v
        self.works: List[dist.Work] = []
        if plan.world_size > 1:
            self.buffers = [torch.empty((2, *k.shape), dtype=k.dtype, device=k.device) for _ in range(2)]
            self.buffers[0][0].copy_(k)
            self.buffers[0][1].copy_(v)
            self.current = 0

    def start(self, step: int) -> None:
        plan = self.plan
        if step >= plan.world_size - 1:
            return
        prev = (plan.rank - 1) % plan.world_size
        send = self.buffers[self.current] if plan.schedule.forwards_kv(plan.rank, step) else None
        recv = self.buffers[1 - self.current] if plan.schedule.forwards_kv(prev, step) else None
        self.works = plan.comm.start(send, recv)

    def finish(self) -> None:
        if self.plan.world_size == 1:
            return
        RingComm.wait(self.works)
        self.works = []
        self.current = 1 - self.current
        self.k, self.v = self.buffers[self.current].unbind(0)


def take(x: Tensor, rows: Rows, dim: int = 1) -> Tensor:
    return x[(slice(None),) * dim + (rows,)] if isinstance(rows, slice) else x.index_select(dim, rows)


def add_rows(acc: Tensor, rows: Rows, value: Tensor) -> None:
    if isinstance(rows, slice):
        acc[:, rows] += value
    else:
        acc.index_add_(1, rows, value.to(acc.dtype))


def merge_rows(out: Tensor, lse: Tensor, rows: Rows, block_out: Tensor, block_lse: Tensor) -> None:
    """Fold a block's result into the accumulators at ``rows`` (in place)."""
    if isinstance(rows, slice):
        merge_into(out[:, rows], lse[:, :, rows], block_out, block_lse)
        return
    out_rows, lse_rows = out.index_select(1, rows), lse.index_select(2, rows)
    merge_into(out_rows, lse_rows, block_out, block_lse)
    out.index_copy_(1, rows, out_rows)
    lse.index_copy_(2, rows, lse_rows)


def covers_all(rows: Rows, length: int) -> bool:
    return isinstance(rows, slice) and rows.indices(length) == (0, length, 1)


def first_full_job(plan: RingPlan, length: int) -> Optional[BlockJob]:
    """The first job of the first hop if it covers every query row (true of all our schedules): its
    result initialises the accumulators instead of being merged into zeros."""
    jobs = plan.schedule.jobs_for(plan.rank, plan.rank)
    return jobs[0] if jobs and covers_all(jobs[0].q, length) else None


def block_forward(plan: RingPlan, job: BlockJob, q: Tensor, k: Tensor, v: Tensor) -> Tuple[Tensor, Tensor]:
    """One job's (out, lse) with the tensors already cut to its rows; packed jobs run varlen."""
    if job.varlen is None:
        return plan.backend.forward(q, k, v, job.band, plan.softmax_scale)
    out, lse = plan.backend.forward_varlen(q[0], k[0], v[0], job.varlen, plan.softmax_scale)
    return out[None], lse[None]


def block_backward(plan: RingPlan, job: BlockJob, dout, q, k, v, out, lse) -> Tuple[Tensor, Tensor, Tensor]:
    if job.varlen is None:
        return plan.backend.backward(dout, q, k, v, out, lse, job.band, plan.softmax_scale)
    grads = plan.backend.backward_varlen(dout[0], q[0], k[0], v[0], out[0], lse[0], job.varlen, plan.softmax_scale)
    return tuple(g[None] for g in grads)


def ring_forward(plan: RingPlan, q: Tensor, k: Tensor, v: Tensor) -> Tuple[Tensor, Tensor]:
    """This rank's ``(out, lse)``: out like q in q's dtype, lse ``(B, H, S)`` in the accumulator dtype."""
    b, s, h, _ = q.shape
    acc_dtype = accumulator_dtype(q.dtype)
    first = first_full_job(plan, s)
    if first is not None:
        out = torch.empty(q.shape, dtype=acc_dtype, device=q.device)
        lse = torch.empty((b, h, s), dtype=acc_dtype, device=q.device)
    else:
        out = torch.zeros(q.shape, dtype=acc_dtype, device=q.device)
        lse = torch.full((b, h, s), float("-inf"), dtype=acc_dtype, device=q.device)
    kv = KVRotation(plan, k, v)
    for step in range(plan.world_size):
        src = (plan.rank - step) % plan.world_size
        kv.start(step)
        for job in plan.schedule.jobs_for(plan.rank, src):
            block_out, block_lse = block_forward(plan, job, take(q, job.q), take(kv.k, job.kv), take(kv.v, job.kv))
            if job is first and step == 0:
                start_from(out, lse, block_out, block_lse)
            else:
                merge_rows(out, lse, job.q, block_out, block_lse)
        kv.finish()
    return out.to(q.dtype), lse


def ring_backward(
    plan: RingPlan, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor
) -> Tuple[Tensor, Tensor, Tensor]:
    """dq, dk, dv of this rank's shard, accumulated in float32 and cast to the input dtypes once."""
    acc_dtype = accumulator_dtype(q.dtype)
    first = first_full_job(plan, q.shape[1])
    dq = (torch.empty if first is not None else torch.zeros)(q.shape, dtype=acc_dtype, device=q.device)
    dkv_buffers = [torch.zeros((2, *k.shape), dtype=acc_dtype, device=k.device)]
    if plan.world_size > 1:
        dkv_buffers.append(torch.empty_like(dkv_buffers[0]))
    kv = KVRotation(plan, k, v)
    dkv_works: List[dist.Work] = []
    acc = 0  # dkv_buffers[acc] holds the dK/dV of the K/V block this rank has now
    for step in range(plan.world_size):
        src = (plan.rank - step) % plan.world_size
        kv.start(step)
        block_grads = []
        for job in plan.schedule.jobs_for(plan.rank, src):
            rows = job.q
            dq_b, dk_b, dv_b = block_backward(
                plan, job, take(dout, rows), take(q, rows), take(kv.k, job.kv), take(kv.v, job.kv), take(out, rows),
                take(lse, rows, dim=2),
            )
            if job is first and step == 0:
                dq.copy_(dq_b)
            else:
                add_rows(dq, rows, dq_b)
            block_grads.append((job.kv, dk_b, dv_b))
        RingComm.wait(dkv_works)  # the previous ranks' part of this block's dK/dV has arrived
        dkv = dkv_buffers[acc]
        for cols, dk_b, dv_b in block_grads:
            add_rows(dkv[0], cols, dk_b)
            add_rows(dkv[1], cols, dv_b)
        if plan.world_size > 1:
            dkv_works = plan.comm.start(dkv, dkv_buffers[1 - acc])
            acc = 1 - acc
        kv.finish()
    RingComm.wait(dkv_works)  # after W hops every block's dK/dV is back with its owner
    dkv = dkv_buffers[acc]
    return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype)


class AttentionFunction(torch.autograd.Function):
    """Autograd for every family: ``plan.forward(q, k, v) -> (out, lse)`` and
    ``plan.backward(dout, q, k, v, out, lse) -> (dq, dk, dv)`` (the ring here, the all-gather
    family in allgather.py). lse is returned but not differentiable."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, plan) -> Tuple[Tensor, Tensor]:
        out, lse = plan.forward(q, k, v)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan = plan
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout: Tensor, _dlse: Optional[Tensor]):
        q, k, v, out, lse = ctx.saved_tensors
        return (*ctx.plan.backward(dout, q, k, v, out, lse), None)

"""The P2P ring engine and its autograd Function.

Forward: each rank keeps its queries; K/V blocks travel ``rank -> rank + 1`` for ``W - 1`` hops,
the next hop's transfer in flight while the current block computes. Each block's ``(out, lse)``
is merged into float32 accumulators. Backward rotates K/V again; the float32 dK/dV accumulator of
each block travels with it and arrives home after ``W`` hops. The engine knows nothing about
layouts: it asks the schedule which jobs to run for each (rank, K/V source) pair.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist

from .comm import RingComm
from .kernels import Backend
from .merge import merge_into
from .schedules import RingSchedule

Tensor = torch.Tensor


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """Partial results accumulate in float32 (float64 for float64 inputs)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class RingPlan:
    """Everything a ring call needs besides the tensors; the same on every rank of the group."""

    rank: int
    world_size: int
    comm: Optional[RingComm]  # None when the world size is 1
    schedule: RingSchedule
    backend: Backend
    softmax_scale: float


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


def ring_forward(plan: RingPlan, q: Tensor, k: Tensor, v: Tensor) -> Tuple[Tensor, Tensor]:
    """This rank's ``(out, lse)``: out like q in q's dtype, lse ``(B, H, S)`` in the accumulator dtype."""
    b, s, h, _ = q.shape
    acc_dtype = accumulator_dtype(q.dtype)
    out = torch.zeros(q.shape, dtype=acc_dtype, device=q.device)
    lse = torch.full((b, h, s), float("-inf"), dtype=acc_dtype, device=q.device)
    kv = KVRotation(plan, k, v)
    for step in range(plan.world_size):
        src = (plan.rank - step) % plan.world_size
        kv.start(step)
        for job in plan.schedule.jobs_for(plan.rank, src):
            block_out, block_lse = plan.backend.forward(
                q[:, job.q], kv.k[:, job.kv], kv.v[:, job.kv], job.band, plan.softmax_scale
            )
            merge_into(out[:, job.q], lse[:, :, job.q], block_out, block_lse)
        kv.finish()
    return out.to(q.dtype), lse


def ring_backward(
    plan: RingPlan, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor
) -> Tuple[Tensor, Tensor, Tensor]:
    """dq, dk, dv of this rank's shard, accumulated in float32 and cast to the input dtypes once."""
    acc_dtype = accumulator_dtype(q.dtype)
    dq = torch.zeros(q.shape, dtype=acc_dtype, device=q.device)
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
            dq_b, dk_b, dv_b = plan.backend.backward(
                dout[:, rows], q[:, rows], kv.k[:, job.kv], kv.v[:, job.kv], out[:, rows], lse[:, :, rows],
                job.band, plan.softmax_scale,
            )
            dq[:, rows] += dq_b
            block_grads.append((job.kv, dk_b, dv_b))
        RingComm.wait(dkv_works)  # the previous ranks' part of this block's dK/dV has arrived
        dkv = dkv_buffers[acc]
        for cols, dk_b, dv_b in block_grads:
            dkv[0][:, cols] += dk_b
            dkv[1][:, cols] += dv_b
        if plan.world_size > 1:
            dkv_works = plan.comm.start(dkv, dkv_buffers[1 - acc])
            acc = 1 - acc
        kv.finish()
    RingComm.wait(dkv_works)  # after W hops every block's dK/dV is back with its owner
    dkv = dkv_buffers[acc]
    return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype)


class RingAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, plan: RingPlan) -> Tuple[Tensor, Tensor]:
        out, lse = ring_forward(plan, q, k, v)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan = plan
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout: Tensor, _dlse: Optional[Tensor]):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = ring_backward(ctx.plan, dout, q, k, v, out, lse)
        return dq, dk, dv, None

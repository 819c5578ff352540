"""The P2P ring engine: :func:`ring_forward` and :func:`ring_backward` of one :class:`RingPlan`.

Forward: each rank keeps its queries; K/V blocks travel ``rank -> rank + 1`` for ``W - 1`` hops (K
and V as one message), the next hop's transfer in flight while the current block computes. Each block's ``(out, lse)``
is merged with one rounding (:mod:`ring_flash_attn.core.accumulate`). Backward rotates K/V again; the
dK/dV accumulator of each block travels with it (one message, :func:`one_message`) and arrives home
after ``W`` hops (float32 while it is a partial sum, see :func:`dkv_message_dtype`). The engine knows nothing about layouts: it
asks the schedule which jobs to run for each (rank, K/V source) pair.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple, Union

import torch
import torch.distributed as dist

from ..core.accumulate import (JobRows, RowCombiner, WideAccumulator, add_rows, disjoint, job_rows, slice_rows,
                               start_sum, sum_dtype)
from ..core.comm import RingComm
from ..core.merge import accumulator_dtype, in_dtype
from ..core.rows import take
from ..kernels import Backend, BlockOptions
from ..kernels.dropout import cuda_rng_sandbox
from .schedules import BlockJob, Schedule

Tensor = torch.Tensor
ROWS, LSE_ROWS = -3, -1  # the rows (tokens) dimension of q / k / v / out ``(B, S, H, D)`` or ``(T, H, D)``, of lse


@dataclass(frozen=True)
class RingPlan:
    """Everything a ring call needs besides the tensors."""

    rank: int
    world_size: int
    comm: Optional[RingComm]  # None when the world size is 1
    schedule: Schedule
    backend: Backend
    options: BlockOptions  # the call's scale, soft-cap, dropout record, ALiBi slopes, determinism
    rows: JobRows  # the query rows of this rank's jobs in ring order (:func:`query_rows`)
    positions: Optional[Tuple[Tensor, ...]] = None  # every rank's global token positions (ALiBi only)


class KVRotation:
    """The K/V block of the current hop, and the receive of the next one.

    K and V travel as one message ``(2, *k.shape)``: the first hop stacks the caller's k and v once
    (the only copy), later hops pass on the buffer they arrived in. Received blocks land in at most
    two such buffers, allocated once per call and used in turn. Hops the schedule says nobody
    downstream needs are neither sent nor received.
    """

    def __init__(self, plan: RingPlan, k: Tensor, v: Tensor) -> None:
        self.plan = plan
        self.k, self.v = k, v
        self.works: List[dist.Work] = []
        self.buffers: List[Tensor] = []
        self.current: Optional[int] = None  # index of the buffer holding k/v; None: the caller's tensors
        self.incoming: Optional[int] = None
        self.sending: List[Tensor] = []

    def start(self, step: int) -> None:
        plan = self.plan
        if step >= plan.world_size - 1:
            return
        prev = (plan.rank - 1) % plan.world_size
        send, recv = [], []
        if plan.schedule.forwards_kv(plan.rank, step):
            send = [torch.stack((self.k, self.v)) if self.current is None else self.buffers[self.current]]
        self.sending = send  # alive until the transfer is waited for
        self.incoming = None
        if plan.schedule.forwards_kv(prev, step):
            self.incoming = 1 if self.current == 0 else 0
            if len(self.buffers) <= self.incoming:
                self.buffers.append(torch.empty((2, *self.k.shape), dtype=self.k.dtype, device=self.k.device))
            recv = [self.buffers[self.incoming]]
        self.works = plan.comm.start(send, recv)

    def finish(self) -> None:
        RingComm.wait(self.works)
        self.works, self.sending = [], []
        if self.incoming is not None:
            self.current, self.incoming = self.incoming, None
            self.k, self.v = self.buffers[self.current].unbind(0)


def one_message(dk: Tensor, dv: Tensor, dtype: torch.dtype) -> Tensor:
    """``(2, *dk.shape)`` in ``dtype`` holding dK and dV: the tensor they are the two halves of when
    it already is one (an accumulator that arrived as a message, or was made as one), else a copy."""
    base = dk._base
    if (base is not None and dv._base is base and base.dtype == dtype and base.shape == (2, *dk.shape)
            and base.is_contiguous() and dk.data_ptr() == base.data_ptr()
            and dv.data_ptr() == base[1].data_ptr()):
        return base
    message = torch.empty((2, *dk.shape), dtype=dtype, device=dk.device)
    message[0].copy_(dk)  # one pass each, converting the dtype on the way
    message[1].copy_(dv)
    return message


def job_options(plan: RingPlan, job: BlockJob, src: int) -> BlockOptions:
    """The kernel options of one job: with ALiBi, told where the job's queries and keys sit."""
    if plan.positions is None:
        return plan.options
    return plan.options.at_positions(take(plan.positions[plan.rank], job.q, dim=0),
                                     take(plan.positions[src], job.kv, dim=0))


def block_forward(plan: RingPlan, job: BlockJob, src: int, q: Tensor, k: Tensor, v: Tensor) -> Tuple[Tensor, Tensor]:
    """One job's (out, lse) with the tensors already cut to its rows; packed jobs ``(T, H, D)`` run varlen."""
    options = job_options(plan, job, src)
    if job.varlen is None:
        return plan.backend.forward(q, k, v, job.band, options)
    return plan.backend.forward_varlen(q, k, v, job.varlen, options)


def block_backward(plan: RingPlan, job: BlockJob, src: int, dout, q, k, v, out, lse) -> Tuple[Tensor, Tensor, Tensor]:
    options = job_options(plan, job, src)
    if job.varlen is None:
        return plan.backend.backward(dout, q, k, v, out, lse, job.band, options)
    return plan.backend.backward_varlen(dout, q, k, v, out, lse, job.varlen, options)


def query_rows(schedule: Schedule, rank: int, world_size: int, length: int) -> JobRows:
    """The query rows of every job of ``rank``, in the order the ring runs them (``length`` local rows)."""
    w = world_size
    return job_rows([job.q for step in range(w) for job in schedule.jobs_for(rank, (rank - step) % w)], length)


def forward_blocks(plan: RingPlan, q: Tensor, k: Tensor, v: Tensor) -> Optional[Union[RowCombiner, WideAccumulator]]:
    """Every job's ``(out, lse)`` merged (None: no query sees any key)."""
    acc = None
    kv = KVRotation(plan, k, v)
    for step in range(plan.world_size):
        src = (plan.rank - step) % plan.world_size
        kv.start(step)
        for job in plan.schedule.jobs_for(plan.rank, src):
            block_out, block_lse = block_forward(plan, job, src, take(q, job.q, ROWS), take(kv.k, job.kv, ROWS),
                                                 take(kv.v, job.kv, ROWS))
            if acc is None:
                acc = start_sum(plan.rows, q.shape[ROWS], block_out, block_lse, q.dtype, merge=True)
            else:
                acc.add(job.q, block_out, block_lse)
        kv.finish()
    return acc


def ring_forward(plan: RingPlan, q: Tensor, k: Tensor, v: Tensor) -> Tuple[Tensor, Tensor]:
    """This rank's ``(out, lse)``: out like q in q's dtype, lse ``(B, H, S)`` in the accumulator dtype."""
    if plan.options.dropout is None:
        acc = forward_blocks(plan, q, k, v)
    else:
        with cuda_rng_sandbox(plan.options.dropout, q.device):
            acc = forward_blocks(plan, q, k, v)
    if acc is None:  # no query sees any key
        *lead, s, h, _ = q.shape
        return torch.zeros_like(q), torch.full((*lead, h, s), float("-inf"), dtype=accumulator_dtype(q.dtype),
                                               device=q.device)
    return in_dtype(acc.result, q.dtype), acc.lse


def dkv_message_dtype(plan: RingPlan, sender: int, step: int, k: Tensor) -> torch.dtype:
    """The dtype of the dK/dV accumulator ``sender`` passes on after ``step`` (both sides evaluate it).

    Finished sums (the last hop) and a single kernel output (the first hop, when the owner ran one
    job over all its keys) lose nothing in the input dtype; partial sums travel in float32."""
    if step == plan.world_size - 1:
        return k.dtype  # the finished sum: rounded as the final cast would
    return sum_dtype(k.dtype, 1 if step == 0 and single_full_job(plan, sender, k.shape[ROWS]) else None)


def single_full_job(plan: RingPlan, rank: int, length: int) -> bool:
    """Whether ``rank``'s own block is one kernel call over all its keys, answered in the input dtype."""
    jobs = plan.schedule.jobs_for(rank, rank)
    return (len(jobs) == 1 and plan.backend.results_in_input_dtype
            and slice_rows([jobs[0].kv], length) == [slice(0, length)])


def fold_dkv(plan: RingPlan, step: int, incoming: Optional[List[Tensor]], partials, k: Tensor) -> List[Tensor]:
    """The dK/dV accumulator of the block held at ``step``: what came with it plus this rank's parts."""
    acc_dtype = accumulator_dtype(k.dtype)
    if incoming is None:  # this rank's own block: nobody has added to it yet
        if single_full_job(plan, plan.rank, k.shape[ROWS]) and partials[0][1].dtype == k.dtype:
            return [partials[0][1], partials[0][2]]  # the kernel's output as it is
        if plan.world_size > 1:  # made as the one message it travels as
            acc = list(torch.zeros((2, *k.shape), dtype=acc_dtype, device=k.device).unbind(0))
        else:
            acc = [torch.zeros(k.shape, dtype=acc_dtype, device=k.device) for _ in range(2)]
    else:
        acc = incoming
        if acc[0].dtype != acc_dtype:  # a single earlier contribution, in the input dtype
            cols = slice_rows([c for c, _, _ in partials], k.shape[ROWS])
            # the last hop with this rank's jobs on disjoint keys: two terms per key, added in place
            terms = 2 if step == plan.world_size - 1 and cols is not None and disjoint(cols) else None
            wanted = sum_dtype(k.dtype, terms, all(dk.dtype == k.dtype for _, dk, _ in partials))
            acc = [t.to(wanted) for t in acc]
    for cols, dk_b, dv_b in partials:
        add_rows(acc[0], cols, dk_b)
        add_rows(acc[1], cols, dv_b)
    return acc


def ring_backward(
    plan: RingPlan, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor
) -> Tuple[Tensor, Tensor, Tensor]:
    """dq, dk, dv of this rank's shard, each rounded to the input dtype once.

    dq sums this rank's jobs (:mod:`ring_flash_attn.core.accumulate`). The dK/dV accumulator of each K/V
    block travels with it and comes home after ``W`` hops; see :func:`dkv_message_dtype` for the
    dtype of each hop (the last one, which nothing can overlap, carries half the bytes).
    """
    w = plan.world_size
    if plan.options.dropout is not None:
        plan.options.dropout.rewind()  # the same kernel calls as the forward, in the same order
    dq_sum = None
    kv = KVRotation(plan, k, v)
    dkv: List[Tensor] = []
    incoming: Optional[List[Tensor]] = None
    dkv_works: List[dist.Work] = []
    for step in range(w):
        src = (plan.rank - step) % w
        kv.start(step)
        partials = []
        for job in plan.schedule.jobs_for(plan.rank, src):
            dq_b, dk_b, dv_b = block_backward(
                plan, job, src, take(dout, job.q, ROWS), take(q, job.q, ROWS), take(kv.k, job.kv, ROWS),
                take(kv.v, job.kv, ROWS), take(out, job.q, ROWS), take(lse, job.q, LSE_ROWS),
            )
            if dq_sum is None:
                dq_sum = start_sum(plan.rows, q.shape[ROWS], dq_b, None, q.dtype, merge=False)
            else:
                dq_sum.add(job.q, dq_b)
            partials.append((job.kv, dk_b, dv_b))
        RingComm.wait(dkv_works)  # the previous ranks' part of this block's dK/dV has arrived
        dkv = fold_dkv(plan, step, incoming, partials, k)
        if w == 1:
            break
        send_dtype = dkv_message_dtype(plan, plan.rank, step, k)
        recv_dtype = dkv_message_dtype(plan, (plan.rank - 1) % w, step, k)
        arriving = torch.empty((2, *k.shape), dtype=recv_dtype, device=k.device)  # dK and dV: one message
        incoming = list(arriving.unbind(0))
        outgoing = one_message(dkv[0], dkv[1], send_dtype)  # alive until the next wait
        dkv_works = plan.comm.start([outgoing], [arriving])
        kv.finish()
    RingComm.wait(dkv_works)  # after W hops every block's dK/dV is back with its owner
    if w > 1:
        dkv = incoming
    dq = dq_sum.result if dq_sum is not None else torch.zeros_like(q)
    return in_dtype(dq, q.dtype), in_dtype(dkv[0], k.dtype), in_dtype(dkv[1], v.dtype)



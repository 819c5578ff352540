"""The own-keys-first strategy of the all-gather family: while K/V of the other ranks are gathered, each
rank attends its queries to its own keys; then to the gathered remote keys; the two partial results
merge exactly (online softmax), the gradients add.

Why it is exact and cheap: positions increase along a rank's local tokens in every layout of the
family, and a document's local tokens are contiguous in local order, so "local queries against
local keys" is one varlen call over the local tensors with a plain causal (or full) mask per
document. Every remote key of a causal piece lies before the piece, so the remote call needs no mask
at all. Not used with sliding windows (the window is on global positions, not local indices).

Backward the other way round: the gathered remote keys first, so their gradients travel back to
their owners (one reduce-scatter, float32, or the input dtype where that is exact: two ranks) while
the own keys compute; a rank without remote keys (llama3's first) starts the reduce-scatter at once.
Own keys' gradients stay local and are added to what comes back with one rounding.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Optional, Tuple

import torch

import torch.distributed as dist

from ..core.accumulate import sum_dtype
from ..core.comm import reduce_scatter_async, wait
from ..core.layouts import buffer_row_of, shard_positions
from ..core.mask import VarlenMeta
from ..core.merge import accumulator_dtype, in_dtype, merge_into
from ..core.rows import Rows
from ..kernels import BlockOptions
from ..kernels.dropout import cuda_rng_sandbox
from .gather import KVGather, start_backward
from .plan import AllGatherPlan, RowRepeats

Tensor = torch.Tensor


@dataclass(frozen=True, eq=False)
class OwnKeysFirst:
    """The own-keys-first strategy on a plan whose one varlen call (``plan.metas[0]``) is this rank's
    pieces against their keys held by other ranks (no mask), at ``plan.k_rows`` of the all-gather
    buffer (see :func:`own_keys_split`)."""

    plan: AllGatherPlan
    local_meta: VarlenMeta  # local queries against local keys: each document's local tokens, q = k
    local_options: BlockOptions  # the plan's options, with ALiBi at the local keys' positions
    remote_options: BlockOptions  # ... at the remote keys' positions

    @property
    def group(self) -> Optional[dist.ProcessGroup]:
        return self.plan.group

    @property
    def remote_meta(self) -> VarlenMeta:
        return self.plan.metas[0]

    @property
    def has_remote(self) -> bool:
        return self.remote_meta.offsets_k[-1] > 0

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tuple[Tensor, Tensor]:
        if self.plan.options.dropout is None:
            return self._forward(q, k, v)
        with cuda_rng_sandbox(self.plan.options.dropout, q.device):
            return self._forward(q, k, v)

    def _forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tuple[Tensor, Tensor]:
        plan = self.plan
        whole = plan.heads_k_stride == k.shape[1]  # one chunk of every head: no head slices, no copies
        if not whole:
            out = torch.empty_like(q)
            lse = torch.empty((q.shape[1], q.shape[0]), dtype=accumulator_dtype(q.dtype), device=q.device)
        for kv_heads, heads, fetch in KVGather(plan, k, v).chunks(q.shape[1] // k.shape[1]):
            q_c, k_c, v_c = (q, k, v) if whole else (q[:, heads], k[:, kv_heads], v[:, kv_heads])
            out_c, lse_c = plan.backend.forward_varlen(q_c, k_c, v_c, self.local_meta,
                                                       self.local_options.for_heads(heads))
            if self.has_remote:
                k_r, v_r = fetch()
                out_r, lse_r = plan.backend.forward_varlen(q_c, k_r, v_r, self.remote_meta,
                                                           self.remote_options.for_heads(heads))
                merge_into(out_c, lse_c, out_r, lse_r)
            elif plan.world_size > 1:
                fetch()  # the chunk's gather completes (the other ranks read this rank's part)
            if whole:
                return in_dtype(out_c, q.dtype), lse_c
            out[:, heads], lse[heads] = out_c, lse_c
        return out, lse

    def backward(self, dout, q, k, v, out, lse) -> Tuple[Tensor, Tensor, Tensor]:
        plan = self.plan
        whole = plan.heads_k_stride == k.shape[1]  # one chunk of every head: its gradients are the result
        group_size = start_backward(plan, q, k)
        if not whole:
            dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        w, tokens = plan.world_size, k.shape[0]
        # A key gets at most one term from each other rank (pieces that share remote keys are one call
        # document) and the owner adds its own with float32 math: W terms (core.accumulate.sum_dtype).
        reduce_dtype = sum_dtype(k.dtype, w, plan.backend.results_in_input_dtype)
        dropout = plan.options.dropout

        for kv_heads, heads, fetch in KVGather(plan, k, v).chunks(group_size):
            args = (dout, q) if whole else (dout[:, heads], q[:, heads])
            out_c, lse_c = (out, lse) if whole else (out[:, heads], lse[heads])
            k_c, v_c = (k, v) if whole else (k[:, kv_heads], v[:, kv_heads])
            local_call = dropout.cursor if dropout is not None else 0  # the forward ran local, then remote
            full = None
            if w > 1:
                full = torch.zeros((w * tokens, 2, *k_c.shape[1:]), dtype=reduce_dtype, device=k.device)
            dq_r = None
            if self.has_remote:  # remote keys first: their gradients travel home while the own keys compute
                k_r, v_r = fetch()
                if dropout is not None:
                    dropout.seek(local_call + 1)
                dq_r, dk_r, dv_r = plan.backend.backward_varlen(*args, k_r, v_r, out_c, lse_c, self.remote_meta,
                                                                self.remote_options.for_heads(heads))
                for i, grad in enumerate((dk_r, dv_r)):
                    if plan.k_repeats is None:
                        full[plan.k_rows, i] = grad
                    else:
                        plan.k_repeats.scatter_into(full[:, i], grad)
            work = mine = None
            if w > 1:
                mine = torch.empty((tokens, *full.shape[1:]), dtype=reduce_dtype, device=k.device)
                work = reduce_scatter_async(mine, full, plan.group)
            if dropout is not None:
                dropout.seek(local_call)
            dq_c, dk_l, dv_l = plan.backend.backward_varlen(*args, k_c, v_c, out_c, lse_c, self.local_meta,
                                                            self.local_options.for_heads(heads))
            if dropout is not None:
                dropout.seek(local_call + (2 if self.has_remote else 1))
            if not self.has_remote and w > 1:
                fetch()  # the chunk's gather (other ranks need it) completes before its buffer is reused
            if dq_r is not None:
                dq_c = dq_c + dq_r if dq_c.dtype != q.dtype else dq_c.add_(dq_r)  # two terms: one rounding
            wait(work)
            # what came back from the other ranks plus the own keys' part: float32 math, one rounding
            dk_c, dv_c = (grad if mine is None else mine[:, i] + grad for i, grad in enumerate((dk_l, dv_l)))
            if whole:
                return in_dtype(dq_c, q.dtype), in_dtype(dk_c, k.dtype), in_dtype(dv_c, v.dtype)
            dq[:, heads], dk[:, kv_heads], dv[:, kv_heads] = dq_c, dk_c, dv_c
        return dq, dk, dv


@lru_cache(maxsize=64)
def own_keys_split(layout: str, offsets: Tuple[int, ...], rank: int, world_size: int, q_offsets: Tuple[int, ...],
                   key_ranges: Tuple[Tuple[int, int], ...], causal: bool, device: torch.device):
    """``(local_meta, remote_meta, remote_rows, remote_repeats, remote_positions)`` for this rank's
    pieces (``q_offsets``: local query rows per piece; ``key_ranges``: each piece's global keys).
    ``offsets``: the global cu_seqlens (``(0, total)`` is enough for llama3)."""
    positions = shard_positions(layout, offsets, world_size)
    local_of = torch.full((offsets[-1],), -1, dtype=torch.int64)
    local_of[positions[rank]] = torch.arange(positions[rank].numel())
    gathered_of = buffer_row_of(positions)

    # own keys: each document's local tokens (a contiguous run of local rows) against themselves
    lengths = torch.tensor([q_offsets[i + 1] - q_offsets[i] for i in range(len(key_ranges))])
    doc_of_row = torch.repeat_interleave(torch.tensor([s for s, _ in key_ranges]), lengths)  # pieces of a
    changes = (doc_of_row[1:] != doc_of_row[:-1]).nonzero().flatten() + 1  # document share its first key
    cuts = [0, *changes.tolist(), q_offsets[-1]]
    local_meta = VarlenMeta.build(cuts, cuts, causal, device)

    # other ranks' keys of every piece, in the all-gather buffer; adjacent pieces of a document that
    # need the same remote keys (zigzag, W = 2) become one call document, so no key appears twice
    remote, group_q, k_offsets = [], [0], [0]
    for i, (start, stop) in enumerate(key_ranges):
        keys = torch.arange(start, stop)
        keys = keys[local_of[keys] < 0]
        if remote and key_ranges[i - 1][0] == start and torch.equal(remote[-1], keys):
            group_q[-1] = q_offsets[i + 1]
            continue
        remote.append(keys)
        group_q.append(q_offsets[i + 1])
        k_offsets.append(k_offsets[-1] + keys.numel())
    remote_positions = torch.cat(remote) if remote else torch.zeros(0, dtype=torch.int64)
    rows = gathered_of[remote_positions]
    if rows.numel() and bool((rows[1:] - rows[:-1] == 1).all()):
        remote_rows: Rows = slice(int(rows[0]), int(rows[-1]) + 1)
        repeats = None
    else:
        remote_rows, repeats = rows.to(device), RowRepeats.of(rows.to(device))
    remote_meta = VarlenMeta.build(group_q, k_offsets, False, device)
    return local_meta, remote_meta, remote_rows, repeats, remote_positions.to(device)

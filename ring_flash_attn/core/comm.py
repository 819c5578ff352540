"""Point-to-point exchange around the ring: each rank sends to ``rank + 1`` and receives from
``rank - 1`` (ranks within the process group), all posted in one ``batch_isend_irecv`` so the
transfer runs while the caller computes. Buffers belong to the caller and are reused every hop.
Also the asynchronous all-gather / reduce-scatter of the all-gather (llama3) family."""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.distributed as dist


class RingComm:
    def __init__(self, group: Optional[dist.ProcessGroup]) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.next_rank = self._global((self.rank + 1) % self.world_size)
        self.prev_rank = self._global((self.rank - 1) % self.world_size)

    def _global(self, group_rank: int) -> int:
        return group_rank if self.group is None else dist.get_global_rank(self.group, group_rank)

    def start(self, send: Sequence[torch.Tensor], recv: Sequence[torch.Tensor]) -> List[dist.Work]:
        """Post the ``send`` tensors to the next rank and receive ``recv`` from the previous one (either
        may be empty), as one batch: NCCL runs it as one fused transfer. Both sides must post the same
        number of tensors, in the same order, with matching sizes."""
        ops = [dist.P2POp(dist.isend, t, self.next_rank, self.group) for t in send]
        ops += [dist.P2POp(dist.irecv, t, self.prev_rank, self.group) for t in recv]
        return dist.batch_isend_irecv(ops) if ops else []

    @staticmethod
    def wait(works: List[dist.Work]) -> None:
        for work in works:
            work.wait()


# torch 2.13 renamed the tensor collectives (the old names warn); older torch has only the old ones.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def all_gather_async(output: torch.Tensor, local: torch.Tensor, group: Optional[dist.ProcessGroup]) -> dist.Work:
    """``output`` (W * n, ...) gets every rank's contiguous ``local`` (n, ...), in rank order."""
    return _all_gather_single(output, local, group=group, async_op=True)


def reduce_scatter_async(output: torch.Tensor, full: torch.Tensor, group: Optional[dist.ProcessGroup]) -> dist.Work:
    """``output`` (n, ...) gets the sum over ranks of this rank's part of ``full`` (W * n, ...)."""
    return _reduce_scatter_single(output, full, group=group, async_op=True)

"""Point-to-point exchange around the ring: each rank sends to ``rank + 1`` and receives from
``rank - 1`` (ranks within the process group), all posted in one ``batch_isend_irecv`` so the
transfer runs while the caller computes. Buffers belong to the caller and are reused every hop.
Also the asynchronous all-gather / reduce-scatter of the all-gather (llama3) family and the
all-to-all of Ulysses.

Every communication of an attention call is posted and waited for through this module: a failure
(gloo's "Connection reset by peer" when another rank aborted on a size mismatch, a crashed peer)
becomes a :class:`CommunicationError` that names the cross-rank call check."""

from __future__ import annotations

import contextlib
from typing import Dict, Iterator, List, Optional, Sequence

import torch
import torch.distributed as dist

CHECK_HINT = (
    "if the ranks called attention differently (different local sequence lengths, shapes or options), "
    "run with RING_FLASH_ATTN_CHECK=1: every call then compares its arguments across the ranks before "
    "communicating and raises an error naming what differs; otherwise see the other ranks' logs"
)


class CommunicationError(RuntimeError):
    """A collective or point-to-point transfer of an attention call failed (the original error is
    its ``__cause__``)."""


@contextlib.contextmanager
def explained_failures() -> Iterator[None]:
    """Re-raise a ``RuntimeError`` of the communication inside as a :class:`CommunicationError`
    naming ``RING_FLASH_ATTN_CHECK=1`` (once: one already explained passes through)."""
    try:
        yield
    except CommunicationError:
        raise
    except RuntimeError as err:
        raise CommunicationError(f"ring_flash_attn: a communication of this attention call failed ({err}); "
                                 f"{CHECK_HINT}") from err


def wait(work: Optional[dist.Work]) -> None:
    """Wait for ``work`` (None: nothing to wait for); a failure raises :class:`CommunicationError`."""
    if work is None:
        return
    with explained_failures():
        work.wait()


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
        with explained_failures():
            return dist.batch_isend_irecv(ops) if ops else []

    @staticmethod
    def wait(works: List[dist.Work]) -> None:
        for work in works:
            wait(work)


_RING_COMMS: Dict[int, RingComm] = {}


def ring_comm(group: Optional[dist.ProcessGroup], rank: int, world_size: int) -> RingComm:
    """The :class:`RingComm` of ``group`` (None: the default group), where this process is ``rank`` of
    ``world_size``: built once per group, rebuilt when the group object or its size changes (a
    default group destroyed and made again)."""
    key = id(group) if group is not None else id(dist.group.WORLD)
    hit = _RING_COMMS.get(key)
    if hit is None or hit.group is not group or (hit.rank, hit.world_size) != (rank, world_size):
        if len(_RING_COMMS) > 64:
            _RING_COMMS.clear()
        hit = _RING_COMMS[key] = RingComm(group)
    return hit


# torch 2.13 renamed the tensor collectives (the old names warn); older torch has only the old ones.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def all_gather_async(output: torch.Tensor, local: torch.Tensor, group: Optional[dist.ProcessGroup]) -> dist.Work:
    """``output`` (W * n, ...) gets every rank's contiguous ``local`` (n, ...), in rank order."""
    with explained_failures():
        return _all_gather_single(output, local, group=group, async_op=True)


def reduce_scatter_async(output: torch.Tensor, full: torch.Tensor, group: Optional[dist.ProcessGroup]) -> dist.Work:
    """``output`` (n, ...) gets the sum over ranks of this rank's part of ``full`` (W * n, ...)."""
    with explained_failures():
        return _reduce_scatter_single(output, full, group=group, async_op=True)


def all_to_all_async(output: torch.Tensor, send: torch.Tensor, group: Optional[dist.ProcessGroup]) -> dist.Work:
    """``output[u]`` gets rank ``u``'s ``send[r]`` (this rank ``r``); both ``(W, ...)``, contiguous."""
    with explained_failures():
        return dist.all_to_all_single(output, send, group=group, async_op=True)

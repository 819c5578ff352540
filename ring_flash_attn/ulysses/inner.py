"""What Ulysses attends after its all-to-all: every token of the ring shard for a chunk of heads, over
the ring group, through the work of the custom ops (``forward`` / ``backward``, called directly) of
the ring family (``ring``, ``zigzag``, ``stripe``, ``balanced``) or of the all-gather family
(``llama3``, ``zigzag_llama3``, ``packed_zigzag``, ``balanced_llama3``). With a ring of one rank this
is plain attention on the whole sequence."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Optional, Tuple

import torch

from ..allgather import ops as allgather_ops
from ..core.layouts import ALLGATHER_LAYOUTS, BALANCED_LAYOUTS, check_document_lengths
from ..core.function import AttentionOps
from ..core.spec import CallSpec
from ..core.validation import check_cu_seqlens, host_offsets
from ..ring import ops as ring_ops

Tensor = torch.Tensor


@dataclass(frozen=True)
class InnerAttention:
    """One call's attention of a head chunk over the ring group: the wings' forward / backward work
    with the ring shard's ``cu_seqlens`` and the call's spec for the ring (its layout, the ring group)."""

    cu_seqlens: Optional[Tensor]  # None: batch; the ring family's local offsets, or the all-gather family's global
    spec: CallSpec

    def tensors(self, slopes: Optional[Tensor], sinks: Optional[Tensor]) -> tuple:
        """The wing's tensor arguments after q, k, v."""
        if self.spec.layout in ALLGATHER_LAYOUTS:
            return self.cu_seqlens, None, slopes, sinks
        return self.cu_seqlens, slopes, sinks

    @property
    def _ops(self):
        return allgather_ops if self.spec.layout in ALLGATHER_LAYOUTS else ring_ops

    @property
    def attention_ops(self) -> AttentionOps:
        """The wing's ops with their autograd (a whole call, not a chunk's work)."""
        return allgather_ops.GATHER_OPS if self.spec.layout in ALLGATHER_LAYOUTS else ring_ops.RING_OPS

    def forward(self, q: Tensor, k: Tensor, v: Tensor, slopes: Optional[Tensor],
                sinks: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(out, lse, dropout_seed, lse_before_sinks)`` of the chunk."""
        return self._ops.forward(q, k, v, self.tensors(slopes, sinks), self.spec)

    def backward(self, dout: Optional[Tensor], dlse: Optional[Tensor], saved: Tuple[Tensor, ...],
                 slopes: Optional[Tensor], sinks: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(dq, dk, dv, dsinks)`` of the chunk for the gradients of its out and lse (either may be
        None); ``saved``: ``(q, k, v, out, lse, dropout_seed, lse_before_sinks)`` of the chunk."""
        return self._ops.backward(dout, dlse, saved, self.tensors(slopes, sinks), self.spec)


def ring_spec(spec: CallSpec, ring_degree: int) -> CallSpec:
    """The spec of the attention over the ring group, from a Ulysses call's: its ring layout (``ring``
    over one ring rank: every layout is then the whole sequence) and the ring group."""
    return spec._replace(layout=spec.layout if ring_degree > 1 else "ring", group=spec.ring_group,
                         kv_repeat=1, chunks=1, ulysses_group="", ring_group="")


def takes_global_offsets(layout: str, ring_degree: int) -> bool:
    """Whether the ring shard's attention takes a packed batch's global ``cu_seqlens`` as they are: the
    balanced layout, the all-gather family and a ring of one rank (the ring family's per-document
    layouts take local ones)."""
    return layout in ALLGATHER_LAYOUTS or layout == "balanced" or ring_degree == 1


def packed_inner_offsets(cu_seqlens: Tensor, max_seqlen: int, layout: str, local_tokens: int, world_size: int,
                         ring_degree: int) -> Tuple[Tensor, int]:
    """The ``(cu_seqlens, max_seqlen)`` the ring shard's attention takes, from the *global*
    ``cu_seqlens`` of a packed batch whose ``local_tokens`` per rank over ``world_size`` ranks make
    the whole pack (read on the host, once per tensor). The ring family over ``ring_degree > 1``
    ranks takes local offsets (every document split as its layout needs); the balanced layout, the
    all-gather family and a ring of one rank the global ones."""
    local = _checked_inner_offsets(host_offsets(cu_seqlens), max_seqlen, layout, local_tokens, world_size,
                                   ring_degree)
    return (cu_seqlens, max_seqlen) if local is None else local


@lru_cache(maxsize=64)
def _checked_inner_offsets(offsets: Tuple[int, ...], max_seqlen: int, layout: str, local_tokens: int,
                           world_size: int, ring_degree: int) -> Optional[Tuple[Tensor, int]]:
    """:func:`packed_inner_offsets` on the host ``offsets``, checked once per key: the local
    ``(cu_seqlens, max_seqlen)`` (a host tensor of the cache's own, read only by the ring ops), or
    None where the global ones are passed on."""
    if layout in BALANCED_LAYOUTS and offsets[-1] % world_size:
        raise ValueError(f"ring_layout {layout!r} needs the packed batch's total ({offsets[-1]} tokens, the global "
                         f"cu_seqlens' last entry) to be a multiple of the world size {world_size}; pad the pack at "
                         "its end (ring_flash_attn.layouts.pad_pack)")
    if offsets[-1] != local_tokens * world_size:
        raise ValueError(f"cu_seqlens (global) ends at {offsets[-1]}, but {world_size} ranks x {local_tokens} local "
                         f"tokens = {local_tokens * world_size}")
    check_cu_seqlens(offsets, offsets[-1], max_seqlen=max_seqlen)
    if takes_global_offsets(layout, ring_degree):
        return None
    check_document_lengths(offsets, layout, ring_degree)
    return torch.tensor([x // ring_degree for x in offsets], dtype=torch.int32), max_seqlen // ring_degree

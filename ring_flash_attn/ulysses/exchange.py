"""The all-to-alls of Ulysses: this rank's tokens of every head <-> every token of this rank's heads.

Heads are cut into ``degree`` parts (one per Ulysses rank) and each part into ``chunks`` chunks, so
the exchange of chunk ``c + 1`` can run while chunk ``c`` is attended. A tensor to send is laid out
``(chunks, degree, ...)``: ``[c, u]`` is what goes to rank ``u`` for chunk ``c``, and what arrives has
the same layout, ``[c, u]`` coming from rank ``u``. :class:`Dims` names where a tensor keeps its
tokens and heads: q-like ``(B, S, H, D)`` / ``(T, H, D)``, lse-like ``(B, H, S)`` / ``(H, T)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from ..core.comm import all_to_all_async, wait

Tensor = torch.Tensor


@dataclass(frozen=True)
class Dims:
    tokens: int
    heads: int


ROWS, ROWS_LSE = Dims(1, 2), Dims(2, 1)  # batch: (B, S, H, D) and lse (B, H, S)
PACKED, PACKED_LSE = Dims(0, 1), Dims(1, 0)  # packed documents: (T, H, D) and lse (H, T)


def heads_to_send(x: Tensor, dims: Dims, degree: int, chunks: int) -> Tensor:
    """``(chunks, degree, ...)``: ``x``'s heads cut per rank and chunk, the head dim keeping one chunk."""
    x = x.unflatten(dims.heads, (degree, chunks, -1))
    return x.movedim((dims.heads + 1, dims.heads), (0, 1)).contiguous()


def join_tokens(arrived: Tensor, dims: Dims) -> Tensor:
    """One chunk that arrived ``(degree, ...)`` (rank ``u``'s tokens at ``[u]``) as one tensor whose
    token dim holds every rank's tokens in rank order (a view for one batch row)."""
    return arrived.movedim(0, dims.tokens).flatten(dims.tokens, dims.tokens + 1)


def tokens_to_send(x: Tensor, dims: Dims, degree: int) -> Tensor:
    """Inverse of :func:`join_tokens`: ``(degree, ...)``, rank ``u``'s tokens at ``[u]``."""
    return x.unflatten(dims.tokens, (degree, -1)).movedim(dims.tokens, 0)


def join_heads(arrived: Tensor, dims: Dims) -> Tensor:
    """Inverse of :func:`heads_to_send` on what arrived ``(chunks, degree, ...)``: every head, in order."""
    return arrived.movedim((1, 0), (dims.heads, dims.heads + 1)).flatten(dims.heads, dims.heads + 2)


@dataclass
class Exchange:
    """One posted all-to-all; :meth:`wait` gives the buffer it fills, complete."""

    arrive: Tensor
    work: Optional[dist.Work]

    def wait(self) -> Tensor:
        wait(self.work)
        return self.arrive


class AllToAll:
    """Asynchronous all-to-alls over one group (None: a group of one rank, where what is sent is what
    arrives), each filling one chunk ``[c]`` of a ``(chunks, degree, ...)`` buffer."""

    def __init__(self, group: Optional[dist.ProcessGroup]) -> None:
        self.group = group

    def arrival_buffer(self, send: Tensor) -> Tensor:
        """Where ``send``'s chunks arrive (``send`` itself for a group of one rank)."""
        return send if self.group is None else torch.empty_like(send)

    def start(self, arrive: Tensor, send: Tensor) -> Exchange:
        """Post the exchange of ``send`` into ``arrive`` (both ``(degree, ...)``, contiguous)."""
        if self.group is None:
            return Exchange(arrive, None)
        return Exchange(arrive, all_to_all_async(arrive, send, self.group))

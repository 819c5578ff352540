"""Ulysses and Ulysses x ring attention, forward and backward, as ``torch.library`` custom ops.

Forward: K/V heads are repeated as far as the Ulysses ranks need (:class:`HeadSplit`), q, k, v go
through the all-to-all (sequence -> heads), every head chunk is attended over the ring group
(:class:`~.inner.InnerAttention`), and out and lse come back (heads -> sequence). Chunk ``c + 1``'s
exchange runs while chunk ``c`` is attended, and chunk ``c``'s result travels back while ``c + 1``
is. The forward op returns, besides ``(out, lse)``, the dropout seed of every chunk and what the
backward needs in the heads layout (q, k, v as they arrived, out and lse as they were sent), so the
backward exchanges only the gradients: ``dout`` / ``dlse`` in, ``dq`` / ``dk`` / ``dv`` out, again
chunk by chunk. The ops, their autograd and the plain eager route: :data:`ULYSSES_OPS`
(:class:`~ring_flash_attn.core.function.AttentionOps`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from ..core.function import AttentionOps, absent, fake_dropout_seed
from ..core.merge import accumulator_dtype
from ..core.sinks import fake_dsinks
from ..core.spec import CallSpec
from ..core.validation import resolve_group
from .exchange import PACKED, PACKED_LSE, ROWS, ROWS_LSE, AllToAll, Dims, heads_to_send, join_heads, join_tokens, \
    tokens_to_send
from .inner import InnerAttention, packed_inner_offsets, ring_spec

Tensor = torch.Tensor


@dataclass(frozen=True)
class HeadSplit:
    """How a call's heads spread over the Ulysses ranks: every K/V head repeated ``kv_repeat`` times
    (so each rank gets whole K/V heads for its query heads), each rank's heads in ``chunks`` chunks."""

    kv_repeat: int
    chunks: int


def head_split(nheads: int, nheads_k: int, degree: int, head_chunks: int) -> HeadSplit:
    """The :class:`HeadSplit` of ``nheads`` query / ``nheads_k`` K/V heads over ``degree`` ranks, in at
    most ``head_chunks`` chunks. K/V heads are repeated to ``lcm(nheads_k, degree)``: none when
    ``degree`` divides ``nheads_k``, up to one per rank when ``nheads_k`` divides ``degree``."""
    if nheads % degree:
        raise ValueError(f"nheads ({nheads}) must be a multiple of the Ulysses degree ({degree}): every Ulysses rank "
                         "attends the same number of heads")
    if isinstance(head_chunks, bool) or not isinstance(head_chunks, int) or head_chunks < 1:
        raise ValueError(f"head_chunks must be a positive int, got {head_chunks!r}")
    kv_heads = nheads_k * degree // _gcd(nheads_k, degree)
    per_rank = kv_heads // degree
    chunks = 1 if degree == 1 else max(c for c in range(1, min(head_chunks, per_rank) + 1) if per_rank % c == 0)
    return HeadSplit(kv_heads // nheads_k, chunks)


def _gcd(a: int, b: int) -> int:
    """Euclid's, in plain arithmetic (``math.gcd`` / ``math.lcm`` do not trace when torch.compile
    treats the head counts as symbols)."""
    while b:
        a, b = b, a % b
    return a


def _dims(packed: bool) -> Tuple[Dims, Dims]:
    return (PACKED, PACKED_LSE) if packed else (ROWS, ROWS_LSE)


def _degree_and_rank(name: str) -> Tuple[int, int]:
    pg = resolve_group(name)
    return (1, 0) if pg is None else (torch.distributed.get_world_size(pg), torch.distributed.get_rank(pg))


def _chunk_heads(x: Optional[Tensor], degree: int, chunks: int, rank: int, chunk: int) -> Optional[Tensor]:
    """The entries of this rank's heads of one chunk, for per-head tensors ``(H,)`` or ``(B, H)`` (ALiBi
    slopes, sinks)."""
    return None if x is None else x.unflatten(-1, (degree, chunks, -1))[..., rank, chunk, :].contiguous()


def _put_chunk(buffer: Optional[Tensor], chunk: int, chunks: int, value: Tensor) -> Tensor:
    """``buffer`` ``(chunks, ...)`` holding ``value`` at ``[chunk]``, allocated at the first chunk
    (one chunk: ``value`` itself, made contiguous)."""
    if chunks == 1:
        return value.contiguous()[None]
    if buffer is None:
        buffer = value.new_empty((chunks, *value.shape))
    buffer[chunk].copy_(value)
    return buffer


def _inner(cu_seqlens: Optional[Tensor], local_tokens: int, degree: int, spec: CallSpec) -> InnerAttention:
    """The attention of a head chunk over the ring group (:func:`~.inner.ring_spec`) with, packed,
    the offsets the ring shard takes."""
    ring_degree, _ = _degree_and_rank(spec.ring_group)
    inner = ring_spec(spec, ring_degree)
    if cu_seqlens is not None:
        cu_seqlens, max_seqlen = packed_inner_offsets(cu_seqlens, inner.max_seqlen, inner.layout, local_tokens,
                                                      degree * ring_degree, ring_degree)
        inner = inner._replace(max_seqlen=max_seqlen)
    return InnerAttention(cu_seqlens, inner)


UlyssesTensors = Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]  # cu_seqlens, ALiBi slopes, sinks


def forward(q: Tensor, k: Tensor, v: Tensor, tensors: UlyssesTensors, spec: CallSpec) -> Tuple[Tensor, ...]:
    """``(out, lse, dropout seeds (chunks,), q, k, v as arrived, out, lse as sent, lse before the
    sinks)``: this rank's rows (batch ``(B, S, H, D)`` / lse ``(B, H, S)``; packed ``(T, H, D)`` /
    ``(H, T)`` with the global ``cu_seqlens``), then the backward's state ``(chunks, degree, ...)``
    (the lse before the sinks ``(chunks, ...)`` in the heads layout; the seeds None without dropout,
    the lse before the sinks None without sinks).
    ``tensors``: ``(cu_seqlens, alibi_slopes, sinks)``."""
    cu_seqlens, alibi_slopes, sinks = tensors
    kv_repeat, chunks = spec.kv_repeat, spec.chunks
    packed = cu_seqlens is not None
    dims, lse_dims = _dims(packed)
    degree, rank = _degree_and_rank(spec.ulysses_group)
    inner = _inner(cu_seqlens, q.shape[dims.tokens], degree, spec)
    exchange = AllToAll(resolve_group(spec.ulysses_group))
    if kv_repeat > 1:
        k, v = (t.repeat_interleave(kv_repeat, dim=dims.heads) for t in (k, v))
    sends = [heads_to_send(t, dims, degree, chunks) for t in (q, k, v)]
    arrived = [exchange.arrival_buffer(t) for t in sends]
    incoming = [exchange.start(a[0], s[0]) for a, s in zip(arrived, sends)]
    out_sent = lse_sent = out_back = lse_back = lse_before = None
    outgoing, seeds = [], []
    for c in range(chunks):
        q_c, k_c, v_c = (join_tokens(x.wait(), dims) for x in incoming)
        if c + 1 < chunks:
            incoming = [exchange.start(a[c + 1], s[c + 1]) for a, s in zip(arrived, sends)]
        out_c, lse_c, seed, lse_before_c = inner.forward(q_c, k_c, v_c, *(
            _chunk_heads(x, degree, chunks, rank, c) for x in (alibi_slopes, sinks)))
        seeds.append(seed)
        if sinks is not None:
            lse_before = _put_chunk(lse_before, c, chunks, lse_before_c)
        out_sent = _put_chunk(out_sent, c, chunks, tokens_to_send(out_c, dims, degree))
        lse_sent = _put_chunk(lse_sent, c, chunks, tokens_to_send(lse_c, lse_dims, degree))
        if c == 0:
            out_back, lse_back = exchange.arrival_buffer(out_sent), exchange.arrival_buffer(lse_sent)
        outgoing += [exchange.start(out_back[c], out_sent[c]), exchange.start(lse_back[c], lse_sent[c])]
    for x in outgoing:
        x.wait()
    out, lse = join_heads(out_back, dims), join_heads(lse_back, lse_dims)
    if degree == 1:  # nothing was exchanged: outputs must not share memory with inputs or each other
        out, lse = out.clone(), lse.clone()
        arrived = [a.clone() if a.untyped_storage().data_ptr() == t.untyped_storage().data_ptr() else a
                   for a, t in zip(arrived, (q, k, v))]
    return (out.contiguous(), lse.contiguous(), torch.cat(seeds) if seeds[0] is not None else None, *arrived,
            out_sent, lse_sent, lse_before)


def fake_forward(q: Tensor, k: Tensor, v: Tensor, tensors: UlyssesTensors, spec: CallSpec) -> Tuple[Tensor, ...]:
    cu_seqlens, _, sinks = tensors
    kv_repeat, chunks = spec.kv_repeat, spec.chunks
    packed = cu_seqlens is not None
    dims, lse_dims = _dims(packed)
    degree, _ = _degree_and_rank(spec.ulysses_group)
    lse_dtype = accumulator_dtype(q.dtype)
    lse = q.new_empty((q.shape[1], q.shape[0]) if packed else (q.shape[0], q.shape[2], q.shape[1]), dtype=lse_dtype)

    def state(x: Tensor, heads_dims: Dims, repeat: int = 1) -> Tensor:
        shape = list(x.shape)
        shape[heads_dims.heads] = shape[heads_dims.heads] * repeat // (degree * chunks)
        return x.new_empty((chunks, degree, *shape))

    lse_sent = state(lse, lse_dims)
    lse_before = lse_sent.new_empty((chunks, *lse_sent.shape[2:-1], lse_sent.shape[-1] * degree))
    return (torch.empty_like(q, memory_format=torch.contiguous_format), lse,
            fake_dropout_seed(spec, q.device, chunks), state(q, dims), state(k, dims, kv_repeat),
            state(v, dims, kv_repeat), state(q, dims), lse_sent, lse_before if sinks is not None else absent(q.device))


def backward(dout: Optional[Tensor], dlse: Optional[Tensor], saved: Tuple[Tensor, ...], tensors: UlyssesTensors,
             spec: CallSpec) -> Tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    """``(dq, dk, dv, dsinks)`` of this rank's rows for the gradients ``dout`` of its out and ``dlse`` of
    its lse (either may be None), from the forward's state ``saved`` (its outputs after out, lse).
    dsinks: the heads this rank attended (every query of the sequence for them), 0 for the others;
    None without sinks."""
    seeds, q_arrived, k_arrived, v_arrived, out_sent, lse_sent, lse_before = saved
    cu_seqlens, alibi_slopes, sinks = tensors
    kv_repeat, chunks = spec.kv_repeat, spec.chunks
    packed = cu_seqlens is not None
    dims, lse_dims = _dims(packed)
    degree, rank = _degree_and_rank(spec.ulysses_group)
    inner = _inner(cu_seqlens, q_arrived.shape[2 + dims.tokens], degree, spec)
    exchange = AllToAll(resolve_group(spec.ulysses_group))
    given = [(g, d) for g, d in ((dout, dims), (dlse, lse_dims)) if g is not None]
    sends = [heads_to_send(g.contiguous(), d, degree, chunks) for g, d in given]
    arrived = [exchange.arrival_buffer(s) for s in sends]
    incoming = [exchange.start(a[0], s[0]) for a, s in zip(arrived, sends)]
    sent: list = [None, None, None]
    back: list = [None, None, None]
    outgoing = []
    dsinks = torch.zeros_like(sinks).unflatten(0, (degree, chunks, -1)) if sinks is not None else None
    for c in range(chunks):
        grads_in = iter([join_tokens(x.wait(), d) for x, (_, d) in zip(incoming, given)])
        dout_c = next(grads_in) if dout is not None else None
        dlse_c = next(grads_in) if dlse is not None else None
        if c + 1 < chunks:
            incoming = [exchange.start(a[c + 1], s[c + 1]) for a, s in zip(arrived, sends)]
        saved_c = (*(join_tokens(x[c], dims) for x in (q_arrived, k_arrived, v_arrived, out_sent)),
                   join_tokens(lse_sent[c], lse_dims), seeds[c:c + 1] if seeds is not None else None,
                   lse_before[c] if sinks is not None else None)
        *grads, dsinks_c = inner.backward(dout_c, dlse_c, saved_c, *(
            _chunk_heads(x, degree, chunks, rank, c) for x in (alibi_slopes, sinks)))
        if sinks is not None:
            dsinks[rank, c] = dsinks_c
        for i, g in enumerate(grads):
            sent[i] = _put_chunk(sent[i], c, chunks, tokens_to_send(g, dims, degree))
            if c == 0:
                back[i] = exchange.arrival_buffer(sent[i])
            outgoing.append(exchange.start(back[i][c], sent[i][c]))
    for x in outgoing:
        x.wait()
    dq, dk, dv = (join_heads(b, dims) for b in back)
    if kv_repeat > 1:  # the repeats' gradients summed in float32, rounded once
        dk, dv = (g.unflatten(dims.heads, (-1, kv_repeat)).sum(dims.heads + 1, dtype=accumulator_dtype(g.dtype))
                  .to(g.dtype) for g in (dk, dv))
    return dq.contiguous(), dk.contiguous(), dv.contiguous(), dsinks.flatten() if dsinks is not None else None


def fake_backward(dout: Optional[Tensor], dlse: Optional[Tensor], saved: Tuple[Tensor, ...], tensors: UlyssesTensors,
                  spec: CallSpec) -> Tuple[Tensor, ...]:
    q_arrived, k_arrived, v_arrived, lse_sent = saved[1], saved[2], saved[3], saved[5]
    cu_seqlens, sinks, kv_repeat = tensors[0], tensors[2], spec.kv_repeat
    dims, _ = _dims(cu_seqlens is not None)

    def grad(arrived: Tensor, repeat: int = 1) -> Tensor:
        shape = list(arrived.shape[2:])
        shape[dims.heads] = shape[dims.heads] * arrived.shape[0] * arrived.shape[1] // repeat
        return arrived.new_empty(shape)

    return grad(q_arrived), grad(k_arrived, kv_repeat), grad(v_arrived, kv_repeat), fake_dsinks(lse_sent, sinks)


ULYSSES_OPS = AttentionOps("ulysses", tensors=("cu_seqlens", "alibi_slopes", "sinks"),
                           saved=("seeds", "q_arrived", "k_arrived", "v_arrived", "out_sent", "lse_sent", "lse_before"),
                           forward=forward, backward=backward, fake_forward=fake_forward, fake_backward=fake_backward,
                           keeps_inputs=False)

"""ring-flash-attn 0.1.x's ``ring_flash_attn.utils``: the helpers other projects import to build
their own ring attention on flash-attn's kernels (prime-rl, axolotl and others).

* :func:`update_out_and_lse` -- fold one block's ``(out, lse)`` into a running float32 result;
* :func:`flatten_varlen_lse` / :func:`unflatten_varlen_lse` -- padded ``(batch, nheads, max_seqlen)``
  log-sum-exp to packed ``(nheads, total)`` and back;
* :class:`RingComm` -- queued send-to-next / receive-from-previous, posted as one batch;
* :class:`AllGatherComm` -- asynchronous all-gathers, waited for together;
* :func:`get_default_args` -- a function's arguments with their defaults, to fill and call by name.

This package's own functions do not use them (they run on :mod:`ring_flash_attn.ring.engine` and
:mod:`ring_flash_attn.core.comm`); they are kept with the original's names, arguments and results.
"""

from __future__ import annotations

import functools
import inspect
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from .core.comm import all_gather_async
from .core.merge import merge_weights

__all__ = ["update_out_and_lse", "RingComm", "get_default_args", "AllGatherComm", "flatten_varlen_lse",
           "unflatten_varlen_lse"]

Tensor = torch.Tensor


@functools.lru_cache(maxsize=None)
def _default_args(func: Callable) -> Dict[str, object]:
    params = [p for p in inspect.signature(func).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    args = {p.name: (None if p.default is p.empty else p.default) for p in params}
    if "softcap" in args:
        args["softcap"] = 0.0
    return args


def get_default_args(func: Callable) -> Dict[str, object]:
    """``{argument name: default}`` of ``func``'s positional arguments (``None`` where it has no
    default; ``softcap`` set to 0.0). ``func`` may be a ``torch.library`` custom op, whose Python
    function is read. The dict is cached per function: copy it before changing it."""
    target = func if inspect.isfunction(func) else getattr(func, "_init_fn", func)
    return _default_args(target)


def _fold(out: Tensor, lse: Tensor, block_out: Tensor, block_lse: Tensor) -> Tuple[Tensor, Tensor]:
    """``out`` (..., S, H, D) float32, ``lse`` (..., S, H, 1); ``block_lse`` (..., H, S)."""
    new_lse, weight, block_weight = merge_weights(lse, block_lse.transpose(-2, -1).unsqueeze(-1).to(lse.dtype))
    return out * weight + block_out.to(out.dtype) * block_weight, new_lse


def update_out_and_lse(out: Optional[Tensor], lse: Optional[Tensor], block_out: Tensor, block_lse: Tensor,
                       slice_=None) -> Tuple[Tensor, Tensor]:
    """Merge one block of attention into the running result, exactly (online softmax).

    Args:
        out: running output ``(batch, seqlen, nheads, headdim)`` float32, or ``None`` for the first block.
        lse: running log-sum-exp ``(batch, seqlen, nheads, 1)`` float32, or ``None``.
        block_out: this block's output ``(batch, seqlen, nheads, headdim)`` (any float dtype).
        block_lse: this block's log-sum-exp ``(batch, nheads, seqlen)`` as flash-attn returns it.
        slice_: an index of ``out``/``lse`` the block covers (merged in place); not for the first block.

    Returns:
        ``(out, lse)``.
    """
    if out is None:
        if slice_ is not None:
            raise RuntimeError("first update_out_and_lse should not pass slice_ args")
        return block_out.to(torch.float32), block_lse.transpose(-2, -1).unsqueeze(-1).to(torch.float32)
    if slice_ is None:
        return _fold(out, lse, block_out, block_lse)
    out[slice_], lse[slice_] = _fold(out[slice_], lse[slice_], block_out, block_lse)
    return out, lse


def _lengths(cu_seqlens) -> List[int]:
    bounds = [int(x) for x in (cu_seqlens.tolist() if isinstance(cu_seqlens, Tensor) else cu_seqlens)]
    return [b - a for a, b in zip(bounds[:-1], bounds[1:])]


def flatten_varlen_lse(lse: Tensor, cu_seqlens: Tensor) -> Tensor:
    """Padded ``lse (batch, nheads, max_seqlen)`` -> packed ``(nheads, total_tokens)``."""
    return torch.cat([lse[i, :, :n] for i, n in enumerate(_lengths(cu_seqlens))], dim=1)


def unflatten_varlen_lse(lse: Tensor, cu_seqlens: Tensor, max_seqlen: int) -> Tensor:
    """Packed ``lse (total_tokens, nheads, 1)`` (or ``(total_tokens, nheads)``) -> padded float32
    ``(batch, nheads, max_seqlen)``; positions past a sequence's end hold ``-inf``."""
    flat = lse.reshape(lse.shape[0], -1)
    lengths = _lengths(cu_seqlens)
    padded = torch.full((len(lengths), flat.shape[1], max_seqlen), float("-inf"), dtype=torch.float32,
                        device=lse.device)
    start = 0
    for i, n in enumerate(lengths):
        padded[i, :, :n] = flat[start:start + n].transpose(0, 1)
        start += n
    return padded


class RingComm:
    """Queue transfers to the next rank of ``process_group`` and from the previous one, post them
    together (:meth:`commit`), then :meth:`wait`. Ranks are within the group."""

    def __init__(self, process_group: Optional[dist.ProcessGroup]) -> None:
        self._process_group = process_group
        self._ops: List[dist.P2POp] = []
        self._reqs: Optional[List[dist.Work]] = None
        self.rank = dist.get_rank(process_group)
        self.world_size = dist.get_world_size(process_group)
        self.send_rank = (self.rank + 1) % self.world_size
        self.recv_rank = (self.rank - 1) % self.world_size
        if process_group is not None:  # P2P ops take global ranks
            self.send_rank = dist.get_global_rank(process_group, self.send_rank)
            self.recv_rank = dist.get_global_rank(process_group, self.recv_rank)

    def send_recv(self, to_send: Tensor, recv_tensor: Optional[Tensor] = None) -> Tensor:
        """Queue sending ``to_send`` and receiving a tensor like it (into ``recv_tensor`` if given);
        returns the receive buffer, filled after :meth:`wait`."""
        received = torch.empty_like(to_send) if recv_tensor is None else recv_tensor
        self._ops.append(dist.P2POp(dist.isend, to_send, self.send_rank, group=self._process_group))
        self._ops.append(dist.P2POp(dist.irecv, received, self.recv_rank, group=self._process_group))
        return received

    def commit(self) -> None:
        if self._reqs is not None:
            raise RuntimeError("commit called twice")
        self._reqs = dist.batch_isend_irecv(self._ops)

    def wait(self) -> None:
        if self._reqs is None:
            raise RuntimeError("wait called before commit")
        for req in self._reqs:
            req.wait()
        self._reqs, self._ops = None, []

    def send_recv_kv(self, k: Tensor, v: Tensor, k_buffer: Optional[Tensor] = None,
                     v_buffer: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """Queue K and V, commit; returns the receive buffers (valid after :meth:`wait`)."""
        next_k, next_v = self.send_recv(k, k_buffer), self.send_recv(v, v_buffer)
        self.commit()
        return next_k, next_v


class AllGatherComm:
    """Asynchronous all-gathers into a tensor (every rank's input, in rank order), waited for together."""

    def __init__(self, group: Optional[dist.ProcessGroup] = None) -> None:
        self.group = group
        self.handles: List[dist.Work] = []

    def all_gather(self, output_tensor: Tensor, input_tensor: Tensor) -> None:
        self.handles.append(all_gather_async(output_tensor, input_tensor, self.group))

    def wait(self) -> None:
        for handle in self.handles:
            handle.wait()
        self.handles = []

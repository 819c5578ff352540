"""Input checks shared by the public functions: clear ``TypeError``/``ValueError`` for bad tensors,
``NotImplementedError`` for options this version does not compute, and the process group."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.distributed as dist

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, packed: bool = False) -> None:
    """q ``(B, S, H, D)``, k/v ``(B, S, Hk, D)`` (packed: no batch dim), ``H % Hk == 0``, one dtype,
    one device."""
    dims = "(total_tokens, nheads, headdim)" if packed else "(batch, seqlen, nheads, headdim)"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != (3 if packed else 4):
            raise ValueError(f"{name} must have {3 if packed else 4} dims {dims}, got shape {tuple(t.shape)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; supported: float16, bfloat16, float32, float64")
    if packed:
        q, k, v = q[None], k[None], v[None]
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    (b, s, h, d), (bk, sk, hk, dk) = q.shape, k.shape
    if (b, s) != (bk, sk):
        raise ValueError(f"q {tuple(q.shape)} and k/v {tuple(k.shape)} differ in batch or sequence length")
    if d != dk:
        raise ValueError(f"q head dim {d} differs from k/v head dim {dk}")
    if d == 0 or h == 0 or hk == 0:
        raise ValueError(f"empty heads or head dim: q {tuple(q.shape)}, k {tuple(k.shape)}")
    if h % hk:
        raise ValueError(f"nheads ({h}) must be a multiple of nheads_k ({hk}) for GQA/MQA")


def check_packed(x: torch.Tensor, name: str, dim: int, count: int, ndim: int) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != ndim or x.shape[dim] != count:
        raise ValueError(f"{name} must have {ndim} dims with size {count} at dim {dim}, got shape {tuple(x.shape)}")


def check_cu_seqlens(cu_seqlens: torch.Tensor, offsets: Tuple[int, ...], total_tokens: int) -> None:
    """``cu_seqlens``: 1-D integer tensor whose host copy ``offsets`` ends at ``total_tokens``."""
    if offsets[-1] != total_tokens:
        raise ValueError(f"cu_seqlens ends at {offsets[-1]} but q holds {total_tokens} tokens")


def check_cu_seqlens_tensor(cu_seqlens: torch.Tensor) -> None:
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"cu_seqlens must be a 1-D int32 tensor [0, len0, len0+len1, ...], got {cu_seqlens.dtype} "
            f"shape {tuple(cu_seqlens.shape)}"
        )


def check_options(
    dropout_p: float,
    window_size: Tuple[int, int],
    softcap: float,
    alibi_slopes: Optional[torch.Tensor],
    return_attn_probs: bool,
) -> None:
    """Refuse what this version does not compute rather than ignore it."""
    if dropout_p != 0.0:
        raise NotImplementedError(f"dropout_p={dropout_p}: dropout is not supported yet; use dropout_p=0.0")
    if tuple(window_size) != (-1, -1):
        raise NotImplementedError(f"window_size={tuple(window_size)}: sliding-window attention is not supported yet")
    if softcap != 0.0:
        raise NotImplementedError(f"softcap={softcap}: logit soft-capping is not supported yet")
    if alibi_slopes is not None:
        raise NotImplementedError("alibi_slopes: ALiBi is not supported yet")
    if not isinstance(return_attn_probs, bool):
        raise TypeError(f"return_attn_probs must be a bool, got {type(return_attn_probs).__name__}")


def group_rank_and_size(group: Optional[dist.ProcessGroup]) -> Tuple[int, int]:
    """(rank, world size) in ``group``; ``(0, 1)`` when torch.distributed is not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        if group is not None:
            raise ValueError("a process group was given but torch.distributed is not initialized")
        return 0, 1
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("this process is not a member of the given process group")
    return rank, dist.get_world_size(group)

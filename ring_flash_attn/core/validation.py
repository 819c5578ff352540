"""Input checks shared by the public functions: clear ``TypeError``/``ValueError`` for bad tensors,
``NotImplementedError`` for options this version does not compute, the process group, and the
opt-in cross-rank check of a call's arguments; :func:`validated_spec` runs the checks every family
shares on a call's :class:`~.spec.AttentionArgs` and builds its :class:`~.spec.CallSpec`."""

from __future__ import annotations

import math
import operator
import os
import weakref
import zlib
from datetime import timedelta
from typing import Dict, Optional, Tuple

import torch
import torch.distributed as dist

from .comm import all_gather_async
from .spec import AttentionArgs, CallSpec

Tensor = torch.Tensor
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
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    lead = () if not packed else (1,)  # a packed tensor read as a batch of one row (no view made)
    (b, s, h, d), (bk, sk, hk, dk) = (*lead, *q.shape), (*lead, *k.shape)
    if (b, s) != (bk, sk):
        raise ValueError(f"q {tuple(q.shape)} and k/v {tuple(k.shape)} differ in batch or sequence length")
    if d != dk:
        raise ValueError(f"q head dim {d} differs from k/v head dim {dk}")
    if d == 0 or h == 0 or hk == 0:
        raise ValueError(f"empty heads or head dim: q {tuple(q.shape)}, k {tuple(k.shape)}")
    if h % hk:
        raise ValueError(f"nheads ({h}) must be a multiple of nheads_k ({hk}) for GQA/MQA")


def kernel_ready(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its last dim is dense and no dim is broadcast (stride 0); otherwise a
    contiguous copy (gradients flow back through it). Some kernels -- PyTorch's CPU flash op among
    them -- silently misread other strides."""
    strides = t.stride()
    if strides[-1] == 1 and 0 not in strides:  # the usual case, answered without a loop
        return t
    dense = strides[-1] == 1 or t.shape[-1] == 1
    if dense and all(stride != 0 or size == 1 for size, stride in zip(t.shape, strides)):
        return t
    return t.contiguous()


def default_scale(q: Tensor, softmax_scale: Optional[float]) -> float:
    return q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)


def check_packed(x: torch.Tensor, name: str, dim: int, count: int, ndim: int) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != ndim or x.shape[dim] != count:
        raise ValueError(f"{name} must have {ndim} dims with size {count} at dim {dim}, got shape {tuple(x.shape)}")


def unpack(x: torch.Tensor, name: str, dim: int, count: int, ndim: int) -> Tuple[torch.Tensor, ...]:
    """The ``count`` tensors stacked along ``dim`` of a kv / qkv input, after :func:`check_packed`."""
    check_packed(x, name, dim, count, ndim)
    return x.unbind(dim)


def check_cu_seqlens(offsets: Tuple[int, ...], total_tokens: int, name: str = "cu_seqlens",
                     max_seqlen=None, max_name: str = "max_seqlen") -> None:
    """The host copy ``offsets`` of a cu_seqlens tensor: starts at 0, never decreases, ends at the
    ``total_tokens`` q holds; ``max_seqlen`` (when given) is an int at least the longest document
    (flash kernels size their work from it)."""
    if offsets[0] != 0 or any(b < a for a, b in zip(offsets[:-1], offsets[1:])):
        raise ValueError(f"{name} must start at 0 and never decrease, got {list(offsets)}")
    if offsets[-1] != total_tokens:
        raise ValueError(f"{name} ends at {offsets[-1]} but q holds {total_tokens} tokens")
    if max_seqlen is None:
        return
    max_seqlen = _as_int(max_seqlen, max_name)
    longest = max((b - a for a, b in zip(offsets[:-1], offsets[1:])), default=0)
    if max_seqlen < longest:
        raise ValueError(f"{max_name}={max_seqlen} is smaller than the longest document of {name} ({longest} tokens)")


def check_nonempty_pack(q: torch.Tensor) -> None:
    """The all-gather family needs tokens on every rank (an empty pack has nothing to attend)."""
    if q.shape[0] == 0:
        raise ValueError("the packed batch is empty (q has 0 tokens on this rank; cu_seqlens like [0, 0])")


def check_max_seqlen(max_seqlen, name: str) -> None:
    """A packed call's ``max_seqlen`` argument must be given (an int; it is checked against the
    longest document where the offsets are read)."""
    if max_seqlen is None or isinstance(max_seqlen, (bool, float, str)):
        raise TypeError(f"{name} must be an int (the longest document's length), got {max_seqlen!r}")


def _as_int(value, name: str) -> int:
    """An integer argument: Python / NumPy ints and 0-d integer tensors; floats and bools refused."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {value!r}") from None


def check_cu_seqlens_tensor(cu_seqlens: torch.Tensor) -> None:
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"cu_seqlens must be a 1-D int32 or int64 tensor [0, len0, len0+len1, ...], got {cu_seqlens.dtype} "
            f"shape {tuple(cu_seqlens.shape)}"
        )
    if cu_seqlens.device.type == "meta":
        raise ValueError("cu_seqlens is on the meta device: its values (the document boundaries) are needed")


def normalized_window(window_size) -> Tuple[int, int]:
    """flash-attn's ``window_size=(left, right)``: query i sees keys i-left .. i+right; -1 unbounded."""
    try:
        left, right = (_as_int(w, "window_size") for w in window_size)
    except (TypeError, ValueError):
        raise TypeError(f"window_size must be a pair of ints (left, right), got {window_size!r}") from None
    if left < -1 or right < -1:
        raise ValueError(f"window_size entries must be >= -1 (-1: unbounded), got {(left, right)}")
    return left, right


def check_options(dropout_p: float, softcap: float, return_attn_probs: bool, softmax_scale: Optional[float] = None,
                  causal: bool = False) -> None:
    """The scalar options' types and ranges."""
    if not isinstance(causal, (bool, int)) or causal not in (0, 1):
        raise TypeError(f"causal must be a bool, got {causal!r}")
    if softmax_scale is not None and (isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float))
                                      or not math.isfinite(softmax_scale) or softmax_scale <= 0):
        raise ValueError(f"softmax_scale must be a finite number > 0 (None: headdim ** -0.5), got {softmax_scale!r}")
    if not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be a number in [0, 1), got {dropout_p!r}")
    if not isinstance(softcap, (int, float)) or not 0 <= softcap < math.inf:  # not nan, inf (NaN logits)
        raise ValueError(f"softcap must be a finite number >= 0 (0: no soft-capping), got {softcap!r}")
    if not isinstance(return_attn_probs, bool):
        raise TypeError(f"return_attn_probs must be a bool, got {type(return_attn_probs).__name__}")


def check_alibi_slopes(slopes: Optional[torch.Tensor], q: torch.Tensor, batch: Optional[int]) -> None:
    """flash-attn's convention: float32 ``(nheads,)`` or, for a batch, ``(batch, nheads)``; q's device."""
    if slopes is None:
        return
    if not isinstance(slopes, torch.Tensor) or slopes.dtype != torch.float32:
        raise TypeError(f"alibi_slopes must be a float32 tensor, got {getattr(slopes, 'dtype', type(slopes))}")
    nheads = q.shape[-2]
    shapes = [(nheads,)] + ([(batch, nheads)] if batch is not None else [])
    if tuple(slopes.shape) not in shapes:
        raise ValueError(f"alibi_slopes must have shape {' or '.join(map(str, shapes))}, got {tuple(slopes.shape)}")
    if slopes.device != q.device:
        raise ValueError(f"alibi_slopes is on {slopes.device}, q on {q.device}")


def check_sinks(sinks: Optional[torch.Tensor], q: torch.Tensor) -> None:
    """Attention sinks: a floating ``(nheads,)`` tensor on q's device (any float dtype; learnable)."""
    if sinks is None:
        return
    if not isinstance(sinks, torch.Tensor) or not sinks.is_floating_point():
        raise TypeError(f"sinks must be a floating-point tensor, got {getattr(sinks, 'dtype', type(sinks))}")
    if tuple(sinks.shape) != (q.shape[-2],):
        raise ValueError(f"sinks must have shape (nheads,) = ({q.shape[-2]},), got {tuple(sinks.shape)}")
    if sinks.device != q.device:
        raise ValueError(f"sinks is on {sinks.device}, q on {q.device}")


def group_rank_and_size(group: Optional[dist.ProcessGroup]) -> Tuple[int, int]:
    """(rank, world size) in ``group``; ``(0, 1)`` when torch.distributed is not initialised and this
    process runs alone. Every public function passes its group through here; a group's answer is
    asked of torch once per group object (a default group made again is a new object).

    Args:
        group: the process group, or None for the default one.

    Raises:
        RuntimeError: no group is initialised but ``WORLD_SIZE`` (set by torchrun and other
            launchers) says this process is one of several: each would attend to its own shard only.
        ValueError: ``group`` is given without torch.distributed, or this process is not in it."""
    if not (dist.is_available() and dist.is_initialized()):
        if group is not None:
            raise ValueError("a process group was given but torch.distributed is not initialized")
        launched = _launched_world_size()
        if launched > 1:
            raise RuntimeError(
                f"ring_flash_attn: WORLD_SIZE={launched} (this process is one of {launched} that a launcher such as "
                f"torchrun started) but torch.distributed is not initialized, so each process would attend to its "
                f"own shard only. Call torch.distributed.init_process_group() before ring_flash_attn's functions "
                f"(or, for a single-process run, unset WORLD_SIZE or set it to 1).")
        return 0, 1
    group = group if group is not None else dist.group.WORLD
    compiling = torch.compiler.is_compiling()  # traced code asks torch (a cache would be guarded on)
    known = None if compiling else _GROUP_PLACES.get(id(group))
    if known is not None and known[0] is group:
        return known[1]
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("this process is not a member of the given process group")
    place = rank, dist.get_world_size(group)
    if not compiling:
        if len(_GROUP_PLACES) > 64:
            _GROUP_PLACES.clear()
        _GROUP_PLACES[id(group)] = (group, place)
    return place


_GROUP_PLACES: Dict[int, tuple] = {}  # id(group) -> (group, (rank, size)): asked once per group object


def _launched_world_size() -> int:
    """``WORLD_SIZE`` from the environment as an int (1 when unset or not a number)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def process_group_name(group: Optional[dist.ProcessGroup]) -> str:
    """The name a custom op finds ``group`` by (``""``: no communication, one rank), after checking
    that this process belongs to it (:func:`group_rank_and_size`). torch registers every group it
    creates under a name no other live group of this process has (and refuses a duplicate), and
    ``dist.get_rank`` refuses a group it has not registered, so the name leads back to ``group``.

    Args:
        group: the process group, or None for the default one."""
    group_rank_and_size(group)
    if not (dist.is_available() and dist.is_initialized()):
        return ""
    return (group if group is not None else dist.group.WORLD).group_name


def resolve_group(name: str) -> Optional[dist.ProcessGroup]:
    """The process group of :func:`process_group_name` (None for ``""``)."""
    return dist.distributed_c10d._resolve_process_group(name) if name else None


CHECK_ENV = "RING_FLASH_ATTN_CHECK"
CHECK_TIMEOUT_ENV = "RING_FLASH_ATTN_CHECK_TIMEOUT"
_SIGNATURE_SLOTS = 24  # fixed, so a forward's signature and a backward's can meet in one all-gather


def call_signature(kind: str, layout: str, q: torch.Tensor, k: torch.Tensor, causal: bool,
                   softmax_scale: Optional[float], **options) -> Dict[str, object]:
    """What every rank of one forward call must agree on, by name (shapes, dtype, layout, options,
    whether a backward will follow)."""
    needs_backward = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k))
    return {"call": f"{kind} forward", "layout": layout, "dtype": str(q.dtype).replace("torch.", ""),
            "causal": bool(causal), "softmax_scale": softmax_scale, "q.shape": tuple(q.shape),
            "k.shape": tuple(k.shape), "backward follows": needs_backward, **options}


def backward_signature(dout: Optional[torch.Tensor], lse_used: bool) -> Dict[str, object]:
    """What every rank of one backward call must agree on."""
    return {"call": "backward", "dout.shape": None if dout is None else tuple(dout.shape),
            "loss uses lse": lse_used}


def checking_calls() -> bool:
    return os.environ.get(CHECK_ENV) == "1" and dist.is_available() and dist.is_initialized()


def _encoded(fields: Dict[str, object]) -> torch.Tensor:
    """The fields as a fixed-size int64 vector: a hash of the names, then one hash per value."""
    codes = [zlib.crc32(repr(list(fields)).encode())] + [zlib.crc32(repr(v).encode()) for v in fields.values()]
    if len(codes) > _SIGNATURE_SLOTS:
        raise AssertionError(f"call signature has {len(codes)} fields, room for {_SIGNATURE_SLOTS}")
    return torch.tensor(codes + [0] * (_SIGNATURE_SLOTS - len(codes)), dtype=torch.int64)


def check_same_call_across_group(group: Optional[dist.ProcessGroup], device: torch.device,
                                 fields: Dict[str, object]) -> None:
    """Opt-in (``RING_FLASH_ATTN_CHECK=1``): compare this call's signature (forward or backward) with
    every rank's before any hop. Ranks that disagree all raise the same ``ValueError``, which names
    each differing field with every rank's value, and the group stays usable; a rank that never makes
    the call (or runs something else) turns into a ``RuntimeError`` after
    ``RING_FLASH_ATTN_CHECK_TIMEOUT`` seconds (default 60), after which the group holds a pending
    collective and is not usable. Cost: one all-gather of 24 int64 per forward and per backward."""
    if not checking_calls():
        return
    world = dist.get_world_size(group)
    if dist.get_backend(group) != "nccl":
        device = torch.device("cpu")
    mine = _encoded(fields).to(device)
    every = torch.empty(world * mine.numel(), dtype=torch.int64, device=device)
    work = all_gather_async(every, mine, group)
    timeout = float(os.environ.get(CHECK_TIMEOUT_ENV, "60"))
    try:
        work.wait(timeout=timedelta(seconds=timeout))
    except RuntimeError as err:
        raise RuntimeError(
            f"ring_flash_attn: not every rank of the group reached this attention call ({fields['call']}) within "
            f"{timeout:.0f}s (a rank skipped the call, or is stuck elsewhere): {err}"
        ) from err
    rows = every.view(world, -1).cpu()
    if bool((rows == rows[0]).all()):
        return
    readable: list = [None] * world
    dist.all_gather_object(readable, fields, group=group)  # every rank is here: the values, by name
    names = list(dict.fromkeys(name for f in readable for name in f))
    differing = [n for n in names if len({repr(f.get(n, "<absent>")) for f in readable}) > 1]
    hint = ""
    if "call" in differing:  # a forward met a backward (or another family): the rest is noise
        differing = ["call"]
        hint = (" (a rank skipped or added an attention call or its backward; calls with equal arguments "
                "cannot be told apart, so the skip may lie one call earlier)")
    table = "; ".join(f"{n}: {[f.get(n, '<absent>') for f in readable]}" for n in differing)
    raise ValueError(f"ring_flash_attn: the ranks made different attention calls (values per rank) -- {table}{hint}")


_HOST_OFFSETS: dict = {}


def host_offsets(cu_seqlens: Tensor) -> Tuple[int, ...]:
    """``cu_seqlens`` as host ints. A CPU tensor is read at every call (free, and no write to it --
    through ``.data``, NumPy or shared storage -- can go unseen). Reading a GPU tensor syncs, so its
    answer is remembered for the same tensor object while its version counter is unchanged: every
    layer of a model can pass the same cu_seqlens and only the first call pays (writes that bypass
    the version counter are not seen there)."""
    if cu_seqlens.device.type == "cpu":
        return tuple(cu_seqlens.tolist())  # an integer tensor's tolist() gives Python ints
    key = id(cu_seqlens)
    hit = _HOST_OFFSETS.get(key)
    if hit is not None and hit[0]() is cu_seqlens and hit[1] == cu_seqlens._version:
        return hit[2]
    offsets = tuple(cu_seqlens.tolist())
    if len(_HOST_OFFSETS) > 256:
        _HOST_OFFSETS.clear()
    _HOST_OFFSETS[key] = (weakref.ref(cu_seqlens), cu_seqlens._version, offsets)
    return offsets


def check_balanced_tokens(offsets: Tuple[int, ...], local_tokens: int, rank: int, world_size: int) -> None:
    """The balanced layout's local token count: ``total // W`` of the pack with *global* ``offsets``,
    whose total must be a multiple of ``W``."""
    total = offsets[-1]
    if total % world_size:
        raise ValueError(f"the balanced layout needs the packed batch's total ({total} tokens, the global "
                         f"cu_seqlens' last entry) to be a multiple of the world size {world_size}; pad the pack "
                         "at its end (ring_flash_attn.layouts.pad_pack)")
    if local_tokens != total // world_size:
        raise ValueError(f"rank {rank} holds {local_tokens} tokens, but the balanced layout gives every rank "
                         f"{total // world_size} of the global cu_seqlens' {total}: pass the global cu_seqlens (the "
                         "whole pack's, the same on every rank) and this rank's tokens from "
                         "ring_flash_attn.layouts.shard_varlen(x, cu_seqlens, 'balanced', rank, world_size)")


def validated_spec(kind: str, layout: str, q: Tensor, k: Tensor, args: AttentionArgs, group_name: str,
                   documents: Optional[Tensor] = None, agreed: Optional[Dict[str, object]] = None,
                   **family_fields) -> CallSpec:
    """The checks every family shares, then the call's :class:`~.spec.CallSpec`.

    Checks ``args``' scalar options, ALiBi slopes (per batch row too where q is ``(B, S, H, D)``),
    sinks and window; with ``RING_FLASH_ATTN_CHECK=1``, that every rank of the group named
    ``group_name`` makes the same ``kind`` of call on ``layout``: shapes, options, the family's own
    ``agreed`` fields and, when given, the global cu_seqlens ``documents`` (read on the host only
    then). ``family_fields``: the spec's fields after ``group``, by name (those left out keep their
    defaults)."""
    dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic, return_attn_probs, _, \
        backend, sinks = args
    check_options(dropout_p, softcap, return_attn_probs, softmax_scale, causal)
    check_alibi_slopes(alibi_slopes, q, batch=q.shape[0] if q.dim() == 4 else None)
    check_sinks(sinks, q)
    window = normalized_window(window_size)
    if checking_calls():
        check_same_call_across_group(resolve_group(group_name), q.device, call_signature(
            kind, layout, q, k, causal, softmax_scale, **_agreed_options(args, window, documents, agreed)))
    return CallSpec(layout, bool(causal), window[0], window[1], default_scale(q, softmax_scale), float(softcap),
                    float(dropout_p), bool(deterministic), backend or "", group_name, **family_fields)


def _agreed_options(args: AttentionArgs, window: Tuple[int, int], documents: Optional[Tensor],
                    agreed: Optional[Dict[str, object]]) -> Dict[str, object]:
    """The options of :func:`validated_spec`'s cross-rank check, by name, after the shapes."""
    options = {"window_size": window, "softcap": args.softcap, "dropout_p": args.dropout_p,
               "alibi": args.alibi_slopes is not None, "sinks": args.sinks is not None, **(agreed or {})}
    if documents is not None:  # a packed layout's global cu_seqlens: the same on every rank
        options["cu_seqlens"] = host_offsets(documents)
    return options

"""The attention test case: one type for batch calls, packed documents (varlen) and Ulysses /
Ulysses x ring calls, with one entry point each for its inputs (same on every process, from its
seed), what a rank runs, the float64 reference on the whole sequence, and the tolerance check.

A case is *packed* when it has ``documents`` (the global document lengths; q, k, v are ``(T, H, D)``
packs, every varlen family: ring / zigzag / stripe / zigzag_llama3 / balanced per document, llama3 /
packed_zigzag / balanced_llama3 over the whole pack), a *batch* case otherwise (``(B, S, H, D)``,
``local_len`` tokens per rank). With ``ulysses_degree = U > 0`` it runs through the ``ulysses_*``
functions, its layout the ring layout and its world ``W = U x R``.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

import ring_flash_attn as rfa
from helpers.attention_cases import (DTYPES, alibi_bias, alibi_slopes, as_view, compare, mask, nonfinite_rows,
                                     poison_id, public_function, put_together, results_on_cpu, sink_logits,
                                     soft_capped, with_sink_column)
from ring_flash_attn.allgather.api import packed_allgather
from ring_flash_attn.core.spec import AttentionArgs
from ring_flash_attn.layouts import local_cu_seqlens, shard_varlen, unshard_varlen

Poison = Tuple[Tuple[str, int, int, float], ...]
_GROUPS: Dict[tuple, rfa.UlyssesRingGroups] = {}  # per worker process: groups are made once per (U, R)


@dataclass(frozen=True)
class Case:
    layout: str
    packing: str  # "func", "kvpacked" or "qkvpacked"
    causal: bool
    dtype: str
    backend: str
    world_size: int
    batch: int = 2  # batch cases: rows, and tokens per rank
    local_len: int = 8
    documents: Optional[Tuple[int, ...]] = None  # packed (varlen) cases: the global document lengths
    heads_k_stride: Optional[int] = None  # packed all-gather family
    ulysses_degree: int = 0  # > 0: the ulysses_* functions, ring degree world_size // ulysses_degree
    head_chunks: int = 2  # Ulysses cases
    nheads: int = 4
    nheads_k: int = 4
    head_dim: int = 32
    return_lse: bool = True
    softmax_scale: Optional[float] = None
    seed: int = 0
    device: str = "cpu"  # "cuda": rank r runs on GPU r (NCCL)
    q_scale: float = 1.0  # > 1: large logits (bf16 near overflow)
    window: Tuple[int, int] = (-1, -1)  # window_size (left, right)
    softcap: float = 0.0
    alibi: bool = False  # ALiBi slopes alibi_slopes(nheads), per batch row in batch cases
    deterministic: bool = False
    poison: Poison = ()  # (q/k/v, token, head, value) in batch row 0 or the pack (token and head modulo the sizes)
    view: str = ""  # q, k, v passed as strided views of the same values: a key of attention_cases.VIEWS
    lse_grad: bool = False  # the loss uses lse too: <out, dout> + <lse, dlse>
    sinks: bool = False  # attention sinks (nheads,) float32 (float64 for fp64 cases), learnable

    @property
    def packed(self) -> bool:
        return self.documents is not None

    @property
    def seqlen(self) -> int:
        """Global tokens: the whole sequence of a batch row, or the whole pack."""
        return sum(self.documents) if self.packed else self.local_len * self.world_size

    @property
    def ring_degree(self) -> int:
        return self.world_size // self.ulysses_degree if self.ulysses_degree else self.world_size

    @property
    def cu_seqlens(self) -> torch.Tensor:
        return torch.tensor([0, *torch.tensor(self.documents).cumsum(0).tolist()], dtype=torch.int32)

    def id(self) -> str:
        grid = f"-U{self.ulysses_degree}xR{self.ring_degree}-chunks{self.head_chunks}" if self.ulysses_degree else ""
        options = "" if self.window == (-1, -1) else f"-win{self.window[0]}_{self.window[1]}"
        options += f"-cap{self.softcap:g}" if self.softcap else ""
        options += f"-scale{self.softmax_scale:g}" if self.softmax_scale is not None else ""
        options += "-alibi" if self.alibi else ""
        options += "-det" if self.deterministic else ""
        options += poison_id(self.poison) + (f"-{self.view}" if self.view else "") + ("-dlse" if self.lse_grad else "")
        options += "-sinks" if self.sinks else ""
        return (f"{self.device}-W{self.world_size}{grid}-{self.layout}-{self.packing}-"
                f"{'causal' if self.causal else 'full'}{options}-{self.dtype}-h{self.nheads}k{self.nheads_k}-"
                f"d{self.head_dim}-{self._shape_id()}-{self.backend}")

    def _shape_id(self) -> str:
        if not self.packed:
            return f"b{self.batch}-L{self.local_len}"
        docs = "-".join(map(str, self.documents)) if len(self.documents) <= 4 else f"{len(self.documents)}docs"
        return f"docs{docs}" + (f"-s{self.heads_k_stride}" if self.heads_k_stride else "")


# ---- documents a call accepts -----------------------------------------------------------------------

def fit_documents(layout: str, world_size: int, lengths: Tuple[int, ...]) -> Tuple[int, ...]:
    """``lengths`` made acceptable to the layout: zigzag_llama3 rounds every document up to a multiple
    of 2W; the balanced layouts get an end-padding document (``pad_pack``); the whole-pack layouts
    lengthen the last one until the pack splits (llama3: W equal parts, packed_zigzag: 2W chunks)."""
    if layout == "zigzag_llama3":
        return tuple(n + (-n) % (2 * world_size) for n in lengths)
    if layout in ("balanced", "balanced_llama3"):
        return lengths + ((-sum(lengths) % world_size,) if sum(lengths) % world_size else ())
    unit = world_size * (2 if layout == "packed_zigzag" else 1)
    return (*lengths[:-1], lengths[-1] + (-sum(lengths)) % unit)


def packed_lengths(layout: str, ulysses_degree: int, ring_degree: int, rng: random.Random, single: bool) -> tuple:
    """Random document lengths a packed Ulysses x ring call accepts: per-document ring layouts split
    every document over the ring ranks, whole-pack layouts any lengths (length-1 documents too); the
    pack's total a multiple of the world size (twice that for packed_zigzag)."""
    world_size = ulysses_degree * ring_degree
    if layout in ("ring", "zigzag", "stripe", "zigzag_llama3"):
        unit = ring_degree * (2 if "zigzag" in layout else 1)
        counts = [rng.randint(2, 6)] if single else [rng.choice([1, 1, 2, 3, 5]) for _ in range(rng.randint(2, 5))]
        lengths = [unit * c for c in counts]
    else:
        unit = 1
        lengths = [rng.randint(3, 8)] if single else [rng.choice([1, 1, 2, 3, 7, 11]) for _ in range(rng.randint(2, 7))]
    total_unit = world_size * (2 if layout == "packed_zigzag" else 1)
    while sum(lengths) % total_unit:
        lengths[-1] += unit
    return tuple(lengths)


def groups(ulysses_degree: int, world_size: int) -> rfa.UlyssesRingGroups:
    """The Ulysses x ring groups of the whole world, made once per worker process and (U, R)."""
    key = (ulysses_degree, world_size // ulysses_degree)
    if key not in _GROUPS:
        _GROUPS[key] = rfa.make_ulysses_ring_groups(*key)
    return _GROUPS[key]


# ---- inputs ---------------------------------------------------------------------------------------

def global_inputs(case: Case) -> Dict[str, torch.Tensor]:
    """q, k, v, dout (and dlse, sinks) on the whole sequence in the case's dtype, identical on every
    process: ``(B, S, heads, D)`` (dlse ``(B, H, S)``), packed ``(T, heads, D)`` (dlse ``(H, T)``)."""
    gen = torch.Generator().manual_seed(case.seed)
    dtype, rows = DTYPES[case.dtype], (case.seqlen,) if case.packed else (case.batch, case.seqlen)

    def randn(heads: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*rows, heads, case.head_dim, generator=gen, dtype=torch.float64) * scale).to(dtype)

    x = {"q": randn(case.nheads, case.q_scale), "k": randn(case.nheads_k), "v": randn(case.nheads_k),
         "dout": randn(case.nheads)}
    if case.lse_grad:
        x["dlse"] = (torch.randn(case.nheads, case.seqlen, generator=gen) if case.packed else
                     torch.randn(case.batch, case.nheads, case.seqlen, generator=gen, dtype=torch.float64).to(dtype).float())
    if case.sinks:
        x["sinks"] = sink_logits(gen, case.nheads, case.dtype)
    for name, token, head, value in case.poison:
        target = x[name] if case.packed else x[name][0]
        target[token % case.seqlen, head % target.shape[1], 0] = value
    return x


def allowed_pairs(case: Case) -> torch.Tensor:
    """(S, S) boolean over the whole sequence (or pack): query i sees key j, never across documents."""
    allowed = mask(case.seqlen, case.causal, case.window)
    if case.packed:
        doc = torch.repeat_interleave(torch.arange(len(case.documents)), torch.tensor(case.documents))
        allowed &= doc[:, None] == doc[None, :]
    return allowed


def _ulysses_degree(case: Case) -> int:
    return max(case.ulysses_degree, 1)


def _shard(case: Case, name: str, x: torch.Tensor, rank: int) -> torch.Tensor:
    """This rank's part of an input (the sinks are whole on every rank)."""
    if name == "sinks":
        return x
    if case.packed:
        return shard_varlen(x, case.cu_seqlens, case.layout, rank, case.world_size, dim=1 if name == "dlse" else 0,
                            ulysses_degree=_ulysses_degree(case))
    return rfa.shard(x, case.layout, rank, case.world_size, dim=2 if name == "dlse" else 1,
                     ulysses_degree=_ulysses_degree(case))


def gathered(case: Case, per_rank: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """Every rank's shards put back into whole-sequence tensors."""
    u = _ulysses_degree(case)
    if case.packed:
        return put_together(per_rank, lambda n, parts: unshard_varlen(parts, case.cu_seqlens, case.layout,
                                                                      dim=1 if n == "lse" else 0, ulysses_degree=u))
    return put_together(per_rank, lambda n, parts: rfa.unshard(parts, case.layout, dim=2 if n == "lse" else 1,
                                                               ulysses_degree=u))


# ---- what a rank runs -----------------------------------------------------------------------------

def _options(case: Case, device: torch.device, group, sinks: Optional[torch.Tensor]) -> dict:
    """The keyword arguments of the case's call; options left at their default are not passed."""
    kwargs = dict(causal=case.causal, return_attn_probs=case.return_lse, group=group, backend=case.backend)
    if case.softmax_scale is not None:
        kwargs["softmax_scale"] = case.softmax_scale
    if case.window != (-1, -1):
        kwargs["window_size"] = case.window
    if case.softcap:
        kwargs["softcap"] = case.softcap
    if case.deterministic:
        kwargs["deterministic"] = True
    if case.alibi:
        kwargs["alibi_slopes"] = alibi_slopes(case.nheads, None if case.packed else case.batch).to(device)
    if sinks is not None:
        kwargs["sinks"] = sinks
    return kwargs


def _call_batch(case: Case, rank: int, leaves: tuple, first: tuple, kwargs: dict):
    """The layout's batch function."""
    return public_function(case.layout, case.packing)(*first, **kwargs)


def _unpacked(packing: str, leaves: tuple) -> tuple:
    """q, k, v of packed leaves ``(T, [2 | 3,] H, D)``."""
    if packing == "kvpacked":
        return (leaves[0], *leaves[1].unbind(1))
    return leaves[0].unbind(1) if packing == "qkvpacked" else leaves


def _call_packed(case: Case, rank: int, leaves: tuple, first: tuple, kwargs: dict):
    """The varlen families, each with the cu_seqlens / max_seqlen arguments it takes."""
    w, cu = case.world_size, case.cu_seqlens.to(leaves[0].device)
    if case.layout in rfa.LAYOUTS:
        local_cu = local_cu_seqlens(cu, case.layout, w)
        max_len = int((local_cu[1:] - local_cu[:-1]).max())
        return public_function(case.layout, case.packing, varlen=True)(*first, local_cu, max_len, **kwargs)
    if case.layout == "packed_zigzag":  # the model adapter's layout for packed batches (no public function)
        return packed_allgather("packed_zigzag", *_unpacked(case.packing, leaves), cu, AttentionArgs(**kwargs),
                                case.heads_k_stride)
    fn = public_function(case.layout, case.packing, varlen=True)
    if case.layout == "balanced":  # the ring family with the global cu_seqlens
        return fn(*first, cu, max(case.documents), **kwargs)
    if case.layout == "llama3":
        prepared = rfa.llama3_flash_attn_prepare_cu_seqlens(cu, case.causal, rank, w)
        return fn(*first, *prepared[:4], case.heads_k_stride or case.nheads_k, prepared[4], **kwargs)
    return fn(*first, cu, max(case.documents), heads_k_stride=case.heads_k_stride, **kwargs)


def _call_ulysses(case: Case, rank: int, leaves: tuple, first: tuple, kwargs: dict):
    """ulysses_flash_attn_(varlen_)*, the case's layout as the ring layout (packed: the global cu_seqlens)."""
    cu = (case.cu_seqlens.to(leaves[0].device), max(case.documents)) if case.packed else ()
    fn = public_function("ulysses", case.packing, varlen=case.packed)
    return fn(*first, *cu, ring_layout=case.layout, head_chunks=case.head_chunks, **kwargs)


def run_rank(rank: int, world_size: int, case: Case,
             group: Optional[rfa.UlyssesRingGroups] = None) -> Dict[str, torch.Tensor]:
    """This rank's shard of out (and lse) and of the input gradients, on the CPU. ``group``: the
    Ulysses x ring groups of a Ulysses case (default ``make_ulysses_ring_groups`` of the whole world)."""
    assert world_size == case.world_size, (world_size, case.world_size)
    device = torch.device("cuda", rank) if case.device == "cuda" else torch.device("cpu")
    x = {name: _shard(case, name, t, rank).to(device) for name, t in global_inputs(case).items()}
    q, k, v = (x[n].requires_grad_() for n in "qkv")
    sinks = x["sinks"].requires_grad_() if case.sinks else None
    pack_dim = 1 if case.packed else 2
    if case.packing == "func":
        leaves, first = (q, k, v), as_view(case, q, k, v)
    elif case.packing == "kvpacked":
        leaves = first = (q, torch.stack([k, v], dim=pack_dim).detach().requires_grad_())
    else:
        leaves = first = (torch.stack([q, k, v], dim=pack_dim).detach().requires_grad_(),)
    if case.ulysses_degree:
        call, comm = _call_ulysses, group or groups(case.ulysses_degree, world_size)
    else:
        call, comm = (_call_packed if case.packed else _call_batch), dist.group.WORLD if world_size > 1 else None
    result = call(case, rank, leaves, first, _options(case, device, comm, sinks))
    out, lse = (result[0], result[1]) if case.return_lse else (result, None)
    _check_outputs(case, q, out, lse, result[2] if case.return_lse else None)
    return results_on_cpu(out, lse, leaves, x["dout"], case.packing, pack_dim=pack_dim, dlse=x.get("dlse"),
                          sinks=sinks)


def _check_outputs(case: Case, q: torch.Tensor, out: torch.Tensor, lse: Optional[torch.Tensor], probs) -> None:
    """out as q; lse ``(..., H, local tokens)`` in float32 (float64 for fp64 cases); no attention probs."""
    assert probs is None
    assert out.dtype == q.dtype and out.shape == q.shape, (out.dtype, out.shape)
    if lse is not None:
        assert lse.dtype == (torch.float64 if case.dtype == "fp64" else torch.float32), lse.dtype
        assert lse.shape == (*q.shape[:-3], case.nheads, q.shape[-3]), lse.shape


def run_twice(rank: int, world_size: int, case: Case) -> Dict[str, torch.Tensor]:
    """:func:`run_rank` twice: the first run's results, the second's as ``<name>_again``."""
    first = run_rank(rank, world_size, case)
    first.update({f"{name}_again": t for name, t in run_rank(rank, world_size, case).items()})
    return first


# ---- the reference and the check -------------------------------------------------------------------

def reference(case: Case) -> Dict[str, torch.Tensor]:
    """float64 attention on the unsharded sequence (never across a document), with autograd: out, lse,
    dq, dk, dv (and dsinks), of the inputs without the case's NaN / Inf (see ``compare``)."""
    x = {n: t.double() for n, t in global_inputs(dataclasses.replace(case, poison=())).items()}
    if case.packed:  # a batch of one row
        x.update({n: x[n][None] for n in ("q", "k", "v", "dout", "dlse") if n in x})
    q, k, v = (x[n].requires_grad_() for n in "qkv")
    g, s = case.nheads // case.nheads_k, case.seqlen
    scale = case.softmax_scale if case.softmax_scale is not None else case.head_dim ** -0.5
    scores = soft_capped(torch.einsum("bihd,bjhd->bhij", q, k.repeat_interleave(g, dim=2)) * scale, case.softcap)
    if case.alibi:
        scores = scores + alibi_bias(alibi_slopes(case.nheads, None if case.packed else case.batch), torch.arange(s))
    scores = scores.masked_fill(~allowed_pairs(case), float("-inf"))
    sinks = x["sinks"].requires_grad_() if case.sinks else None
    scores = with_sink_column(scores, sinks)
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.einsum("bhij,bjhd->bihd", torch.softmax(scores, dim=-1)[..., :s], v.repeat_interleave(g, dim=2))
    loss = (out * x["dout"]).sum() + ((lse * x["dlse"]).sum() if case.lse_grad else 0)
    grads = torch.autograd.grad(loss, (q, k, v) + ((sinks,) if case.sinks else ()))
    result = dict(out=out.detach(), lse=lse.detach(), dq=grads[0], dk=grads[1], dv=grads[2])
    if case.packed:
        result = {n: t[0] for n, t in result.items()}
    if case.sinks:
        result["dsinks"] = grads[3]
    return result


def nonfinite(case: Case) -> Optional[Dict[str, torch.Tensor]]:
    """The rows that must come out non-finite (``nonfinite_rows``), or None for a case without NaN / Inf."""
    if not case.poison:
        return None
    x = global_inputs(case)
    q, k, v = (x[n][None] if case.packed else x[n] for n in "qkv")
    rows = nonfinite_rows(allowed_pairs(case), q, k, v)
    return {name: t[0] for name, t in rows.items()} if case.packed else rows


def check(case: Case, per_rank: List[Dict[str, torch.Tensor]], allowance=None) -> Dict[str, float]:
    """Every rank's shards, put together, against the float64 reference on the whole sequence."""
    return compare(case.id(), gathered(case, per_rank), reference(case), case.dtype, case.q_scale, allowance,
                   nonfinite(case))


def single_device(case: Case) -> Case:
    """The same problem on one process, without Ulysses (what the distributed call must match)."""
    local_len = case.local_len if case.packed else case.local_len * case.world_size
    return dataclasses.replace(case, world_size=1, local_len=local_len, ulysses_degree=0)

"""Packed-sequence (varlen) test cases: inputs of a packed batch of documents, what each rank runs
for every varlen family (ring / zigzag / stripe / zigzag_llama3 per document, llama3 / packed_zigzag
over the whole pack), and the float64 per-document reference on the unsharded batch."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

import ring_flash_attn as rfa
from helpers.attention_cases import (DTYPES, alibi_bias, alibi_slopes, as_view, compare, mask, nonfinite_rows, poison_id,
                                     public_function, put_together, results_on_cpu, sink_logits, soft_capped,
                                     with_sink_column)
from ring_flash_attn.allgather.api import packed_allgather
from ring_flash_attn.core.spec import AttentionArgs
from ring_flash_attn.layouts import local_cu_seqlens, shard_varlen, unshard_varlen


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



@dataclass(frozen=True)
class VarlenCase:
    layout: str
    packing: str
    causal: bool
    dtype: str
    backend: str
    world_size: int
    doc_lengths: Tuple[int, ...]
    nheads: int = 4
    nheads_k: int = 2
    head_dim: int = 32
    heads_k_stride: Optional[int] = None
    return_lse: bool = True
    seed: int = 0
    device: str = "cpu"
    q_scale: float = 1.0  # > 1: large logits (bf16 near overflow)
    softcap: float = 0.0
    window: Tuple[int, int] = (-1, -1)
    alibi: bool = False  # ALiBi slopes attention_cases.alibi_slopes(nheads)
    poison: Tuple[Tuple[str, int, int, float], ...] = ()  # (q/k/v, token of the pack, head, value), modulo the sizes
    view: str = ""  # q, k, v passed as strided views: a key of attention_cases.VIEWS
    lse_grad: bool = False  # the loss uses lse too: <out, dout> + <lse, dlse>
    sinks: bool = False  # attention sinks, as attention_cases.Case.sinks
    deterministic: bool = False

    @property
    def cu_seqlens(self) -> torch.Tensor:
        return torch.tensor([0, *torch.tensor(self.doc_lengths).cumsum(0).tolist()], dtype=torch.int32)

    def id(self) -> str:
        docs = "-".join(map(str, self.doc_lengths)) if len(self.doc_lengths) <= 4 else f"{len(self.doc_lengths)}docs"
        stride = f"-s{self.heads_k_stride}" if self.heads_k_stride else ""
        stride += f"-cap{self.softcap:g}" if self.softcap else ""
        stride += f"-win{self.window[0]}_{self.window[1]}" if self.window != (-1, -1) else ""
        stride += "-alibi" if self.alibi else ""
        stride += poison_id(self.poison) + (f"-{self.view}" if self.view else "") + ("-dlse" if self.lse_grad else "")
        stride += "-sinks" if self.sinks else ""
        stride += "-det" if self.deterministic else ""
        return (f"{self.device}-W{self.world_size}-{self.layout}-{self.packing}-{'causal' if self.causal else 'full'}-"
                f"{self.dtype}-h{self.nheads}k{self.nheads_k}-d{self.head_dim}{stride}-docs{docs}-{self.backend}")


def global_inputs(case: VarlenCase) -> Dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(case.seed)
    t, dtype = sum(case.doc_lengths), DTYPES[case.dtype]

    def randn(h, scale=1.0):
        return (torch.randn(t, h, case.head_dim, generator=gen, dtype=torch.float64) * scale).to(dtype)

    x = {"q": randn(case.nheads, case.q_scale), "k": randn(case.nheads_k), "v": randn(case.nheads_k),
         "dout": randn(case.nheads)}
    if case.lse_grad:
        x["dlse"] = torch.randn(case.nheads, t, generator=gen)
    if case.sinks:
        x["sinks"] = sink_logits(gen, case.nheads, case.dtype)
    for name, token, head, value in case.poison:
        x[name][token % t, head % x[name].shape[1], 0] = value
    return x


def allowed_pairs(case: VarlenCase) -> torch.Tensor:
    """(T, T) boolean over the whole pack: query i sees key j."""
    lengths = torch.tensor(case.doc_lengths)
    doc = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
    return (doc[:, None] == doc[None, :]) & mask(len(doc), case.causal, case.window)


def _call(case: VarlenCase, rank: int, q, k, v, kv, qkv, sinks=None):
    """Run the case's public function on this rank's shard (one of q/k/v, kv or qkv packings)."""
    w, cu, group = case.world_size, case.cu_seqlens.to(q.device), dist.group.WORLD if case.world_size > 1 else None
    common = dict(causal=case.causal, return_attn_probs=case.return_lse, group=group, backend=case.backend)
    if sinks is not None:
        common["sinks"] = sinks
    if case.softcap:
        common["softcap"] = case.softcap
    if case.window != (-1, -1):
        common["window_size"] = case.window
    if case.alibi:
        common["alibi_slopes"] = alibi_slopes(case.nheads).to(q.device)
    if case.deterministic:
        common["deterministic"] = True
    first = {"func": as_view(case, q, k, v), "kvpacked": (q, kv), "qkvpacked": (qkv,)}[case.packing]
    if case.layout in rfa.LAYOUTS:
        fn = public_function(case.layout, case.packing, varlen=True)
        local_cu = local_cu_seqlens(cu, case.layout, w)
        max_len = int((local_cu[1:] - local_cu[:-1]).max())
        return fn(*first, local_cu, max_len, **common)
    if case.layout == "packed_zigzag":  # the model adapter's layout for packed batches (no public function)
        unpacked = {"func": (q, k, v), "kvpacked": (q, *kv.unbind(1)) if kv is not None else None,
                    "qkvpacked": qkv.unbind(1) if qkv is not None else None}[case.packing]
        return packed_allgather("packed_zigzag", *unpacked, cu, AttentionArgs(**common), case.heads_k_stride)
    fn = public_function(case.layout, case.packing, varlen=True)
    if case.layout == "balanced":  # the ring family with the global cu_seqlens
        return fn(*first, cu, max(case.doc_lengths), **common)
    if case.layout == "llama3":
        prepared = rfa.llama3_flash_attn_prepare_cu_seqlens(cu, case.causal, rank, w)
        stride = case.heads_k_stride or case.nheads_k
        return fn(*first, *prepared[:4], stride, prepared[4], **common)
    return fn(*first, cu, max(case.doc_lengths), heads_k_stride=case.heads_k_stride, **common)


def run_rank(rank: int, world_size: int, case: VarlenCase) -> Dict[str, torch.Tensor]:
    assert world_size == case.world_size
    device = torch.device("cuda", rank) if case.device == "cuda" else torch.device("cpu")
    x = {n: t if n == "sinks" else shard_varlen(t, case.cu_seqlens, case.layout, rank, world_size,
                                                 dim=1 if n == "dlse" else 0)
         for n, t in global_inputs(case).items()}
    x = {n: t.to(device) for n, t in x.items()}
    sinks = x["sinks"].requires_grad_() if case.sinks else None
    q, k, v = (x[n].requires_grad_() for n in "qkv")
    kv = torch.stack([k, v], 1).detach().requires_grad_() if case.packing == "kvpacked" else None
    qkv = torch.stack([q, k, v], 1).detach().requires_grad_() if case.packing == "qkvpacked" else None
    result = _call(case, rank, q, k, v, kv, qkv, sinks)
    out, lse = (result[0], result[1]) if case.return_lse else (result, None)
    leaves = {"func": (q, k, v), "kvpacked": (q, kv), "qkvpacked": (qkv,)}[case.packing]
    if lse is not None:
        assert lse.shape == (case.nheads, q.shape[0]), lse.shape
    return results_on_cpu(out, lse, leaves, x["dout"], case.packing, pack_dim=1, dlse=x.get("dlse"), sinks=sinks)


def reference(case: VarlenCase) -> Dict[str, torch.Tensor]:
    """float64 attention of the whole packed batch, never crossing a document boundary (of the inputs
    without the case's NaN / Inf)."""
    x = {n: t.double().requires_grad_(n in "qkv")
         for n, t in global_inputs(dataclasses.replace(case, poison=())).items()}
    q, k, v = x["q"], x["k"], x["v"]
    g = case.nheads // case.nheads_k
    allowed = allowed_pairs(case)
    scores = soft_capped(torch.einsum("ihd,jhd->hij", q, k.repeat_interleave(g, 1)) * case.head_dim ** -0.5,
                         case.softcap)
    if case.alibi:
        scores = scores + alibi_bias(alibi_slopes(case.nheads), torch.arange(allowed.shape[0]))
    scores = scores.masked_fill(~allowed, float("-inf"))
    sinks = x["sinks"].requires_grad_() if case.sinks else None
    scores = with_sink_column(scores, sinks)
    out = torch.einsum("hij,jhd->ihd", torch.softmax(scores, -1)[..., :allowed.shape[0]], v.repeat_interleave(g, 1))
    lse = torch.logsumexp(scores, -1)
    loss = (out * x["dout"]).sum() + ((lse * x["dlse"]).sum() if case.lse_grad else 0)
    grads = torch.autograd.grad(loss, (q, k, v) + ((sinks,) if case.sinks else ()))
    result = dict(out=out.detach(), lse=lse.detach(), dq=grads[0], dk=grads[1], dv=grads[2])
    if case.sinks:
        result["dsinks"] = grads[3]
    return result


def check(case: VarlenCase, per_rank: List[Dict[str, torch.Tensor]], allowance=None) -> Dict[str, float]:
    got = put_together(per_rank, lambda name, parts: unshard_varlen(parts, case.cu_seqlens, case.layout,
                                                                    dim=1 if name == "lse" else 0))
    nonfinite = None
    if case.poison:
        x = global_inputs(case)
        rows = nonfinite_rows(allowed_pairs(case), x["q"][None], x["k"][None], x["v"][None])
        nonfinite = {name: t[0] for name, t in rows.items()}
    return compare(case.id(), got, reference(case), case.dtype, case.q_scale, allowance, nonfinite)


def single_device(case: VarlenCase) -> VarlenCase:
    return dataclasses.replace(case, world_size=1)

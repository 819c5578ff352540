"""Dropout checks that need no access to the realised masks, run on every rank of a pool.

With the random state fixed (``torch.manual_seed``), ring attention with dropout is one fixed
function of q, k, v. So:

* the same seed gives the same outputs and gradients (reproducibility), another seed other ones;
* the output is linear in v, and the gradient of ``L = <out, G>`` satisfies
  ``L(v + D) - L(v) = <dL/dv, D>`` exactly -- the backward used the forward's masks;
* for q and k (float64 on CPU), central differences of ``L`` match ``<dL/dq, D>``, ``<dL/dk, D>``;
* averaged over many seeds the output is attention without dropout (the 1 / (1 - p) scaling and
  dropout applied to the globally normalised probabilities): a per-element t statistic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Tuple

import torch
import torch.distributed as dist

import ring_flash_attn as rfa
from helpers.attention_cases import DTYPES, public_function
from helpers.cases import groups
from ring_flash_attn.allgather.api import packed_allgather
from ring_flash_attn.core.spec import AttentionArgs
from ring_flash_attn.layouts import local_cu_seqlens, shard_varlen



@dataclass(frozen=True)
class DropoutCase:
    layout: str
    causal: bool
    world_size: int
    p: float = 0.3
    dtype: str = "fp64"
    device: str = "cpu"
    doc_lengths: Tuple[int, ...] = ()  # packed documents (varlen) when given
    local_len: int = 8  # batch mode
    nheads: int = 4
    nheads_k: int = 2
    head_dim: int = 16
    window: Tuple[int, int] = (-1, -1)
    mean_samples: int = 150
    seed: int = 0
    ulysses_degree: int = 0  # > 0: the ulysses_* functions with this degree, the layout the ring layout

    def id(self) -> str:
        mode = f"varlen{len(self.doc_lengths)}" if self.doc_lengths else f"L{self.local_len}"
        window = "" if self.window == (-1, -1) else f"-win{self.window[0]}_{self.window[1]}"
        ulysses = f"-U{self.ulysses_degree}" if self.ulysses_degree else ""
        return (f"{self.device}-W{self.world_size}{ulysses}-{self.layout}-{'causal' if self.causal else 'full'}"
                f"{window}-{self.dtype}-p{self.p}-{mode}")


def _cu_seqlens(case: DropoutCase) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(case.doc_lengths).cumsum(0).tolist()], dtype=torch.int32)


def _inputs(case: DropoutCase, rank: int, device: torch.device) -> Dict[str, torch.Tensor]:
    """This rank's shards of q, k, v, G (the loss weights) and directions Dq, Dk, Dv."""
    gen = torch.Generator().manual_seed(case.seed)
    dtype = DTYPES[case.dtype]
    rows = (sum(case.doc_lengths),) if case.doc_lengths else (2, case.local_len * case.world_size)
    heads = dict(q=case.nheads, k=case.nheads_k, v=case.nheads_k, G=case.nheads, Dq=case.nheads,
                 Dk=case.nheads_k, Dv=case.nheads_k)
    shards = {}
    for name, h in heads.items():
        full = torch.randn(*rows, h, case.head_dim, generator=gen, dtype=torch.float64).to(dtype)
        ulysses = dict(ulysses_degree=case.ulysses_degree) if case.ulysses_degree else {}
        if case.doc_lengths:
            shards[name] = shard_varlen(full, _cu_seqlens(case), case.layout, rank, case.world_size, **ulysses)
        else:
            shards[name] = rfa.shard(full, case.layout, rank, case.world_size, **ulysses)
        shards[name] = shards[name].to(device)
    return shards


def _attention(case: DropoutCase, q, k, v, p: float, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    group = dist.group.WORLD if case.world_size > 1 else None
    kw = dict(dropout_p=p, causal=case.causal, group=group)
    if case.window != (-1, -1):
        kw["window_size"] = case.window
    if case.ulysses_degree:
        kw.update(group=groups(case.ulysses_degree, case.world_size), ring_layout=case.layout)
        if not case.doc_lengths:
            return rfa.ulysses_flash_attn_func(q, k, v, **kw)
        return rfa.ulysses_flash_attn_varlen_func(q, k, v, _cu_seqlens(case).to(q.device), max(case.doc_lengths), **kw)
    if not case.doc_lengths:
        return public_function(case.layout)(q, k, v, **kw)
    cu = _cu_seqlens(case).to(q.device)
    if case.layout == "llama3":
        rank = dist.get_rank() if group is not None else 0
        prepared = rfa.llama3_flash_attn_prepare_cu_seqlens(cu, case.causal, rank, case.world_size)
        return rfa.llama3_flash_attn_varlen_func(q, k, v, *prepared[:4], case.nheads_k, prepared[4], **kw)
    if case.layout == "zigzag_llama3":
        return rfa.zigzag_llama3_flash_attn_varlen_func(q, k, v, cu, max(case.doc_lengths), heads_k_stride=1, **kw)
    if case.layout == "packed_zigzag":
        return packed_allgather("packed_zigzag", q, k, v, cu, AttentionArgs(**kw))
    if case.layout in ("balanced", "balanced_llama3"):  # the global cu_seqlens
        return public_function(case.layout, varlen=True)(q, k, v, cu, max(case.doc_lengths), **kw)
    local_cu = local_cu_seqlens(cu, case.layout, case.world_size)
    max_len = int((local_cu[1:] - local_cu[:-1]).max())
    return public_function(case.layout, varlen=True)(q, k, v, local_cu, max_len, **kw)


def _total(x: torch.Tensor) -> torch.Tensor:
    """Sum over every rank (float64)."""
    x = x.detach().double().reshape(1)
    if dist.is_initialized() and dist.get_world_size() > 1:
        x = x.clone()
        dist.all_reduce(x)
    return x[0]


def run_rank(rank: int, world_size: int, case: DropoutCase) -> Dict[str, torch.Tensor]:
    assert world_size == case.world_size
    device = torch.device("cuda", rank) if case.device == "cuda" else torch.device("cpu")
    x = _inputs(case, rank, device)
    q, k, v, g = x["q"], x["k"], x["v"], x["G"]
    res: Dict[str, torch.Tensor] = {}

    def loss_and_grads(seed: int):
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        out = _attention(case, *leaves, p=case.p, seed=seed)
        local = (out.double() * g.double()).sum()
        grads = torch.autograd.grad(local, leaves)
        return out.detach(), _total(local), grads

    out_a, loss, grads_a = loss_and_grads(seed=11)
    out_b, _, grads_b = loss_and_grads(seed=11)
    out_c, _, _ = loss_and_grads(seed=12)
    res["out_a"], res["out_b"], res["out_c"] = out_a, out_b, out_c
    for name, ga, gb in zip("qkv", grads_a, grads_b):
        res[f"d{name}_a"], res[f"d{name}_b"] = ga, gb

    # linear in v: out(v1 + v2) = out(v1) + out(v2) with the same masks
    with torch.no_grad():
        v2 = x["Dv"]
        res["linear_sum"] = _attention(case, q, k, v + v2, case.p, seed=11)
        res["linear_parts"] = out_a.double() + _attention(case, q, k, v2, case.p, seed=11).double()

    # directional derivatives: exact for v (the loss is linear in v, so <dL/dv, D> is the loss at v = D:
    # one forward, rounding relative to the answer itself), central differences for q and k
    with torch.no_grad():
        for name, eps in (("v", 1.0), ("q", 1e-5), ("k", 1e-5)):
            d = x[f"D{name}"]
            args = {"q": q, "k": k, "v": v}
            if name == "v":
                terms = _attention(case, q, k, d, p=case.p, seed=11).double() * g.double()
                numeric = _total(terms.sum())
                # the rounding noise of both sides: eps x the 2-norm of their terms (random signs)
                grad_terms = grads_a[2].double() * d.double()
                res["directional_v_noise"] = (_total((terms ** 2).sum()).sqrt()
                                              + _total((grad_terms ** 2).sum()).sqrt()).cpu()
            else:
                plus = dict(args, **{name: args[name] + eps * d})
                minus = dict(args, **{name: args[name] - eps * d})
                l_plus = _total((_attention(case, **plus, p=case.p, seed=11).double() * g.double()).sum())
                l_minus = _total((_attention(case, **minus, p=case.p, seed=11).double() * g.double()).sum())
                numeric = (l_plus - l_minus) / (2 * eps)
            analytic = _total((grads_a["qkv".index(name)].double() * d.double()).sum())
            res[f"directional_{name}"] = torch.stack([numeric, analytic]).cpu()

    # the mean over seeds is attention without dropout
    if case.mean_samples:
        with torch.no_grad():
            samples = torch.stack([_attention(case, q, k, v, case.p, seed=1000 + i).double()
                                   for i in range(case.mean_samples)])
            res["mean"], res["stderr"] = samples.mean(0), samples.std(0) / case.mean_samples ** 0.5
            res["no_dropout"] = _attention(case, q, k, v, 0.0, seed=0).double()
    return {n: t.detach().cpu() for n, t in res.items()}


def check_dropout(case: DropoutCase, per_rank: List[Dict[str, torch.Tensor]]) -> None:
    exact = case.dtype in ("fp64", "fp32")
    for r in per_rank:
        assert torch.equal(r["out_a"], r["out_b"]), "same seed, different output"
        for name in "qkv":
            a, b = r[f"d{name}_a"], r[f"d{name}_b"]
            if exact:
                assert torch.equal(a, b), f"same seed, different d{name}"
            else:
                torch.testing.assert_close(a, b, rtol=0, atol=1e-2 * float(a.abs().max()))
    assert any(not torch.equal(r["out_a"], r["out_c"]) for r in per_rank), "another seed, same output"
    tol = 1e-10 if case.dtype == "fp64" else 2e-2
    for r in per_rank:
        scale = float(r["linear_parts"].abs().max())
        assert float((r["linear_sum"].double() - r["linear_parts"]).abs().max()) <= tol * scale, "not linear in v"
    # Central differences need float64; the v identity holds in any dtype (one forward at v = D, see
    # dropout_cases). dV matching shows the backward got the forward's philox state; dq and dk come
    # from the same kernel call with that state.
    # Rounded dtypes: within 3 eps x the 2-norm of the summed terms (the rounding noise of a sum of
    # random-sign terms; CPU runs stay under 0.6 of it). Another mask moves the sum by ~100 here
    # (seeds 11..20 on CPU), far more than the bound (~0.5 fp16, ~4 bf16).
    names = {"fp64": "vqk"}.get(case.dtype, "v")
    for name in names:
        numeric, analytic = per_rank[0][f"directional_{name}"].tolist()
        if case.dtype == "fp64":
            bound = 1e-6 * max(1.0, abs(analytic))
        else:
            bound = 3 * torch.finfo(DTYPES[case.dtype]).eps * float(per_rank[0]["directional_v_noise"])
        assert abs(numeric - analytic) <= bound, (name, numeric, analytic, bound)
    if case.mean_samples:
        for r in per_rank:
            t = ((r["mean"] - r["no_dropout"]).abs() - 1e-9).clamp(min=0) / r["stderr"].clamp(min=1e-12)
            assert float(t.max()) < 6.0, f"mean over seeds is not attention without dropout (max |t| {float(t.max()):.1f})"

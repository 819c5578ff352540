"""The pieces the attention test cases (:mod:`helpers.cases`) are made of: dtypes and tolerances,
the table of public functions, masks, ALiBi, soft-capping and sinks for the float64 reference, the
rows NaN / Inf inputs reach, a rank's results on the CPU, and the tolerance check.

Errors are measured as ``max |x - ref| / max |ref|`` per tensor, against a float64 computation on
the unsharded sequence from the *same* (already rounded) inputs, so the bound is the error the
kernel and the ring add, nothing else.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch

import ring_flash_attn as rfa

DTYPES = {"fp64": torch.float64, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# relative max error allowed for out / grads, and absolute error for lse, per input dtype
TOLERANCE = {"fp64": (1e-12, 1e-12), "fp32": (1e-5, 1e-5), "fp16": (3e-3, 1e-4), "bf16": (2e-2, 1e-3)}

PACKINGS = ("func", "kvpacked", "qkvpacked")
# the one table of public function names: layout -> name prefix (varlen layouts of the all-gather family too)
PREFIX = {"ring": "ring_flash_attn", "zigzag": "zigzag_ring_flash_attn", "stripe": "stripe_flash_attn",
          "llama3": "llama3_flash_attn", "zigzag_llama3": "zigzag_llama3_flash_attn", "ulysses": "ulysses_flash_attn",
          "balanced": "balanced_ring_flash_attn", "balanced_llama3": "balanced_llama3_flash_attn"}


def public_function(layout: str, packing: str = "func", varlen: bool = False):
    """The public function of ``layout`` for a packing (``func``, ``kvpacked``, ``qkvpacked``)."""
    suffix = "func" if packing == "func" else f"{packing}_func"
    return getattr(rfa, f"{PREFIX[layout]}_{'varlen_' if varlen else ''}{suffix}")


def sink_logits(gen: torch.Generator, nheads: int, dtype: str) -> torch.Tensor:
    """Attention sinks of the size of a row's lse (so they take a real share of every row)."""
    return (2.0 + torch.randn(nheads, generator=gen, dtype=torch.float64)).to(
        torch.float64 if dtype == "fp64" else torch.float32)


def with_sink_column(scores: torch.Tensor, sinks: Optional[torch.Tensor]) -> torch.Tensor:
    """Scores ``(..., H, Sq, Sk)`` with the sink logit appended as one more key column (float64)."""
    if sinks is None:
        return scores
    column = sinks.double()[:, None, None].expand(*scores.shape[:-1], 1)
    return torch.cat([scores, column], dim=-1)


VIEWS = {
    "fused": lambda t: torch.cat([t, torch.zeros_like(t[..., :1, :])], dim=-2)[..., :-1, :],  # a fused projection's slice
    "transposed": lambda t: t.transpose(-1, -2).contiguous().transpose(-1, -2),  # (.., D, H) storage
    "strided_last": lambda t: torch.stack([t, torch.zeros_like(t)], dim=-1)[..., 0],  # last-dim stride 2
}


def as_view(case, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """q, k, v as the case's kind of strided view (same values, differentiable back to the leaves)."""
    if not case.view:
        return q, k, v
    return tuple(VIEWS[case.view](t) for t in (q, k, v))


def poison_id(poison) -> str:
    return "".join(f"-{name}{token}h{head}={value:g}" for name, token, head, value in poison)


def nonfinite_rows(allowed: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Which rows of out / lse / dq / dk / dv depend on a NaN or Inf input, for ``allowed`` ``(S, S)``
    (query i sees key j) and q ``(B, S, H, D)``, k / v ``(B, S, Hk, D)``: boolean ``(B, S, H)``
    (lse: ``(B, H, S)``; dk, dv: ``(B, S, Hk)``). A row's scores are non-finite if its query or a key it
    sees is; its output and dq also if a value it sees is; dk / dv of a key are non-finite if a
    query that sees it has a non-finite output / scores."""
    g = q.shape[2] // k.shape[2]
    bad_q, bad_k, bad_v = ((~torch.isfinite(t)).any(-1) for t in (q, k, v))  # (B, S, heads)
    bad_k, bad_v = (t.repeat_interleave(g, dim=2) for t in (bad_k, bad_v))
    sees = lambda bad_keys: torch.einsum("ij,bjh->bih", allowed.double(), bad_keys.double()) > 0  # noqa: E731
    scores = bad_q | sees(bad_k)
    out = scores | sees(bad_v)
    seen_by = lambda bad_rows: torch.einsum("ij,bih->bjh", allowed.double(), bad_rows.double()) > 0  # noqa: E731
    per_kv_head = lambda rows: rows.reshape(*rows.shape[:2], -1, g).any(-1)  # noqa: E731
    return {"out": out, "lse": scores.transpose(1, 2), "dq": out, "dk": per_kv_head(seen_by(out)),
            "dv": per_kv_head(seen_by(scores))}


def results_on_cpu(out, lse, leaves, dout, packing: str, pack_dim: int, dlse=None, sinks=None) -> Dict[str, torch.Tensor]:
    """out, lse and dq/dk/dv (unpacked from kv / qkv gradients) of one rank, moved to the CPU; with
    ``dlse``, the gradients of ``<out, dout> + <lse, dlse>``; with ``sinks``, their gradient (this
    rank's share) as ``dsinks``."""
    extra = (sinks,) if sinks is not None else ()
    if dlse is None:
        grads = torch.autograd.grad(out, (*leaves, *extra), dout)
    else:
        grads = torch.autograd.grad((out, lse), (*leaves, *extra), (dout, dlse))
    dsinks = grads[-1] if extra else None
    grads = grads[:len(leaves)]
    if packing == "kvpacked":
        grads = (grads[0], *grads[1].unbind(pack_dim))
    elif packing == "qkvpacked":
        grads = grads[0].unbind(pack_dim)
    res = dict(out=out.detach(), dq=grads[0], dk=grads[1], dv=grads[2])
    if lse is not None:
        res["lse"] = lse
    if dsinks is not None:
        assert dsinks.dtype == sinks.dtype and dsinks.shape == sinks.shape
        res["dsinks"] = dsinks
    return {name: t.cpu() for name, t in res.items()}


def alibi_slopes(nheads: int, batch: Optional[int] = None) -> torch.Tensor:
    """ALiBi's geometric slopes (float32 ``(nheads,)``), or per batch row ``(batch, nheads)`` scaled apart."""
    slopes = 2.0 ** (-8.0 * torch.arange(1, nheads + 1, dtype=torch.float64) / nheads)
    if batch is not None:
        slopes = slopes[None] * torch.arange(1, batch + 1, dtype=torch.float64)[:, None]
    return slopes.float()


def alibi_bias(slopes: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``-slope * |i - j|`` for the given global positions: ``(..., H, S, S)``, float64."""
    distance = (positions[:, None] - positions[None, :]).abs().double()
    return -slopes.double()[..., None, None] * distance


def soft_capped(scores: torch.Tensor, softcap: float) -> torch.Tensor:
    return softcap * torch.tanh(scores / softcap) if softcap else scores


def mask(seqlen: int, causal: bool, window: Tuple[int, int] = (-1, -1)) -> torch.Tensor:
    """(S, S) boolean: query i sees key j (flash-attn's causal and window_size semantics)."""
    i, j = torch.arange(seqlen)[:, None], torch.arange(seqlen)[None, :]
    allowed = torch.ones(seqlen, seqlen, dtype=torch.bool)
    if causal:
        allowed &= j <= i
    if window[0] >= 0:
        allowed &= j >= i - window[0]
    if window[1] >= 0:
        allowed &= j <= i + window[1]
    return allowed


def put_together(per_rank: List[Dict[str, torch.Tensor]], unshard) -> Dict[str, torch.Tensor]:
    """Every rank's results as whole-sequence tensors: ``unshard(name, parts)`` for the sharded ones,
    the sum over ranks for the sinks' gradient (each rank holds its rows' share)."""
    return {n: torch.stack([r[n] for r in per_rank]).sum(0) if n == "dsinks" else unshard(n, [r[n] for r in per_rank])
            for n in per_rank[0] if not n.endswith("_again")}


def relative_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    """max |x - ref| / max |ref|; near-zero references (a lone token's dq is exactly 0) are measured
    against 1e-2 instead, i.e. absolutely."""
    return ((x.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-2)).item()


def measure(got: Dict[str, torch.Tensor], ref: Dict[str, torch.Tensor]) -> Dict[str, float]:
    """Errors against the reference: absolute for lse, relative to the largest value otherwise."""
    return {name: (value.double() - ref[name]).abs().max().item() if name == "lse" else relative_error(value, ref[name])
            for name, value in got.items()}


def compare(name_of_case: str, got: Dict[str, torch.Tensor], ref: Dict[str, torch.Tensor], dtype: str,
            q_scale: float = 1.0, allowance: Optional[Dict[str, float]] = None,
            nonfinite: Optional[Dict[str, torch.Tensor]] = None) -> Dict[str, float]:
    """Assert each whole-sequence tensor is within tolerance of the float64 reference; return the errors.
    Gradients computed from the rounded output (flash convention) lose accuracy with the logit scale,
    so their bound grows with ``q_scale``; lse is compared relative to its magnitude. ``allowance``
    raises a bound to what a single device makes of the same inputs (the fuzz test measures it).

    ``nonfinite`` (cases with NaN / Inf inputs, see :func:`nonfinite_rows`): the rows that must come
    out non-finite -- a finite number there is a hidden NaN; the others are compared with ``ref``
    computed from the inputs without the NaN / Inf. Other rows may be non-finite too: fused kernels
    multiply masked-out probabilities (0) by the values of their tile (0 * NaN = NaN), on one device
    as well."""
    rel_tol, lse_tol = TOLERANCE[dtype]
    got = dict(got)
    for name, value in got.items():
        bad = ~torch.isfinite(value) if name == "lse" else (~torch.isfinite(value)).any(-1)
        if nonfinite is None:
            assert not bad.any(), f"{name_of_case}: {name} has non-finite values"
            continue
        hidden = nonfinite[name] & ~bad
        assert not hidden.any(), (f"{name_of_case}: {int(hidden.sum())} rows of {name} are finite but depend on a "
                                  f"NaN / Inf input, e.g. {hidden.nonzero()[0].tolist()}")
        keep = ~(nonfinite[name] | bad)
        got[name] = torch.where(keep if name == "lse" else keep[..., None], value.double(), ref[name])
    errors = measure(got, ref)
    for name, err in errors.items():
        if name == "lse":
            bound = lse_tol * max(1.0, ref[name].abs().max().item())
        else:
            bound = rel_tol * (q_scale if name != "out" else 1.0)
        bound = max(bound, (allowance or {}).get(name, 0.0))
        assert err <= bound, f"{name_of_case}: {name} error {err:.3g} > {bound:.3g}"
    return errors

"""Pure-PyTorch block kernel: any device, any band, GQA without repeating K/V, fp32 math
(fp64 for fp64 inputs). Slow and memory-hungry (materialises the score matrix) but always there,
and the yardstick the fused backends are tested against."""

from __future__ import annotations

from typing import Tuple

import torch

from .base import Backend, Band, KernelCall, Tensor


def _math_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _grouped(q: Tensor, nheads_k: int) -> Tensor:
    """(B, S, H, D) -> (B, S, Hk, G, D): query heads grouped by the K/V head they share."""
    b, s, h, d = q.shape
    return q.reshape(b, s, nheads_k, h // nheads_k, d)


def _scores(q: Tensor, k: Tensor, band: Band, softmax_scale: float) -> Tensor:
    """Masked scaled scores (B, Hk, G, Sq, Sk) in the math dtype."""
    dt = _math_dtype(q.dtype)
    qg = _grouped(q.to(dt), k.shape[2])
    scores = torch.einsum("bihgd,bjhd->bhgij", qg, k.to(dt)) * softmax_scale
    if not band.is_full:
        scores = scores.masked_fill(~band.allowed(q.shape[1], k.shape[1], q.device), float("-inf"))
    return scores


def _probs(scores: Tensor, lse: Tensor) -> Tensor:
    """exp(scores - lse) with rows whose lse is -inf (no key) giving zeros, not NaN."""
    lse = lse.to(scores.dtype).masked_fill(torch.isneginf(lse), float("inf"))
    return torch.exp(scores - lse[..., None])


class ReferenceBackend(Backend):
    name = "reference"

    def not_supported_reasons(self, call: KernelCall) -> list[str]:
        if call.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            return [f"dtype {call.dtype} is not a floating point type"]
        return []

    def forward(self, q: Tensor, k: Tensor, v: Tensor, band: Band, softmax_scale: float) -> Tuple[Tensor, Tensor]:
        b, sq, h, d = q.shape
        hk = k.shape[2]
        scores = _scores(q, k, band, softmax_scale)
        lse = torch.logsumexp(scores, dim=-1)  # -inf on rows with no key
        probs = _probs(scores, lse)
        out = torch.einsum("bhgij,bjhd->bihgd", probs, v.to(probs.dtype)).reshape(b, sq, h, d)
        return out, lse.reshape(b, h, sq)

    def backward(
        self, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, band: Band, softmax_scale: float
    ) -> Tuple[Tensor, Tensor, Tensor]:
        b, sq, h, d = q.shape
        hk = k.shape[2]
        dt = _math_dtype(q.dtype)
        probs = _probs(_scores(q, k, band, softmax_scale), lse.reshape(b, hk, h // hk, sq))
        dout_g = _grouped(dout.to(dt), hk)
        dv = torch.einsum("bhgij,bihgd->bjhd", probs, dout_g)
        dprobs = torch.einsum("bihgd,bjhd->bhgij", dout_g, v.to(dt))
        delta = (dout_g * _grouped(out.to(dt), hk)).sum(-1).permute(0, 2, 3, 1)  # (B, Hk, G, Sq)
        dscores = probs * (dprobs - delta[..., None]) * softmax_scale
        dq = torch.einsum("bhgij,bjhd->bihgd", dscores, k.to(dt)).reshape(b, sq, h, d)
        dk = torch.einsum("bhgij,bihgd->bjhd", dscores, _grouped(q.to(dt), hk))
        return dq, dk, dv

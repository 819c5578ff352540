"""Pure-PyTorch block kernel: any device, any band, GQA without repeating K/V, fp32 math
(fp64 for fp64 inputs). Slow and memory-hungry (materialises the score matrix) but always there,
and the yardstick the fused backends are tested against."""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..core.mask import Band, VarlenMeta
from ..core.merge import accumulator_dtype
from .base import Backend, BlockOptions, KernelCall, Tensor
from .dropout import keep_mask


def _grouped(q: Tensor, nheads_k: int) -> Tensor:
    """(B, S, H, D) -> (B, S, Hk, G, D): query heads grouped by the K/V head they share."""
    b, s, h, d = q.shape
    return q.reshape(b, s, nheads_k, h // nheads_k, d)


def _scores(q: Tensor, k: Tensor, allowed: Optional[Tensor], softmax_scale: float,
            softcap: float = 0.0, bias: Optional[Tensor] = None) -> Tuple[Tensor, Optional[Tensor]]:
    """Scaled (and soft-capped: ``cap * tanh(s / cap)``) scores (B, Hk, G, Sq, Sk) in the math dtype,
    plus ``bias`` (added after the cap, as flash-attn adds ALiBi), -inf where ``allowed`` is False;
    with a cap, also ``1 - tanh^2`` for the backward."""
    dt = accumulator_dtype(q.dtype)
    qg = _grouped(q.to(dt), k.shape[2])
    scores = torch.einsum("bihgd,bjhd->bhgij", qg, k.to(dt)) * softmax_scale
    slope = None
    if softcap:
        capped = torch.tanh(scores / softcap)
        slope = 1 - capped * capped
        scores = capped * softcap
    if bias is not None:
        scores = scores + bias
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    return scores, slope


def _band_mask(band: Band, q: Tensor, k: Tensor) -> Optional[Tensor]:
    return None if band.is_full else band.allowed(q.shape[1], k.shape[1], q.device)


def _probs(scores: Tensor, lse: Tensor) -> Tensor:
    """exp(scores - lse) with rows whose lse is -inf (no key) giving zeros, not NaN."""
    lse = lse.to(scores.dtype).masked_fill(torch.isneginf(lse), float("inf"))
    return torch.exp(scores - lse[..., None])


class ReferenceBackend(Backend):
    name = "reference"
    results_in_input_dtype = False  # float32 math and results for 16-bit inputs
    supports_dropout = True  # a seed per call, the mask regenerated from it in backward
    supports_softcap = True
    supports_alibi = True

    def not_supported_reasons(self, call: KernelCall) -> list[str]:
        if call.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            return [f"dtype {call.dtype} is not a floating point type"]
        return []

    def forward(self, q: Tensor, k: Tensor, v: Tensor, band: Band, options: BlockOptions) -> Tuple[Tensor, Tensor]:
        return self._forward(q, k, v, _band_mask(band, q, k), options)

    def backward(
        self, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, band: Band, options: BlockOptions
    ) -> Tuple[Tensor, Tensor, Tensor]:
        return self._backward(dout, q, k, v, out, lse, _band_mask(band, q, k), options)

    def forward_varlen(self, q: Tensor, k: Tensor, v: Tensor, meta: VarlenMeta, options: BlockOptions) -> Tuple[Tensor, Tensor]:
        out, lse = self._forward(q[None], k[None], v[None], meta.dense_mask(q.device), options)
        return out[0], lse[0]

    def backward_varlen(
        self, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, meta: VarlenMeta, options: BlockOptions
    ) -> Tuple[Tensor, Tensor, Tensor]:
        grads = self._backward(dout[None], q[None], k[None], v[None], out[None], lse[None], meta.dense_mask(q.device),
                               options)
        return tuple(g[0] for g in grads)

    def _forward(self, q: Tensor, k: Tensor, v: Tensor, allowed: Optional[Tensor], options: BlockOptions) -> Tuple[Tensor, Tensor]:
        b, sq, h, d = q.shape
        scores, _ = _scores(q, k, allowed, options.softmax_scale, options.softcap, _alibi(q, k, options))
        lse = torch.logsumexp(scores, dim=-1)  # -inf on rows with no key
        probs = _probs(scores, lse)
        if options.dropout is not None:
            probs = probs * _kept(options.dropout.next_seed(), probs, options.dropout.p)
        out = torch.einsum("bhgij,bjhd->bihgd", probs, v.to(probs.dtype)).reshape(b, sq, h, d)
        return out, lse.reshape(b, h, sq)

    def _backward(
        self, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, allowed: Optional[Tensor],
        options: BlockOptions,
    ) -> Tuple[Tensor, Tensor, Tensor]:
        b, sq, h, d = q.shape
        hk = k.shape[2]
        dt = accumulator_dtype(q.dtype)
        scores, slope = _scores(q, k, allowed, options.softmax_scale, options.softcap, _alibi(q, k, options))
        probs = _probs(scores, lse.reshape(b, hk, h // hk, sq))
        dout_g = _grouped(dout.to(dt), hk)
        kept = _kept(options.dropout.next_seed(), probs, options.dropout.p) if options.dropout is not None else 1.0
        dv = torch.einsum("bhgij,bihgd->bjhd", probs * kept, dout_g)
        dprobs = torch.einsum("bihgd,bjhd->bhgij", dout_g, v.to(dt)) * kept
        delta = (dout_g * _grouped(out.to(dt), hk)).sum(-1).permute(0, 2, 3, 1)  # (B, Hk, G, Sq)
        dscores = probs * (dprobs - delta[..., None]) * options.softmax_scale
        if slope is not None:
            dscores = dscores * slope
        dq = torch.einsum("bhgij,bjhd->bihgd", dscores, k.to(dt)).reshape(b, sq, h, d)
        dk = torch.einsum("bhgij,bihgd->bjhd", dscores, _grouped(q.to(dt), hk))
        return dq, dk, dv


def _alibi(q: Tensor, k: Tensor, options: BlockOptions) -> Optional[Tensor]:
    """``-slope * |query position - key position|`` as (B|1, Hk, G, Sq, Sk), or None."""
    if options.alibi_slopes is None:
        return None
    if options.positions is None:
        raise RuntimeError("ALiBi needs the block's global positions (BlockOptions.at_positions)")
    q_pos, k_pos = (p.to(torch.float64) for p in options.positions)
    distance = (q_pos[:, None] - k_pos[None, :]).abs()
    slopes = options.alibi_slopes.to(accumulator_dtype(q.dtype)).reshape(-1, k.shape[2], q.shape[2] // k.shape[2], 1, 1)
    return -slopes * distance.to(slopes.dtype)


def _kept(seed: int, probs: Tensor, p: float) -> Tensor:
    """Dropout's keep mask scaled by 1 / (1 - p), as the probabilities' dtype."""
    return keep_mask(seed, probs.shape, p, probs.device).to(probs.dtype) / (1.0 - p)

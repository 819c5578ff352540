"""CPU stand-ins for the flash-attn packages' private functions, with exactly their signatures,
return arities and in-place conventions (flash-attn 2.6, 2.7+ and flash-attn-4), computed by the
reference kernel with bottom-right causal masks and windows. FA2 reports rows that see no key with
lse +inf and treats windows at least as wide as the keys as unbounded, as the real kernels do."""

from __future__ import annotations

import dataclasses
import types
from typing import Optional

import torch

from ring_flash_attn.core.mask import Band, VarlenMeta
from ring_flash_attn.kernels import BlockOptions
from ring_flash_attn.kernels.reference import ReferenceBackend

_REF = ReferenceBackend()


def _meta(cu_q, cu_k, causal, window=(-1, -1), clip=False) -> VarlenMeta:
    meta = VarlenMeta.build(cu_q.tolist(), cu_k.tolist(), causal, cu_q.device)
    left, right = (-1 if w is None else w for w in window)
    if clip:  # FA2 drops a window at least as wide as the longest document's keys
        left, right = (-1 if w >= meta.max_seqlen_k else w for w in (left, right))
    return dataclasses.replace(meta, window=(left, right))


def _flash_band(sq: int, sk: int, causal: bool, window, clip: bool) -> Band:
    """flash's bottom-right causal / window mask as a top-left band. With ``clip`` (FA2), windows at
    least as wide as the keys count as unbounded, as the real kernels do."""
    left, right = (-1 if w is None else w for w in window)
    if clip:
        left, right = (-1 if w >= sk else w for w in (left, right))
    if causal:
        right = 0
    offset = sk - sq
    return Band(offset - left if left >= 0 else None, offset + right if right >= 0 else None)


def _fwd(q, k, v, scale, causal, cu_q=None, cu_k=None, softcap=0.0, window=(-1, -1), clip=False):
    options = BlockOptions(softmax_scale=scale, softcap=softcap or 0.0)
    if cu_q is None:
        out, lse = _REF.forward(q, k, v, _flash_band(q.shape[1], k.shape[1], causal, window, clip), options)
    else:
        out, lse = _REF.forward_varlen(q, k, v, _meta(cu_q, cu_k, causal, window, clip), options)
    return out.to(q.dtype), lse.float()


def _bwd(dout, q, k, v, out, lse, scale, causal, cu_q=None, cu_k=None, softcap=0.0, window=(-1, -1), clip=False):
    options = BlockOptions(softmax_scale=scale, softcap=softcap or 0.0)
    lse = lse.masked_fill(torch.isposinf(lse), float("-inf"))
    if cu_q is None:
        band = _flash_band(q.shape[1], k.shape[1], causal, window, clip)
        return _REF.backward(dout, q, k, v, out, lse, band, options)
    return _REF.backward_varlen(dout, q, k, v, out, lse, _meta(cu_q, cu_k, causal, window, clip), options)


def _fa2_lse(lse):
    return lse.masked_fill(torch.isneginf(lse), float("inf"))


def flash_attn_2_6() -> types.ModuleType:
    """flash_attn.flash_attn_interface as of 2.6: window_size tuples, 8-value forward results."""
    m = types.ModuleType("fake_flash_attn_2_6")

    def _flash_attn_forward(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                            return_softmax):
        assert dropout_p == 0.0 and alibi_slopes is None
        out, lse = _fwd(q, k, v, softmax_scale, causal, softcap=softcap, window=window_size, clip=True)
        return out, q, k, v, out, _fa2_lse(lse), None, torch.zeros(2, dtype=torch.int64)

    def _flash_attn_varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                                   softmax_scale, causal, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                                   return_softmax=False, block_table=None):
        out, lse = _fwd(q, k, v, softmax_scale, causal, cu_seqlens_q, cu_seqlens_k, softcap, window_size, clip=True)
        return out, q, k, v, out, _fa2_lse(lse), None, torch.zeros(2, dtype=torch.int64)

    def _flash_attn_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, dropout_p, softmax_scale, causal,
                             window_size, softcap, alibi_slopes, deterministic, rng_state=None):
        grads = _bwd(dout, q, k, v, out, softmax_lse, softmax_scale, causal, softcap=softcap, window=window_size,
                     clip=True)
        for buf, g in zip((dq, dk, dv), grads):
            buf.copy_(g)
        return dq, dk, dv, None

    def _flash_attn_varlen_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k,
                                    max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal, window_size,
                                    softcap, alibi_slopes, deterministic, rng_state=None):
        grads = _bwd(dout, q, k, v, out, softmax_lse, softmax_scale, causal, cu_seqlens_q, cu_seqlens_k, softcap,
                     window_size, clip=True)
        for buf, g in zip((dq, dk, dv), grads):
            buf.copy_(g)
        return dq, dk, dv, None

    m.__dict__.update({f.__name__: f for f in (_flash_attn_forward, _flash_attn_varlen_forward,
                                                _flash_attn_backward, _flash_attn_varlen_backward)})
    return m


def flash_attn_2_7() -> types.ModuleType:
    """flash_attn.flash_attn_interface as of 2.7/2.8: window_size_left/right, 4-value results,
    backward returns only softmax_d and fills dq/dk/dv in place."""
    m = types.ModuleType("fake_flash_attn_2_7")

    def _flash_attn_forward(q, k, v, dropout_p, softmax_scale, causal, window_size_left, window_size_right,
                            softcap, alibi_slopes, return_softmax):
        out, lse = _fwd(q, k, v, softmax_scale, causal, softcap=softcap,
                        window=(window_size_left, window_size_right), clip=True)
        return out, _fa2_lse(lse), None, torch.zeros(2, dtype=torch.int64)

    def _flash_attn_varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                                   softmax_scale, causal, window_size_left=-1, window_size_right=-1, softcap=0.0,
                                   alibi_slopes=None, return_softmax=False, block_table=None, leftpad_k=None,
                                   seqused_k=None):
        out, lse = _fwd(q, k, v, softmax_scale, causal, cu_seqlens_q, cu_seqlens_k, softcap,
                        (window_size_left, window_size_right), clip=True)
        return out, _fa2_lse(lse), None, torch.zeros(2, dtype=torch.int64)

    def _flash_attn_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, dropout_p, softmax_scale, causal,
                             window_size_left, window_size_right, softcap, alibi_slopes, deterministic,
                             rng_state=None):
        grads = _bwd(dout, q, k, v, out, softmax_lse, softmax_scale, causal, softcap=softcap,
                     window=(window_size_left, window_size_right), clip=True)
        for buf, g in zip((dq, dk, dv), grads):
            buf.copy_(g)
        return torch.empty(0)

    def _flash_attn_varlen_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k,
                                    max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal, window_size_left,
                                    window_size_right, softcap, alibi_slopes, deterministic, rng_state=None):
        grads = _bwd(dout, q, k, v, out, softmax_lse, softmax_scale, causal, cu_seqlens_q, cu_seqlens_k, softcap,
                     (window_size_left, window_size_right), clip=True)
        for buf, g in zip((dq, dk, dv), grads):
            buf.copy_(g)
        return torch.empty(0)

    m.__dict__.update({f.__name__: f for f in (_flash_attn_forward, _flash_attn_varlen_forward,
                                                _flash_attn_backward, _flash_attn_varlen_backward)})
    return m


def flash_attn_4() -> types.ModuleType:
    """flash_attn.cute.interface (4.0 betas): keyword-rich functions, forward returns 5 values."""
    m = types.ModuleType("fake_flash_attn_cute_interface")

    def _flash_attn_fwd(q, k, v, qv=None, cu_seqlens_q=None, cu_seqlens_k=None, seqused_q=None, seqused_k=None,
                        max_seqlen_q=None, max_seqlen_k=None, min_seqlen_k=None, page_table=None,
                        softmax_scale: Optional[float] = None, causal=False, softcap=None, window_size_left=None,
                        window_size_right=None, learnable_sink=None, tile_mn=None, mma_pv_is_rs=None,
                        intra_wg_overlap=None, num_threads=384, num_splits=1, pack_gqa=None, _arch=None,
                        score_mod=None, mask_mod=None, block_sparse_tensors=None, return_lse=False, out=None,
                        lse=None, **more):
        result_out, result_lse = _fwd(q, k, v, softmax_scale, causal, cu_seqlens_q, cu_seqlens_k, softcap,
                                      (window_size_left, window_size_right))
        return result_out, (result_lse if return_lse else None), None, None, None

    def _flash_attn_bwd(q, k, v, out, dout, lse, softmax_scale=None, causal=False, softcap=0.0,
                        window_size_left=None, window_size_right=None, m_block_size=64, n_block_size=128,
                        num_threads=256, pack_gqa=False, num_stages_Q=2, num_stages_dO=2, SdP_swapAB=False,
                        dKV_swapAB=False, dQ_swapAB=False, AtomLayoutMSdP=2, AtomLayoutNdKV=2, AtomLayoutMdQ=2,
                        V_in_regs=False, cu_seqlens_q=None, cu_seqlens_k=None, seqused_q=None, seqused_k=None,
                        max_seqlen_q=None, max_seqlen_k=None, deterministic=False, dq=None, dk=None, dv=None,
                        **more):
        return _bwd(dout, q, k, v, out, lse, softmax_scale, causal, cu_seqlens_q, cu_seqlens_k, softcap,
                    (window_size_left, window_size_right))

    m._flash_attn_fwd, m._flash_attn_bwd = _flash_attn_fwd, _flash_attn_bwd
    return m


def flash_attn_3(backward_causal_name: str = "is_causal") -> types.ModuleType:
    """flash_attn_interface of the Hopper build (FA3): keyword-rich forward returning 4 values,
    backward filling dq/dk/dv; its causal flag is ``is_causal`` (recent) or ``causal`` (older)."""
    m = types.ModuleType("fake_flash_attn_interface")

    def _flash_attn_forward(q, k, v, k_new=None, v_new=None, qv=None, out_=None, cu_seqlens_q=None,
                            cu_seqlens_k=None, cu_seqlens_k_new=None, seqused_q=None, seqused_k=None,
                            max_seqlen_q=None, max_seqlen_k=None, page_table=None, kv_batch_idx=None, leftpad_k=None,
                            rotary_cos=None, rotary_sin=None, seqlens_rotary=None, q_descale=None, k_descale=None,
                            v_descale=None, softmax_scale=None, causal=False, window_size_left=-1,
                            window_size_right=-1, attention_chunk=0, softcap=0.0, rotary_interleaved=True,
                            scheduler_metadata=None, num_splits=1, pack_gqa=None, sm_margin=0):
        out, lse = _fwd(q, k, v, softmax_scale, causal, cu_seqlens_q, cu_seqlens_k, softcap,
                        (window_size_left, window_size_right))
        return out, lse, torch.empty(0), torch.empty(0)

    def backward(dout, q, k, v, out, softmax_lse, cu_seqlens_q=None, cu_seqlens_k=None, sequed_q=None,
                 sequed_k=None, max_seqlen_q=None, max_seqlen_k=None, dq=None, dk=None, dv=None, softmax_scale=None,
                 causal=False, window_size_left=-1, window_size_right=-1, softcap=0.0, deterministic=False,
                 sm_margin=0):
        grads = _bwd(dout, q, k, v, out, softmax_lse, softmax_scale, causal, cu_seqlens_q, cu_seqlens_k, softcap,
                     (window_size_left, window_size_right))
        for buf, g in zip((dq, dk, dv), grads):
            buf.copy_(g)
        return torch.empty(0)

    if backward_causal_name == "is_causal":
        def _flash_attn_backward(dout, q, k, v, out, softmax_lse, cu_seqlens_q=None, cu_seqlens_k=None,
                                 sequed_q=None, sequed_k=None, max_seqlen_q=None, max_seqlen_k=None, dq=None,
                                 dk=None, dv=None, softmax_scale=None, is_causal=False, window_size_left=-1,
                                 window_size_right=-1, softcap=0.0, deterministic=False, sm_margin=0):
            return backward(dout, q, k, v, out, softmax_lse, cu_seqlens_q, cu_seqlens_k, dq=dq, dk=dk, dv=dv,
                            softmax_scale=softmax_scale, causal=is_causal, window_size_left=window_size_left,
                            window_size_right=window_size_right, softcap=softcap)
    else:
        _flash_attn_backward = backward

    m._flash_attn_forward, m._flash_attn_backward = _flash_attn_forward, _flash_attn_backward
    return m


def run_rank_with_fake_fa2(rank: int, world_size: int, case):
    """Worker entry: register a flash-attn-2.7 fake that accepts CPU tensors as ``fake_fa2``, then run
    the case through it (the ring with a bottom-right, window-taking kernel, on CPU); batch or packed case."""
    from helpers import cases
    from ring_flash_attn.kernels import BACKENDS, register_backend
    from ring_flash_attn.kernels.flash_attn_pkg import FlashAttn2Backend

    if "fake_fa2" not in BACKENDS:
        class CpuFakeFlashAttn2(FlashAttn2Backend):
            name = "fake_fa2"

            def not_supported_reasons(self, call):
                return []

        register_backend(CpuFakeFlashAttn2(interface=flash_attn_2_7(), version="2.7.4"))
    return cases.run_rank(rank, world_size, case)

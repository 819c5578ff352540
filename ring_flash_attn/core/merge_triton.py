"""The online-softmax merge as one Triton kernel (CUDA tensors): each program reads a tile of rows
of both partial results and their LSEs once and writes the merged rows into the accumulator in
place -- one memory pass. ``torch.compile`` of the same arithmetic wrote to a temporary and copied it
back when the accumulator is a row slice, a second pass over the output (H200 profile, 2026-11-22).

Same arithmetic as :func:`ring_flash_attn.core.merge._merge`: float32 math, one rounding to the
accumulator's dtype. Importing this module needs Triton; :mod:`ring_flash_attn.core.merge` falls back to
eager PyTorch without it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

Tensor = torch.Tensor


@triton.jit
def _merge_rows(out_acc, lse_acc, out_blk, lse_blk, seqlen, nheads, head_dim,
                oa_b, oa_s, oa_h, ob_b, ob_s, ob_h, la_b, la_h, la_s, lb_b, lb_h, lb_s,
                BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)).to(tl.int64)  # offsets beyond 2**31
    b = (tl.program_id(1) // nheads).to(tl.int64)
    h = (tl.program_id(1) % nheads).to(tl.int64)
    in_rows = rows < seqlen
    la = tl.load(lse_acc + b * la_b + h * la_h + rows * la_s, mask=in_rows, other=float("-inf")).to(tl.float32)
    lb = tl.load(lse_blk + b * lb_b + h * lb_h + rows * lb_s, mask=in_rows, other=float("-inf")).to(tl.float32)
    top = tl.maximum(la, lb)
    ref = tl.where(top == float("-inf"), 0.0, top)  # rows that saw no key yet: weights 0, not NaN
    ea = tl.exp(la - ref)
    eb = tl.exp(lb - ref)
    total = ea + eb
    lse_new = ref + tl.log(total)  # log(0) = -inf for rows still empty
    safe = tl.where(total > 0, total, 1.0)
    wa = ea / safe
    wb = eb / safe
    d = tl.arange(0, BLOCK_D)
    cell = in_rows[:, None] & (d[None, :] < head_dim)
    pa = out_acc + b * oa_b + h * oa_h + rows[:, None] * oa_s + d[None, :]
    pb = out_blk + b * ob_b + h * ob_h + rows[:, None] * ob_s + d[None, :]
    oa = tl.load(pa, mask=cell, other=0.0).to(tl.float32)
    ob = tl.load(pb, mask=cell, other=0.0).to(tl.float32)
    merged = oa * wa[:, None] + ob * wb[:, None]
    tl.store(pa, merged.to(out_acc.dtype.element_ty), mask=cell)
    tl.store(lse_acc + b * la_b + h * la_h + rows * la_s, lse_new.to(lse_acc.dtype.element_ty), mask=in_rows)


def merge_rows_triton(out_acc: Tensor, lse_acc: Tensor, out_block: Tensor, lse_block: Tensor) -> None:
    """In place: ``out_acc (B, S, H, D)``, ``lse_acc (B, H, S)`` (views allowed, last dim of out
    contiguous) merged with the block's ``(out, lse)`` of the same shapes."""
    b, s, h, d = out_acc.shape
    if out_acc.stride(-1) != 1:
        raise ValueError("merge_rows_triton needs the head dimension contiguous")
    out_block = out_block if out_block.stride(-1) == 1 else out_block.contiguous()
    block_d = triton.next_power_of_2(d)
    block_rows = max(1, min(64, 8192 // block_d))
    grid = (triton.cdiv(s, block_rows), b * h)
    _merge_rows[grid](out_acc, lse_acc, out_block, lse_block, s, h, d,
                      out_acc.stride(0), out_acc.stride(1), out_acc.stride(2),
                      out_block.stride(0), out_block.stride(1), out_block.stride(2),
                      lse_acc.stride(0), lse_acc.stride(1), lse_acc.stride(2),
                      lse_block.stride(0), lse_block.stride(1), lse_block.stride(2),
                      BLOCK_ROWS=block_rows, BLOCK_D=block_d, num_warps=8)

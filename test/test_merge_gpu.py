"""The Triton merge (CUDA) against the eager float32 merge: row-slice views of the accumulators, rows
that have seen no key on either side, head dims that are not powers of two, every float dtype; rows
outside the view untouched. (Every ring case of test_ring_gpu.py goes through it as well.)"""

from __future__ import annotations

import pytest
import torch

from ring_flash_attn.core.merge import _merge

pytestmark = pytest.mark.gpu
CUDA = torch.cuda.is_available()


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 80, 128])
def test_triton_merge_matches_eager(dtype, head_dim):
    merge_rows_triton = pytest.importorskip("ring_flash_attn.core.merge_triton").merge_rows_triton
    g = torch.Generator(device="cuda").manual_seed(head_dim)
    b, s, h, pad = 2, 300, 5, 3
    base = torch.randn(b, s + 2 * pad, h, head_dim, generator=g, device="cuda").to(dtype)
    lse_base = torch.randn(b, h, s + 2 * pad, generator=g, device="cuda") * 3
    out_acc, lse_acc = base[:, pad:pad + s], lse_base[:, :, pad:pad + s]
    block = torch.randn(b, s, h, head_dim, generator=g, device="cuda").to(dtype)
    lse_block = torch.randn(b, h, s, generator=g, device="cuda") * 3
    lse_acc[:, :, :10] = float("-inf")  # rows without keys so far (out 0)
    out_acc[:, :10] = 0
    lse_block[:, :, 5:15] = float("-inf")  # rows the block does not reach (rows 5..9: neither side)
    block[:, 5:15] = 0
    expect_out, expect_lse = out_acc.float().clone(), lse_acc.clone()
    _merge(expect_out, expect_lse, block, lse_block)
    before = base.clone(), lse_base.clone()

    merge_rows_triton(out_acc, lse_acc, block, lse_block)

    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-3}[dtype]
    torch.testing.assert_close(out_acc.float(), expect_out.to(dtype).float(), rtol=tol, atol=tol)
    torch.testing.assert_close(lse_acc, expect_lse, rtol=1e-6, atol=1e-6)
    assert torch.isneginf(lse_acc[:, :, 5:10]).all() and (out_acc[:, 5:10] == 0).all()
    old_out, old_lse = before  # outside the view: untouched
    assert torch.equal(base[:, :pad], old_out[:, :pad]) and torch.equal(base[:, pad + s:], old_out[:, pad + s:])
    assert torch.equal(lse_base[..., :pad], old_lse[..., :pad])
    assert torch.equal(lse_base[..., pad + s:], old_lse[..., pad + s:])


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_merge_propagates_nan(dtype):
    """A row whose lse or output is NaN on either side comes out NaN (out and lse), as the eager merge
    gives; rows beside it are the eager merge's."""
    merge_rows_triton = pytest.importorskip("ring_flash_attn.core.merge_triton").merge_rows_triton
    g = torch.Generator(device="cuda").manual_seed(7)
    b, s, h, d = 1, 64, 2, 64
    out_acc = torch.randn(b, s, h, d, generator=g, device="cuda").to(dtype)
    lse_acc = torch.randn(b, h, s, generator=g, device="cuda")
    block = torch.randn(b, s, h, d, generator=g, device="cuda").to(dtype)
    lse_block = torch.randn(b, h, s, generator=g, device="cuda")
    lse_acc[:, :, 3] = float("nan")          # NaN lse in the accumulator
    lse_block[:, :, 5] = float("nan")        # ... in the block
    lse_block[:, :, 7] = float("nan")        # NaN lse against an empty accumulator row
    lse_acc[:, :, 7], out_acc[:, 7] = float("-inf"), 0
    block[:, 9, :, 0] = float("nan")         # NaN in one output element
    expect_out, expect_lse = out_acc.float().clone(), lse_acc.clone()
    _merge(expect_out, expect_lse, block, lse_block)

    merge_rows_triton(out_acc, lse_acc, block, lse_block)

    for row in (3, 5, 7):
        assert torch.isnan(lse_acc[:, :, row]).all() and torch.isnan(out_acc[:, row]).all(), row
    assert torch.isnan(out_acc[:, 9, :, 0]).all()
    torch.testing.assert_close(out_acc.float(), expect_out.to(dtype).float(), equal_nan=True, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(lse_acc, expect_lse, equal_nan=True, rtol=1e-6, atol=1e-6)

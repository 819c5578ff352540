"""Block kernels, one process: every backend against a float64 dense computation for the bands
the schedules produce (and, for the reference, any band), GQA, rows that see no key, selection."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ring_flash_attn.kernels import BACKENDS, BlockOptions, KernelCall, explain_selection, select_backend
from ring_flash_attn.core.mask import Band, VarlenMeta

BANDS = [Band(), Band(None, 0), Band(None, -1), Band(None, -3), Band(None, 2), Band(-2, 1), Band(1, 3)]


def dense(q, k, v, band, scale, softcap=0.0):
    """float64 attention with an explicit mask; rows with no key give out 0 and lse -inf."""
    g = q.shape[2] // k.shape[2]
    q, k, v = q.double(), k.double().repeat_interleave(g, 2), v.double().repeat_interleave(g, 2)
    s = torch.einsum("bihd,bjhd->bhij", q, k) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    s = s.masked_fill(~band.allowed(q.shape[1], k.shape[1], q.device), float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse.masked_fill(torch.isneginf(lse), 0)[..., None])
    return torch.einsum("bhij,bjhd->bihd", p, v), lse


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(BACKENDS))
@pytest.mark.parametrize("band", BANDS, ids=repr)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sq,sk,h,hk", [(6, 6, 4, 2), (5, 7, 2, 2), (8, 4, 3, 1), (130, 130, 2, 1)])
def test_block_forward_backward(device, name, band, dtype, sq, sk, h, hk):
    backend = BACKENDS[name]
    call = KernelCall(device_type=device, dtype=dtype, head_dim=32, bands=(band,))
    reasons = backend.not_supported_reasons(call)
    if reasons:
        pytest.skip("; ".join(reasons))
    check_block(backend, device, band, dtype, sq, sk, h, hk)


def check_block(backend, device, band, dtype, sq, sk, h, hk, softcap=0.0) -> None:
    """One block forward and backward against :func:`dense` in float64, with asserted tolerances."""
    options = BlockOptions(softmax_scale=0.2, softcap=softcap)
    gen = torch.Generator().manual_seed(0)
    q, dout = (torch.randn(2, sq, h, 32, generator=gen).to(device, dtype) for _ in range(2))
    k, v = (torch.randn(2, sk, hk, 32, generator=gen).to(device, dtype) for _ in range(2))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out, lse = backend.forward(q.detach(), k.detach(), v.detach(), band, options)
    ref_out, ref_lse = dense(q, k, v, band, options.softmax_scale, softcap)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert out.shape == q.shape and lse.shape == (2, h, sq) and lse.dtype == torch.float32
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse)), "rows without keys must have lse -inf"
    finite = ~torch.isneginf(ref_lse)
    assert (lse[finite].double() - ref_lse[finite]).abs().max() < 1e-4
    assert (out.double() - ref_out).abs().max() < tol * ref_out.abs().max()
    grads = backend.backward(dout, q.detach(), k.detach(), v.detach(), out.to(dtype), lse, band, options)
    ref_grads = torch.autograd.grad(ref_out, (q, k, v), dout.double())
    for got, ref in zip(grads, ref_grads):
        assert torch.isfinite(got).all()
        assert (got.double() - ref).abs().max() <= tol * ref.abs().max().clamp_min(1e-6) + 1e-6


@pytest.mark.parametrize("band", [Band(), Band(None, 0), Band(-2, 1)], ids=repr)
def test_reference_softcap(band):
    # q scaled up so that the cap (tanh) is far from linear
    check_block(BACKENDS["reference"], "cpu", band, torch.float32, 7, 7, 4, 2, softcap=0.5)


def test_softcap_needs_a_backend_that_has_it():
    call = KernelCall("cpu", torch.float32, 32, (Band(None, 0),), softcap=True)
    assert select_backend(call).name == "reference"
    assert any("no softcap" in r for r in explain_selection(call)["torch_cpu_flash"])
    with pytest.raises(ValueError, match="no softcap"):
        select_backend(call, "torch_cpu_flash")


def _call(**overrides):
    base = dict(device_type="cpu", dtype=torch.bfloat16, head_dim=64, bands=(Band(), Band(None, 0)))
    return KernelCall(**{**base, **overrides})


def test_reference_takes_every_band_and_fused_kernels_the_causal_ones():
    call = KernelCall(device_type="cpu", dtype=torch.float32, head_dim=32, bands=tuple(BANDS))
    assert BACKENDS["reference"].not_supported_reasons(call) == []
    assert any("neither full nor causal" in r for r in BACKENDS["torch_cpu_flash"].not_supported_reasons(call))


def test_auto_prefers_fused_cpu_kernel():
    assert select_backend(_call()).name == "torch_cpu_flash"
    assert select_backend(_call(dtype=torch.float64)).name == "reference"
    assert select_backend(_call(bands=(Band(-2, 0),))).name == "reference"


def test_forced_backend_and_env(monkeypatch):
    assert select_backend(_call(), "reference").name == "reference"
    monkeypatch.setenv("RING_FLASH_ATTN_BACKEND", "reference")
    assert select_backend(_call()).name == "reference"
    with pytest.raises(ValueError, match="unknown backend"):
        select_backend(_call(), "nope")
    with pytest.raises(ValueError, match="cannot run.*CPU tensors only"):
        select_backend(_call(device_type="cuda"), "torch_cpu_flash")


def test_choice_is_logged(caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="ring_flash_attn"):
        select_backend(_call(head_dim=72))
    assert "torch_cpu_flash" in caplog.text and "runs on CUDA tensors only" in caplog.text


def test_explain_selection_lists_reasons():
    report = explain_selection(_call(device_type="meta", dtype=torch.float64))
    assert report["reference"] == []
    assert any("CPU" in r for r in report["torch_cpu_flash"]) and any("dtype" in r for r in report["torch_cpu_flash"])


def test_schema_check_reports_changed_ops():
    from ring_flash_attn.kernels.schemas import missing_ops

    assert missing_ops({"_scaled_dot_product_flash_attention_for_cpu": (("query", "key"), ("scale",))}) == []
    assert "has no aten" in missing_ops({"no_such_op_xyz": ((), ())})[0]
    assert "arguments changed" in missing_ops({"_scaled_dot_product_flash_attention_for_cpu": (("key",), ())})[0]
    assert "no argument" in missing_ops({"_scaled_dot_product_flash_attention_for_cpu": ((), ("bogus",))})[0]


VARLEN_DOCS = [  # (query length, key length) per document; causal is bottom-right per document
    ((5, 5), (1, 1), (3, 3), (0, 0), (7, 7)),
    ((2, 6), (4, 4), (1, 9), (3, 3)),  # llama3-style: fewer queries than keys
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(BACKENDS))
@pytest.mark.parametrize("docs", VARLEN_DOCS, ids=["square", "offsets"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_varlen_block(device, name, docs, causal, dtype):
    meta = varlen_meta(docs, causal, device)
    call = KernelCall(device_type=device, dtype=dtype, head_dim=32,
                      bands=(Band(None, 0) if causal else Band(),), varlen=True)
    backend = BACKENDS[name]
    reasons = backend.not_supported_reasons(call)
    if reasons:
        pytest.skip("; ".join(reasons))
    check_varlen_block(backend, device, meta, dtype)


def varlen_meta(docs, causal: bool, device) -> VarlenMeta:
    offsets_q, offsets_k = [0], [0]
    for lq, lk in docs:
        offsets_q.append(offsets_q[-1] + lq)
        offsets_k.append(offsets_k[-1] + lk)
    return VarlenMeta.build(offsets_q, offsets_k, causal, device)


@pytest.mark.parametrize("docs", [[(3, 3), (5, 5)], [(3, 5), (2, 2)], [(5, 3)], [(4, 0), (0, 4), (2, 2)], [(0, 0), (3, 3)],
                                  [(2, 6)], [(6, 2), (1, 1)]])
@pytest.mark.parametrize("causal, window", [(True, (-1, -1)), (False, (-1, -1)), (False, (1, 0)), (False, (0, 2)),
                                            (True, (2, 0))])
def test_every_row_sees_a_key_agrees_with_the_dense_mask(docs, causal, window):
    """What lets the flash-style kernels skip their lse fix-up (+inf -> -inf) must never claim a row
    sees a key when the mask gives it none."""
    meta = dataclasses.replace(varlen_meta(docs, causal, "cpu"), window=window)
    mask = meta.dense_mask("cpu")
    rows_see_keys = bool(mask.any(dim=1).all()) if mask.shape[0] else True
    if meta.every_row_sees_a_key:
        assert rows_see_keys, (docs, causal, window)
    if all(lq == lk for lq, lk in docs):  # square documents: exact
        assert meta.every_row_sees_a_key == rows_see_keys


def check_varlen_block(backend, device, meta: VarlenMeta, dtype) -> None:
    """Packed documents forward and backward against a dense float64 computation."""
    offsets_q, offsets_k = meta.offsets_q, meta.offsets_k
    gen = torch.Generator().manual_seed(1)
    q, dout = (torch.randn(offsets_q[-1], 4, 32, generator=gen).to(device, dtype) for _ in range(2))
    k, v = (torch.randn(offsets_k[-1], 2, 32, generator=gen).to(device, dtype) for _ in range(2))
    out, lse = backend.forward_varlen(q, k, v, meta, BlockOptions(softmax_scale=0.3))
    assert out.shape == q.shape and lse.shape == (4, q.shape[0])
    # float64 reference through the dense mask
    qd, kd, vd = (t.double().requires_grad_() for t in (q, k, v))
    s = torch.einsum("ihd,jhd->hij", qd, kd.repeat_interleave(2, 1)) * 0.3
    s = s.masked_fill(~meta.dense_mask(device), float("-inf"))
    ref_lse = torch.logsumexp(s, -1)
    ref = torch.einsum("hij,jhd->ihd", torch.exp(s - ref_lse[..., None]), vd.repeat_interleave(2, 1))
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert (lse.double() - ref_lse).abs().max() < 1e-4
    assert (out.double() - ref).abs().max() <= tol * ref.abs().max()
    grads = backend.backward_varlen(dout, q, k, v, out, lse, meta, BlockOptions(softmax_scale=0.3))
    for got, want in zip(grads, torch.autograd.grad(ref, (qd, kd, vd), dout.double())):
        assert got.shape == want.shape
        assert (got.double() - want).abs().max() <= tol * want.abs().max()


def test_cudnn_refuses_packed_documents():
    call = KernelCall(device_type="cuda", dtype=torch.bfloat16, head_dim=64,
                      bands=(Band(None, 0),), varlen=True)
    reasons = BACKENDS["cudnn"].not_supported_reasons(call)
    assert reasons and (not torch.cuda.is_available() or any("varlen" in r for r in reasons))

"""Bad input and unsupported options fail early with clear errors (single process, W = 1), and a
process outside the group is refused (gloo, W = 2)."""

from __future__ import annotations

import pytest
import torch

import ring_flash_attn as rfa


def qkv(b=1, s=8, h=4, hk=2, d=16, dtype=torch.float32):
    return torch.randn(b, s, h, d, dtype=dtype), torch.randn(b, s, hk, d, dtype=dtype), torch.randn(b, s, hk, d, dtype=dtype)


@pytest.mark.parametrize("make,error,match", [
    (lambda: (torch.randn(8, 4, 16), *qkv()[1:]), ValueError, "4 dims"),
    (lambda: (qkv()[0], torch.randn(2, 8, 2, 16), qkv()[2]), ValueError, "same shape"),
    (lambda: (qkv()[0], *qkv(b=2)[1:]), ValueError, "batch or sequence"),
    (lambda: (qkv()[0], *qkv(s=6)[1:]), ValueError, "batch or sequence"),
    (lambda: (qkv()[0], *qkv(d=32)[1:]), ValueError, "head dim"),
    (lambda: qkv(h=4, hk=3), ValueError, "multiple of nheads_k"),
    (lambda: (qkv()[0].half(), *qkv()[1:]), TypeError, "share a dtype"),
    (lambda: tuple(t.int() for t in qkv()), TypeError, "dtype"),
    (lambda: (qkv()[0], qkv()[1].to("meta"), qkv()[2]), ValueError, "one device"),
    (lambda: ([1, 2], *qkv()[1:]), TypeError, "torch.Tensor"),
])
def test_bad_tensors(make, error, match):
    with pytest.raises(error, match=match):
        rfa.ring_flash_attn_func(*make())


def test_window_options():
    with pytest.raises(ValueError, match="sliding windows need a flash-style kernel"):
        rfa.ring_flash_attn_varlen_func(torch.zeros(8, 2, 16), torch.zeros(8, 2, 16), torch.zeros(8, 2, 16),
                                        torch.tensor([0, 8], dtype=torch.int32), 8, window_size=(2, 0),
                                        backend="torch_cpu_flash")
    with pytest.raises(ValueError, match="sliding windows need a flash-style kernel"):
        rfa.zigzag_llama3_flash_attn_varlen_func(torch.zeros(8, 2, 16), torch.zeros(8, 2, 16), torch.zeros(8, 2, 16),
                                                 torch.tensor([0, 8], dtype=torch.int32), 8, window_size=(2, 0),
                                                 backend="torch_cpu_flash")
    with pytest.raises(ValueError, match=">= -1"):
        rfa.ring_flash_attn_func(*qkv(), window_size=(-3, 0))
    with pytest.raises(TypeError, match="pair of ints"):
        rfa.ring_flash_attn_func(*qkv(), window_size=4)
    with pytest.raises(ValueError, match="sliding windows need a flash-style kernel"):
        rfa.ring_flash_attn_func(*qkv(), window_size=(2, 0), backend="torch_cpu_flash")


def test_dropout_options():
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        rfa.ring_flash_attn_func(*qkv(), dropout_p=1.0)
    with pytest.raises(ValueError, match="no dropout"):
        rfa.ring_flash_attn_func(*qkv(), dropout_p=0.1, backend="torch_cpu_flash")


def test_softcap_options():
    with pytest.raises(ValueError, match=">= 0"):
        rfa.ring_flash_attn_func(*qkv(), softcap=-1.0)
    for bad in (float("nan"), float("inf")):  # accepted once, and every output came out NaN
        with pytest.raises(ValueError, match="finite number >= 0"):
            rfa.ring_flash_attn_func(*qkv(), softcap=bad)
    with pytest.raises(ValueError, match="no softcap.*flash_attn_2"):
        rfa.ring_flash_attn_func(*qkv(), softcap=30.0, backend="torch_cpu_flash")


def test_zigzag_needs_even_local_length():
    with pytest.raises(ValueError, match="multiple of 2"):
        rfa.zigzag_ring_flash_attn_func(*qkv(s=7))


def test_packed_shapes():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="kv"):
        rfa.ring_flash_attn_kvpacked_func(q, torch.stack([k, v, v], 2))
    with pytest.raises(ValueError, match="qkv"):
        rfa.stripe_flash_attn_qkvpacked_func(torch.stack([q, q], 2))


def test_group_without_distributed():
    with pytest.raises(ValueError, match="not initialized"):
        rfa.ring_flash_attn_func(*qkv(), group=object())


def test_world_size_one_matches_sdpa():  # signatures: test_compat_surface.py
    q, k, v = qkv(h=4, hk=4)
    out = rfa.stripe_flash_attn_func(q, k, v, causal=True)
    ref = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), is_causal=True)
    torch.testing.assert_close(out, ref.transpose(1, 2), atol=1e-5, rtol=1e-5)


def not_a_member(rank: int, world_size: int):
    """Rank 1 builds a group of rank 0 alone and calls with it; it must be refused clearly."""
    import torch.distributed as dist

    group = dist.new_group([0])
    if rank == 0:
        return "ok"
    try:
        rfa.ring_flash_attn_func(*qkv(), group=group)
    except ValueError as err:
        return str(err)
    return "no error"


def test_process_outside_group_is_refused(dist_pool):
    answers = dist_pool(2).run("test_validation:not_a_member")
    assert "not a member" in answers[1]


def test_deterministic_calls_avoid_kernels_without_a_deterministic_backward():
    from ring_flash_attn.kernels import BACKENDS, KernelCall
    from ring_flash_attn.kernels import reasons as kernel_reasons
    from ring_flash_attn.core.mask import Band

    call = KernelCall("cuda", torch.bfloat16, 128, (Band(None, 0),), deterministic=True)
    for name in ("cudnn", "flash_attn_3", "flash_attn_4"):
        assert any("no deterministic backward" in r for r in kernel_reasons(BACKENDS[name], call)), name
    assert not any("deterministic" in r for r in kernel_reasons(BACKENDS["torch_cuda_flash"], call))


def test_zigzag_llama3_needs_documents_in_2w_chunks():
    x = torch.zeros(10, 2, 16)
    with pytest.raises(ValueError, match="pad the documents"):  # a 5-token document does not cut into 2 chunks
        rfa.zigzag_llama3_flash_attn_varlen_func(x, x, x, torch.tensor([0, 5, 10], dtype=torch.int32), 5)
    out = rfa.zigzag_llama3_flash_attn_varlen_func(x, x, x, torch.tensor([0, 4, 10], dtype=torch.int32), 6)
    assert out.shape == x.shape


def _packed(tokens=8):
    return torch.randn(tokens, 4, 16), torch.randn(tokens, 2, 16), torch.randn(tokens, 2, 16)


@pytest.mark.parametrize("scale", [0.0, -0.5, float("nan"), float("inf"), True, "0.1"])
def test_softmax_scale_must_be_finite_and_positive(scale):
    for call in (lambda: rfa.zigzag_ring_flash_attn_func(*qkv(), softmax_scale=scale, causal=True),
                 lambda: rfa.zigzag_llama3_flash_attn_varlen_func(*_packed(), torch.tensor([0, 8], dtype=torch.int32),
                                                                  8, softmax_scale=scale)):
        with pytest.raises(ValueError, match="softmax_scale"):
            call()


@pytest.mark.parametrize("stride,error", [(0, ValueError), (-1, ValueError), (3, ValueError), (True, TypeError),
                                           (1.0, TypeError)])
def test_heads_k_stride_is_a_positive_divisor_in_every_allgather_function(stride, error):
    """0 is refused as ring-flash-attn refuses it (not read as "all heads"), the same way in the
    llama3 functions (positional), the zigzag_llama3 ones (keyword) and the model adapter's layout."""
    from ring_flash_attn.allgather.api import packed_allgather
    from ring_flash_attn.core.spec import AttentionArgs

    q, k, v = _packed()  # nheads_k = 2
    cu = torch.tensor([0, 4, 8], dtype=torch.int32)
    prepared = rfa.llama3_flash_attn_prepare_cu_seqlens(cu, True, 0, 1)
    calls = {
        "llama3": lambda s: rfa.llama3_flash_attn_varlen_func(q, k, v, *prepared[:4], s, prepared[4], causal=True),
        "llama3 kvpacked": lambda s: rfa.llama3_flash_attn_varlen_kvpacked_func(
            q, torch.stack([k, v], 1), *prepared[:4], s, prepared[4], causal=True),
        "zigzag_llama3": lambda s: rfa.zigzag_llama3_flash_attn_varlen_func(q, k, v, cu, 4, causal=True,
                                                                            heads_k_stride=s),
        "packed_zigzag": lambda s: packed_allgather("packed_zigzag", q, k, v, cu, AttentionArgs(causal=True), s),
    }
    for name, call in calls.items():
        with pytest.raises(error, match="heads_k_stride"):
            call(stride)
        expected = call(None)
        for good in (1, 2):
            torch.testing.assert_close(call(good), expected, rtol=0, atol=1e-6, msg=name)


def test_causal_must_be_a_bool():
    with pytest.raises(TypeError, match="causal must be a bool"):
        rfa.ring_flash_attn_func(*qkv(), causal="False")
    with pytest.raises(TypeError, match="causal must be a bool"):
        rfa.ring_flash_attn_varlen_func(*_packed(), torch.tensor([0, 8], dtype=torch.int32), 8, causal=None)


def test_window_size_must_hold_integers():
    for window in ((2.5, 0), (2.0, 0), (True, 1)):
        with pytest.raises(TypeError, match="pair of ints"):
            rfa.ring_flash_attn_func(*qkv(), window_size=window, backend="reference")
    rfa.ring_flash_attn_func(*qkv(), window_size=(torch.tensor(2), 0), backend="reference")  # int-like: accepted


def test_max_seqlen_below_the_longest_document_is_refused():
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    with pytest.raises(ValueError, match="max_seqlen=4 is smaller than the longest document"):
        rfa.ring_flash_attn_varlen_func(*_packed(), cu, 4)
    with pytest.raises(ValueError, match="max_seqlen=4 is smaller"):
        rfa.zigzag_llama3_flash_attn_varlen_func(*_packed(), cu, 4, causal=True)
    prepared = rfa.llama3_flash_attn_prepare_cu_seqlens(cu, True, 0, 1)
    with pytest.raises(ValueError, match="max_seqlen_k=2 is smaller"):
        rfa.llama3_flash_attn_varlen_func(*_packed(), prepared[0], prepared[1], prepared[2], 2, 1, prepared[4])
    with pytest.raises(ValueError, match="never decrease"):
        rfa.ring_flash_attn_varlen_func(*_packed(), torch.tensor([0, 5, 3, 8], dtype=torch.int32), 8)


def test_max_seqlen_and_local_k_slice_must_be_what_prepare_gives():
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    with pytest.raises(TypeError, match="max_seqlen must be an int"):
        rfa.ring_flash_attn_varlen_func(*_packed(), cu, None)
    cu_q, cu_k, max_q, max_k, k_slice = rfa.llama3_flash_attn_prepare_cu_seqlens(cu, True, 0, 1)
    with pytest.raises(TypeError, match="max_seqlen_q must be an int"):
        rfa.llama3_flash_attn_varlen_func(*_packed(), cu_q, cu_k, None, max_k, 1, k_slice)
    for bad in (slice(0, 8, 2), slice(0, None), slice(0, 9), slice(1, 8), slice(-1, 7)):
        with pytest.raises(ValueError, match="local_k_slice"):
            rfa.llama3_flash_attn_varlen_func(*_packed(), cu_q, cu_k, max_q, max_k, 1, bad, causal=True)
    rfa.llama3_flash_attn_varlen_func(*_packed(), cu_q, cu_k, max_q, max_k, 1, k_slice, causal=True)


def test_empty_pack_and_meta_cu_seqlens():
    empty = torch.tensor([0, 0], dtype=torch.int32)
    with pytest.raises(ValueError, match="empty"):
        rfa.llama3_flash_attn_prepare_cu_seqlens(empty, True, 0, 1)
    with pytest.raises(ValueError, match="empty"):
        rfa.zigzag_llama3_flash_attn_varlen_func(*_packed(0), empty, 0)
    with pytest.raises(ValueError, match="meta device"):
        rfa.ring_flash_attn_varlen_func(*_packed(), torch.tensor([0, 8], dtype=torch.int32, device="meta"), 8)


def test_cpu_cu_seqlens_written_behind_the_version_counter_is_seen():
    """Writes through ``.data`` or NumPy do not bump the version counter: the new boundaries count."""
    q, k, v = _packed()
    cu = torch.tensor([0, 4, 8], dtype=torch.int32)
    out = rfa.ring_flash_attn_varlen_func(q, k, v, cu, 8, causal=True, backend="reference")
    cu.data[1] = 2
    changed = rfa.ring_flash_attn_varlen_func(q, k, v, cu, 8, causal=True, backend="reference")
    cu.numpy()[1] = 4
    back = rfa.ring_flash_attn_varlen_func(q, k, v, cu, 8, causal=True, backend="reference")
    fresh = rfa.ring_flash_attn_varlen_func(q, k, v, torch.tensor([0, 2, 8], dtype=torch.int32), 8, causal=True,
                                            backend="reference")
    assert torch.equal(changed, fresh) and not torch.equal(changed, out) and torch.equal(back, out)


def test_double_backward_is_refused():
    """Second derivatives are not computed (flash-attn's functions are once-differentiable too): asking
    for them raises instead of returning wrong values, whatever the kernel."""
    for backend in ("reference", "torch_cpu_flash"):
        q, k, v = (t.requires_grad_() for t in qkv())
        out = rfa.ring_flash_attn_func(q, k, v, causal=True, backend=backend)
        (dq,) = torch.autograd.grad(out.square().sum(), q, create_graph=True)
        with pytest.raises(RuntimeError, match="twice"):
            dq.sum().backward()

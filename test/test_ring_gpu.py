"""The correctness suite on GPUs over NCCL, for every CUDA block kernel: every layout x packing x
causal, batch and packed (varlen, all five families), bf16 and fp16, MHA and GQA, forward and
backward against the float64 reference.

Skipped without CUDA. Run on a GPU machine with ``python -m pytest -q test/test_ring_gpu.py``
(W = 1 and every W up to the number of GPUs, at most 8)."""

from __future__ import annotations

import itertools

import pytest
import torch

from helpers.attention_cases import PACKINGS, VIEWS, compare, nonfinite_rows
from helpers.cases import Case, allowed_pairs, check, fit_documents, gathered, global_inputs, reference
from helpers.dropout_cases import DropoutCase, check_dropout
from ring_flash_attn.kernels import BACKENDS

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
WORLD_SIZES = [w for w in (1, 2, 4, 8) if w <= GPUS]
pytestmark = pytest.mark.gpu


def _cases() -> list:
    cases = []
    for n, (w, backend, layout, packing, causal, dtype) in enumerate(itertools.product(
            WORLD_SIZES or [2], ("cudnn", "torch_cuda_flash"), ("ring", "zigzag", "stripe"), PACKINGS, (True, False),
            ("bf16", "fp16"))):
        mha = packing == "qkvpacked" or n % 3 == 0
        cases.append(Case(layout=layout, packing=packing, causal=causal, dtype=dtype, backend=backend, world_size=w,
                          batch=2, local_len=256, nheads=8, nheads_k=8 if mha else 2, head_dim=(64, 128)[n % 2],
                          seed=n, device="cuda"))
    for w, layout in itertools.product(WORLD_SIZES or [2], ("ring", "zigzag", "stripe")):  # fp32 via the reference
        cases.append(Case(layout=layout, packing="func", causal=True, dtype="fp32", backend="auto", world_size=w,
                          local_len=64, nheads=4, nheads_k=2, head_dim=64, device="cuda"))
    # sliding windows through FA2's window arguments (cuDNN takes none): narrower and wider than a block
    for n, (w, layout, causal, window) in enumerate(itertools.product(
            WORLD_SIZES or [2], ("ring", "zigzag", "stripe"), (True, False), ((100, -1), (300, 50)))):
        cases.append(Case(layout=layout, packing="func", causal=causal, dtype="bf16", backend="torch_cuda_flash",
                          world_size=w, batch=2, local_len=256, nheads=8, nheads_k=2, head_dim=128, window=window,
                          seed=n, device="cuda"))
    # packed documents: FA2 (cuDNN refuses varlen, see kernels/torch_cuda.py), and auto
    for n, (w, backend, layout, packing, causal) in enumerate(itertools.product(
            WORLD_SIZES or [2], ("torch_cuda_flash", "auto"),
            ("ring", "zigzag", "stripe", "llama3", "zigzag_llama3", "packed_zigzag", "balanced", "balanced_llama3"),
            PACKINGS, (True, False))):
        unit = 2 * w * 8
        docs = (unit * 3, unit, unit * 5, unit * 2) if n % 3 else (unit * 6,)
        if layout in ("llama3", "zigzag_llama3", "packed_zigzag", "balanced", "balanced_llama3"):
            docs = fit_documents(layout, w, (200, 1, 37, 700, 5, 2 * w * 16) if n % 3 else (unit * 6,))
        mha = packing == "qkvpacked"
        cases.append(Case(layout=layout, packing=packing, causal=causal, dtype=("bf16", "fp16")[n % 2],
                          backend=backend, world_size=w, documents=docs, nheads=8, nheads_k=8 if mha else 2,
                          head_dim=(64, 128)[n % 2], heads_k_stride=(None, 1)[n % 2] if not mha else None,
                          seed=n, device="cuda"))
    # sliding windows on packed documents (ring family): per-document flash window pieces, FA2 varlen
    for n, (w, layout, causal, window) in enumerate(itertools.product(
            WORLD_SIZES or [2], ("ring", "zigzag", "stripe", "balanced"), (True, False), ((100, -1), (300, 50)))):
        unit = 2 * w * 8
        docs = (unit * 3, unit, unit * 5, unit * 2)
        if layout == "balanced":
            docs = fit_documents(layout, w, (200, 1, 37, 700, 5, 2 * w * 16))
        cases.append(Case(layout=layout, packing="func", causal=causal, dtype="bf16", backend="torch_cuda_flash",
                          world_size=w, documents=docs, nheads=8, nheads_k=2, head_dim=128, window=window, seed=n,
                          device="cuda"))
    # non-causal sliding windows on the all-gather family: several varlen calls per head chunk
    for n, (w, layout, window) in enumerate(itertools.product(
            WORLD_SIZES or [2], ("llama3", "zigzag_llama3", "packed_zigzag", "balanced_llama3"),
            ((100, -1), (300, 50), (-1, 40)))):
        docs = fit_documents(layout, w, (200, 1, 37, 700, 5, 2 * w * 16))
        cases.append(Case(layout=layout, packing="func", causal=False, dtype="bf16", backend="torch_cuda_flash",
                          world_size=w, documents=docs, nheads=8, nheads_k=2, head_dim=128, window=window,
                          heads_k_stride=1, seed=n, device="cuda"))
    if BACKENDS["flash_attn_4"].interface() is not None:  # a few cases: every new shape JIT-compiles
        for layout, causal in itertools.product(("ring", "zigzag", "stripe"), (True, False)):
            cases.append(Case(layout=layout, packing="func", causal=causal, dtype="bf16", backend="flash_attn_4",
                              world_size=max(WORLD_SIZES or [2]), batch=1, local_len=256, nheads=8, nheads_k=2,
                              head_dim=128, device="cuda"))
        for layout in ("zigzag", "stripe"):  # soft-capped logits through flash-attn-4
            cases.append(Case(layout=layout, packing="func", causal=True, dtype="bf16", backend="flash_attn_4",
                              world_size=max(WORLD_SIZES or [2]), batch=1, local_len=256, nheads=8, nheads_k=2,
                              head_dim=128, softcap=5.0, q_scale=4.0, device="cuda"))
        for layout in ("zigzag", "llama3"):
            w = max(WORLD_SIZES or [2])
            cases.append(Case(layout=layout, packing="func", causal=True, dtype="bf16", backend="flash_attn_4",
                              world_size=w, documents=(96 * w, 32 * w, 128 * w), nheads=8, nheads_k=2, head_dim=128,
                              device="cuda"))
    return cases


SINK_CASES = [
    Case(layout=layout, packing="func", causal=causal, dtype="bf16", backend=backend, world_size=w, batch=2,
         local_len=256, nheads=8, nheads_k=2, head_dim=128, lse_grad=causal, sinks=True, seed=n, device="cuda")
    for n, (w, backend, layout, causal) in enumerate(itertools.product(
        WORLD_SIZES or [2], ("cudnn", "torch_cuda_flash"), ("zigzag", "stripe"), (True, False)))
] + [
    Case(layout=layout, packing="func", causal=True, dtype="bf16", backend="torch_cuda_flash", world_size=w,
         documents=fit_documents(layout, w, (200, 1, 37, 700, 5, 2 * w * 16)), nheads=8, nheads_k=2, head_dim=128,
         sinks=True, seed=w, device="cuda")
    for w, layout in itertools.product(WORLD_SIZES or [2], ("llama3", "zigzag_llama3", "balanced", "balanced_llama3"))
]


CASES = _cases() + SINK_CASES  # attention sinks through the CUDA kernels


@pytest.mark.skipif(not GPUS, reason="needs CUDA GPUs")
@pytest.mark.parametrize("case", CASES, ids=[c.id() for c in CASES])
def test_gpu_matches_float64_reference(dist_pool, case):
    if case.world_size > GPUS:
        pytest.skip(f"needs {case.world_size} GPUs")
    check(case, dist_pool(case.world_size, "nccl").run("helpers.cases:run_rank", case=case))


DROPOUT_CASES = [
    DropoutCase(layout=layout, causal=causal, world_size=w, dtype=dtype, device="cuda", local_len=128,
                nheads=8, nheads_k=2, head_dim=64, mean_samples=100, seed=n)
    for n, (w, layout, causal, dtype) in enumerate(itertools.product(
        WORLD_SIZES or [2], ("ring", "zigzag", "stripe"), (True, False), ("fp16", "bf16")))
] + [DropoutCase(layout=layout, causal=True, world_size=max(WORLD_SIZES or [2]), dtype="fp16", device="cuda",
                 doc_lengths=(256, 64, 192), nheads=8, nheads_k=2, head_dim=64, mean_samples=100, seed=99)
     for layout in ("zigzag", "llama3", "zigzag_llama3")
] + [DropoutCase(layout="zigzag", causal=True, world_size=w, dtype="bf16", device="cuda", local_len=128, nheads=8,
                 nheads_k=2, head_dim=64, mean_samples=100, ulysses_degree=u, seed=120 + w + u)
     for w in WORLD_SIZES or [2] for u in sorted({1, w, max(1, w // 2)})]


@pytest.mark.skipif(not GPUS, reason="needs CUDA GPUs")
@pytest.mark.parametrize("case", DROPOUT_CASES, ids=[c.id() for c in DROPOUT_CASES])
def test_gpu_dropout_is_replayed_exactly(dist_pool, case):
    """PyTorch's FA2 with dropout: each block's philox state replayed in the backward (test_dropout.py)."""
    check_dropout(case, dist_pool(case.world_size, "nccl").run("helpers.dropout_cases:run_rank", case=case))


DETERMINISTIC_CASES = [
    Case(layout=layout, packing="func", causal=causal, dtype="bf16", backend="auto", world_size=w, batch=2,
         local_len=512, nheads=8, nheads_k=2, head_dim=128, deterministic=True, seed=n, device="cuda")
    for n, (w, layout, causal) in enumerate(itertools.product(WORLD_SIZES or [2], ("zigzag", "stripe"), (True, False)))
]


@pytest.mark.skipif(not GPUS, reason="needs CUDA GPUs")
@pytest.mark.parametrize("case", DETERMINISTIC_CASES, ids=[c.id() for c in DETERMINISTIC_CASES])
def test_gpu_deterministic_runs_are_bitwise_equal(dist_pool, case):
    """deterministic=True: auto picks a kernel with a deterministic backward (not cuDNN); two runs
    give the same bits on every rank, and match the float64 reference."""
    pool = dist_pool(case.world_size, "nccl")
    first = pool.run("helpers.cases:run_rank", case=case)
    second = pool.run("helpers.cases:run_rank", case=case)
    for a, b in zip(first, second):
        for name in a:
            assert torch.equal(a[name], b[name]), name
    check(case, first)


# Inputs PyTorch can represent but kernels mishandle: NaN / Inf, strided views, a loss that uses lse.
GPU_KERNELS = ("cudnn", "torch_cuda_flash")
POISONS = ((("q", float("nan")),), (("k", float("nan")),), (("v", float("nan")),), (("v", float("inf")),),
           (("q", float("nan")), ("v", float("inf"))))


def _unusual_input_cases() -> list:
    cases = []
    for n, (w, backend, layout, causal, poison) in enumerate(itertools.product(
            WORLD_SIZES or [2], GPU_KERNELS, ("ring", "zigzag", "stripe"), (True, False), POISONS)):
        token = tuple((name, (n * 37 + 101 * i) % (256 * w), n % 8, value) for i, (name, value) in enumerate(poison))
        cases.append(Case(layout=layout, packing="func", causal=causal, dtype=("bf16", "fp16")[n % 2], backend=backend,
                          world_size=w, batch=2, local_len=256, nheads=8, nheads_k=2, head_dim=128, poison=token,
                          seed=n, device="cuda"))
    for n, (w, backend, layout, view) in enumerate(itertools.product(
            WORLD_SIZES or [2], GPU_KERNELS, ("ring", "zigzag", "stripe"), VIEWS)):
        cases.append(Case(layout=layout, packing="func", causal=n % 2 == 0, dtype="bf16", backend=backend, world_size=w,
                          batch=2, local_len=256, nheads=8, nheads_k=2, head_dim=128, view=view, seed=n, device="cuda"))
    for n, (w, backend, layout, causal) in enumerate(itertools.product(
            WORLD_SIZES or [2], GPU_KERNELS, ("ring", "zigzag", "stripe"), (True, False))):
        cases.append(Case(layout=layout, packing=PACKINGS[n % 3], causal=causal, dtype=("bf16", "fp16")[n % 2],
                          backend=backend, world_size=w, batch=2, local_len=256, nheads=8, nheads_k=8 if n % 3 == 2 else 2,
                          head_dim=128, lse_grad=True, seed=n, device="cuda"))
    for n, (w, layout, extra) in enumerate(itertools.product(
            WORLD_SIZES or [2], ("ring", "zigzag", "stripe", "llama3", "zigzag_llama3"),
            ({"view": "fused"}, {"view": "transposed"}, {"lse_grad": True}, {"poison": (("v", 50, 1, float("nan")),)}))):
        docs = fit_documents(layout, w, (64 * w, 2 * w * 16, 96 * w))
        cases.append(Case(layout=layout, packing="func", causal=n % 2 == 0, dtype="bf16", backend="torch_cuda_flash",
                          world_size=w, documents=docs, nheads=8, nheads_k=2, head_dim=128, seed=n, device="cuda",
                          **extra))
    return cases


UNUSUAL_CASES = _unusual_input_cases()


def _finite_on_one_device(case: Case) -> dict:
    """The rows of out / lse / dq / dk / dv that ``case.backend``'s aten op alone, on the whole sequence
    on one GPU, leaves finite: boolean ``(B, S, heads)`` (lse ``(B, H, S)``)."""
    x = global_inputs(case)
    q, k, v = (x[n].cuda().requires_grad_() for n in "qkv")
    scale, s = case.head_dim ** -0.5, case.seqlen
    if case.backend == "torch_cuda_flash":
        out, lse, *_ = torch.ops.aten._flash_attention_forward(q, k, v, None, None, s, s, 0.0, case.causal, False,
                                                               scale=scale)
    else:
        out, lse, *_ = torch.ops.aten._scaled_dot_product_cudnn_attention(
            *(t.transpose(1, 2) for t in (q, k, v)), None, True, 0.0, case.causal, False, scale=scale)
        out = out.transpose(1, 2)
    grads = torch.autograd.grad(out, (q, k, v), x["dout"].cuda())
    finite = {name: torch.isfinite(t.detach()).all(-1).cpu() for name, t in zip(("out", "dq", "dk", "dv"), (out, *grads))}
    finite["lse"] = torch.isfinite(lse.detach().reshape(case.batch, case.nheads, s)).cpu()
    return finite


@pytest.mark.skipif(not GPUS, reason="needs CUDA GPUs")
@pytest.mark.parametrize("case", UNUSUAL_CASES, ids=[c.id() for c in UNUSUAL_CASES])
def test_gpu_unusual_inputs(dist_pool, case):
    """Strided views and a loss through lse match the float64 reference. NaN / Inf propagate to every
    row that depends on them, except rows that the same kernel alone, on one device, leaves finite:
    PyTorch's FA2 takes its row maximum and sum over the non-NaN scores, so a NaN key leaves lse
    finite, and its backward then gives a finite, meaningless dv for the keys those rows see (out, dq
    and dk are NaN there). Such rows hold no checkable value; cuDNN must have none."""
    if case.world_size > GPUS:
        pytest.skip(f"needs {case.world_size} GPUs")
    per_rank = dist_pool(case.world_size, "nccl").run("helpers.cases:run_rank", case=case)
    if not case.poison or case.packed:
        check(case, per_rank)
        return
    x = global_inputs(case)
    nonfinite = nonfinite_rows(allowed_pairs(case), x["q"], x["k"], x["v"])
    got, ref = gathered(case, per_rank), reference(case)
    for name, finite in _finite_on_one_device(case).items():
        kernel_keeps = nonfinite[name] & finite
        assert case.backend == "torch_cuda_flash" or not kernel_keeps.any(), f"{case.backend} hides NaN in {name}"
        nonfinite[name] &= ~finite
        rows = kernel_keeps if name == "lse" else kernel_keeps[..., None]
        got[name] = torch.where(rows, ref[name], got[name].double())
    compare(case.id(), got, ref, case.dtype, nonfinite=nonfinite)


@pytest.mark.skipif(not GPUS, reason="needs CUDA GPUs")
@pytest.mark.parametrize("scale", [0.0, -0.125, float("nan"), float("inf")])
def test_gpu_bad_softmax_scale_is_refused(scale):
    """softmax_scale <= 0, NaN or inf on CUDA tensors: a ValueError before any kernel runs."""
    import ring_flash_attn as rfa

    q = torch.randn(1, 64, 4, 64, device="cuda", dtype=torch.bfloat16)
    for call in (lambda: rfa.zigzag_ring_flash_attn_func(q, q, q, softmax_scale=scale, causal=True),
                 lambda: rfa.llama3_flash_attn_varlen_func(
                     q[0], q[0], q[0], *rfa.llama3_flash_attn_prepare_cu_seqlens(
                         torch.tensor([0, 64], dtype=torch.int32, device="cuda"), True, 0, 1)[:4], 4,
                     slice(0, 64), softmax_scale=scale, causal=True)):
        with pytest.raises(ValueError, match="softmax_scale"):
            call()


ULYSSES_CASES = [
    Case(layout=layout, packing=packing, causal=causal, dtype="bf16", backend=backend, world_size=w, batch=1,
         local_len=256, nheads=8, nheads_k=8 if packing == "qkvpacked" else 2, head_dim=128, seed=n, device="cuda",
         ulysses_degree=u)
    for n, (w, backend, layout, packing, causal) in enumerate(itertools.product(
        WORLD_SIZES or [2], ("cudnn", "torch_cuda_flash"), ("zigzag", "stripe"), PACKINGS, (True, False)))
    for u in sorted({1, w, max(1, w // 2)})
] + [
    Case(layout=layout, packing="func", causal=causal, dtype="bf16", backend="torch_cuda_flash", world_size=w,
         documents=(64 * w, 16 * w, 1, 47 * w - 1), nheads=8, nheads_k=2, head_dim=128, window=window, seed=n,
         device="cuda", ulysses_degree=w)
    for n, (w, layout, causal, window) in enumerate(itertools.product(
        WORLD_SIZES or [2], ("ring", "llama3"), (True, False), ((-1, -1), (100, 20))))
]


@pytest.mark.skipif(not GPUS, reason="needs CUDA GPUs")
@pytest.mark.parametrize("case", ULYSSES_CASES, ids=[c.id() for c in ULYSSES_CASES])
def test_gpu_ulysses_matches_float64_reference(dist_pool, case):
    if case.world_size > GPUS:
        pytest.skip(f"needs {case.world_size} GPUs")
    check(case, dist_pool(case.world_size, "nccl").run("helpers.cases:run_rank", case=case))


@pytest.mark.skipif(not GPUS, reason="needs CUDA GPUs")
@pytest.mark.parametrize("world_size", WORLD_SIZES or [1])
def test_gpu_fullgraph_compile_matches_eager(dist_pool, world_size):
    """torch.compile(fullgraph=True, dynamic=True) with inductor on the GPU: a bf16 attention block per
    layout (cuDNN / FA2 blocks) within bf16 rounding of eager, no recompilation per length; dropout
    through FA2 bit-equal to eager for the same seed."""
    pool = dist_pool(world_size, "nccl")
    for results in pool.run("helpers.compile_cases:compiled_blocks", layouts=["zigzag", "stripe", "ulysses"],
                            backend="inductor", lengths=(64, 96, 128), device="cuda", dtype="bf16", timeout=600):
        _check_compiled(results, tolerance=3e-2)
    for results in pool.run("helpers.compile_cases:compiled_with_dropout", device="cuda", dtype="fp16", alibi=False,
                            timeout=600):
        assert results.pop("dropout_effect") > 0.1, "dropout left the output unchanged"
        _check_compiled(results, tolerance=0.0)


def _check_compiled(results, tolerance: float) -> None:
    for name, value in results.items():
        if name.endswith("-graphs-last"):
            assert value == results[name.replace("-last", "-first")], f"{name}: recompiled for new shapes"
        elif not name.endswith("-graphs-first"):
            assert value <= tolerance, f"{name}: compiled differs from eager by {value:.3g}"

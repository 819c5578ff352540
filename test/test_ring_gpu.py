"""The correctness suite on GPUs over NCCL, for every CUDA block kernel: every layout x packing x
causal, batch and packed (varlen, all five families), bf16 and fp16, MHA and GQA, forward and
backward against the float64 reference.

Skipped without CUDA. Run on a GPU machine with ``python -m pytest -q test/test_ring_gpu.py``
(W = 1 and every W up to the number of GPUs, at most 8)."""

from __future__ import annotations

import itertools

import pytest
import torch

import attention_cases
import varlen_cases
from attention_cases import PACKINGS, Case
from dropout_cases import DropoutCase
from test_dropout import check_dropout
from ring_flash_attn.kernels import BACKENDS
from varlen_cases import VarlenCase, fit_documents

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
            ("ring", "zigzag", "stripe", "llama3", "zigzag_llama3", "packed_zigzag"), PACKINGS, (True, False))):
        unit = 2 * w * 8
        docs = (unit * 3, unit, unit * 5, unit * 2) if n % 3 else (unit * 6,)
        if layout in ("llama3", "zigzag_llama3", "packed_zigzag"):
            docs = fit_documents(layout, w, (200, 1, 37, 700, 5, 2 * w * 16) if n % 3 else (unit * 6,))
        mha = packing == "qkvpacked"
        cases.append(VarlenCase(layout=layout, packing=packing, causal=causal, dtype=("bf16", "fp16")[n % 2],
                                backend=backend, world_size=w, doc_lengths=docs, nheads=8, nheads_k=8 if mha else 2,
                                head_dim=(64, 128)[n % 2], heads_k_stride=(None, 1)[n % 2] if not mha else None,
                                seed=n, device="cuda"))
    # sliding windows on packed documents (ring family): per-document flash window pieces, FA2 varlen
    for n, (w, layout, causal, window) in enumerate(itertools.product(
            WORLD_SIZES or [2], ("ring", "zigzag", "stripe"), (True, False), ((100, -1), (300, 50)))):
        unit = 2 * w * 8
        cases.append(VarlenCase(layout=layout, packing="func", causal=causal, dtype="bf16", backend="torch_cuda_flash",
                                world_size=w, doc_lengths=(unit * 3, unit, unit * 5, unit * 2), nheads=8, nheads_k=2,
                                head_dim=128, window=window, seed=n, device="cuda"))
    # non-causal sliding windows on the all-gather family: several varlen calls per head chunk
    for n, (w, layout, window) in enumerate(itertools.product(
            WORLD_SIZES or [2], ("llama3", "zigzag_llama3", "packed_zigzag"), ((100, -1), (300, 50), (-1, 40)))):
        docs = fit_documents(layout, w, (200, 1, 37, 700, 5, 2 * w * 16))
        cases.append(VarlenCase(layout=layout, packing="func", causal=False, dtype="bf16", backend="torch_cuda_flash",
                                world_size=w, doc_lengths=docs, nheads=8, nheads_k=2, head_dim=128, window=window,
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
            cases.append(VarlenCase(layout=layout, packing="func", causal=True, dtype="bf16",
                                    backend="flash_attn_4", world_size=w, doc_lengths=(96 * w, 32 * w, 128 * w),
                                    nheads=8, nheads_k=2, head_dim=128, device="cuda"))
    return cases


CASES = _cases()


@pytest.mark.skipif(not GPUS, reason="needs CUDA GPUs")
@pytest.mark.parametrize("case", CASES, ids=[c.id() for c in CASES])
def test_gpu_matches_float64_reference(dist_pool, case):
    if case.world_size > GPUS:
        pytest.skip(f"needs {case.world_size} GPUs")
    module = varlen_cases if isinstance(case, VarlenCase) else attention_cases
    per_rank = dist_pool(case.world_size, "nccl").run(f"{module.__name__}:run_rank", case=case)
    module.check(case, per_rank)


DROPOUT_CASES = [
    DropoutCase(layout=layout, causal=causal, world_size=w, dtype=dtype, device="cuda", local_len=128,
                nheads=8, nheads_k=2, head_dim=64, mean_samples=100, seed=n)
    for n, (w, layout, causal, dtype) in enumerate(itertools.product(
        WORLD_SIZES or [2], ("ring", "zigzag", "stripe"), (True, False), ("fp16", "bf16")))
] + [DropoutCase(layout=layout, causal=True, world_size=max(WORLD_SIZES or [2]), dtype="fp16", device="cuda",
                 doc_lengths=(256, 64, 192), nheads=8, nheads_k=2, head_dim=64, mean_samples=100, seed=99)
     for layout in ("zigzag", "llama3", "zigzag_llama3")]


@pytest.mark.skipif(not GPUS, reason="needs CUDA GPUs")
@pytest.mark.parametrize("case", DROPOUT_CASES, ids=[c.id() for c in DROPOUT_CASES])
def test_gpu_dropout_is_replayed_exactly(dist_pool, case):
    """PyTorch's FA2 with dropout: each block's philox state replayed in the backward (test_dropout.py)."""
    check_dropout(case, dist_pool(case.world_size, "nccl").run("dropout_cases:run_rank", case=case))


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
    first = pool.run("attention_cases:run_rank", case=case)
    second = pool.run("attention_cases:run_rank", case=case)
    for a, b in zip(first, second):
        for name in a:
            assert torch.equal(a[name], b[name]), name
    attention_cases.check(case, first)

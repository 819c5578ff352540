"""CUDA graphs on one GPU (W = 1): a hand-captured ``torch.cuda.graph`` of a forward + backward step
through the batch functions, and through a packed function whose documents were seen before the
capture (no host read of ``cu_seqlens`` inside it), replays to eager's results; a
``torch.compile(mode="reduce-overhead")`` step runs as a CUDA graph (no cudagraph skip) and gives
eager's results. Skipped without CUDA."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, List

import pytest
import torch

import ring_flash_attn as rfa

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmark"))
from benchmark_func import graphed  # noqa: E402  (benchmark/benchmark_func.py: capture after warm-up)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

HEADS, KV_HEADS, DIM, TOKENS = 8, 2, 64, 512


def _inputs(batch: bool) -> List[torch.Tensor]:
    """q, k, v (leaves) and dout on the GPU, bf16: ``(2, S, H, D)`` or packed ``(T, H, D)``."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    lead = (2, TOKENS) if batch else (TOKENS,)
    q, k, v, dout = (torch.randn(*lead, h, DIM, device="cuda", dtype=torch.bfloat16, generator=gen)
                     for h in (HEADS, KV_HEADS, KV_HEADS, HEADS))
    return [q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), dout]


def _step(fn: Callable, tensors: List[torch.Tensor]) -> Callable[[], List[torch.Tensor]]:
    q, k, v, dout = tensors

    def step() -> List[torch.Tensor]:
        out = fn(q, k, v)
        return [out, *torch.autograd.grad(out, (q, k, v), dout)]

    return step


CU = [0, 96, 320, 384, 512]  # packed documents (multiples of 2)
CALLS = {
    "ring": (True, lambda q, k, v: rfa.ring_flash_attn_func(q, k, v, causal=True)),
    "zigzag": (True, lambda q, k, v: rfa.zigzag_ring_flash_attn_func(q, k, v, causal=True)),
    "zigzag_not_causal": (True, lambda q, k, v: rfa.zigzag_ring_flash_attn_func(q, k, v)),
    "stripe": (True, lambda q, k, v: rfa.stripe_flash_attn_func(q, k, v, causal=True)),
    "llama3": (False, lambda q, k, v: rfa.llama3_flash_attn_varlen_func(
        q, k, v, *LLAMA3_ARGS[:4], heads_k_stride=KV_HEADS, local_k_slice=LLAMA3_ARGS[4], causal=True)),
    "ulysses": (True, lambda q, k, v: rfa.ulysses_flash_attn_func(q, k, v, causal=True)),
    "zigzag_varlen": (False, lambda q, k, v: rfa.zigzag_ring_flash_attn_varlen_func(
        q, k, v, CU_TENSOR, 224, causal=True)),
    "balanced": (False, lambda q, k, v: rfa.balanced_ring_flash_attn_varlen_func(q, k, v, CU_TENSOR, 224, causal=True)),
    "balanced_llama3": (False, lambda q, k, v: rfa.balanced_llama3_flash_attn_varlen_func(
        q, k, v, CU_TENSOR, 224, causal=True)),
    "zigzag_llama3": (False, lambda q, k, v: rfa.zigzag_llama3_flash_attn_varlen_func(
        q, k, v, CU_TENSOR, 224, causal=True)),
}
CU_TENSOR = torch.tensor(CU, dtype=torch.int32, device="cuda") if torch.cuda.is_available() else None
# llama3's prepared arguments: host work on cu_seqlens, done once before any capture
LLAMA3_ARGS = rfa.llama3_flash_attn_prepare_cu_seqlens(CU_TENSOR, True, 0, 1) if torch.cuda.is_available() else None


@pytest.mark.parametrize("name", sorted(CALLS))
def test_a_captured_step_replays_to_eagers_results(name):
    batch, fn = CALLS[name]
    tensors = _inputs(batch)
    # the eager results detached: a live autograd graph of an eager step would keep the leaves'
    # AccumulateGrad nodes, made on the default stream, for the capture's backward to meet (torch then
    # makes the default stream wait on the capturing one: cudaErrorStreamCaptureImplicit)
    eager = [t.detach().clone() for t in _step(fn, tensors)()]
    replay = graphed(_step(fn, tensors), torch.device("cuda"))
    for _ in range(2):
        _check_replay(replay(), eager)
    with torch.no_grad():  # new values in the captured inputs: the replay follows them
        for t in tensors[:3]:
            t.mul_(0.5)
    _check_replay(replay(), [t.detach() for t in _step(fn, tensors)()])


def _check_replay(got: List[torch.Tensor], eager: List[torch.Tensor]) -> None:
    """The output bit for bit; the gradients to bf16 rounding (FA2's varlen backward and cuDNN's
    backward without a causal mask sum dq with atomics: a few entries differ by an ulp run to run)."""
    torch.testing.assert_close(got[0], eager[0], rtol=0, atol=0)
    for g, w in zip(got[1:], eager[1:]):
        torch.testing.assert_close(g, w, rtol=2e-2, atol=2e-3)


def test_reduce_overhead_compile_runs_as_a_cuda_graph():
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    tensors = _inputs(batch=True)

    def fn(q, k, v):
        return rfa.zigzag_ring_flash_attn_func(q, k, v, causal=True).float().square().sum()

    compiled = torch.compile(fn, mode="reduce-overhead", fullgraph=True)
    q, k, v, _ = tensors
    want = torch.autograd.grad(fn(q, k, v), (q, k, v))
    for _ in range(3):
        loss = compiled(q, k, v)
        got = torch.autograd.grad(loss, (q, k, v))
    assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"])
    torch.testing.assert_close(loss, fn(q, k, v), rtol=1e-3, atol=1e-3)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=2e-2, atol=2e-2)


def test_dropout_inside_a_capture_is_refused():
    q, k, v, _ = _inputs(batch=True)
    rfa.zigzag_ring_flash_attn_func(q, k, v, causal=True, dropout_p=0.1)  # warm-up, eager: fine
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError) as info:
        with torch.cuda.graph(graph):
            rfa.zigzag_ring_flash_attn_func(q, k, v, causal=True, dropout_p=0.1)
    chain, err = [], info.value
    while err is not None:  # ending the failed capture may raise on top of ours
        chain.append(str(err))
        err = err.__context__
    assert any("inside a CUDA graph capture" in m for m in chain), chain

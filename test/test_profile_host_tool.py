"""``benchmark/profile_host.py``'s ``cudnn_standin`` backend: the cuDNN path's host work (its layout
views, its lse reshapes, the engine and the autograd boundary around it) with the two aten ops
replaced by stand-ins, so that a machine without a GPU counts what a GPU call dispatches."""

from __future__ import annotations

import importlib.util
import os
import sys

import torch

import ring_flash_attn as rfa
from ring_flash_attn.kernels import BACKENDS, torch_cuda

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmark"))  # profile_host imports benchmark_func
_spec = importlib.util.spec_from_file_location("profile_host_tool", os.path.join(ROOT, "benchmark", "profile_host.py"))
profile_host = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(profile_host)

# aten ops per forward + backward of a batch ring call at W = 1 through the cuDNN path (stand-ins
# included: 5 of their own), torch 2.13 CPU: 38 (43 before the eager route stopped allocating the
# absent dropout seed, lse before sinks and sinks' gradient), with a little room
CUDNN_OPS_AT_MOST = 40


def test_the_cudnn_path_dispatches_few_aten_ops(monkeypatch):
    for name in ("_CUDNN_FORWARD", "_CUDNN_BACKWARD"):  # restored afterwards
        monkeypatch.setattr(torch_cuda, name, getattr(torch_cuda, name))
    profile_host.register_cudnn_standin()
    try:
        gen = torch.Generator().manual_seed(0)
        q, k, v, dout = (torch.randn(1, 64, h, 16, generator=gen) for h in (4, 2, 2, 4))
        for t in (q, k, v):
            t.requires_grad_()

        def step() -> None:
            out = rfa.ring_flash_attn_func(q, k, v, causal=True, backend=profile_host.CUDNN_STANDIN)
            grads = torch.autograd.grad(out, (q, k, v), dout)
            assert out.shape == q.shape and [g.shape for g in grads] == [q.shape, k.shape, v.shape]

        step()
        counts = profile_host.op_counts(step, 5)
        aten = sum(n for key, n, _ in counts if key.startswith("aten::"))
        transposes = sum(n for key, n, _ in counts if key == "aten::transpose")
        assert transposes == 12  # q, k, v, out to heads-first and back; dout, q, k, v, out, dq, dk, dv
        assert 0 < aten <= CUDNN_OPS_AT_MOST, sorted(counts, key=lambda c: -c[1])
    finally:
        BACKENDS.pop(profile_host.CUDNN_STANDIN, None)

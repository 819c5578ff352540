"""``benchmark/host_overhead.py``: its measurement at W = 1 in this process (no process group) runs
the cases through the null kernel, counts aten ops, and the table has one row per case; the null
flash_attn stubs for ``--original`` give flash-attn 2.7's shapes; with ``RING_FLASH_ATTN_ORIGINAL`` set to
a checkout of the original ring-flash-attention, its cases run beside ours."""

from __future__ import annotations

import importlib.util
import inspect
import os
import subprocess
import sys

import pytest
import torch

from ring_flash_attn.kernels import BACKENDS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "benchmark", "host_overhead.py")
_spec = importlib.util.spec_from_file_location("host_overhead_tool", TOOL)
host_overhead = sys.modules["host_overhead_tool"] = importlib.util.module_from_spec(_spec)  # dataclasses look it up
_spec.loader.exec_module(host_overhead)

CASES = ["zigzag", "llama3", "sdpa"]


@pytest.fixture
def null_kernel():
    """The tool's null backend, unregistered afterwards (other suites iterate over every backend)."""
    yield host_overhead.null_backend()
    BACKENDS.pop(host_overhead.NULL, None)


def test_measure_runs_the_null_kernel_and_tables_every_case(null_kernel):
    setting = host_overhead.Setting(rank=0, world_size=1, docs=16, doc_tokens=2)
    results = host_overhead.measure(CASES, setting, repeats=3, warmup=1)

    assert null_kernel.calls > 0
    for case in ("zigzag", "llama3"):  # one block forward and one backward per call at W = 1
        assert results[case]["kernel_calls"] == 2
        assert results[case]["ops"] > 0
        assert results[case]["ms"] > 0
    assert results["sdpa"]["kernel_calls"] == 0

    text = host_overhead.table({1: results}, CASES, docs=16, markdown=True)
    first_cells = [line.split(" | ")[0].lstrip("| ") for line in text.splitlines() if line.startswith("| ")]
    assert first_cells == ["case", "---"] + CASES


# aten ops per forward + backward call at W = 1 with the null kernel (torch 2.13, CPU), with some room:
# packed calls pass their (T, H, D) tensors through the engine as they are (no batch dimension added
# and dropped per kernel call: 48 ops before), the all-gather family's one head chunk works on the
# whole tensors and gathers nothing at W = 1 (45 before)
OPS_AT_MOST = {"ring": 10, "packed_ring": 14, "llama3": 18}


def test_a_call_dispatches_few_aten_ops(null_kernel):
    setting = host_overhead.Setting(rank=0, world_size=1, docs=16, doc_tokens=2)
    results = host_overhead.measure(list(OPS_AT_MOST), setting, repeats=3, warmup=1)
    for case, bound in OPS_AT_MOST.items():
        assert 0 < results[case]["ops"] <= bound, (case, results[case]["ops"])


# the package's files a W = 1 call runs code of, and the moves between them, forward and backward
ROUTE_AT_MOST = {"ring": (14, 45), "packed_zigzag": (13, 42), "llama3": (15, 45), "ulysses": (16, 50)}


def test_a_call_takes_a_short_route_to_its_kernels(null_kernel):
    setting = host_overhead.Setting(rank=0, world_size=1, docs=16, doc_tokens=2)
    results = host_overhead.measure(list(ROUTE_AT_MOST), setting, repeats=1, warmup=1)
    for case, (files, moves) in ROUTE_AT_MOST.items():
        assert 0 < results[case]["files"] <= files, (case, results[case]["files"])
        assert results[case]["files"] <= results[case]["moves"] <= moves, (case, results[case]["moves"])


def test_unknown_case_is_refused():
    with pytest.raises(SystemExit):
        host_overhead.parse_args(["--cases", "ring,nonsense"])


ORIGINAL_CHECKOUT = os.environ.get("RING_FLASH_ATTN_ORIGINAL")


def test_null_flash_attn_stubs_give_flash_attn_27_shapes():
    """The null flash_attn stubs: forward ``(out, softmax_lse, S_dmask, rng_state)`` with lse ``(B, H, S)``
    (batch) or ``(H, T)`` (packed); backward zeroes the given dq / dk / dv and returns softmax_d."""
    q, k = torch.ones(1, 8, 4, 16), torch.ones(1, 8, 2, 16)
    out, lse, _, _ = host_overhead.null_flash_attn_forward(q, k, k, 0.0, 0.25, True)
    assert out.shape == q.shape and not out.any()
    assert lse.shape == (1, 4, 8) and lse.dtype == torch.float32
    dq, dk, dv = torch.ones_like(q), torch.ones_like(k), torch.ones_like(k)
    softmax_d = host_overhead.null_flash_attn_backward(q, q, k, k, out, lse, dq, dk, dv, 0.0, 0.25, True, -1, -1,
                                                       0.0, None, False)
    assert softmax_d.shape == (1, 4, 8) and not (dq.any() or dk.any() or dv.any())

    pq, pk, cu = q[0], k[0], torch.tensor([0, 8], dtype=torch.int32)
    out, lse, _, _ = host_overhead.null_flash_attn_varlen_forward(pq, pk, pk, cu, cu, 8, 8, 0.0, 0.25, True)
    assert out.shape == pq.shape and lse.shape == (4, 8)
    dq, dk, dv = torch.ones_like(pq), torch.ones_like(pk), torch.ones_like(pk)
    softmax_d = host_overhead.null_flash_attn_varlen_backward(pq, pq, pk, pk, out, lse, dq, dk, dv, cu, cu, 8, 8,
                                                              0.0, 0.25, True, -1, -1, 0.0, None, False)
    assert softmax_d.shape == (4, 8) and not (dq.any() or dk.any() or dv.any())


def test_null_flash_attn_is_installed_only_meanwhile():
    before = sys.modules.get("flash_attn.flash_attn_interface")
    with host_overhead.null_flash_attn():
        from flash_attn.flash_attn_interface import _flash_attn_varlen_backward
        assert _flash_attn_varlen_backward is host_overhead.null_flash_attn_varlen_backward
        # the original reads defaults by parameter name (get_default_args)
        names = inspect.getfullargspec(_flash_attn_varlen_backward).args
        assert {"dq", "cu_seqlens_q", "window_size_left", "softcap", "deterministic"} <= set(names)
    assert sys.modules.get("flash_attn.flash_attn_interface") is before


def test_original_cases_need_a_checkout():
    with pytest.raises(SystemExit):
        host_overhead.parse_args(["--cases", "orig_ring"])


@pytest.mark.skipif(not ORIGINAL_CHECKOUT, reason="set RING_FLASH_ATTN_ORIGINAL to a ring-flash-attention checkout")
def test_original_cases_run_beside_ours():
    """The whole tool with ``--original`` at W = 1 and 2: a row per original case, figures at W = 2 (the
    original ring family does not run at W = 1 on gloo) and a ratio line per pair."""
    cases = ["ring", "zigzag", "packed_ring", "packed_zigzag", "llama3"]
    command = [sys.executable, TOOL, "--world-sizes", "1", "2", "--repeats", "3", "--docs", "8",
               "--cases", ",".join(cases), "--original", ORIGINAL_CHECKOUT]
    env = dict(os.environ, PYTHONPATH=ROOT)
    text = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, check=True).stdout
    rows = {line.split()[0]: line.split()[1:] for line in text.splitlines() if line.startswith(("orig_", "ring "))}
    assert set(host_overhead.ORIGINAL_CASES) <= set(rows)
    for case in host_overhead.ORIGINAL_CASES:
        assert float(rows[case][1]) > 0  # ms at W = 2
    assert rows["orig_llama3"][0] != "-"
    for original, ours in host_overhead.PAIRS.items():
        assert f"{ours} / {original}: " in text

"""``benchmark/host_overhead.py``: its measurement at W = 1 in this process (no process group) runs
the cases through the null kernel, counts aten ops, and the table has one row per case."""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest

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


def test_unknown_case_is_refused():
    with pytest.raises(SystemExit):
        host_overhead.parse_args(["--cases", "ring,nonsense"])

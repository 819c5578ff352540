"""Cached plans: a repeated call does no planning work (schedules, document metadata, kernel
selection, checks of the offsets), and a call whose cu_seqlens (a new tensor, or a CPU tensor written
in place), shape or options changed is never served a stale plan -- its results are those of a
computation with every cache cleared, bit for bit. W = 1 in this process, W = 2 on a gloo pool.
Also the memoised kernel selection and VarlenMeta's lengths computed once."""

from __future__ import annotations

import pytest
import torch

from helpers.plan_cache_cases import planning_work, stale_plans
from ring_flash_attn import kernels
from ring_flash_attn.core.mask import VarlenMeta

FAMILIES = ("ring", "zigzag", "zigzag_varlen", "balanced", "llama3", "zigzag_llama3", "ulysses", "ulysses_packed")


@pytest.mark.parametrize("family", FAMILIES)
def test_a_repeated_call_does_no_planning_work(family):
    first, second = planning_work(family)
    assert first, f"the counted planners missed the first call of {family}"
    assert second == {}, second


@pytest.mark.parametrize("family", FAMILIES)
def test_changed_documents_shapes_or_options_are_never_served_a_stale_plan(family):
    assert stale_plans(family) == []


@pytest.mark.parametrize("family", ("zigzag_varlen", "balanced", "llama3", "zigzag_llama3", "ulysses_packed"))
def test_plan_caches_on_two_ranks(dist_pool, family):
    for first, second in dist_pool(2).run("helpers.plan_cache_cases:planning_work", family=family):
        assert first and second == {}, (first, second)
    assert dist_pool(2).run("helpers.plan_cache_cases:stale_plans", family=family) == [[], []]


def test_the_memoised_kernel_selection_follows_the_environment_and_the_registry(monkeypatch):
    call = kernels.KernelCall("cpu", torch.float32, 16, (kernels.Band(None, 0),))
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)
    assert kernels.select_backend(call).name == "torch_cpu_flash"
    monkeypatch.setenv(kernels.ENV_VAR, "reference")
    assert kernels.select_backend(call).name == "reference"
    monkeypatch.delenv(kernels.ENV_VAR)

    class Preferred(type(kernels.BACKENDS["reference"])):
        name = "torch_cpu_flash"  # replaces the registered one: a new registry

    monkeypatch.setitem(kernels.BACKENDS, "torch_cpu_flash", Preferred())
    assert isinstance(kernels.select_backend(call), Preferred)
    monkeypatch.undo()
    assert not isinstance(kernels.select_backend(call), Preferred)


def test_varlen_meta_computes_its_lengths_once():
    meta = VarlenMeta.build((0, 3, 3, 7), (0, 2, 5, 9), True, "cpu")
    assert meta.lengths == ((3, 2), (0, 3), (4, 4)) and meta.lengths is meta.lengths
    assert (meta.max_seqlen_q, meta.max_seqlen_k, meta.has_empty_documents, meta.square) == (4, 4, True, False)

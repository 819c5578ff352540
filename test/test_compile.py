"""torch.compile traces the batch ring functions (ring, zigzag, stripe; func / kvpacked / qkvpacked)
into the caller's graph: ``fullgraph=True`` with dynamic sequence lengths, forward and backward (a
loss that uses lse too) equal to eager, no recompilation when the length changes; W = 1, 2, 3 on
CPU over gloo. Inductor for one layout, the traced-graph backend (``aot_eager``) for all of them."""

from __future__ import annotations

import pytest

from helpers.compile_cases import check_compiled

LAYOUTS = ["ring", "zigzag", "stripe"]


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_fullgraph_compile_matches_eager(dist_pool, world_size):
    for results in dist_pool(world_size).run("helpers.compile_cases:compiled_blocks", layouts=LAYOUTS, timeout=600):
        check_compiled(results)


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_packed_documents_fullgraph(dist_pool, world_size):
    """The ring family's varlen functions: documents of changing lengths and counts, cu_seqlens an
    input of the compiled block, no recompilation."""
    for results in dist_pool(world_size).run("helpers.compile_cases:compiled_packed_blocks", layouts=LAYOUTS,
                                             timeout=600):
        check_compiled(results)


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_allgather_family_fullgraph(dist_pool, world_size):
    """llama3 (prepared arguments computed per batch outside the compiled block) and zigzag-llama3;
    at most one recompilation (the first change of a 0 / 1 int argument), none after it."""
    for results in dist_pool(world_size).run("helpers.compile_cases:compiled_packed_blocks",
                                             layouts=["llama3", "zigzag_llama3"], settle=1, timeout=600):
        check_compiled(results)


@pytest.mark.parametrize("ulysses_degree,world_size,ring_layout,packed", [
    (1, 1, "ring", False), (2, 2, "ring", False), (2, 4, "zigzag", False), (2, 2, "ring", True),
    (2, 4, "zigzag_llama3", True), (1, 2, "stripe", True)])
def test_ulysses_fullgraph(dist_pool, ulysses_degree, world_size, ring_layout, packed):
    """Ulysses and Ulysses x ring (batch and packed documents): one graph, equal to eager, no
    recompilation for new lengths or documents."""
    for results in dist_pool(world_size).run("helpers.compile_cases:compiled_ulysses", ulysses_degree=ulysses_degree,
                                             ring_layout=ring_layout, packed=packed, timeout=600):
        check_compiled(results)


@pytest.mark.parametrize("world_size", [2, 3])
def test_inductor_with_windows_and_softcap(dist_pool, world_size):
    """Inductor's generated code around the ops, with a sliding window and soft-capping."""
    for results in dist_pool(world_size).run("helpers.compile_cases:compiled_blocks", layouts=["zigzag"],
                                             backend="inductor", window_size=(3, 0), softcap=5.0,
                                             timeout=600):
        for name, value in results.items():
            if not name.endswith(("-graphs-first", "-graphs-last")):
                assert value <= 1e-5, f"{name}: compiled differs from eager by {value:.3g}"


@pytest.mark.parametrize("world_size", [1, 2])
def test_dropout_and_alibi_trace(dist_pool, world_size):
    """Dropout and ALiBi in one graph: outputs and gradients bit-equal to eager for the same seed
    (dropout masks included), no recompilation for a second length."""
    for results in dist_pool(world_size).run("helpers.compile_cases:compiled_with_dropout", timeout=600):
        assert results.pop("dropout_effect") > 0.1, "dropout left the output unchanged"
        check_compiled(results, tolerance=1e-6)


@pytest.mark.parametrize("layout,packed,ulysses_degree", [("zigzag", False, 1), ("zigzag", True, 1),
                                                         ("ring", True, 1), ("zigzag", False, 2), ("ring", True, 2)])
def test_tiny_llama_compiles_without_graph_breaks(dist_pool, layout, packed, ulysses_degree):
    """transformers' Llama with the registered ring attention, single sequences and packed documents
    (zigzag: the pack as one sequence; ring: llama3's arguments prepared by ``set_packed_batch``), and
    with Ulysses (``ulysses_degree=2``): no graph break (``torch._dynamo.explain``), ``fullgraph=True``
    logits and gradients equal to eager."""
    for results in dist_pool(2).run("helpers.compile_cases:compiled_tiny_llama", layout=layout, packed=packed,
                                    ulysses_degree=ulysses_degree, timeout=600):
        assert results["graph_breaks"] == 0, results
        assert results["logits"] <= 1e-5 and results["grads"] <= 1e-5, results

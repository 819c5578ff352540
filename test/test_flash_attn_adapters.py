"""The flash-attn 2 / 3 / 4 adapters against fakes with the packages' real signatures (2.6, 2.7+,
FA3 recent and older, flash-attn-4): forward, backward, packed documents, and the causal splits of the bottom-right
adapter, on CPU, against the dense float64 computation of test_kernels. On a GPU machine with the
packages installed, the real modules run through test_kernels / test_ring_gpu instead."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch

from helpers import fake_flash_attn
from ring_flash_attn.kernels import KernelCall
from ring_flash_attn.core.mask import Band
from ring_flash_attn.kernels.flash_attn_pkg import FlashAttn2Backend, FlashAttn3Backend, FlashAttn4Backend
from helpers.cases import Case, check, fit_documents
from test_kernels import VARLEN_DOCS, check_block, check_varlen_block, varlen_meta

FAKES = {
    "fa2.6": lambda: FlashAttn2Backend(interface=fake_flash_attn.flash_attn_2_6(), version="2.6.3"),
    "fa2.7": lambda: FlashAttn2Backend(interface=fake_flash_attn.flash_attn_2_7(), version="2.7.4.post1"),
    "fa2.8": lambda: FlashAttn2Backend(interface=fake_flash_attn.flash_attn_2_7(), version="2.8.3"),
    "fa3": lambda: FlashAttn3Backend(interface=fake_flash_attn.flash_attn_3("is_causal")),
    "fa3-old": lambda: FlashAttn3Backend(interface=fake_flash_attn.flash_attn_3("causal")),
    "fa4": lambda: FlashAttn4Backend(interface=fake_flash_attn.flash_attn_4()),
}


@pytest.mark.parametrize("fake", sorted(FAKES))
@pytest.mark.parametrize("band", [Band(), Band(None, 0), Band(None, -1), Band(None, -3), Band(-2, 0), Band(-3, 1),
                                  Band(1, 3), Band(-6, -1), Band(0, None), Band(None, 2), Band(None, 5)], ids=repr)
@pytest.mark.parametrize("sq,sk,h,hk", [(6, 6, 4, 2), (8, 4, 3, 1), (5, 7, 2, 2), (11, 3, 2, 1)])
def test_block(fake, band, sq, sk, h, hk):
    check_block(FAKES[fake](), "cpu", band, torch.float32, sq, sk, h, hk)


@pytest.mark.parametrize("fake", sorted(FAKES))
def test_softcap_reaches_the_kernel(fake):
    check_block(FAKES[fake](), "cpu", Band(None, 0), torch.float32, 6, 6, 4, 2, softcap=0.5)


@pytest.mark.parametrize("fake", sorted(FAKES))
@pytest.mark.parametrize("docs", VARLEN_DOCS, ids=["square", "offsets"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("window", [(-1, -1), (2, -1), (1, 3), (20, 20)])
def test_varlen(fake, docs, causal, window):
    meta = dataclasses.replace(varlen_meta(docs, causal, "cpu"), window=window)
    check_varlen_block(FAKES[fake](), "cpu", meta, torch.float32)


def test_window_pieces_reproduce_every_band_under_fa2_rules():
    """Each piece, run with FA2's window semantics (a window at least as wide as the keys counts as
    unbounded), covers its part of the band exactly; together they cover the band once."""
    from helpers.fake_flash_attn import _flash_band
    from ring_flash_attn.kernels.bottom_right import window_pieces

    for sq, sk in itertools.product(range(1, 9), repeat=2):
        for lo, hi in itertools.product(range(-9, 9), [None, *range(-9, 9)]):
            band = Band(lo, hi).normalized(sq, sk)
            if band is None:
                continue
            got = torch.zeros(sq, sk, dtype=torch.long)
            for piece in window_pieces(band, sq, sk):
                rows, keys = piece.rows.stop - piece.rows.start, piece.keys.stop - piece.keys.start
                assert piece.window[0] >= 0
                got[piece.rows, piece.keys] += _flash_band(rows, keys, False, piece.window, clip=True).allowed(
                    rows, keys).long()
            assert torch.equal(got, band.allowed(sq, sk).long()), (sq, sk, band)


def test_unavailable_and_old_versions_are_reported():
    missing = FlashAttn2Backend()
    missing.module_name = "no_such_flash_attn_module"
    call = KernelCall("cuda", torch.bfloat16, 64, (Band(None, 0),))
    assert "not importable" in missing.not_supported_reasons(call)[0]
    old = FlashAttn2Backend(interface=fake_flash_attn.flash_attn_2_6(), version="2.5.9")
    assert any("older than 2.6" in r for r in old.not_supported_reasons(call))
    assert FlashAttn4Backend(interface=fake_flash_attn.flash_attn_4()).not_supported_reasons(
        KernelCall("cpu", torch.bfloat16, 64, (Band(),))) == ["runs on CUDA tensors only, got cpu"]


RING_WINDOW_CASES = [
    Case(layout=layout, packing="func", causal=causal, dtype="fp32", backend="fake_fa2", world_size=w,
         nheads=4, nheads_k=2, local_len=8, window=window, softcap=cap, seed=i)
    for i, (w, layout, causal, window, cap) in enumerate(itertools.product(
        (2, 3), ("ring", "zigzag", "stripe"), (True, False), ((5, -1), (3, 2), (20, 11)), (0.0,)))
] + [Case(layout="zigzag", packing="func", causal=True, dtype="fp32", backend="fake_fa2", world_size=2, softcap=2.0,
          q_scale=3.0, seed=99)]


@pytest.mark.parametrize("case", RING_WINDOW_CASES, ids=[c.id() for c in RING_WINDOW_CASES])
def test_ring_through_a_flash_style_kernel(dist_pool, case):
    """The whole ring (windows, softcap) through the FA2 adapter with a CPU fake that follows FA2's rules."""
    check(case, dist_pool(case.world_size).run("helpers.fake_flash_attn:run_rank_with_fake_fa2", case=case))


RING_VARLEN_CASES = [
    Case(layout=layout, packing="func", causal=causal, dtype="fp32", backend="fake_fa2", world_size=w,
         documents=(4 * w, 12 * w, 2 * w), nheads_k=2, seed=i)
    for i, (w, layout, causal) in enumerate(itertools.product((2, 3), ("ring", "zigzag", "stripe"), (True, False)))
] + [  # sliding windows: flash window pieces grouped into varlen calls
    Case(layout=layout, packing="func", causal=causal, dtype="fp32", backend="fake_fa2", world_size=w,
         documents=(4 * w, 12 * w, 2 * w), nheads_k=2, window=window, seed=i)
    for i, (w, layout, causal, window) in enumerate(itertools.product(
        (2, 3), ("ring", "zigzag", "stripe"), (True, False), ((3, -1), (5, 2), (1, 9))))
] + [  # the all-gather family: non-causal windows become several varlen calls
    Case(layout=layout, packing="func", causal=causal, dtype="fp32", backend="fake_fa2", world_size=w,
         documents=fit_documents(layout, w, (5, 6 * w + 1, 4 * w)), nheads_k=2, window=window, heads_k_stride=1,
         seed=i)
    for i, (w, layout, causal, window) in enumerate(itertools.product(
        (2, 3), ("llama3", "zigzag_llama3", "packed_zigzag"), (True, False), ((3, -1), (5, 2), (-1, 4))))
]


@pytest.mark.parametrize("case", RING_VARLEN_CASES, ids=[c.id() for c in RING_VARLEN_CASES])
def test_ring_varlen_through_a_flash_style_kernel(dist_pool, case):
    """Packed documents through the FA2 adapter: the jobs' unused rows (documents without keys or
    queries) are left out before the package kernel runs and filled back with 0 / -inf."""
    check(case, dist_pool(case.world_size).run("helpers.fake_flash_attn:run_rank_with_fake_fa2", case=case))

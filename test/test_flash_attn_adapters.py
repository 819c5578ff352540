"""The flash-attn 2 / 3 / 4 adapters against fakes with the packages' real signatures (2.6, 2.7+,
FA3 recent and older, flash-attn-4): forward, backward, packed documents, and the causal splits of the bottom-right
adapter, on CPU, against the dense float64 computation of test_kernels. On a GPU machine with the
packages installed, the real modules run through test_kernels / test_ring_gpu instead."""

from __future__ import annotations

import pytest
import torch

import fake_flash_attn
from ring_flash_attn.kernels import KernelCall
from ring_flash_attn.kernels.base import Band
from ring_flash_attn.kernels.flash_attn_pkg import FlashAttn2Backend, FlashAttn3Backend, FlashAttn4Backend
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
@pytest.mark.parametrize("band", [Band(), Band(None, 0), Band(None, -1), Band(None, -3)], ids=repr)
@pytest.mark.parametrize("sq,sk,h,hk", [(6, 6, 4, 2), (8, 4, 3, 1), (5, 7, 2, 2)])
def test_block(fake, band, sq, sk, h, hk):
    check_block(FAKES[fake](), "cpu", band, torch.float32, sq, sk, h, hk)


@pytest.mark.parametrize("fake", sorted(FAKES))
def test_softcap_reaches_the_kernel(fake):
    check_block(FAKES[fake](), "cpu", Band(None, 0), torch.float32, 6, 6, 4, 2, softcap=0.5)


@pytest.mark.parametrize("fake", sorted(FAKES))
@pytest.mark.parametrize("docs", VARLEN_DOCS, ids=["square", "offsets"])
@pytest.mark.parametrize("causal", [True, False])
def test_varlen(fake, docs, causal):
    check_varlen_block(FAKES[fake](), "cpu", varlen_meta(docs, causal, "cpu"), torch.float32)


def test_unavailable_and_old_versions_are_reported():
    missing = FlashAttn2Backend()
    missing.module_name = "no_such_flash_attn_module"
    call = KernelCall("cuda", torch.bfloat16, 64, 8, 2, (Band(None, 0),))
    assert "not importable" in missing.not_supported_reasons(call)[0]
    old = FlashAttn2Backend(interface=fake_flash_attn.flash_attn_2_6(), version="2.5.9")
    assert any("older than 2.6" in r for r in old.not_supported_reasons(call))
    assert FlashAttn4Backend(interface=fake_flash_attn.flash_attn_4()).not_supported_reasons(
        KernelCall("cpu", torch.bfloat16, 64, 8, 2, (Band(),))) == ["runs on CUDA tensors only, got cpu"]

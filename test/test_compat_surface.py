"""ring-flash-attn 0.1.x's import surface and signatures (test/helpers/original_signatures.py), and its
helpers in ring_flash_attn.utils / adapters.hf_adapter behaving as the original's."""

from __future__ import annotations

import importlib
import inspect
import subprocess
import sys

import pytest
import torch

from helpers.original_signatures import REQUIRED, SIGNATURES, TOP_LEVEL


def _public(module_name: str):
    if module_name.endswith("hf_adapter"):
        pytest.importorskip("transformers")
    return importlib.import_module(module_name)


@pytest.mark.parametrize("module_name", sorted(SIGNATURES))
def test_signatures_match_the_original(module_name):
    module = _public(module_name)
    for name, expected in SIGNATURES[module_name].items():
        params = list(inspect.signature(getattr(module, name)).parameters.values())
        ours = [(p.name, REQUIRED if p.default is p.empty else p.default) for p in params[:len(expected)]]
        assert ours == list(expected), f"{module_name}.{name}: {ours} != {list(expected)}"
        assert all(p.kind is p.POSITIONAL_OR_KEYWORD for p in params[:len(expected)]), name
        extras = params[len(expected):]
        assert all(p.kind in (p.KEYWORD_ONLY, p.VAR_KEYWORD) for p in extras), f"{name}: {extras} not keyword-only"


def test_top_level_names():
    pytest.importorskip("transformers")
    import ring_flash_attn

    for name in TOP_LEVEL:
        assert callable(getattr(ring_flash_attn, name)), name
    from ring_flash_attn import substitute_hf_flash_attn, update_ring_flash_attn_params  # noqa: F401
    from ring_flash_attn.adapters import substitute_hf_flash_attn as again  # noqa: F401


def test_module_paths_hold_the_same_functions():
    import ring_flash_attn
    import ring_flash_attn.zigzag_ring_flash_attn as zz
    from ring_flash_attn.llama3_flash_attn_varlen import llama3_flash_attn_prepare_cu_seqlens

    assert zz.zigzag_ring_flash_attn_func is ring_flash_attn.zigzag_ring_flash_attn_func
    assert llama3_flash_attn_prepare_cu_seqlens is ring_flash_attn.llama3_flash_attn_prepare_cu_seqlens


def test_base_install_imports_without_transformers():
    """``import ring_flash_attn`` (and its module paths) needs nothing but torch; the adapter names
    say what is missing when transformers is absent."""
    code = ("import sys; sys.modules['transformers'] = None\n"
            "import ring_flash_attn, ring_flash_attn.utils, ring_flash_attn.stripe_flash_attn\n"
            "try:\n    ring_flash_attn.substitute_hf_flash_attn\nexcept ImportError as e:\n    print('missing', e)\n")
    out = subprocess.run([sys.executable, "-W", "error", "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("missing") and out.stderr == ""


def test_update_out_and_lse_is_exact():
    from ring_flash_attn.utils import update_out_and_lse

    torch.manual_seed(0)
    b, s, h, d = 2, 5, 3, 4
    q, k, v = torch.randn(b, s, h, d, dtype=torch.float64), torch.randn(b, 9, h, d, dtype=torch.float64), \
        torch.randn(b, 9, h, d, dtype=torch.float64)
    scores = torch.einsum("bihd,bjhd->bhij", q, k)

    def block(cols):
        part = scores[..., cols]
        return torch.einsum("bhij,bjhd->bihd", part.softmax(-1), v[:, cols]).float(), part.logsumexp(-1).float()

    out, lse = update_out_and_lse(None, None, *block(slice(0, 4)))
    assert out.dtype == torch.float32 and lse.shape == (b, s, h, 1)
    out, lse = update_out_and_lse(out, lse, *block(slice(4, 9)))
    full_out, full_lse = block(slice(0, 9))
    torch.testing.assert_close(out, full_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse[..., 0].transpose(1, 2), full_lse, rtol=1e-5, atol=1e-6)
    # a slice of the rows, merged in place
    rest_out, rest_lse = block(slice(4, 9))
    out2, lse2 = update_out_and_lse(*update_out_and_lse(None, None, *block(slice(0, 4))), rest_out[:, 2:],
                                    rest_lse[:, :, 2:], slice_=(slice(None), slice(2, None)))
    torch.testing.assert_close(out2[:, 2:], full_out[:, 2:], rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError):
        update_out_and_lse(None, None, *block(slice(0, 4)), slice_=(slice(None),))


def test_flatten_and_unflatten_varlen_lse():
    from ring_flash_attn.utils import flatten_varlen_lse, unflatten_varlen_lse

    cu = torch.tensor([0, 2, 7], dtype=torch.int32)
    packed = torch.arange(14, dtype=torch.float32).view(7, 2)  # (total, nheads)
    padded = unflatten_varlen_lse(packed[..., None], cu, max_seqlen=5)
    assert padded.shape == (2, 2, 5) and padded[0, :, :2].tolist() == [[0, 2], [1, 3]]
    assert torch.isneginf(padded[0, :, 2:]).all()
    assert torch.equal(flatten_varlen_lse(padded, cu), packed.T)


def test_triton_utils_path_as_the_original_test_file_uses_it():
    """ring-flash-attn's test/test_triton_kernels.py, on CPU: the triton_utils twins agree with the
    utils functions, and both with a direct computation; unflatten keeps the dtype."""
    from ring_flash_attn.triton_utils import flatten_varlen_lse as triton_flatten_varlen_lse
    from ring_flash_attn.triton_utils import unflatten_varlen_lse as triton_unflatten_varlen_lse
    from ring_flash_attn.utils import flatten_varlen_lse, unflatten_varlen_lse

    cu_seqlens = [0, 15, 156, 529]
    cu_seqlens_tensor = torch.tensor(cu_seqlens, dtype=torch.int32)
    batch_size, n_head = len(cu_seqlens) - 1, 5
    max_seqlen = (cu_seqlens_tensor[1:] - cu_seqlens_tensor[:-1]).max().item()
    lse = torch.randn((batch_size, n_head, max_seqlen), dtype=torch.float32, generator=torch.Generator().manual_seed(0))
    flatten_lse = flatten_varlen_lse(lse, cu_seqlens_tensor)
    triton_flatten_lse = triton_flatten_varlen_lse(lse, cu_seqlens_tensor)
    assert torch.all(flatten_lse == triton_flatten_lse)
    direct = torch.cat([lse[i, :, :cu_seqlens[i + 1] - cu_seqlens[i]] for i in range(batch_size)], dim=1)
    assert triton_flatten_lse.shape == (n_head, 529) and torch.equal(triton_flatten_lse, direct)

    flatten_lse = flatten_lse.transpose(-2, -1).unsqueeze(dim=-1)
    triton_flatten_lse = triton_flatten_lse.transpose(-2, -1).unsqueeze(dim=-1)
    unflatten_lse = unflatten_varlen_lse(flatten_lse, cu_seqlens_tensor, max_seqlen)
    triton_unflatten_lse = triton_unflatten_varlen_lse(triton_flatten_lse, cu_seqlens_tensor, max_seqlen)
    assert triton_unflatten_lse.shape == (batch_size, n_head, max_seqlen)
    for i in range(batch_size):
        seqlen = cu_seqlens[i + 1] - cu_seqlens[i]
        assert torch.all(unflatten_lse[i, :, :seqlen] == triton_unflatten_lse[i, :, :seqlen])
        assert torch.equal(triton_unflatten_lse[i, :, :seqlen], lse[i, :, :seqlen])
        assert torch.isneginf(triton_unflatten_lse[i, :, seqlen:]).all()

    packed = torch.randn(529, n_head, dtype=torch.float64)  # (total, nheads) too; the dtype is kept
    padded = triton_unflatten_varlen_lse(packed, cu_seqlens_tensor, max_seqlen + 2)
    assert padded.dtype == torch.float64 and torch.equal(triton_flatten_varlen_lse(padded, cu_seqlens_tensor), packed.T)
    with pytest.raises(ValueError, match="max_seqlen=100"):
        triton_unflatten_varlen_lse(packed, cu_seqlens_tensor, 100)


def test_get_default_args():
    from ring_flash_attn.utils import get_default_args

    def kernel(q, k, v, dropout_p, softmax_scale, causal=False, window_size=(-1, -1), softcap=1.5, *, extra=3):
        return q

    assert get_default_args(kernel) == {"q": None, "k": None, "v": None, "dropout_p": None, "softmax_scale": None,
                                         "causal": False, "window_size": (-1, -1), "softcap": 0.0}
    assert get_default_args(kernel) is get_default_args(kernel)  # cached: callers copy before filling

    @torch.library.custom_op("ring_flash_attn_test::scaled", mutates_args=())
    def scaled(x: torch.Tensor, factor: float = 2.0) -> torch.Tensor:
        return x * factor

    assert get_default_args(scaled) == {"x": None, "factor": 2.0}


def test_hf_adapter_switch_and_signature_adaptation(monkeypatch):
    """use_ring_attn(False) gives transformers' own function back; a transformers signature none of
    the replacements has is adapted by name instead of refused."""
    transformers = pytest.importorskip("transformers")
    from ring_flash_attn.adapters import hf_adapter

    module = transformers.modeling_flash_attention_utils
    seen = []

    def future_flash_attention_forward(query_states, key_states, value_states, attention_mask, query_length,
                                       is_causal, dropout=0.0, new_option=None, **kwargs):
        seen.append("transformers")
        return query_states

    monkeypatch.setattr(module, "_flash_attention_forward", future_flash_attention_forward)
    monkeypatch.setattr(hf_adapter, "RING_ATTN_SWITCH", True)
    monkeypatch.setattr(hf_adapter, "create_ring_flash_attention_forward",
                        lambda group, stride: [lambda query_states, key_states: query_states])
    with pytest.raises(ValueError, match="none of the replacements"):
        hf_adapter.substitute_hf_flash_attn(None, 1)

    def ring(query_states, key_states, value_states, attention_mask, query_length, is_causal, dropout=0.0,
             **kwargs):
        seen.append(("ring", sorted(kwargs)))
        return key_states

    monkeypatch.setattr(hf_adapter, "create_ring_flash_attention_forward", lambda group, stride: [ring])
    hf_adapter.substitute_hf_flash_attn(None, 1)
    q, k = torch.zeros(1), torch.ones(1)
    assert module._flash_attention_forward(q, k, k, None, 1, True, new_option=3) is k
    assert seen[-1] == ("ring", ["new_option"])
    hf_adapter.use_ring_attn(False)
    assert module._flash_attention_forward(q, k, k, None, 1, True) is q and seen[-1] == "transformers"
    hf_adapter.use_ring_attn(True)
    hf_adapter.substitute_hf_flash_attn(None, 1)  # twice: still wraps transformers' own function, once
    assert module._flash_attention_forward.__ring_flash_attn_original__ is future_flash_attention_forward


def test_hf_adapter_requires_update_first(monkeypatch):
    pytest.importorskip("transformers")
    from ring_flash_attn.adapters import hf_adapter

    monkeypatch.setattr(hf_adapter, "DATA_PARAMS", {})
    forward = hf_adapter.create_ring_flash_attention_forward(None, 1)[-1]
    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(RuntimeError, match="update_ring_flash_attn_params"):
        forward(q, q, q, None, 4, True)


def test_prepare_cu_seqlens_returns_tensors_the_caller_owns():
    from ring_flash_attn import llama3_flash_attn_prepare_cu_seqlens

    cu = torch.tensor([0, 5, 12, 16], dtype=torch.int32)
    first = llama3_flash_attn_prepare_cu_seqlens(cu, True, 1, 2)
    first[0].fill_(99)
    first[1].fill_(99)
    again = llama3_flash_attn_prepare_cu_seqlens(cu, True, 1, 2)
    assert again[0].tolist() == [0, 4, 8] and again[1].tolist() == [0, 7, 11]
    assert again[2:] == (4, 7, slice(5, 16))

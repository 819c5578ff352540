"""Worker-side cases that call the package the way the projects using ring-flash-attn 0.1.x do:
the original's own test files, OLMo-core's attention dispatch, EasyContext's zigzag patch,
OpenRLHF's packed-sequence path, axolotl's ring_attn patch and prime-rl's helpers. Each follows
the caller's imports and order of calls (written from reading their public code) on tiny random
inputs or a tiny random Llama, and returns what the parent compares with single-device attention
(float64) or the single-process eager model."""

from __future__ import annotations

import warnings
from typing import Dict, List, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from helpers.attention_cases import mask
from helpers.hf_cases import build_model

Tensor = torch.Tensor


def dense_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool, cu_seqlens: Optional[List[int]] = None,
                    softmax_scale: Optional[float] = None):
    """float64 attention on the whole sequence, ``(B, S, H, D)``; documents never mix. (out, lse (B, H, S))."""
    q, k, v = (t.double() for t in (q, k, v))
    k, v = (t.repeat_interleave(q.shape[2] // k.shape[2], dim=2) for t in (k, v))
    allowed = mask(q.shape[1], causal)
    if cu_seqlens is not None:
        doc = torch.repeat_interleave(torch.arange(len(cu_seqlens) - 1), torch.tensor(cu_seqlens).diff())
        allowed &= doc[:, None] == doc[None, :]
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    scores = torch.einsum("bihd,bjhd->bhij", q, k) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("bhij,bjhd->bihd", scores.softmax(-1), v), scores.logsumexp(-1)


def _rel(x: Tensor, ref: Tensor) -> float:
    return ((x.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-6)).item()


def _errors(local_out, local_lse, local_grads, ref_out, ref_lse, ref_grads) -> Dict[str, float]:
    errors = {"out": _rel(local_out, ref_out), "lse": (local_lse.double() - ref_lse).abs().max().item()}
    errors.update({name: _rel(g, ref_grads[name]) for name, g in local_grads.items()})
    return errors


def _global_qkv(total: int, nheads: int, head_dim: int, batch: int = 1, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(batch, total, 3, nheads, head_dim, generator=gen)
    dout = torch.randn(batch, total, nheads, head_dim, generator=gen)
    return qkv, dout


def _reference_grads(qkv: Tensor, dout: Tensor, causal: bool, cu_seqlens=None):
    x = qkv.double().requires_grad_()
    out, lse = dense_attention(x[:, :, 0], x[:, :, 1], x[:, :, 2], causal, cu_seqlens)
    (dqkv,) = torch.autograd.grad(out, x, dout.double())
    return out.detach(), lse.detach(), dqkv


def original_test_files(rank: int, world_size: int) -> Dict[str, Dict[str, float]]:
    """The calls of ring-flash-attn's own test files (test_*_func.py): a global qkv, this rank's part
    cut out by hand as those files do, ``*_qkvpacked_func(..., return_attn_probs=True)``, backward with
    this rank's part of dout. Errors of out / lse / dqkv against float64 on the whole sequence."""
    from ring_flash_attn import (llama3_flash_attn_prepare_cu_seqlens, llama3_flash_attn_varlen_qkvpacked_func,
                                 ring_flash_attn_qkvpacked_func, ring_flash_attn_varlen_qkvpacked_func,
                                 stripe_flash_attn_qkvpacked_func, zigzag_ring_flash_attn_qkvpacked_func,
                                 zigzag_ring_flash_attn_varlen_qkvpacked_func)

    results = {}
    nheads, d, causal = 5, 8, True
    total = 8 * world_size * 2
    qkv, dout = _global_qkv(total, nheads, d, batch=2)
    ref_out, ref_lse, ref_dqkv = _reference_grads(qkv, dout, causal)
    chunks = lambda t: t.chunk(2 * world_size, dim=1)  # noqa: E731
    local_parts = {
        "ring": lambda t: t.chunk(world_size, dim=1)[rank],
        "zigzag": lambda t: torch.cat([chunks(t)[rank], chunks(t)[2 * world_size - 1 - rank]], dim=1),
        "stripe": lambda t: t[:, rank::world_size],
    }
    funcs = {"ring": ring_flash_attn_qkvpacked_func, "zigzag": zigzag_ring_flash_attn_qkvpacked_func,
             "stripe": stripe_flash_attn_qkvpacked_func}
    for name, fn in funcs.items():
        part = local_parts[name]
        local_qkv = part(qkv).detach().clone().requires_grad_()
        out, lse, _ = fn(local_qkv, dropout_p=0, causal=causal, window_size=(-1, -1), alibi_slopes=None,
                         deterministic=False, return_attn_probs=True)
        out.backward(part(dout))
        results[f"{name}_qkvpacked_func"] = _errors(
            out, lse, {"dqkv": local_qkv.grad}, part(ref_out), part(ref_lse.transpose(1, 2)).transpose(1, 2),
            {"dqkv": part(ref_dqkv)})

    # varlen files: documents whose lengths divide by 2W, local cu_seqlens = global // W
    docs = [4 * world_size, 12 * world_size, 8 * world_size]
    cu = [0, *torch.tensor(docs).cumsum(0).tolist()]
    qkv, dout = _global_qkv(cu[-1], nheads, d, seed=1)
    ref_out, ref_lse, ref_dqkv = _reference_grads(qkv, dout, causal, cu)
    local_cu = torch.tensor(cu, dtype=torch.int32) // world_size
    max_seqlen = max(docs) // world_size

    def varlen_part(layout: str, t: Tensor) -> Tensor:  # t (T, ...): each document cut as the layout says
        pieces = []
        for start, stop in zip(cu[:-1], cu[1:]):
            doc = t[start:stop]
            if layout == "ring":
                pieces.append(doc.chunk(world_size)[rank])
            else:
                c = doc.chunk(2 * world_size)
                pieces += [c[rank], c[2 * world_size - 1 - rank]]
        return torch.cat(pieces)

    for layout, fn in (("ring", ring_flash_attn_varlen_qkvpacked_func),
                       ("zigzag", zigzag_ring_flash_attn_varlen_qkvpacked_func)):
        local_qkv = varlen_part(layout, qkv[0]).detach().clone().requires_grad_()
        out, lse, _ = fn(local_qkv, local_cu, max_seqlen, dropout_p=0, causal=causal, window_size=(-1, -1),
                         alibi_slopes=None, deterministic=False, return_attn_probs=True)
        out.backward(varlen_part(layout, dout[0]))
        results[f"{layout}_varlen_qkvpacked_func"] = _errors(
            out, lse, {"dqkv": local_qkv.grad}, varlen_part(layout, ref_out[0]),
            varlen_part(layout, ref_lse[0].T).T, {"dqkv": varlen_part(layout, ref_dqkv[0])})

    # test_llama3_flash_attn_varlen_func.py: contiguous slices of the pack, prepare, heads_k_stride=1
    cu_llama3 = [0, 3, 5 * world_size + 1, 16 * world_size]
    qkv, dout = _global_qkv(cu_llama3[-1], nheads, d, seed=2)
    ref_out, ref_lse, ref_dqkv = _reference_grads(qkv, dout, causal, cu_llama3)
    local_len = cu_llama3[-1] // world_size
    part = slice(rank * local_len, (rank + 1) * local_len)
    cu_q, cu_k, max_q, max_k, k_slice = llama3_flash_attn_prepare_cu_seqlens(
        torch.tensor(cu_llama3, dtype=torch.int32), causal=causal, rank=rank, world_size=world_size)
    local_qkv = qkv[0, part].detach().clone().requires_grad_()
    out, lse, _ = llama3_flash_attn_varlen_qkvpacked_func(
        local_qkv, cu_q, cu_k, max_q, max_k, heads_k_stride=1, local_k_slice=k_slice, dropout_p=0, causal=causal,
        window_size=(-1, -1), alibi_slopes=None, deterministic=False, return_attn_probs=True)
    out.backward(dout[0, part])
    results["llama3_varlen_qkvpacked_func"] = _errors(out, lse, {"dqkv": local_qkv.grad}, ref_out[0, part],
                                                      ref_lse[0][:, part], {"dqkv": ref_dqkv[0, part]})
    return results


def positional_and_keyword_calls(rank: int, world_size: int) -> Dict[str, Dict[str, float]]:
    """ring-flash-attn's parameter order by position (EasyContext: ``(q, k, v, dropout, softmax_scale,
    causal=)``; the full positional call); OLMo-core's keyword calls of the zigzag batch / varlen and
    llama3 functions, GQA, flattened batch dim for varlen."""
    import ring_flash_attn
    from ring_flash_attn.zigzag_ring_flash_attn import zigzag_ring_flash_attn_func

    results = {}
    gen = torch.Generator().manual_seed(3)
    total, h, hk, d = 8 * world_size, 4, 2, 16
    q, k, v = torch.randn(1, total, h, d, generator=gen), *torch.randn(2, 1, total, hk, d, generator=gen)
    ref_out, ref_lse = dense_attention(q, k, v, True)
    chunks = lambda t: t.chunk(2 * world_size, dim=1)  # noqa: E731
    zig = lambda t: torch.cat([chunks(t)[rank], chunks(t)[2 * world_size - 1 - rank]], dim=1)  # noqa: E731

    out, lse, none = zigzag_ring_flash_attn_func(zig(q), zig(k), zig(v), 0.0, None, True, (-1, -1), None, False, True)
    assert none is None
    results["positional"] = _errors(out, lse, {}, zig(ref_out), zig(ref_lse.transpose(1, 2)).transpose(1, 2), {})
    out = zigzag_ring_flash_attn_func(zig(q), zig(k), zig(v), 0.0, d ** -0.5, causal=True)  # EasyContext
    results["easycontext"] = {"out": _rel(out, zig(ref_out))}
    group = dist.group.WORLD
    out = ring_flash_attn.zigzag_ring_flash_attn_func(zig(q), zig(k), zig(v), dropout_p=0.0, softmax_scale=None,
                                                      causal=True, group=group, window_size=(-1, -1))
    results["olmo_core_zigzag"] = {"out": _rel(out, zig(ref_out))}

    docs = [2 * world_size, 6 * world_size]
    cu = [0, docs[0], sum(docs)]
    ref_out, _ = dense_attention(q[:, :sum(docs)], k[:, :sum(docs)], v[:, :sum(docs)], True, cu)

    def zig_docs(t):
        parts = []
        for a, b in zip(cu[:-1], cu[1:]):
            c = t[:, a:b].chunk(2 * world_size, dim=1)
            parts += [c[rank], c[2 * world_size - 1 - rank]]
        return torch.cat(parts, dim=1)

    local_cu = torch.tensor(cu, dtype=torch.int32) // world_size
    out = ring_flash_attn.zigzag_ring_flash_attn_varlen_func(
        zig_docs(q).flatten(0, 1), zig_docs(k).flatten(0, 1), zig_docs(v).flatten(0, 1), local_cu,
        max(docs) // world_size, dropout_p=0.0, softmax_scale=None, causal=True, group=group, window_size=(-1, -1))
    results["olmo_core_zigzag_varlen"] = {"out": _rel(out, zig_docs(ref_out)[0])}

    cu_t = torch.tensor(cu, dtype=torch.int32)
    cu_q, cu_k, max_q, max_k, k_slice = ring_flash_attn.llama3_flash_attn_prepare_cu_seqlens(
        cu_t, causal=True, rank=rank, world_size=world_size)
    local = slice(rank * total // world_size, (rank + 1) * total // world_size)
    out = ring_flash_attn.llama3_flash_attn_varlen_func(
        q[0, local], k[0, local], v[0, local], cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q,
        max_seqlen_k=max_k, heads_k_stride=1, local_k_slice=k_slice, dropout_p=0.0, causal=True, softmax_scale=None,
        group=group, window_size=(-1, -1))
    results["olmo_core_llama3"] = {"out": _rel(out, ref_out[0, local])}
    return results


# ---- transformers callers: a padded batch of two sequences, as RL / SFT trainers receive it ----

PAD_BATCH = [[5, 9, 2, 7, 7, 1, 3, 0, 0, 0], [4, 8, 8, 6, 2, 3, 9, 1, 5, 2]]
PAD_MASK = [[1] * 7 + [0] * 3, [1] * 10]


def _unpad_pack(sequences: Tensor, attention_mask: Tensor, world_size: int):
    """OpenRLHF-style: drop padding, concatenate rows into (1, total), pad the total to a multiple of W
    (the padding joins the last document), global cu_seqlens, position ids restarting per row."""
    lengths = attention_mask.sum(1)
    packed = sequences[attention_mask.bool()][None]
    position_ids = torch.cat([torch.arange(n) for n in lengths.tolist()])[None]
    rolled = torch.roll(sequences, shifts=-1, dims=1)[attention_mask.bool()][None]  # next token of each position
    cu_seqlens = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
    pad = (world_size - packed.shape[1] % world_size) % world_size
    packed, position_ids, rolled = (F.pad(t, (0, pad)) for t in (packed, position_ids, rolled))
    cu_seqlens[-1] += pad  # in place, as OpenRLHF does
    return packed, position_ids, rolled, cu_seqlens, pad


def _log_probs(logits: Tensor, targets: Tensor) -> Tensor:
    return torch.gather(logits.log_softmax(-1), -1, targets[..., None])[..., 0]


def eager_log_probs_reference() -> Dict[str, object]:
    """One process, eager attention, each row without its padding: per-token log-probs of the next
    token (the last position of a row predicts whatever torch.roll put there) and gradients of their sum."""
    model = build_model("llama")
    sequences, mask = torch.tensor(PAD_BATCH), torch.tensor(PAD_MASK)
    total = []
    for row, m in zip(sequences, mask):
        n = int(m.sum())
        logits = model(input_ids=row[None, :n]).logits
        total.append(_log_probs(logits, torch.roll(row, -1)[None, :n])[0])
    log_probs = torch.cat(total)
    log_probs.sum().backward()
    return {"log_probs": log_probs.detach(), "grads": {n: p.grad.clone() for n, p in model.named_parameters()}}


def _finish_log_probs_step(model, local_ids, local_pos, local_rolled, pad, group) -> Dict[str, object]:
    logits = model(input_ids=local_ids, position_ids=local_pos).logits
    local = _log_probs(logits, local_rolled)
    world, rank, n = dist.get_world_size(group), dist.get_rank(group), local.shape[1]
    real = torch.arange(rank * n, (rank + 1) * n) < world * n - pad  # the padding's log-probs are dropped
    local[:, real].sum().backward()
    every = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(every, local.detach(), group=group)
    log_probs = torch.cat(every, dim=1)[0]
    log_probs = log_probs[:log_probs.numel() - pad]
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    for g in grads.values():
        dist.all_reduce(g, group=group)
    return {"log_probs": log_probs, "grads": grads}


def openrlhf_path(rank: int, world_size: int, attn_implementation: str = "flash_attention_2") -> Dict[str, object]:
    """OpenRLHF: ``substitute_hf_flash_attn(group, heads_k_stride)`` at setup, its own pass-through
    wrapper of transformers' ``_flash_attention_forward`` on top, the model with flash_attention_2
    (``ring_attention`` without flash-attn), then per batch: unpad + pack + pad to W,
    ``update_ring_flash_attn_params(cu_seqlens, group)``, contiguous slices, forward, log-probs,
    all-gather, drop the padding."""
    import transformers
    from ring_flash_attn import substitute_hf_flash_attn, update_ring_flash_attn_params

    group = dist.group.WORLD
    substitute_hf_flash_attn(group, 1)
    patched = transformers.modeling_flash_attention_utils._flash_attention_forward

    def hacked(*args, **kwargs):  # OpenRLHF wraps the substituted function to pass its own position ids
        return patched(*args, **kwargs)

    transformers.modeling_flash_attention_utils._flash_attention_forward = hacked
    try:
        model = build_model("llama")
        model.config._attn_implementation = attn_implementation  # what from_pretrained(attn_implementation=) sets
        packed, position_ids, rolled, cu_seqlens, pad = _unpad_pack(torch.tensor(PAD_BATCH), torch.tensor(PAD_MASK),
                                                                    world_size)
        update_ring_flash_attn_params(cu_seqlens, group)
        local = packed.shape[1] // world_size
        part = slice(rank * local, (rank + 1) * local)
        return _finish_log_probs_step(model, packed[:, part], position_ids[:, part], rolled[:, part], pad, group)
    finally:
        transformers.modeling_flash_attention_utils._flash_attention_forward = patched


def axolotl_path(rank: int, world_size: int) -> Dict[str, object]:
    """axolotl's VARLEN_LLAMA3 path: replace ``hf_adapter.create_ring_flash_attention_forward`` by its
    own (a single function with transformers 4.53's signature calling ``llama3_flash_attn_varlen_func``
    with ``DATA_PARAMS``, ``deterministic=`` and ``group=``), then ``hf_adapter.substitute_hf_flash_attn(
    process_group=, heads_k_stride=)``; per batch cu_seqlens from the position ids and
    ``update_ring_flash_attn_params``. Also counts the calls of its function (it must be the one used)."""
    import ring_flash_attn.adapters.hf_adapter
    from ring_flash_attn import update_ring_flash_attn_params

    calls = []

    def create_ring_flash_attention_forward(process_group, heads_k_stride):
        from ring_flash_attn import llama3_flash_attn_varlen_func
        from ring_flash_attn.adapters.hf_adapter import DATA_PARAMS

        def _flash_attention_forward_v3(query_states, key_states, value_states, attention_mask, query_length,
                                        is_causal, dropout=0.0, position_ids=None, softmax_scale=None,
                                        sliding_window=None, use_top_left_mask=False, softcap=None,
                                        deterministic=None, cu_seq_lens_q=None, cu_seq_lens_k=None,
                                        max_length_q=None, max_length_k=None, target_dtype=None,
                                        attn_implementation=None, **kwargs):
            calls.append(query_states.shape)
            assert is_causal and query_states.size(0) == 1
            out = llama3_flash_attn_varlen_func(
                query_states.squeeze(dim=0), key_states.squeeze(dim=0), value_states.squeeze(dim=0),
                cu_seqlens_q=DATA_PARAMS["cu_seqlens_q"], cu_seqlens_k=DATA_PARAMS["cu_seqlens_k"],
                max_seqlen_q=DATA_PARAMS["max_seqlen_q"], max_seqlen_k=DATA_PARAMS["max_seqlen_k"],
                heads_k_stride=heads_k_stride, local_k_slice=DATA_PARAMS["local_k_slice"], dropout_p=dropout,
                softmax_scale=softmax_scale, causal=True, deterministic=bool(deterministic), group=process_group)
            return out.unsqueeze(dim=0)

        return [_flash_attention_forward_v3]

    original = ring_flash_attn.adapters.hf_adapter.create_ring_flash_attention_forward
    ring_flash_attn.adapters.hf_adapter.create_ring_flash_attention_forward = create_ring_flash_attention_forward
    try:
        group = dist.group.WORLD
        ring_flash_attn.adapters.hf_adapter.substitute_hf_flash_attn(process_group=group, heads_k_stride=1)
        model = build_model("llama")
        model.config._attn_implementation = "flash_attention_2"
        packed, position_ids, rolled, _, pad = _unpad_pack(torch.tensor(PAD_BATCH), torch.tensor(PAD_MASK),
                                                           world_size)
        starts = torch.nonzero(position_ids[0] == 0)[:, 0]  # axolotl: cu_seqlens from the position ids
        cu_seqlens = torch.cat([starts, torch.tensor([position_ids.shape[1]])]).to(torch.int32)
        update_ring_flash_attn_params(cu_seqlens, group)
        local = packed.shape[1] // world_size
        part = slice(rank * local, (rank + 1) * local)
        result = _finish_log_probs_step(model, packed[:, part], position_ids[:, part], rolled[:, part], pad, group)
        result["calls"] = len(calls)
        return result
    finally:
        ring_flash_attn.adapters.hf_adapter.create_ring_flash_attention_forward = original


def compiled_batch_calls(rank: int, world_size: int) -> Dict[str, float]:
    """axolotl's batch path without packing: ``torch.compile(ring_flash_attn_func)`` (and a compiled
    projection + attention block), called with changing sequence lengths; every result against eager."""
    from ring_flash_attn import ring_flash_attn_func

    torch.manual_seed(0)
    compiled = torch.compile(ring_flash_attn_func)
    proj = torch.nn.Linear(16, 3 * 16)

    def block(x):
        q, k, v = proj(x).view(*x.shape[:2], 3, 2, 8).unbind(2)
        return ring_flash_attn_func(q, k, v, causal=True).flatten(2).sum()

    compiled_block = torch.compile(block)
    q, k, v = torch.randn(3, 1, 4, 2, 8)
    # dynamo traces the function into one graph: its work is custom ops (ring/ops.py), no graph break
    errors = {"graph_breaks_in_func": float(torch._dynamo.explain(ring_flash_attn_func)(q, k, v).graph_break_count)}
    for local_len in (4, 6, 5):
        gen = torch.Generator().manual_seed(local_len)
        q, k, v = torch.randn(3, 1, local_len, 2, 8, generator=gen)
        errors[f"func_L{local_len}"] = _rel(compiled(q, k, v, causal=True), ring_flash_attn_func(q, k, v, causal=True))
        x = torch.randn(1, local_len, 16, generator=gen)
        errors[f"block_L{local_len}"] = abs(compiled_block(x).item() - block(x).item()) / abs(block(x).item())
    return errors


def llama3_under_capture_scalar_outputs(rank: int, world_size: int) -> Dict[str, float]:
    """The llama3 test's calls (prepare on the global cu_seqlens, then the varlen function) inside a
    compiled function with ``torch._dynamo.config.capture_scalar_outputs = True``; against eager."""
    from ring_flash_attn import llama3_flash_attn_prepare_cu_seqlens, llama3_flash_attn_varlen_qkvpacked_func

    def step(local_qkv, cu_seqlens):
        cu_q, cu_k, max_q, max_k, k_slice = llama3_flash_attn_prepare_cu_seqlens(cu_seqlens, True, rank, world_size)
        return llama3_flash_attn_varlen_qkvpacked_func(local_qkv, cu_q, cu_k, max_q, max_k, 1, k_slice, causal=True)

    previous = torch._dynamo.config.capture_scalar_outputs
    torch._dynamo.config.capture_scalar_outputs = True
    try:
        compiled = torch.compile(step)
        cu = torch.tensor([0, 3, 7 * world_size, 8 * world_size], dtype=torch.int32)
        local_qkv = torch.randn(8, 3, 2, 8, generator=torch.Generator().manual_seed(rank))
        return {"out": _rel(compiled(local_qkv, cu), step(local_qkv, cu))}
    finally:
        torch._dynamo.config.capture_scalar_outputs = previous


def fresh_params_after_updates(rank: int, world_size: int, trials: int = 30) -> int:
    """update(cu1), forward, update(cu2), update(cu3), forward -- the second forward must use cu3's
    documents, also when cu3 reuses cu1's memory (tensors are dropped and re-made between updates).
    The same for the registry path's set_packed_batch. Returns the number of mismatches."""
    from ring_flash_attn import update_ring_flash_attn_params
    from ring_flash_attn.adapters import hf, hf_adapter

    group = dist.group.WORLD
    gen = torch.Generator().manual_seed(7)
    local, h, d = 6, 2, 8
    total = local * world_size
    q, k, v = torch.randn(3, 1, total, h, d, generator=gen)
    part = slice(rank * local, (rank + 1) * local)
    forward = hf_adapter.create_ring_flash_attention_forward(group, 1)[-1]
    hf.register_ring_attention(group, layout="ring")
    module = torch.nn.Module()
    mismatches = 0

    def random_cu() -> Tensor:
        cuts = sorted(torch.randperm(total - 1, generator=gen)[:2].add(1).tolist())
        return torch.tensor([0, *cuts, total], dtype=torch.int32)

    for _ in range(trials):
        cu1 = random_cu()
        update_ring_flash_attn_params(cu1, group)
        hf.set_packed_batch(cu1)
        forward(q[:, part], k[:, part], v[:, part], None, local, True)
        hf.ring_attention_forward(module, *(t[:, part].transpose(1, 2) for t in (q, k, v)), None)
        del cu1
        cu2 = random_cu()
        update_ring_flash_attn_params(cu2, group)
        hf.set_packed_batch(cu2)
        del cu2
        cu3 = random_cu()
        update_ring_flash_attn_params(cu3, group)
        hf.set_packed_batch(cu3)
        want = dense_attention(q, k, v, True, cu3.tolist())[0][:, part]
        got_adapter = forward(q[:, part], k[:, part], v[:, part], None, local, True)
        got_registry, _ = hf.ring_attention_forward(module, *(t[:, part].transpose(1, 2) for t in (q, k, v)), None)
        mismatches += int(_rel(got_adapter, want) > 1e-5) + int(_rel(got_registry, want) > 1e-5)
    hf.set_packed_batch(None)
    return mismatches


def allgather_family_warnings(rank: int, world_size: int) -> List[str]:
    """Warnings raised by one forward+backward of each all-gather function (and the utils comms)."""
    import ring_flash_attn
    from ring_flash_attn.utils import AllGatherComm

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        q, k, v = (torch.randn(16, 2, 8, requires_grad=True) for _ in range(3))
        cu = torch.tensor([0, 16 * world_size], dtype=torch.int32)
        prepared = ring_flash_attn.llama3_flash_attn_prepare_cu_seqlens(cu, True, rank, world_size)
        ring_flash_attn.llama3_flash_attn_varlen_func(q, k, v, *prepared[:4], 1, prepared[4], causal=True).sum().backward()
        ring_flash_attn.zigzag_llama3_flash_attn_varlen_func(q, k, v, cu, 16 * world_size, causal=True).sum().backward()
        comm = AllGatherComm(dist.group.WORLD)
        comm.all_gather(torch.empty(world_size * 3), torch.ones(3))
        comm.wait()
    return [f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})" for w in caught]


def utils_comms(rank: int, world_size: int) -> Dict[str, object]:
    """ring_flash_attn.utils.RingComm / AllGatherComm as the original's callers use them."""
    from ring_flash_attn.utils import AllGatherComm, RingComm

    comm = RingComm(dist.group.WORLD)
    k, v = torch.full((2, 3), float(rank)), torch.full((4,), 10.0 + rank)
    next_k, next_v = comm.send_recv_kv(k, v)
    comm.wait()
    extra = comm.send_recv(torch.tensor([rank]), torch.empty(1, dtype=torch.long))
    comm.commit()
    comm.wait()
    gather = AllGatherComm(dist.group.WORLD)
    out = torch.empty(world_size, 2)
    gather.all_gather(out, torch.tensor([[rank, -rank]], dtype=torch.float32))
    gather.wait()
    return {"k": next_k, "v": next_v, "extra": extra, "gathered": out, "send_rank": comm.send_rank,
            "recv_rank": comm.recv_rank}


def strided_inputs(rank: int, world_size: int) -> Dict[str, float]:
    """q/k/v as views of every stride pattern (a strided last dim, a (B, S, D, H) tensor transposed, a
    stride-0 expand) through the batch, packed and llama3 functions on each CPU kernel; the error of
    out and of dq/dk/dv against the same call on contiguous copies."""
    import ring_flash_attn as rfa

    gen = torch.Generator().manual_seed(11)
    local, h, d = 6, 2, 8
    views = {
        "last_dim_step2": lambda t: torch.randn(*t.shape[:-1], 2 * d, generator=gen)[..., ::2],
        "transposed": lambda t: torch.randn(*t.shape[:-2], d, t.shape[-2], generator=gen).transpose(-1, -2),
        "expanded": lambda t: torch.randn(*t.shape[:-1], 1, generator=gen).expand(t.shape),
    }
    cu = torch.tensor([0, 2 * world_size, 6 * world_size], dtype=torch.int32)
    cu_q, cu_k, max_q, max_k, k_slice = rfa.llama3_flash_attn_prepare_cu_seqlens(cu, True, rank, world_size)
    calls = {
        "batch": (lambda q, k, v, b: rfa.zigzag_ring_flash_attn_func(q, k, v, causal=True, backend=b), (1, local)),
        "varlen": (lambda q, k, v, b: rfa.ring_flash_attn_varlen_func(q, k, v, cu // world_size, 4, causal=True,
                                                                      backend=b), (local,)),
        "llama3": (lambda q, k, v, b: rfa.llama3_flash_attn_varlen_func(
            q, k, v, cu_q, cu_k, max_q, max_k, 1, k_slice, causal=True, backend=b), (local,)),
    }
    errors = {}
    for (name, (call, lead)), (view_name, make), backend in (
            (c, vw, b) for c in calls.items() for vw in views.items() for b in ("torch_cpu_flash", "reference")):
        template = torch.empty(*lead, h, d)
        viewed = [make(template) for _ in range(3)]
        plain = [t.contiguous().requires_grad_() for t in viewed]
        leaves = [t.detach().requires_grad_() for t in viewed]  # detach keeps the view's strides
        out_view, out_plain = call(*leaves, backend), call(*plain, backend)
        dout = torch.randn(out_plain.shape, generator=gen)
        out_view.backward(dout)
        out_plain.backward(dout)
        key = f"{name}-{view_name}-{backend}"
        errors[key] = max([_rel(out_view, out_plain)] + [_rel(a.grad, b.grad) for a, b in zip(leaves, plain)])
    return errors

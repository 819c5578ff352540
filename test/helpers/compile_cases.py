"""What each rank runs in the torch.compile tests (test_compile.py): a small attention block
(projection, a public function, a loss that may use lse) compiled with ``fullgraph=True`` and dynamic
shapes, called at several sequence lengths, against the same block in eager mode."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch._dynamo.testing import CompileCounterWithBackend

import ring_flash_attn as rfa
from helpers.attention_cases import DTYPES, PACKINGS, public_function
from helpers.cases import groups

HEADS, HEADS_K, DIM = 4, 2, 8


class Block(torch.nn.Module):
    """A projection to q, k, v in the packing's layout, the public function, an output projection."""

    def __init__(self, layout: str, packing: str, use_lse: bool, varlen: bool = False, **options) -> None:
        super().__init__()
        self.fn, self.packing, self.use_lse = public_function(layout, packing, varlen), packing, use_lse
        self.options = options
        heads_k = HEADS if packing == "qkvpacked" else HEADS_K
        self.heads_k = heads_k
        self.qkv = torch.nn.Linear(16, (HEADS + 2 * heads_k) * DIM)
        self.out = torch.nn.Linear(HEADS * DIM, 16)

    def packed(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dim: int) -> tuple:
        """q, k, v as the function's packing takes them (stacked along ``dim``)."""
        if self.packing == "kvpacked":
            return q, torch.stack([k, v], dim)
        if self.packing == "qkvpacked":
            return (torch.stack([q, k, v], dim),)
        return q, k, v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = self.qkv(x).split([HEADS * DIM, self.heads_k * DIM, self.heads_k * DIM], dim=-1)
        q, k, v = q.view(b, s, HEADS, DIM), k.view(b, s, self.heads_k, DIM), v.view(b, s, self.heads_k, DIM)
        out, lse, _ = self.fn(*self.packed(q, k, v, dim=2), return_attn_probs=True, **self.options)
        loss = self.out(out.flatten(2)).square().mean()
        return loss + 1e-2 * lse.square().mean() if self.use_lse else loss


def _compare(block: Block, compiled, x: torch.Tensor) -> float:
    """Largest relative difference between compiled and eager loss and gradients (params and input)."""
    leaves = [x, *block.parameters()]
    got = [compiled(x)]
    got += torch.autograd.grad(got[0], leaves)
    want = [block(x)]
    want += torch.autograd.grad(want[0], leaves)
    return max(((g - w).abs().max() / w.abs().max().clamp_min(1e-6)).item() for g, w in zip(got, want))


def compiled_blocks(rank: int, world_size: int, layouts: List[str], backend: str = "aot_eager",
                    lengths=(4, 6, 8), device: str = "cpu", dtype: str = "fp32", **options) -> Dict[str, float]:
    """For every layout x packing: the difference to eager at each length, and how many graphs
    dynamo compiled after the first length and after the last (equal: no recompilation per length).
    ``device="cuda"``: rank r's GPU, the block in ``dtype``."""
    dev = torch.device(device, rank) if device == "cuda" else torch.device(device)
    results = {}
    for n, (layout, packing) in enumerate((lay, p) for lay in layouts for p in PACKINGS):
        torch.manual_seed(n)
        block = Block(layout, packing, use_lse=n % 2 == 0, causal=n % 3 != 2, **options).to(dev, DTYPES[dtype])
        counter = CompileCounterWithBackend(backend)
        torch._dynamo.reset()
        compiled = torch.compile(block, backend=counter, fullgraph=True, dynamic=True)
        for i, length in enumerate(lengths):
            x = torch.randn(2, length, 16, generator=torch.Generator().manual_seed(100 * rank + length)).to(
                dev, DTYPES[dtype]).requires_grad_()
            results[f"{layout}-{packing}-L{length}"] = _compare(block, compiled, x)
            if i == 0:
                results[f"{layout}-{packing}-graphs-first"] = counter.frame_count
        results[f"{layout}-{packing}-graphs-last"] = counter.frame_count
    return results


def _output_and_grads(fn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seed: int) -> List[torch.Tensor]:
    """``fn``'s output and the gradients of q, k, v (loss: the sum of the output squared), with the
    default generator seeded first."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    torch.manual_seed(seed)
    out = fn(q, k, v)
    return [out.detach(), *torch.autograd.grad(out.square().sum(), (q, k, v))]


def compiled_with_dropout(rank: int, world_size: int, device: str = "cpu", dtype: str = "fp32",
                          alibi: bool = True) -> Dict[str, float]:
    """Dropout (its seed an output of the forward op, an input of the backward) and ALiBi traced with
    ``fullgraph=True``: output and gradients equal to eager for the same ``torch.manual_seed``, batch
    (zigzag), packed documents (ring varlen, zigzag-llama3) and Ulysses, at two lengths without
    recompiling. ``device="cuda"``: rank r's GPU (dropout through PyTorch's FA2: fp16 / bf16)."""
    dev = torch.device(device, rank) if device == "cuda" else torch.device(device)
    slopes = torch.rand(4, device=dev)
    cu = torch.tensor([0, 2, 6], dtype=torch.int32, device=dev)
    functions = {
        "dropout": lambda q, k, v: rfa.zigzag_ring_flash_attn_func(q, k, v, dropout_p=0.3, causal=True),
        "dropout_varlen": lambda q, k, v: rfa.ring_flash_attn_varlen_func(
            q[0], k[0], v[0], torch.tensor([0, q.shape[1]], dtype=torch.int32, device=dev), q.shape[1], dropout_p=0.3,
            causal=True),
        "dropout_allgather": lambda q, k, v: rfa.zigzag_llama3_flash_attn_varlen_func(
            q[0], k[0], v[0], torch.tensor([0, 2 * world_size, q.shape[1] * world_size], dtype=torch.int32, device=dev),
            q.shape[1] * world_size, dropout_p=0.3, causal=True),
        "dropout_ulysses": lambda q, k, v: rfa.ulysses_flash_attn_func(q, k, v, dropout_p=0.3, causal=True),
        "alibi": lambda q, k, v: rfa.ring_flash_attn_func(q, k, v, alibi_slopes=slopes, causal=True),
        "alibi_packed": lambda q, k, v: rfa.zigzag_llama3_flash_attn_varlen_func(
            q[0], k[0], v[0], cu * world_size, 4 * world_size, alibi_slopes=slopes, causal=True),
    }
    if not alibi:
        functions = {name: fn for name, fn in functions.items() if not name.startswith("alibi")}
    results = {}
    for name, fn in functions.items():
        counter = CompileCounterWithBackend("aot_eager")
        torch._dynamo.reset()
        compiled = torch.compile(fn, backend=counter, fullgraph=True, dynamic=not name.startswith("alibi"))
        for i, length in enumerate((6,) if name.startswith("alibi") else (6, 10)):
            q, k, v = (torch.randn(1, length, h, DIM, generator=torch.Generator().manual_seed(rank + h))
                       .to(dev, DTYPES[dtype]) for h in (4, 2, 2))
            got = _output_and_grads(compiled, q, k, v, seed=7)
            want = _output_and_grads(fn, q, k, v, seed=7)
            results[f"{name}-L{length}"] = max((g - w).abs().max().item() for g, w in zip(got, want))
            if i == 0:
                results[f"{name}-graphs-first"] = counter.frame_count
        results[f"{name}-graphs-last"] = counter.frame_count
    without = rfa.zigzag_ring_flash_attn_func(q, k, v, causal=True)
    results["dropout_effect"] = (_output_and_grads(functions["dropout"], q, k, v, seed=7)[0] - without).abs().max().item()
    return results


def compiled_tiny_llama(rank: int, world_size: int, layout: str = "zigzag", packed: bool = False,
                        ulysses_degree: int = 1) -> Dict[str, float]:
    """A tiny random Llama with our registered attention (single sequences, or packed documents; the
    ring or Ulysses x ring): dynamo's graph breaks, and the ``fullgraph=True`` compiled logits and
    gradients against eager."""
    from ring_flash_attn import adapters
    from ring_flash_attn.adapters import hf
    from helpers.hf_cases import build_model

    model = build_model("llama")
    model.set_attn_implementation(hf.register_ring_attention(None, layout=layout, ulysses_degree=ulysses_degree))
    cu = torch.tensor([0, 3 * world_size, 5 * world_size, 8 * world_size], dtype=torch.int32) if packed else None
    hf.set_packed_batch(cu, from_position_ids=False)  # compiled: position ids are not read
    ids = torch.randint(0, 96, (1, 8 * world_size), generator=torch.Generator().manual_seed(0))
    local = adapters.shard_inputs(ids, ids.clone(), cu_seqlens=cu, layout=layout, ulysses_degree=ulysses_degree)
    inputs = dict(input_ids=local["input_ids"], position_ids=local["position_ids"])
    breaks = torch._dynamo.explain(model)(**inputs).graph_break_count
    results = {"graph_breaks": float(breaks)}
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    for name, run in (("compiled", compiled), ("eager", model)):
        logits = run(**inputs).logits
        adapters.sharded_causal_lm_loss(logits, local["shift_labels"]).backward()
        results[name] = (logits.detach(), model.model.embed_tokens.weight.grad.clone())
        model.zero_grad()
    (lc, gc), (le, ge) = results.pop("compiled"), results.pop("eager")
    results["logits"] = ((lc - le).abs().max() / le.abs().max()).item()
    results["grads"] = ((gc - ge).abs().max() / ge.abs().max()).item()
    return results


class PackedBlock(Block):
    """:class:`Block` over packed documents: x ``(T, 16)``, the layout's varlen function with the
    arguments that follow q, k, v (``cu_seqlens``, ``max_seqlen``, ...)."""

    def __init__(self, layout: str, packing: str, use_lse: bool, **options) -> None:
        super().__init__(layout, packing, use_lse, varlen=True, **options)

    def forward(self, x: torch.Tensor, *call_args) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = self.qkv(x).split([HEADS * DIM, self.heads_k * DIM, self.heads_k * DIM], dim=-1)
        q, k, v = q.view(t, HEADS, DIM), k.view(t, self.heads_k, DIM), v.view(t, self.heads_k, DIM)
        out, lse, _ = self.fn(*self.packed(q, k, v, dim=1), *call_args, return_attn_probs=True, **self.options)
        loss = self.out(out.flatten(1)).square().mean()
        return loss + 1e-2 * lse.square().mean() if self.use_lse else loss


def _packed_args(layout: str, global_lengths, causal: bool, rank: int, world_size: int) -> tuple:
    """The arguments after q, k, v of the layout's varlen function for documents of these global
    lengths, and this rank's number of tokens."""
    cu = torch.tensor([0, *torch.tensor(global_lengths).cumsum(0).tolist()], dtype=torch.int32)
    if layout == "llama3":
        prepared = rfa.llama3_flash_attn_prepare_cu_seqlens(cu, causal, rank, world_size)
        return (*prepared[:4], 1, prepared[4]), int(cu[-1]) // world_size
    if layout in ("zigzag_llama3", "ulysses", "balanced", "balanced_llama3"):  # global cu_seqlens
        return (cu, max(global_lengths)), int(cu[-1]) // world_size
    local = torch.div(cu, world_size, rounding_mode="floor")
    return (local, max(global_lengths) // world_size), int(local[-1])


def compiled_packed_blocks(rank: int, world_size: int, layouts: List[str], settle: int = 0,
                           documents: Optional[Sequence[Tuple[int, ...]]] = None, packings: Sequence[str] = PACKINGS,
                           **options) -> Dict[str, float]:
    """Like :func:`compiled_blocks` for the packed functions: documents of changing lengths and
    counts, ``cu_seqlens`` (llama3: its prepared arguments, computed per batch outside the compiled
    block) inputs of the compiled block, read on the host inside the op. ``graphs-first`` is counted
    after batch ``settle`` (dynamo specializes an int argument that is 0 or 1 when first seen, such as
    llama3's ``local_k_slice.start``: one recompilation when it first changes). ``documents``: the
    batches' global document lengths (default: lengths in units of 2W, which every layout takes);
    ``packings``: which of func / kvpacked / qkvpacked to compile."""
    results = {}
    batches = ((1, 2, 1), (2, 1, 1, 2), (3,), (1, 1, 2, 1))  # document lengths in units of 2W
    if documents is None:
        documents = [tuple(2 * world_size * n for n in lengths) for lengths in batches]
    for n, (layout, packing) in enumerate((lay, p) for lay in layouts for p in packings):
        torch.manual_seed(n)
        causal = n % 3 != 2
        block = PackedBlock(layout, packing, use_lse=n % 2 == 0, causal=causal, **options)
        counter = CompileCounterWithBackend("aot_eager")
        torch._dynamo.reset()
        compiled = torch.compile(block, backend=counter, fullgraph=True, dynamic=True)
        for i, lengths in enumerate(documents):
            call_args, tokens = _packed_args(layout, lengths, causal, rank, world_size)
            x = torch.randn(tokens, 16, generator=torch.Generator().manual_seed(10 * rank + i), requires_grad=True)
            leaves = [x, *block.parameters()]
            got = [compiled(x, *call_args)]
            got += torch.autograd.grad(got[0], leaves)
            want = [block(x, *call_args)]
            want += torch.autograd.grad(want[0], leaves)
            results[f"{layout}-{packing}-docs{lengths}"] = max(
                ((g - w).abs().max() / w.abs().max().clamp_min(1e-6)).item() for g, w in zip(got, want))
            if i == settle:
                results[f"{layout}-{packing}-graphs-first"] = counter.frame_count
        results[f"{layout}-{packing}-graphs-last"] = counter.frame_count
    return results


def compiled_ulysses(rank: int, world_size: int, ulysses_degree: int, ring_layout: str, packed: bool,
                     documents: Optional[Sequence[Tuple[int, ...]]] = None,
                     packings: Sequence[str] = PACKINGS) -> Dict[str, float]:
    """:func:`compiled_blocks` (or :func:`compiled_packed_blocks`) of the Ulysses functions over
    ``ulysses_degree`` x ``world_size / ulysses_degree`` ranks, the ring in ``ring_layout``."""
    options = dict(group=groups(ulysses_degree, world_size), ring_layout=ring_layout)
    if packed:
        return compiled_packed_blocks(rank, world_size, ["ulysses"], documents=documents, packings=packings,
                                      **options)
    return compiled_blocks(rank, world_size, ["ulysses"], **options)


def check_compiled(results: Dict[str, float], tolerance: float = 1e-5) -> None:
    """Assert a compile run's results: every ``*-graphs-last`` count equals its ``*-graphs-first`` (no
    recompilation for new shapes or documents), every other value (compiled against eager) within
    ``tolerance``."""
    for name, value in results.items():
        if name.endswith("-graphs-last"):
            first = results[name.replace("-last", "-first")]
            assert value == first, f"{name}: recompiled for new shapes or documents ({first} -> {value} graphs)"
        elif not name.endswith("-graphs-first"):
            assert value <= tolerance, f"{name}: compiled differs from eager by {value:.3g}"

"""Host time of one public call (forward + backward) with the block kernels replaced by a null kernel.

The null kernel (:class:`NullBackend`, registered here as ``backend="null"``) returns zero outputs of
the right shapes without computing attention, so what a call costs is the library's own Python,
dispatch and communication work: the figure to track when shards are small. CPU, gloo, tiny tensors
(batch: 1 x 64 tokens per rank; packed: ``--docs`` documents of ``2 x lcm(W...)`` tokens each; 4 query
heads, 2 key/value heads, head dim 16, causal). Each world size runs in its own spawned processes
(a gloo group of that size, W = 1 included), so one command measures them all:

    PYTHONPATH=. python benchmark/host_overhead.py [--world-sizes 1 2] [--cases ring,llama3] [--markdown] [--original DIR]

For reference the same run times SDPA (forward + backward) on the batch tensors and an empty
``torch.library.custom_op`` (forward only): the floor a call cannot go below. Per case it reports the
median wall time and the median CPU time of the calling thread per call (at W > 1 on a busy machine
the wall time also holds the waits for the other rank to be scheduled), the growth of both per extra
ring step, the aten ops per call, the null kernel's block calls per call, and the route down to
the kernels: the package's files a call runs code of and the moves between them (:func:`route`).

``--original DIR`` (DIR: a checkout of github.com/zhuzilin/ring-flash-attention) adds ``orig_*`` cases
that time the original library's functions the same way, in the same processes, on the same tensors:
its package is loaded from ``DIR/ring_flash_attn`` under the module name ``original_ring_flash_attn``
(only the submodules the cases need, not its ``__init__`` nor its transformers adapter), with
``flash_attn.flash_attn_interface`` replaced meanwhile by null stubs of flash-attn 2.7's signatures
(:func:`null_flash_attn_forward` and kin: zero outputs of the right shapes, no math; its merges and
communication stay real). The table gets their rows and one "ours / original" ratio line per pair.
Nothing of the original is copied here: the run reads the checkout given.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import math
import os
import socket
import statistics
import sys
import tempfile
import time
import types
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import ring_flash_attn as rfa
from ring_flash_attn.core.mask import Band, VarlenMeta
from ring_flash_attn.kernels import BACKENDS, Backend, BlockOptions, KernelCall, register_backend
from ring_flash_attn.layouts import local_cu_seqlens

Tensor = torch.Tensor
Step = Callable[[], None]

TOKENS_PER_RANK = 64  # batch cases
HEADS, KV_HEADS, HEAD_DIM = 4, 2, 16
NULL = "null"
ORIGINAL = "original_ring_flash_attn"  # the module name the original package is loaded under


class NullBackend(Backend):
    """A block kernel that does no attention math: zero out / lse / gradients of the right shapes.
    Serves every call; counts the block calls it answered in :attr:`calls`."""

    name = NULL
    supports_softcap = supports_dropout = supports_alibi = supports_deterministic = True

    def __init__(self) -> None:
        self.calls = 0

    def not_supported_reasons(self, call: KernelCall) -> List[str]:
        return []

    def forward(self, q: Tensor, k: Tensor, v: Tensor, band: Band, options: BlockOptions) -> Tuple[Tensor, Tensor]:
        self.calls += 1
        batch, rows, heads, _ = q.shape
        return torch.zeros_like(q), q.new_zeros((batch, heads, rows), dtype=torch.float32)

    def backward(self, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, band: Band,
                 options: BlockOptions) -> Tuple[Tensor, Tensor, Tensor]:
        self.calls += 1
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)

    def forward_varlen(self, q: Tensor, k: Tensor, v: Tensor, meta: VarlenMeta,
                       options: BlockOptions) -> Tuple[Tensor, Tensor]:
        self.calls += 1
        return torch.zeros_like(q), q.new_zeros((q.shape[1], q.shape[0]), dtype=torch.float32)

    def backward_varlen(self, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                        meta: VarlenMeta, options: BlockOptions) -> Tuple[Tensor, Tensor, Tensor]:
        self.calls += 1
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)


def null_backend() -> NullBackend:
    """The registered null backend (registered on first use)."""
    if not isinstance(BACKENDS.get(NULL), NullBackend):
        register_backend(NullBackend())
    return BACKENDS[NULL]


@dataclass
class CallCount:
    """How many block calls the null flash_attn stubs answered."""

    calls: int = 0


FLASH_ATTN_STUB = CallCount()


def _null_lse(q: Tensor) -> Tensor:
    """A zero softmax lse for ``q`` as flash-attn 2.7 lays it out: ``(B, H, S)`` for batch q
    ``(B, S, H, D)``, ``(H, T)`` for packed q ``(T, H, D)``."""
    shape = (q.shape[0], q.shape[2], q.shape[1]) if q.dim() == 4 else (q.shape[1], q.shape[0])
    return q.new_zeros(shape, dtype=torch.float32)


def _null_forward(q: Tensor) -> Tuple[Tensor, Tensor, None, None]:
    """flash-attn 2.7's forward result ``(out, softmax_lse, S_dmask, rng_state)``, zero; S_dmask and
    rng_state, which the original drops, are None."""
    FLASH_ATTN_STUB.calls += 1
    return torch.zeros_like(q), _null_lse(q), None, None


def _null_backward(q: Tensor, k: Tensor, v: Tensor, dq: Optional[Tensor], dk: Optional[Tensor],
                   dv: Optional[Tensor]) -> Tensor:
    """flash-attn 2.7's backward: zero the given dq / dk / dv (allocated when None) and return a zero
    softmax_d."""
    FLASH_ATTN_STUB.calls += 1
    for grad, like in ((dq, q), (dk, k), (dv, v)):
        (grad if grad is not None else torch.empty_like(like)).zero_()
    return _null_lse(q)


def null_flash_attn_forward(q: Tensor, k: Tensor, v: Tensor, dropout_p: float, softmax_scale: float,
                            causal: bool, window_size_left: int = -1, window_size_right: int = -1,
                            softcap: float = 0.0, alibi_slopes: Optional[Tensor] = None,
                            return_softmax: bool = False) -> Tuple[Tensor, Tensor, None, None]:
    """Null ``flash_attn.flash_attn_interface._flash_attn_forward`` (flash-attn 2.7 signature)."""
    return _null_forward(q)


def null_flash_attn_varlen_forward(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                                   max_seqlen_q: int, max_seqlen_k: int, dropout_p: float, softmax_scale: float,
                                   causal: bool, window_size_left: int = -1, window_size_right: int = -1,
                                   softcap: float = 0.0, alibi_slopes: Optional[Tensor] = None,
                                   return_softmax: bool = False, block_table: Optional[Tensor] = None,
                                   leftpad_k: Optional[Tensor] = None, seqused_k: Optional[Tensor] = None,
                                   zero_tensors: bool = False) -> Tuple[Tensor, Tensor, None, None]:
    """Null ``_flash_attn_varlen_forward`` (flash-attn 2.7 signature)."""
    return _null_forward(q)


def null_flash_attn_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, softmax_lse: Tensor,
                             dq: Optional[Tensor], dk: Optional[Tensor], dv: Optional[Tensor], dropout_p: float,
                             softmax_scale: float, causal: bool, window_size_left: int, window_size_right: int,
                             softcap: float, alibi_slopes: Optional[Tensor], deterministic: bool,
                             rng_state: Optional[Tensor] = None) -> Tensor:
    """Null ``_flash_attn_backward`` (flash-attn 2.7 signature)."""
    return _null_backward(q, k, v, dq, dk, dv)


def null_flash_attn_varlen_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor,
                                    softmax_lse: Tensor, dq: Optional[Tensor], dk: Optional[Tensor],
                                    dv: Optional[Tensor], cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                                    max_seqlen_q: int, max_seqlen_k: int, dropout_p: float, softmax_scale: float,
                                    causal: bool, window_size_left: int, window_size_right: int, softcap: float,
                                    alibi_slopes: Optional[Tensor], deterministic: bool,
                                    rng_state: Optional[Tensor] = None, zero_tensors: bool = False) -> Tensor:
    """Null ``_flash_attn_varlen_backward`` (flash-attn 2.7 signature)."""
    return _null_backward(q, k, v, dq, dk, dv)


def null_flash_attn_modules() -> Dict[str, types.ModuleType]:
    """``flash_attn`` and ``flash_attn.flash_attn_interface`` modules holding the null stubs."""
    package, interface = types.ModuleType("flash_attn"), types.ModuleType("flash_attn.flash_attn_interface")
    package.__path__ = []
    package.flash_attn_interface = interface
    interface._flash_attn_forward = null_flash_attn_forward
    interface._flash_attn_varlen_forward = null_flash_attn_varlen_forward
    interface._flash_attn_backward = null_flash_attn_backward
    interface._flash_attn_varlen_backward = null_flash_attn_varlen_backward
    return {"flash_attn": package, "flash_attn.flash_attn_interface": interface}


@contextlib.contextmanager
def null_flash_attn() -> Iterator[None]:
    """``flash_attn`` resolves to the null stubs meanwhile; whatever ``sys.modules`` held is restored
    afterwards (modules imported meanwhile keep the stubs they bound)."""
    stubs = null_flash_attn_modules()
    saved = {name: sys.modules.get(name) for name in stubs}
    sys.modules.update(stubs)
    try:
        yield
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def original_module(directory: str, submodule: str) -> types.ModuleType:
    """``submodule`` of the original package in checkout ``directory``, loaded (once) as
    ``original_ring_flash_attn.<submodule>`` against the null flash_attn stubs. The package's
    ``__init__`` is not run (it imports every algorithm and the transformers adapter)."""
    package_dir = os.path.join(os.path.abspath(directory), "ring_flash_attn")
    if ORIGINAL not in sys.modules:
        init = os.path.join(package_dir, "__init__.py")
        if not os.path.isfile(init):
            raise FileNotFoundError(f"{init}: not a checkout of zhuzilin/ring-flash-attention")
        spec = importlib.util.spec_from_file_location(ORIGINAL, init, submodule_search_locations=[package_dir])
        sys.modules[ORIGINAL] = importlib.util.module_from_spec(spec)
    loaded = sys.modules[ORIGINAL].__path__
    if list(loaded) != [package_dir]:
        raise RuntimeError(f"{ORIGINAL} already loaded from {list(loaded)}, not {package_dir}")
    with null_flash_attn():
        return importlib.import_module(f"{ORIGINAL}.{submodule}")


@torch.library.custom_op("host_overhead::empty", mutates_args=())
def empty_op(x: Tensor) -> None:
    """A custom op that does nothing: the dispatcher's cost of one op call."""


@dataclass(frozen=True)
class Setting:
    """Where a case runs and on what.

    Args:
        rank: this process's rank.
        world_size: ranks in the group (W).
        docs: documents in the packed cases.
        doc_tokens: tokens per document (a multiple of 2W for the per-document zigzag layout).
        original: a checkout of the original ring-flash-attention, for the ``orig_*`` cases.
    """

    rank: int
    world_size: int
    docs: int
    doc_tokens: int
    original: Optional[str] = None

    @property
    def group(self) -> Optional[dist.ProcessGroup]:
        """The default group when torch.distributed is initialised (else None: one rank, no group)."""
        return dist.group.WORLD if dist.is_initialized() else None

    @property
    def cu_seqlens(self) -> Tensor:
        """The global cu_seqlens of the pack: ``docs`` documents of ``doc_tokens`` tokens."""
        return torch.arange(self.docs + 1, dtype=torch.int32) * self.doc_tokens

    def randn(self, tokens: int, heads: int, batch: bool) -> Tensor:
        """A global tensor of ``tokens`` tokens and ``heads`` heads: ``(1, tokens, heads, D)`` if
        ``batch``, else packed ``(tokens, heads, D)``; the same on every rank."""
        shape = (1, tokens, heads, HEAD_DIM) if batch else (tokens, heads, HEAD_DIM)
        return torch.randn(shape, generator=torch.Generator().manual_seed(heads))


def qkv_dout(setting: Setting, shard: Callable[[Tensor], Tensor], tokens: int, batch: bool) -> List[Tensor]:
    """This rank's q, k, v (leaves requiring grad) and dout.

    Args:
        setting: where the case runs.
        shard: cuts this rank's part from a global tensor.
        tokens: tokens of the global tensors.
        batch: batch tensors ``(1, S, H, D)``, else packed ``(T, H, D)``.
    """
    heads = (HEADS, KV_HEADS, KV_HEADS, HEADS)
    local = [shard(setting.randn(tokens, h, batch)) for h in heads]
    return [t.requires_grad_() for t in local[:3]] + [local[3]]


def fwd_bwd(call: Callable[[Tensor, Tensor, Tensor], Tensor], tensors: List[Tensor]) -> Step:
    """A step: ``call(q, k, v)`` and the gradients of q, k, v for ``dout``.

    Args:
        call: the attention call on q, k, v.
        tensors: q, k, v (leaves) and dout, as :func:`qkv_dout` gives them.
    """
    q, k, v, dout = tensors

    def step() -> None:
        torch.autograd.grad(call(q, k, v), (q, k, v), dout)

    return step


def batch_case(function: str, layout: str) -> Callable[[Setting], Step]:
    """A batch case: ``rfa.<function>`` on this rank's ``layout`` shard of 64 x W tokens (pure Ulysses
    functions: ``ulysses_degree=W`` sharding)."""

    def build(s: Setting) -> Step:
        ulysses = s.world_size if function.startswith("ulysses") else 1
        tensors = qkv_dout(s, lambda x: rfa.shard(x, layout, s.rank, s.world_size, ulysses_degree=ulysses),
                           TOKENS_PER_RANK * s.world_size, batch=True)
        fn = getattr(rfa, function)
        return fwd_bwd(lambda q, k, v: fn(q, k, v, causal=True, group=s.group, backend=NULL), tensors)

    return build


def packed_case(function: str, layout: str, cu_seqlens: str = "global") -> Callable[[Setting], Step]:
    """A packed case: ``rfa.<function>`` on this rank's share of the pack (pure Ulysses functions:
    ``ulysses_degree=W`` sharding).

    Args:
        function: the public function's name.
        layout: the layout name ``shard_varlen`` takes for it.
        cu_seqlens: what the call gets: ``"global"`` (the pack's), ``"local"`` (the per-document ring
            family's, global // W) or ``"llama3"`` (prepared once with ``llama3_flash_attn_prepare_cu_seqlens``).
    """

    def build(s: Setting) -> Step:
        cu, w = s.cu_seqlens, s.world_size
        ulysses = w if function.startswith("ulysses") else 1
        tensors = qkv_dout(s, lambda x: rfa.shard_varlen(x, cu, layout, s.rank, w, ulysses_degree=ulysses),
                           int(cu[-1]), batch=False)
        fn = getattr(rfa, function)
        common = dict(causal=True, group=s.group, backend=NULL)
        if cu_seqlens == "llama3":
            cu_q, cu_k, max_q, max_k, k_slice = rfa.llama3_flash_attn_prepare_cu_seqlens(cu, True, s.rank, w)
            return fwd_bwd(lambda q, k, v: fn(q, k, v, cu_q, cu_k, max_q, max_k, heads_k_stride=KV_HEADS,
                                              local_k_slice=k_slice, **common), tensors)
        if cu_seqlens == "local":
            local = local_cu_seqlens(cu, layout, w)
            return fwd_bwd(lambda q, k, v: fn(q, k, v, local, s.doc_tokens // w, **common), tensors)
        return fwd_bwd(lambda q, k, v: fn(q, k, v, cu, s.doc_tokens, **common), tensors)

    return build


def sdpa_case(s: Setting) -> Step:
    """Reference: SDPA forward + backward on one rank's batch tensors (no library code)."""
    q, k, v, dout = (t.detach().transpose(1, 2).requires_grad_(t.requires_grad)
                     for t in qkv_dout(s, lambda x: x, TOKENS_PER_RANK, batch=True))
    return fwd_bwd(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
                   [q, k, v, dout])


def empty_op_case(s: Setting) -> Step:
    """Reference: one call of an empty custom op (forward only)."""
    x = torch.zeros(1)
    return lambda: empty_op(x)


def original_function(s: Setting, submodule: str, function: str) -> Callable:
    """The original's ``function`` from its ``submodule`` (the checkout in ``s.original``)."""
    if s.original is None:
        raise ValueError("the orig_* cases need a checkout of the original (--original DIR)")
    return getattr(original_module(s.original, submodule), function)


def original_batch_case(submodule: str, function: str, layout: str) -> Callable[[Setting], Step]:
    """An original batch case: its ``function`` on the same shard as our ``layout`` batch case."""

    def build(s: Setting) -> Step:
        tensors = qkv_dout(s, lambda x: rfa.shard(x, layout, s.rank, s.world_size),
                           TOKENS_PER_RANK * s.world_size, batch=True)
        fn = original_function(s, submodule, function)
        return fwd_bwd(lambda q, k, v: fn(q, k, v, causal=True, group=s.group), tensors)

    return build


def original_packed_case(submodule: str, function: str, layout: str) -> Callable[[Setting], Step]:
    """An original per-document ring-family packed case: its ``function`` on our ``layout`` shard of
    the pack, with the local cu_seqlens (global // W) and max_seqlen ``doc_tokens // W``."""

    def build(s: Setting) -> Step:
        cu, w = s.cu_seqlens, s.world_size
        tensors = qkv_dout(s, lambda x: rfa.shard_varlen(x, cu, layout, s.rank, w), int(cu[-1]), batch=False)
        fn, local = original_function(s, submodule, function), local_cu_seqlens(cu, layout, w)
        return fwd_bwd(lambda q, k, v: fn(q, k, v, local, s.doc_tokens // w, causal=True, group=s.group), tensors)

    return build


def original_llama3_case(s: Setting) -> Step:
    """The original's llama3_flash_attn_varlen_func on our llama3 shard of the pack, its cu_seqlens
    prepared once with its own llama3_flash_attn_prepare_cu_seqlens."""
    cu, w = s.cu_seqlens, s.world_size
    tensors = qkv_dout(s, lambda x: rfa.shard_varlen(x, cu, "llama3", s.rank, w), int(cu[-1]), batch=False)
    prepare = original_function(s, "llama3_flash_attn_varlen", "llama3_flash_attn_prepare_cu_seqlens")
    fn = original_function(s, "llama3_flash_attn_varlen", "llama3_flash_attn_varlen_func")
    cu_q, cu_k, max_q, max_k, k_slice = prepare(cu, True, s.rank, w)
    return fwd_bwd(lambda q, k, v: fn(q, k, v, cu_q, cu_k, max_q, max_k, KV_HEADS, k_slice, causal=True,
                                      group=s.group), tensors)


# name -> (what it calls, how to build its step); the order of the table
CASES: Dict[str, Tuple[str, Callable[[Setting], Step]]] = {
    "ring": ("ring_flash_attn_func, batch", batch_case("ring_flash_attn_func", "ring")),
    "zigzag": ("zigzag_ring_flash_attn_func, batch", batch_case("zigzag_ring_flash_attn_func", "zigzag")),
    "packed_ring": ("ring_flash_attn_varlen_func, local cu_seqlens",
                    packed_case("ring_flash_attn_varlen_func", "ring", "local")),
    "packed_zigzag": ("zigzag_ring_flash_attn_varlen_func, local cu_seqlens",
                      packed_case("zigzag_ring_flash_attn_varlen_func", "zigzag", "local")),
    "llama3": ("llama3_flash_attn_varlen_func, prepared once",
               packed_case("llama3_flash_attn_varlen_func", "llama3", "llama3")),
    "zigzag_llama3": ("zigzag_llama3_flash_attn_varlen_func",
                      packed_case("zigzag_llama3_flash_attn_varlen_func", "zigzag_llama3")),
    "balanced": ("balanced_ring_flash_attn_varlen_func", packed_case("balanced_ring_flash_attn_varlen_func",
                                                                      "balanced")),
    "balanced_llama3": ("balanced_llama3_flash_attn_varlen_func",
                        packed_case("balanced_llama3_flash_attn_varlen_func", "balanced_llama3")),
    "ulysses": ("ulysses_flash_attn_func, batch, U = W", batch_case("ulysses_flash_attn_func", "ring")),
    "ulysses_packed": ("ulysses_flash_attn_varlen_func, U = W",
                       packed_case("ulysses_flash_attn_varlen_func", "ring")),
    "sdpa": ("reference: F.scaled_dot_product_attention, one rank's batch tensors", sdpa_case),
    "empty_op": ("reference: an empty torch.library.custom_op, forward only", empty_op_case),
}
REFERENCES = ("sdpa", "empty_op")  # no library code: no growth with W
# the original's cases (--original DIR): name -> (what it calls, how to build its step)
ORIGINAL_CASES: Dict[str, Tuple[str, Callable[[Setting], Step]]] = {
    "orig_ring": ("original ring_flash_attn_func, batch",
                  original_batch_case("ring_flash_attn", "ring_flash_attn_func", "ring")),
    "orig_zigzag": ("original zigzag_ring_flash_attn_func, batch",
                    original_batch_case("zigzag_ring_flash_attn", "zigzag_ring_flash_attn_func", "zigzag")),
    "orig_packed_ring": ("original ring_flash_attn_varlen_func, local cu_seqlens",
                         original_packed_case("ring_flash_attn_varlen", "ring_flash_attn_varlen_func", "ring")),
    "orig_packed_zigzag": ("original zigzag_ring_flash_attn_varlen_func, local cu_seqlens",
                           original_packed_case("zigzag_ring_flash_attn_varlen",
                                                "zigzag_ring_flash_attn_varlen_func", "zigzag")),
    "orig_llama3": ("original llama3_flash_attn_varlen_func, prepared once", original_llama3_case),
}
PAIRS = {"orig_ring": "ring", "orig_zigzag": "zigzag", "orig_packed_ring": "packed_ring",
         "orig_packed_zigzag": "packed_zigzag", "orig_llama3": "llama3"}  # original case -> ours
ALL_CASES = {**CASES, **ORIGINAL_CASES}
# the smallest world size a case runs at here: the original ring family's backward sends the last dk / dv
# to the next rank even at W = 1, a send to itself that gloo refuses (NCCL allows it)
MIN_WORLD_SIZE = {"orig_ring": 2, "orig_zigzag": 2, "orig_packed_ring": 2, "orig_packed_zigzag": 2}


def runs_at(case: str, world_size: int) -> bool:
    """Whether ``case`` runs at ``world_size`` (see :data:`MIN_WORLD_SIZE`; Ulysses splits the
    ``HEADS`` query heads over the group, so its cases need W to divide them)."""
    if case.startswith("ulysses") and HEADS % world_size:
        return False
    return world_size >= MIN_WORLD_SIZE.get(case, 1)


def median_ms(step: Step, repeats: int, warmup: int) -> Tuple[float, float]:
    """Median wall time and median CPU time of the calling thread for one ``step()``, in ms. On a busy
    machine the wall time also holds the waits for the other rank to be scheduled; the thread's CPU
    time does not (nor the work of gloo's own threads).

    Args:
        step: the call to time.
        repeats: timed calls (each one a sample).
        warmup: untimed calls first.
    """
    for _ in range(warmup):
        step()
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.thread_time()
        step()
        wall.append(time.perf_counter() - start)
        cpu.append(time.thread_time() - start_cpu)
    return 1e3 * statistics.median(wall), 1e3 * statistics.median(cpu)


@contextlib.contextmanager
def stderr_silenced() -> Iterator[None]:
    """File descriptor 2 sent to /dev/null meanwhile (the profiler's C++ start / stop log lines)."""
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def aten_ops(step: Step) -> int:
    """aten ops the host issues in one ``step()``, counted with torch.profiler: every ``aten::`` event
    not nested inside another (an op's own internal ops are not counted; ops run inside the library's
    custom ops and autograd nodes are)."""
    with stderr_silenced(), profile(activities=[ProfilerActivity.CPU]) as prof:
        step()

    def nested(event) -> bool:
        parent = event.cpu_parent
        while parent is not None:
            if parent.name.startswith("aten::"):
                return True
            parent = parent.cpu_parent
        return False

    return sum(1 for e in prof.events() if e.name.startswith("aten::") and not nested(e))


def route(step: Step) -> Tuple[int, int]:
    """The package's files one ``step()`` runs code of, and the moves between them: how many times a
    call enters a function of another file than the previous call's (``sys.setprofile``; rank 0)."""
    package = os.path.dirname(rfa.__file__) + os.sep
    files, moves, last = set(), 0, None

    def on_event(frame, event, arg) -> None:
        nonlocal moves, last
        name = frame.f_code.co_filename
        if event == "call" and name.startswith(package):
            files.add(name)
            moves += name != last
            last = name

    sys.setprofile(on_event)
    try:
        step()
    finally:
        sys.setprofile(None)
    return len(files), moves


def measure(cases: Sequence[str], setting: Setting, repeats: int, warmup: int = 10) -> Dict[str, dict]:
    """Every case on this rank: ``{case: {"ms": median ms per call, "cpu_ms": median CPU ms per call,
    "ops": aten ops per call, "kernel_calls": null-kernel block calls per call, "files" / "moves": see
    :func:`route`}}``; a case that does not run at this world size (:func:`runs_at`) is left out.
    Every rank of the group must call it alike (the calls communicate).

    Args:
        cases: names from :data:`ALL_CASES`.
        setting: where the cases run.
        repeats: timed calls per case (see :func:`median_ms`).
        warmup: untimed calls per case first.
    """
    backend = null_backend()
    results = {}
    for name in (c for c in cases if runs_at(c, setting.world_size)):
        step = ALL_CASES[name][1](setting)
        ms, cpu_ms = median_ms(step, repeats, warmup)
        before = backend.calls + FLASH_ATTN_STUB.calls
        ops = aten_ops(step)
        kernel_calls = backend.calls + FLASH_ATTN_STUB.calls - before
        files, moves = route(step)
        results[name] = {"ms": ms, "cpu_ms": cpu_ms, "ops": ops, "kernel_calls": kernel_calls, "files": files,
                         "moves": moves}
    return results


def worker(rank: int, world_size: int, port: int, args: argparse.Namespace, out_path: str) -> None:
    """One spawned rank: join the gloo group, measure, and (rank 0) write the results with the slowest
    rank's medians."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    doc_tokens = 2 * math.lcm(*args.world_sizes)  # the same documents at every world size: 2W divides them
    results = measure(args.cases, Setting(rank, world_size, args.docs, doc_tokens, args.original), args.repeats)
    timings = ("ms", "cpu_ms")
    slowest = torch.tensor([[results[c][t] for t in timings] for c in results], dtype=torch.float64)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    for case, row in zip(list(results), slowest.tolist()):
        results[case].update(zip(timings, row))
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


def run_world(world_size: int, args: argparse.Namespace) -> Dict[str, dict]:
    """Spawn ``world_size`` ranks and return their results (see :func:`measure`)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out_path = os.path.join(tmp, "results.json")
        mp.spawn(worker, args=(world_size, port, args, out_path), nprocs=world_size)
        with open(out_path) as f:
            return json.load(f)


def table(results: Dict[int, Dict[str, dict]], cases: Sequence[str], docs: int, markdown: bool) -> str:
    """The results as a legend and a table.

    Args:
        results: world size -> case -> figures (as :func:`measure` gives them).
        cases: the rows, in order.
        docs: documents of the packed cases (for the legend).
        markdown: a markdown table, else aligned plain text.
    """
    sizes = sorted(results)
    first = sizes[0]
    more = [w for w in sizes if w > first]
    header = (["case"] + [f"ms W={w}" for w in sizes] + [f"cpu ms W={w}" for w in sizes]
              + [f"+ms/step W={w}" for w in more] + [f"+cpu ms/step W={w}" for w in more]
              + [f"aten ops W={w}" for w in sizes] + [f"kernel calls W={w}" for w in sizes]
              + [f"files/moves W={w}" for w in sizes])
    rows = []
    for case in cases:
        figures = {key: {w: results[w][case][key] for w in sizes if case in results[w]}
                   for key in ("ms", "cpu_ms", "ops", "kernel_calls", "files", "moves")}

        def cells(key: str, form: str) -> List[str]:
            return [format(figures[key][w], form) if w in figures[key] else "-" for w in sizes]

        def growth(key: str) -> List[str]:
            known = figures[key]
            per_step = ((known[w] - known[first]) / (w - first) if w in known and first in known else None
                        for w in more)
            return ["-" if case in REFERENCES or g is None else f"{g:+.3f}" for g in per_step]

        rows.append([case] + cells("ms", ".3f") + cells("cpu_ms", ".3f") + growth("ms") + growth("cpu_ms")
                    + cells("ops", "d") + cells("kernel_calls", "d")
                    + [f"{figures['files'][w]}/{figures['moves'][w]}" if figures["files"].get(w) else "-" for w in sizes])
    legend = [
        "Host time per public call, forward + backward, block kernels replaced by a null kernel (CPU, gloo);",
        f"batch: 1 x {TOKENS_PER_RANK} tokens per rank; packed: {docs} documents, one cu_seqlens tensor for "
        f"every call; {HEADS}/{KV_HEADS} heads, head dim {HEAD_DIM}, causal.",
        "ms W=n: median wall ms per call at world size n; cpu ms: median CPU time of the calling thread per call",
        "(without waits for the other rank, nor gloo's own threads); each the slowest rank's median.",
        f"+ms/step W=n: growth per extra ring step (rank), (ms at W=n - ms at W={first}) / (n - {first});",
        "+cpu ms/step alike from cpu ms.",
        "aten ops: aten ops per call not nested in another aten op (torch.profiler, rank 0).",
        "kernel calls: null-kernel block calls per call, forward and backward (rank 0).",
        "files/moves: the package's files a call runs code of / calls into a function of another file than",
        "the previous call's, forward and backward (sys.setprofile, rank 0; the route down to the kernels;",
        "-: none of this package's code ran, as for the references and the original).",
    ]
    if any(case in ORIGINAL_CASES for case in cases):
        legend += ["orig_*: the original ring-flash-attention (--original), its flash_attn calls null stubs;",
                   "-: not run at that world size (the original ring family sends to itself at W = 1: gloo refuses)."]
    described = [f"{case}: {ALL_CASES[case][0]}" for case in cases]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        lines += [""] + [line + "  " for line in ratios(results, cases)]
        return "\n".join([line + "  " for line in legend] + [""] + [f"- {d}" for d in described] + [""] + lines)
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]

    def fmt(row: List[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))

    return "\n".join(legend + [f"  {d}" for d in described] + ["", fmt(header)] + [fmt(r) for r in rows]
                     + [""] + ratios(results, cases))


def ratios(results: Dict[int, Dict[str, dict]], cases: Sequence[str]) -> List[str]:
    """One line per (ours, original) pair among ``cases``: ours / original, of wall ms and of cpu ms,
    per world size (below 1: ours is cheaper)."""
    lines = []
    for original, ours in PAIRS.items():
        if original in cases and ours in cases:
            figures = [f"W={w} {r[ours]['ms'] / r[original]['ms']:.2f} (cpu {r[ours]['cpu_ms'] / r[original]['cpu_ms']:.2f})"
                       for w, r in sorted(results.items()) if ours in r and original in r]
            lines.append(f"{ours} / {original}: " + ", ".join(figures))
    return (["ours / original, wall ms (cpu ms):"] + lines) if lines else []


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=100, help="timed calls per case (median reported)")
    p.add_argument("--cases", default=",".join(CASES), help=f"comma list of: {', '.join(CASES)}")
    p.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2])
    p.add_argument("--docs", type=int, default=128, help="documents in the packed cases")
    p.add_argument("--markdown", action="store_true", help="print a markdown table")
    p.add_argument("--original", metavar="DIR", help="a checkout of zhuzilin/ring-flash-attention: adds the "
                   f"cases {', '.join(ORIGINAL_CASES)} (each after the rest unless named in --cases)")
    args = p.parse_args(argv)
    args.cases = [c for c in args.cases.split(",") if c]
    unknown = [c for c in args.cases if c not in ALL_CASES]
    if unknown:
        p.error(f"unknown cases {unknown}; expected some of {list(ALL_CASES)}")
    if args.original is None and any(c in ORIGINAL_CASES for c in args.cases):
        p.error("the orig_* cases need --original DIR")
    if args.original is not None:
        if not os.path.isfile(os.path.join(args.original, "ring_flash_attn", "__init__.py")):
            p.error(f"--original {args.original}: no ring_flash_attn/__init__.py there")
        args.cases += [c for c in ORIGINAL_CASES if c not in args.cases]
    return args


def main() -> None:
    args = parse_args()
    results = {w: run_world(w, args) for w in args.world_sizes}
    print(table(results, args.cases, args.docs, args.markdown))


if __name__ == "__main__":
    main()

"""Hugging Face transformers integration through the attention registry (transformers >= 4.48,
5.x; an optional import).

:func:`register_ring_attention` adds ``"ring_attention"`` to ``AttentionInterface`` (and a no-op mask
builder to ``AttentionMaskInterface`` where it exists), so
``from_pretrained(..., attn_implementation="ring_attention")`` or
``model.set_attn_implementation("ring_attention")`` routes every attention layer here;
:func:`set_packed_batch` gives the global ``cu_seqlens`` of the current packed batch. (ring-flash-attn
0.1.x's ``substitute_hf_flash_attn`` / ``update_ring_flash_attn_params`` path lives in
:mod:`ring_flash_attn.adapters.hf_adapter`.)

The attention function receives this rank's shard of the sequence (see
:mod:`ring_flash_attn.adapters.sequence`) and calls the ring for the configured layout:
``zigzag`` (balanced; packed batches use the all-gather family on the pack cut as one zigzag sequence,
``packed_zigzag``) or ``ring`` / ``llama3``
(contiguous shards; packed batches use llama3). With ``ulysses_degree > 1`` it runs Ulysses x ring
(:mod:`ring_flash_attn.ulysses`): all-to-all inside groups of ``ulysses_degree`` consecutive ranks, the
layout's ring across them. It ignores ``attention_mask``: causality comes from the layer, document
boundaries from ``cu_seqlens``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import torch
import torch.distributed as dist

from ..allgather.api import llama3_flash_attn_varlen_func, packed_allgather
from ..allgather.plan import llama3_flash_attn_prepare_cu_seqlens
from ..core.layouts import MODEL_LAYOUTS, ring_and_ulysses_rank
from ..core.validation import group_rank_and_size
from ..ring.api import ring_flash_attn_func, zigzag_ring_flash_attn_func
from ..ulysses.api import ulysses_flash_attn_func, ulysses_flash_attn_varlen_func
from ..ulysses.groups import UlyssesRingGroups, make_ulysses_ring_groups


# Not "ring_flash_attention": transformers 5 treats every implementation whose name contains "flash"
# as a flash-attn kernel to import and refuses the model when there is none.
RING_ATTENTION_NAME = "ring_attention"


@dataclass
class RingAttentionSettings:
    group: Optional[dist.ProcessGroup] = None
    layout: str = "zigzag"  # "zigzag" or "ring" (llama3 for packed batches)
    heads_k_stride: Optional[int] = None
    backend: Optional[str] = None
    ulysses: Optional[UlyssesRingGroups] = None  # Ulysses x ring when ulysses_degree > 1


SETTINGS = RingAttentionSettings()


@dataclass
class PackedBatch:
    """The packed batch of the next forwards: its global ``cu_seqlens``, its longest document and, once
    computed, the llama3 arguments per ``causal`` (every layer reuses them; a new batch starts empty)."""

    cu_seqlens: torch.Tensor
    max_seqlen: int = 0
    llama3_args: Dict[bool, Tuple] = field(default_factory=dict)


_BATCH: Optional[PackedBatch] = None


def _llama3_args(batch: PackedBatch, causal: bool, group) -> Tuple:
    """llama3_flash_attn_prepare_cu_seqlens once per packed batch, reused by every layer."""
    if causal not in batch.llama3_args:
        rank, world = group_rank_and_size(group)
        batch.llama3_args[causal] = llama3_flash_attn_prepare_cu_seqlens(batch.cu_seqlens, causal, rank, world)
    return batch.llama3_args[causal]


def window_size_of(sliding_window: Optional[int]) -> Tuple[int, int]:
    """transformers' ``sliding_window=w`` (a query sees its last ``w`` keys, itself included, as its
    masks and its flash path define it) as flash-attn's ``window_size``; causal layers cut the right
    side to 0 themselves."""
    return (-1, -1) if sliding_window is None else (sliding_window - 1, sliding_window - 1)


def ring_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    scaling: Optional[float] = None,
    dropout: float = 0.0,
    sliding_window: Optional[int] = None,
    softcap: Optional[float] = None,
    s_aux: Optional[torch.Tensor] = None,
    **kwargs,
) -> Tuple[torch.Tensor, None]:
    """transformers attention function: ``query (B, H, S, D)`` -> ``(out (B, S, H, D), None)``.

    Honoured: ``scaling``, ``dropout``, ``sliding_window`` (``w``: a query sees its last ``w`` keys,
    itself included, as transformers' masks define it; ``window_size=(w - 1, w - 1)``, causal layers
    cutting the right side to 0), ``softcap`` (Gemma 2's logit soft-capping), ``s_aux`` (gpt-oss's
    attention sinks), ``is_causal``. Anything else that would change the result -- an attention
    mask, cu_seq_lens / max_length arguments, ``output_attentions`` -- raises a ``ValueError`` naming
    the layer and the option (:func:`check_model_kwargs`)."""
    check_model_kwargs(module, attention_mask, kwargs)
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    causal = bool(kwargs.get("is_causal", getattr(module, "is_causal", True)))
    s = SETTINGS
    options = dict(dropout_p=dropout, softmax_scale=scaling, causal=causal, softcap=softcap or 0.0, group=s.group,
                   backend=s.backend, window_size=window_size_of(sliding_window), sinks=s_aux)
    layout = MODEL_LAYOUTS[s.layout]
    if s.ulysses is not None:
        return _ulysses_forward(q, k, v, layout, options), None
    if _BATCH is None:
        fn = zigzag_ring_flash_attn_func if layout == "zigzag" else ring_flash_attn_func
        return fn(q, k, v, **options), None
    if q.shape[0] != 1:
        raise ValueError(f"packed batches (cu_seqlens set) need batch size 1, got {q.shape[0]}")
    if layout == "zigzag":  # the pack is sharded as one sequence (sequence.shard_inputs)
        out = packed_allgather("packed_zigzag", q[0], k[0], v[0], _BATCH.cu_seqlens, heads_k_stride=s.heads_k_stride,
                               **options)
        return out[None], None
    prepared = _llama3_args(_BATCH, causal, s.group)
    stride = s.heads_k_stride or k.shape[2]
    out = llama3_flash_attn_varlen_func(q[0], k[0], v[0], *prepared[:4], stride, prepared[4], **options)
    return out[None], None


# keyword arguments transformers passes that do not change the attention (positions reach RoPE
# before this function; caches and router outputs are the model's business)
IGNORED_MODEL_KWARGS = frozenset({"position_ids", "use_cache", "cache_position", "output_router_logits",
                                  "past_key_values", "past_key_value", "is_causal"})


def check_model_kwargs(module: torch.nn.Module, attention_mask: Optional[torch.Tensor], kwargs: dict) -> None:
    """Refuse what this attention cannot honour, naming the layer: a mask (padding or custom; document
    boundaries come from ``set_packed_batch``), flash-attn varlen arguments, attention weights to
    return, and any keyword this adapter does not know that is set."""
    layer = f"ring_attention, layer {getattr(module, 'layer_idx', '?')} ({type(module).__name__})"
    if attention_mask is not None:
        raise ValueError(f"{layer}: got an attention mask ({type(attention_mask).__name__}"
                         f"{tuple(getattr(attention_mask, 'shape', ()))}); ring attention takes no mask: pack documents "
                         "with hf.set_packed_batch(cu_seqlens), pad at the end with labels -100")
    for name, value in kwargs.items():
        if name in IGNORED_MODEL_KWARGS or value is None or value is False:
            continue
        if name.startswith(("cu_seq_lens", "max_length")):
            raise ValueError(f"{layer}: got {name}; pass the packed batch's global cu_seqlens with "
                             "hf.set_packed_batch(cu_seqlens) instead")
        raise ValueError(f"{layer}: cannot honour the option {name}={value!r}")


def _ulysses_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: str, options: dict) -> torch.Tensor:
    """Ulysses x ring for the model path: the layout's ring (packed batches: the pack cut as one
    sequence, ``packed_zigzag`` or ``llama3``)."""
    options = dict(options, group=SETTINGS.ulysses)
    if _BATCH is None:
        return ulysses_flash_attn_func(q, k, v, ring_layout=layout, **options)
    if q.shape[0] != 1:
        raise ValueError(f"packed batches (cu_seqlens set) need batch size 1, got {q.shape[0]}")
    ring_layout = "packed_zigzag" if layout == "zigzag" else "llama3"
    out = ulysses_flash_attn_varlen_func(q[0], k[0], v[0], _BATCH.cu_seqlens, _BATCH.max_seqlen,
                                         ring_layout=ring_layout, **options)
    return out[None]


def _no_mask(*args, attention_mask: Optional[torch.Tensor] = None, **kwargs) -> Optional[torch.Tensor]:
    """Mask builder for the ring: causality and document boundaries are handled by the ring itself,
    so no mask is built -- but a padding mask that pads (a 0 anywhere) is passed on, for the
    attention function to refuse rather than ignore."""
    if attention_mask is not None and attention_mask.dim() == 2 and not bool(attention_mask.all()):
        return attention_mask
    return None


def register_attention_function(name: str, fn) -> None:
    """Register ``fn`` as transformers attention implementation ``name`` (with a no-op mask builder
    where transformers builds masks per implementation)."""
    try:
        from transformers import AttentionInterface
    except ImportError:  # transformers 4.48 / 4.49: a plain dict
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        ALL_ATTENTION_FUNCTIONS[name] = fn
    else:
        AttentionInterface.register(name, fn)
    if "flash" in name:  # transformers' own flash mask builder stays: it gives None or the padding mask
        return
    try:
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError:  # transformers < 4.53 builds masks in the model code; they are ignored here
        return
    AttentionMaskInterface.register(name, _no_mask)


def register_ring_attention(
    group: Optional[dist.ProcessGroup] = None, layout: str = "zigzag", heads_k_stride: Optional[int] = None,
    name: str = RING_ATTENTION_NAME, backend: Optional[str] = None, ulysses_degree: int = 1,
) -> str:
    """Register the ring as a transformers attention implementation; returns its name.

    Args:
        group: the process group the sequence is sharded over (None: the default group).
        layout: ``"zigzag"`` (balanced causal work) or ``"ring"``/``"llama3"`` (contiguous shards).
            Shard the model inputs with :func:`ring_flash_attn.adapters.shard_inputs` using the same
            layout (and ``ulysses_degree``).
        heads_k_stride: K/V heads gathered at a time by the llama3 family (packed batches).
        name: the implementation's name in transformers' registry.
        backend: the block kernel (see ``ring_flash_attn.kernels``).
        ulysses_degree: > 1: Ulysses x ring, all-to-all inside groups of this many consecutive ranks
            (a divisor of the group's size and of the model's attention heads), the layout's ring
            across them; equal to the group's size: pure Ulysses. Every rank of ``group`` (and no
            other) must call this: with ``ulysses_degree`` between 1 and the group's size it creates
            the Ulysses and ring groups among them (:func:`ring_flash_attn.make_ulysses_ring_groups`),
            so each data-parallel replica registers on its own group.
    """
    if layout not in MODEL_LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {sorted(MODEL_LAYOUTS)}")
    SETTINGS.group, SETTINGS.layout, SETTINGS.heads_k_stride, SETTINGS.backend = group, layout, heads_k_stride, backend
    SETTINGS.ulysses = None
    if ulysses_degree != 1:
        rank, world_size = group_rank_and_size(group)
        _, ring_degree, _ = ring_and_ulysses_rank(rank, world_size, ulysses_degree)
        SETTINGS.ulysses = make_ulysses_ring_groups(ulysses_degree, ring_degree, group)
    register_attention_function(name, ring_attention_forward)
    return name


def set_packed_batch(cu_seqlens: Optional[torch.Tensor]) -> None:
    """Global ``cu_seqlens`` (int32) of the packed batch the next forwards run on; ``None``: not packed.
    Call it for every batch: arguments derived from the previous batch are dropped here. For the
    llama3 layout the per-rank arguments are prepared here, outside the model (so a compiled model
    has no host work on ``cu_seqlens`` in its layers)."""
    global _BATCH
    _BATCH = None if cu_seqlens is None else PackedBatch(cu_seqlens)
    if _BATCH is not None and SETTINGS.ulysses is not None:
        _BATCH.max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    elif _BATCH is not None and MODEL_LAYOUTS[SETTINGS.layout] == "ring":
        for causal in (True, False):
            _llama3_args(_BATCH, causal, SETTINGS.group)

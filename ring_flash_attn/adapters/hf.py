"""Hugging Face transformers integration (transformers >= 4.48, 5.x; an optional import).

Two ways in:

* the attention registry -- :func:`register_ring_attention` adds ``"ring_attention"`` to
  ``AttentionInterface`` (and a no-op mask builder to ``AttentionMaskInterface`` where it exists), so
  ``from_pretrained(..., attn_implementation="ring_attention")`` or
  ``model.set_attn_implementation("ring_attention")`` routes every attention layer here;
* ring-flash-attn's entry points -- :func:`substitute_hf_flash_attn` puts the same function under
  the ``flash_attention_2/3`` names, and :func:`update_ring_flash_attn_params` sets the global
  ``cu_seqlens`` of the current packed batch (llama3 layout), as ring-flash-attn 0.1.x did.

The attention function receives this rank's shard of the sequence (see
:mod:`ring_flash_attn.adapters.sequence`) and calls the ring for the configured layout:
``zigzag`` (balanced; packed batches use the all-gather family on the pack cut as one zigzag sequence,
``packed_zigzag``) or ``ring`` / ``llama3``
(contiguous shards; packed batches use llama3). It ignores ``attention_mask``: causality comes
from the layer, document boundaries from ``cu_seqlens``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.distributed as dist

from ..allgather import llama3_flash_attn_prepare_cu_seqlens
from ..api import ring_flash_attn_func, zigzag_ring_flash_attn_func
from ..api_allgather import llama3_flash_attn_varlen_func, packed_allgather

from .sequence import MODEL_LAYOUTS

# Not "ring_flash_attention": transformers 5 treats every implementation whose name contains "flash"
# as a flash-attn kernel to import and refuses the model when there is none.
RING_ATTENTION_NAME = "ring_attention"


@dataclass
class RingAttentionSettings:
    group: Optional[dist.ProcessGroup] = None
    layout: str = "zigzag"  # "zigzag" or "ring" (llama3 for packed batches)
    heads_k_stride: Optional[int] = None
    cu_seqlens: Optional[torch.Tensor] = None  # global cu_seqlens of the current packed batch
    backend: Optional[str] = None


SETTINGS = RingAttentionSettings()


_PREPARED: dict = {}


def _llama3_args(cu_seqlens: torch.Tensor, causal: bool, group) -> Tuple:
    """llama3_flash_attn_prepare_cu_seqlens once per packed batch, reused by every layer."""
    rank, world = (dist.get_rank(group), dist.get_world_size(group)) if dist.is_initialized() else (0, 1)
    key = (id(cu_seqlens), cu_seqlens._version, causal, rank, world)
    if key not in _PREPARED:
        _PREPARED.clear()
        _PREPARED[key] = llama3_flash_attn_prepare_cu_seqlens(cu_seqlens, causal, rank, world)
    return _PREPARED[key]


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
    **kwargs,
) -> Tuple[torch.Tensor, None]:
    """transformers attention function: ``query (B, H, S, D)`` -> ``(out (B, S, H, D), None)``.

    A sliding-window layer (``sliding_window=w``: a query sees its last ``w`` keys, itself included,
    as transformers' masks define it) becomes ``window_size=(w - 1, w - 1)``, with causal layers
    cutting the right side to 0."""
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    causal = bool(getattr(module, "is_causal", True))
    s = SETTINGS
    options = dict(dropout_p=dropout, softmax_scale=scaling, causal=causal, softcap=softcap or 0.0, group=s.group,
                   backend=s.backend)
    if sliding_window is not None:
        options["window_size"] = (sliding_window - 1, sliding_window - 1)
    layout = MODEL_LAYOUTS[s.layout]
    if s.cu_seqlens is None:
        fn = zigzag_ring_flash_attn_func if layout == "zigzag" else ring_flash_attn_func
        return fn(q, k, v, **options), None
    if q.shape[0] != 1:
        raise ValueError(f"packed batches (cu_seqlens set) need batch size 1, got {q.shape[0]}")
    cu = s.cu_seqlens
    if layout == "zigzag":  # the pack is sharded as one sequence (sequence.shard_inputs)
        out = packed_allgather("packed_zigzag", q[0], k[0], v[0], cu, heads_k_stride=s.heads_k_stride, **options)
        return out[None], None
    prepared = _llama3_args(cu, causal, s.group)
    stride = s.heads_k_stride or k.shape[2]
    out = llama3_flash_attn_varlen_func(q[0], k[0], v[0], *prepared[:4], stride, prepared[4], **options)
    return out[None], None


def _no_mask(*args, **kwargs) -> None:
    """Mask builder for the ring: causality and document boundaries are handled by the ring itself."""
    return None


def _register(name: str) -> None:
    try:
        from transformers import AttentionInterface
    except ImportError:  # transformers 4.48 / 4.49: a plain dict
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        ALL_ATTENTION_FUNCTIONS[name] = ring_attention_forward
    else:
        AttentionInterface.register(name, ring_attention_forward)
    try:
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError:  # transformers < 4.53 builds masks in the model code; they are ignored here
        return
    AttentionMaskInterface.register(name, _no_mask)


def register_ring_attention(
    group: Optional[dist.ProcessGroup] = None, layout: str = "zigzag", heads_k_stride: Optional[int] = None,
    name: str = RING_ATTENTION_NAME, backend: Optional[str] = None,
) -> str:
    """Register the ring as a transformers attention implementation; returns its name.

    ``layout``: ``"zigzag"`` (balanced causal work) or ``"ring"``/``"llama3"`` (contiguous shards).
    Shard the model inputs with :func:`ring_flash_attn.adapters.shard_inputs` using the same layout.
    """
    if layout not in MODEL_LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {sorted(MODEL_LAYOUTS)}")
    SETTINGS.group, SETTINGS.layout, SETTINGS.heads_k_stride, SETTINGS.backend = group, layout, heads_k_stride, backend
    _register(name)
    return name


def set_packed_batch(cu_seqlens: Optional[torch.Tensor]) -> None:
    """Global ``cu_seqlens`` (int32) of the packed batch the next forward runs on; ``None``: not packed."""
    SETTINGS.cu_seqlens = cu_seqlens


def update_ring_flash_attn_params(cu_seqlens: torch.Tensor, process_group: Optional[dist.ProcessGroup]) -> None:
    """ring-flash-attn's call: the global cu_seqlens of the current packed batch (llama3 layout)."""
    SETTINGS.group = process_group
    set_packed_batch(cu_seqlens)


def substitute_hf_flash_attn(process_group: Optional[dist.ProcessGroup], heads_k_stride: int) -> None:
    """ring-flash-attn's call: models loaded with ``attn_implementation="flash_attention_2"`` (or 3)
    run the ring (llama3 layout: contiguous shards) instead; pair with
    :func:`update_ring_flash_attn_params` for each packed batch."""
    register_ring_attention(process_group, "llama3", heads_k_stride)
    for name in ("flash_attention_2", "flash_attention_3"):
        _register(name)

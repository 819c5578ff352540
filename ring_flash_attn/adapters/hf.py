"""Hugging Face transformers integration through the attention registry (transformers >= 4.48,
5.x; an optional import).

:func:`register_ring_attention` adds ``"ring_attention"`` to ``AttentionInterface`` (and a no-op mask
builder to ``AttentionMaskInterface`` where it exists), so
``from_pretrained(..., attn_implementation="ring_attention")`` or
``model.set_attn_implementation("ring_attention")`` routes every attention layer here (each registered
name keeps its own settings: a model runs with those of its ``config._attn_implementation``);
:func:`set_packed_batch` gives the global ``cu_seqlens`` of the current packed batch. (ring-flash-attn
0.1.x's ``substitute_hf_flash_attn`` / ``update_ring_flash_attn_params`` path lives in
:mod:`ring_flash_attn.adapters.hf_adapter`.)

The attention function receives this rank's shard of the sequence (see
:mod:`ring_flash_attn.adapters.sequence`) and calls the ring for the configured layout:
``balanced`` (the default: every document of a packed row, or every row, zigzagged in chunks within
a token of each other -- the same causal work on every rank whatever the document lengths; the
P2P ring's ``balanced_ring_flash_attn_varlen_func``), ``zigzag`` (a row zigzagged as one sequence;
packed batches use the all-gather family on the pack cut that way, ``packed_zigzag``) or ``ring`` /
``llama3`` (contiguous shards; packed batches use llama3). With ``ulysses_degree > 1`` it runs Ulysses x ring
(:mod:`ring_flash_attn.ulysses`): all-to-all inside groups of ``ulysses_degree`` consecutive ranks, the
layout's ring across them. Causality comes from the layer, document boundaries from the model call's
``cu_seq_lens_q`` / ``cu_seq_lens_k`` (a flattening collator's), else :func:`set_packed_batch`'s
``cu_seqlens`` (one per row for a batch of packed rows), else from where the rows' ``position_ids``
restart (all-gathered once per forward: each rank holds only its shard of them). The only mask it
takes is a 2-D right-padding ``attention_mask`` (each rank its shard; checked over the group once per
forward, :func:`padding_of_mask`): causal attention keeps the padding from the real tokens, and the
padding's outputs are zeroed. Decoding with a KV cache (``generate()``) is refused; so is Llama 4's
chunked attention on rows longer than a chunk.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist

from ..allgather.api import llama3_flash_attn_varlen_func, packed_allgather
from ..allgather.plan import llama3_flash_attn_prepare_cu_seqlens
from ..core.layouts import MODEL_LAYOUTS, ring_and_ulysses_rank, varlen_position_ids, varlen_token_index
from ..core.spec import AttentionArgs
from ..core.validation import group_rank_and_size
from ..ring.api import balanced_ring_flash_attn_varlen_func, ring_flash_attn_func, zigzag_ring_flash_attn_func
from ..ulysses.api import ulysses_flash_attn_func, ulysses_flash_attn_varlen_func
from ..ulysses.groups import UlyssesRingGroups, make_ulysses_ring_groups
from .sequence import Documents, batch_cu_seqlens, gather_sequence, per_row
from .split import UlyssesSplit, choose_ulysses_degree


logger = logging.getLogger(__name__)

# Not "ring_flash_attention": transformers 5 treats every implementation whose name contains "flash"
# as a flash-attn kernel to import and refuses the model when there is none.
RING_ATTENTION_NAME = "ring_attention"


@dataclass
class RingAttentionSettings:
    """What one registered implementation name runs (:func:`register_ring_attention`'s arguments)."""

    group: Optional[dist.ProcessGroup] = None
    layout: str = "balanced"  # a key of MODEL_LAYOUTS
    heads_k_stride: Optional[int] = None
    backend: Optional[str] = None
    ulysses: Optional[UlyssesRingGroups] = None  # Ulysses x ring when ulysses_degree > 1
    split: Optional[UlyssesSplit] = None  # the choice of ulysses_degree="auto"

    @property
    def ulysses_degree(self) -> int:
        """Ranks per Ulysses all-to-all group (1: the ring alone)."""
        return 1 if self.ulysses is None else self.ulysses.ulysses_degree


# every registered name's settings: a model runs with those of its config._attn_implementation
_SETTINGS: Dict[str, RingAttentionSettings] = {}


def settings_for(name: Optional[str]) -> RingAttentionSettings:
    """The settings registered under ``name``; for a name never registered through
    :func:`register_ring_attention`, those of ``"ring_attention"`` (or the defaults)."""
    if name in _SETTINGS:
        return _SETTINGS[name]
    return _SETTINGS.get(RING_ATTENTION_NAME, RingAttentionSettings())


@dataclass
class PackedBatch:
    """The documents of a packed row -- or of a batch of packed rows laid end to end as one pack: their
    global ``cu_seqlens``, the longest one and, once computed, the llama3 arguments per ``(causal,
    rank, world size)`` (every layer reuses them); for a batch of rows, each row's own batch too."""

    cu_seqlens: torch.Tensor
    max_seqlen: int
    tokens: int  # of the whole row (of every row, for a batch of rows)
    llama3_args: Dict[Tuple[bool, int, int], Tuple] = field(default_factory=dict)
    balanced_positions: Dict[Tuple[int, int, int], torch.Tensor] = field(default_factory=dict)
    row_batches: Tuple["PackedBatch", ...] = ()  # a batch of packed rows: each row's documents

    @classmethod
    def of(cls, cu_seqlens: torch.Tensor) -> "PackedBatch":
        """The batch of global ``cu_seqlens`` (its longest document read once, here; an empty pack is
        refused by the attention functions)."""
        lengths = cu_seqlens[1:] - cu_seqlens[:-1]
        return cls(cu_seqlens, int(lengths.max()) if lengths.numel() else 0, int(cu_seqlens[-1]))

    @classmethod
    def of_rows(cls, rows_cu_seqlens: Sequence[torch.Tensor]) -> "PackedBatch":
        """The batch of packed rows with these per-row ``cu_seqlens`` (rows of one length): one pack
        of every row's documents, and each row's own batch."""
        if len(rows_cu_seqlens) == 1:
            return cls.of(torch.as_tensor(rows_cu_seqlens[0]).to(torch.int32))
        batch = cls.of(batch_cu_seqlens(rows_cu_seqlens))
        batch.row_batches = tuple(cls.of(torch.as_tensor(cu).to(torch.int32)) for cu in rows_cu_seqlens)
        return batch

    @property
    def rows(self) -> int:
        """Rows in the batch (1: one packed row)."""
        return max(1, len(self.row_batches))

    @property
    def row_tokens(self) -> int:
        """Tokens of one row."""
        return self.tokens // self.rows

    @property
    def documents(self) -> Documents:
        """What :func:`~ring_flash_attn.adapters.shard_inputs` takes as ``cu_seqlens`` for this batch."""
        return [b.cu_seqlens for b in self.row_batches] if self.row_batches else self.cu_seqlens


@dataclass
class _DerivedDocuments:
    """Documents found from one forward's position ids or ``cu_seq_lens_q`` (every layer gets the same
    tensor)."""

    position_ids: torch.Tensor
    version: int
    settings: RingAttentionSettings
    batch: Optional[PackedBatch]


_BATCH: Optional[PackedBatch] = None  # set_packed_batch(cu_seqlens)
_FROM_POSITION_IDS = True  # without cu_seqlens: documents where position_ids restart
_DERIVED: Optional[_DerivedDocuments] = None
_FROM_FLASH_KWARGS: Optional[_DerivedDocuments] = None


def _llama3_args(batch: PackedBatch, causal: bool, group) -> Tuple:
    """llama3_flash_attn_prepare_cu_seqlens once per packed batch and group, reused by every layer."""
    rank, world = group_rank_and_size(group)
    key = (causal, rank, world)
    if key not in batch.llama3_args:
        batch.llama3_args[key] = llama3_flash_attn_prepare_cu_seqlens(batch.cu_seqlens, causal, rank, world)
    return batch.llama3_args[key]


def _prepare_llama3(batch: PackedBatch, settings: RingAttentionSettings) -> None:
    """Prepare, outside the model, what a ``ring``-layout registration's layers need for ``batch`` (so a
    compiled model does no host work on ``cu_seqlens``)."""
    if settings.ulysses is None and MODEL_LAYOUTS[settings.layout] == "ring":
        for row in batch.row_batches or (batch,):
            for causal in (True, False):
                _llama3_args(row, causal, settings.group)


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
    implementation: Optional[str] = None,
    **kwargs,
) -> Tuple[torch.Tensor, None]:
    """transformers attention function: ``query (B, H, S, D)`` -> ``(out (B, S, H, D), None)``.

    Honoured: ``scaling``, ``dropout``, ``sliding_window`` (``w``: a query sees its last ``w`` keys,
    itself included, as transformers' masks define it; ``window_size=(w - 1, w - 1)``, causal layers
    cutting the right side to 0), ``softcap`` (Gemma 2's logit soft-capping), ``s_aux`` (gpt-oss's
    attention sinks), ``is_causal``, ``cu_seq_lens_q`` / ``cu_seq_lens_k`` / ``max_length_q`` /
    ``max_length_k`` (the packed row's documents, from a flattening collator: equal for queries and
    keys, see :func:`packed_batch_of_flash_kwargs`), ``position_ids`` (documents of packed rows,
    where neither those nor :func:`set_packed_batch` gave them), a 2-D right-padding
    ``attention_mask`` (this rank's shard; :func:`padding_of_mask`). Anything else that would change
    the result -- a 4-D / custom mask, left padding, a mask with holes, ``output_attentions``, keys
    from a KV cache, Llama 4's chunked attention on rows longer than a chunk -- raises a
    ``ValueError`` naming the layer and the option (:func:`check_model_kwargs`,
    :func:`check_llama4_layer`).

    ``implementation``: the registered name whose settings apply (the function registered under a
    name passes it); ``None``: the module's ``config._attn_implementation``."""
    check_model_kwargs(module, attention_mask, kwargs)
    check_no_kv_cache(module, query, key)
    if implementation is None:
        implementation = getattr(getattr(module, "config", None), "_attn_implementation", None)
    s = settings_for(implementation)
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    causal = bool(kwargs.get("is_causal", getattr(module, "is_causal", True)))
    options = dict(dropout_p=dropout, softmax_scale=scaling, causal=causal, softcap=softcap or 0.0, group=s.group,
                   backend=s.backend, window_size=window_size_of(sliding_window), sinks=s_aux)
    world = group_rank_and_size(s.group)[1]
    batch = packed_batch_of_flash_kwargs(module, kwargs, s, q.shape[1] * world)
    if batch is None:
        batch = packed_batch_of_forward(s, kwargs.get("position_ids"), q.shape[:2])
    if batch is not None and q.shape[0] != batch.rows:
        raise ValueError(f"ring_attention: the packed batch has {batch.rows} row(s) of documents but the model got "
                         f"{q.shape[0]} rows: give one cu_seqlens per row (hf.set_packed_batch([cu_row0, cu_row1, "
                         "...])), or one packed row")
    check_llama4_layer(module, batch.row_tokens if batch is not None else q.shape[1] * world, world)
    padding = padding_of_mask(module, attention_mask, causal, s, batch, q.shape[:2])
    out = _attend(q, k, v, s, batch, kwargs.get("position_ids"), options)
    if padding is not None:  # right padding: causal attention kept it from every real token; zero its own output
        out = out * padding[:, :, None, None].to(out.dtype)
    return out, None


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, s: RingAttentionSettings,
            batch: Optional[PackedBatch], position_ids: Optional[torch.Tensor], options: dict) -> torch.Tensor:
    """``(B, S_local, H, D)`` queries, keys and values through the registration's layout: the balanced
    layout runs every row's documents in one call, the others a batch of packed rows row by row."""
    layout = MODEL_LAYOUTS[s.layout]
    if layout == "balanced":
        return _balanced_forward(q, k, v, s, batch, position_ids, options)
    if batch is not None and batch.row_batches:  # each row sharded on its own: one call per row
        return torch.cat([_attend(q[r:r + 1], k[r:r + 1], v[r:r + 1], s, row, None, options)
                          for r, row in enumerate(batch.row_batches)])
    if s.ulysses is not None:
        return _ulysses_forward(q, k, v, layout, s.ulysses, batch, options)
    if batch is None:
        fn = zigzag_ring_flash_attn_func if layout == "zigzag" else ring_flash_attn_func
        return fn(q, k, v, **options)
    if layout == "zigzag":  # the pack is sharded as one sequence (sequence.shard_inputs)
        out = packed_allgather("packed_zigzag", q[0], k[0], v[0], batch.cu_seqlens, AttentionArgs(**options),
                               s.heads_k_stride)
        return out[None]
    prepared = _llama3_args(batch, options["causal"], s.group)
    stride = k.shape[2] if s.heads_k_stride is None else s.heads_k_stride
    out = llama3_flash_attn_varlen_func(q[0], k[0], v[0], *prepared[:4], stride, prepared[4], **options)
    return out[None]


def check_no_kv_cache(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor) -> None:
    """Refuse keys longer than the queries (``(B, H, S, D)``): they come from a KV cache (``generate()``'s
    decode steps), which ring attention does not support."""
    if key.shape[-2] != query.shape[-2]:
        raise ValueError(
            f"ring_attention, layer {getattr(module, 'layer_idx', '?')} ({type(module).__name__}): got "
            f"{query.shape[-2]} queries and {key.shape[-2]} keys, i.e. keys from a KV cache (generate()): "
            "decoding with a KV cache is not supported by ring attention (each rank holds a shard of the "
            "sequence). For generation switch the model to its normal attention, e.g. "
            "model.set_attn_implementation('sdpa'), and run the whole sequence on one rank")


def packed_batch_of_forward(settings: RingAttentionSettings, position_ids: Optional[torch.Tensor],
                            batch_shape: Tuple[int, int]) -> Optional[PackedBatch]:
    """The documents this forward runs on: :func:`set_packed_batch`'s, else those of the row's
    ``position_ids`` (:func:`documents_from_position_ids`, found once per forward), else none.

    Args:
        settings: the registration the layer runs with (its group and layout shard the sequence).
        position_ids: what transformers passed the layer (this rank's shard), or None.
        batch_shape: the query's ``(B, S_local)``."""
    global _DERIVED
    if _BATCH is not None:
        return _BATCH
    if not _FROM_POSITION_IDS or position_ids is None:
        return None
    if torch.compiler.is_compiling():
        raise ValueError("ring_attention cannot find documents from position_ids inside a compiled model (that "
                         "takes an all-gather and a host read): before the forward call hf.set_packed_batch(cu_seqlens)"
                         " for a packed row, or hf.set_packed_batch(None, from_position_ids=False) when every row "
                         "is one sequence")
    derived = _DERIVED
    if (derived is not None and derived.position_ids is position_ids and derived.version == position_ids._version
            and derived.settings is settings):
        return derived.batch
    batch = documents_from_position_ids(position_ids, settings, batch_shape)
    if batch is not None:
        _prepare_llama3(batch, settings)
    _DERIVED = _DerivedDocuments(position_ids, position_ids._version, settings, batch)
    return batch


def documents_from_position_ids(position_ids: torch.Tensor, settings: RingAttentionSettings,
                                batch_shape: Tuple[int, int]) -> Optional[PackedBatch]:
    """The documents of the rows whose ``position_ids`` restart, as transformers finds them (a document
    starts wherever a position is not the previous one + 1), from every rank's shard: the group
    all-gathers them (collective: every rank of the group calls it) and puts them back in sequence
    order. None if no row restarts; for several rows, a batch of packed rows (each row sharded on its
    own: the zigzag / ring layouts; a row that never restarts is one document).

    Args:
        position_ids: this rank's ``(S_local,)`` or ``(1 or B, S_local)`` position ids.
        settings: the registration (its group, layout and Ulysses degree sharded the sequence).
        batch_shape: the query's ``(B, S_local)``."""
    rows, local_len = batch_shape
    if position_ids.dim() not in (1, 2) or position_ids.shape[-1] != local_len \
            or (position_ids.dim() == 2 and position_ids.shape[0] not in (1, rows)):
        raise ValueError(f"ring_attention: position_ids of shape {tuple(position_ids.shape)} do not match the "
                         f"queries' (batch, sequence) {tuple(batch_shape)}, so documents cannot be found from them: "
                         "call hf.set_packed_batch(cu_seqlens) (or hf.set_packed_batch(None, from_position_ids=False)"
                         " when every row is one sequence)")
    local = position_ids.reshape(-1, local_len)
    whole = gather_sequence(local, settings.layout, settings.group, dim=1, ulysses_degree=settings.ulysses_degree)
    starts = torch.ones_like(whole, dtype=torch.bool)
    starts[:, 1:] = whole[:, 1:] != whole[:, :-1] + 1
    if not bool(starts[:, 1:].any()):
        return None
    if MODEL_LAYOUTS[settings.layout] == "balanced" and group_rank_and_size(settings.group)[1] > 1:
        raise ValueError("ring_attention: position_ids restart inside a row (packed documents), and the balanced "
                         "layout shards a packed row by its documents, so they must be known when the inputs are "
                         "sharded: adapters.shard_inputs(..., cu_seqlens=cu_seqlens) and hf.set_packed_batch("
                         "cu_seqlens), for several rows a list of one cu_seqlens per row (or register "
                         "layout='zigzag', which finds documents from position_ids); or "
                         "the inputs were sharded with another layout or ulysses_degree than this registration's "
                         f"({settings.layout!r}, {settings.ulysses_degree})")
    end = torch.tensor([whole.shape[1]], device=whole.device)
    rows_cu = [torch.cat([row.nonzero().flatten(), end]).to(torch.int32) for row in starts.expand(rows, -1)]
    return PackedBatch.of_rows(rows_cu)


FLASH_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def packed_batch_of_flash_kwargs(module: torch.nn.Module, kwargs: Dict[str, Any], settings: RingAttentionSettings,
                                 row_tokens: int) -> Optional[PackedBatch]:
    """The documents given by transformers' flash-attention keywords (``cu_seq_lens_q`` / ``_k``,
    ``max_length_q`` / ``_k``, e.g. from ``DataCollatorWithFlattening(return_flash_attn_kwargs=True)``),
    or None where none is set. They describe the whole packed row (global ``cu_seqlens``, as for
    :func:`set_packed_batch`) while the model gets this rank's shard; queries and keys must have the
    same documents, the maximum lengths (where given) must be the longest document, the documents
    must cover the whole row (not this rank's shard), and a :func:`set_packed_batch` batch must be the
    same -- else a ``ValueError`` naming the layer. Read once per forward (later layers get the same
    tensor).

    Args:
        module: the attention layer (named in errors).
        kwargs: the keywords transformers passed the attention function.
        settings: the registration (its layout's per-batch arguments are prepared here).
        row_tokens: this rank's tokens x the group's size (the row's length; the balanced layout's
            functions check the documents' total against the shards themselves)."""
    global _FROM_FLASH_KWARGS
    given = {name: kwargs[name] for name in FLASH_KWARGS if kwargs.get(name) is not None}
    if not given:
        return None
    cu_q, cu_k = given.get("cu_seq_lens_q"), given.get("cu_seq_lens_k")
    derived = _FROM_FLASH_KWARGS
    if (derived is not None and derived.position_ids is cu_q and cu_q is not None
            and derived.version == cu_q._version and derived.settings is settings):
        return derived.batch
    layer = f"ring_attention, layer {getattr(module, 'layer_idx', '?')} ({type(module).__name__})"
    if torch.compiler.is_compiling():
        raise ValueError(f"{layer}: cu_seq_lens_q / cu_seq_lens_k cannot be read inside a compiled model: call "
                         "hf.set_packed_batch(cu_seqlens) before the forward instead")
    if cu_q is None or cu_k is None:
        raise ValueError(f"{layer}: got {', '.join(given)} without both cu_seq_lens_q and cu_seq_lens_k: pass "
                         "both (the packed row's global document boundaries) or call hf.set_packed_batch(cu_seqlens)")
    if cu_q.shape != cu_k.shape or not torch.equal(cu_q, cu_k.to(cu_q.device)):
        raise ValueError(f"{layer}: cu_seq_lens_q {cu_q.tolist()} differs from cu_seq_lens_k {cu_k.tolist()}; ring "
                         "attention runs self-attention over one packed row: queries and keys have the same documents")
    batch = PackedBatch.of(cu_q.to(torch.int32))
    for name in ("max_length_q", "max_length_k"):
        if name in given and int(given[name]) != batch.max_seqlen:
            raise ValueError(f"{layer}: {name}={int(given[name])} is not the longest document of cu_seq_lens_q "
                             f"({batch.max_seqlen})")
    if MODEL_LAYOUTS[settings.layout] != "balanced" and batch.tokens != row_tokens:
        raise ValueError(f"{layer}: cu_seq_lens_q ends at {batch.tokens}, but the row has {row_tokens} tokens (this "
                         "rank's x the group's size): pass the whole packed row's documents (as the collator made "
                         "them, before sharding), not this rank's shard's")
    if _BATCH is not None:
        if not torch.equal(_BATCH.cu_seqlens.to(cu_q.device, torch.int64), cu_q.to(torch.int64)):
            raise ValueError(f"{layer}: cu_seq_lens_q {cu_q.tolist()} differs from the cu_seqlens given to "
                             f"hf.set_packed_batch ({_BATCH.cu_seqlens.tolist()})")
        batch = _BATCH
    _prepare_llama3(batch, settings)
    _FROM_FLASH_KWARGS = _DerivedDocuments(cu_q, cu_q._version, settings, batch)
    return batch


def check_llama4_layer(module: torch.nn.Module, row_length: int, world_size: int) -> None:
    """Refuse a Llama 4 layer whose result depends on where its tokens sit in the row, which this
    adapter does not reproduce: chunked local attention (``config.attention_chunk_size``, layers of
    type ``"chunked_attention"``; a query sees only keys of its chunk of the row) on a row longer than
    one chunk -- on shorter rows it is plain causal attention and runs -- and, on a sharded row, the
    no-RoPE layers' attention temperature tuning, whose scale transformers computes from the token's
    index in the local shard, once the row reaches ``floor_scale`` tokens.

    Args:
        module: the attention layer (its ``config``, ``layer_idx``, ``use_rope``, ...).
        row_length: tokens in the whole (global) row.
        world_size: ranks the row is sharded over."""
    config = getattr(module, "config", None)
    layer_idx = getattr(module, "layer_idx", None)
    layer_types = getattr(config, "layer_types", None) or ()
    chunk = getattr(config, "attention_chunk_size", None)
    layer = f"ring_attention, layer {layer_idx} ({type(module).__name__})"
    if (chunk is not None and isinstance(layer_idx, int) and layer_idx < len(layer_types)
            and layer_types[layer_idx] == "chunked_attention" and row_length > chunk):
        raise ValueError(f"{layer} is a chunked-attention layer (attention_chunk_size={chunk}, Llama 4) and the row "
                         f"has {row_length} tokens: chunked local attention is not supported by ring attention (it "
                         "would run full causal attention); use rows of at most attention_chunk_size tokens")
    floor_scale = getattr(module, "floor_scale", None)
    if (world_size > 1 and getattr(module, "attn_temperature_tuning", False) and not getattr(module, "use_rope", True)
            and floor_scale is not None and row_length >= floor_scale):
        raise ValueError(f"{layer} tunes the attention temperature by the token's index (attn_temperature_tuning, "
                         f"floor_scale={floor_scale}) and transformers takes that index in this rank's shard, not in "
                         f"the row of {row_length} tokens: not supported by ring attention for rows of floor_scale "
                         "tokens or more")


# keyword arguments transformers passes that check_model_kwargs lets through (position ids reach RoPE
# before this function and give the documents where set_packed_batch did not; keys from a KV cache are
# refused by check_no_kv_cache; router outputs are the model's business)
IGNORED_MODEL_KWARGS = frozenset({"position_ids", "use_cache", "cache_position", "output_router_logits",
                                  "past_key_values", "past_key_value", "is_causal", *FLASH_KWARGS})


def check_model_kwargs(module: torch.nn.Module, attention_mask: Optional[torch.Tensor], kwargs: dict) -> None:
    """Refuse what this attention cannot honour, naming the layer: a mask other than a 2-D padding mask
    (a custom 4-D mask or a block mask; document boundaries come from ``set_packed_batch`` or the
    flash-attention keywords; the 2-D mask is checked by :func:`padding_of_mask`), attention weights
    to return, and any keyword this adapter does not know that is set."""
    layer = f"ring_attention, layer {getattr(module, 'layer_idx', '?')} ({type(module).__name__})"
    if attention_mask is not None and not (isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2):
        raise ValueError(f"{layer}: got an attention mask ({type(attention_mask).__name__}"
                         f"{tuple(getattr(attention_mask, 'shape', ()))}); ring attention takes no custom or 4-D "
                         "mask, only a 2-D right-padding mask: pack documents with hf.set_packed_batch(cu_seqlens), "
                         "pad at the end (a right-padding attention_mask, or adapters.pad_for_layout, labels -100)")
    for name, value in kwargs.items():
        if name in IGNORED_MODEL_KWARGS or value is None or value is False:
            continue
        raise ValueError(f"{layer}: cannot honour the option {name}={value!r}")


@dataclass
class _CheckedMask:
    """A padding mask checked once per forward (every layer gets the same tensor) and what it gave."""

    mask: torch.Tensor
    version: int
    settings: RingAttentionSettings
    batch: Optional[PackedBatch]
    padding: Optional[torch.Tensor]


_CHECKED_MASKS: List[_CheckedMask] = []  # the last few (a model may build a full and a sliding one)


def padding_of_mask(module: torch.nn.Module, attention_mask: Optional[torch.Tensor], causal: bool,
                    settings: RingAttentionSettings, batch: Optional[PackedBatch],
                    batch_shape: Tuple[int, int]) -> Optional[torch.Tensor]:
    """This rank's ``(B, S_local)`` shard of a right-padding mask where the batch pads, else None.

    The mask the model was given is this rank's shard of the global ``(B, S)`` mask (sharded like the
    inputs, e.g. by ``adapters.shard_inputs(..., attention_mask=mask)``). The group all-gathers the
    shards' shapes, then the shards (collective: every rank of the group calls it, once per mask
    tensor, i.e. once per forward), and every rank checks the same global mask: each row must be its
    real tokens then padding. Causal attention keeps the padding from every real token, so the
    attention runs as without a mask and the padding's outputs are zeroed. Refused, on every rank
    alike, with a ``ValueError`` naming the layer: shards of different shapes, a mask that does not
    match the queries, left padding, holes, and padding on a non-causal layer.

    Args:
        module: the attention layer (named in errors).
        attention_mask: what transformers passed the layer (2-D or None).
        causal: whether the layer is causal.
        settings: the registration (its group, layout and Ulysses degree shard the sequence).
        batch: the forward's packed batch (its documents shard the balanced layout), or None.
        batch_shape: the query's ``(B, S_local)``."""
    if attention_mask is None:
        return None
    for checked in _CHECKED_MASKS:
        if (checked.mask is attention_mask and checked.version == attention_mask._version
                and checked.settings is settings and checked.batch is batch):
            return checked.padding
    layer = f"ring_attention, layer {getattr(module, 'layer_idx', '?')} ({type(module).__name__})"
    if torch.compiler.is_compiling():
        raise ValueError(f"{layer}: a 2-D attention_mask cannot be checked inside a compiled model (that takes "
                         "an all-gather and a host read): pass no attention_mask where nothing pads, else pack the "
                         "rows' real tokens instead (hf.set_packed_batch)")
    whole = gather_mask(attention_mask, settings, batch, batch_shape, layer)
    pads = check_right_padding(whole, layer)
    if pads and not causal:
        raise ValueError(f"{layer} is not causal and the attention_mask pads: ring attention supports padding on "
                         "causal layers only (where no real token sees the padding after it)")
    padding = attention_mask if pads else None
    _CHECKED_MASKS.append(_CheckedMask(attention_mask, attention_mask._version, settings, batch, padding))
    del _CHECKED_MASKS[:-4]
    return padding


def gather_mask(attention_mask: torch.Tensor, settings: RingAttentionSettings, batch: Optional[PackedBatch],
                batch_shape: Tuple[int, int], layer: str) -> torch.Tensor:
    """The global ``(B, S)`` mask from every rank's shard, after checking -- on every rank alike, from
    one all-gather of the shapes -- that every shard has the queries' ``(B, S_local)`` shape."""
    _, world = group_rank_and_size(settings.group)
    shape = torch.tensor([*attention_mask.shape, *batch_shape], dtype=torch.int64)
    shapes = [shape.clone() for _ in range(world)]
    if world > 1:
        dist.all_gather(shapes, shape, group=settings.group)
    if any(not torch.equal(sh[:2], sh[2:]) or not torch.equal(sh, shapes[0]) for sh in shapes):
        raise ValueError(f"{layer}: the ranks' attention_mask shards and queries have the (B, S_local) shapes "
                         f"{[(tuple(sh[:2].tolist()), tuple(sh[2:].tolist())) for sh in shapes]} (mask, queries, "
                         "rank by rank): every rank must pass its shard of one (B, S) mask, sharded like the inputs "
                         "(adapters.shard_inputs(..., attention_mask=mask))")
    local = attention_mask.to(torch.int32)
    if world == 1:
        return local
    documents = batch.documents if batch is not None else None
    return gather_sequence(local, settings.layout, settings.group, dim=1, ulysses_degree=settings.ulysses_degree,
                           cu_seqlens=documents)


def check_right_padding(mask: torch.Tensor, layer: str) -> bool:
    """Whether the global ``(B, S)`` mask pads; a ``ValueError`` unless every row is real tokens (1)
    then padding (0): left padding and holes are refused."""
    lengths = (mask != 0).sum(1)
    index = torch.arange(mask.shape[1], device=mask.device)
    if torch.equal(mask != 0, index[None] < lengths[:, None]):
        return bool((lengths < mask.shape[1]).any())
    if torch.equal(mask != 0, index[None] >= mask.shape[1] - lengths[:, None]):
        raise ValueError(f"{layer}: the attention_mask pads on the left; ring attention supports right padding "
                         "only (real tokens first): pad on the right (tokenizer.padding_side = 'right', which "
                         "DataCollatorWithPadding and DataCollatorForLanguageModeling follow)")
    raise ValueError(f"{layer}: the attention_mask is not a padding mask (0s between real tokens): ring attention "
                     "takes a right-padding mask only; give documents as documents (hf.set_packed_batch or "
                     "position_ids restarting per document)")


def _ulysses_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: str, groups: UlyssesRingGroups,
                     batch: Optional[PackedBatch], options: dict) -> torch.Tensor:
    """Ulysses x ring for the model path: the layout's ring (packed batches: the pack cut as one
    sequence, ``packed_zigzag`` or ``llama3``)."""
    options = dict(options, group=groups)
    if batch is None:
        return ulysses_flash_attn_func(q, k, v, ring_layout=layout, **options)
    ring_layout = "packed_zigzag" if layout == "zigzag" else "llama3"
    out = ulysses_flash_attn_varlen_func(q[0], k[0], v[0], batch.cu_seqlens, batch.max_seqlen,
                                         ring_layout=ring_layout, **options)
    return out[None]


@functools.lru_cache(maxsize=16)
def _rows_as_documents(rows: int, seqlen: int, device: torch.device) -> torch.Tensor:
    """``cu_seqlens`` of ``rows`` rows of ``seqlen`` tokens, each one document (a cached tensor, so its
    host read is cached too: no device-to-host copy per layer)."""
    return torch.arange(0, rows * seqlen + 1, seqlen, dtype=torch.int32, device=device)


def _balanced_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, s: RingAttentionSettings,
                      batch: Optional[PackedBatch], position_ids: Optional[torch.Tensor],
                      options: dict) -> torch.Tensor:
    """``(B, S_local, H, D)`` in the balanced layout: a packed row's documents (or a batch of packed
    rows dealt as one pack), else every row one document (rows one call each unless their length is a
    multiple of 2W and there is no Ulysses degree: then every row is dealt alike and they go as one
    pack)."""
    _, world = group_rank_and_size(s.group)
    rows, local_len = q.shape[:2]
    if batch is not None:  # a packed row, or a batch of them dealt as one pack (sequence.shard_inputs)
        check_balanced_positions(position_ids, batch, s)
        flat = [t.reshape(-1, *t.shape[2:]) for t in (q, k, v)]
        return _balanced_call(*flat, batch.cu_seqlens, batch.max_seqlen, s, options).reshape(q.shape)
    seqlen = local_len * world
    # rows sharded one by one deal alike as one pack only on the ring alone (Ulysses' all-to-all orders a pack's
    # tokens by rank, not row by row)
    if rows == 1 or (seqlen % (2 * world) == 0 and s.ulysses is None):
        flat = [t.reshape(-1, *t.shape[2:]) for t in (q, k, v)]
        cu = _rows_as_documents(rows, seqlen, q.device)
        return _balanced_call(*flat, cu, seqlen, s, options).reshape(q.shape)
    cu = _rows_as_documents(1, seqlen, q.device)
    return torch.stack([_balanced_call(q[i], k[i], v[i], cu, seqlen, s, options) for i in range(rows)])


def _balanced_call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                   s: RingAttentionSettings, options: dict) -> torch.Tensor:
    """Packed ``(T_local, H, D)`` in the balanced layout over the registration's group (Ulysses x ring
    with ``ring_layout="balanced"`` when it has a Ulysses degree)."""
    if s.ulysses is not None:
        return ulysses_flash_attn_varlen_func(q, k, v, cu_seqlens, max_seqlen, ring_layout="balanced",
                                              **dict(options, group=s.ulysses))
    return balanced_ring_flash_attn_varlen_func(q, k, v, cu_seqlens, max_seqlen, **options)


def check_balanced_positions(position_ids: Optional[torch.Tensor], batch: PackedBatch,
                             settings: RingAttentionSettings) -> None:
    """Refuse a packed row not sharded in the balanced layout of its documents: this rank's
    ``position_ids`` must be the positions inside each document that layout gives it (checked once
    per position-ids tensor; without position ids nothing can be checked).

    Args:
        position_ids: what transformers passed the layer (this rank's shard), or None.
        batch: the packed batch of :func:`set_packed_batch`.
        settings: the registration (its group and Ulysses degree)."""
    if position_ids is None or torch.compiler.is_compiling():
        return
    key = (id(position_ids), position_ids._version, settings.ulysses_degree)
    if key in batch.balanced_positions:
        return
    rank, world = group_rank_and_size(settings.group)
    shard = dict(layout="balanced", rank=rank, world_size=world, ulysses_degree=settings.ulysses_degree)
    inside = varlen_position_ids(batch.cu_seqlens, **shard)  # positions restarting per document, or in the pack
    local = position_ids.reshape(-1).cpu().to(torch.int64)
    if local.numel() != inside.numel() or not (torch.equal(local, inside) or
                                               torch.equal(local, varlen_token_index(batch.cu_seqlens, **shard))):
        raise ValueError("ring_attention: this rank's position_ids are not the balanced layout's shard of the packed "
                         "batch given to hf.set_packed_batch: shard the row with adapters.shard_inputs(..., "
                         "cu_seqlens=cu_seqlens) (or layouts.shard_varlen(x, cu_seqlens, 'balanced', rank, W)) with "
                         f"this registration's ulysses_degree ({settings.ulysses_degree}) and pass the same "
                         "cu_seqlens to set_packed_batch")
    batch.balanced_positions.clear()
    batch.balanced_positions[key] = inside


def _no_mask(*args, attention_mask: Optional[torch.Tensor] = None, **kwargs) -> Optional[torch.Tensor]:
    """Mask builder for the ring: causality and document boundaries are handled by the ring itself,
    so no mask is built -- but a 2-D padding mask is passed on as it is, whether this rank's shard of
    it pads or not, so that every rank's attention sees it and they check it together
    (:func:`padding_of_mask`)."""
    if attention_mask is not None and attention_mask.dim() == 2:
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
    group: Optional[dist.ProcessGroup] = None, layout: str = "balanced", heads_k_stride: Optional[int] = None,
    name: str = RING_ATTENTION_NAME, backend: Optional[str] = None, ulysses_degree: Union[int, str] = 1,
    config: Any = None, ranks_per_node: Optional[int] = None,
) -> str:
    """Register the ring as a transformers attention implementation; returns its name.

    Args:
        group: the process group the sequence is sharded over (None: the default group).
        layout: ``"balanced"`` (the default: every document of a packed row, or every row, cut into 2W
            chunks within a token of each other; the same causal work on every rank whatever the
            documents), ``"zigzag"`` (a row, packed or not, zigzagged as one sequence: balanced for
            one long document; documents found from restarting ``position_ids``) or
            ``"ring"``/``"llama3"`` (contiguous shards). Shard the model inputs with
            :func:`ring_flash_attn.adapters.shard_inputs` using the same layout (and
            ``ulysses_degree``, and for packed rows the ``cu_seqlens`` given to :func:`set_packed_batch`).
        heads_k_stride: K/V heads gathered at a time by the all-gather family (packed batches of the
            ``zigzag`` / ``ring`` / ``llama3`` layouts).
        name: the implementation's name in transformers' registry. The settings belong to it: a model
            set to this name runs with them whatever other names are registered later (registering
            the same name again replaces them).
        backend: the block kernel (see ``ring_flash_attn.kernels``).
        ulysses_degree: > 1: Ulysses x ring, all-to-all inside groups of this many consecutive ranks
            (a divisor of the group's size and of the model's attention heads), the layout's ring
            across them; equal to the group's size: pure Ulysses. Every rank of ``group`` (and no
            other) must call this: with ``ulysses_degree`` between 1 and the group's size it creates
            the Ulysses and ring groups among them (:func:`ring_flash_attn.make_ulysses_ring_groups`),
            so each data-parallel replica registers on its own group. ``"auto"``: the degree
            :func:`~ring_flash_attn.adapters.choose_ulysses_degree` picks from the group's size, the
            heads of ``config`` and ``ranks_per_node`` (Ulysses inside a node as far as the heads allow,
            the ring across nodes); every rank of ``group`` must call it (it checks that they chose
            alike), and the choice with its reasons is logged and kept in
            ``settings_for(name).split``.
        config: with ``ulysses_degree="auto"``: the model's config (``model.config``; a multimodal
            config's text config is used), read for ``num_attention_heads`` and
            ``num_key_value_heads``.
        ranks_per_node: with ``ulysses_degree="auto"``: ranks per node (None: ``LOCAL_WORLD_SIZE``,
            else the CUDA device count, else the group's size).
    """
    if layout not in MODEL_LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {sorted(MODEL_LAYOUTS)}")
    if heads_k_stride is not None and (isinstance(heads_k_stride, bool) or not isinstance(heads_k_stride, int)
                                       or heads_k_stride <= 0):
        raise ValueError(f"heads_k_stride must be None (all K/V heads at once) or a positive divisor of the "
                         f"model's K/V heads, got {heads_k_stride!r}")
    split = None
    if ulysses_degree == "auto":
        split = auto_split(group, config, ranks_per_node)
        ulysses_degree = split.ulysses_degree
    elif config is not None or ranks_per_node is not None:
        raise ValueError("config and ranks_per_node are read only with ulysses_degree='auto'")
    ulysses = None
    if ulysses_degree != 1:
        rank, world_size = group_rank_and_size(group)
        _, ring_degree, _ = ring_and_ulysses_rank(rank, world_size, ulysses_degree)
        ulysses = make_ulysses_ring_groups(ulysses_degree, ring_degree, group)
    settings = _SETTINGS[name] = RingAttentionSettings(group, layout, heads_k_stride, backend, ulysses, split)
    if _BATCH is not None:  # set_packed_batch came first
        _prepare_llama3(_BATCH, settings)
    register_attention_function(name, functools.partial(ring_attention_forward, implementation=name))
    return name


def auto_split(group: Optional[dist.ProcessGroup], config: Any, ranks_per_node: Optional[int]) -> UlyssesSplit:
    """:func:`choose_ulysses_degree` for ``group`` and the heads of a model ``config``, checked to be the
    same on every rank of the group (one all-gather where it has more than one rank) and logged.

    Args:
        group: the context-parallel group (None: the default group).
        config: the model's config (``get_text_config()`` where it has one).
        ranks_per_node: as for :func:`choose_ulysses_degree`."""
    if config is None:
        raise ValueError("ulysses_degree='auto' needs the model's heads: register_ring_attention(group, "
                         "ulysses_degree='auto', config=model.config)")
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = getattr(text, "num_attention_heads", None)
    if heads is None:
        raise ValueError(f"ulysses_degree='auto': the config ({type(config).__name__}) has no num_attention_heads")
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    _, world = group_rank_and_size(group)
    split = choose_ulysses_degree(world, heads, kv_heads, ranks_per_node)
    if world > 1:
        chosen: list = [None] * world
        dist.all_gather_object(chosen, split.ulysses_degree, group=group)
        if len(set(chosen)) > 1:
            raise ValueError(f"ulysses_degree='auto' chose differently on the ranks of the group ({chosen}): they see "
                             "different ranks per node or configs; pass ranks_per_node= (or ulysses_degree=U)")
    logger.info("ring_attention: ulysses_degree %d x ring %d (%s)", split.ulysses_degree, split.ring_degree,
                "; ".join(split.reasons))
    return split


def active_documents(seqlen: int, rows: int = 1) -> Optional[Documents]:
    """The ``cu_seqlens`` of :func:`set_packed_batch`'s batch when it covers a row of ``seqlen`` tokens
    (one per row where it is a batch of ``rows`` packed rows of ``seqlen`` tokens)."""
    if _BATCH is None or _BATCH.row_tokens != seqlen or (_BATCH.row_batches and _BATCH.rows != rows):
        return None
    return _BATCH.documents


def set_packed_batch(cu_seqlens: Optional[Documents], *, from_position_ids: bool = True) -> None:
    """Global ``cu_seqlens`` (int32) of the packed batch the next forwards run on -- or a list of one
    per row for a batch of packed rows (rows of one length; pass the same list to ``shard_inputs``);
    ``None``: no ``cu_seqlens``. Call it for every batch: arguments derived from the previous batch
    are dropped here. For the llama3 layout the per-rank arguments are prepared here, outside the model (so a
    compiled model has no host work on ``cu_seqlens`` in its layers). Its order with
    :func:`register_ring_attention` does not matter.

    Args:
        cu_seqlens: the packed row's document boundaries, a list of each row's, or None. A batch of
            rows runs in one attention call in the balanced layout (the rows end to end as one pack,
            as ``shard_inputs`` shards them), row by row in the others.
        from_position_ids: without ``cu_seqlens``, find the documents of a row where its
            ``position_ids`` restart (what padding-free collators such as transformers'
            ``DataCollatorWithFlattening`` produce; transformers' rule: a document starts wherever a
            position is not the previous one + 1). That costs one all-gather of the position ids and
            one host read per forward, and cannot run inside a compiled model. False: every row is
            one sequence, ``position_ids`` are not read.
    """
    global _BATCH, _FROM_POSITION_IDS, _DERIVED, _FROM_FLASH_KWARGS
    if per_row(cu_seqlens):
        _BATCH = PackedBatch.of_rows(cu_seqlens)
    else:
        _BATCH = None if cu_seqlens is None else PackedBatch.of(cu_seqlens)
    _CHECKED_MASKS.clear()
    _FROM_POSITION_IDS, _DERIVED, _FROM_FLASH_KWARGS = bool(from_position_ids), None, None
    if _BATCH is not None:
        for settings in _SETTINGS.values():
            _prepare_llama3(_BATCH, settings)

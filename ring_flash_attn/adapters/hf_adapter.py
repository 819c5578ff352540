"""ring-flash-attn 0.1.x's transformers adapter, with its names and behaviour (needs transformers).

The original's path, unchanged::

    substitute_hf_flash_attn(group, heads_k_stride)        # once
    model = AutoModelForCausalLM.from_pretrained(..., attn_implementation="flash_attention_2")
    update_ring_flash_attn_params(cu_seqlens, group)       # every packed batch (global cu_seqlens)
    model(input_ids=local_ids, position_ids=local_position_ids)   # this rank's contiguous 1/W

With ``update_ring_flash_attn_params(cu_seqlens, group, layout="balanced")`` and the inputs sharded
with ``shard_varlen(x, cu_seqlens, "balanced", rank, W)`` the same path runs the balanced layout
(every rank the same causal work, whatever the document lengths).

:func:`substitute_hf_flash_attn` replaces ``transformers.modeling_flash_attention_utils.
_flash_attention_forward`` by one of the functions :func:`create_ring_flash_attention_forward`
returns (looked up when called, so a caller that replaces it is obeyed; the one with as many
parameters as transformers' function, else the one that accepts its arguments by name), switched by
:data:`RING_ATTN_SWITCH` (:func:`use_ring_attn`), and registers :func:`flash_attention_forward`, which
calls it, as the ``flash_attention_2`` / ``flash_attention_3`` attention functions. That function
runs :func:`ring_flash_attn.llama3_flash_attn_varlen_func` (or, for the balanced layout,
``balanced_llama3_flash_attn_varlen_func``) on the arguments that :func:`update_ring_flash_attn_params`
put in :data:`DATA_PARAMS`.

Without the flash-attn package, transformers refuses ``attn_implementation="flash_attention_2"``
when it loads the model. Load it with ``attn_implementation="ring_attention"`` instead (or call
``model.set_attn_implementation("ring_attention")``): :func:`substitute_hf_flash_attn` registers the
same function under that name. Everything else stays as it is.
"""

from __future__ import annotations

import inspect
import os
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import transformers
import transformers.modeling_flash_attention_utils

from ..allgather.api import balanced_llama3_flash_attn_varlen_func, llama3_flash_attn_varlen_func
from ..allgather.plan import llama3_flash_attn_prepare_cu_seqlens
from ..core.validation import group_rank_and_size
from .hf import RING_ATTENTION_NAME, register_attention_function, window_size_of

DATA_PARAMS: Dict[str, object] = {}
RING_ATTN_SWITCH = True

# transformers' _flash_attention_forward over its versions: its positional parameters, and whether it
# takes **kwargs. The original adapter tells them apart by their number of parameters.
_PARAMS_BEFORE_4_47 = ("query_states", "key_states", "value_states", "attention_mask", "query_length", "is_causal",
                       "dropout", "position_ids", "softmax_scale", "sliding_window", "use_top_left_mask", "softcap",
                       "deterministic")
_PARAMS_4_47 = _PARAMS_BEFORE_4_47 + ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k",
                                      "target_dtype")
_PARAMS_4_53 = _PARAMS_4_47 + ("attn_implementation",)
_PARAMS_5 = _PARAMS_4_53 + ("block_table", "k_cache", "v_cache")
TRANSFORMERS_SIGNATURES: Tuple[Tuple[Tuple[str, ...], bool], ...] = (
    (_PARAMS_BEFORE_4_47, False), (_PARAMS_4_47, False), (_PARAMS_4_47, True), (_PARAMS_4_53, True), (_PARAMS_5, True),
)
_DEFAULTS = {"dropout": 0.0, "use_top_left_mask": False}
_REQUIRED = 6  # query_states .. is_causal have no default


def check_params(f1: Callable, f2: Callable) -> bool:
    """Whether ``f1`` and ``f2`` have the same number of parameters (the original's test)."""
    return len(inspect.signature(f1).parameters) == len(inspect.signature(f2).parameters)


def update_ring_flash_attn_params(cu_seqlens: torch.Tensor, process_group: Optional[dist.ProcessGroup], *,
                                  layout: str = "llama3") -> None:
    """Set the packed batch of the next forwards: ``cu_seqlens`` is the global cu_seqlens of the whole
    packed sequence (int32). Fills :data:`DATA_PARAMS` for causal attention.

    Args:
        cu_seqlens: the packed row's document boundaries (global, the same on every rank).
        process_group: the ranks sharing the row (``None``: the default group).
        layout: keyword-only; how the ranks hold the row. ``"llama3"`` (ring-flash-attn's): contiguous
            1/W slices (``cu_seqlens_q/k``, ``max_seqlen_q/k``, ``local_k_slice`` prepared here).
            ``"balanced"``: every document cut into 2W chunks within a token of each other, rank r
            holding chunks r and 2W-1-r (``ring_flash_attn.layouts.shard_varlen(x, cu_seqlens,
            "balanced", r, W)`` for the input ids, position ids and labels): the same causal work on
            every rank, any document lengths, the pack's total a multiple of W (``pad_pack``).
    """
    if layout not in ("llama3", "balanced"):
        raise ValueError(f"layout must be 'llama3' or 'balanced', got {layout!r}")
    if layout == "balanced":
        lengths = cu_seqlens[1:] - cu_seqlens[:-1]
        DATA_PARAMS.update(layout=layout, cu_seqlens=cu_seqlens, max_seqlen=int(lengths.max()) if lengths.numel() else 0)
        return
    rank, world_size = group_rank_and_size(process_group)
    cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, local_k_slice = llama3_flash_attn_prepare_cu_seqlens(
        cu_seqlens, True, rank, world_size)
    DATA_PARAMS.update(layout=layout, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
                       max_seqlen_k=max_seqlen_k, local_k_slice=local_k_slice)


def use_ring_attn(flag: bool) -> None:
    """Switch the substituted ``_flash_attention_forward`` between the ring (True) and transformers' own."""
    global RING_ATTN_SWITCH
    RING_ATTN_SWITCH = flag


def _ring_varlen_attention(process_group, heads_k_stride: int, query_states: torch.Tensor,
                           key_states: torch.Tensor, value_states: torch.Tensor, query_length: int, is_causal: bool,
                           dropout: float = 0.0, softmax_scale: Optional[float] = None,
                           sliding_window: Optional[int] = None, use_top_left_mask: bool = False,
                           softcap: Optional[float] = None, deterministic: Optional[bool] = None,
                           s_aux: Optional[torch.Tensor] = None, **ignored) -> torch.Tensor:
    """``query_states (1, S_local, H, D)`` of this rank's slice of the packed batch -> ``(1, S_local, H, D)``.
    ``s_aux``: gpt-oss's attention sinks. The rest of what transformers passes (its masks, position ids,
    varlen arguments) is ignored, as ring-flash-attn does: the packed batch is the one of
    :func:`update_ring_flash_attn_params`. Keys longer than the queries (a KV cache: ``generate()``) are
    refused."""
    if key_states.shape[1] != query_states.shape[1]:
        raise ValueError(f"ring_flash_attn.adapters.hf_adapter: got {query_states.shape[1]} queries and "
                         f"{key_states.shape[1]} keys, i.e. keys from a KV cache (generate()): decoding with a KV "
                         "cache is not supported by ring attention (each rank holds a slice of the sequence). For "
                         "generation use the model's normal attention on the whole sequence on one rank: "
                         "use_ring_attn(False) (transformers' flash attention, with flash-attn installed) or "
                         "model.set_attn_implementation('sdpa')")
    causal = is_causal and not (use_top_left_mask and query_length == 1)
    if not causal:
        raise ValueError("ring_flash_attn.adapters.hf_adapter: update_ring_flash_attn_params prepares causal "
                         "attention; this layer is not causal (use ring_flash_attn.adapters.hf.register_ring_attention"
                         " for non-causal models)")
    if query_states.shape[0] != 1:
        raise ValueError(f"ring_flash_attn.adapters.hf_adapter: a packed batch has batch size 1 (documents "
                         f"concatenated, cu_seqlens given to update_ring_flash_attn_params), got {query_states.shape[0]}")
    balanced = DATA_PARAMS.get("layout") == "balanced"
    needed = ("cu_seqlens", "max_seqlen") if balanced else ("cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q",
                                                             "max_seqlen_k", "local_k_slice")
    missing = [k for k in needed if k not in DATA_PARAMS]
    if missing:
        raise RuntimeError("ring_flash_attn.adapters.hf_adapter: call update_ring_flash_attn_params(cu_seqlens, "
                           f"group) before the forward (DATA_PARAMS lacks {missing})")
    if deterministic is None:
        deterministic = os.environ.get("FLASH_ATTENTION_DETERMINISTIC", "0") == "1"
    options = dict(dropout_p=dropout, softmax_scale=softmax_scale, causal=True, window_size=window_size_of(sliding_window),
                   deterministic=deterministic, group=process_group, softcap=softcap or 0.0, sinks=s_aux)
    q, k, v = query_states[0], key_states[0], value_states[0]
    if balanced:
        out = balanced_llama3_flash_attn_varlen_func(q, k, v, DATA_PARAMS["cu_seqlens"], DATA_PARAMS["max_seqlen"],
                                                     heads_k_stride=heads_k_stride, **options)
    else:
        out = llama3_flash_attn_varlen_func(q, k, v, DATA_PARAMS["cu_seqlens_q"], DATA_PARAMS["cu_seqlens_k"],
                                            DATA_PARAMS["max_seqlen_q"], DATA_PARAMS["max_seqlen_k"], heads_k_stride,
                                            DATA_PARAMS["local_k_slice"], **options)
    return out[None]


def _arguments_by_name(signature: inspect.Signature, args: tuple, kwargs: dict) -> Dict[str, object]:
    """A call's arguments bound to ``signature``, by name, with what its ``**kwargs`` caught flattened in."""
    arguments = dict(signature.bind(*args, **kwargs).arguments)
    for name, param in signature.parameters.items():
        if param.kind is param.VAR_KEYWORD:
            arguments.update(arguments.pop(name, {}))
    return arguments


def _with_parameters(impl: Callable, names: Sequence[str], var_keyword: bool) -> Callable:
    """``impl`` behind a function whose signature is ``names`` (+ ``**kwargs``): transformers' shape."""
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    params = [inspect.Parameter(n, kind, default=inspect.Parameter.empty if i < _REQUIRED else _DEFAULTS.get(n))
              for i, n in enumerate(names)]
    if var_keyword:
        params.append(inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD))
    signature = inspect.Signature(params)

    def forward(*args, **kwargs):  # arguments not passed take _ring_varlen_attention's defaults (the same)
        return impl(**_arguments_by_name(signature, args, kwargs))

    forward.__signature__ = signature
    forward.__name__ = forward.__qualname__ = f"_flash_attention_forward_{len(names)}"
    return forward


def create_ring_flash_attention_forward(process_group: Optional[dist.ProcessGroup],
                                        heads_k_stride: int) -> List[Callable]:
    """Ring replacements for transformers' ``_flash_attention_forward``, one per signature it has had
    (oldest first, :data:`TRANSFORMERS_SIGNATURES`)."""

    def impl(**arguments):
        return _ring_varlen_attention(process_group, heads_k_stride, **arguments)

    return [_with_parameters(impl, names, var_kw) for names, var_kw in TRANSFORMERS_SIGNATURES]


def _pick(original: Callable, candidates: Sequence[Callable]) -> Callable:
    """The candidate with as many parameters as ``original``; otherwise one that takes ``**kwargs``,
    called with ``original``'s arguments by name."""
    for candidate in candidates:
        if check_params(original, candidate):
            return candidate
    accepting = [c for c in candidates if any(p.kind is p.VAR_KEYWORD for p in inspect.signature(c).parameters.values())]
    if not accepting:
        raise ValueError(f"transformers {transformers.__version__}: none of the replacements for "
                         "_flash_attention_forward matches its signature and none takes **kwargs")
    chosen, signature = accepting[-1], inspect.signature(original)

    def by_name(*args, **kwargs):
        return chosen(**_arguments_by_name(signature, args, kwargs))

    return by_name


def substitute_hf_flash_attn(process_group: Optional[dist.ProcessGroup], heads_k_stride: int) -> None:
    """Make transformers' flash-attention path run the ring (llama3 layout: each rank holds a
    contiguous 1/W of the packed batch). Call once, before or after loading the model; then
    :func:`update_ring_flash_attn_params` for every packed batch.

    Args:
        process_group: the ranks sharing each sequence (``None``: the default group).
        heads_k_stride: K/V heads gathered at a time (1 .. nheads_k; fewer saves memory).
    """
    module = transformers.modeling_flash_attention_utils
    current = module._flash_attention_forward
    original = getattr(current, "__ring_flash_attn_original__", current)
    ring = _pick(original, create_ring_flash_attention_forward(process_group, heads_k_stride))

    def _flash_attention_forward(*args, **kwargs):
        return (ring if RING_ATTN_SWITCH else original)(*args, **kwargs)

    _flash_attention_forward.__ring_flash_attn_original__ = original
    _flash_attention_forward.__signature__ = inspect.signature(original)
    module._flash_attention_forward = _flash_attention_forward
    for name in ("flash_attention_2", "flash_attention_3", RING_ATTENTION_NAME):
        register_attention_function(name, flash_attention_forward)


def flash_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: Optional[torch.Tensor], dropout: float = 0.0,
                            scaling: Optional[float] = None, sliding_window: Optional[int] = None,
                            softcap: Optional[float] = None, **kwargs) -> Tuple[torch.Tensor, None]:
    """transformers attention function (``query (B, H, S, D)`` -> ``(out (B, S, H, D), None)``) that
    calls ``transformers.modeling_flash_attention_utils._flash_attention_forward`` as transformers'
    flash-attention path does (float32 inputs cast to the model's compute dtype and back)."""
    seq_len = query.shape[2]
    query, key, value = (t.transpose(1, 2) for t in (query, key, value))
    target_dtype = _compute_dtype(module) if query.dtype == torch.float32 else None
    kwargs.pop("is_causal", None)  # the module's own flag decides
    original_dtype = query.dtype
    out = transformers.modeling_flash_attention_utils._flash_attention_forward(
        query.to(target_dtype), key.to(target_dtype), value.to(target_dtype), attention_mask, query_length=seq_len,
        is_causal=module.is_causal, dropout=dropout, softmax_scale=scaling, sliding_window=sliding_window,
        softcap=softcap, use_top_left_mask=False, target_dtype=target_dtype, **kwargs)
    return out.to(original_dtype), None


def _compute_dtype(module: torch.nn.Module) -> Optional[torch.dtype]:
    """The dtype float32 activations run attention in: autocast's, a quantized model's, else its Linear weights'."""
    if torch.is_autocast_enabled():
        return torch.get_autocast_dtype("cuda") if hasattr(torch, "get_autocast_dtype") else torch.get_autocast_gpu_dtype()
    config = getattr(module, "config", None)
    if hasattr(config, "_pre_quantization_dtype"):
        return config._pre_quantization_dtype
    return next((m.weight.dtype for m in module.modules() if isinstance(m, torch.nn.Linear)), None)

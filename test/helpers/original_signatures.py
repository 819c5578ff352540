"""ring-flash-attn 0.1.7 / 0.1.8's public signatures, written from its source: ``name -> ((parameter,
default), ...)`` in order (``REQUIRED``: no default). The contract for every function it has: the
same names, order and defaults; anything we add comes after them, keyword-only."""

REQUIRED = object()
_TAIL = (("dropout_p", 0.0), ("softmax_scale", None), ("causal", False), ("window_size", (-1, -1)),
         ("alibi_slopes", None), ("deterministic", False), ("return_attn_probs", False), ("group", None))
_Q, _KV, _QKV = (("q", REQUIRED), ("k", REQUIRED), ("v", REQUIRED)), (("q", REQUIRED), ("kv", REQUIRED)), \
    (("qkv", REQUIRED),)
_VARLEN = (("cu_seqlens", REQUIRED), ("max_seqlen", REQUIRED))
_LLAMA3 = (("cu_seqlens_q", REQUIRED), ("cu_seqlens_k", REQUIRED), ("max_seqlen_q", REQUIRED),
           ("max_seqlen_k", REQUIRED), ("heads_k_stride", REQUIRED), ("local_k_slice", REQUIRED))


def _family(prefix: str, middle: tuple = ()) -> dict:
    return {f"{prefix}_func": _Q + middle + _TAIL, f"{prefix}_kvpacked_func": _KV + middle + _TAIL,
            f"{prefix}_qkvpacked_func": _QKV + middle + _TAIL}


# module (as imported by callers) -> {function: parameters}
SIGNATURES = {
    "ring_flash_attn.ring_flash_attn": _family("ring_flash_attn"),
    "ring_flash_attn.zigzag_ring_flash_attn": _family("zigzag_ring_flash_attn"),
    "ring_flash_attn.stripe_flash_attn": _family("stripe_flash_attn"),
    "ring_flash_attn.ring_flash_attn_varlen": _family("ring_flash_attn_varlen", _VARLEN),
    "ring_flash_attn.zigzag_ring_flash_attn_varlen": _family("zigzag_ring_flash_attn_varlen", _VARLEN),
    "ring_flash_attn.llama3_flash_attn_varlen": {
        **_family("llama3_flash_attn_varlen", _LLAMA3),
        "llama3_flash_attn_prepare_cu_seqlens": (("cu_seqlens", REQUIRED), ("causal", REQUIRED), ("rank", REQUIRED),
                                                 ("world_size", REQUIRED)),
    },
    "ring_flash_attn.adapters.hf_adapter": {
        "check_params": (("f1", REQUIRED), ("f2", REQUIRED)),
        "update_ring_flash_attn_params": (("cu_seqlens", REQUIRED), ("process_group", REQUIRED)),
        "use_ring_attn": (("flag", REQUIRED),),
        "create_ring_flash_attention_forward": (("process_group", REQUIRED), ("heads_k_stride", REQUIRED)),
        "flash_attention_forward": (("module", REQUIRED), ("query", REQUIRED), ("key", REQUIRED), ("value", REQUIRED),
                                    ("attention_mask", REQUIRED), ("dropout", 0.0), ("scaling", None),
                                    ("sliding_window", None), ("softcap", None)),
        "substitute_hf_flash_attn": (("process_group", REQUIRED), ("heads_k_stride", REQUIRED)),
    },
    "ring_flash_attn.utils": {
        "update_out_and_lse": (("out", REQUIRED), ("lse", REQUIRED), ("block_out", REQUIRED), ("block_lse", REQUIRED),
                               ("slice_", None)),
        "get_default_args": (("func", REQUIRED),),
        "flatten_varlen_lse": (("lse", REQUIRED), ("cu_seqlens", REQUIRED)),
        "unflatten_varlen_lse": (("lse", REQUIRED), ("cu_seqlens", REQUIRED), ("max_seqlen", REQUIRED)),
        "RingComm": (("process_group", REQUIRED),),
        "AllGatherComm": (("group", None),),
    },
    "ring_flash_attn.triton_utils": {
        "flatten_varlen_lse": (("lse", REQUIRED), ("cu_seqlens", REQUIRED)),
        "unflatten_varlen_lse": (("lse", REQUIRED), ("cu_seqlens", REQUIRED), ("max_seqlen", REQUIRED)),
    },
}
# the top level re-exports every function of the attention modules and the two adapter entry points
TOP_LEVEL = sorted({name for module, funcs in SIGNATURES.items() if module.count(".") == 1
                    and not module.endswith("utils") for name in funcs}
                   | {"substitute_hf_flash_attn", "update_ring_flash_attn_params"})

"""ring_flash_attn: exact attention over sequences sharded across a torch.distributed group.

Drop-in for ring-flash-attn 0.1.x: the same function names, arguments, data layouts and module
paths (``ring_flash_attn.zigzag_ring_flash_attn``, ``.utils``, ``.adapters.hf_adapter``, ...; see
:mod:`ring_flash_attn.compat`). ``substitute_hf_flash_attn`` and ``update_ring_flash_attn_params``
import transformers when first used.
"""

import sys

from .ring.api import (
    balanced_ring_flash_attn_varlen_func,
    balanced_ring_flash_attn_varlen_kvpacked_func,
    balanced_ring_flash_attn_varlen_qkvpacked_func,
    ring_attention,
    ring_attention_varlen,
    ring_flash_attn_varlen_func,
    ring_flash_attn_varlen_kvpacked_func,
    ring_flash_attn_varlen_qkvpacked_func,
    stripe_flash_attn_varlen_func,
    stripe_flash_attn_varlen_kvpacked_func,
    stripe_flash_attn_varlen_qkvpacked_func,
    zigzag_ring_flash_attn_varlen_func,
    zigzag_ring_flash_attn_varlen_kvpacked_func,
    zigzag_ring_flash_attn_varlen_qkvpacked_func,
    ring_flash_attn_func,
    ring_flash_attn_kvpacked_func,
    ring_flash_attn_qkvpacked_func,
    stripe_flash_attn_func,
    stripe_flash_attn_kvpacked_func,
    stripe_flash_attn_qkvpacked_func,
    zigzag_ring_flash_attn_func,
    zigzag_ring_flash_attn_kvpacked_func,
    zigzag_ring_flash_attn_qkvpacked_func,
)
from .allgather.plan import llama3_flash_attn_prepare_cu_seqlens
from .allgather.api import (
    balanced_llama3_flash_attn_varlen_func,
    balanced_llama3_flash_attn_varlen_kvpacked_func,
    balanced_llama3_flash_attn_varlen_qkvpacked_func,
    llama3_flash_attn_varlen_func,
    llama3_flash_attn_varlen_kvpacked_func,
    llama3_flash_attn_varlen_qkvpacked_func,
    zigzag_llama3_flash_attn_varlen_func,
    zigzag_llama3_flash_attn_varlen_kvpacked_func,
    zigzag_llama3_flash_attn_varlen_qkvpacked_func,
)
from .ulysses.api import (
    ulysses_flash_attn_func,
    ulysses_flash_attn_kvpacked_func,
    ulysses_flash_attn_qkvpacked_func,
    ulysses_flash_attn_varlen_func,
    ulysses_flash_attn_varlen_kvpacked_func,
    ulysses_flash_attn_varlen_qkvpacked_func,
)
from .ulysses.groups import UlyssesRingGroups, make_ulysses_ring_groups
from .core.layouts import (LAYOUTS, pad_pack, position_ids, shard, shard_varlen, unshard, unshard_varlen,
                           varlen_position_ids)
from .compat import install_module_aliases

__version__ = "0.2.0"

_HF_ADAPTER_NAMES = ("substitute_hf_flash_attn", "update_ring_flash_attn_params")


def __getattr__(name: str):  # transformers is optional: imported only when its adapter is asked for
    if name not in _HF_ADAPTER_NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from .adapters import hf_adapter

    return getattr(hf_adapter, name)


install_module_aliases(sys.modules[__name__])

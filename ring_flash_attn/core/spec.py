"""One attention call's description, everything but its tensors: :class:`CallSpec`; and the
options a public call was given, as given: :class:`AttentionArgs`.

A public function packs flash-attn's keyword arguments into an :class:`AttentionArgs`; its family's
helper validates them once (:func:`~ring_flash_attn.core.validation.validated_spec`), which builds
the call's :class:`CallSpec`. The custom ops take the spec as their primitive arguments
(:data:`SPEC_SCHEMA`, the same for every family, flattened by ``*spec``) and rebuild it with
``CallSpec(*primitives)``; everything below the ops -- plans, strategies, the Ulysses wings -- takes
the spec, never a list of options. The spec is a ``NamedTuple`` so that it is immutable, hashable (a
plan cache key part) and traced by ``torch.compile`` as constants.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple, Optional, Tuple, Union, get_type_hints

if TYPE_CHECKING:
    from torch import Tensor


class AttentionArgs(NamedTuple):
    """flash-attn's keyword arguments of one public call, as the caller gave them (unchecked; the
    defaults are flash-attn's). :class:`CallSpec` is what the ops take, built from these after
    validation."""

    dropout_p: float = 0.0
    softmax_scale: Optional[float] = None
    causal: bool = False
    window_size: Tuple[int, int] = (-1, -1)
    softcap: float = 0.0
    alibi_slopes: Optional[Tensor] = None
    deterministic: bool = False
    return_attn_probs: bool = False
    group: Any = None  # a ProcessGroup or None; Ulysses: also UlyssesRingGroups
    backend: Optional[str] = None
    sinks: Optional[Tensor] = None

    def result(self, out: Tensor, lse: Tensor) -> Union[Tensor, Tuple[Tensor, Tensor, None]]:
        """What the public call returns: ``out``, or ``(out, lse, None)`` with ``return_attn_probs``."""
        return (out, lse, None) if self.return_attn_probs else out


class CallSpec(NamedTuple):
    """What an attention call is asked, besides its tensors (q, k, v, ``cu_seqlens``, ALiBi slopes,
    sinks). Fields after ``max_seqlen`` belong to one family and keep their defaults elsewhere."""

    layout: str  # how the sequence is sharded (ring, zigzag, llama3, balanced, ...)
    causal: bool
    window_left: int  # flash-attn's window_size, normalised: -1 = unbounded
    window_right: int
    softmax_scale: float  # resolved: never None
    softcap: float  # 0: none
    dropout_p: float
    deterministic: bool
    backend: str  # block-kernel name, "" = automatic
    group: str  # the process group's name ("" = one process); Ulysses: the whole 2D group
    max_seqlen: int = 0  # packed calls (the all-gather family: of the queries)
    # the all-gather family
    max_seqlen_k: int = 0
    k_start: int = 0  # llama3's local_k_slice
    k_stop: int = 0
    heads_k_stride: int = 0  # 0: every K/V head at once
    # Ulysses
    kv_repeat: int = 1  # each K/V head repeated this often before the all-to-all
    chunks: int = 1  # head chunks whose exchange overlaps the previous chunk's attention
    ulysses_group: str = ""
    ring_group: str = ""

    @property
    def window(self) -> Tuple[int, int]:
        return self.window_left, self.window_right


_SCHEMA_TYPES = {str: "str", bool: "bool", int: "SymInt", float: "float"}  # SymInt: a dynamic int never recompiles

SPEC_SCHEMA = ", ".join(f"{_SCHEMA_TYPES[kind]} {name}" for name, kind in get_type_hints(CallSpec).items())
"""The spec's fields as op-schema arguments, in order (what ``*spec`` passes)."""

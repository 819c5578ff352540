"""One attention call's description, everything but its tensors: :class:`CallSpec`.

A public function builds it once from its arguments (after validation); the custom ops take it as
their primitive arguments (:data:`SPEC_SCHEMA`, the same for every family, flattened by ``*spec``)
and rebuild it with ``CallSpec(*primitives)``; everything below the ops -- plans, runners, the
Ulysses wings -- takes the spec, never a list of options. A ``NamedTuple`` so that it is immutable,
hashable (a plan cache key part) and traced by ``torch.compile`` as constants.
"""

from __future__ import annotations

from typing import NamedTuple, Tuple, get_type_hints


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

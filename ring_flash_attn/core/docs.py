"""Argument documentation the public functions share: appended to each one's docstring by
:func:`ring_flash_attn.core.public.public`, so ``help()`` on any of them lists every argument."""

OPTIONS = """
    dropout_p: dropout probability on the attention weights (0 at evaluation). The kernels that
        apply it (``torch_cuda_flash`` on CUDA, ``reference``) replay each block's mask exactly in
        the backward.
    softmax_scale: scale of ``q @ k^T``; default ``headdim ** -0.5``. Must be finite and > 0.
    causal: each query attends to the keys at global positions up to its own.
    window_size: ``(left, right)``: query at global position ``i`` sees keys ``i - left .. i + right``
        (-1: unbounded), combined with ``causal`` -- flash-attn's meaning, on global positions.
    alibi_slopes: ``(nheads,)`` or ``(batch, nheads)`` float32; adds ``-slope * |i - j|`` to the scores.
    deterministic: a backward with a fixed reduction order (bitwise reproducible runs).
    return_attn_probs: also return the log-sum-exp (flash-attn's name; no probabilities are returned).
    group: the process group the sequence is sharded over; ``None``: the default group (one rank,
        no communication, when no process group is initialised).
    softcap: keyword-only; logits soft-capped as ``softcap * tanh(scores / softcap)``; 0: off.
    backend: keyword-only; the block kernel by name (see ``ring_flash_attn.kernels.BACKENDS``);
        default ``$RING_FLASH_ATTN_BACKEND``, else ``"auto"`` (the fastest that supports the call).
    sinks: keyword-only; ``(nheads,)`` attention sinks (gpt-oss), any float dtype, learnable: one
        logit per head added to every row's softmax denominator (not scaled, not soft-capped); out
        and lse include it. Its gradient is this rank's rows' share (sum it over the group with the
        other parameters' gradients).
"""

BATCH_DOCS = """
Args:
    q: ``(batch, local_seqlen, nheads, headdim)``: this rank's tokens, in the function's layout
        (``ring_flash_attn.layouts.shard``); fp16, bf16, fp32 or fp64.
    k, v: ``(batch, local_seqlen, nheads_k, headdim)``, ``nheads % nheads_k == 0`` (GQA / MQA: K/V
        travel with ``nheads_k`` heads). ``kvpacked``: ``kv (batch, local_seqlen, 2, nheads_k,
        headdim)``; ``qkvpacked``: ``qkv (batch, local_seqlen, 3, nheads, headdim)``.""" + OPTIONS + """
Returns:
    ``out (batch, local_seqlen, nheads, headdim)`` in q's dtype: this rank's rows of attention over
    the whole sequence. With ``return_attn_probs=True``, ``(out, lse, None)``: ``lse (batch, nheads,
    local_seqlen)`` float32 (float64 for fp64 inputs), the log-sum-exp of each row's scores over
    the whole sequence; differentiable.
"""

VARLEN_DOCS = """
Args:
    q: ``(total_local_tokens, nheads, headdim)``: this rank's part of every document of the packed
        batch, documents one after another (``ring_flash_attn.layouts.shard_varlen``).
    k, v: ``(total_local_tokens, nheads_k, headdim)``; ``kvpacked``: ``kv (total_local_tokens, 2,
        nheads_k, headdim)``; ``qkvpacked``: ``qkv (total_local_tokens, 3, nheads, headdim)``.
    cu_seqlens: int32 / int64 ``(documents + 1,)``: the *local* document offsets (global // world
        size; every document's length divisible as the layout needs, see
        ``ring_flash_attn.layouts.pad_cu_seqlens``). Read once per tensor and cached.
    max_seqlen: the longest local document (checked).""" + OPTIONS + """
Returns:
    ``out (total_local_tokens, nheads, headdim)``; with ``return_attn_probs=True`` ``(out, lse,
    None)``, ``lse (nheads, total_local_tokens)`` float32 (float64 for fp64 inputs).
    Attention never crosses a document.
"""

ALLGATHER_OPTIONS = """
    heads_k_stride: K/V heads gathered at a time: a positive divisor of ``nheads_k``, or ``None`` for
        all (the default where it is keyword-only); 0 is refused, as by ring-flash-attn. The next
        chunk's all-gather overlaps the current chunk's attention, memory grows with the stride.""" + OPTIONS

LLAMA3_DOCS = """
Args:
    q: ``(local_tokens, nheads, headdim)``: the contiguous r-th 1/W of the packed tokens.
    k, v: ``(local_tokens, nheads_k, headdim)``; ``kvpacked``: ``kv (local_tokens, 2, nheads_k,
        headdim)``; ``qkvpacked``: ``qkv (local_tokens, 3, nheads, headdim)``.
    cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, local_k_slice: this rank's documents,
        from ``llama3_flash_attn_prepare_cu_seqlens(cu_seqlens, causal, rank, world_size)`` (once per
        batch, reused by every layer).""" + ALLGATHER_OPTIONS + """
Returns:
    ``out (local_tokens, nheads, headdim)``; with ``return_attn_probs=True`` ``(out, lse, None)``,
    ``lse (nheads, local_tokens)`` float32 (float64 for fp64 inputs).
    Attention never crosses a document.
"""

ZIGZAG_LLAMA3_DOCS = """
Args:
    q: ``(total_local_tokens, nheads, headdim)``: chunks r and 2W-1-r of 2W of every document, in
        document order (``ring_flash_attn.layouts.shard_varlen(x, cu_seqlens, "zigzag", r, W)``).
    k, v: ``(total_local_tokens, nheads_k, headdim)``; ``kvpacked``: ``kv (total_local_tokens, 2,
        nheads_k, headdim)``; ``qkvpacked``: ``qkv (total_local_tokens, 3, nheads, headdim)``.
    cu_seqlens: int32 / int64: the *global* document offsets; every document a multiple of 2W tokens
        (``ring_flash_attn.layouts.pad_cu_seqlens``). Read once per tensor and cached.
    max_seqlen: the longest global document (checked).""" + ALLGATHER_OPTIONS + """
    heads_k_stride is keyword-only here.
Returns:
    ``out (total_local_tokens, nheads, headdim)``; with ``return_attn_probs=True`` ``(out, lse,
    None)``, ``lse (nheads, total_local_tokens)`` float32 (float64 for fp64 inputs).
    Attention never crosses a document.
"""

BALANCED_ARGS = """
Args:
    q: ``(total_local_tokens, nheads, headdim)``: this rank's tokens in the balanced layout -- every
        document cut into 2W chunks whose sizes differ by at most one token, rank r holding chunks r
        and 2W-1-r of each, in document order (``ring_flash_attn.layouts.shard_varlen(x, cu_seqlens,
        "balanced", r, W)``). Every rank holds ``total // W`` tokens and the same causal work.
    k, v: ``(total_local_tokens, nheads_k, headdim)``; ``kvpacked``: ``kv (total_local_tokens, 2,
        nheads_k, headdim)``; ``qkvpacked``: ``qkv (total_local_tokens, 3, nheads, headdim)``.
    cu_seqlens: int32 / int64 ``(documents + 1,)``: the *global* document offsets (the whole pack's,
        the same on every rank); documents of any length >= 0, the pack's total a multiple of W
        (``ring_flash_attn.layouts.pad_pack``). Read on the host once per tensor and cached.
    max_seqlen: the longest global document (checked)."""

BALANCED_RETURNS = """
Returns:
    ``out (total_local_tokens, nheads, headdim)``; with ``return_attn_probs=True`` ``(out, lse,
    None)``, ``lse (nheads, total_local_tokens)`` float32. Attention never crosses a document.
"""

BALANCED_DOCS = BALANCED_ARGS + OPTIONS + BALANCED_RETURNS

BALANCED_LLAMA3_DOCS = BALANCED_ARGS + ALLGATHER_OPTIONS + """    heads_k_stride is keyword-only here.""" + BALANCED_RETURNS

ULYSSES_OPTIONS = OPTIONS.replace("""    group: the process group the sequence is sharded over; ``None``: the default group (one rank,
        no communication, when no process group is initialised).""", """    group: a process group (``None``: the default one): Ulysses over all its ranks; or the
        ``UlyssesRingGroups`` of ``make_ulysses_ring_groups(ulysses_degree, ring_degree)``: Ulysses
        inside each group of ``ulysses_degree`` consecutive ranks, a ring across them.""") + """    ring_layout: keyword-only; how the sequence is split over the ring ranks (see ``group``):
        ``ring``, ``zigzag``, ``stripe``; packed documents also ``balanced`` (any document lengths,
        balanced), ``llama3``, ``zigzag_llama3``, ``packed_zigzag``, ``balanced_llama3``. Each ring
        rank's part is cut into ``ulysses_degree`` contiguous pieces (``ring_flash_attn.layouts.shard``
        / ``shard_varlen`` with ``ulysses_degree=U``). Ignored with one ring rank.
    head_chunks: keyword-only; each rank's heads are exchanged and attended in up to this many
        chunks, the next chunk's all-to-all running while the current one is attended (1: no
        overlap; capped by the K/V heads per rank).
"""

ULYSSES_DOCS = """
Args:
    q: ``(batch, local_seqlen, nheads, headdim)``: this rank's tokens (pure Ulysses: the contiguous
        r-th 1/W of the sequence, ``ring_flash_attn.layouts.shard(x, "ring", r, W)``); ``nheads``
        a multiple of the Ulysses degree.
    k, v: ``(batch, local_seqlen, nheads_k, headdim)``, ``nheads % nheads_k == 0``; when
        ``nheads_k`` is not a multiple of the Ulysses degree, K/V heads are repeated to
        ``lcm(nheads_k, ulysses_degree)`` (never more). ``kvpacked``: ``kv (batch, local_seqlen, 2,
        nheads_k, headdim)``; ``qkvpacked``: ``qkv (batch, local_seqlen, 3, nheads, headdim)``.""" + ULYSSES_OPTIONS + """
Returns:
    ``out (batch, local_seqlen, nheads, headdim)`` in q's dtype: this rank's rows of attention over
    the whole sequence. With ``return_attn_probs=True``, ``(out, lse, None)``: ``lse (batch, nheads,
    local_seqlen)`` float32 (float64 for fp64 inputs); differentiable.
"""

ULYSSES_VARLEN_DOCS = """
Args:
    q: ``(total_local_tokens, nheads, headdim)``: this rank's tokens of the packed batch, from
        ``ring_flash_attn.layouts.shard_varlen(x, cu_seqlens, ring_layout, r, W, ulysses_degree=U)``
        (pure Ulysses: ``ulysses_degree=W``, the contiguous r-th 1/W of the pack, documents crossing
        rank boundaries; without ``ulysses_degree`` shard_varlen splits every document instead).
    k, v: ``(total_local_tokens, nheads_k, headdim)``; ``kvpacked``: ``kv (total_local_tokens, 2,
        nheads_k, headdim)``; ``qkvpacked``: ``qkv (total_local_tokens, 3, nheads, headdim)``.
    cu_seqlens: int32 / int64: the *global* document offsets. Pure Ulysses needs no divisibility
        but the pack's total by W; with a ring, every document as its ``ring_layout`` needs over the
        ring ranks. Read on the host once per tensor.
    max_seqlen: the longest global document (checked).""" + ULYSSES_OPTIONS + """
Returns:
    ``out (total_local_tokens, nheads, headdim)``; with ``return_attn_probs=True`` ``(out, lse,
    None)``, ``lse (nheads, total_local_tokens)`` float32 (float64 for fp64 inputs).
    Attention never crosses a document.
"""

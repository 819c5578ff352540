"""Work balance of the packed (varlen) layouts, counted on the CPU: a planning tool, no attention runs.

For packs of documents (built-in synthetic mixes, or lengths given) and world sizes ``W``, it prints
every packed layout's balance -- the attended (query, key) pairs of the busiest rank over the mean
over ranks -- for causal attention, full (non-causal) attention and, with ``--window N``, causal
attention with a sliding window (keys at distance <= N in the query's document). The pairs are
counted per token: a token at position ``p`` of a document of ``L`` tokens attends ``p + 1`` keys
(causal), ``min(p, N) + 1`` (window) or ``L`` (full), summed over the tokens each rank holds.

Layouts (``ring_flash_attn.layouts.varlen_token_index``): ``balanced`` (every document cut into 2W
chunks of sizes within one token; the pack padded at its end to a multiple of W), ``llama3`` (the
contiguous r-th 1/W of the pack, padded at its end to a multiple of W), ``packed_zigzag`` (the pack
zigzagged as one sequence, padded at its end to a multiple of 2W), and per document ``zigzag``
(= ``zigzag_llama3``), ``ring`` and ``stripe`` (every document padded at its end to a multiple of
2W, W and W). End-of-pack padding is one extra document; padding inside a document is part of it.
Padding tokens are counted as work: they are attention rows (and keys) the kernels process.

Per layout it also prints the padding (tokens added inside documents and at the end of the pack,
as % of the real tokens), whether every rank holds as many tokens, and ``time``: the busiest
rank's pairs (padding included) over the balanced layout's busiest rank's pairs, the attention
time the layout implies relative to the balanced one when the pairs set the time.

Examples::

    python benchmark/balance.py                                   # built-in mixes, W = 2 .. 64
    python benchmark/balance.py --lengths 300 5000 17 --world-sizes 2 4 --window 1024
    python benchmark/balance.py --lengths-file lengths.txt --markdown
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ring_flash_attn.core.layouts import balanced_bounds  # noqa: E402

Tensor = torch.Tensor

PACKED_LAYOUTS = ("balanced", "llama3", "packed_zigzag", "zigzag", "ring", "stripe")
MODES = ("causal", "full", "window")


# ---- document-length mixes ----------------------------------------------------------------------

def _lognormal(median: float, sigma: float) -> Callable[[torch.Generator, int, int], Tensor]:
    """A sampler of ``count`` log-normal lengths with the given median and sigma (rounded, >= 1)."""
    def sample(generator: torch.Generator, count: int, world_size: int) -> Tensor:
        normal = torch.randn(count, generator=generator, dtype=torch.float64)
        return (math.log(median) + sigma * normal).exp().round().clamp(min=1).to(torch.int64)
    return sample


def _uniform(low: int, high: int) -> Callable[[torch.Generator, int, int], Tensor]:
    """A sampler of ``count`` lengths uniform in ``[low, high]``."""
    def sample(generator: torch.Generator, count: int, world_size: int) -> Tensor:
        return torch.randint(low, high + 1, (count,), generator=generator)
    return sample


def _tiny(generator: torch.Generator, count: int, world_size: int) -> Tensor:
    """Lengths uniform in ``[1, 2W - 1]``: every document shorter than the balanced layout's 2W chunks."""
    return torch.randint(1, 2 * world_size, (count,), generator=generator)


@dataclass(frozen=True)
class Mix:
    """A synthetic mix of document lengths.

    Args:
        name: the name ``--mixes`` takes.
        description: what the lengths are, for the output.
        sample: ``sample(generator, count, world_size)`` -> ``count`` lengths (int64).
    """

    name: str
    description: str
    sample: Callable[[torch.Generator, int, int], Tensor]


MIXES: Tuple[Mix, ...] = (
    Mix("lognormal-2k", "log-normal lengths, median 2048, sigma 1", _lognormal(2048, 1.0)),
    Mix("lognormal-16k", "log-normal lengths, median 16384, sigma 1", _lognormal(16384, 1.0)),
    Mix("rl-rollouts", "uniform lengths 100-1500 (RL rollouts)", _uniform(100, 1500)),
    Mix("sft", "log-normal lengths, median 300, sigma 0.8 (short SFT samples)", _lognormal(300, 0.8)),
    Mix("tiny", "uniform lengths 1 .. 2W-1 (every document shorter than 2W; adversarial)", _tiny),
)
MIX_BY_NAME: Dict[str, Mix] = {mix.name: mix for mix in MIXES}


def mix_lengths(mix: Mix, world_size: int, tokens_per_rank: int, seed: int) -> List[int]:
    """Document lengths of ``mix`` filling exactly ``tokens_per_rank * world_size`` tokens.

    Lengths are drawn in batches of 1024 from a generator seeded with ``seed`` and the mix's
    position in :data:`MIXES` until they reach the total; the last document is cut to fit, so the
    pack's total is a multiple of ``W`` (the balanced layout needs no end padding). For a mix whose
    lengths do not depend on ``W``, a larger pack starts with the smaller packs' documents.

    Args:
        mix: the mix to draw from.
        world_size: W (the pack holds ``tokens_per_rank * W`` tokens; the tiny mix's lengths use W).
        tokens_per_rank: tokens per rank.
        seed: the random seed.
    """
    generator = torch.Generator().manual_seed(seed * 1000 + MIXES.index(mix))
    total = tokens_per_rank * world_size
    drawn: List[Tensor] = []
    filled = 0
    while filled < total:
        batch = mix.sample(generator, 1024, world_size)
        drawn.append(batch)
        filled += int(batch.sum())
    lengths = torch.cat(drawn)
    ends = lengths.cumsum(0)
    count = int(torch.searchsorted(ends, torch.tensor(total))) + 1  # the first document reaching the total
    lengths = lengths[:count].clone()
    lengths[-1] -= int(ends[count - 1]) - total
    return [int(n) for n in lengths]


def read_lengths(text: str) -> List[int]:
    """Positive document lengths from text of integers separated by whitespace and/or commas.

    Args:
        text: the file's contents.
    """
    lengths = [int(word) for word in re.split(r"[\s,]+", text.strip()) if word]
    if not lengths or min(lengths) < 1:
        raise ValueError("document lengths must be positive integers (at least one)")
    return lengths


# ---- counting -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class PaddedPack:
    """A pack after a layout's padding.

    Args:
        lengths: document lengths after padding, an end-of-pack padding document included (int64).
        inside: tokens added inside documents.
        end: tokens added at the end of the pack.
    """

    lengths: Tensor
    inside: int
    end: int


def pad_for_layout(lengths: Sequence[int], layout: str, world_size: int) -> PaddedPack:
    """The pack of documents ``lengths`` padded as ``layout`` needs for ``world_size`` ranks.

    Args:
        lengths: real document lengths.
        layout: one of :data:`PACKED_LAYOUTS`.
        world_size: W.
    """
    real = torch.tensor(list(lengths), dtype=torch.int64)
    document_multiple = {"zigzag": 2 * world_size, "ring": world_size, "stripe": world_size}
    pack_multiple = {"balanced": world_size, "llama3": world_size, "packed_zigzag": 2 * world_size}
    if layout in document_multiple:
        multiple = document_multiple[layout]
        padded = (real + multiple - 1) // multiple * multiple
        return PaddedPack(padded, int((padded - real).sum()), 0)
    if layout not in pack_multiple:
        raise ValueError(f"unknown layout {layout!r}; expected one of {PACKED_LAYOUTS}")
    end = -int(real.sum()) % pack_multiple[layout]
    padded = torch.cat([real, torch.tensor([end])]) if end else real
    return PaddedPack(padded, 0, end)


def _fold(chunk: Tensor, world_size: int) -> Tensor:
    """Rank holding zigzag chunk ``chunk`` of ``2W``: chunks ``r`` and ``2W-1-r`` go to rank ``r``."""
    return torch.where(chunk < world_size, chunk, 2 * world_size - 1 - chunk)


def token_owner(lengths: Tensor, layout: str, world_size: int) -> Tensor:
    """The rank holding every token of a padded pack (int64, one per token).

    Args:
        lengths: document lengths of the pack, already padded as ``layout`` needs.
        layout: one of :data:`PACKED_LAYOUTS`.
        world_size: W.
    """
    total = int(lengths.sum())
    index = torch.arange(total)
    if layout == "llama3":
        return index // (total // world_size)
    if layout == "packed_zigzag":
        return _fold(index // (total // (2 * world_size)), world_size)
    if layout == "balanced":
        offsets = (0,) + tuple(int(n) for n in lengths.cumsum(0))
        edges = torch.tensor(balanced_bounds(offsets, world_size), dtype=torch.int64)
        chunk_sizes = (edges[:, 1:] - edges[:, :-1]).flatten()
        chunk_owner = _fold(torch.arange(2 * world_size), world_size).repeat(len(lengths))
        return torch.repeat_interleave(chunk_owner, chunk_sizes)
    position = index - torch.repeat_interleave(lengths.cumsum(0) - lengths, lengths)
    document_length = torch.repeat_interleave(lengths, lengths)
    if layout == "ring":
        return position // (document_length // world_size)
    if layout == "zigzag":
        return _fold(position // (document_length // (2 * world_size)), world_size)
    if layout == "stripe":
        return position % world_size
    raise ValueError(f"unknown layout {layout!r}; expected one of {PACKED_LAYOUTS}")


def token_pairs(lengths: Tensor, mode: str, window: Optional[int] = None) -> Tensor:
    """Keys every token of a pack attends (int64, one per token).

    Args:
        lengths: document lengths of the pack.
        mode: ``"causal"`` (``p + 1`` at position ``p``), ``"window"`` (``min(p, window) + 1``) or
            ``"full"`` (the document's length).
        window: the window for ``"window"``: keys at distance <= ``window`` before the query.
    """
    if mode == "full":
        return torch.repeat_interleave(lengths, lengths)
    position = torch.arange(int(lengths.sum())) - torch.repeat_interleave(lengths.cumsum(0) - lengths, lengths)
    if mode == "causal":
        return position + 1
    if mode == "window":
        if window is None or window < 0:
            raise ValueError(f"mode 'window' needs a window >= 0, got {window!r}")
        return position.clamp(max=window) + 1
    raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")


@dataclass(frozen=True)
class LayoutCount:
    """One layout's counts for one pack and world size.

    Args:
        pairs: attended pairs per rank, per mode (int64 ``(W,)``), padding tokens' work included.
        tokens: tokens per rank (int64 ``(W,)``), padding included.
        pad_inside: tokens added inside documents.
        pad_end: tokens added at the end of the pack.
    """

    pairs: Dict[str, Tensor]
    tokens: Tensor
    pad_inside: int
    pad_end: int

    def balance(self, mode: str) -> float:
        """Busiest rank's pairs over the mean over ranks."""
        pairs = self.pairs[mode].double()
        return float(pairs.max() / pairs.mean())

    def equal_tokens(self) -> bool:
        """Whether every rank holds as many tokens."""
        return bool((self.tokens == self.tokens[0]).all())


def count_layout(lengths: Sequence[int], layout: str, world_size: int, modes: Sequence[str],
                 window: Optional[int] = None) -> LayoutCount:
    """Pairs and tokens per rank of ``layout`` for the pack of documents ``lengths``.

    Args:
        lengths: real document lengths.
        layout: one of :data:`PACKED_LAYOUTS`.
        world_size: W.
        modes: which of :data:`MODES` to count.
        window: the sliding window, for mode ``"window"``.
    """
    pack = pad_for_layout(lengths, layout, world_size)
    owner = token_owner(pack.lengths, layout, world_size)
    pairs = {mode: torch.zeros(world_size, dtype=torch.int64).index_add_(0, owner, token_pairs(pack.lengths, mode, window))
             for mode in modes}
    tokens = torch.bincount(owner, minlength=world_size)
    return LayoutCount(pairs, tokens, pack.inside, pack.end)


def count_all(lengths: Sequence[int], world_size: int, modes: Sequence[str],
              window: Optional[int] = None) -> Dict[str, LayoutCount]:
    """:func:`count_layout` for every layout of :data:`PACKED_LAYOUTS`."""
    return {layout: count_layout(lengths, layout, world_size, modes, window) for layout in PACKED_LAYOUTS}


# ---- output -------------------------------------------------------------------------------------

def table_rows(counts: Dict[str, LayoutCount], world_size: int, modes: Sequence[str],
               real_tokens: int) -> List[List[str]]:
    """One row of strings per layout: W, layout, (balance, time) per mode, padding %, equal tokens.

    Args:
        counts: :func:`count_all`'s result.
        world_size: W.
        modes: the modes counted.
        real_tokens: real tokens of the pack (the padding's denominator).
    """
    rows = []
    for layout, count in counts.items():
        row = [str(world_size), layout]
        for mode in modes:
            time = float(count.pairs[mode].max()) / float(counts["balanced"].pairs[mode].max())
            row += [f"{count.balance(mode):.3f}", f"{time:.2f}"]
        row += [f"{100 * count.pad_inside / real_tokens:.2f}", f"{100 * count.pad_end / real_tokens:.2f}",
                "yes" if count.equal_tokens() else "no"]
        rows.append(row)
    return rows


def table_header(modes: Sequence[str], window: Optional[int]) -> List[str]:
    """Column names matching :func:`table_rows`."""
    names = {"causal": "causal", "full": "full", "window": f"window {window}"}
    header = ["W", "layout"]
    for mode in modes:
        header += [f"{names[mode]} balance", f"{names[mode]} time"]
    return header + ["pad in docs %", "pad at end %", "equal tokens"]


def format_table(header: List[str], rows: List[List[str]], markdown: bool) -> str:
    """The rows as a markdown table or as aligned plain text."""
    if markdown:
        lines = [header, ["---"] * len(header)] + rows
        return "\n".join("| " + " | ".join(line) + " |" for line in lines)
    widths = [max(len(line[i]) for line in [header] + rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.rjust(width) for cell, width in zip(line, widths)) for line in [header] + rows)


def describe(lengths: Sequence[int]) -> str:
    """``documents (median / longest length)`` of a pack, for the heading of its table."""
    ordered = sorted(lengths)
    return f"{len(lengths)} ({ordered[len(ordered) // 2]} / {ordered[-1]})"


LEGEND = (
    "balance: attended (query, key) pairs of the busiest rank / mean over ranks (1.000 = even); "
    "time: busiest rank's pairs / the balanced layout's busiest rank's pairs (the attention time it "
    "implies against balanced); pairs counted per token (causal p+1, window min(p, N)+1, full L), "
    "padding tokens' work included; pad in docs / at end: tokens each layout adds inside documents / "
    "at the end of the pack, % of the real tokens; equal tokens: every rank holds as many. "
    "A count, not a timing."
)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[2, 4, 8, 16, 32, 64], metavar="W")
    parser.add_argument("--mixes", nargs="+", choices=list(MIX_BY_NAME), default=list(MIX_BY_NAME),
                        help="built-in mixes (ignored with --lengths / --lengths-file)")
    parser.add_argument("--lengths", type=int, nargs="+", help="document lengths of one pack, used for every W")
    parser.add_argument("--lengths-file", help="file of document lengths (integers, whitespace / comma separated)")
    parser.add_argument("--window", type=int, help="also count causal attention with a sliding window of N keys back")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokens-per-rank", type=int, default=8192,
                        help="each built-in mix fills tokens-per-rank x W tokens (default 8192)")
    parser.add_argument("--markdown", action="store_true", help="print markdown tables")
    args = parser.parse_args(argv)
    if args.lengths and args.lengths_file:
        parser.error("give --lengths or --lengths-file, not both")
    if args.lengths and min(args.lengths) < 1:
        parser.error("--lengths must be positive")
    if min(args.world_sizes) < 1 or args.tokens_per_rank < 1 or (args.window is not None and args.window < 0):
        parser.error("world sizes and --tokens-per-rank must be positive, --window >= 0")
    return args


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    modes = ["causal", "full"] + (["window"] if args.window is not None else [])
    given = args.lengths
    if args.lengths_file:
        with open(args.lengths_file) as handle:
            given = read_lengths(handle.read())
    packs = [("given lengths", None)] if given else [(mix.name, MIX_BY_NAME[mix.name]) for mix in MIXES
                                                     if mix.name in args.mixes]
    print(LEGEND)
    if not given:
        print(f"Built-in mixes: {args.tokens_per_rank} x W tokens, seed {args.seed}, the last document cut "
              "to fill the pack exactly.")
    for name, mix in packs:
        rows: List[List[str]] = []
        described = []
        for world_size in args.world_sizes:
            lengths = given if mix is None else mix_lengths(mix, world_size, args.tokens_per_rank, args.seed)
            described.append(f"{world_size}: {describe(lengths)}")
            rows += table_rows(count_all(lengths, world_size, modes, args.window), world_size, modes, sum(lengths))
        title = name if mix is None else f"{name}: {mix.description}"
        print(f"\n{'**' if args.markdown else ''}{title}{'**' if args.markdown else ''}")
        if mix is None:
            print(f"documents (median / longest length): {describe(given)}, {sum(given)} tokens")
        else:
            print("documents (median / longest length) per W: " + "; ".join(described))
        if args.markdown:
            print()
        print(format_table(table_header(modes, args.window), rows, args.markdown))


if __name__ == "__main__":
    main()

"""Benchmark and check every variant: error against single-device attention, speed, memory.

Run with ``torchrun --nproc_per_node N benchmark/benchmark_func.py [flags]``; without torchrun it
runs at world size 1. NCCL on GPUs, gloo on CPU (with small default sizes). ``--varlen`` runs the
packed-document variants (ring / zigzag / stripe per document, llama3, zigzag_llama3, balanced,
balanced_llama3) on a batch of several documents with the same total length; ``--mix`` draws the
documents from one of ``benchmark/balance.py``'s mixes instead (any lengths: for the variants that
take them, llama3 and the balanced ones).

For each variant it prints the max error of out and dq/dk/dv (relative to the largest value)
against single-device attention on the whole sequence (float32 SDPA per document), a verdict
(``ok`` when that error is within the test suite's bound for the dtype, or within twice what the
same function makes of the same inputs on one rank), iter/s, and on GPUs
achieved TFLOP/s per rank, peak memory, and % of ideal: the best single-device kernel on the
local problem (``--seqlen`` tokens, the same document proportions), divided by W -- a rank's share
of the global work is W local problems' worth. "% FA2" uses PyTorch's FA2 as the single-device
kernel instead (what ring-flash-attn's published tables compare with). "balance": the attended
(query, key) pairs of the busiest rank over the mean -- the layout's own limit, about 1 / balance of
the ideal. "host ms": time the host took to issue one call (the device runs behind it unless this
is close to 1 / iter/s). On CPU the timings say nothing about GPU performance, so the table has no
TFLOP/s, % ideal or memory columns there.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

import ring_flash_attn as rfa
from balance import MIX_BY_NAME, mix_lengths  # benchmark/balance.py, beside this file
from ring_flash_attn.kernels import AUTO_ORDER, BACKENDS, BlockOptions, KernelCall
from ring_flash_attn.core.mask import Band, VarlenMeta
from ring_flash_attn.layouts import local_cu_seqlens, shard_varlen, varlen_token_index

BATCH_VARIANTS = {"ring": "ring_flash_attn", "zigzag": "zigzag_ring_flash_attn", "stripe": "stripe_flash_attn"}
VARLEN_VARIANTS = {**BATCH_VARIANTS, "llama3": "llama3_flash_attn", "zigzag_llama3": "zigzag_llama3_flash_attn",
                   "balanced": "balanced_ring_flash_attn", "balanced_llama3": "balanced_llama3_flash_attn"}
ALLGATHER_VARIANTS = ("zigzag_llama3", "balanced_llama3")  # take heads_k_stride as a keyword
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DOC_FRACTIONS = (3 / 8, 1 / 4, 1 / 8, 1 / 8, 1 / 16, 1 / 16)  # --varlen: documents as parts of the total


def parse_args() -> argparse.Namespace:
    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--varlen", action="store_true", help="packed documents instead of one sequence per batch row")
    p.add_argument("--variants", default=None, help="comma-separated (default: all of the mode)")
    p.add_argument("--packing", default="func", choices=["func", "kvpacked", "qkvpacked"])
    p.add_argument("--seqlen", type=int, default=8192 if gpu else 512, help="tokens per rank")
    p.add_argument("--batch", type=int, default=1, help="(batch mode only)")
    p.add_argument("--nheads", type=int, default=32 if gpu else 8)
    p.add_argument("--nheads-k", type=int, default=8 if gpu else 2, help="(qkvpacked uses nheads)")
    p.add_argument("--head-dim", type=int, default=128 if gpu else 64)
    p.add_argument("--heads-k-stride", type=int, default=None, help="all-gather variants (default: all heads)")
    p.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    p.add_argument("--causal", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--window", type=int, nargs=2, default=(-1, -1), metavar=("LEFT", "RIGHT"),
                   help="sliding window_size (batch variants)")
    p.add_argument("--fwd-only", action="store_true")
    p.add_argument("--backend", default=None, help="block kernel (default: auto)")
    p.add_argument("--iters", type=int, default=20 if gpu else 5,
                   help="calls per timed repeat, at least (more when a repeat would last under --repeat-seconds)")
    p.add_argument("--repeat-seconds", type=float, default=0.5 if gpu else 0.0,
                   help="minimum length of a timed repeat: the synchronisation between repeats is amortised")
    p.add_argument("--warmup", type=int, default=5 if gpu else 1)
    p.add_argument("--repeats", type=int, default=5 if gpu else 3)
    p.add_argument("--no-check", action="store_true", help="skip the error check (saves memory)")
    p.add_argument("--mix", default=None, choices=sorted(MIX_BY_NAME),
                   help="--varlen: document lengths drawn from this mix of benchmark/balance.py (any lengths: "
                        "variants llama3, balanced, balanced_llama3)")
    p.add_argument("--cuda-graph", action="store_true",
                   help="time replays of one CUDA graph of the step (captured after warm-up) instead of eager calls")
    p.add_argument("--ulysses-degree", type=int, default=0,
                   help="run the variants as Ulysses x ring with this Ulysses degree (a divisor of W and of the heads)")
    args = p.parse_args()
    if args.packing == "qkvpacked":
        args.nheads_k = args.nheads
    names = VARLEN_VARIANTS if args.varlen else BATCH_VARIANTS
    args.variants = (args.variants or ",".join(names)).split(",")
    unknown = [v for v in args.variants if v not in names]
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {list(names)}")
    if args.mix and not args.varlen:
        p.error("--mix needs --varlen")
    return args


def setup() -> torch.device:
    if "RANK" not in os.environ:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl", device_id=torch.device("cuda", torch.cuda.current_device()))
        return torch.device("cuda", torch.cuda.current_device())
    dist.init_process_group("gloo")
    return torch.device("cpu")


def world() -> tuple:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if dist.is_initialized():
        dist.barrier()


def time_per_iter(fn: Callable[[], object], args, device) -> Tuple[float, float]:
    """Median seconds per call over ``repeats`` runs of ``iters`` calls, after warm-up, and the median
    time the host took to issue a call (the loop before the final synchronization): close to the
    total means the host, not the device, sets the pace."""
    for _ in range(args.warmup):
        fn()
    iters = calls_per_repeat(fn, args, device)
    samples, issued = [], []
    for _ in range(args.repeats):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        issued.append((time.perf_counter() - t0) / iters)
        sync(device)
        samples.append((time.perf_counter() - t0) / iters)
    return statistics.median(samples), statistics.median(issued)


def calls_per_repeat(fn: Callable[[], object], args, device) -> int:
    """``--iters``, or more so that a repeat lasts ``--repeat-seconds`` (the barrier and the pipeline
    refill between repeats cost ~1 ms, which 20 forward-only calls of 2 ms do not hide). The same on
    every rank (the calls communicate)."""
    sync(device)
    t0 = time.perf_counter()
    for _ in range(3):
        fn()
    sync(device)
    per_call = (time.perf_counter() - t0) / 3
    wanted = torch.tensor([max(args.iters, math.ceil(args.repeat_seconds / per_call))], device=device)
    if dist.is_initialized():
        dist.all_reduce(wanted, op=dist.ReduceOp.MAX)
    return int(wanted.item())


def doc_lengths(total: int, unit: int) -> List[int]:
    """``total`` tokens as documents in DOC_FRACTIONS, each a multiple of ``unit``."""
    lengths = [max(unit, round(f * total / unit) * unit) for f in DOC_FRACTIONS[:-1]]
    return lengths + [total - sum(lengths)]


def offsets(lengths: Sequence[int]) -> List[int]:
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return out


class Problem:
    """The global inputs of the benchmark and what each variant's call needs."""

    def __init__(self, args, device: torch.device) -> None:
        self.args, self.device = args, device
        _, w = world()
        self.total = args.seqlen * w
        gen = torch.Generator(device=device).manual_seed(0)
        lead = () if args.varlen else (args.batch,)

        def randn(h):
            return torch.randn(*lead, self.total, h, args.head_dim, generator=gen, device=device,
                               dtype=DTYPES[args.dtype])

        self.x = {"q": randn(args.nheads), "k": randn(args.nheads_k), "v": randn(args.nheads_k),
                  "dout": randn(args.nheads)}
        unit = 2 * w * 8
        self.lengths = doc_lengths(self.total, unit) if args.varlen else [self.total]
        if args.mix:
            self.lengths = mix_lengths(MIX_BY_NAME[args.mix], w, args.seqlen, seed=0)
        self.cu_seqlens = torch.tensor(offsets(self.lengths), dtype=torch.int32, device=device)

    def shard(self, variant: str, tensors: Optional[Dict[str, torch.Tensor]] = None) -> Dict[str, torch.Tensor]:
        """This rank's part of ``tensors`` (default: the inputs) in the variant's layout."""
        rank, w = world()
        tensors = self.x if tensors is None else tensors
        ulysses = dict(ulysses_degree=self.args.ulysses_degree) if self.args.ulysses_degree else {}
        if self.args.varlen:
            return {n: shard_varlen(t, self.cu_seqlens, variant, rank, w, **ulysses) for n, t in tensors.items()}
        return {n: rfa.shard(t, variant, rank, w, **ulysses) for n, t in tensors.items()}

    def call_args(self, variant: str, whole: bool = False) -> tuple:
        """Positional arguments after q/k/v (or kv, qkv) for the variant's function (``whole``: on the
        whole sequence, one rank)."""
        if not self.args.varlen:
            return ()
        rank, w = (0, 1) if whole else world()
        if self.args.ulysses_degree:  # the global cu_seqlens
            return self.cu_seqlens, max(self.lengths)
        if variant in BATCH_VARIANTS:
            cu = local_cu_seqlens(self.cu_seqlens, variant, w)
            return cu, max(self.lengths) // w
        if variant == "llama3":
            prepared = rfa.llama3_flash_attn_prepare_cu_seqlens(self.cu_seqlens, self.args.causal, rank, w)
            return (*prepared[:4], self.args.heads_k_stride or self.args.nheads_k, prepared[4])
        return self.cu_seqlens, max(self.lengths)

    def reference(self, variant: Optional[str]) -> List[torch.Tensor]:
        """float32 SDPA per document on the whole sequence; this rank's shard of out (and grads), or
        all of it for ``variant=None``."""
        args, x = self.args, self.x
        q, k, v = (x[n].float().requires_grad_() for n in "qkv")
        group = args.nheads // args.nheads_k
        seq_dim = 0 if args.varlen else 1
        outs = []
        for start, stop in zip(offsets(self.lengths)[:-1], offsets(self.lengths)[1:]):
            part = [t.narrow(seq_dim, start, stop - start).transpose(seq_dim, seq_dim + 1) for t in (q, k, v)]
            kr, vr = (t.repeat_interleave(group, seq_dim) for t in part[1:])
            o = F.scaled_dot_product_attention(part[0], kr, vr, **mask_args(args, stop - start, q.device))
            outs.append(o.transpose(seq_dim, seq_dim + 1))
        out = torch.cat(outs, seq_dim)
        tensors = [out]
        if not args.fwd_only:
            tensors += torch.autograd.grad(out, (q, k, v), x["dout"].float())
        if variant is None:
            return [t.detach() for t in tensors]
        local = self.shard(variant, {str(i): t.detach() for i, t in enumerate(tensors)})
        return [local[str(i)] for i in range(len(tensors))]


def mask_args(args, length: int, device) -> dict:
    """SDPA arguments for the mask: causal, and the sliding window if one is set."""
    left, right = args.window
    if (left, right) == (-1, -1):
        return {"is_causal": args.causal}
    i, j = torch.arange(length, device=device)[:, None], torch.arange(length, device=device)[None, :]
    allowed = torch.ones(length, length, dtype=torch.bool, device=device)
    if args.causal:
        allowed &= j <= i
    if left >= 0:
        allowed &= j >= i - left
    if right >= 0:
        allowed &= j <= i + right
    return {"attn_mask": allowed}


def make_step(args, problem: Problem, variant: str, whole: bool = False,
              group: Optional[dist.ProcessGroup] = None) -> Callable[[], List[torch.Tensor]]:
    """One forward (+ backward) of the variant; returns out and dq, dk, dv. ``whole``: the variant on
    the whole sequence over ``group``, a group of this rank alone (the single-rank error)."""
    local = problem.x if whole else problem.shard(variant)
    prefix = (VARLEN_VARIANTS if args.varlen else BATCH_VARIANTS)[variant]
    if args.ulysses_degree:
        prefix = "ulysses_flash_attn"
    suffix = {"func": "func", "kvpacked": "kvpacked_func", "qkvpacked": "qkvpacked_func"}[args.packing]
    fn = getattr(rfa, f"{prefix}_{'varlen_' if args.varlen else ''}{suffix}")
    if not whole:
        group = args.groups if args.ulysses_degree else dist.group.WORLD if dist.is_initialized() else None
    kw = dict(causal=args.causal, group=group, backend=args.backend)
    if tuple(args.window) != (-1, -1):
        kw["window_size"] = tuple(args.window)
    if args.ulysses_degree:
        kw["ring_layout"] = variant
    elif args.varlen and variant in ALLGATHER_VARIANTS:
        kw["heads_k_stride"] = args.heads_k_stride
    extra = problem.call_args(variant, whole=whole)
    grad = not args.fwd_only
    q, k, v = (local[n].detach().requires_grad_(grad) for n in "qkv")
    pack_dim = 1 if args.varlen else 2
    if args.packing == "qkvpacked":
        leaves = [torch.stack([q, k, v], pack_dim).detach().requires_grad_(grad)]
    elif args.packing == "kvpacked":
        leaves = [q, torch.stack([k, v], pack_dim).detach().requires_grad_(grad)]
    else:
        leaves = [q, k, v]

    def step() -> List[torch.Tensor]:
        out = fn(*leaves, *extra, **kw)
        if args.fwd_only:
            return [out]
        grads = torch.autograd.grad(out, leaves, local["dout"])
        if args.packing == "qkvpacked":
            grads = grads[0].unbind(pack_dim)
        elif args.packing == "kvpacked":
            grads = (grads[0], *grads[1].unbind(pack_dim))
        return [out, *grads]

    return step


def graphed(step: Callable[[], List[torch.Tensor]], device: torch.device) -> Callable[[], List[torch.Tensor]]:
    """``step`` captured in one CUDA graph (after three warm-up calls on a side stream, which also fill
    the plan caches), as a function that replays it and returns the graph's outputs."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = step()

    def replay() -> List[torch.Tensor]:
        graph.replay()
        return outputs

    return replay


def single_device_seconds(args, device, backend_name: str) -> Optional[float]:
    """Seconds per call of one block kernel on the local problem (one device, no ring), or None."""
    backend = BACKENDS.get(backend_name)
    dt = DTYPES[args.dtype]
    band = Band(None, 0) if args.causal else Band()
    call = KernelCall(device.type, dt, args.head_dim, (band,), varlen=args.varlen)
    if backend is None or backend.not_supported_reasons(call):
        return None
    lead = () if args.varlen else (args.batch,)
    q = torch.randn(*lead, args.seqlen, args.nheads, args.head_dim, device=device, dtype=dt)
    k, v = (torch.randn(*lead, args.seqlen, args.nheads_k, args.head_dim, device=device, dtype=dt) for _ in range(2))
    scale = args.head_dim ** -0.5
    if args.varlen:
        docs = offsets(doc_lengths(args.seqlen, 8))
        meta = VarlenMeta.build(docs, docs, args.causal, device)

        def run():
            out, lse = backend.forward_varlen(q, k, v, meta, BlockOptions(scale))
            if not args.fwd_only:
                backend.backward_varlen(out, q, k, v, out, lse, meta, BlockOptions(scale))
    else:
        def run():
            out, lse = backend.forward(q, k, v, band, BlockOptions(scale))
            if not args.fwd_only:
                backend.backward(out, q, k, v, out.to(dt), lse, band, BlockOptions(scale))

    return time_per_iter(run, args, device)[0]


def work_balance(args, problem: Problem, variant: str) -> float:
    """Attended (query, key) pairs of the busiest rank over the mean: a variant can reach at most
    about 1 / balance of the ideal, whatever its kernels and communication. Ulysses x ring: every
    rank of a Ulysses group attends its ring rank's tokens (for 1 / U of the heads), so the balance is
    the ring layout's over the ring ranks."""
    _, w = world()
    if args.ulysses_degree:
        w //= args.ulysses_degree
    lengths = torch.tensor(problem.lengths)
    doc_len = torch.repeat_interleave(lengths, lengths)
    pos = torch.arange(problem.total) - torch.repeat_interleave(lengths.cumsum(0) - lengths, lengths)
    left, right = args.window
    inf = problem.total
    before = pos.clamp(max=left if left >= 0 else inf)
    after = (doc_len - 1 - pos).clamp(max=0 if args.causal else (right if right >= 0 else inf))
    keys_seen = before + after + 1
    pairs = []
    for r in range(w):
        index = (varlen_token_index(problem.cu_seqlens.cpu(), variant, r, w) if args.varlen
                 else rfa.position_ids(variant, r, w, problem.total))
        pairs.append(float(keys_seen[index].sum()))
    return max(pairs) / (sum(pairs) / w)


def tflops_per_rank(args, problem: Problem, seconds: float) -> float:
    _, w = world()
    pairs = sum(n * n for n in problem.lengths) * (0.5 if args.causal else 1.0)
    flops = 4 * pairs * args.nheads * args.head_dim * (1 if args.varlen else args.batch) / w
    flops *= 1.0 if args.fwd_only else 3.5
    return flops / seconds / 1e12


def max_errors(got: Sequence[torch.Tensor], ref: Sequence[torch.Tensor]) -> List[float]:
    """max |x - ref| / max |ref| per tensor, the largest over the ranks."""
    err = torch.stack([(g.float() - r).abs().max() / r.abs().max() for g, r in zip(got, ref)])
    if dist.is_initialized():
        dist.all_reduce(err, op=dist.ReduceOp.MAX)
    return err.tolist()


def single_rank_groups() -> Optional[dist.ProcessGroup]:
    """A process group of this rank alone (every rank creates all W of them, in order)."""
    if not dist.is_initialized():
        return None
    rank, w = world()
    groups = [dist.new_group([r]) for r in range(w)]
    return groups[rank]


TOLERANCE = {"bf16": 2e-2, "fp16": 3e-3, "fp32": 1e-5}  # the test suite's bounds (test/helpers/attention_cases.py)


def verdict(errors: List[float], alone: List[float], dtype: str) -> str:
    """``ok`` when every error is within the test suite's bound for the dtype or within twice the
    single-rank error of the same inputs; otherwise ``CHECK``."""
    if not errors:
        return "-"
    return "ok" if all(e <= max(TOLERANCE[dtype], 2 * a) for e, a in zip(errors, alone)) else "CHECK"


LEGEND = (
    "# err out / err grads: max |x - ref| / max |ref| of out / of dq, dk, dv against float32 attention on the\n"
    "#   whole sequence (every rank's shard); 1 rank: the same function on the whole sequence on one rank\n"
    "# verdict: ok = every error within the tests' bound (bf16 2e-2, fp16 3e-3, fp32 1e-5) or 2x the 1-rank one\n"
    "# iter/s: calls (fwd or fwd+bwd) per second\n"
    "# balance: attended pairs of the busiest rank / the mean (1.0: every rank has the same work)\n"
    "# host ms: time the host takes to issue one call"
)
GPU_LEGEND = (
    "# TFLOP/s: attention FLOPs per rank per second; % ideal: iter/s over the best single-GPU kernel's on\n"
    "#   the local problem / W (% FA2: PyTorch's FA2 as that kernel); peak GiB: max memory allocated"
)


def main() -> None:
    args = parse_args()
    device = setup()
    rank, w = world()
    if args.ulysses_degree:
        args.groups = rfa.make_ulysses_ring_groups(args.ulysses_degree, w // args.ulysses_degree)
    gpu = device.type == "cuda"
    problem = Problem(args, device)
    kernels = {n: t for n in AUTO_ORDER if n != "reference" for t in [single_device_seconds(args, device, n)] if t}
    best = min(kernels.values()) * w if kernels else float("nan")
    fa2 = kernels.get("torch_cuda_flash", float("nan")) * w
    alone_group = None if args.no_check else single_rank_groups()
    rows = []
    for variant in args.variants:
        step = make_step(args, problem, variant)
        errors: List[float] = []
        alone: List[float] = []
        if not args.no_check:
            errors = max_errors(step(), problem.reference(variant))
            alone = max_errors(make_step(args, problem, variant, whole=True, group=alone_group)(),
                               problem.reference(None))
        if gpu:
            torch.cuda.reset_peak_memory_stats(device)
        if args.cuda_graph and gpu:
            step = graphed(step, device)
            if not args.no_check:  # the replay's results against single-device attention too
                errors = [max(a, b) for a, b in zip(errors, max_errors(step(), problem.reference(variant)))]
        seconds, host = time_per_iter(step, args, device)
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if gpu else float("nan")
        name = f"U{args.ulysses_degree}x{variant}" if args.ulysses_degree else variant
        rows.append((name, errors, alone, seconds, peak, work_balance(args, problem, variant), host))

    if rank == 0:
        mode = "fwd" if args.fwd_only else "fwd+bwd"
        name = torch.cuda.get_device_name(device) if gpu else "CPU"
        docs = f"documents {problem.lengths} (global), " if args.varlen else f"batch={args.batch}, "
        window = f"window_size={tuple(args.window)}, " if tuple(args.window) != (-1, -1) else ""
        mode += ", one CUDA graph replayed" if args.cuda_graph and gpu else ""
        print(f"# {name} x{w}, torch {torch.__version__}, {'varlen ' if args.varlen else ''}{args.packing}, {mode}, "
              f"{args.dtype}, causal={args.causal}, {window}{docs}{args.seqlen} tokens/rank, heads {args.nheads}/"
              f"{args.nheads_k}, d={args.head_dim}, backend={args.backend or 'auto'}"
              + (f", Ulysses x ring {args.ulysses_degree} x {w // args.ulysses_degree}" if args.ulysses_degree else ""))
        lasting = f" and >= {args.repeat_seconds:g} s" if args.repeat_seconds else ""
        print(f"# timing: median of {args.repeats} repeats of >= {args.iters} calls{lasting} each, after {args.warmup} "
              "warm-up calls")
        print(LEGEND)
        if gpu:
            print(GPU_LEGEND)
            print("# single-device kernels, local problem: "
                  + ", ".join(f"{n} {1 / t:.2f} iter/s (ideal at W={w}: {1 / (t * w):.2f})" for n, t in kernels.items()))
        else:
            print("# CPU (gloo): the errors and verdicts are meaningful, the timings are not (no GPU kernels, two\n"
                  "#   processes sharing a few cores); run this on GPUs for performance")
        head = f"{'variant':<16} {'err out':>9} {'err grads':>9} {'1 rank':>9} {'verdict':>7} {'iter/s':>8}"
        print(head + (f" {'TFLOP/s':>8} {'% ideal':>8} {'% FA2':>7} {'peak GiB':>8}" if gpu else "")
              + f" {'balance':>7} {'host ms':>7}")
        for variant, errors, alone, seconds, peak, balance, host in rows:
            err_out = f"{errors[0]:.2e}" if errors else "-"
            err_grad = f"{max(errors[1:]):.2e}" if len(errors) > 1 else "-"
            err_alone = f"{max(alone):.2e}" if alone else "-"
            line = (f"{variant:<16} {err_out:>9} {err_grad:>9} {err_alone:>9} "
                    f"{verdict(errors, alone, args.dtype):>7} {1 / seconds:>8.2f}")
            if gpu:
                vs_fa2 = f"{100 * fa2 / seconds:.1f}%" if fa2 == fa2 else "-"
                line += (f" {tflops_per_rank(args, problem, seconds):>8.1f} {100 * best / seconds:>7.1f}% "
                         f"{vs_fa2:>7} {peak:>8.2f}")
            print(line + f" {balance:>7.3f} {1e3 * host:>7.3f}")
    if dist.is_initialized():
        dist.barrier()  # every rank done before the group goes (gloo can abort a process that exits first)
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""Profile a few iterations of one benchmark variant with torch.profiler: rank 0 prints the table of
the most expensive GPU ops and a timeline summary of its trace (per iteration: wall time, busy time
of the compute and communication streams, the idle gaps of the compute stream and whether the CPU
or another stream kept it waiting); every rank writes a Chrome trace to $OUT or the current folder.

    torchrun --nproc_per_node 2 benchmark/profile_ring.py [benchmark_func.py flags] --variants zigzag

Takes the flags of ``benchmark_func.py`` (the first of ``--variants`` is profiled; ``--iters``
iterations are recorded after ``--warmup``). Then times the same step without the profiler, over 8
and over 300 back-to-back iterations (a short burst and a sustained run differ when clocks drop).
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from typing import Dict, List

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile

from benchmark_func import Problem, make_step, parse_args, setup, world

GPU_EVENTS = ("kernel", "gpu_memcpy", "gpu_memset")


def timeline_summary(trace_path: str, iters: int, rank: int = 0) -> str:
    """Per-iteration figures of one rank's Chrome trace (see the module docstring)."""
    with open(trace_path) as f:
        events = json.load(f)["traceEvents"]
    gpu = [e for e in events if e.get("cat") in GPU_EVENTS and "dur" in e]
    launches = {e["args"]["correlation"]: e for e in events
                if e.get("cat") == "cuda_runtime" and "correlation" in e.get("args", {})}
    streams: Dict[int, List[dict]] = defaultdict(list)
    for e in gpu:
        streams[e["args"].get("stream", -1)].append(e)
    is_comm = {s: any("nccl" in e["name"].lower() for e in evs) for s, evs in streams.items()}
    busy = {s: sum(e["dur"] for e in evs) for s, evs in streams.items()}
    compute = max((s for s in streams if not is_comm[s]), key=lambda s: busy[s])
    start = min(e["ts"] for e in gpu)
    wall = max(e["ts"] + e["dur"] for e in gpu) - start
    lines = [f"timeline of rank {rank} ({iters} iterations, per iteration): wall {wall / iters / 1e3:.3f} ms"]
    for s in sorted(streams, key=lambda s: -busy[s]):
        kind = "nccl" if is_comm[s] else ("compute" if s == compute else "other")
        lines.append(f"  stream {s} ({kind}): busy {busy[s] / iters / 1e3:.3f} ms, {len(streams[s]) // iters} ops")
    ops = sorted(streams[compute], key=lambda e: e["ts"])
    gaps = {"cpu": 0.0, "waiting on another stream": 0.0}
    largest = []
    for prev, nxt in zip(ops[:-1], ops[1:]):
        gap = nxt["ts"] - (prev["ts"] + prev["dur"])
        if gap <= 2:
            continue
        launch = launches.get(nxt["args"].get("correlation"))
        late_launch = launch is not None and launch["ts"] + launch.get("dur", 0) > prev["ts"] + prev["dur"]
        cause = "cpu" if late_launch else "waiting on another stream"
        gaps[cause] += gap
        largest.append((gap, cause, prev["name"][:60], nxt["name"][:60]))
    lines.append("  compute-stream idle: " + ", ".join(f"{c} {t / iters / 1e3:.3f} ms" for c, t in gaps.items()))
    for gap, cause, before, after in sorted(largest, reverse=True)[:8]:
        lines.append(f"    {gap:8.1f} us ({cause}) after {before} / before {after}")
    return "\n".join(lines)


def unprofiled_ms(step, iters: int) -> float:
    """Milliseconds per call of ``iters`` back-to-back calls (CUDA events, after a barrier)."""
    torch.cuda.synchronize()
    if dist.is_initialized():
        dist.barrier()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        step()
    stop.record()
    stop.synchronize()
    return start.elapsed_time(stop) / iters


def main() -> None:
    args = parse_args()
    device = setup()
    rank, w = world()
    variant = args.variants[0]
    step = make_step(args, Problem(args, device), variant)
    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    if dist.is_initialized():
        dist.barrier()  # both ranks start recording together: no start-up skew in the timeline
        torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(args.iters):
            step()
        torch.cuda.synchronize()
    trace = os.path.join(os.environ.get("OUT", "."), f"trace_{variant}_rank{rank}.json")
    prof.export_chrome_trace(trace)
    burst, sustained = unprofiled_ms(step, 8), unprofiled_ms(step, 300)
    if rank == 0:
        mode = "fwd" if args.fwd_only else "fwd+bwd"
        print(f"# {torch.cuda.get_device_name()} x{w}, {variant}{' varlen' if args.varlen else ''}, {mode}, "
              f"causal={args.causal}, backend={args.backend or 'auto'}, {args.iters} iterations")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=20))
        print(timeline_summary(trace, args.iters))
        print(f"same step without the profiler: {burst:.3f} ms per iteration over 8 iterations, "
              f"{sustained:.3f} ms over 300")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

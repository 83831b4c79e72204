#!/usr/bin/env python
"""Benchmark XAC scoring: the closed form (docs/losses.md §3) against explicit pooling, forward + backward.

Each configuration runs in a FRESH subprocess so that its peak resident memory (ru_maxrss) is its
own; the figure reported is the peak minus the RSS measured after the inputs were created, i.e. what
scoring + backward added. Time is the wall clock of forward + backward of sum(w * scores), min and
median over --reps repetitions after one warm-up.

    python tools/bench_xac.py                       # 96 images x 400 concepts x 196 patches x 768 dims
    python tools/bench_xac.py --images 8 --concepts 50 --json out.json
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _child(args: argparse.Namespace) -> None:
    import torch
    import torch.nn.functional as F

    from powerclip.losses.concept_xac import chunk_size, xac_scores, xac_scores_explicit

    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    z0 = F.normalize(torch.randn(args.images, args.patches, args.dim, generator=gen), dim=-1)
    c0 = F.normalize(torch.randn(args.concepts, args.dim, generator=gen), dim=-1)
    w = torch.randn(args.images, args.concepts, generator=gen)

    def step(z0: torch.Tensor = z0, c0: torch.Tensor = c0, w: torch.Tensor = w, method: str = args.method,
             budget: float = args.budget) -> float:
        z = z0.clone().requires_grad_()
        c = c0.clone().requires_grad_()
        t0 = time.perf_counter()
        if method == "explicit":
            s = xac_scores_explicit(z, c, args.lam)
        else:
            s = xac_scores(z, c, args.lam, memory_budget_mb=budget)
        (s * w).sum().backward()
        return time.perf_counter() - t0

    # Warm up every code path on a tiny problem (explicit, closed, closed + checkpointed chunks) so the
    # baseline already holds the one-off library loads: torch.utils.checkpoint's first call alone
    # maps ~150 MB of device-runtime libraries that have nothing to do with the scores.
    tiny = (z0[:2, :8].contiguous(), c0[:4].contiguous(), w[:2, :4].contiguous())
    step(*tiny, method="explicit")
    step(*tiny, method="closed", budget=512.0)
    step(*tiny, method="closed", budget=1e-9)
    base = _rss_mb()
    times = [step() for _ in range(args.reps + 1)][1:]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    chunks = None
    if args.method == "closed":
        step_n = chunk_size(args.images, args.patches, args.concepts, args.budget)
        chunks = -(-args.concepts // step_n)
    print(json.dumps({"method": args.method, "budget_mb": args.budget if args.method == "closed" else None,
                      "chunks": chunks, "time_min_s": min(times), "time_median_s": statistics.median(times),
                      "peak_added_mb": peak - base, "peak_rss_mb": peak, "base_rss_mb": base}))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=96)
    p.add_argument("--concepts", type=int, default=400)
    p.add_argument("--patches", type=int, default=196)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--lam", type=float, default=1.0)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--budgets", type=float, nargs="+", default=[512.0, 64.0, 16.0],
                   help="memory budgets (MB) of the closed-form runs")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--method", choices=["explicit", "closed"], help=argparse.SUPPRESS)
    p.add_argument("--budget", type=float, default=512.0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.method:
        _child(args)
        return 0

    shape = [f"--images={args.images}", f"--concepts={args.concepts}", f"--patches={args.patches}",
             f"--dim={args.dim}", f"--lam={args.lam}", f"--reps={args.reps}", f"--threads={args.threads}"]
    runs = [["--method=explicit"]] + [["--method=closed", f"--budget={b}"] for b in args.budgets]
    results = []
    for extra in runs:
        out = subprocess.run([sys.executable, __file__, *shape, *extra], capture_output=True, text=True)
        if out.returncode != 0:
            print(out.stderr, file=sys.stderr)
            return out.returncode
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    explicit = (4 * args.images * args.concepts * args.dim) / 2**20
    print(f"XAC fwd+bwd, {args.images} images x {args.concepts} concepts x {args.patches} patches x "
          f"{args.dim} dims, {args.threads} threads (one [B,N,D] fp32 tensor = {explicit:.0f} MB)")
    print(f"{'method':<10}{'budget MB':>10}{'chunks':>8}{'min s':>9}{'median s':>10}{'peak +MB':>10}")
    for r in results:
        print(f"{r['method']:<10}{r['budget_mb'] or '-':>10}{r['chunks'] or '-':>8}{r['time_min_s']:>9.3f}"
              f"{r['time_median_s']:>10.3f}{r['peak_added_mb']:>10.0f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"shape": vars(args), "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

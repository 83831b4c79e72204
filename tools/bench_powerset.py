#!/usr/bin/env python
"""Benchmark the powerset loss: one rank's forward+backward, chunked vs unchunked, and time vs M.

What one rank of a W-rank job does (minus the all-gathers): B_local image rows against G gathered
caption columns, and B_local caption rows against G gathered images, then the two hinge losses and
the backward into all four inputs. Each size/mode runs in a FRESH subprocess so that its peak
resident memory (``ru_maxrss``) belongs to that configuration alone; the figure reported is the
peak during forward+backward minus the peak after building the inputs (the loss's own memory).

    python tools/bench_powerset.py              # reduced default size (fits a shared 2-core CPU)
    python tools/bench_powerset.py --full       # the real size: B 256, G 2048, M 10, K 16, D 512
    python tools/bench_powerset.py --scan-only  # only time vs M (NLA linear, exact exponential)
    python tools/bench_powerset.py --naive      # add the plain-autograd baseline (memory hungry)
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from powerclip.config import PowersetLossConfig  # noqa: E402
from powerclip.losses.powerset import hardest_negative_triplet, pair_terms, region_scale  # noqa: E402
from powerclip.losses.powerset_exact import exact_pair_terms  # noqa: E402

FULL = dict(b=256, g=2048, m=10, k=16, d=512)
REDUCED = dict(b=128, g=1024, m=10, k=16, d=512)


def _inputs(b: int, g: int, m: int, k: int, d: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    phi = F.normalize(torch.randn(g, m, d, generator=gen), dim=-1)
    p = F.normalize(torch.randn(g, k, d, generator=gen), dim=-1) * 0.8
    rv = torch.ones(g, m, dtype=torch.bool)
    pv = torch.rand(g, k, generator=gen) < 0.7
    pv[:, 0] = True
    return phi, rv, p, pv


def naive_terms(phi, rv, p, pv, tau: float, zeta: float):
    """The literal docs/losses.md §2 formulas under plain autograd, unchunked: the baseline that the
    recomputing backward of powerset_nla avoids (autograd keeps ~10 [R, M, C, K] tensors)."""
    scale = 1.0 / rv.sum(-1).clamp_min(1).to(phi.dtype)
    s = torch.einsum("rmd,ckd->rmck", phi, p) * scale[:, None, None, None]
    v = rv.to(phi.dtype)[:, :, None, None]
    kc = pv.sum(-1).to(phi.dtype)
    t1 = ((F.softplus(s, beta=1.0 / tau) * v).sum(1) * pv[None]).sum(-1) / kc
    a = s.abs()
    logcosh = a / (2 * tau) + torch.log1p(torch.exp(-a / tau)) - math.log(2.0)
    g = ((s / 2 + zeta * tau * logcosh) * v).sum(1) / tau
    t2 = tau * torch.logsumexp(g.masked_fill(~pv[None], float("-inf")), -1) - (1 - zeta) * tau * torch.log(kc)
    return t1, t2


def _terms(phi, rv, p, pv, cfg: PowersetLossConfig, chunk: int | None):
    if chunk == -1:
        return naive_terms(phi, rv, p, pv, cfg.tau, cfg.zeta)
    if cfg.exact:  # direct call: the loss itself refuses M > 12, the scan goes to 14
        return exact_pair_terms(phi, rv, region_scale(rv, cfg, phi.dtype), p, pv, False,
                                cfg.memory_budget_mb, chunk, max_regions=16)
    return pair_terms(phi, rv, p, pv, cfg, chunk)


def rank_step(b: int, g: int, m: int, k: int, d: int, cfg: PowersetLossConfig,
              chunk: int | None) -> tuple[float, float]:
    """One rank's forward+backward (rank 0's rows); returns (wall seconds, process CPU seconds).

    CPU time is reported next to wall time because the benchmark machine may be shared: CPU time
    counts only this process's work (with 1 thread it is the compute cost; idle OpenMP threads
    spin and inflate it with more threads)."""
    phi, rv, p, pv = _inputs(b, g, m, k, d)
    all_phi, all_p = phi.requires_grad_(True), p.requires_grad_(True)
    t0, c0 = time.perf_counter(), time.process_time()
    loc_phi, loc_p = all_phi[:b], all_p[:b]
    pos = torch.arange(b)
    t1, t2 = _terms(loc_phi, rv[:b], all_p, pv, cfg, chunk)  # [B, G]
    c1, c2 = _terms(all_phi, rv, loc_p, pv[:b], cfg, chunk)  # [G, B]
    h1, _ = hardest_negative_triplet(t1 + t2, pos, cfg.margin)
    h2, _ = hardest_negative_triplet((c1 + c2).T, pos, cfg.margin)
    loss = 0.5 * (h1.mean() + h2.mean())
    loss.backward()
    return time.perf_counter() - t0, time.process_time() - c0


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_one(spec: dict) -> dict:
    """Run in the current (fresh) process: build inputs, measure one fwd+bwd; JSON-able result."""
    torch.set_num_threads(spec.get("threads", 2))
    cfg = PowersetLossConfig(weight=1.0, exact=spec.get("exact", False), memory_budget_mb=spec["budget_mb"])
    _inputs(spec["b"], spec["g"], spec["m"], spec["k"], spec["d"])  # same allocations as the timed run
    base = _maxrss_mb()
    wall, cpu = rank_step(spec["b"], spec["g"], spec["m"], spec["k"], spec["d"], cfg, spec.get("chunk"))
    return {**spec, "seconds": wall, "cpu_seconds": cpu, "peak_mb": _maxrss_mb() - base, "baseline_mb": base}


def in_subprocess(spec: dict) -> dict:
    out = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)], capture_output=True,
                         text=True, check=False)
    if out.returncode != 0:
        return {**spec, "error": (out.stderr or out.stdout)[-400:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _time_step(b, g, m, k, d, exact: bool, repeats: int) -> float:
    """Minimum CPU seconds over ``repeats`` runs (the least disturbed one)."""
    cfg = PowersetLossConfig(weight=1.0, exact=exact, memory_budget_mb=256.0)
    return min(rank_step(b, g, m, k, d, cfg, None)[1] for _ in range(repeats))


def _linear_fit(xs: list[float], ys: list[float]) -> tuple[float, float, float]:
    """Least-squares y = a + b x; returns (a, b, R^2)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    a = my - b * mx
    ss_res = sum((y - a - b * x) ** 2 for x, y in zip(xs, ys))
    ss_tot = sum((y - my) ** 2 for y in ys)
    return a, b, 1.0 - ss_res / ss_tot


def scan_m(args) -> None:
    torch.set_num_threads(args.scan_threads)
    print(f"\n(times below: process CPU time, {args.scan_threads} thread(s), min of {args.repeats} runs)")
    b, g, k, d = args.scan_b, args.scan_g, args.scan_k, args.scan_d
    print(f"\n## time vs M, NLA (fwd+bwd, B={b}, G={g}, K={k}, D={d})")
    ms = [2, 4, 8, 16, 32, 64]
    nla = [_time_step(b, g, m, k, d, False, args.repeats) for m in ms]
    for m, t in zip(ms, nla):
        print(f"M={m:3d}  {t * 1e3:9.1f} ms   per region {t / m * 1e3:7.2f} ms")
    a, slope, r2 = _linear_fit(ms, nla)
    print(f"linear fit t = {a * 1e3:.1f} ms + {slope * 1e3:.2f} ms * M   R^2 = {r2:.4f}")
    print(f"t(64)/t(32) = {nla[-1] / nla[-2]:.2f}  (2.0 = linear)")

    eb, eg, ek, ed = args.exact_b, args.exact_g, args.exact_k, args.exact_d
    print(f"\n## time vs M, exact enumeration vs NLA (fwd+bwd, B={eb}, G={eg}, K={ek}, D={ed})")
    prev = None
    exact_t = []
    for m in range(2, args.max_exact_m + 1):
        te = _time_step(eb, eg, m, ek, ed, True, args.repeats)
        tn = _time_step(eb, eg, m, ek, ed, False, args.repeats)
        ratio = "" if prev is None else f"  t(M)/t(M-1) = {te / prev:5.2f}"
        print(f"M={m:3d}  exact {te * 1e3:9.1f} ms   NLA {tn * 1e3:7.1f} ms   exact/NLA {te / tn:8.1f}{ratio}")
        prev = te
        exact_t.append((m, te))
    tail = [(m, t) for m, t in exact_t if m >= 8]
    if len(tail) >= 2:
        a, slope, r2 = _linear_fit([m for m, _ in tail], [math.log(t) for _, t in tail])
        print(f"log-linear fit for M >= 8: t ~ exp({slope:.3f} M), i.e. x{math.exp(slope):.2f} per extra region "
              f"(2.00 = 2^M), R^2 = {r2:.4f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--full", action="store_true", help="B 256, G 2048, M 10, K 16, D 512 (the real size)")
    ap.add_argument("--scan-only", action="store_true")
    ap.add_argument("--naive", action="store_true",
                    help="also time the literal formulas under plain autograd (unchunked; needs much memory)")
    ap.add_argument("--no-scan", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--scan-threads", type=int, default=1)
    ap.add_argument("--budget-mb", type=float, default=512.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--scan-b", type=int, default=64)
    ap.add_argument("--scan-g", type=int, default=512)
    ap.add_argument("--scan-k", type=int, default=16)
    ap.add_argument("--scan-d", type=int, default=256)
    ap.add_argument("--exact-b", type=int, default=4)
    ap.add_argument("--exact-g", type=int, default=16)
    ap.add_argument("--exact-k", type=int, default=8)
    ap.add_argument("--exact-d", type=int, default=64)
    ap.add_argument("--max-exact-m", type=int, default=14)
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(json.loads(args.one))))
        return 0
    print(f"# powerset loss benchmark (torch {torch.__version__}, {args.threads} threads, CPU)")
    if not args.scan_only:
        size = FULL if args.full else REDUCED
        print(f"\n## one rank's forward+backward, B_local={size['b']} G={size['g']} M={size['m']} K={size['k']} "
              f"D={size['d']}{'' if args.full else '  (reduced; --full for B 256 G 2048)'}")
        runs = [("chunked", {"budget_mb": args.budget_mb}),
                ("unchunked", {"budget_mb": 1e9})]
        if args.naive:
            runs.append(("naive", {"budget_mb": 1e9, "chunk": -1}))
        for name, extra in runs:
            res = in_subprocess({**size, **extra, "threads": args.threads})
            if "error" in res:
                print(f"{name:10s} FAILED: {res['error']}")
                continue
            print(f"{name:10s} {res['seconds']:8.2f} s wall  {res['cpu_seconds']:8.2f} s CPU   peak RSS above inputs {res['peak_mb']:8.0f} MB "
                  f"(process baseline {res['baseline_mb']:.0f} MB, budget {extra['budget_mb']:.0f} MB)")
    if not args.no_scan:
        scan_m(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

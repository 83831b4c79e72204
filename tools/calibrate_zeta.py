#!/usr/bin/env python
"""Fit the NLA-T2 interpolation ζ (docs/losses.md §2) against exact 2^M enumeration on real batches.

For every (image, caption) pair of each batch (all B x B pairs, as the loss scores them) the exact
region-to-text score Q->_ij = (1/2^M) sum_A max_k X_k(A) is enumerated and compared with
NLA-T2(ζ) = U_ζ - (1-ζ) τ log K. NLA-T2 is monotone in ζ, with NLA-T2(0) <= Q-> <= NLA-T2(1)
(the sandwich), so two fits are reported:

* least squares:  argmin_ζ sum_ij (NLA-T2_ij(ζ) - Q->_ij)^2   (golden section after a grid scan)
* zero bias:      the ζ where the mean residual crosses zero   (bisection; the mean is monotone)

Batches come from the run's data stream (``powerclip.data.build_loader``) and features from its
model (``powerclip.model.factory.create_model``; set ``model.pretrained=...`` to calibrate a trained
checkpoint: a random-init model gives the ζ of random features, which is only a smoke test).

    python tools/calibrate_zeta.py -c configs/tiny_cpu.yaml --batches 4 \
        data.sources='[{shards: demo/synth/train/{00000..00007}.tar}]' model.pretrained=runs/tiny_cpu
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from powerclip.config import load_config  # noqa: E402
from powerclip.losses.powerset import region_scale  # noqa: E402
from powerclip.losses.powerset_embed import phrase_embeddings, region_embeddings  # noqa: E402
from powerclip.losses.powerset_exact import MAX_EXACT_REGIONS, exact_pair_terms  # noqa: E402
from powerclip.losses.powerset_nla import nla_pair_terms  # noqa: E402

_GOLDEN = (math.sqrt(5) - 1) / 2


class Calibration:
    """Pairs collected from batches: exact Q-> and the inputs to evaluate NLA-T2(ζ) for any ζ."""

    def __init__(self, tau: float, memory_budget_mb: float) -> None:
        self.tau = tau
        self.budget = memory_budget_mb
        self.batches: list[tuple[torch.Tensor, ...]] = []
        self.exact: list[torch.Tensor] = []
        self.exact_t2r: list[torch.Tensor] = []
        self.t1: list[torch.Tensor] = []

    def add(self, phi: torch.Tensor, rv: torch.Tensor, p: torch.Tensor, pv: torch.Tensor,
            scale: torch.Tensor) -> None:
        phi, p = phi.double(), p.double()  # float64: the fit compares differences ~ tau
        if phi.shape[1] > MAX_EXACT_REGIONS:
            raise SystemExit(f"exact enumeration needs data.num_regions <= {MAX_EXACT_REGIONS}, got {phi.shape[1]}")
        keep = pv.any(-1)
        if not bool(keep.all()):
            print(f"note: {int((~keep).sum())} captions without phrases left out of this batch")
            phi, rv, p, pv, scale = phi[keep], rv[keep], p[keep], pv[keep], scale[keep]
        q_t2r, q_r2t = exact_pair_terms(phi, rv, scale, p, pv, memory_budget_mb=self.budget)
        t1, _ = nla_pair_terms(phi, rv, scale, p, pv, self.tau, 0.0, use_t2=False)
        self.batches.append((phi, rv, scale, p, pv))
        self.exact.append(q_r2t.flatten())
        self.exact_t2r.append(q_t2r.flatten())
        self.t1.append(t1.flatten())

    def t2(self, zeta: float) -> torch.Tensor:
        out = [nla_pair_terms(phi, rv, scale, p, pv, self.tau, zeta, use_t1=False,
                              memory_budget_mb=self.budget)[1].flatten()
               for phi, rv, scale, p, pv in self.batches]
        return torch.cat(out)

    def residual(self, zeta: float) -> torch.Tensor:
        return self.t2(zeta) - torch.cat(self.exact)

    def sse(self, zeta: float) -> float:
        return float(self.residual(zeta).pow(2).sum())


def fit_least_squares(cal: Calibration, grid: int = 21, iters: int = 40) -> float:
    """Grid scan on [0, 1], then golden-section search around the best grid point."""
    zs = [i / (grid - 1) for i in range(grid)]
    errs = [cal.sse(z) for z in zs]
    best = min(range(grid), key=errs.__getitem__)
    lo, hi = zs[max(0, best - 1)], zs[min(grid - 1, best + 1)]
    a, b = hi - _GOLDEN * (hi - lo), lo + _GOLDEN * (hi - lo)
    fa, fb = cal.sse(a), cal.sse(b)
    for _ in range(iters):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - _GOLDEN * (hi - lo)
            fa = cal.sse(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + _GOLDEN * (hi - lo)
            fb = cal.sse(b)
    return (lo + hi) / 2


def fit_zero_bias(cal: Calibration, iters: int = 50) -> float | None:
    """Bisection on the mean residual (monotone increasing in ζ); None if it has no root in [0, 1]."""
    lo, hi = 0.0, 1.0
    f_lo, f_hi = float(cal.residual(lo).mean()), float(cal.residual(hi).mean())
    if f_lo > 0 or f_hi < 0:
        return None
    for _ in range(iters):
        mid = (lo + hi) / 2
        if float(cal.residual(mid).mean()) < 0:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def collect(cfg, batches: int) -> Calibration:
    from powerclip.data import build_loader, model_geometry
    from powerclip.data.device import to_device
    from powerclip.model.factory import create_model

    torch.manual_seed(cfg.train.seed)
    model = create_model(cfg.model).eval()
    loader = build_loader(cfg, 0, 1)
    geo = model_geometry(cfg)  # the loader ships uint8 pixels
    pcfg = cfg.loss.powerset
    cal = Calibration(pcfg.tau, pcfg.memory_budget_mb)
    with torch.no_grad():
        for n, batch in enumerate(loader):
            if n >= batches:
                break
            batch = to_device(batch, "cpu", None, geo.mean, geo.std)
            feats = model(batch, dense=True)
            phi, rv = region_embeddings(feats.patches, batch.region_masks, batch.region_valid)
            p, pv = phrase_embeddings(feats.tokens, batch.phrase_tokens, batch.phrase_valid, batch.token_valid,
                                      pcfg.phrase_pool)
            cal.add(phi, rv, p, pv, region_scale(rv, pcfg, torch.float64))
            print(f"batch {n}: {phi.shape[0]} images, M={phi.shape[1]} region slots, "
                  f"K<={p.shape[1]} phrases (mean {pv.sum(-1).double().mean():.1f})")
    return cal


def report(cal: Calibration, zeta_cfg: float) -> dict[str, float]:
    exact = torch.cat(cal.exact)
    tau = cal.tau
    z_ls = fit_least_squares(cal)
    z_bias = fit_zero_bias(cal)
    lo, hi = cal.t2(0.0), cal.t2(1.0)
    inside = float(((lo <= exact + 1e-12) & (exact <= hi + 1e-12)).double().mean())

    def stats(z: float) -> str:
        r = cal.residual(z)
        return (f"RMS {float(r.pow(2).mean().sqrt()):.3e}  mean {float(r.mean()):+.3e}  "
                f"max|r| {float(r.abs().max()):.3e}  (RMS/tau {float(r.pow(2).mean().sqrt()) / tau:.3f})")

    gap = torch.cat(cal.t1) - torch.cat(cal.exact_t2r)
    print(f"\npairs: {exact.numel()} (image, caption) pairs from {len(cal.batches)} batches, tau={tau:g}")
    print(f"exact Q->: mean {float(exact.mean()):+.4e}  std {float(exact.std()):.4e}")
    print(f"sandwich NLA-T2(0) <= Q-> <= NLA-T2(1) holds for {inside * 100:.2f}% of pairs; mean width "
          f"{float((hi - lo).mean()):.3e}")
    print(f"NLA-T1 - exact Q<-: mean {float(gap.mean()):.3e}, max {float(gap.max()):.3e} "
          f"(bound tau*M*log2 = {tau * cal.batches[0][0].shape[1] * math.log(2):.3e})")
    print(f"configured zeta = {zeta_cfg:.4f}: {stats(zeta_cfg)}")
    print(f"zeta = 0         : {stats(0.0)}")
    print(f"zeta = 1         : {stats(1.0)}")
    print(f"least-squares zeta = {z_ls:.4f}: {stats(z_ls)}")
    if z_bias is None:
        print("zero-bias zeta: none in [0, 1] (the mean residual does not change sign)")
    else:
        print(f"zero-bias zeta     = {z_bias:.4f}: {stats(z_bias)}")
    print(f"\nfitted zeta = {z_ls:.4f}  (set loss.powerset.zeta={z_ls:.4f})")
    return {"zeta": z_ls, "zeta_zero_bias": float("nan") if z_bias is None else z_bias,
            "rms": float(cal.residual(z_ls).pow(2).mean().sqrt())}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-c", "--config", help="run config YAML (data sources, model, loss.powerset)")
    ap.add_argument("--batches", type=int, default=4, help="batches to collect pairs from")
    ap.add_argument("overrides", nargs="*", help="dotted key=value config overrides")
    args = ap.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    cal = collect(cfg, args.batches)
    if not cal.batches:
        raise SystemExit("no batch came out of the data stream: check data.sources")
    report(cal, cfg.loss.powerset.zeta)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""tools/calibrate_zeta.py: the ζ fits against exact enumeration (random embeddings, no model)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tools.calibrate_zeta import Calibration, fit_least_squares, fit_zero_bias


def _calibration(tau: float = 0.01) -> Calibration:
    gen = torch.Generator().manual_seed(0)
    cal = Calibration(tau, 64.0)
    for _ in range(2):
        phi = F.normalize(torch.randn(6, 6, 8, generator=gen, dtype=torch.float64), dim=-1)
        p = F.normalize(torch.randn(6, 4, 8, generator=gen, dtype=torch.float64), dim=-1)
        rv = torch.ones(6, 6, dtype=torch.bool)
        rv[0, 4:] = False
        pv = torch.ones(6, 4, dtype=torch.bool)
        pv[2, 1:] = False
        cal.add(phi, rv, p, pv, 1.0 / rv.sum(-1).double())
    return cal


def test_fits_minimise_the_residual_within_the_sandwich():
    cal = _calibration()
    exact = torch.cat(cal.exact)
    assert (cal.t2(0.0) <= exact + 1e-12).all() and (exact <= cal.t2(1.0) + 1e-12).all()
    z = fit_least_squares(cal)
    assert 0.0 <= z <= 1.0
    best = cal.sse(z)
    for other in (0.0, 0.15, 0.5, 1.0, z - 0.02, z + 0.02):
        if 0.0 <= other <= 1.0:
            assert best <= cal.sse(other) + 1e-15
    zb = fit_zero_bias(cal)
    assert zb is not None and 0.0 <= zb <= 1.0
    assert abs(float(cal.residual(zb).mean())) < 1e-9

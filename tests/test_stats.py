"""powerclip.eval.stats against hand-computed and analytic values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from powerclip.eval.stats import hierarchical_bootstrap, holm


def test_holm_on_hand_computed_lists():
    # sorted: 0.005 x 4 = 0.02, 0.01 x 3 = 0.03, 0.03 x 2 = 0.06, 0.04 x 1 = 0.04 -> running max 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    # capped at 1, and the running maximum carries a large early value to later ones
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])
    assert holm([0.02, 0.001, 0.04, 0.03]) == pytest.approx([0.06, 0.004, 0.06, 0.06])
    assert holm([0.2]) == [0.2]
    # at alpha 0.05 the step-down stops at the first non-rejection: 0.03 x 2 = 0.06 > 0.05 keeps 0.04 too
    assert [p <= 0.05 for p in holm([0.01, 0.04, 0.03, 0.005])] == [True, False, False, True]


def test_bootstrap_with_one_seed_is_the_item_bootstrap_of_a_proportion():
    """Bernoulli items: the 95% interval matches the normal-approximation interval p +- 1.96 sqrt(p(1-p)/n)."""
    rng = np.random.default_rng(1)
    n = 2000
    x = (rng.random(n) < 0.3).astype(float)
    r = hierarchical_bootstrap(x[None, :], n_boot=4000, seed=0)
    p = x.mean()
    half = 1.96 * math.sqrt(p * (1 - p) / n)
    assert r.mean == pytest.approx(p)
    assert r.low == pytest.approx(p - half, abs=0.1 * half)
    assert r.high == pytest.approx(p + half, abs=0.1 * half)


def test_bootstrap_over_seeds_and_shared_items_has_both_variances():
    """Additive seed and item effects, every seed on the same items: a bootstrap replicate's variance is
    var(a)/S + var(b)/J (population variances of the drawn effects), not var(b)/(S J) as drawing the
    items anew per seed would give."""
    rng = np.random.default_rng(2)
    n_seeds, n_items = 30, 300
    a = rng.normal(0, 0.02, n_seeds)  # items dominate, so that sharing them or not shows
    b = rng.normal(0, 0.3, n_items)
    x = a[:, None] + b[None, :]
    r = hierarchical_bootstrap(x, n_boot=4000, seed=0)
    se = math.sqrt(a.var() / n_seeds + b.var() / n_items)
    half = (r.high - r.low) / 2
    assert half == pytest.approx(1.96 * se, rel=0.08)
    assert half > 2 * 1.96 * math.sqrt(a.var() / n_seeds + b.var() / (n_seeds * n_items))


def test_bootstrap_p_value_tells_an_effect_from_none():
    rng = np.random.default_rng(3)
    noise = rng.normal(0, 1, (5, 400))
    assert hierarchical_bootstrap(noise + 0.5, n_boot=2000).p < 0.001
    centred = noise - noise.mean()
    assert hierarchical_bootstrap(centred, n_boot=2000).p > 0.5
    with pytest.raises(ValueError, match="seeds, items"):
        hierarchical_bootstrap([1.0, 2.0])

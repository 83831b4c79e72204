"""The collectives behind every global loss: gathered with gradient, variable sizes, offsets."""

import torch

from powerclip import distributed as pdist
from tests.dist_helpers import run_on_ranks


def _gather_case(rank: int, world: int) -> dict:
    # rank r holds r+1 rows (variable sizes) and 2 fixed rows
    var = torch.full((rank + 1, 3), float(rank), requires_grad=True)
    fixed = torch.arange(2 * 3, dtype=torch.float32).reshape(2, 3).add(10 * rank).requires_grad_()
    gathered_var, sizes = pdist.gather_variable(var)
    gathered_fixed = pdist.gather_with_grad(fixed)
    # weight each gathered row by its global index so the gradient tells where the row went
    w = torch.arange(gathered_var.shape[0], dtype=torch.float32)[:, None]
    (gathered_var * w).sum().backward()
    gathered_fixed.sum().backward()
    return {"sizes": sizes, "offset": pdist.rank_offset(sizes), "var": gathered_var.detach(),
            "var_grad": var.grad, "fixed": gathered_fixed.detach(), "fixed_grad": fixed.grad}


def test_gathers_on_two_ranks():
    r0, r1 = run_on_ranks(_gather_case, 2)
    assert r0["sizes"] == r1["sizes"] == [1, 2]
    assert (r0["offset"], r1["offset"]) == (0, 1)
    expected = torch.tensor([[0.0] * 3, [1.0] * 3, [1.0] * 3])
    assert torch.equal(r0["var"], expected) and torch.equal(r1["var"], expected)
    # backward of all_gather sums every rank's contribution into the owner's chunk: 2 ranks x index
    assert torch.equal(r0["var_grad"], torch.zeros(1, 3))
    assert torch.equal(r1["var_grad"], torch.tensor([[2.0] * 3, [4.0] * 3]))
    assert r0["fixed"].shape == (4, 3) and torch.equal(r0["fixed"], r1["fixed"])
    assert torch.equal(r0["fixed_grad"], torch.full((2, 3), 2.0))


def test_single_process_is_identity():
    x = torch.randn(3, 2)
    assert pdist.gather_with_grad(x) is x
    y, sizes = pdist.gather_variable(x)
    assert y is x and sizes == [3] and pdist.rank_offset(sizes) == 0

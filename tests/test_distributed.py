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


def _mismatch_case(rank: int, world: int) -> dict:
    out = {}
    x = torch.zeros(rank + 1, 3)  # rank 0: 1 row, rank 1: 2 rows
    for name, call in (("equal", lambda: pdist.all_gather_equal(x, what="test features")),
                       ("grad", lambda: pdist.gather_with_grad(x, check="test rows")),
                       ("variable", lambda: pdist.gather_variable(torch.zeros(2, rank + 2), with_grad=False))):
        try:
            call()
            out[name] = None
        except pdist.CollectiveMismatch as e:
            out[name] = str(e)
    return out


def test_shape_mismatch_raises_naming_ranks_and_sizes():
    for res in run_on_ranks(_mismatch_case, 2):
        assert res["equal"] == ("test features: ranks disagree (rank 0: (1, 3), rank 1: (2, 3)); "
                                "every rank must pass the same shape")
        assert "test rows" in res["grad"] and "rank 1: (2, 3)" in res["grad"]
        assert "rank 0: (2,), rank 1: (3,)" in res["variable"]


def _helpers_case(rank: int, world: int) -> dict:
    x = torch.tensor([float(rank + 1), 10.0], dtype=torch.float64)
    summed = pdist.all_reduce_sum(x)
    sent = pdist.broadcast(torch.tensor([float(rank + 7)]), src=1)
    gathered = pdist.all_gather_equal(torch.tensor([rank, 2 * rank]), what="pairs")
    objs = pdist.all_gather_object({"rank": rank})
    ints = pdist.gather_ints([rank, 5])

    def load() -> str:
        if rank == 1:
            raise FileNotFoundError("weights.pt missing on rank 1")
        return "ok"

    try:
        pdist.local_zero_first(load, local_rank=rank, what="loading model.pretrained='weights.pt'")
        err = None
    except Exception as e:
        err = f"{type(e).__name__}: {e}"
    first = pdist.local_zero_first(lambda: rank * 3, local_rank=rank, what="x")
    return {"summed": summed, "x_after": x, "sent": sent, "gathered": gathered, "objs": objs, "ints": ints,
            "err": err, "first": first}


def test_helpers_on_two_ranks():
    r0, r1 = run_on_ranks(_helpers_case, 2)
    for rank, r in enumerate((r0, r1)):
        assert torch.equal(r["summed"], torch.tensor([3.0, 20.0], dtype=torch.float64))
        assert r["summed"].dtype == torch.float64 and r["summed"].device.type == "cpu"
        assert r["x_after"][0] == rank + 1  # the input is not reduced in place
        assert torch.equal(r["sent"], torch.tensor([8.0]))
        assert [t.tolist() for t in r["gathered"]] == [[0, 0], [1, 2]]
        assert r["objs"] == [{"rank": 0}, {"rank": 1}] and r["ints"] == [[0, 5], [1, 5]]
        assert r["first"] == 3 * rank
    # a failure on one rank reaches every rank at once: the failing rank's own error, the other names it
    assert r1["err"] == "FileNotFoundError: weights.pt missing on rank 1"
    assert r0["err"].startswith("RuntimeError: loading model.pretrained='weights.pt': failed on rank(s) [1]")


def test_device_for_backend_puts_nccl_on_cuda():
    # only constructs torch.device objects: no GPU needed
    assert pdist.device_for_backend("nccl", cuda_index=3) == torch.device("cuda", 3)
    assert pdist.device_for_backend("NCCL", cuda_index=0).type == "cuda"
    assert pdist.device_for_backend("gloo") == torch.device("cpu")
    assert pdist.device_for_backend("mpi") == torch.device("cpu")
    assert pdist.device_for_backend("cpu:gloo,cuda:nccl") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert pdist.device_for_backend("nccl") == torch.device("cuda", 0)
    import pytest

    with pytest.raises(ValueError, match="'weird'"):
        pdist.device_for_backend("weird")
    assert pdist.comm_device() == torch.device("cpu")  # no process group


# ------------------------------------------------ no collective outside powerclip/distributed.py
COLLECTIVES = {"all_gather", "all_gather_object", "all_gather_into_tensor", "all_reduce", "all_to_all",
               "all_to_all_single", "barrier", "broadcast", "broadcast_object_list", "gather",
               "gather_object", "reduce", "reduce_scatter", "reduce_scatter_tensor", "scatter",
               "scatter_object_list", "send", "recv", "isend", "irecv", "batch_isend_irecv",
               "monitored_barrier", "all_gather_coalesced", "all_reduce_coalesced"}
COMM_MODULES = ("torch.distributed", "deepspeed.comm")


def direct_collectives(source: str) -> list[str]:
    """Calls of torch.distributed / deepspeed.comm collectives in ``source``, as 'line: name'."""
    import ast

    tree = ast.parse(source)
    aliases: dict[str, str] = {}  # local name -> dotted module or function it stands for
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                aliases[a.asname or a.name] = f"{node.module}.{a.name}"

    def dotted(expr: ast.expr) -> str | None:
        if isinstance(expr, ast.Name):
            return aliases.get(expr.id, expr.id)
        if isinstance(expr, ast.Attribute):
            base = dotted(expr.value)
            return None if base is None else f"{base}.{expr.attr}"
        return None

    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = dotted(node.func)
            if name and name.startswith(COMM_MODULES) and name.rsplit(".", 1)[-1] in COLLECTIVES:
                found.append(f"{node.lineno}: {name}")
    return found


def test_scanner_finds_direct_collectives():
    src = ("import torch.distributed as dist\nimport torch\nfrom torch.distributed import all_reduce as ar\n"
           "import torch.distributed.nn.functional as F\nfrom powerclip import distributed as pdist\n"
           "dist.all_reduce(x)\ntorch.distributed.barrier()\nar(x)\nF.all_gather(x)\npdist.barrier()\n"
           "dist.is_initialized()\nimport deepspeed\ndeepspeed.comm.broadcast(x, 0)\n")
    assert direct_collectives(src) == ["6: torch.distributed.all_reduce", "7: torch.distributed.barrier",
                                       "8: torch.distributed.all_reduce",
                                       "9: torch.distributed.nn.functional.all_gather",
                                       "13: deepspeed.comm.broadcast"]


def test_no_collective_outside_distributed_module():
    from pathlib import Path

    import powerclip

    root = Path(powerclip.__file__).parent
    offenders = {}
    for path in sorted(root.rglob("*.py")):
        if path == root / "distributed.py":
            continue
        found = direct_collectives(path.read_text())
        if found:
            offenders[str(path.relative_to(root))] = found
    assert not offenders, f"call these through powerclip.distributed instead: {offenders}"

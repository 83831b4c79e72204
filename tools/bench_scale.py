#!/usr/bin/env python
"""Per-rank cost of every loss term at simulated world sizes: FLOPs and extra peak memory.

What one rank of a W-rank job computes for each term (forward + backward), counted rather than timed:
FLOPs with ``torch.utils.flop_counter.FlopCounterMode`` (matmul-class ops: the elementwise work is
not counted) and the term's extra peak memory (everything the term allocates, gathered tensors,
saved activations and gradients included, over what its inputs already hold) with torch's
``MemTracker``. Everything runs on the meta device, so W = 1,024 at the presets' shapes takes
seconds on a laptop CPU; the all-gathers are replaced by tensors of the gathered SHAPE
(``simulated_world``), which is what a rank's work depends on. tests/test_bench_scale.py checks on
2 and 4 real gloo ranks that the simulated per-rank FLOPs equal the real ones.

Shapes: PowerCLIP preset B = 256 per rank, M = 10 regions, K = 16 phrases, D = 512; C2LIP about 3
concepts per image, T = 196 patches, D = 768; DeGLA K = 4 hard negatives, D = 512. The reference
is a ViT-B/16 224 px forward+backward: 246 GFLOP per sample (FlopCounterMode on the model).

    python tools/bench_scale.py                  # table on stdout
    python tools/bench_scale.py --write BENCHMARKS.md   # and (re)write its section in that file
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from powerclip import distributed as pdist  # noqa: E402
from powerclip.config import ConceptLossConfig, DeglaLossConfig, LossConfig, PowersetLossConfig  # noqa: E402
from powerclip.data.batch import Batch  # noqa: E402
from powerclip.losses.composer import all_terms  # noqa: E402
from powerclip.losses.concept import contrast, with_own_block  # noqa: E402
from powerclip.losses.concept_xac import xac_scores, xac_scores_paired  # noqa: E402
from powerclip.losses.degla import caption_logits, degla_losses  # noqa: E402
from powerclip.losses.global_loss import clip_loss  # noqa: E402
from powerclip.losses.pool import PoolSpec, parse_pool  # noqa: E402
from powerclip.losses.powerset import powerset_loss_from_embeddings  # noqa: E402
from powerclip.model.features import Features  # noqa: E402

WORLDS = (1, 8, 64, 256, 1024)
# DeGLA's NegCLIP replaces CLIP's global loss in its stage, and its image-caption block IS that global
# loss (every caption of the global batch a column, B x G x D by design). It is measured on its own and
# subtracted from the whole DeGLA objective: what is left (hard-negative columns, IGC, TGC,
# distillation) is the DeGLA method term whose per-rank cost the targets bound.
DEGLA_GLOBAL = "degla caption block (global loss)"
DEGLA_TOTAL = "degla total"
DEGLA_TERMS = "degla beyond the global loss"
# reported for scale, not held to the term targets
GLOBAL_TERMS = ("clip (global)", DEGLA_GLOBAL, DEGLA_TOTAL)
VIT_B16_FLOPS_PER_SAMPLE = 246e9


@dataclass(frozen=True)
class Shapes:
    b: int = 256
    m: int = 10
    k: int = 16
    d: int = 512
    t: int = 196
    d_concept: int = 768
    concepts_per_image: int = 3
    negatives: int = 4


# --------------------------------------------------------------------------- simulated collectives
@contextmanager
def simulated_world(world: int, rank: int = 0) -> Iterator[None]:
    """Make ``powerclip.distributed`` answer as rank ``rank`` of ``world`` ranks whose tensors all have
    this rank's shapes: gathers return tensors of the gathered shape (this rank's chunk keeps its
    gradient, the others are fresh), reductions return their input. Values are meaningless."""
    names = ("is_distributed", "world_size", "rank", "gather_with_grad", "gather_variable",
             "all_reduce_sum", "gather_known_sizes", "all_to_all_with_grad", "gather_ints", "require_equal")
    saved = {n: getattr(pdist, n) for n in names}

    def others(x: torch.Tensor, rows: int) -> torch.Tensor:
        return x.new_empty((rows, *x.shape[1:]))

    def gather(x: torch.Tensor, check: str | None = None) -> torch.Tensor:
        return torch.cat([others(x, rank * x.shape[0]), x, others(x, (world - rank - 1) * x.shape[0])])

    def known(x: torch.Tensor, sizes: list[int], with_grad: bool = True) -> torch.Tensor:
        return torch.cat([others(x, sum(sizes[:rank])), x, others(x, sum(sizes[rank + 1:]))])

    pdist.is_distributed = lambda: world > 1
    pdist.world_size = lambda: world
    pdist.rank = lambda: rank
    pdist.gather_with_grad = gather
    pdist.gather_ints = lambda values: [list(values)] * world
    pdist.require_equal = lambda what, per_rank: None
    pdist.gather_variable = lambda x, with_grad=True: (gather(x), [int(x.shape[0])] * world)
    pdist.all_reduce_sum = lambda x: x
    pdist.gather_known_sizes = known
    pdist.all_to_all_with_grad = lambda x: x.new_empty(x.shape) + 0 * x  # same shape, keeps the graph
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(pdist, n, f)


# --------------------------------------------------------------------------------- measurement
def measure(make: Callable[[], tuple[list[torch.Tensor], Callable]]) -> tuple[int, int]:
    """(FLOPs, extra peak bytes) of building the loss ``make`` returns and back-propagating it.

    ``make`` returns (inputs, loss_fn) split so that the inputs exist before tracking starts: the
    peak is what the term adds on top of its inputs.
    """
    from torch.distributed._tools.mem_tracker import MemTracker

    inputs, loss_fn = make()
    tracker = MemTracker()
    with FlopCounterMode(display=False) as flops, tracker:
        base = _total(tracker.get_tracker_snapshot("current"))
        loss = loss_fn(*inputs)
        loss.backward()
        del loss
    return int(flops.get_total_flops()), _total(tracker.get_tracker_snapshot("peak")) - base


def measure_flops(make: Callable[[], tuple[list[torch.Tensor], Callable]]) -> int:
    """FLOPs only (real tensors and real collectives work too: the 2-rank check uses this)."""
    inputs, loss_fn = make()
    with FlopCounterMode(display=False) as flops:
        loss_fn(*inputs).backward()
    return int(flops.get_total_flops())


def _total(snapshot: dict) -> int:
    return int(sum(v["Total"] for v in snapshot.values()))


def _leaf(*shape: int, device: str, grad: bool = True) -> torch.Tensor:
    x = torch.randn(*shape, device=device) if device != "meta" else torch.empty(*shape, device=device)
    return x.requires_grad_(grad)


# ------------------------------------------------------------------------------------- the terms
def clip_case(s: Shapes, device: str = "meta"):
    inputs = [_leaf(s.b, s.d, device=device), _leaf(s.b, s.d, device=device), torch.tensor(10.0, device=device)]
    return inputs, lambda img, txt, scale: clip_loss(img, txt, scale)


def powerset_case(s: Shapes, cfg: PowersetLossConfig, device: str = "meta"):
    phi, p = _leaf(s.b, s.m, s.d, device=device), _leaf(s.b, s.k, s.d, device=device)
    rv = torch.ones(s.b, s.m, dtype=torch.bool, device=device)
    pv = torch.ones(s.b, s.k, dtype=torch.bool, device=device)
    return [phi, rv, p, pv], lambda *x: powerset_loss_from_embeddings(*x, cfg)["powerset"]


def concept_columns(s: Shapes, world: int, pool: PoolSpec) -> tuple[int, int]:
    """(own columns scored with their owner only, columns scored by every local image) of one rank,
    every image holding the same number of concepts (as in losses/concept.py)."""
    per = s.concepts_per_image
    g = s.b * world
    if pool.covers(g):
        return 0, g * per
    if pool.kind == "local":
        return 0, s.b * per
    return s.b * per, pool.size * per


def concept_case(s: Shapes, cfg: ConceptLossConfig, term: str, world: int, device: str = "meta"):
    """NPC or XAC scoring of the local images against the concept columns the pool gives, and the
    softmax contrast over them (the data-dependent bookkeeping, masks and counts, is not counted)."""
    own, dense = concept_columns(s, world, parse_pool(cfg.negative_pool, "loss.concept.negative_pool"))
    image = _leaf(s.b, s.d_concept, device=device)
    patches = _leaf(s.b, s.t, s.d_concept, device=device)
    concepts = _leaf(s.b * s.concepts_per_image, s.d_concept, device=device)
    scale = torch.tensor(10.0, device=device)
    owner = torch.arange(s.b, device=device).repeat_interleave(s.concepts_per_image)[:own]

    def loss(image, patches, concepts):
        columns = concepts if own == 0 and dense == concepts.shape[0] else torch.cat(
            [concepts, concepts.new_empty(dense - concepts.shape[0] + own, s.d_concept)])
        columns = columns[own:]  # the own concepts that are scored pair-wise come first
        if term == "concept_npc":
            scores = image @ columns.t()
            paired = (image[owner] * concepts[:own]).sum(-1)
        else:
            scores = xac_scores(patches, columns, cfg.xac_lambda, cfg.memory_budget_mb)
            paired = xac_scores_paired(patches, owner, concepts[:own], cfg.xac_lambda)
        scores = with_own_block(paired, owner, scores, s.b)
        pos = torch.zeros(s.b, own + dense, dtype=torch.bool, device=image.device)
        pos[:, :1] = True
        return contrast(scores, pos, "softmax", Features(image=image, text=image, logit_scale=scale), float(s.b))

    return [image, patches, concepts], loss


def _degla_inputs(s: Shapes, device: str) -> tuple[list[torch.Tensor], Batch, Features]:
    img, txt = _leaf(s.b, s.d, device=device), _leaf(s.b, s.d, device=device)
    neg = _leaf(s.b, s.negatives, s.d, device=device)
    batch = Batch(keys=[""] * s.b, images=torch.zeros(1), text=torch.zeros(1),
                  neg_valid=torch.ones(s.b, s.negatives, dtype=torch.bool, device=device))
    teacher = Features(image=_leaf(s.b, s.d, device=device, grad=False), text=_leaf(s.b, s.d, device=device, grad=False),
                       logit_scale=torch.tensor(10.0, device=device),
                       negatives=_leaf(s.b, s.negatives, s.d, device=device, grad=False))
    return [img, txt, neg], batch, teacher


def degla_case(s: Shapes, cfg: DeglaLossConfig, device: str = "meta"):
    """The whole DeGLA objective, the four terms weighted as configured (teacher features given: the
    EMA teacher's own forward is a model cost, not a loss term, and is not counted)."""
    inputs, batch, teacher = _degla_inputs(s, device)
    weights = {"degla_base": cfg.base_weight, "degla_igc": cfg.igc_weight, "degla_tgc": cfg.tgc_weight,
               "degla_distill": cfg.distill_weight}

    def loss(img, txt, neg):
        f = Features(image=img, text=txt, logit_scale=torch.tensor(10.0, device=img.device), negatives=neg)
        out = degla_losses(f, teacher, batch, cfg)
        return sum(w * out[k] for k, w in weights.items())

    return inputs, loss


def degla_global_case(s: Shapes, device: str = "meta"):
    """The image-caption block of DeGLA's NegCLIP (``degla.caption_logits``) and its softmax: the part
    of the DeGLA objective that replaces CLIP's global loss and costs what CLIP does (B x G x D)."""
    inputs, _, _ = _degla_inputs(s, device)

    def loss(img, txt, neg):
        i2t, t2i, labels = caption_logits(img.float(), txt.float(), torch.tensor(10.0, device=img.device))
        return 0.5 * (F.cross_entropy(i2t, labels) + F.cross_entropy(t2i, labels))

    return inputs, loss


def cases(s: Shapes, pools: dict[str, str], world: int, device: str = "meta") -> dict[str, Callable]:
    """Term name -> zero-argument factory of (inputs, loss_fn) under the given pools."""
    ps = PowersetLossConfig(weight=1.0, negative_pool=pools["powerset"])
    cc = ConceptLossConfig(npc_weight=1.0, xac_weight=1.0, negative_pool=pools["concept"])
    dg = DeglaLossConfig(enabled=True, negative_pool=pools["degla"])
    return {
        "clip (global)": lambda: clip_case(s, device),
        "powerset": lambda: powerset_case(s, ps, device),
        "concept_npc": lambda: concept_case(s, cc, "concept_npc", world, device),
        "concept_xac": lambda: concept_case(s, cc, "concept_xac", world, device),
        DEGLA_GLOBAL: lambda: degla_global_case(s, device),
        DEGLA_TOTAL: lambda: degla_case(s, dg, device),
    }


def run(s: Shapes, pools: dict[str, str], worlds: tuple[int, ...] = WORLDS,
        only: tuple[str, ...] | None = None) -> dict[str, dict[int, tuple[int, int]]]:
    """Term -> W -> (FLOPs, extra peak bytes) of the terms in ``only`` (None: all), with the derived row
    ``DEGLA_TERMS`` = the whole DeGLA objective minus its caption block: FLOPs subtract exactly (the
    block's matmuls are separate ops of the same graph); the memory figure is the difference of the
    two peaks."""
    out: dict[str, dict[int, tuple[int, int]]] = {}
    for w in worlds:
        with simulated_world(w):
            for name, make in cases(s, pools, w).items():
                if only is None or name in only:
                    out.setdefault(name, {})[w] = measure(make)
    if DEGLA_TOTAL in out and DEGLA_GLOBAL in out:
        out[DEGLA_TERMS] = {w: (out[DEGLA_TOTAL][w][0] - out[DEGLA_GLOBAL][w][0],
                                out[DEGLA_TOTAL][w][1] - out[DEGLA_GLOBAL][w][1]) for w in worlds}
    return out


# objective term -> the loss section whose negative pool it runs under, for every registered term
# that has one (powerclip.losses.registry), and each such section's default pool
POOL_SECTION = {name: t.section for t in all_terms() if hasattr(t.settings(LossConfig()), "negative_pool")
                for name in t.weight_fields()}
DEFAULT_POOLS = {sec: getattr(LossConfig(), sec).negative_pool for sec in dict.fromkeys(POOL_SECTION.values())}
ALL_POOLS = dict.fromkeys(DEFAULT_POOLS, "all")


def table(s: Shapes, results: dict[str, dict[str, dict[int, tuple[int, int]]]], worlds: tuple[int, ...]) -> str:
    vit = VIT_B16_FLOPS_PER_SAMPLE * s.b
    head = "| term | pool | " + " | ".join(f"W={w}" for w in worlds) + " | max/min FLOPs over the W run |"
    lines = [head, "|" + "---|" * (len(worlds) + 3)]
    for pools_name, res in results.items():
        for term, by_w in res.items():
            pools = ALL_POOLS if pools_name == "all" else DEFAULT_POOLS
            section = "degla" if term.startswith("degla") else POOL_SECTION[term]
            pool = "all" if term.startswith("clip") or term == DEGLA_GLOBAL else f"`{pools[section]}`"
            cells = []
            for w in worlds:
                if w not in by_w:
                    cells.append("not run")
                    continue
                f, mem = by_w[w]
                cells.append(f"{f / 1e12:.3g} TF ({100 * f / vit:.2g}%), {mem / 2**30:.3g} GB")
            fl = [v[0] for v in by_w.values()]
            lines.append(f"| {term} | {pool} | " + " | ".join(cells) + f" | {max(fl) / max(min(fl), 1):.3g} |")
    return "\n".join(lines)


def targets(s: Shapes, res: dict[str, dict[int, tuple[int, int]]], worlds: tuple[int, ...]) -> list[str]:
    """The issue's targets under the default pools, checked row by row."""
    vit = VIT_B16_FLOPS_PER_SAMPLE * s.b
    out = []
    for term, by_w in res.items():
        if term in GLOBAL_TERMS:
            continue
        f, mem = by_w[max(worlds)]
        bind = [w for w in worlds if w * s.b > 4096] or [max(worlds)]
        fl = [by_w[w][0] for w in bind]
        ok = f <= 0.1 * vit and mem <= 4 * 2**30 and max(fl) <= 1.1 * min(fl)
        out.append(f"* {term}: {100 * f / vit:.2g}% of the ViT-B/16 step, {mem / 2**30:.3g} GB extra at "
                   f"W={max(worlds)}; FLOPs max/min over W >= {bind[0]} = {max(fl) / max(min(fl), 1):.3g}"
                   f" -> {'meets' if ok else 'MISSES'} the targets (<= 10%, <= 4 GB, <= 1.1)")
    return out


SECTION_START = "<!-- bench_scale: start -->"
SECTION_END = "<!-- bench_scale: end -->"


def write_section(path: Path, text: str) -> None:
    """(Re)write this tool's section of ``path``, leaving the rest of the file alone."""
    old = path.read_text() if path.exists() else ""
    block = f"{SECTION_START}\n{text}\n{SECTION_END}\n"
    if SECTION_START in old and SECTION_END in old:
        head, rest = old.split(SECTION_START, 1)
        tail = rest.split(SECTION_END, 1)[1].lstrip("\n")
        new = head + block + ("\n" + tail if tail else "")
    else:
        new = old.rstrip("\n") + "\n\n" + block if old else block
    path.write_text(new)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worlds", default=",".join(map(str, WORLDS)))
    ap.add_argument("--write", type=Path, default=None, help="markdown file whose bench_scale section to rewrite")
    ap.add_argument("--all-worlds", default="1,8,64,256",
                    help="world sizes for the 'all' rows (slow on the meta device at W=1024: thousands of chunks)")
    ap.add_argument("--skip-all", action="store_true", help="only the default pools")
    args = ap.parse_args(argv)
    worlds = tuple(int(w) for w in args.worlds.split(","))
    s = Shapes()
    results = {}
    if not args.skip_all:
        results["all"] = run(s, ALL_POOLS, tuple(int(w) for w in args.all_worlds.split(",")))
    results["default"] = run(s, DEFAULT_POOLS, worlds)
    text = "\n".join([
        "## Per-rank cost of the loss terms vs world size (tools/bench_scale.py)",
        "",
        f"Counted, not timed: forward+backward FLOPs of one rank (FlopCounterMode, matmul-class ops) as TFLOP "
        f"and as % of a ViT-B/16 fwd+bwd of the same rank (B={s.b} x 246 GFLOP = {VIT_B16_FLOPS_PER_SAMPLE * s.b / 1e12:.0f}"
        " TFLOP), and the term's extra peak memory (MemTracker, fp32) on the meta device with all-gathers "
        f"simulated by their shapes. Shapes: B={s.b}, M={s.m}, K={s.k}, D={s.d}; concepts {s.concepts_per_image}"
        f"/image, T={s.t}, D={s.d_concept}; DeGLA {s.negatives} negatives. Default pools: "
        + ", ".join(f"{k} `{v}`" for k, v in DEFAULT_POOLS.items()) + ".",
        "",
        table(s, results, worlds),
        "",
        "Targets under the default pools (flatness over the W at which the pool binds, G > 4096):",
        "",
        *targets(s, results["default"], worlds),
        "",
        "Notes: `clip (global)` is the global objective (B x G x D by design, not a method term). "
        "A DeGLA stage replaces it by NegCLIP, whose image-caption block (every caption of the global batch "
        f"a column, both directions) is that same global loss: `{DEGLA_GLOBAL}` measures it alone "
        "(`degla.caption_logits` and its softmax). "
        f"`{DEGLA_TOTAL}` is the whole DeGLA objective (NegCLIP with its pooled hard-negative columns, IGC, "
        f"TGC and distillation, weighted as configured; the EMA teacher's forward is a model cost and not "
        f"counted); `{DEGLA_TERMS}` = total minus caption block is the DeGLA method term the targets "
        "apply to (FLOPs subtract exactly; its memory is the difference of the two peaks, and still grows with "
        "W: the i2t softmax runs over one [B, G + pool] logit tensor, which holds the caption block once more, "
        "B x G x 4 bytes, 0.27 GB at W=1024). "
        "The `all` rows grow linearly in W; W=1024 is not run for them "
        "by default (the meta device walks thousands of column chunks): 4x the W=256 column. "
        "Elementwise work is not in the FLOP counts; the memory figure is fp32 and includes the gathered "
        "tensors, saved activations and gradients the term adds over its inputs.",
    ])
    print(text)
    if args.write:
        write_section(args.write, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

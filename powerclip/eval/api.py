"""``evaluate``: one entry point for standalone (``powerclip eval``) and periodic (trainer) evaluation.

Every task turns into features (batched, sharded over ranks and gathered: ``encode.py``) and a metric
(``metrics.py``). Results are keyed by a clip_benchmark-style dataset name and carry their
clip_benchmark task name, so ``results.py`` writes them in clip_benchmark's output schema.

Tasks (``task`` argument, with ``data`` the dataset root):
  zeroshot_classification  clip_benchmark ``wds`` folder or ``ROOT/<class>/*.jpg`` folder
  zeroshot_retrieval       clip_benchmark ``wds`` folder with dataset_type.txt = retrieval
  wds                      either of the two, as the folder's dataset_type.txt says
  sugar_crepe[/<part>]     SugarCrepe jsons (+ val2017 images)
  aro[/<part>]             vg_relation, vg_attribution, coco_order, flickr30k_order
  valse[/<piece>]          VALSE piece jsons
  winoground               examples.jsonl + images/
  synthetic                tools/make_synthetic output (zero-shot + retrieval + per-kind selection,
                           binding twins and binding pairs)

Each result may also carry ``"items"``: per-item outcomes (``{name: [value per item]}``) whose means
are its metrics, kept so that a figure can be recomputed or resampled over items.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch

from powerclip.config import EVAL_TASKS, eval_task_error
from powerclip.eval import compositional as comp
from powerclip.eval.datasets import ClassificationSet, RetrievalSet, load_folder, load_wds, wds_type
from powerclip.eval.encode import encode_images, encode_texts, model_device
from powerclip.eval.metrics import (
    pair_assignment,
    retrieval_metrics,
    retrieval_ranks,
    selection_correct,
    winoground_scores,
    winoground_terms,
    zero_shot_metrics,
)
from powerclip.eval.sources import ImageDataset, check_files_exist
from powerclip.eval.synthetic import load_synthetic

TASKS = EVAL_TASKS


@dataclass
class EvalOptions:
    batch_size: int = 64
    text_batch_size: int = 256
    workers: int = 0
    amp: bool = False
    recall_k: tuple[int, ...] = (1, 5, 10)
    split: str | None = None  # wds: "test", synthetic: "heldout"
    images: str | None = None  # image root when it differs from the annotation root
    dataset_name: str | None = None
    seed: int = 0  # ARO order perturbations
    all_valse: bool = False
    progress: bool = False  # a progress bar per image set (``powerclip eval``; the trainer's periodic eval shows none)


def evaluate(model: torch.nn.Module, preprocess: Callable, tokenizer: Callable, task: str,
             data: str | Path, options: EvalOptions | None = None, **kwargs: Any) -> dict[str, dict]:
    """Run one task; returns ``{dataset: {"task": clip_benchmark task, "metrics": {name: float}}}``.

    The model is put in eval mode for the duration and restored. Every rank must call this (features
    are sharded over ranks); every rank gets the same result.
    """
    opts = options or EvalOptions()
    for k, v in kwargs.items():
        if not hasattr(opts, k):
            raise TypeError(f"evaluate() got an unknown option {k!r}")
        setattr(opts, k, v)
    problem = eval_task_error(task)
    if problem:
        raise ValueError(problem)
    base, _, part = task.partition("/")
    model = unwrap(model)
    was_training = model.training
    model.eval()
    try:
        with _full_parameters(model):
            return _dispatch(model, preprocess, tokenizer, base, part or None, Path(data), opts)
    finally:
        model.train(was_training)


def _full_parameters(model: torch.nn.Module):
    """Gather ZeRO-3 partitioned parameters for the evaluation (a no-op otherwise).

    open_clip's ``encode_text`` reads ``positional_embedding``/``text_projection`` outside any
    submodule's forward, where ZeRO-3 would leave them partitioned; evaluation only reads weights,
    so every rank holds the full model for its duration (modifier_rank=None: nothing written back).
    """
    params = [p for p in model.parameters() if hasattr(p, "ds_id")]
    if not params:
        return nullcontext()
    import deepspeed  # deepspeed.zero is an attribute, not an importable module path

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The open_clip model inside a DeepSpeed engine and/or a PowerClipModel (whose encoders return
    tuples); evaluation always runs open_clip's own ``encode_image`` / ``encode_text``."""
    model = getattr(model, "module", model)
    clip = getattr(model, "clip", None)
    return clip if isinstance(clip, torch.nn.Module) else model


def _dispatch(model, preprocess, tokenizer, base: str, part: str | None, data: Path,
              opts: EvalOptions) -> dict[str, dict]:
    ctx = _Ctx(model, preprocess, tokenizer, opts)
    if base in ("zeroshot_classification", "zeroshot_retrieval", "wds"):
        if (data / (opts.split or "test") / "nshards.txt").is_file() or (data / "dataset_type.txt").is_file():
            ds = load_wds(data, opts.split or "test", opts.dataset_name)
        elif base == "zeroshot_classification":
            ds = load_folder(data, opts.dataset_name)
        else:
            raise FileNotFoundError(f"{data}: not a clip_benchmark wds dataset (no {opts.split or 'test'}/nshards.txt)")
        if base == "zeroshot_classification" and not isinstance(ds, ClassificationSet):
            raise ValueError(f"{data}: dataset_type.txt says {wds_type(data)!r}, not a classification set")
        if base == "zeroshot_retrieval" and not isinstance(ds, RetrievalSet):
            raise ValueError(f"{data}: not a retrieval set (dataset_type.txt must say 'retrieval')")
        feats = ctx.images(ds.images, ds.name)
        if isinstance(ds, ClassificationSet):
            return {ds.name: ctx.zero_shot(ds, feats)}
        return {ds.name: ctx.retrieval(ds, feats)}
    if base == "synthetic":
        bench = load_synthetic(data, opts.split or "heldout")
        feats = ctx.images(bench.images, "synthetic benchmark")
        out: dict[str, dict] = {}
        if bench.classification is not None:
            out["synthetic"] = ctx.zero_shot(bench.classification, feats)
        out["synthetic/retrieval"] = ctx.retrieval(bench.retrieval, feats)
        for sel in bench.selection:
            out[sel.name] = ctx.selection(sel, feats)
        if bench.binding is not None:
            out[bench.binding.name] = ctx.winoground(bench.binding)
        if bench.pairs is not None:
            out[bench.pairs.name] = ctx.winoground(bench.pairs)
        if bench.single is not None:
            out[bench.single.name] = ctx.zero_shot(bench.single, ctx.images(bench.single.images, bench.single.name))
        return out
    if base == "winoground":
        wino = comp.load_winoground(data)
        return {wino.name: ctx.winoground(wino)}
    if base == "sugar_crepe":
        sets = comp.load_sugarcrepe(data, [part] if part else None, opts.images)
    elif base == "aro":
        sets = comp.load_aro(data, [part] if part else None, seed=opts.seed)
    else:  # valse
        sets = comp.load_valse(data, opts.images, [f"{part}.json"] if part else None, opts.all_valse)
    return {s.name: ctx.selection(s, ctx.images(s.images, s.name)) for s in sets}


class _Ctx:
    def __init__(self, model, preprocess, tokenizer, opts: EvalOptions):
        self.model, self.preprocess, self.tokenizer, self.opts = model, preprocess, tokenizer, opts
        # text features by text, shared by the sets of one call (the synthetic benchmark's captions
        # appear in the retrieval set and in every negative kind: encode them once)
        self._text_cache: dict[str, torch.Tensor] = {}

    def images(self, refs, what: str) -> torch.Tensor:
        check_files_exist(refs, what)
        return encode_images(self.model, ImageDataset(refs, self.preprocess), self.opts.batch_size,
                             self.opts.workers, self.opts.amp, progress=what if self.opts.progress else None)

    def texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Features of ``texts`` (same order); every rank passes the same list, so the set of
        texts still to encode, in sorted order, is the same on every rank too."""
        todo = sorted({t for t in texts if t not in self._text_cache})
        if todo:
            feats = encode_texts(self.model, self.tokenizer, todo, self.opts.text_batch_size, self.opts.amp)
            self._text_cache.update(zip(todo, feats))
        if not texts:
            return torch.zeros(0, 0)
        return torch.stack([self._text_cache[t] for t in texts])

    def zero_shot(self, ds: ClassificationSet, image_features: torch.Tensor) -> dict:
        per_batch = max(1, self.opts.text_batch_size // max(1, len(ds.templates)))
        with torch.no_grad(), _maybe_autocast(self.model, self.opts.amp):
            classifier = open_clip.build_zero_shot_classifier(
                self.model, self.tokenizer, ds.classnames, ds.templates, num_classes_per_batch=per_batch,
                device=model_device(self.model))
        logits = 100.0 * image_features @ classifier.float().cpu()
        labels = torch.tensor(ds.labels)
        metrics = zero_shot_metrics(logits, labels)
        top1 = logits.topk(1, dim=1).indices[:, 0].eq(labels)  # the same top-1 as zero_shot_metrics' acc1
        return {"task": "zeroshot_classification", "metrics": metrics, "items": {"acc1": top1.int().tolist()}}

    def retrieval(self, ds: RetrievalSet, image_features: torch.Tensor) -> dict:
        flat = [c for caps in ds.captions for c in caps]
        owner = torch.tensor([i for i, caps in enumerate(ds.captions) for _ in caps], dtype=torch.long)
        text_features = self.texts(flat)
        metrics = retrieval_metrics(image_features, text_features, owner, self.opts.recall_k)
        caption_rank, image_rank = retrieval_ranks(image_features, text_features, owner, max(self.opts.recall_k))
        return {"task": "zeroshot_retrieval", "metrics": metrics,
                "items": {"image_retrieval_rank": caption_rank, "text_retrieval_rank": image_rank}}

    def selection(self, ds: comp.SelectionSet, image_features: torch.Tensor) -> dict:
        if not ds.cases:
            raise ValueError(f"{ds.name}: no test cases")
        unique = sorted({c for case in ds.cases for c in case.captions})
        pos = {t: i for i, t in enumerate(unique)}
        text_features = self.texts(unique)
        correct = []
        for case in ds.cases:
            caps = text_features[[pos[c] for c in case.captions]]
            correct.append(selection_correct(image_features[case.image], caps, case.correct, ds.ties))
        metrics = {"acc": sum(correct) / len(correct), "n": float(len(correct))}
        if ds.macro:
            metrics["macro_acc"] = comp.macro_accuracy(ds.macro, [c.group for c in ds.cases], correct)
        return {"task": "image_caption_selection", "metrics": metrics, "items": {"acc": [int(c) for c in correct]}}

    def winoground(self, ds: comp.WinogroundSet) -> dict:
        image_features = self.images(ds.images, ds.name)
        unique = sorted({c for case in ds.cases for c in case.captions})
        pos = {t: i for i, t in enumerate(unique)}
        text_features = self.texts(unique)
        scores = []
        pairs: list[float] = []
        text_cos = image_cos = binding = caption_prior = image_prior = 0.0
        for case in ds.cases:
            t = text_features[[pos[case.captions[0]], pos[case.captions[1]]]]
            im = image_features[list(case.images)]
            sim = t @ im.T
            scores.append(winoground_scores(sim))
            pairs.append(pair_assignment(sim))
            text_cos += float(t[0] @ t[1])
            image_cos += float(im[0] @ im[1])
            b, pc, pi = winoground_terms(sim)
            binding, caption_prior, image_prior = binding + b, caption_prior + abs(pc), image_prior + abs(pi)
        n = len(scores)
        # clip_benchmark's names for Winoground's text / image / group scores; then why they are what
        # they are: the mean cosine of the two captions and of the two images of a case (1: the tower
        # cannot tell the pair apart), and the mean binding term and |priors| of metrics.winoground_terms;
        # pair_acc: the matched pairs outscore the crossed ones (metrics.pair_assignment, chance 0.5)
        metrics = {"text_acc": sum(s[0] for s in scores) / n, "image_acc": sum(s[1] for s in scores) / n,
                   "acc": sum(s[2] for s in scores) / n, "pair_acc": sum(pairs) / n, "n": float(n),
                   "caption_pair_cos": text_cos / n, "image_pair_cos": image_cos / n,
                   "binding_term": binding / n, "caption_prior": caption_prior / n, "image_prior": image_prior / n}
        items = {"text_acc": [int(s[0]) for s in scores], "image_acc": [int(s[1]) for s in scores],
                 "acc": [int(s[2]) for s in scores], "pair_acc": pairs}
        return {"task": "image_caption_selection", "metrics": metrics, "items": items}


def _maybe_autocast(model: torch.nn.Module, amp: bool):
    from powerclip.eval.encode import eval_autocast

    return eval_autocast(model_device(model), amp)


def flatten(results: dict[str, dict], prefix: str = "eval") -> dict[str, float]:
    """``{"eval/<dataset>/<metric>": value}`` for TensorBoard."""
    return {f"{prefix}/{ds}/{k}": float(v) for ds, r in results.items() for k, v in r["metrics"].items()}

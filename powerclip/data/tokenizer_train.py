"""Train a SentencePiece tokenizer from the captions in webdataset shards (tools/train_tokenizer.py).

Why from shards: the captions the model will read are already there, cleaned and validated by
build_shards. Special ids follow what powerclip.data.text.SentencePieceTokenizer expects:
pad 0, unk 1, bos (SOT) 2, eos (EOT) 3; at load time EOT is moved to the highest id.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path


def iter_captions(pattern: str, limit: int | None = None):
    from .loader import expand_shards
    from .stream import read_shard

    n = 0
    for url in expand_shards(pattern):
        if not Path(url).is_file():
            raise ValueError(f"shard not found: {url}")
        for s in read_shard(url):
            cap = None
            if "json" in s:
                try:
                    cap = json.loads(s["json"]).get("caption")
                except ValueError:
                    cap = None
            if not cap and "txt" in s:
                cap = s["txt"].decode("utf-8", errors="replace")
            if cap and cap.strip():
                yield " ".join(cap.split())
                n += 1
                if limit is not None and n >= limit:
                    return


def train_tokenizer(shards: str, out: str | Path, vocab_size: int = 8000, model_type: str = "unigram",
                    lowercase: bool = True, max_captions: int | None = None) -> Path:
    """Write ``out`` (a .model path; ``out`` without .model is used as prefix) and return it."""
    import sentencepiece as spm

    out = Path(out)
    prefix = out.with_suffix("") if out.suffix == ".model" else out
    prefix.parent.mkdir(parents=True, exist_ok=True)
    # The corpus lives in a folder of its own, removed however the shards fail to read.
    with tempfile.TemporaryDirectory(prefix="powerclip-tok-") as tmp:
        corpus = Path(tmp) / "captions.txt"
        count = 0
        with corpus.open("w") as f:
            for cap in iter_captions(shards, max_captions):
                f.write(cap + "\n")
                count += 1
        if count == 0:
            raise ValueError(f"no captions found in {shards}")
        spm.SentencePieceTrainer.train(
            input=str(corpus), model_prefix=str(prefix), vocab_size=vocab_size, model_type=model_type,
            pad_id=0, unk_id=1, bos_id=2, eos_id=3, character_coverage=1.0,
            normalization_rule_name="nmt_nfkc_cf" if lowercase else "nmt_nfkc", minloglevel=2)
    return prefix.with_suffix(".model")

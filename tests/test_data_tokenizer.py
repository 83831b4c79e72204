"""SentencePiece: trained from shard captions by tools/train_tokenizer.py, used by the loader."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from powerclip.config import load_config
from powerclip.data import build_loader
from powerclip.data.text import build_tokenizer, span_positions

TINY = ("model.config={embed_dim: 32, vision_cfg: {image_size: 32, patch_size: 8, width: 32, layers: 1}, "
        "text_cfg: {context_length: 64, vocab_size: 40, width: 32, heads: 2, layers: 1}}")


@pytest.fixture(scope="module")
def sp_model(synthetic_root: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tok") / "sp.model"
    from tools import train_tokenizer as tool

    assert tool.main(["--shards", f"{synthetic_root}/train/{{00000..00002}}.tar", "--out", str(out),
                      "--vocab-size", "40"]) == 0
    assert tool.main(["--shards", f"{synthetic_root}/nothing/{{00000..00001}}.tar", "--out", str(out)]) == 2
    return out


def test_sentencepiece_layout_and_spans(sp_model: Path):
    tok = build_tokenizer(f"sentencepiece:{sp_model}", 24)
    cap = "A small red circle left of a blue square"
    enc = tok.encode(cap)
    assert enc.ids[0] == tok.sot and enc.ids[-1] == tok.eot == tok.vocab_size - 1 == 39
    assert max(enc.ids) == tok.eot and 0 not in enc.ids  # argmax pooling finds EOT; 0 is padding
    assert tok.decode(enc.ids) == cap.lower()  # case folded; the id swap is inverted
    words = {tok.decode([enc.ids[i] for i in span_positions(enc, 19, 26)])}
    assert words == {"left of"}
    with pytest.raises(ValueError, match="sentencepiece model not found"):
        build_tokenizer("sentencepiece:/nonexistent.model", 24)
    with pytest.raises(ValueError, match="expected 'clip' or 'sentencepiece"):
        build_tokenizer("bert", 24)


def test_loader_with_sentencepiece(synthetic_root: Path, sp_model: Path):
    cfg = load_config(None, [f"data.sources=[{{shards: '{synthetic_root}/train/00000.tar'}}]", TINY,
                             f"data.tokenizer=sentencepiece:{sp_model}", "data.context_length=64",
                             "data.batch_size=4", "data.workers=0", "data.num_negatives=2"])
    b = next(iter(build_loader(cfg, 0, 1)))
    assert torch.equal(b.text.argmax(-1), b.token_valid.sum(-1) + 1)  # EOT right after the words
    assert b.text.max() == 39 and b.phrase_valid[:, 0].all()
    assert b.phrase_valid.sum(1).max() > 2  # tree nodes mapped through SentencePiece offsets
    assert b.neg_text[b.neg_valid].argmax(-1).gt(0).all()

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


def test_a_failed_read_leaves_no_corpus_in_the_temp_folder(tmp_path: Path, monkeypatch):
    """The captions are written to a temporary corpus; a shard that cannot be read must not leave it behind."""
    import tempfile

    from tools import train_tokenizer as tool

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    assert tool.main(["--shards", f"{tmp_path}/missing/{{00000..00001}}.tar", "--out", str(tmp_path / "sp.model")]) == 2
    assert list(scratch.iterdir()) == []


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


# ------------------------------------------------------------------ captions cut before tokenising
def _letters(n: int, seed: int) -> str:
    import random

    r = random.Random(seed)
    return "".join(r.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(n))


def test_a_40k_caption_without_spaces_reaches_bpe_cut_to_the_bound(monkeypatch):
    from open_clip.tokenizer import SimpleTokenizer

    tok = build_tokenizer("clip", 77)
    handed: list[int] = []
    bpe = tok.tok.bpe

    def counting_bpe(word: str) -> str:
        handed.append(len(word))
        return bpe(word)

    monkeypatch.setattr(tok.tok, "bpe", counting_bpe)
    assert tok.max_non_space == 75 * 32 + 1  # CLIP's longest vocabulary entry has 32 bytes
    enc = tok.encode(_letters(40_000, 0))
    assert len(enc.ids) == 77 and enc.ids[-1] == tok.eot and enc.truncated_at == 0  # its one word was cut
    assert handed and sum(handed) <= tok.max_non_space  # not 40,000 characters
    # a long caption of ordinary words: the words beyond the bound never reach BPE, and the tokens
    # kept are exactly those of the whole caption's tokenisation
    handed.clear()
    words = " ".join(_letters(8, i) for i in range(5_000))  # 45k characters, ~15k tokens
    enc = tok.encode(words)
    assert sum(handed) <= tok.max_non_space
    assert enc.ids[1:-1] == SimpleTokenizer(context_length=77).encode(words)[:75]
    assert enc.truncated_at >= enc.spans[-2][0]  # from the last kept token's word on, words were cut


def test_captions_whose_tokens_fit_are_not_changed_by_the_cut():
    from open_clip.tokenizer import SimpleTokenizer

    tok = build_tokenizer("clip", 77)
    reference = SimpleTokenizer(context_length=77)
    fitting = [
        "a small red circle left of a blue square",
        "a" + " " * 100_000 + "dog",  # whitespace makes no token: 100k characters, 2 tokens
        "&nbsp;" * 500 + " dog",  # entities that cleaning turns into whitespace: cut, then the bound grows
        "café crème brûlée on a wooden table, 東京 at night",
        " ".join(["photograph"] * 75),  # exactly the 75 tokens the context holds
        _letters(100, 1),  # one long word that still fits
    ]
    assert sum(not c.isspace() for c in fitting[2]) > tok.max_non_space  # the bound cuts it at first
    for caption in fitting:
        want = reference.encode(caption)
        assert len(want) <= 75, caption[:40]
        enc = tok.encode(caption)
        assert enc.ids == [tok.sot, *want, tok.eot] and enc.truncated_at is None, caption[:40]


def test_sentencepiece_captions_are_cut_before_encoding_and_fitting_ones_kept(sp_model: Path, monkeypatch):
    tok = build_tokenizer(f"sentencepiece:{sp_model}", 24)
    fitting = ["A small red circle left of a blue square", "red" + " " * 50_000 + "square"]
    before = [tok.encode(c) for c in fitting]
    assert all(e.truncated_at is None for e in before)

    class CountingProcessor:  # the real processor; only the length of each text handed to it is kept
        def __init__(self, sp) -> None:
            self.sp, self.handed = sp, []

        def encode(self, text: str, **kwargs):
            self.handed.append(len(text))
            return self.sp.encode(text, **kwargs)

    counting = CountingProcessor(tok.sp)
    monkeypatch.setattr(tok, "sp", counting)
    enc = tok.encode(_letters(40_000, 2))
    assert len(enc.ids) == 24 and enc.ids[-1] == tok.eot and enc.truncated_at is not None
    assert counting.handed == [tok.max_non_space]  # cut once, to the bound, before encoding
    counting.handed.clear()
    after = [tok.encode(c) for c in fitting]
    assert counting.handed == [len(c) for c in fitting]  # whole, uncut
    assert [(e.ids, e.spans) for e in after] == [(e.ids, e.spans) for e in before]

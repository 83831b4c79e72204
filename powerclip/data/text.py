"""Tokenisation with character offsets, so parse spans (chars) become token positions.

Why offsets: annotations are stored once per caption as character spans (tokenizer-independent);
each run maps them to the token positions of *its* tokenizer. Layout follows open_clip:
``[SOT] w_1 .. w_n [EOT] 0 ...`` truncated to the context length with EOT kept last. A span
whose tokens were cut by the context length is dropped (docs/losses.md §2), never silently shortened.

Two backends:
* ``clip``: open_clip's SimpleTokenizer (CLIP BPE). Offsets come from running the tokenizer's own
  word regex over the lower-cased caption; the result is checked against ``encode`` and, if the
  text cleaning (ftfy / html unescape) changed the words, the caption keeps its tokens but loses
  its offsets (only the root phrase survives), counted by the caller.
* ``sentencepiece:/path.model``: SentencePiece with its native piece offsets, trained by
  tools/train_tokenizer.py (pad 0, bos/eos reserved); ids are permuted so that EOT is the highest
  id, because open_clip pools the text tower at argmax(token id). The text tower's vocab_size
  must equal the model's piece count.

Long captions are cut *before* tokenisation (``cut_to_bound``): BPE costs grow with the square of a
word's length, so a 40k-character caption without spaces would take tens of seconds to tokenise
before the context length cuts it. The cut keeps ``keep * longest + 1`` non-whitespace characters
(``keep`` = context length - 2, ``longest`` = the most characters one token can cover): the cut text
then has more than ``keep`` tokens, so the caption overflows the context either way and the tokens
kept come from its first characters. Whitespace makes no token and is not counted, so a caption whose
tokens fit is never cut. Should the text's normalisation (HTML entities, NFKC) shrink the cut text
until it fits after all, the bound doubles and the caption is cut again, so the result never depends
on the cut; the cost stays linear in the caption's length and bounded by the context length.
"""

from __future__ import annotations

import functools
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class Encoded:
    """Tokens of one text in open_clip layout, and the char span of every token position."""

    ids: list[int]  # length <= L, SOT ... EOT
    spans: list[tuple[int, int]] | None  # per position; SOT/EOT get (-1, -1); None: offsets unknown
    truncated_at: int | None  # char offset from which words were cut off (None: nothing cut)


_NON_SPACE = re.compile(r"\S+")


def cut_to_bound(text: str, max_non_space: int) -> str:
    """``text`` up to and including its ``max_non_space``-th non-whitespace character (all of it when
    it has no more); one linear scan."""
    seen = 0
    for m in _NON_SPACE.finditer(text):
        n = m.end() - m.start()
        if seen + n >= max_non_space:
            return text[: m.start() + max_non_space - seen]
        seen += n
    return text


class _Tokenizer(ABC):
    """What both backends share: the bounded ``encode`` in open_clip layout, and ``ids(text)`` (the
    token ids alone, for concepts and negatives), cached whole because short texts repeat across
    captions. A backend sets ``context_length``, ``sot``, ``eot``, ``max_non_space`` and implements
    ``_tokenize``."""

    context_length: int
    sot: int
    eot: int
    max_non_space: int  # the caption's bound before tokenisation (see the module doc)

    @abstractmethod
    def _tokenize(self, text: str) -> tuple[list[int], list[tuple[int, int]] | None]:
        """(ids, char span per id or None when unknown) of the whole ``text``, no SOT/EOT."""

    def encode(self, text: str) -> Encoded:
        keep = self.context_length - 2
        bound = self.max_non_space
        while True:
            bounded = cut_to_bound(text, bound)
            ids, spans = self._tokenize(bounded)
            if len(ids) > keep or len(bounded) == len(text):
                break
            bound *= 2  # normalisation shrank the cut text below the context: it was cut too early
        cut = None
        if len(ids) > keep:
            cut = spans[keep][0] if spans is not None else 0
            ids, spans = ids[:keep], (spans[:keep] if spans is not None else None)
        out_spans = None if spans is None else [(-1, -1)] + spans + [(-1, -1)]
        return Encoded([self.sot] + ids + [self.eot], out_spans, cut)

    @functools.lru_cache(maxsize=65536)  # noqa: B019 - one tokenizer per process, bounded cache
    def ids(self, text: str) -> tuple[int, ...]:
        return tuple(self.encode(text).ids)


class ClipTokenizer(_Tokenizer):
    def __init__(self, context_length: int):
        from open_clip.tokenizer import SimpleTokenizer

        self.tok = SimpleTokenizer(context_length=context_length)
        self.context_length = context_length
        self.sot, self.eot = self.tok.sot_token_id, self.tok.eot_token_id
        self.vocab_size = self.tok.vocab_size
        self._word_ids: dict[str, list[int]] = {}  # word → BPE ids (open_clip caches only the strings)
        # a token covers at most as many characters as its byte-level vocabulary entry has bytes
        longest = max(len(piece.removesuffix("</w>")) for piece in self.tok.encoder)
        self.max_non_space = (context_length - 2) * longest + 1

    @functools.lru_cache(maxsize=65536)  # noqa: B019 - one tokenizer per process, bounded cache
    def _words(self, text: str) -> tuple[tuple[int, ...], tuple[tuple[int, int], ...]] | None:
        ids: list[int] = []
        spans: list[tuple[int, int]] = []
        cache = self._word_ids
        for m in self.tok.pat.finditer(text.lower()):
            w = m.group()
            word_ids = cache.get(w)
            if word_ids is None:
                word = "".join(self.tok.byte_encoder[b] for b in w.encode("utf-8"))
                word_ids = [self.tok.encoder[piece] for piece in self.tok.bpe(word).split(" ")]
                if len(cache) < 500_000:
                    cache[w] = word_ids
            ids.extend(word_ids)
            spans.extend([m.span()] * len(word_ids))
        # open_clip cleans text (ftfy, html unescape, whitespace) before its regex; plain ASCII without
        # entities is unchanged by that, so only other text pays for the check against encode()
        if not (text.isascii() and "&" not in text) and ids != self.tok.encode(text):
            return None
        return tuple(ids), tuple(spans)

    def _tokenize(self, text: str) -> tuple[list[int], list[tuple[int, int]] | None]:
        words = self._words(text)
        if words is None:
            return self.tok.encode(text), None
        return list(words[0]), list(words[1])


class SentencePieceTokenizer(_Tokenizer):
    """SentencePiece with native char offsets, in open_clip's token layout.

    open_clip pools the text tower at ``argmax(token id)``, so EOT must be the highest id, but
    SentencePiece keeps its control symbols at the lowest ids. The ids are therefore permuted:
    the model's EOS id and the highest id swap places (a bijection, so ``decode`` inverts it).
    Padding is 0, which tools/train_tokenizer.py reserves as SentencePiece's pad id."""

    def __init__(self, path: str, context_length: int):
        import sentencepiece as spm

        if not Path(path).is_file():
            raise ValueError(f"data.tokenizer: sentencepiece model not found: {path}")
        self.sp = spm.SentencePieceProcessor(model_file=path)
        self.context_length = context_length
        self.vocab_size = self.sp.get_piece_size()
        bos, self._eos = self.sp.bos_id(), self.sp.eos_id()
        if bos < 0 or self._eos < 0 or self.sp.pad_id() != 0:
            raise ValueError(f"sentencepiece model {path} needs bos/eos ids and pad id 0; train it with "
                             "tools/train_tokenizer.py")
        self._top = self.vocab_size - 1
        self.sot, self.eot = self._map(bos), self._top
        longest = max(len(self.sp.id_to_piece(i).replace("\u2581", "")) for i in range(self.vocab_size))
        self.max_non_space = (context_length - 2) * max(1, longest) + 1

    def _map(self, i: int) -> int:
        return self._top if i == self._eos else self._eos if i == self._top else i

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode([self._map(i) for i in ids if i not in (0, self.sot, self.eot)])

    def _tokenize(self, text: str) -> tuple[list[int], list[tuple[int, int]] | None]:
        proto = self.sp.encode(text, return_type="proto")
        return [self._map(p.id) for p in proto.pieces], [(p.begin, p.end) for p in proto.pieces]


def build_tokenizer(spec: str, context_length: int) -> ClipTokenizer | SentencePieceTokenizer:
    """``clip`` or ``sentencepiece:/path/model.model`` (data.tokenizer)."""
    if spec == "clip":
        return ClipTokenizer(context_length)
    if spec.startswith("sentencepiece:"):
        return SentencePieceTokenizer(spec.split(":", 1)[1], context_length)
    raise ValueError(f"data.tokenizer={spec!r}: expected 'clip' or 'sentencepiece:/path.model'")


def to_row(enc: Encoded, length: int) -> torch.Tensor:
    row = torch.zeros(length, dtype=torch.long)
    row[: len(enc.ids)] = torch.tensor(enc.ids, dtype=torch.long)
    return row


def span_positions(enc: Encoded, start: int, end: int) -> list[int] | None:
    """Token positions whose char span overlaps [start, end); None if the span was cut or is empty."""
    if enc.spans is None:
        return None
    if enc.truncated_at is not None and end > enc.truncated_at:
        return None
    pos = [i for i, (s, e) in enumerate(enc.spans) if s >= 0 and s < end and e > start]
    return pos or None

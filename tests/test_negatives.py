"""Rule-based hard negatives, the validator, and the shard-to-shard tool on real tar files."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import webdataset as wds

from powerclip.negatives.rules import RuleGenerator, Vocabulary, load_tagger, tag_captions
from powerclip.negatives.shards import NegativesJob, iter_samples, list_shards, make_negatives
from powerclip.negatives.validate import KINDS, REASONS, Bounds, check_negative, select_negatives
from tools.make_negatives import main as cli_main

CAPTIONS = [
    "a red circle left of a blue square",
    "A man riding a brown horse on the beach.",
    "two small dogs playing with a yellow ball in the green grass",
    "a red car next to a house",
    "a large red circle",
    "a woman holding a white umbrella near a wooden bench",
]


@pytest.fixture(scope="module")
def nlp():
    return load_tagger()


@pytest.fixture(scope="module")
def tagged(nlp):
    return tag_captions(nlp, CAPTIONS)


@pytest.fixture(scope="module")
def gen(tagged):
    vocab = Vocabulary()
    for t in tagged:
        vocab.add(t)
    return RuleGenerator(vocab, seed=0)


def _one(gen: RuleGenerator, t, kind: str, key: str = "k") -> str | None:
    return gen.candidate(kind, t, gen.rng(key))


def test_swaps_and_reorder_on_a_known_caption(gen, tagged):
    t = tagged[0]  # a red circle left of a blue square
    assert _one(gen, t, "swap_nouns") == "a red square left of a blue circle"
    assert _one(gen, t, "swap_adjectives") == "a blue circle left of a red square"
    assert _one(gen, t, "reorder") == "a blue square left of a red circle"
    # capitalisation follows the position, not the word
    assert _one(gen, tagged[1], "swap_nouns", "x").startswith("A ")


def test_single_adjective_moves_to_another_phrase(gen, tagged):
    assert _one(gen, tagged[3], "swap_adjectives") == "a car next to a red house"
    # adjectives of one phrase never swap with each other (same meaning)
    assert _one(gen, tagged[4], "swap_adjectives") is None
    assert _one(gen, tagged[4], "swap_nouns") is None


def test_replacements_come_from_the_corpus_vocabulary(gen, tagged):
    corpus_words = {w.lower() for t in tagged for w in t.words}
    for key in map(str, range(20)):
        for kind, pos in (("replace_adjectives", "ADJ"), ("replace_nouns", "NOUN")):
            out = _one(gen, tagged[0], kind, key)
            old, new = tagged[0].words, out.split()
            changed = [(a, b) for a, b in zip(old, new) if a != b]
            assert len(new) == len(old) and len(changed) == 1, out
            a, b = changed[0]
            assert b in corpus_words and b not in {w.lower() for w in old}
            # same fine tag: a singular noun is replaced by a singular noun
            i = old.index(a)
            assert gen.vocab.word_class(tagged[0], i) == pos
            assert gen.vocab.majority(b) == gen.vocab.majority(a)  # same class and number


def test_rules_are_deterministic_by_seed_and_key(gen, tagged):
    a = gen.candidates("key-1", tagged[2], KINDS, per_kind=2)
    assert a == gen.candidates("key-1", tagged[2], KINDS, per_kind=2)
    other = RuleGenerator(gen.vocab, seed=1)
    outs = {tuple(other.candidates(f"key-{i}", tagged[2], KINDS, per_kind=2)) for i in range(10)}
    assert len(outs) > 1  # keys and seeds do change the random choices


def test_validator_reasons():
    b = Bounds()
    cap = "a red circle left of a blue square"
    assert check_negative(cap, "", set(), b) == "empty"
    assert check_negative(cap, "A red circle left of a blue square.", set(), b) == "same_as_caption"
    assert check_negative(cap, "circle", set(), b) == "too_short"
    assert check_negative(cap, " ".join(["word"] * 40), set(), b) == "too_long"
    assert check_negative(cap, "a blue circle left of a red square", {"a blue circle left of a red square"},
                          b) == "duplicate"
    assert check_negative(cap, "a blue circle left of a red square", set(), b) is None
    rejects: Counter = Counter()
    out = select_negatives(cap, [("reorder", cap), ("swap_nouns", None), ("bogus", "x y z"),
                                 ("swap_adjectives", "a blue circle left of a red square"),
                                 ("replace_nouns", "a blue circle left of a red square"),
                                 ("replace_adjectives", "a red circle left of a green square")], 2, b, rejects)
    assert [n["kind"] for n in out] == ["swap_adjectives", "replace_adjectives"]
    assert rejects == Counter(same_as_caption=1, not_applicable=1, unknown_kind=1, duplicate=1)


# ---------------------------------------------------------------------------- the shard tool
def _write_shards(root: Path) -> dict[str, dict]:
    """Two shards; sample 0 has no json (txt only), sample 1 has old negatives, one has no caption."""
    root.mkdir(parents=True)
    members: dict[str, dict] = {}
    for s in range(2):
        with wds.TarWriter(str(root / f"{s:05d}.tar"), encoder=False) as w:
            for i, cap in enumerate(CAPTIONS):
                key = f"s{s}_{i:04d}"
                sample = {"__key__": key, "png": f"not really a png {key}".encode(), "txt": cap.encode(),
                          "extra.bin": bytes(range(7))}
                if i != 0:
                    ann = {"schema": 1, "caption": cap, "label": i}
                    if i == 1:
                        ann["negatives"] = [{"kind": "reorder", "text": "stale"}]
                    sample["json"] = json.dumps(ann).encode()
                w.write(sample)
                members[key] = sample
            w.write({"__key__": f"s{s}_nocap", "png": b"x"})
    (root / "sizes.json").write_text(json.dumps({"00000.tar": 7, "00001.tar": 7}))
    return members


def _read(out: Path) -> dict[str, dict]:
    return {s["__key__"]: s for p in sorted(out.glob("*.tar")) for s in iter_samples(p)}


def test_shard_tool_rules_backend(tmp_path):
    members = _write_shards(tmp_path / "in")
    out = tmp_path / "out"
    assert cli_main(["--input", str(tmp_path / "in"), "--output", str(out), "-k", "4", "--seed", "3"]) == 0
    got = _read(out)
    assert set(got) == set(members) | {"s0_nocap", "s1_nocap"}
    assert json.loads((out / "sizes.json").read_text()) == {"00000.tar": 7, "00001.tar": 7}
    for key, src in members.items():
        dst = got[key]
        for m in ("png", "txt", "extra.bin"):  # copied untouched
            assert dst[m] == src[m], (key, m)
        ann = json.loads(dst["json"])
        cap = ann["caption"]
        negs = ann["negatives"]
        assert 1 <= len(negs) <= 4 and all(n["kind"] in KINDS for n in negs)
        assert all(n["text"] != cap and n["text"] != "stale" for n in negs)
        assert len({n["text"].lower() for n in negs}) == len(negs)
        if "json" in src:  # other annotation fields survive
            assert ann["label"] == json.loads(src["json"])["label"]
        if cap.startswith("a red circle left"):
            assert len(negs) == 4
    assert "json" not in got["s0_nocap"]
    report = json.loads((out / "negatives_report.json").read_text())
    assert set(report["rejects"]) == set(REASONS)
    assert report["counters"]["json_created"] == 2 and report["counters"]["replaced_existing"] == 2
    assert report["counters"]["no_caption"] == 2
    assert sum(report["per_kind"].values()) == report["negatives_written"] > 0
    assert all(report["per_kind"][k] > 0 for k in KINDS)  # every kind occurs in this corpus
    assert not list(out.glob("*.tmp"))

    # deterministic by seed: a rerun writes the same negatives, another seed does not
    again = tmp_path / "again"
    make_negatives(list_shards(str(tmp_path / "in")), again, NegativesJob(k=4, seed=3))
    assert {k: s.get("json") for k, s in _read(again).items()} == {k: s.get("json") for k, s in got.items()}
    other = tmp_path / "other"
    make_negatives(list_shards(str(tmp_path / "in")), other, NegativesJob(k=4, seed=4))
    assert {k: s.get("json") for k, s in _read(other).items()} != {k: s.get("json") for k, s in got.items()}


def test_partial_vocabularies_merge_to_the_one_pass_vocabulary(tagged):
    """Counted in pieces (any split, any order) and merged through JSON, the vocabulary is the one
    counted in one pass: same counts, same majority tags, same frequency-weighted draws."""
    import random

    one = Vocabulary()
    for t in tagged:
        one.add(t)
    pieces = []
    for part in (tagged[:1], tagged[1:4], tagged[4:]):
        v = Vocabulary()
        for t in part:
            v.add(t)
        pieces.append(json.loads(json.dumps(v.counts())))
    for order in (pieces, pieces[::-1]):
        merged = Vocabulary()
        for c in order:
            merged.merge(c)
        assert merged.counts() == one.counts()
        assert merged.size() == one.size()
        for tag, slot in (("NN", 0), ("JJ", 1), ("NNS", None)):
            assert [merged.draw(tag, set(), random.Random(i), slot) for i in range(20)] == \
                [one.draw(tag, set(), random.Random(i), slot) for i in range(20)]
    assert one.counts()["slots"] and one.counts()["tags"]["red"] == {"JJ": 3}


def test_shard_tool_resumes_and_workers_write_the_same_bytes(tmp_path):
    _write_shards(tmp_path / "in")
    shards = list_shards(str(tmp_path / "in"))
    one, two = tmp_path / "one", tmp_path / "two"
    ref = make_negatives(shards, one, NegativesJob(k=4, seed=3))
    make_negatives(shards, two, NegativesJob(k=4, seed=3), workers=2)
    names = [p.name for p in shards]
    assert all((one / n).read_bytes() == (two / n).read_bytes() for n in names)
    # the merged per-shard vocabularies are the vocabulary of all captions counted in one pass
    from powerclip.negatives.shards import _read_captions

    rows = [r for p in shards for r in _read_captions(p)]
    whole = Vocabulary()
    for t in tag_captions(load_tagger(), [c or "" for _, c, _ in rows], [con for _, _, con in rows]):
        whole.add(t)
    assert json.loads((two / "_negatives" / "vocabulary.json").read_text())["counts"] == whole.counts()
    # a finished shard is skipped; one without its record, or cut short, is written again
    (two / "_negatives" / "done" / "00000.tar.json").unlink()
    stamp = (two / "00001.tar").stat().st_mtime_ns
    again = make_negatives(shards, two, NegativesJob(k=4, seed=3))
    assert again["resumed_shards"] == 1 and (two / "00001.tar").stat().st_mtime_ns == stamp
    with open(two / "00001.tar", "r+b") as f:
        f.truncate(512)
    assert make_negatives(shards, two, NegativesJob(k=4, seed=3))["resumed_shards"] == 1
    assert all((one / n).read_bytes() == (two / n).read_bytes() for n in names)
    report = json.loads((two / "negatives_report.json").read_text())
    assert report["per_kind"] == ref["per_kind"] and report["missing_shards"] == []
    # other settings, or another shard set (another vocabulary), are refused, not mixed in
    with pytest.raises(ValueError, match="seed"):
        make_negatives(shards, two, NegativesJob(k=4, seed=4))
    with pytest.raises(ValueError, match="shards"):
        make_negatives(shards[:1], two, NegativesJob(k=4, seed=3))


def test_write_phase_refuses_a_corpus_not_fully_counted(tmp_path):
    """What a job array's writing task meets when a counting task failed: a clear error, nothing
    written from part of the vocabulary, and the summary names the missing shards."""
    from powerclip.negatives.shards import prepare_output, run_phase, summarize

    _write_shards(tmp_path / "in")
    shards = list_shards(str(tmp_path / "in"))
    job = NegativesJob(k=4, seed=3)
    out = prepare_output(shards, tmp_path / "out", job)
    assert run_phase("count", shards[:1], out, job) == 0
    with pytest.raises(RuntimeError, match=r"1 of 2 shards have no partial vocabulary .*00001\.tar"):
        run_phase("write", shards[:1], out, job)
    assert not list(out.glob("*.tar")) and not (out / "_negatives" / "vocabulary.json").exists()
    report = summarize(out)
    assert report["missing_shards"] == ["00000.tar", "00001.tar"] and report["num_shards"] == 0
    assert run_phase("count", shards, out, job) == 1  # the counted shard is not counted again


def test_shard_tool_refuses_bad_input(tmp_path, capsys):
    _write_shards(tmp_path / "in")
    assert cli_main(["--input", str(tmp_path / "in"), "--output", str(tmp_path / "in")]) == 1
    assert "input folder" in capsys.readouterr().err
    assert cli_main(["--input", str(tmp_path / "nothing"), "--output", str(tmp_path / "o")]) == 1
    assert cli_main(["--input", str(tmp_path / "in"), "--output", str(tmp_path / "o"), "--kinds", "bogus"]) == 1
    assert cli_main(["--input", str(tmp_path / "in"), "--output", str(tmp_path / "o"), "--backend", "llm"]) == 2


def _manual(text: str, tags: str, chunks: list[tuple[int, int]]):
    """A Tagged built by hand (tags chosen to mimic tagger mistakes), no spaCy involved."""
    from powerclip.negatives.rules import Tagged

    words, fine = text.split(), tags.split()
    coarse = ["NOUN" if t.startswith("NN") else "ADJ" if t.startswith("JJ") else "X" for t in fine]
    return Tagged(words, [" "] * (len(words) - 1) + [""], coarse, fine, chunks)


def test_corpus_vote_fixes_tagger_mistakes_and_relations_stay_out():
    corpus = [_manual("a small orange circle", "DT JJ JJ NN", [(0, 4)]) for _ in range(3)]
    # the tagger calls "orange" a noun here, and "right" (a relation word) a noun
    odd = _manual("a large orange diamond right of a red cross", "DT JJ NN NN NN IN DT JJ NN", [(0, 4), (6, 9)])
    vocab = Vocabulary()
    for t in corpus + [odd]:
        vocab.add(t)
    gen = RuleGenerator(vocab, seed=0)
    assert vocab.word_class(odd, 2) == "ADJ"  # 3 x JJ beat 1 x NN
    assert 4 not in odd.candidates()  # "right" is outside every noun phrase
    assert [odd.words[i] for i in gen.nouns(odd)] == ["diamond", "cross"]
    for key in map(str, range(10)):
        assert _one(gen, odd, "swap_nouns", key) == "a large orange cross right of a red diamond"


def test_adjective_swaps_never_repeat_a_word_in_a_phrase():
    t = _manual("a large red circle below a large orange diamond", "DT JJ JJ NN IN DT JJ JJ NN", [(0, 4), (5, 9)])
    vocab = Vocabulary()
    vocab.add(t)
    gen = RuleGenerator(vocab, seed=0)
    for key in map(str, range(10)):
        assert _one(gen, t, "swap_adjectives", key) == "a large orange circle below a large red diamond"


def test_adjectives_of_the_same_slot_are_preferred():
    # size words sit two before the noun, colours one: swaps and replacements keep the category
    corpus = [_manual("a small red triangle above a white square", "DT JJ JJ NN IN DT JJ NN", [(0, 4), (5, 8)]),
              _manual("a large blue circle", "DT JJ JJ NN", [(0, 4)])]
    vocab = Vocabulary()
    for t in corpus:
        vocab.add(t)
    gen = RuleGenerator(vocab, seed=0)
    t = corpus[0]
    assert (t.slot(1), t.slot(2), t.slot(6)) == (2, 1, 1)
    for key in map(str, range(10)):
        assert _one(gen, t, "swap_adjectives", key) == "a small white triangle above a red square"
        out = _one(gen, t, "replace_adjectives", key).split()
        if out[1] != "small":
            assert out[1] == "large"  # a size replaces a size
        else:
            assert out[2] == "blue" or out[6] == "blue"  # a colour replaces a colour


def _outputs(out: Path) -> tuple[dict[str, bytes], dict]:
    report = json.loads((out / "negatives_report.json").read_text())
    for k in ("resumed_shards", "elapsed_s"):
        report.pop(k)
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))}, report


@pytest.mark.parametrize("record,damage", [
    ("done/00000.tar.json", b'{"shard": "00000.tar", "count": 7, "by'),  # truncated: the shard is rewritten
    ("done/00000.tar.json", b'{"shard": "00000.tar", "count": 7}'),  # wrong shape
    ("vocab/00000.tar.json", b'{"shard": "00000.tar", "samples": 7, "counts": {"tags": []}}'),  # counted again
    ("tagged/00001.tar.json.gz", b"\x1f\x8b\x08\x00cut"),  # a cut gzip: counted again
    ("vocabulary.json", b'{"shards": 2, "counts": {"tags": {"red": {"JJ": "3"}}, "slots": {}}}'),  # merged again
])
def test_a_damaged_cache_record_is_redone_and_the_output_is_unchanged(tmp_path, caplog, record, damage):
    _write_shards(tmp_path / "in")
    shards = list_shards(str(tmp_path / "in"))
    make_negatives(shards, tmp_path / "clean", NegativesJob(k=4, seed=3))
    clean = _outputs(tmp_path / "clean")
    out = tmp_path / "out"
    make_negatives(shards, out, NegativesJob(k=4, seed=3))
    path = out / "_negatives" / record
    path.write_bytes(damage)
    with caplog.at_level("WARNING", logger="powerclip.data.records"):
        report = make_negatives(shards, out, NegativesJob(k=4, seed=3))
    assert [r.getMessage().split(":")[0] for r in caplog.records] == [str(path)]  # one line, naming it
    assert report["resumed_shards"] == (1 if record.startswith("done/") else 2)
    assert _outputs(out) == clean
    assert path.read_bytes() != damage


def test_tags_damaged_after_counting_are_made_again_by_the_writer(tmp_path, caplog):
    """A job array's writing task meeting a shard whose tags broke after the counting tasks ran."""
    from powerclip.negatives.shards import prepare_output, run_phase, summarize, write_report

    _write_shards(tmp_path / "in")
    shards = list_shards(str(tmp_path / "in"))
    job = NegativesJob(k=4, seed=3)
    make_negatives(shards, tmp_path / "clean", job)
    out = prepare_output(shards, tmp_path / "out", job)
    run_phase("count", shards, out, job)
    tags = out / "_negatives" / "tagged" / "00000.tar.json.gz"
    tags.write_bytes(tags.read_bytes()[:20])
    with caplog.at_level("WARNING", logger="powerclip.data.records"):
        assert run_phase("write", shards, out, job) == 0
    assert [r.getMessage().split(":")[0] for r in caplog.records] == [str(tags)]
    report = summarize(out)
    write_report(out, {**report, "resumed_shards": 0, "elapsed_s": 0})
    assert _outputs(out) == _outputs(tmp_path / "clean")


@pytest.mark.parametrize("damage", [b'{"backend": "rul', b'{"backend": "rules", "k": "4"}', b"[1, 2]"])
def test_damaged_settings_are_refused_in_one_line(tmp_path, capsys, damage):
    _write_shards(tmp_path / "in")
    out = tmp_path / "out"
    args = ["--input", str(tmp_path / "in"), "--output", str(out), "-k", "4", "--seed", "3"]
    assert cli_main(args) == 0
    settings = out / "_negatives" / "settings.json"
    settings.write_bytes(damage)
    capsys.readouterr()
    assert cli_main(args) == 1
    captured = capsys.readouterr()
    errors = [x for x in captured.err.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in captured.err
    assert str(settings) in errors[0] and "is damaged" in errors[0] and "restore it, or delete it" in errors[0]
    settings.unlink()  # the fix the line names: the rerun resumes every shard
    assert cli_main(args) == 0
    assert "(2 already done)" in capsys.readouterr().out


def test_a_repeated_key_is_counted_and_skipped_never_merged(tmp_path, caplog):
    src = tmp_path / "in"
    src.mkdir()
    keys = ["a", "b", "b", "c", "a", "d"]  # "b" again right after itself, "a" again further on
    samples = [{"__key__": k, "png": f"image {i}".encode(), "txt": CAPTIONS[i].encode()} for i, k in enumerate(keys)]
    with wds.TarWriter(str(src / "00000.tar"), encoder=False) as w:
        for s in samples:
            w.write(s)
    out = tmp_path / "out"
    with caplog.at_level("WARNING", logger="powerclip.negatives.shards"):
        report = make_negatives(list_shards(str(src)), out, NegativesJob(k=4, seed=3))
    got = {s["__key__"]: s for s in iter_samples(out / "00000.tar")}
    assert list(got) == ["a", "b", "c", "d"]
    for i in (0, 1, 3, 5):  # each key keeps its first sample, whole
        assert got[keys[i]]["png"] == samples[i]["png"] and got[keys[i]]["txt"] == samples[i]["txt"]
        assert json.loads(got[keys[i]]["json"])["caption"] == CAPTIONS[i]
    assert report["counters"]["duplicate_key"] == 2 and report["samples"] == 4
    assert json.loads((out / "negatives_report.json").read_text())["counters"]["duplicate_key"] == 2
    logged = [r.getMessage() for r in caplog.records if "duplicate_key" in r.getMessage()]
    assert logged == [f"{src / '00000.tar'}: 2 samples skipped: duplicate_key (a key repeated in the shard; "
                      "the first sample with it is kept)"]

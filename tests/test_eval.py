"""powerclip.eval: loaders of every published format, scores against brute force, metrics against
reference formulas, clear errors, and 2 gloo ranks against 1."""

from __future__ import annotations

import json
import math
import random
import shutil

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.metrics import balanced_accuracy_score

from powerclip.eval import compositional as comp
from powerclip.eval import evaluate
from powerclip.eval.metrics import (
    pair_assignment,
    retrieval_metrics,
    retrieval_ranks,
    selection_correct,
    winoground_scores,
    winoground_terms,
    zero_shot_metrics,
)
from powerclip.eval_io.model_io import load_model
from tests.dist_helpers import run_on_ranks
from tests.test_eval_support import (
    make_export,
    write_aro_coco_order,
    write_aro_vg,
    write_folder_dataset,
    write_sugarcrepe,
    write_synthetic,
    write_valse,
    write_wds_classification,
    write_wds_retrieval,
    write_winoground,
)


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    return load_model(make_export(tmp_path_factory.mktemp("export") / "m", seed=1))


# ------------------------------------------------------------------------------ brute force
@torch.no_grad()
def _img(loaded, path, crop=None):
    im = (path if isinstance(path, Image.Image) else Image.open(path)).convert("RGB")
    if crop is not None:
        im = im.crop(crop)
    return F.normalize(loaded.model.encode_image(loaded.preprocess(im)[None]), dim=-1)[0]


@torch.no_grad()
def _txt(loaded, text):
    return F.normalize(loaded.model.encode_text(loaded.tokenizer([text])), dim=-1)[0]


def _brute_select(loaded, image_path, captions, correct, crop=None, ties="first") -> bool:
    i = _img(loaded, image_path, crop)
    scores = [float(i @ _txt(loaded, c)) for c in captions]
    if ties == "strict":  # SugarCrepe / VALSE: caption score > every negative's
        return all(scores[correct] > v for k, v in enumerate(scores) if k != correct)
    return max(range(len(scores)), key=lambda k: (scores[k], -k)) == correct


# ---------------------------------------------------------------------------------- metrics
def test_zero_shot_metrics_match_reference_formulas():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(200, 7, generator=g)
    targets = torch.randint(0, 7, (200,), generator=g)
    m = zero_shot_metrics(logits, targets)
    top5 = logits.argsort(dim=1, descending=True)[:, :5]
    assert m["acc1"] == pytest.approx((logits.argmax(1) == targets).double().mean().item())
    assert m["acc5"] == pytest.approx(sum(int(t in row) for t, row in zip(targets.tolist(), top5.tolist())) / 200)
    assert m["mean_per_class_recall"] == pytest.approx(balanced_accuracy_score(targets, logits.argmax(1)))
    assert math.isnan(zero_shot_metrics(logits[:, :3], targets.clamp(max=2))["acc5"])  # < 5 classes


def test_retrieval_metrics_match_brute_force():
    g = torch.Generator().manual_seed(1)
    img = F.normalize(torch.randn(23, 8, generator=g), dim=-1)
    owner = torch.tensor([i // 3 for i in range(23 * 3)][:60])  # 3 captions per image, some images fewer
    owner = owner[owner < 23]
    txt = F.normalize(img[owner] + 0.9 * torch.randn(len(owner), 8, generator=g), dim=-1)
    m = retrieval_metrics(img, txt, owner, ks=(1, 5, 10), chunk=7)
    s = txt @ img.T
    for k in (1, 5, 10):
        i2 = sum(int(owner[j] in s[j].argsort(descending=True)[:k].tolist()) for j in range(len(owner)))
        has_caption = [i for i in range(23) if (owner == i).any()]
        t2 = sum(int(any(owner[t] == i for t in s[:, i].argsort(descending=True)[:k].tolist())) for i in range(23))
        assert m[f"image_retrieval_recall@{k}"] == pytest.approx(i2 / len(owner))
        assert m[f"text_retrieval_recall@{k}"] == pytest.approx(t2 / 23)
        assert len(has_caption) == 20  # images without captions count as misses, as in clip_benchmark


def test_winoground_scores_follow_the_paper():
    s = torch.tensor([[0.9, 0.1], [0.2, 0.8]])  # caption x image
    assert winoground_scores(s) == (True, True, True)
    s = torch.tensor([[0.5, 0.6], [0.1, 0.9]])  # caption 0 prefers image 1, each image its caption
    assert winoground_scores(s) == (True, False, False)
    s = torch.tensor([[0.5, 0.1], [0.6, 0.8]])  # image 0 prefers caption 1
    assert winoground_scores(s) == (False, True, False)


def test_winoground_scores_are_the_binding_term_against_each_prior():
    """Text score <=> B > |Pc|, image score <=> B > |Pi| (metrics.winoground_terms), on random
    score matrices and on ties."""
    g = torch.Generator().manual_seed(0)
    for s in [*torch.randn(2000, 2, 2, generator=g, dtype=torch.float64), torch.ones(2, 2, dtype=torch.float64),
              torch.tensor([[0.5, 0.5], [0.1, 0.9]], dtype=torch.float64)]:
        b, pc, pi = winoground_terms(s)
        text, image, _ = winoground_scores(s)
        assert text == (b > abs(pc)) and image == (b > abs(pi))
    # a caption prior alone (caption 0 scores higher on both images) has no binding term and no text point
    b, pc, pi = winoground_terms(torch.tensor([[0.9, 0.8], [0.3, 0.2]]))
    assert b == pytest.approx(0.0) and pc == pytest.approx(1.2) and pi == pytest.approx(0.2)
    assert winoground_scores(torch.tensor([[0.9, 0.8], [0.3, 0.2]]))[0] is False


def test_pair_assignment_is_the_sign_of_the_binding_term_whatever_the_priors():
    """1 when the matched pairs outscore the crossed ones, 0 when less, 0.5 on a tie; adding a caption
    or an image prior (a constant per row or per column) never changes it; a text point implies it."""
    assert pair_assignment(torch.tensor([[0.9, 0.1], [0.2, 0.8]])) == 1.0
    assert pair_assignment(torch.tensor([[0.1, 0.9], [0.8, 0.2]])) == 0.0
    assert pair_assignment(torch.tensor([[0.9, 0.8], [0.3, 0.2]])) == 0.5  # a caption prior alone
    g = torch.Generator().manual_seed(0)
    for s in torch.randn(500, 2, 2, generator=g, dtype=torch.float64):
        prior = torch.randn(2, 1, generator=g, dtype=torch.float64) + torch.randn(1, 2, generator=g, dtype=torch.float64)
        assert pair_assignment(s) == pair_assignment(s + prior)
        text, image, _ = winoground_scores(s)
        if text or image:
            assert pair_assignment(s) == 1.0


def test_retrieval_ranks_match_brute_force():
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(12, 8, generator=g), dim=-1)
    txt = F.normalize(torch.randn(20, 8, generator=g), dim=-1)
    owner = torch.randint(0, 12, (20,), generator=g)
    caption_rank, image_rank = retrieval_ranks(img, txt, owner, kmax=5)
    for j in range(20):
        order = sorted(range(12), key=lambda i: -float(txt[j] @ img[i]))
        assert caption_rank[j] == min(order.index(int(owner[j])), 5)
    for i in range(12):
        order = sorted(range(20), key=lambda j: -float(img[i] @ txt[j]))
        mine = [r for r, j in enumerate(order) if int(owner[j]) == i]
        assert image_rank[i] == min(mine[0] if mine else 5, 5)


# --------------------------------------------------------------------------- zero-shot / wds
def test_folder_and_wds_zero_shot_match_brute_force(loaded, tmp_path):
    root = write_folder_dataset(tmp_path / "folder", per_class=3)
    res = evaluate(loaded.model, loaded.preprocess, loaded.tokenizer, "zeroshot_classification", root,
                   batch_size=4)
    assert list(res) == ["folder"] and res["folder"]["task"] == "zeroshot_classification"
    classes = ["blue thing", "green thing", "red thing"]  # sorted folder names, _ -> space
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    with torch.no_grad():
        w = torch.stack([F.normalize(F.normalize(loaded.model.encode_text(
            loaded.tokenizer([t(c) for t in OPENAI_IMAGENET_TEMPLATES])), dim=-1).mean(0), dim=0) for c in classes])
    correct = 0
    for label, d in enumerate(["blue_thing", "green_thing", "red_thing"]):
        for f in sorted((root / d).iterdir()):
            correct += int((_img(loaded, f) @ w.T).argmax()) == label
    assert res["folder"]["metrics"]["acc1"] == pytest.approx(correct / 9)


def test_wds_retrieval_task_check(loaded, tmp_path):
    ret = write_wds_retrieval(tmp_path / "ret", n=5)
    with pytest.raises(ValueError, match="not a classification set"):
        evaluate(loaded.model, loaded.preprocess, loaded.tokenizer, "zeroshot_classification", ret)
    res = evaluate(loaded.model, loaded.preprocess, loaded.tokenizer, "wds", ret, recall_k=(1, 2))
    assert set(res["wds/ret"]["metrics"]) == {"image_retrieval_recall@1", "text_retrieval_recall@1",
                                              "image_retrieval_recall@2", "text_retrieval_recall@2"}


# ----------------------------------------------------------------------------- compositional
def test_sugarcrepe_loader_and_scores(loaded, tmp_path):
    root = write_sugarcrepe(tmp_path / "sc", tasks=("swap_att", "replace_rel"), n=6)
    sets = comp.load_sugarcrepe(root)
    assert [s.name for s in sets] == ["sugar_crepe/replace_rel", "sugar_crepe/swap_att"]
    assert len(sets[1].images) == 4 and len(sets[1].cases) == 6  # 6 cases over 4 distinct images
    res = evaluate(loaded.model, loaded.preprocess, loaded.tokenizer, "sugar_crepe", root, batch_size=3)
    for name in ("swap_att", "replace_rel"):
        ann = json.loads((root / f"{name}.json").read_text())
        brute = [_brute_select(loaded, root / "val2017" / e["filename"], [e["caption"], e["negative_caption"]], 0,
                               ties="strict") for e in ann.values()]
        assert res[f"sugar_crepe/{name}"]["metrics"]["acc"] == pytest.approx(sum(brute) / len(brute))
    one = evaluate(loaded.model, loaded.preprocess, loaded.tokenizer, "sugar_crepe/swap_att", root)
    assert list(one) == ["sugar_crepe/swap_att"]


def test_selection_ties_follow_each_benchmark_rule():
    img = torch.tensor([1.0, 0.0])
    tied = torch.tensor([[0.6, 0.8], [0.6, 0.8]])  # two captions with the same score
    assert not selection_correct(img, tied, 0)  # SugarCrepe/VALSE: a tie is wrong
    assert not selection_correct(img, tied, 1)
    assert selection_correct(img, tied, 0, ties="first")  # ARO: numpy argmax, the first wins
    assert not selection_correct(img, tied, 1, ties="first")
    assert selection_correct(img, torch.tensor([[0.7, 0.7], [0.6, 0.8]]), 0)
    with pytest.raises(ValueError, match="ties"):
        selection_correct(img, tied, 0, ties="random")


def test_identical_caption_and_negative_count_as_wrong(loaded, tmp_path):
    # the same string must get the same embedding (encoded once) and the tie must count as wrong,
    # whatever the case order; a per-batch encoding could differ in the last bit and flip a coin
    root = write_sugarcrepe(tmp_path / "sc", tasks=("swap_att",), n=4)
    ann = json.loads((root / "swap_att.json").read_text())
    for e in ann.values():
        e["negative_caption"] = e["caption"]
    (root / "swap_att.json").write_text(json.dumps(ann))
    res = evaluate(loaded.model, loaded.preprocess, loaded.tokenizer, "sugar_crepe", root, batch_size=3,
                   text_batch_size=3)
    assert res["sugar_crepe/swap_att"]["metrics"]["acc"] == 0.0
    valse = write_valse(tmp_path / "valse", n=6)
    ann = json.loads((valse / "existence.json").read_text())
    for e in ann.values():
        e["foil"] = e["caption"]
    (valse / "existence.json").write_text(json.dumps(ann))
    res = evaluate(loaded.model, loaded.preprocess, loaded.tokenizer, "valse", valse)
    assert res["valse/existence"]["metrics"]["acc"] == 0.0
    (aro_set,) = comp.load_aro(write_aro_vg(tmp_path / "aro", n=3), ["vg_relation"])
    assert aro_set.ties == "first"


def test_aro_vg_crops_and_macro(loaded, tmp_path):
    root = write_aro_vg(tmp_path / "aro", n=6)
    res = evaluate(loaded.model, loaded.preprocess, loaded.tokenizer, "aro", root)
    assert set(res) == {"aro/vg_relation", "aro/vg_attribution"}
    items = json.loads((root / "visual_genome_relation.json").read_text())
    brute, by_rel = [], {}
    for it in items:
        crop = (it["bbox_x"], it["bbox_y"], it["bbox_x"] + it["bbox_w"], it["bbox_y"] + it["bbox_h"])
        ok = _brute_select(loaded, root / "images" / it["image_path"], [it["false_caption"], it["true_caption"]],
                           1, crop)
        brute.append(ok)
        by_rel.setdefault(it["relation_name"], []).append(ok)
    m = res["aro/vg_relation"]["metrics"]
    assert m["acc"] == pytest.approx(sum(brute) / len(brute))
    # "on", "wearing", "holding" are not in ARO's symmetric list: macro = mean of per-relation accuracy
    assert m["macro_acc"] == pytest.approx(sum(sum(v) / len(v) for v in by_rel.values()) / len(by_rel))
    assert math.isnan(res["aro/vg_attribution"]["metrics"]["macro_acc"])  # no attribute pair has >= 25 cases
    assert comp.macro_accuracy("vg_relation", ["on", "by", "by"], [True, False, False]) == 1.0  # "by" dropped


def test_aro_order_perturbations_and_scores(loaded, tmp_path):
    root = write_aro_coco_order(tmp_path / "coco", n=3)
    sets = comp.load_aro(root, ["coco_order"], seed=0)
    (s,) = sets
    assert s.name == "aro/coco_order" and len(s.cases) == 6 and len(s.images) == 3
    for case in s.cases:
        assert len(case.captions) == 5 and case.correct == 0
        words = sorted(case.captions[0].split())
        assert case.captions[0] == comp.pre_caption(case.captions[0], 30)
        assert case.captions[0].islower() and "." not in case.captions[0]
        assert all(sorted(c.split()) == words for c in case.captions[1:])  # same words, other order
    again = comp.load_aro(root, ["coco_order"], seed=0)[0]
    assert [c.captions for c in again.cases] == [c.captions for c in s.cases]  # seeded
    res = evaluate(loaded.model, loaded.preprocess, loaded.tokenizer, "aro/coco_order", root)
    brute = [_brute_select(loaded, s.images[c.image].path, c.captions, 0) for c in s.cases]
    assert res["aro/coco_order"]["metrics"]["acc"] == pytest.approx(sum(brute) / len(brute))


def test_order_perturbations_shuffle_the_right_words():
    rng = random.Random(3)
    tokens = ["a", "red", "dog", "on", "green", "grass", "near", "a", "tree"]
    tags = ["DT", "JJ", "NN", "IN", "JJ", "NN", "IN", "DT", "NN"]
    a, b, c, d = (p.split() for p in comp.order_perturbations(tokens, tags, rng))
    for i, t in enumerate(tags):
        if t in ("DT", "IN"):
            assert a[i] == tokens[i]  # nouns/adjectives shuffled among themselves only
        else:
            assert b[i] == tokens[i]  # everything but nouns/adjectives shuffled
    assert all(sorted(c[i:i + 3]) == sorted(tokens[i:i + 3]) for i in range(0, 9, 3))  # within trigrams
    assert sorted(tuple(d[i:i + 3]) for i in range(0, 9, 3)) == sorted(tuple(tokens[i:i + 3]) for i in range(0, 9, 3))


def test_valse_filters_unvalidated_foils(loaded, tmp_path):
    root = write_valse(tmp_path / "valse", n=6)
    (s,) = comp.load_valse(root)
    assert s.name == "valse/existence" and len(s.cases) == 4  # mturk.caption >= 2 only
    assert len(comp.load_valse(root, all_valse=True)[0].cases) == 6
    res = evaluate(loaded.model, loaded.preprocess, loaded.tokenizer, "valse", root)
    ann = json.loads((root / "existence.json").read_text())
    brute = [_brute_select(loaded, root / "images" / e["dataset"] / e["image_file"], [e["caption"], e["foil"]], 0,
                           ties="strict") for e in ann.values() if e["mturk"]["caption"] >= 2]
    assert res["valse/existence"]["metrics"]["acc"] == pytest.approx(sum(brute) / len(brute))


def test_winoground_scores_match_brute_force(loaded, tmp_path):
    root = write_winoground(tmp_path / "wino", n=4)
    res = evaluate(loaded.model, loaded.preprocess, loaded.tokenizer, "winoground", root)["winoground"]
    rows = [json.loads(line) for line in (root / "examples.jsonl").read_text().splitlines()]
    t = i = g = 0
    tc = ic = bt = cp = ip = 0.0
    for r in rows:
        ims = [_img(loaded, root / "images" / f"{r[f'image_{k}']}.png") for k in (0, 1)]
        cs = [_txt(loaded, r[f"caption_{k}"]) for k in (0, 1)]
        s = [[float(cs[a] @ ims[b]) for b in (0, 1)] for a in (0, 1)]
        text = s[0][0] > s[1][0] and s[1][1] > s[0][1]
        image = s[0][0] > s[0][1] and s[1][1] > s[1][0]
        t, i, g = t + text, i + image, g + (text and image)
        tc, ic = tc + float(cs[0] @ cs[1]), ic + float(ims[0] @ ims[1])
        bt += s[0][0] + s[1][1] - s[0][1] - s[1][0]
        cp += abs(s[0][0] + s[0][1] - s[1][0] - s[1][1])
        ip += abs(s[0][0] + s[1][0] - s[0][1] - s[1][1])
    # clip_benchmark's names: text_acc = text score, image_acc = image score, acc = group score
    assert res["metrics"]["caption_pair_cos"] == pytest.approx(tc / 4, abs=1e-6)
    assert res["metrics"]["image_pair_cos"] == pytest.approx(ic / 4, abs=1e-6)
    assert res["metrics"]["binding_term"] == pytest.approx(bt / 4, abs=1e-6)
    assert res["metrics"]["caption_prior"] == pytest.approx(cp / 4, abs=1e-6)
    assert res["metrics"]["image_prior"] == pytest.approx(ip / 4, abs=1e-6)
    assert res["metrics"]["text_acc"] == pytest.approx(t / 4)
    assert res["metrics"]["image_acc"] == pytest.approx(i / 4)
    assert res["metrics"]["acc"] == pytest.approx(g / 4)
    assert res["task"] == "image_caption_selection"


def test_winoground_hub_parquet_layout_gives_the_same_scores(loaded, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = write_winoground(tmp_path / "wino", n=4)
    want = evaluate(loaded.model, loaded.preprocess, loaded.tokenizer, "winoground", root)["winoground"]
    rows = [json.loads(line) for line in (root / "examples.jsonl").read_text().splitlines()]
    # the hub's layout: data/test-*.parquet, images inline as {"bytes", "path"} (datasets' Image feature)
    hub = tmp_path / "hub"
    (hub / "data").mkdir(parents=True)
    table = pa.Table.from_pylist([
        {"id": r["id"], "caption_0": r["caption_0"], "caption_1": r["caption_1"], "tag": r["tag"],
         **{f"image_{k}": {"bytes": (root / "images" / f"{r[f'image_{k}']}.png").read_bytes(), "path": None}
            for k in (0, 1)}} for r in rows])
    pq.write_table(table, hub / "data" / "test-00000-of-00001.parquet")
    got = evaluate(loaded.model, loaded.preprocess, loaded.tokenizer, "winoground", hub)["winoground"]
    assert got["metrics"] == want["metrics"] and got["metrics"]["n"] == 4.0
    assert len(comp.load_winoground(hub).images) == 8
    broken = tmp_path / "broken"
    (broken / "data").mkdir(parents=True)
    pq.write_table(table.set_column(table.schema.get_field_index("image_1"), "image_1",
                                    pa.array([{"bytes": None, "path": "x.png"}] * 4)),
                   broken / "data" / "test.parquet")
    with pytest.raises(ValueError, match="row 0: image_1 holds no image bytes"):
        comp.load_winoground(broken)


def test_synthetic_benchmark(loaded, tmp_path):
    root = write_synthetic(tmp_path / "syn", n=10)
    res = evaluate(loaded.model, loaded.preprocess, loaded.tokenizer, "synthetic", root, batch_size=4)
    assert set(res) == {"synthetic", "synthetic/retrieval", "synthetic/swap-att", "synthetic/replace-rel",
                        "synthetic/add-obj"}
    assert res["synthetic/add-obj"]["metrics"]["n"] == 5 and res["synthetic/swap-att"]["metrics"]["n"] == 10
    assert res["synthetic"]["task"] == "zeroshot_classification"
    assert res["synthetic/retrieval"]["task"] == "zeroshot_retrieval"


def test_synthetic_benchmark_on_make_synthetic_output(loaded, synthetic_root):
    """The real tools/make_synthetic output (session fixture) goes through every synthetic evaluation."""
    import webdataset as wds

    res = evaluate(loaded.model, loaded.preprocess, loaded.tokenizer, "synthetic", synthetic_root, batch_size=32)
    counts: dict[str, int] = {}
    n = 0
    for s in wds.WebDataset(sorted(str(p) for p in (synthetic_root / "heldout").glob("*.tar")), shardshuffle=False):
        n += 1
        for kind in json.loads(s["json"])["eval_negatives"]:
            counts[kind] = counts.get(kind, 0) + 1
    # one binding-twin case per swap-att negative (the generator's annotations can all be re-drawn)
    counts["binding"] = counts["swap-att"]
    # and the binding pairs the manifest records (drawn at evaluation)
    counts["binding-pairs"] = json.loads((synthetic_root / "manifest.json").read_text())["binding_pairs"]["cases"]
    assert counts and {f"synthetic/{k}": float(v) for k, v in counts.items()} == {
        k: r["metrics"]["n"] for k, r in res.items()
        if k not in ("synthetic", "synthetic/retrieval", "synthetic/single-object")}
    # and the single objects (drawn at evaluation): one outcome per case
    single = json.loads((synthetic_root / "manifest.json").read_text())["single_objects"]["cases"]
    assert len(res["synthetic/single-object"]["items"]["acc1"]) == single == 24
    # every result keeps its per-item outcomes, whose means are its metrics
    assert res["synthetic"]["items"]["acc1"] and sum(res["synthetic"]["items"]["acc1"]) / n == pytest.approx(
        res["synthetic"]["metrics"]["acc1"])
    ranks = res["synthetic/retrieval"]["items"]["image_retrieval_rank"]
    assert sum(r < 5 for r in ranks) / len(ranks) == pytest.approx(
        res["synthetic/retrieval"]["metrics"]["image_retrieval_recall@5"])
    for name, r in res.items():
        if "acc" in r.get("items", {}):
            assert sum(r["items"]["acc"]) / len(r["items"]["acc"]) == pytest.approx(r["metrics"]["acc"]), name
    classes = json.loads((synthetic_root / "classes.json").read_text())["classnames"]
    assert res["synthetic"]["task"] == "zeroshot_classification" and len(classes) >= 5
    assert set(res["synthetic/retrieval"]["metrics"]) == {f"{d}_retrieval_recall@{k}" for d in ("image", "text") for k in (1, 5, 10)}


def test_synthetic_binding_twins_match_brute_force(loaded, synthetic_root):
    """Each scene with a swap-att negative against its colour-swapped twin, scored as Winoground by hand."""
    import webdataset as wds

    from powerclip.data.synthetic import binding_twin

    res = evaluate(loaded.model, loaded.preprocess, loaded.tokenizer, "synthetic", synthetic_root,
                   split="val", batch_size=32)["synthetic/binding"]
    t = i = g = n = 0
    for s in wds.WebDataset(sorted(str(p) for p in (synthetic_root / "val").glob("*.tar")),
                            shardshuffle=False).decode("pil"):
        ann = s["json"]
        twin = binding_twin(ann, s["png"].size[0])
        if "swap-att" not in ann["eval_negatives"]:
            assert twin is None
            continue
        ims = [_img(loaded, s["png"]), _img(loaded, twin[0])]
        cs = [_txt(loaded, s["txt"]), _txt(loaded, ann["eval_negatives"]["swap-att"])]
        assert twin[1] == ann["eval_negatives"]["swap-att"]
        sc = [[float(cs[a] @ ims[b]) for b in (0, 1)] for a in (0, 1)]
        text = sc[0][0] > sc[1][0] and sc[1][1] > sc[0][1]
        image = sc[0][0] > sc[0][1] and sc[1][1] > sc[1][0]
        t, i, g, n = t + text, i + image, g + (text and image), n + 1
    assert n > 10 and res["metrics"]["n"] == n
    assert res["metrics"]["text_acc"] == pytest.approx(t / n)
    assert res["metrics"]["image_acc"] == pytest.approx(i / n)
    assert res["metrics"]["acc"] == pytest.approx(g / n)


def test_synthetic_binding_pairs_match_brute_force(loaded, synthetic_root):
    """The binding pairs the manifest records, drawn and scored by hand: pair accuracy and Winoground."""
    from powerclip.data.synthetic import draw_objects
    from powerclip.data.synthetic_pairs import pair_cases

    res = evaluate(loaded.model, loaded.preprocess, loaded.tokenizer, "synthetic", synthetic_root,
                   split="heldout", batch_size=32)["synthetic/binding-pairs"]
    manifest = json.loads((synthetic_root / "manifest.json").read_text())
    cases = pair_cases(manifest, "heldout")
    pair, group = [], []
    for case in cases:
        ims = [_img(loaded, draw_objects(objs, manifest["image_size"])) for objs in case.objects]
        cs = [_txt(loaded, c) for c in case.captions]
        sc = [[float(cs[a] @ ims[b]) for b in (0, 1)] for a in (0, 1)]
        b = sc[0][0] + sc[1][1] - sc[0][1] - sc[1][0]
        pair.append(1.0 if b > 1e-6 else 0.0 if b < -1e-6 else 0.5)
        group.append(sc[0][0] > sc[1][0] and sc[1][1] > sc[0][1] and sc[0][0] > sc[0][1] and sc[1][1] > sc[1][0])
    assert len(cases) == 24 and res["metrics"]["n"] == 24
    assert res["items"]["pair_acc"] == pytest.approx(pair)
    assert res["metrics"]["pair_acc"] == pytest.approx(sum(pair) / 24)
    assert res["metrics"]["acc"] == pytest.approx(sum(group) / 24)


def test_synthetic_single_objects_match_brute_force(loaded, synthetic_root):
    """The single-object zero-shot cases, drawn and classified by hand over the dataset's classes and
    templates (the class embedding: the normalised mean of the normalised template embeddings)."""
    from powerclip.data.synthetic import draw_objects
    from powerclip.data.synthetic_pairs import single_object_cases

    res = evaluate(loaded.model, loaded.preprocess, loaded.tokenizer, "synthetic", synthetic_root,
                   split="heldout", batch_size=32)["synthetic/single-object"]
    manifest = json.loads((synthetic_root / "manifest.json").read_text())
    classes = json.loads((synthetic_root / "classes.json").read_text())
    weights = []
    for name in classes["classnames"]:
        t = torch.stack([_txt(loaded, tpl.format(name)) for tpl in classes["templates"]]).mean(0)
        weights.append(t / t.norm())
    w = torch.stack(weights)
    cases = single_object_cases(manifest, "heldout")
    hits = [int(int((w @ _img(loaded, draw_objects(c.objects, manifest["image_size"]))).argmax()) == c.label)
            for c in cases]
    assert len(cases) == 24 and res["items"]["acc1"] == hits
    assert res["metrics"]["acc1"] == pytest.approx(sum(hits) / 24)


# ------------------------------------------------------------------------------------ errors
def test_missing_files_are_named(loaded, tmp_path):
    root = write_sugarcrepe(tmp_path / "sc", tasks=("swap_att",), n=4)
    (root / "val2017" / f"{1:012d}.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=f"{1:012d}.jpg"):
        evaluate(loaded.model, loaded.preprocess, loaded.tokenizer, "sugar_crepe", root)
    with pytest.raises(FileNotFoundError, match="add_obj.json"):
        evaluate(loaded.model, loaded.preprocess, loaded.tokenizer, "sugar_crepe/add_obj", root)
    wino = write_winoground(tmp_path / "w", n=2)
    (wino / "images" / "ex_1_img_0.png").unlink()
    with pytest.raises(FileNotFoundError, match="ex_1_img_0.png"):
        evaluate(loaded.model, loaded.preprocess, loaded.tokenizer, "winoground", wino)
    cls, _ = write_wds_classification(tmp_path / "cls", n=4, shards=2)
    (cls / "test" / "1.tar").unlink()
    with pytest.raises(FileNotFoundError, match="1.tar"):
        evaluate(loaded.model, loaded.preprocess, loaded.tokenizer, "zeroshot_classification", cls)
    aro = write_aro_vg(tmp_path / "aro", n=2)
    (aro / "visual_genome_attribution.json").write_text(json.dumps([{"image_path": "x.jpg"}]))
    with pytest.raises(ValueError, match="missing field 'bbox_x'"):
        evaluate(loaded.model, loaded.preprocess, loaded.tokenizer, "aro/vg_attribution", aro)
    with pytest.raises(FileNotFoundError, match="model not found"):
        load_model(tmp_path / "nope")
    export = make_export(tmp_path / "e2")
    (export / "open_clip_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no weights file"):
        load_model(export)
    with pytest.raises(ValueError, match="unknown eval task"):
        evaluate(loaded.model, loaded.preprocess, loaded.tokenizer, "imagenet", root)


def test_model_mode_is_restored(loaded, tmp_path):
    root = write_sugarcrepe(tmp_path / "sc", tasks=("swap_att",), n=2)
    loaded.model.train()
    evaluate(loaded.model, loaded.preprocess, loaded.tokenizer, "sugar_crepe", root)
    assert loaded.model.training
    loaded.model.eval()


# ------------------------------------------------------------------------------- 2 ranks vs 1
def _eval_on_rank(rank, world, export, tasks):
    torch.manual_seed(0)
    m = load_model(export)
    out = {}
    for task, root in tasks:
        out.update(evaluate(m.model, m.preprocess, m.tokenizer, task, root, batch_size=3, text_batch_size=5))
    return out


@pytest.mark.slow
def test_two_ranks_equal_one(tmp_path):
    export = make_export(tmp_path / "e", seed=2)
    tasks = [("zeroshot_classification", str(write_wds_classification(tmp_path / "cls", n=11, shards=2)[0])),
             ("zeroshot_retrieval", str(write_wds_retrieval(tmp_path / "ret", n=7))),
             ("synthetic", str(write_synthetic(tmp_path / "syn", n=9))),
             ("winoground", str(write_winoground(tmp_path / "w", n=3)))]
    single = _eval_on_rank(0, 1, str(export), tasks)
    r0, r1 = run_on_ranks(_eval_on_rank, 2, str(export), tasks)
    assert r0 == r1
    for ds, r in single.items():
        for k, v in r["metrics"].items():
            # counts and shares are exact; means of float32 similarities (Winoground's pair cosines,
            # binding term and priors) round differently when the features come from other batches
            tol = 1e-6 if k.endswith(("_cos", "_term", "_prior")) else 1e-9
            assert r0[ds]["metrics"][k] == pytest.approx(v, abs=tol), (ds, k)
    shutil.rmtree(tmp_path / "cls")


def test_results_files_follow_clip_benchmark_schema(tmp_path):
    from powerclip.eval.results import write_results

    results = {"sugar_crepe/swap_att": {"task": "image_caption_selection", "metrics": {"acc": 0.5, "n": 2.0}},
               "wds/cars": {"task": "zeroshot_classification", "metrics": {"acc1": 0.25}}}
    one = write_results({"wds/cars": results["wds/cars"]}, tmp_path / "r.json", "local-dir:/m", "/m")
    assert one == [tmp_path / "r.json"]
    assert json.loads(one[0].read_text())["dataset"] == "wds/cars"
    many = write_results(results, tmp_path / "all.json", "local-dir:/m", "/m")
    assert many == [tmp_path / "all.json"]  # --out FILE.json: that file, every dataset in it
    assert [r["dataset"] for r in json.loads(many[0].read_text())] == ["sugar_crepe/swap_att", "wds/cars"]
    assert sorted(p.name for p in tmp_path.glob("all*")) == ["all.json"]
    folder = write_results(results, tmp_path / "dir", "local-dir:/m", "/m")
    rec = json.loads(folder[1].read_text())
    assert rec == {"dataset": "wds/cars", "model": "local-dir:/m", "pretrained": "/m",
                   "task": "zeroshot_classification", "metrics": {"acc1": 0.25}, "language": "en"}
    assert not list(tmp_path.rglob("*.tmp*"))

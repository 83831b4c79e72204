"""tools/annotate_shards.py on tars the test writes in PowerCLIP's published layout: every member
but the json copied byte for byte, powerclip's annotation added, samples without a caption copied
untouched and listed, resume skips finished shards, the loader reads the result."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from powerclip.data.annotate_shards import annotate_shards
from powerclip.data.loader import build_loader
from powerclip.negatives.shards import list_shards
from tests.test_data_patch_regions import _cfg, write_powerclip_shard

ROOT = Path(__file__).resolve().parent.parent


def _members(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tf:
        return [(m.name, tf.extractfile(m).read()) for m in tf.getmembers() if m.isfile()]


def _add(path: Path, members: list[tuple[str, bytes]]) -> None:
    """Append members (a sample with a .njson, one without any caption) to a written tar."""
    with tarfile.open(path, "a") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


@pytest.fixture()
def published(tmp_path: Path) -> Path:
    src = tmp_path / "cc12m"
    src.mkdir()
    for s in range(3):
        write_powerclip_shard(src / f"{s:05d}.tar", 5, seed=20 + s)
    _add(src / "00001.tar", [("x1.jpg", b"\xff\xd8 not decoded here"), ("x1.txt", b"a cat on a mat"),
                             ("x1.njson", b'{"opaque": [1, 2]}'),
                             ("x2.jpg", b"\xff\xd8"), ("x2.json", b'{"url": "http://x/2.jpg"}')])
    return src


def test_members_kept_byte_for_byte_annotation_added(published: Path, tmp_path: Path):
    out = tmp_path / "annotated"
    m = annotate_shards(list_shards(str(published)), out, workers=2, parser="rule", progress=False)
    assert (m["num_shards"], m["num_samples"], m["num_annotated"]) == (3, 17, 16)
    assert m["skipped_by_reason"] == {"missing_caption": 1}
    assert m["skipped"][0]["input"].endswith("00001.tar#x2")
    assert json.loads((out / "sizes.json").read_text()) == {"00000.tar": 5, "00001.tar": 7, "00002.tar": 5}
    assert json.loads((out / "manifest.json").read_text())["num_skipped"] == 1
    for s in range(3):
        before, after = _members(published / f"{s:05d}.tar"), _members(out / f"{s:05d}.tar")
        names_before = [n for n, _ in before]
        added = [n for n, _ in after if n not in names_before]
        assert added == (["x1.json"] if s == 1 else [])  # x1 had no json: one is added
        after_d = dict(after)
        for name, data in before:
            if name.endswith(".json") and name != "x2.json":
                ann, src = json.loads(after_d[name]), json.loads(data)
                assert ann["schema"] == 1 and ann["parser"] == "rule" and ann["source"] == src
                assert ann["caption"] == src["caption"] and ann["concepts"]
                assert {p["label"] for p in ann["phrases"]} >= {"ROOT", "NP"}
            else:  # images, txt, npy, njson, and the json of the sample left unannotated
                assert after_d[name] == data, name
        # member order kept: the samples stay grouped by key
        assert [n.split(".")[0] for n in names_before] == [n.split(".")[0] for n, _ in after if n in names_before]
    x1 = json.loads(dict(_members(out / "00001.tar"))["x1.json"])
    assert x1["caption"] == "a cat on a mat" and "source" not in x1


def test_resume_skips_finished_shards_and_refuses_other_settings(published: Path, tmp_path: Path):
    out = tmp_path / "annotated"
    shards = list_shards(str(published))
    annotate_shards(shards, out, parser="rule", progress=False)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    (out / "_annotate" / "00002.tar.json").unlink()  # as if killed while writing 00002
    m = annotate_shards(shards, out, parser="rule", progress=False)
    assert m["resumed_shards"] == 2 and m["num_shards"] == 3
    now = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    assert now["00000.tar"] == stamps["00000.tar"] and now["00001.tar"] == stamps["00001.tar"]
    assert now["00002.tar"] != stamps["00002.tar"]
    with pytest.raises(ValueError, match="annotated with"):
        annotate_shards(shards, out, parser="spacy", progress=False)
    with pytest.raises(ValueError, match="not be the input folder"):
        annotate_shards(shards, published, parser="rule", progress=False)


def test_cli_summary_and_loader_reads_annotated_shards(published: Path, tmp_path: Path):
    out = tmp_path / "annotated"
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "annotate_shards.py"), "--input", str(published),
                        "--out", str(out), "--parser", "rule", "--no-progress"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "16 of 17 samples annotated in 3 shards (0 already done)" in r.stdout
    cfg = _cfg(str(out / "00000.tar"))
    batches = list(build_loader(cfg, 0, 1, shards=str(out / "{00000..00002}.tar"), train=False))
    # parse-tree phrases reach the batch (more than the root per caption), regions from the npy
    assert sum(b.phrase_valid.sum().item() for b in batches) > 15
    assert sum(len(b.keys) for b in batches) == 15  # x1/x2 have no regions and no decodable image


def test_a_repeated_key_is_listed_and_copied_never_merged(tmp_path: Path):
    src = tmp_path / "dup"
    src.mkdir()
    write_powerclip_shard(src / "00000.tar", 3, seed=7)
    first = _members(src / "00000.tar")
    key = first[0][0].split(".")[0]
    repeat = [(f"{key}.{name.split('.', 1)[1]}", data) for name, data in first if name.startswith(f"{key}.")]
    _add(src / "00000.tar", repeat)  # the first sample's key written again at the end
    out = tmp_path / "annotated"
    m = annotate_shards(list_shards(str(src)), out, parser="rule", progress=False)
    assert m["num_samples"] == 4 and m["num_annotated"] == 3  # the repeat is a sample of its own, not merged
    assert m["skipped_by_reason"] == {"duplicate_key": 1} and m["skipped"][0]["input"].endswith(f"#{key}")
    after = _members(out / "00000.tar")
    assert len(after) == len(first) + len(repeat)  # every member copied
    assert after[-len(repeat):] == repeat  # the repeat untouched, json included
    assert json.loads(dict(after[:len(first)])[f"{key}.json"])["parser"] == "rule"  # the first annotated


@pytest.mark.parametrize("damage", [b'{"shard": "00001.tar", "count"', b'{"shard": "00001.tar", "count": 6}'])
def test_a_damaged_shard_record_redoes_the_shard(published: Path, tmp_path: Path, capsys, caplog, damage: bytes):
    from tools import annotate_shards as tool

    def run(out: Path) -> dict:
        assert tool.main(["--input", str(published), "--out", str(out), "--parser", "rule", "--no-progress"]) == 0
        return {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))}

    clean = run(tmp_path / "clean")
    out = tmp_path / "out"
    run(out)
    record = out / "_annotate" / "00001.tar.json"
    record.write_bytes(damage)  # truncated, or valid JSON without "annotated" and "skipped"
    capsys.readouterr()
    with caplog.at_level("WARNING", logger="powerclip.data.records"):
        assert run(out) == clean
    assert "(2 already done)" in capsys.readouterr().out
    assert [r.getMessage().split(":")[0] for r in caplog.records] == [str(record)]  # one line, naming it
    manifest = json.loads((out / "manifest.json").read_text())
    expected = json.loads((tmp_path / "clean" / "manifest.json").read_text())
    assert manifest.pop("resumed_shards") == 2 and expected.pop("resumed_shards") == 0
    assert manifest == expected and manifest["num_shards"] == 3 and manifest["num_annotated"] == 16


@pytest.mark.parametrize("damage", [b'{"parser": "ru', b'{"parser": ["rule"]}', b'"rule"'])
def test_damaged_settings_are_refused_in_one_line(published: Path, tmp_path: Path, capsys, damage: bytes):
    from tools import annotate_shards as tool

    out = tmp_path / "out"
    args = ["--input", str(published), "--out", str(out), "--parser", "rule", "--no-progress"]
    assert tool.main(args) == 0
    settings = out / "_annotate" / "settings.json"
    settings.write_bytes(damage)
    capsys.readouterr()
    assert tool.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(settings) in err and "restore it, or delete it" in err
    settings.unlink()  # the fix the line names: the rerun resumes every shard
    assert tool.main(args) == 0
    assert "(3 already done)" in capsys.readouterr().out

"""tools/build_shards.py on real files the test writes: folder, CSV/TSV/parquet, img2dataset tars;
validation and skip reasons, resume, parallel processes, output confined to --out."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from powerclip.data.build import build_shards
from powerclip.data.stream import read_shard

ROOT = Path(__file__).resolve().parent.parent


def _png(colour=(200, 10, 10), size=(24, 16)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def _jpg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (20, 20), (0, 0, 255)).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture()
def raw(tmp_path: Path) -> Path:
    """A folder with sidecars (7 good + 4 bad), a table dir, and an img2dataset-style tar dir."""
    d = tmp_path / "raw" / "folder"
    (d / "sub").mkdir(parents=True)
    for i in range(5):
        (d / f"img{i}.png").write_bytes(_png((40 * i, 0, 0)))
        (d / f"img{i}.txt").write_text(f"a red square number {i} on a table")
    (d / "sub" / "x.jpg").write_bytes(_jpg())
    (d / "sub" / "x.txt").write_text("a blue  square\n")
    (d / "bmp.webp").write_bytes(_png())  # wrong extension, valid image: still decodes
    (d / "bmp.txt").write_text("a red square")
    (d / "nocap.png").write_bytes(_png())  # no sidecar
    (d / "empty.png").write_bytes(_png())
    (d / "empty.txt").write_text("   ")
    (d / "corrupt.png").write_bytes(_png()[:50])
    (d / "corrupt.txt").write_text("a broken image")
    (d / "bomb.png").write_bytes(_png(size=(400, 300)))  # over the test's pixel limit
    (d / "bomb.txt").write_text("too many pixels")
    t = tmp_path / "raw" / "i2d"
    t.mkdir()
    with wds.TarWriter(str(t / "00000.tar")) as w:
        for i in range(3):
            w.write({"__key__": f"{i:09d}", "jpg": _jpg(), "txt": f"a dog number {i}".encode(),
                     "json": json.dumps({"url": f"http://x/{i}.jpg", "width": 20}).encode()})
        w.write({"__key__": "000000009", "jpg": _jpg()})  # no caption
    return tmp_path / "raw"


def _all_samples(out: Path) -> list[dict]:
    sizes = json.loads((out / "sizes.json").read_text())
    samples = [s for name in sizes for s in read_shard(str(out / name))]
    assert len(samples) == sum(sizes.values())
    return samples


def test_folder_and_img2dataset_inputs(raw: Path, tmp_path: Path):
    out = tmp_path / "out"
    m = build_shards([str(raw / "folder"), str(raw / "i2d")], out, shard_size=4, workers=1,
                     parser="spacy", max_pixels=100_000, progress=False)
    assert m["num_samples"] == 10 and m["num_inputs"] == 15
    assert m["skipped_by_reason"] == {"missing_caption": 2, "empty_caption": 1, "bad_image": 1, "too_large": 1}
    assert {s["input"].split("/")[-1] for s in m["skipped"]} >= {"nocap.png", "empty.png", "corrupt.png",
                                                                 "bomb.png", "00000.tar#000000009"}
    samples = _all_samples(out)
    for s in samples:
        ann = json.loads(s["json"])
        assert ann["schema"] == 1 and ann["caption"] == s["txt"].decode()
        assert ann["parser"] == "spacy:en_core_web_sm"
        assert ann["phrases"][-1]["label"] == "ROOT" and ann["concepts"]
        assert ("png" in s) or ("jpg" in s)
    caps = {json.loads(s["json"])["caption"] for s in samples}
    assert "a blue square" in caps  # whitespace normalised
    src = [json.loads(s["json"]).get("source") for s in samples if "dog" in s["txt"].decode()]
    assert len(src) == 3 and all(x["url"].startswith("http://x/") for x in src)
    # nothing but shards, the two json files and the resume records
    assert sorted(p.name for p in out.iterdir()) == ["00000.tar", "00001.tar", "00002.tar", "00003.tar",
                                                     "_build", "manifest.json", "sizes.json"]
    # plain ustar members: no pax header per member for every reader to parse
    with tarfile.open(out / "00000.tar") as tf:
        assert all(m.pax_headers == {} and m.mtime == 0 for m in tf)


def test_tables(raw: Path, tmp_path: Path):
    folder = raw / "folder"
    rows = [("folder/img0.png", "a red square"), ("folder/img1.png", "two red squares"),
            ("folder/missing.png", "not there"), ("folder/img2.png", "")]
    (raw / "t.csv").write_text("filepath,title\n" + "".join(f"{p},{c}\n" for p, c in rows))
    (raw / "t.tsv").write_text("image\tcaption\n" + "".join(f"{p}\t{c}\n" for p, c in rows))
    pq.write_table(pa.table({"image": [str(folder / "img3.png")], "caption": ["a small square"],
                             "boxes": ["[[0.1, 0.1, 0.5, 0.5]]"]}), raw / "t.parquet")
    out = tmp_path / "out"
    m = build_shards([str(raw / "t.csv"), str(raw / "t.tsv"), str(raw / "t.parquet")], out, shard_size=100,
                     parser="rule", boxes_col="boxes", progress=False)
    assert m["num_samples"] == 5
    assert m["skipped_by_reason"] == {"unreadable: FileNotFoundError": 2, "empty_caption": 2}
    boxed = [json.loads(s["json"]) for s in _all_samples(out) if s["txt"] == b"a small square"]
    assert boxed[0]["boxes"] == [[0.1, 0.1, 0.5, 0.5]]
    (raw / "bad.csv").write_text("filepath,b\nx,y\n")
    with pytest.raises(ValueError, match="cannot find the caption column among"):
        build_shards([str(raw / "bad.csv")], tmp_path / "o3", parser="rule", progress=False)


def test_resume_parallel_cli(raw: Path, tmp_path: Path, capsys):
    out = tmp_path / "out"
    from tools import build_shards as tool

    args = [str(raw / "folder"), "--out", str(out), "--shard-size", "3", "--workers", "2", "--parser", "rule",
            "--no-progress"]
    assert tool.main(args) == 0
    assert "8 samples in 4 shards (0 already done)" in capsys.readouterr().out
    first = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    # simulate a build killed after shard 0: its record and shard 2 vanish
    (out / "_build" / "00001.json").unlink()
    (out / "00002.tar").unlink()
    time.sleep(0.01)
    assert tool.main(args) == 0
    assert "8 samples in 4 shards (2 already done)" in capsys.readouterr().out
    again = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    assert again["00000.tar"] == first["00000.tar"] and again["00003.tar"] == first["00003.tar"]
    assert json.loads((out / "manifest.json").read_text())["parser"] == "rule"
    # different inputs into the same folder: refused
    (raw / "folder" / "new.png").write_bytes(_png())
    (raw / "folder" / "new.txt").write_text("new")
    assert tool.main(args) == 2
    assert "different inputs" in capsys.readouterr().err
    assert not any(p.suffix == ".tmp" for p in out.rglob("*"))
    # --help works as a script (the one subprocess here: it must not import torch to print help)
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "build_shards.py"), "--help"],
                       capture_output=True, text=True, check=True)
    assert "--shard-size" in r.stdout


@pytest.mark.parametrize("damage", [b'{"shard": "00001.tar", "cou', b'{"shard": "00001.tar", "count": "3"}', b"[]"])
def test_a_damaged_shard_record_redoes_the_shard(raw: Path, tmp_path: Path, capsys, caplog, damage: bytes):
    from tools import build_shards as tool

    def run(out: Path) -> dict:
        assert tool.main([str(raw / "folder"), "--out", str(out), "--shard-size", "3", "--parser", "rule",
                          "--no-progress"]) == 0
        return {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))}

    clean = run(tmp_path / "clean")
    out = tmp_path / "out"
    run(out)
    record = out / "_build" / "00001.json"
    record.write_bytes(damage)  # truncated, or valid JSON of the wrong shape
    capsys.readouterr()
    with caplog.at_level("WARNING", logger="powerclip.data.records"):
        assert run(out) == clean
    assert "8 samples in 4 shards (3 already done)" in capsys.readouterr().out
    assert [r.getMessage().split(":")[0] for r in caplog.records] == [str(record)]  # one line, naming it
    assert json.loads(record.read_text())["shard"] == "00001.tar"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest.pop("resumed_shards") == 3
    expected = json.loads((tmp_path / "clean" / "manifest.json").read_text())
    expected.pop("resumed_shards")
    assert manifest == expected


@pytest.mark.parametrize("damage", [b'{"hash": "ab', b'{"hash": 5}', b'{"hash": "x", "items": []}'])
def test_a_damaged_plan_is_refused_in_one_line(raw: Path, tmp_path: Path, capsys, damage: bytes):
    from tools import build_shards as tool

    out = tmp_path / "out"
    args = [str(raw / "folder"), "--out", str(out), "--shard-size", "3", "--parser", "rule", "--no-progress"]
    assert tool.main(args) == 0
    (out / "_build" / "plan.json").write_bytes(damage)
    capsys.readouterr()
    assert tool.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(out / "_build" / "plan.json") in err
    assert "is damaged" in err and "restore it, or delete it" in err
    (out / "_build" / "plan.json").unlink()  # the fix the line names: the rerun resumes every shard
    assert tool.main(args) == 0
    assert "(4 already done)" in capsys.readouterr().out


def test_a_repeated_key_in_an_input_tar_is_skipped_never_merged(tmp_path: Path):
    src = tmp_path / "i2d"
    src.mkdir()
    keys = ["a", "b", "b", "c", "a"]  # "b" again right after itself, "a" again further on
    with wds.TarWriter(str(src / "00000.tar")) as w:
        for i, k in enumerate(keys):
            sample = {"__key__": k, "png": _png((50 * i, 0, 0)), "txt": f"a red square number {i}".encode()}
            if i == 4:
                sample["json"] = json.dumps({"url": "http://x/repeat.jpg"}).encode()  # a member the first lacks
            w.write(sample)
    m = build_shards([str(src)], tmp_path / "out", shard_size=10, parser="rule", progress=False)
    assert m["num_inputs"] == 5 and m["num_samples"] == 3
    assert m["skipped_by_reason"] == {"duplicate_key": 2}
    got = sorted((json.loads(s["json"]) for s in _all_samples(tmp_path / "out")), key=lambda a: a["caption"])
    assert [a["caption"] for a in got] == [f"a red square number {i}" for i in (0, 1, 3)]  # each key's first
    assert all("source" not in a for a in got)  # the repeat's json never joined the first "a"

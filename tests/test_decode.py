"""The one image decode: the pixel limit on every path (training loader, evaluation sources, shard
builder), errors naming the image, and the same pixels the readers had before."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
from PIL import Image
from webdataset.autodecode import ImageHandler

from powerclip.data.decode import MAX_PIXELS, ImageTooLargeError, decode_image
from powerclip.eval.sources import BytesImage, FileImage, ImageDataset, index_tar


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _bomb() -> bytes:
    """10000 x 10000 1-bit zeros: ~100 KB of PNG declaring 100 MP, over PIL's own limit."""
    return _png(Image.new("1", (10_000, 10_000)))


def test_limit_is_checked_before_decoding_and_names_the_image():
    small = _png(Image.new("RGB", (40, 30), (10, 20, 30)))
    with pytest.raises(ImageTooLargeError, match=r"^shard\.tar: sample 'k1': image of 40x30 pixels exceeds .* 1000"):
        decode_image(small, "shard.tar: sample 'k1'", max_pixels=1000)
    assert decode_image(small, "x", max_pixels=1200).size == (40, 30)
    assert 10_000 * 10_000 > MAX_PIXELS
    with pytest.raises(ImageTooLargeError, match=r"^big\.png: image of 10000x10000"):
        decode_image(_bomb(), "big.png")


@pytest.mark.parametrize("mode", ["P", "L", "RGBA", "1", "RGB"])
def test_rgb_pixels_equal_webdataset_pil_decoder(mode):
    """Evaluation decoded tar members with webdataset's ImageHandler('pil') (clip_benchmark's decoder)."""
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (9, 7, 3), dtype=np.uint8)).convert(mode)
    data = _png(img)
    want = ImageHandler("pil", extensions=["png"])("x.png", data)
    got = decode_image(data, "x")
    assert got.mode == "RGB" and np.array_equal(np.asarray(got), np.asarray(want))
    assert decode_image(data, "x", rgb=False).mode == mode


def test_eval_sources_enforce_the_limit_naming_file_member_and_row(tmp_path):
    bomb = _bomb()
    (tmp_path / "big.png").write_bytes(bomb)
    with tarfile.open(tmp_path / "eval.tar", "w") as tf:
        info = tarfile.TarInfo("s0.png")
        info.size = len(bomb)
        tf.addfile(info, io.BytesIO(bomb))
    member = index_tar(tmp_path / "eval.tar")[0]["png"]
    refs = [FileImage(str(tmp_path / "big.png")), member, BytesImage("t.parquet row 3 image_0", bomb)]
    ds = ImageDataset(refs, preprocess=lambda img: img)
    names = [str(tmp_path / "big.png"), f"{tmp_path / 'eval.tar'}:s0.png", "t.parquet row 3 image_0"]
    for i, name in enumerate(names):
        with pytest.raises(ImageTooLargeError, match="^" + name.replace(".", r"\.") + ": image of 10000x10000"):
            ds[i]


def test_training_loader_skips_and_logs_an_image_over_the_limit(tmp_path, synthetic_root, caplog):
    import webdataset as wds

    from powerclip.data import build_loader
    from powerclip.data.stream import read_shard
    from tests.tiny import tiny_config

    good = list(read_shard(str(synthetic_root / "train" / "00000.tar")))[:2]
    shard = tmp_path / "s.tar"
    with wds.TarWriter(str(shard)) as w:
        w.write({"__key__": "bomb", "png": _bomb(), "json": good[0]["json"]})
        for i, s in enumerate(good):
            w.write({"__key__": f"good_{i}", "png": s["png"], "json": s["json"]})
    cfg = tiny_config([f"data.sources=[{{shards: '{shard}'}}]", "data.resampled=false", "data.workers=0",
                       "data.batch_size=2", "data.shuffle_buffer=1"])
    loader = build_loader(cfg, 0, 1)
    with caplog.at_level("WARNING", logger="powerclip.data"):
        batch = next(iter(loader))
    assert batch.keys == ["good_0", "good_1"] and loader.counters() == {"bad_image": 1}
    (msg,) = [r.getMessage() for r in caplog.records if r.name == "powerclip.data.loader"]
    assert msg.startswith(f"skipped sample bomb of {shard}: bad_image (ImageTooLargeError: ")
    assert "10000x10000 pixels exceeds the limit" in msg


def test_eval_wds_index_skips_a_repeated_key_and_says_so(tmp_path, caplog):
    """A clip_benchmark ``wds`` set whose shard repeats keys: each key keeps its first sample whole
    (image and label), the repeats are skipped (never merged into a neighbour) and counted in one line."""
    import webdataset as wds

    from powerclip.eval.datasets import load_wds

    root = tmp_path / "set"
    (root / "test").mkdir(parents=True)
    (root / "test" / "nshards.txt").write_text("1")
    (root / "classnames.txt").write_text("zero\none\ntwo\nthree\n")
    (root / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\n")
    keys = ["a", "b", "b", "c", "a"]  # "b" again right after itself, "a" again further on
    shard = root / "test" / "0.tar"
    with wds.TarWriter(str(shard), encoder=False) as w:
        for i, k in enumerate(keys):
            w.write({"__key__": k, "png": f"image {i}".encode(), "cls": str(i % 4).encode()})
    with caplog.at_level("WARNING", logger="powerclip.eval.sources"):
        ds = load_wds(root)
    assert ds.labels == [0, 1, 3]
    assert [m.read() for m in ds.images] == [b"image 0", b"image 1", b"image 3"]
    logged = [r.getMessage() for r in caplog.records]
    assert logged == [f"{shard}: 2 samples skipped: duplicate_key (a key repeated in the shard; the first "
                      "sample with it is kept)"]

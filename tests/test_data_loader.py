"""powerclip.data.build_loader on the synthetic shards: Batch shapes, spans → tokens, regions, concepts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from powerclip.config import load_config
from powerclip.data import build_loader, concept_id, grid_size
from powerclip.data.text import ClipTokenizer, span_positions

TINY = ("model.config={embed_dim: 32, vision_cfg: {image_size: 32, patch_size: 8, width: 32, layers: 1}, "
        "text_cfg: {context_length: 32, width: 32, heads: 2, layers: 1}}")


def make_cfg(root: Path, *extra: str, split: str = "train", n: int = 2):
    return load_config(None, [f"data.sources=[{{shards: '{root}/{split}/{{00000..{n:05d}}}.tar'}}]", TINY,
                              "data.context_length=32", "data.batch_size=8", "data.workers=0",
                              "data.shuffle_buffer=16", *extra])


def test_grid_size_from_model_config(synthetic_root: Path):
    assert grid_size(make_cfg(synthetic_root)) == 4
    assert grid_size(load_config(None, ["model.name=ViT-B-32"])) == 7
    assert grid_size(load_config(None, ["model.name=ViT-B-16"])) == 14


def test_batch_fields(synthetic_root: Path):
    cfg = make_cfg(synthetic_root, "data.concepts=true", "data.num_negatives=4", "data.num_regions=5",
                   "data.region_source=precomputed")
    b = next(iter(build_loader(cfg, 0, 1)))
    B, L = 8, 32
    assert b.images.shape == (B, 3, 32, 32) and b.text.shape == (B, L)
    assert len(b.keys) == B and len(set(b.keys)) == B
    tok = ClipTokenizer(L)
    for i in range(B):
        cap = b.meta[i]["caption"]
        assert torch.equal(b.text[i], tok.tok([cap], L)[0])  # identical to open_clip's tokenizer
        n = int((b.text[i] != 0).sum())
        assert b.token_valid[i].nonzero().flatten().tolist() == list(range(1, n - 1))
        # root first: all real tokens; every phrase is a subset of the root
        assert torch.equal(b.phrase_tokens[i, 0], b.token_valid[i])
        valid = b.phrase_tokens[i][b.phrase_valid[i]]
        assert (valid & ~b.token_valid[i]).sum() == 0
        assert len({tuple(r.tolist()) for r in valid}) == len(valid)  # no duplicate nodes
    assert b.region_masks.shape == (B, 5, 16) and b.region_valid.all()
    assert b.region_masks.any(-1).all()  # never an empty region
    C = b.concept_text.shape[0]
    assert b.concept_owner.shape == (C,) and b.concept_ids.shape == (C,)
    assert b.concept_owner.min() == 0 and b.concept_owner.max() == B - 1
    assert b.neg_text.shape == (B, 4, L) and b.neg_valid.shape == (B, 4)
    assert (b.neg_text[b.neg_valid][:, 0] == tok.sot).all() and (b.neg_text[~b.neg_valid] == 0).all()


def test_concept_rows_match_owner_captions(synthetic_root: Path):
    cfg = make_cfg(synthetic_root, "data.concepts=true")
    b = next(iter(build_loader(cfg, 0, 1)))
    tok = ClipTokenizer(32)
    for c in range(b.concept_text.shape[0]):
        text = tok.tok.decode([t for t in b.concept_text[c].tolist() if t not in (0, tok.sot, tok.eot)]).strip()
        assert text in b.meta[int(b.concept_owner[c])]["caption"]
        assert int(b.concept_ids[c]) == concept_id(text)
    assert concept_id("A red  Circle.") == concept_id("red circle") != concept_id("blue circle")


def test_span_to_tokens_and_truncation():
    tok = ClipTokenizer(8)  # room for 6 word tokens
    cap = "a small red circle left of a blue square"
    enc = tok.encode(cap)
    assert len(enc.ids) == 8 and enc.ids[-1] == tok.eot
    assert span_positions(enc, 0, 18) == [1, 2, 3, 4]  # "a small red circle"
    assert span_positions(enc, 19, 26) == [5, 6]  # "left of"
    assert span_positions(enc, 27, len(cap)) is None  # cut by the context length: dropped


def test_phrase_unit_token_and_eval_mode(synthetic_root: Path):
    cfg = make_cfg(synthetic_root, "data.phrase_unit=token", "data.workers=2", split="val", n=0)
    loader = build_loader(cfg, 0, 1, train=False)
    batches = list(loader)
    assert sum(b.size for b in batches) == 64
    b = batches[0]
    n = b.token_valid.sum(1)
    assert torch.equal(b.phrase_valid.sum(1), n + 1)  # root + one node per token
    # the eval transform is deterministic: a second pass gives the same images
    again = next(iter(build_loader(cfg, 0, 1, train=False)))
    assert torch.equal(again.images, b.images)


@pytest.mark.parametrize("override,msg", [
    ("data.sources=[]", "data.sources is empty"),
    ("data.sources=[{shards: '/nonexistent/{00000..00003}.tar'}]", "shard not found: /nonexistent/00000.tar"),
])
def test_preflight_errors(synthetic_root: Path, override: str, msg: str):
    cfg = make_cfg(synthetic_root, override)
    with pytest.raises(ValueError, match=msg.replace(".", r"\.")):
        build_loader(cfg, 0, 1)


def test_epoch_mode_needs_enough_shards(synthetic_root: Path):
    cfg = make_cfg(synthetic_root, "data.resampled=false", "data.workers=2")  # 3 shards
    with pytest.raises(ValueError, match=r"ranks x workers = 2 x 2 = 4 shards, found 3"):
        build_loader(cfg, 0, 2)
    build_loader(cfg, 0, 1)


def test_local_tar_reader_matches_webdataset_stream(synthetic_root: Path, tmp_path: Path):
    """Local shards are read in tarfile's random-access mode; remote/piped/.gz ones through webdataset's
    streaming ``tar_file_iterator``. All must yield the same samples, and skip meta members alike,
    including a gzip-compressed shard named .tar."""
    import gzip
    import io
    import shutil
    import tarfile

    from powerclip.data.stream import read_shard

    shard = tmp_path / "00000.tar"
    shutil.copy(synthetic_root / "train" / "00000.tar", shard)
    with tarfile.open(shard, "a") as tf:  # a webdataset meta member: not a sample file
        info = tarfile.TarInfo("__meta__.json")
        info.size = 2
        tf.addfile(info, io.BytesIO(b"{}"))
    gz_named_tar, gz = tmp_path / "gz.tar", tmp_path / "01.tar.gz"  # compressed, whatever the name
    for target in (gz_named_tar, gz):
        with open(shard, "rb") as src, gzip.open(target, "wb") as dst:
            shutil.copyfileobj(src, dst)

    def strip(samples):
        return [{k: v for k, v in s.items() if k != "__url__"} for s in samples]

    local = list(read_shard(str(shard)))
    assert len(local) > 10 and all("__error__" not in s for s in local)
    for other in (f"pipe:cat {shard}", str(gz_named_tar), str(gz)):
        assert strip(read_shard(other)) == strip(local), other

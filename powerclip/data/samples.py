"""Sample processing: one raw webdataset sample → the per-sample values of every Batch field.

decode (pixel limit) → open_clip transform (seeded per sample, written as uint8 into the batch's
image buffer) → tokenize → char spans to token positions → regions → concepts → negatives. The
result holds one value per Batch field under the field's name (``data.collate`` turns B of them
into a Batch by each field's declared rule), plus ``regions_dropped`` (a counter, not a field); a
sample that must be skipped yields the reason instead, and the caller counts it.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import random
import re
import warnings
from collections.abc import Iterator

import numpy as np
import orjson
import torch

from powerclip.errors import UserError

from ..config import Config, aug_cfg_dict
from .decode import MAX_PIXELS, decode_image, image_header
from .geometry import model_geometry
from .published import (
    NjsonError,
    PatchRegionError,
    decode_ids,
    find_run,
    find_text,
    read_njson,
    read_patch_sets,
)
from .regions import map_box, patch_region_masks, region_cells
from .stream import ERROR_KEY, image_bytes
from .text import ClipTokenizer, build_tokenizer, span_positions
from .transforms import apply_transform, crop_window, draft_size, is_crop_only, is_seeded_by_rng

SCHEMA_SUPPORTED = 1
RING_SPARE = 2  # shared-memory image buffers per worker beyond data.prefetch_factor
PHRASE_LABELS = {"NP", "PP", "VP", "S", "ROOT"}
# counter of kept samples whose only phrase is the whole caption (no json phrases, no .njson ones)
CAPTION_ONLY = "phrases_caption_only"

log = logging.getLogger(__name__)


class DataError(UserError, ValueError):
    """The data cannot be read as configured (raised before training starts)."""


@functools.lru_cache(maxsize=65536)
def concept_id(text: str) -> int:
    """int64 hash of the normalised concept text: lower case, no punctuation, no leading article."""
    t = re.sub(r"[^\w\s]", " ", text.lower())
    words = t.split()
    if words and words[0] in ("a", "an", "the"):
        words = words[1:]
    h = hashlib.blake2b(" ".join(words).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little", signed=True)


_WARNED: list[bool] = []  # the caption-only warning, once per process


class SampleProcessor:
    """Turns one raw sample into tensors, or returns the reason it must be skipped."""

    def __init__(self, cfg: Config, train: bool):
        from open_clip import image_transform

        d = cfg.data
        self.d = d
        self.geo = model_geometry(cfg)
        g = self.geo
        with warnings.catch_warnings():  # open_clip warns that its own jitter/grayscale keys are "unused"
            warnings.simplefilter("ignore", UserWarning)
            self.transform = image_transform(g.image_size, is_train=train, mean=g.mean, std=g.std,
                                             resize_mode=g.resize_mode, interpolation=g.interpolation,
                                             aug_cfg=aug_cfg_dict(cfg) if train else None)
        self.rng_only = is_seeded_by_rng(self.transform)
        # data.jpeg_draft: JPEGs decoded at a reduced DCT scale that the transform never upsamples
        self.draft = draft_size(self.transform) if d.jpeg_draft else None
        # data.decode_on_device: JPEGs leave the worker as bytes + crop window (training only)
        self.on_device = bool(train and d.decode_on_device)
        if self.on_device and not is_crop_only(self.transform):
            raise DataError(f"data.decode_on_device=true needs a training transform of crop, resize and "
                            f"normalise only, got {self.transform}; set data.decode_on_device=false")
        self.tok = build_tokenizer(d.tokenizer, d.context_length)
        # grid of the stored patch-index regions: data.region_grid, or the model's own when null
        self.region_grid = d.region_grid if d.region_grid is not None else self.geo.grid
        self.L = d.context_length
        self.in_main = torch.utils.data.get_worker_info() is None  # workers own their RNG: no restore
        # annotation entries dropped from samples that are kept (``field_*`` counters, by reason)
        self.dropped: dict[str, int] = {}
        self.index_base = d.region_index_base
        # the powerset term reads the phrases: caption-only samples are then counted and warned about
        self.phrases_used = d.phrase_unit == "tree" and cfg.loss.powerset.weight > 0

    def _drop(self, reason: str, n: int = 1) -> None:
        if n > 0:
            self.dropped[reason] = self.dropped.get(reason, 0) + n

    def image_buffers(self, n: int) -> Iterator[tuple[torch.Tensor, tuple[torch.Tensor, ...]]]:
        """(batch image tensor, its n slot views) to write transformed uint8 images into (saves the
        stack copy; the views are made once per buffer rather than indexed per sample).

        In the main process (workers=0) every batch gets a fresh tensor. Inside a DataLoader worker
        a ring of data.prefetch_factor + RING_SPARE shared-memory buffers is recycled: allocating and
        page-faulting a fresh shared-memory tensor per batch is a cost of the order of decoding
        the images. The Loader (or DataLoader's pin-memory thread) copies the images out of the ring as
        soon as it receives a batch; a worker has at most prefetch_factor batches outstanding, so
        the buffer of a batch is not rewritten before that copy."""
        shape = (n, 3, self.geo.image_size, self.geo.image_size)
        if self.in_main:
            while True:
                images = torch.empty(shape, dtype=torch.uint8)
                yield images, images.unbind(0)
        ring_size = self.d.prefetch_factor + RING_SPARE
        ring = [torch.empty(shape, dtype=torch.uint8).share_memory_() for _ in range(ring_size)]
        ring_slots = [buf.unbind(0) for buf in ring]
        i = 0
        while True:
            yield ring[i % ring_size], ring_slots[i % ring_size]
            i += 1

    def __call__(self, sample: dict, seed: int, out: torch.Tensor | None = None) -> dict | str:
        """``out``: the batch slot the image should be written to (see ``image_buffers``)."""
        if ERROR_KEY in sample:
            return sample[ERROR_KEY]
        if "json" not in sample:
            return "missing_json"
        try:
            ann = orjson.loads(sample["json"])  # faster than json.loads, the same objects
            if not isinstance(ann, dict):
                raise ValueError("not an object")
        except (ValueError, UnicodeDecodeError):
            return "bad_json"
        schema = ann.get("schema", 1)
        if not isinstance(schema, int) or schema > SCHEMA_SUPPORTED:
            return "unsupported_schema"
        caption = ann.get("caption")
        if caption is not None and not isinstance(caption, str):
            return "bad_annotation"
        if not caption and "txt" in sample:
            try:
                caption = sample["txt"].decode("utf-8")
            except UnicodeDecodeError:
                return "bad_caption"
        if not caption or not str(caption).strip():
            return "empty_caption"
        data = image_bytes(sample)
        if data is None:
            return "missing_image"
        name = f"{sample.get('__url__')}: sample {sample.get('__key__')!r}"
        jpeg = None
        try:
            if self.on_device:
                fmt, mode, width, height = image_header(data, name, MAX_PIXELS)
                img = None if fmt == "JPEG" and mode in ("RGB", "L") else decode_image(data, name, MAX_PIXELS)
            else:
                img = decode_image(data, name, MAX_PIXELS, draft=self.draft)
        except Exception as e:  # noqa: BLE001 - PIL raises many types for corrupt bytes
            sample.setdefault("__detail__", f"{type(e).__name__}: {e}")  # for the skip log
            return "bad_image"
        rng = random.Random(seed)
        if img is None:  # decoded on the device: the crop from the header's size, the slot zeroed
            crop, window = crop_window(self.transform, width, height, rng)
            jpeg = (bytes(data), crop)
            size = self.geo.image_size
            image = out.zero_() if out is not None else torch.zeros((3, size, size), dtype=torch.uint8)
        elif self.rng_only:  # the crop is drawn from the sample's own rng
            image, window = apply_transform(self.transform, img, out, rng, uint8=True)
        else:
            # other random steps use torch's generator: seed it for this sample only (restored
            # after, so the trainer's RNG is untouched when workers=0)
            gen = torch.default_generator
            saved = gen.get_state() if self.in_main else None
            gen.manual_seed(seed)
            try:
                image, window = apply_transform(self.transform, img, out, uint8=True)
            finally:
                if saved is not None:
                    gen.set_state(saved)
        enc = self.tok.encode(caption)
        n_tok = len(enc.ids)
        if n_tok <= 2:
            return "empty_caption"  # nothing the tokenizer keeps
        patches = None
        if self.d.region_source == "patches":
            patches = self._patch_regions(sample, window, rng)
            if isinstance(patches, str):
                return patches
        try:
            out_fields = self._text_fields(sample, ann, caption, enc, image, window, rng, patches)
            if self.on_device:
                out_fields["jpegs"] = jpeg
            return out_fields
        except (KeyError, TypeError, ValueError, AttributeError, IndexError):
            return "bad_annotation"  # phrases/concepts/negatives/boxes of the wrong shape

    def _patch_regions(self, sample: dict, window, rng: random.Random) -> tuple[np.ndarray, int] | str:
        """(masks, dropped) from the sample's ``samlens.npy``/``samcat.npy`` pair, or a skip reason.

        An index beyond the configured grid is not a bad sample but a wrong setting for the whole
        shard (its regions were made on another grid): that stops the run with an error naming
        the shard, the sample and ``data.region_grid``."""
        if "samlens.npy" not in sample or "samcat.npy" not in sample:
            return "missing_regions"
        try:
            lens, cat = read_patch_sets(sample["samlens.npy"], sample["samcat.npy"])
        except PatchRegionError:
            return "bad_regions"
        g = self.region_grid
        where = f"{sample.get('__url__')}: sample {sample['__key__']!r}"
        if self.index_base and cat.size:
            if int(cat.min()) < self.index_base:
                raise DataError(f"{where} has patch index 0, the CLS token under data.region_index_base=1; "
                                "its indices are 0-based: set data.region_index_base=0 (powerclip check tells)")
            cat = cat - self.index_base
        if cat.size and int(cat.max()) >= g * g:
            top = int(cat.max()) + self.index_base
            hint = ("its indices look 1-based (CLS at 0): set data.region_index_base=1"
                    if top == g * g and not self.index_base else
                    "set data.region_grid to the grid its samcat indices refer to")
            raise DataError(f"{where} has patch index {top}, beyond the {g}x{g} grid (data.region_grid="
                            f"{self.d.region_grid}, data.region_index_base={self.index_base}); {hint} "
                            "(powerclip check reads the first samples and tells)")
        return patch_region_masks(lens, cat, g, window, self.geo.grid, self.d.num_regions, rng)

    def _njson_phrases(self, sample: dict, caption: str, enc) -> list[list[int]]:
        """Token positions of the ``.njson`` phrases (published/README assumptions in ``data.published``)."""
        try:
            phrases = read_njson(sample["njson"])
        except NjsonError:
            self._drop("field_njson_unreadable")
            return []
        ids = enc.ids[:-1]  # without EOT: a phrase never contains it
        out = []
        for ph in phrases:
            if isinstance(self.tok, ClipTokenizer):
                pos = find_run(ids, ph)
            else:
                span = find_text(caption, decode_ids(ph))
                pos = span_positions(enc, *span) if span else None
            if pos is None:
                self._drop("field_njson_phrase_unplaced")  # not in the caption, or cut by the context
            else:
                out.append(pos)
        return out

    def _caption_only(self, sample: dict) -> None:
        """Count a sample with no phrase beyond the whole caption; warn at the first (per process)."""
        if not _WARNED:
            _WARNED.append(True)
            log.warning("%s: sample %r has no phrase beyond the whole caption (no 'phrases' in its json, no "
                        ".njson): the powerset term sees the caption alone; add phrases with "
                        "tools/annotate_shards.py (such samples are counted as data/%s)",
                        sample.get("__url__"), sample.get("__key__"), CAPTION_ONLY)
        self._drop(CAPTION_ONLY)

    def _regions(self, boxes: list, window, rng: random.Random) -> list:
        """``region_cells``, counting stored boxes it does not use (cut away by the crop, or beyond
        ``data.num_regions``)."""
        if self.d.region_source == "precomputed" and boxes:
            inside = sum(1 for b in boxes if map_box(b, window) is not None)
            self._drop("field_box_outside_crop", len(boxes) - inside)
            self._drop("field_box_over_max", inside - self.d.num_regions)
        return region_cells(boxes, window, self.geo.grid, self.d.num_regions, self.d.region_source, rng)

    def _text_fields(self, sample: dict, ann: dict, caption: str, enc, image: torch.Tensor, window,
                     rng: random.Random, patches: tuple[np.ndarray, int] | None = None) -> dict:
        n_tok = len(enc.ids)
        # phrase nodes: root first (all real tokens), then tree nodes (or single tokens), deduplicated
        root = list(range(1, n_tok - 1))
        nodes = [root]
        seen = {tuple(root)}
        if self.d.phrase_unit == "token":
            cand = [[i] for i in range(1, n_tok - 1)]
        elif "phrases" not in ann and "njson" in sample:  # a published shard's own parse-tree phrases
            cand = self._njson_phrases(sample, caption, enc)
        else:
            cand = []
            for p in ann.get("phrases", []):
                if p.get("label") in PHRASE_LABELS and p.get("label") != "ROOT":
                    pos = span_positions(enc, int(p["start"]), int(p["end"]))
                    if pos is not None:
                        cand.append(pos)
                    else:  # a span outside the caption or cut by the context length
                        self._drop("field_phrase_span")
        if self.phrases_used and not any(tuple(p) != tuple(root) for p in cand):
            self._caption_only(sample)
        for i, pos in enumerate(cand):
            if len(nodes) >= self.d.max_phrases:
                self._drop("field_phrase_over_max", len(cand) - i)
                break
            if tuple(pos) not in seen:
                seen.add(tuple(pos))
                nodes.append(pos)
        # one value per Batch field, under its name (see data.collate.RULES for what each becomes)
        regions = patches[0] if patches is not None else self._regions(ann.get("boxes") or [], window, rng)
        out = {
            "keys": sample["__key__"], "images": image, "text": enc.ids, "token_valid": n_tok,
            "phrase_tokens": nodes, "phrase_valid": len(nodes),
            "region_masks": regions, "region_valid": len(regions),
            "meta": {"caption": caption, "label": ann.get("label"),
                     "eval_negatives": ann.get("eval_negatives") or {}, "url": sample.get("__url__")},
            "regions_dropped": patches[1] if patches is not None else 0,
        }
        if self.d.concepts:
            raw_concepts = ann.get("concepts", [])
            texts = [c["text"] for c in raw_concepts if c.get("text", "").strip()]
            self._drop("field_concept_empty", len(raw_concepts) - len(texts))
            if self.d.max_concepts_per_caption is not None:
                self._drop("field_concept_over_max", len(texts) - self.d.max_concepts_per_caption)
                texts = texts[: self.d.max_concepts_per_caption]
            texts = texts or [caption]  # docs/losses.md §3: a caption with no concept uses the whole caption
            out["concept_text"] = [self.tok.ids(t) for t in texts]
            out["concept_owner"] = len(texts)
            out["concept_ids"] = [concept_id(t) for t in texts]
        if self.d.num_negatives > 0:
            N = self.d.num_negatives
            raw_negs = ann.get("negatives", [])
            negs = [n["text"] for n in raw_negs if n.get("text", "").strip()]
            self._drop("field_negative_empty", len(raw_negs) - len(negs))
            if len(negs) > N:
                self._drop("field_negative_over_max", len(negs) - N)
                negs = [negs[i] for i in sorted(rng.sample(range(len(negs)), N))]
            out["neg_text"] = [self.tok.ids(t) for t in negs] + [[]] * (N - len(negs))
            out["neg_valid"] = [len(r) > 0 for r in out["neg_text"]]
        return out

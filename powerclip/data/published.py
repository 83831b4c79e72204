"""Reading PowerCLIP's published CC12M shards as they are: their ``.njson`` phrases and their region indices.

The authors' shards carry, next to the image and caption, SAM regions as patch indices
(``samlens.npy`` / ``samcat.npy``, read by ``read_patch_sets`` below) and the caption's parse-tree
phrases in ``{key}.njson``. Neither format has a public specification, so what this module assumes
is stated here and checked on real samples by ``powerclip check`` (and shown by
``tools/show_sample.py``):

* ``.njson``: JSON holding the phrases in CSR form, the number of tokens of each phrase and all
  phrases' CLIP BPE token ids concatenated: ``{"lens": [...], "ids": [...]}`` or the pair
  ``[lens, ids]``. Start/end-of-text ids inside a phrase are ignored. A phrase is placed in the
  caption by finding its ids as a contiguous run of the caption's CLIP tokens (the BPE encodes
  word by word, so a phrase's tokens are a run of the caption's); under another tokenizer its ids
  are decoded to text and found in the caption.
* region indices count either the patches of the grid from 0 (row-major) or the ViT's tokens with
  CLS at 0, the first patch being 1 (``data.region_index_base``). ``index_base_evidence`` tells
  them apart on a handful of samples: an index equal to grid² exists only in 1-based data, and the
  top-left patch, 0 in 0-based data, is in most images' regions, so a run of samples without any
  index 0 is 1-based.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import numpy as np
import orjson

SOT_ID, EOT_ID = 49406, 49407  # open_clip's CLIP BPE start/end-of-text ids


class NjsonError(ValueError):
    """A ``.njson`` member that is not the CSR phrase form described in the module docstring."""


def read_njson(raw: bytes) -> list[tuple[int, ...]]:
    """The phrases of one ``.njson`` member as CLIP token-id tuples (SOT/EOT removed, empty ones dropped)."""
    try:
        obj = orjson.loads(raw)
    except (orjson.JSONDecodeError, UnicodeDecodeError) as e:
        raise NjsonError(f"not JSON ({e})") from None
    if isinstance(obj, dict) and "lens" in obj and "ids" in obj:
        lens, ids = obj["lens"], obj["ids"]
    elif isinstance(obj, list) and len(obj) == 2 and all(isinstance(x, list) for x in obj):
        lens, ids = obj
    else:
        keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise NjsonError(f"expected {{'lens': [...], 'ids': [...]}} or [lens, ids], found {keys}")
    if not all(isinstance(n, int) and n >= 0 for n in lens) or not all(isinstance(i, int) for i in ids):
        raise NjsonError("lens and ids must be lists of non-negative integers")
    if sum(lens) != len(ids):
        raise NjsonError(f"lens sum to {sum(lens)} but ids hold {len(ids)} tokens")
    out, at = [], 0
    for n in lens:
        phrase = tuple(i for i in ids[at:at + n] if i not in (SOT_ID, EOT_ID))
        at += n
        if phrase:
            out.append(phrase)
    return out


def find_run(tokens: list[int], run: tuple[int, ...]) -> list[int] | None:
    """Positions of the first occurrence of ``run`` as a contiguous run of ``tokens`` (None if absent)."""
    n = len(run)
    first = run[0]
    for i in range(len(tokens) - n + 1):
        if tokens[i] == first and tuple(tokens[i:i + n]) == run:
            return list(range(i, i + n))
    return None


@functools.cache
def _clip_decoder():
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()


def decode_ids(ids: tuple[int, ...]) -> str:
    """CLIP BPE ids -> text (lower case, words separated by single spaces)."""
    return _clip_decoder().decode(list(ids)).strip()


def find_text(caption: str, text: str) -> tuple[int, int] | None:
    """Char span of ``text`` in ``caption``, ignoring case and how the words are spaced (CLIP's decoder
    puts spaces around punctuation that the caption may not have)."""
    words = [re.escape(w) for w in text.split()]
    if not words:
        return None
    m = re.search(r"\s*".join(words), caption, flags=re.IGNORECASE)
    return m.span() if m else None


# ----------------------------------------------------------------- regions as patch-index sets
class PatchRegionError(ValueError):
    """A sample's patch-index regions cannot be read (wrong dtype, shape or lengths)."""


def read_patch_sets(lens_npy: bytes, cat_npy: bytes) -> tuple[np.ndarray, np.ndarray]:
    """The CSR pair of ``{key}.samlens.npy`` (patch indices per region) and ``{key}.samcat.npy``
    (every region's patch indices, concatenated) as two int64 arrays, checked for consistency.

    Why CSR: regions have different sizes; two flat arrays are what SAM annotators store and
    avoid pickled object arrays (``allow_pickle`` stays off: a shard is untrusted input)."""
    import io

    try:
        lens = np.load(io.BytesIO(lens_npy), allow_pickle=False)
        cat = np.load(io.BytesIO(cat_npy), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise PatchRegionError(f"unreadable .npy: {e}") from None
    if lens.ndim != 1 or cat.ndim != 1 or lens.dtype.kind not in "iu" or (cat.size and cat.dtype.kind not in "iu"):
        raise PatchRegionError(f"samlens {lens.dtype}{list(lens.shape)} / samcat {cat.dtype}{list(cat.shape)}: "
                               "expected two 1-D integer arrays")
    lens, cat = lens.astype(np.int64), cat.astype(np.int64)
    if (lens < 0).any() or int(lens.sum()) != cat.size:
        raise PatchRegionError(f"samlens sums to {int(lens.sum())} but samcat holds {cat.size} indices")
    if (cat < 0).any():
        raise PatchRegionError("negative patch index in samcat")
    return lens, cat


# ----------------------------------------------------------------- region index base (0 or 1)
@dataclass
class IndexEvidence:
    """What the region indices of some samples say about their base, on a grid x grid patch grid."""

    samples: int = 0  # samples with at least one region index
    has_zero: bool = False
    has_top: bool = False  # an index equal to grid^2: the last patch of 1-based data
    max_index: int = -1

    def add(self, cat: np.ndarray, grid: int) -> None:
        if cat.size:
            self.samples += 1
            self.has_zero |= bool((cat == 0).any())
            self.has_top |= bool((cat == grid * grid).any())
            self.max_index = max(self.max_index, int(cat.max()))

    def base(self, grid: int) -> int | None:
        """0 or 1 when the indices say so, None when they fit neither base on this grid (or are absent)."""
        if not self.samples or self.max_index > grid * grid or (self.has_zero and self.has_top):
            return None
        return 0 if self.has_zero else 1

    def describe(self, grid: int) -> str:
        top = grid * grid
        if self.max_index > top:
            return f"an index {self.max_index} is beyond both bases of the {grid}x{grid} grid (max {top})"
        if self.has_zero and self.has_top:
            return f"indices 0 and {top} both occur, which fits neither base of the {grid}x{grid} grid"
        if self.has_top:
            return f"an index equals {top} = {grid}², the last patch when the indices are 1-based"
        if not self.has_zero:
            return f"no index is 0 in {self.samples} samples' regions (the top-left patch, when 0-based)"
        return "index 0 occurs and none reaches the grid size"

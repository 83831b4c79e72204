"""Metric definitions, written to give clip_benchmark's numbers on the same features.

* zero-shot: ``acc1``, ``acc5`` (NaN below 5 classes, as clip_benchmark), ``mean_per_class_recall``
  (sklearn's balanced accuracy: mean recall over the classes present in the targets).
* retrieval: ``image_retrieval_recall@k`` (per caption: its image is in the top-k images) and
  ``text_retrieval_recall@k`` (per image: at least one of its captions is in the top-k captions),
  computed with ``torch.topk`` like clip_benchmark, in row chunks so 10k x 50k never materialises.
* selection: a case is right when ``argmax`` over its captions is the correct caption (first index on
  ties, the reference tools' convention).
* Winoground: text / image / group scores with the paper's strict inequalities.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def zero_shot_metrics(logits: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    n, c = logits.shape
    if n == 0:
        raise ValueError("zero-shot evaluation on an empty dataset")
    top = logits.topk(min(5, c), dim=1).indices
    hit = top.eq(targets.view(-1, 1))
    acc1 = int(hit[:, 0].sum()) / n  # integer counts: exact, like clip_benchmark's float64 division
    acc5 = int(hit[:, :5].any(dim=1).sum()) / n if c >= 5 else float("nan")
    pred = top[:, 0]
    recalls = [int((pred[targets == k] == k).sum()) / int((targets == k).sum()) for k in targets.unique().tolist()]
    return {"acc1": acc1, "acc5": acc5, "mean_per_class_recall": sum(recalls) / len(recalls)}


def retrieval_metrics(image_features: torch.Tensor, text_features: torch.Tensor, text_to_image: torch.Tensor,
                      ks: Sequence[int] = (1, 5, 10), chunk: int = 1024) -> dict[str, float]:
    """``text_to_image[j]``: index of the image that caption j belongs to."""
    caption_rank, image_rank = retrieval_ranks(image_features, text_features, text_to_image, max(ks), chunk)
    out: dict[str, float] = {}
    for k in ks:
        out[f"image_retrieval_recall@{k}"] = sum(r < k for r in caption_rank) / len(caption_rank)
        out[f"text_retrieval_recall@{k}"] = sum(r < k for r in image_rank) / len(image_rank)
    return out


def retrieval_ranks(image_features: torch.Tensor, text_features: torch.Tensor, text_to_image: torch.Tensor,
                    kmax: int = 10, chunk: int = 1024) -> tuple[list[int], list[int]]:
    """Per query, the 0-based rank of its first hit among the top ``kmax`` (``kmax`` where none is):
    (per caption, text -> image; per image, image -> text). Recall@k is the share of ranks below k;
    kept per item so that any recall can be recomputed, or resampled over items."""
    n_img, n_txt = image_features.shape[0], text_features.shape[0]
    if n_img == 0 or n_txt == 0:
        raise ValueError("retrieval evaluation needs at least one image and one caption")
    caption_rank: list[int] = []
    for s in range(0, n_txt, chunk):
        scores = text_features[s:s + chunk] @ image_features.T
        top = scores.topk(min(kmax, n_img), dim=1).indices
        caption_rank += _first_hit(top.eq(text_to_image[s:s + chunk].view(-1, 1)), kmax)
    # image -> text: for every image, the first of its captions among the top captions
    image_rank: list[int] = []
    for s in range(0, n_img, chunk):
        scores = image_features[s:s + chunk] @ text_features.T
        top = scores.topk(min(kmax, n_txt), dim=1).indices
        owner = text_to_image[top]  # [chunk, kmax] image index of each retrieved caption
        rows = torch.arange(s, s + scores.shape[0]).view(-1, 1)
        image_rank += _first_hit(owner.eq(rows), kmax)
    return caption_rank, image_rank


def _first_hit(hit: torch.Tensor, kmax: int) -> list[int]:
    """Per row of a boolean [n, k] tensor, the index of its first True (``kmax`` where none)."""
    first = torch.where(hit.any(dim=1), hit.int().argmax(dim=1), torch.full((hit.shape[0],), kmax))
    return [int(v) for v in first]


def selection_correct(image_feature: torch.Tensor, caption_features: torch.Tensor, correct: int,
                      ties: str = "strict") -> bool:
    """Whether the right caption wins. ``ties="strict"``: only if its score is above every other one
    (SugarCrepe's and VALSE's ``>``: a negative identical to the caption is wrong, not a coin flip of
    the order); ``"first"``: argmax, the first of equal scores wins (ARO's ``np.argmax``).

    Identical caption rows get bit-identical scores: each distinct row is scored once, because a
    matrix-vector product may round two equal rows differently (BLAS kernels split rows unevenly).
    """
    if ties not in ("strict", "first"):
        raise ValueError(f"ties must be 'strict' or 'first', got {ties!r}")
    distinct, row_of = torch.unique(caption_features, dim=0, return_inverse=True)
    scores = (distinct @ image_feature)[row_of]
    if ties == "first":
        return int(torch.argmax(scores)) == correct
    others = torch.cat([scores[:correct], scores[correct + 1:]])
    return bool(others.numel() == 0 or scores[correct] > others.max())


def winoground_scores(s: torch.Tensor) -> tuple[bool, bool, bool]:
    """``s[c, i]`` = similarity of caption c and image i (2 x 2); (text, image, group) correct."""
    text = bool(s[0, 0] > s[1, 0]) and bool(s[1, 1] > s[0, 1])
    image = bool(s[0, 0] > s[0, 1]) and bool(s[1, 1] > s[1, 0])
    return text, image, text and image


def pair_assignment(s: torch.Tensor) -> float:
    """``s[c, i]`` (2 x 2): 1 when the matched pairs outscore the crossed ones (s00 + s11 > s01 + s10,
    the binding term of ``winoground_terms`` is positive), 0 when they score less, 0.5 on a tie.

    Why: it is the choice between the two ways of pairing two captions with two images. A caption or an
    image prior cancels out of it, so any scorer blind to what tells the pair apart scores 0.5 in
    expectation (a tie: exactly 0.5), whereas the Winoground text / image / group scores of a blind
    scorer depend on how its errors correlate within a pair (chance 1/4, 1/4, 1/6 only for independent
    random scores).
    """
    b = float(s[0, 0] + s[1, 1] - s[0, 1] - s[1, 0])
    return 1.0 if b > 0 else 0.0 if b < 0 else 0.5


def winoground_terms(s: torch.Tensor) -> tuple[float, float, float]:
    """``s[c, i]`` (2 x 2) split into a binding term and two priors: (B, Pc, Pi) with
    B = s00 + s11 - s01 - s10 (how much the matched pairs beat the crossed ones),
    Pc = s00 + s01 - s10 - s11 (caption 0 over caption 1, whatever the image) and
    Pi = s00 + s10 - s01 - s11 (image 0 over image 1, whatever the caption).

    Why: the text score holds exactly when B > |Pc| and the image score when B > |Pi|, so a method
    that grows B can leave a score unchanged by growing the prior that score has to beat.
    """
    b = float(s[0, 0] + s[1, 1] - s[0, 1] - s[1, 0])
    pc = float(s[0, 0] + s[0, 1] - s[1, 0] - s[1, 1])
    pi = float(s[0, 0] + s[1, 0] - s[0, 1] - s[1, 1])
    return b, pc, pi


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan

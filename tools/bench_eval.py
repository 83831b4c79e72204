#!/usr/bin/env python
"""How long the synthetic benchmark takes for a ViT-B/16 at 224 px (random init), extrapolated to 10k.

Writes N heldout samples at 224 px with powerclip.data.synthetic (unless --data is given), builds
open_clip's ViT-B-16 without weights, and times ``powerclip.eval.evaluate(task="synthetic")`` (zero-shot
+ retrieval + every negative kind, images encoded once) end to end, plus the image-encoding part alone.
The 10k figures are linear extrapolations of the measured per-image cost (encoding is linear in N; the
retrieval similarity matrix is quadratic but tiny at 10k x 10k): ``extrapolated_10k_*`` from wall time
as measured (includes whatever else loads the machine), ``idle_estimate_10k_min`` from this process's
CPU seconds divided by the torch threads (what the same run takes on an otherwise idle machine).

Example: python tools/bench_eval.py --n 256 --batch-size 64 --workers 1
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import open_clip  # noqa: E402
import torch  # noqa: E402

from powerclip.eval import evaluate  # noqa: E402
from powerclip.eval.encode import encode_images  # noqa: E402
from powerclip.eval.sources import ImageDataset  # noqa: E402
from powerclip.eval.synthetic import load_synthetic  # noqa: E402


def _time_encoders(timers: dict) -> None:
    """Accumulate the wall time of the image and caption encoders used inside ``evaluate``."""
    import powerclip.eval.api as api

    enc_img, enc_txt = api.encode_images, api.encode_texts

    def images(*args, **kwargs):
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            return enc_img(*args, **kwargs)
        finally:
            timers["images"] += time.perf_counter() - t0
            timers["images_cpu"] += time.process_time() - c0

    def texts(model, tokenizer, texts, *args, **kwargs):
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            return enc_txt(model, tokenizer, texts, *args, **kwargs)
        finally:
            timers["texts"] += time.perf_counter() - t0
            timers["texts_cpu"] += time.process_time() - c0
            timers["n_texts"] += len(texts)

    api.encode_images, api.encode_texts = images, texts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=256, help="heldout images to generate and evaluate")
    p.add_argument("--data", default=None, help="existing make_synthetic output (skips generation)")
    p.add_argument("--model", default="ViT-B-16")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=1, help="image decoding processes")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    p.add_argument("--amp", action="store_true", help="bf16 autocast on CPU / fp16 on GPU")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default=None, help="also write the figures to this file")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(a.data) if a.data else Path(tmp) / "synth"
        t_gen = 0.0
        if not a.data:
            from powerclip.data.synthetic import make_synthetic

            t0 = time.perf_counter()
            make_synthetic(root, train_shards=0, val_shards=0, heldout_shards=1, per_shard=a.n, image_size=224,
                           image_format="jpg", binding_pairs=0)  # the bench times the per-scene sets
            t_gen = time.perf_counter() - t0
        model, _, preprocess = open_clip.create_model_and_transforms(a.model, device=a.device)
        tokenizer = open_clip.get_tokenizer(a.model)
        model.eval()
        bench = load_synthetic(root)
        n = len(bench.images)

        # warm-up (first-call allocations, thread pools) on one small batch, not timed
        encode_images(model, ImageDataset(bench.images[: min(n, 4)], preprocess), 4, 0, a.amp)
        timers = {"images": 0.0, "texts": 0.0, "images_cpu": 0.0, "texts_cpu": 0.0, "n_texts": 0}
        _time_encoders(timers)
        t0, c0 = time.perf_counter(), time.process_time()
        res = evaluate(model, preprocess, tokenizer, "synthetic", root, batch_size=a.batch_size,
                       workers=a.workers, amp=a.amp)
        t_all, cpu_all = time.perf_counter() - t0, time.process_time() - c0
        t_img = timers["images"]

    fig = {"model": a.model, "device": a.device, "image_size": 224, "n_images": n, "batch_size": a.batch_size,
           "workers": a.workers, "threads": torch.get_num_threads(), "amp": a.amp,
           "generate_s": round(t_gen, 2), "encode_images_s": round(t_img, 2),
           "images_per_s": round(n / t_img, 2), "n_texts": timers["n_texts"],
           "encode_texts_s": round(timers["texts"], 2),
           "zero_shot_classifier_and_metrics_s": round(t_all - t_img - timers["texts"], 2),
           "synthetic_benchmark_s": round(t_all, 2),
           # CPU seconds of this process (all torch threads; excludes decoding workers): unlike wall
           # time they hardly depend on what else runs on the machine. cpu_s / threads ~ idle wall time.
           "cpu_s_per_image": round(timers["images_cpu"] / n, 3),
           "cpu_s_per_text": round(timers["texts_cpu"] / max(1, timers["n_texts"]), 3),
           "cpu_s_total": round(cpu_all, 1),
           # per-image part (images + their captions/negatives) scales with N; the zero-shot classifier
           # (classes x templates) and metrics are a fixed cost
           "idle_estimate_10k_min": round(((timers["images_cpu"] + timers["texts_cpu"]) / n * 10_000
                                           + cpu_all - timers["images_cpu"] - timers["texts_cpu"])
                                          / torch.get_num_threads() / 60, 1),
           "extrapolated_10k_s": round(t_all / n * 10_000, 1),
           "extrapolated_10k_min": round(t_all / n * 10_000 / 60, 1),
           "datasets": sorted(res)}
    print(json.dumps(fig, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(fig, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

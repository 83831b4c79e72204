"""Periodic evaluation during training: ``cfg.eval.tasks`` every ``cfg.eval.every_steps`` steps.

Each entry of ``cfg.eval.tasks`` is ``"TASK:ROOT"`` (e.g. ``"synthetic:data/synth"``,
``"zeroshot_classification:/data/wds/cifar10"``, ``"sugar_crepe:/data/sugarcrepe"``). Every rank calls
``run_periodic_eval`` (features are sharded over ranks); rank 0 logs ``eval/<dataset>/<metric>`` to
TensorBoard and writes ``RUN/eval/step_<N>.json`` (a list of clip_benchmark-schema records).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2

from powerclip import distributed as pdist
from powerclip.atomic import write_json_atomic
from powerclip.config import Config, aug_preprocess
from powerclip.eval.api import EvalOptions, evaluate, flatten, unwrap
from powerclip.eval.results import record


def parse_task(spec: str) -> tuple[str, str]:
    task, sep, root = spec.partition(":")
    if not sep or not task or not root:
        raise ValueError(f"eval.tasks entry {spec!r} must be 'TASK:ROOT' (e.g. 'synthetic:data/synth')")
    return task, root


def eval_transform(clip: torch.nn.Module, overrides: dict | None = None):
    """open_clip's inference transform for this model (what an export of it would use): the model's
    preprocess config with ``overrides`` (the run's ``aug.mean/std/interpolation/resize_mode``) over it."""
    cfg = {**open_clip.get_model_preprocess_cfg(clip), **(overrides or {})}
    return image_transform_v2(PreprocessCfg(**cfg), is_train=False)


def text_tokenizer(cfg: Config):
    """The run's tokenizer (data.tokenizer) as open_clip's ``list[str] -> LongTensor[N, L]`` callable."""
    from powerclip.data.text import build_tokenizer, to_row

    tok = build_tokenizer(cfg.data.tokenizer, cfg.data.context_length)

    def tokenize(texts: list[str] | str) -> torch.Tensor:
        texts = [texts] if isinstance(texts, str) else texts
        return torch.stack([to_row(tok.encode(t), cfg.data.context_length) for t in texts])

    return tokenize


def run_periodic_eval(model: torch.nn.Module, cfg: Config, step: int, writer: Any | None = None,
                      tokenizer=None) -> dict[str, dict]:
    """Evaluate ``cfg.eval.tasks`` now; log to ``writer`` (a SummaryWriter) and the run folder."""
    clip = unwrap(model)
    preprocess = eval_transform(clip, aug_preprocess(cfg))
    tokenizer = tokenizer or text_tokenizer(cfg)
    # no autocast: the engine's module already holds the run's dtype (bf16/fp16 under DeepSpeed) and
    # encode_images feeds images in that dtype
    opts = EvalOptions(batch_size=cfg.eval.batch_size, text_batch_size=max(cfg.eval.batch_size, 64),
                       workers=cfg.eval.workers)
    results: dict[str, dict] = {}
    for spec in cfg.eval.tasks:
        task, root = parse_task(spec)
        if not Path(root).exists():
            raise FileNotFoundError(f"eval.tasks entry {spec!r}: {root} does not exist")
        results.update(evaluate(clip, preprocess, tokenizer, task, root, opts))
    if pdist.rank() == 0:
        for key, value in flatten(results).items():
            if writer is not None:
                writer.add_scalar(key, value, step)
        name = cfg.model.name or "custom"
        recs = [dict(record(ds, r["task"], r["metrics"], name, f"{cfg.train.run_dir}@step{step}"), step=step)
                for ds, r in results.items()]
        path = Path(cfg.train.run_dir) / "eval" / f"step_{step:08d}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, recs)
        if writer is not None:
            writer.flush()
    return results

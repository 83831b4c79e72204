"""``powerclip export RUN_OR_CHECKPOINT --out DIR``: a training run -> a plain open_clip folder.

The folder holds ``open_clip_config.json`` ({"model_cfg", "preprocess_cfg"}) and
``open_clip_model.safetensors`` with exactly the keys of the open_clip model that config builds,
so ``open_clip.create_model_and_transforms('local-dir:DIR')`` loads it strictly. Training-only
parameters (a DeGLA teacher, anything outside ``PowerClipModel.clip``) are dropped, and the logit
scale/bias go back to open_clip's 0-dim form unless the model_cfg says ``nonscalar_logit_scale``.

Where the weights come from:

* RUN: a run folder (``RUN/config.yaml`` + ``RUN/checkpoints/latest``);
* CHECKPOINT: a checkpoint root holding ``latest``, or one tag folder ``RUN/checkpoints/<tag>``.

The checkpoint is found and consolidated to fp32 by ``powerclip.checkpoints`` (every ZeRO stage,
every file read with ``weights_only=True``: a checkpoint from elsewhere cannot run code).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from powerclip.checkpoints.discovery import CheckpointError
from powerclip.outputs import check_output_dir, follow_umask, make_private, new_dir_beside, swap_in

if TYPE_CHECKING:
    import torch

# torch, DeepSpeed and open_clip are imported where the work starts, so that ``powerclip export
# --help`` and a refused --out answer at once

log = logging.getLogger(__name__)


class ExportError(CheckpointError):
    """The source cannot be exported; the message names the path and the problem.

    A ``CheckpointError``: a source that is no usable checkpoint is reported the same way whether
    the export found it out or the checkpoint reader did."""


# ------------------------------------------------------------------------------ export
def is_previous_export(path: Path) -> bool:
    """``path`` holds an export and nothing else (so replacing it loses nothing)."""
    from powerclip.model.factory import CONFIG_NAME, WEIGHTS_NAME

    names = {p.name for p in path.iterdir()}
    return CONFIG_NAME in names and names <= {CONFIG_NAME, WEIGHTS_NAME}


def export_open_clip(model_or_state: torch.nn.Module | dict[str, torch.Tensor], model_cfg: dict[str, Any],
                     preprocess: dict[str, Any], out_dir: str | Path, text_pool: str = "default",
                     private: bool = False) -> Path:
    """Write an open_clip folder at ``out_dir`` atomically (tmp folder, then rename).

    ``out_dir`` may be new, empty or a previous export (exactly the files an export writes), which
    is replaced; any other folder is refused (``OutputFolderError``), so an export never deletes a
    run, checkpoints or files someone put there. The files follow the process umask;
    ``private=True`` makes them owner-only.

    ``text_pool="mean"`` is recorded as ``"powerclip": {"text_pool": "mean"}`` next to open_clip's
    keys, and ``model_cfg`` gets ``OPEN_CLIP_REFUSAL_KEY``: open_clip alone cannot pool text by token
    mean, so it refuses the folder with a message naming powerclip's loader rather than loading a
    model that encodes text differently (powerclip's evaluation applies the mean).

    ``model_or_state``: a PowerClipModel, a bare open_clip model, or a state dict of either (any
    prefix; extra training-only keys are dropped). Returns ``out_dir``.
    """
    import torch
    from safetensors.torch import save_file

    from powerclip.model.clip_model import PowerClipModel
    from powerclip.model.factory import (
        CONFIG_NAME,
        OPEN_CLIP_REFUSAL_KEY,
        WEIGHTS_NAME,
        ModelLoadError,
        extract_clip_state_dict,
        reference_model,
    )

    if isinstance(model_or_state, PowerClipModel):
        state = model_or_state.clip.state_dict()
    elif isinstance(model_or_state, torch.nn.Module):
        state = model_or_state.state_dict()
    else:
        state = dict(model_or_state)
    ref = reference_model(model_cfg)
    try:
        weights = extract_clip_state_dict(ref, state)
    except ModelLoadError as e:
        raise ExportError(f"weights do not fit model_cfg: {e}") from e
    expected = ref.state_dict()
    if set(weights) != set(expected):
        raise ExportError(f"exported keys differ from open_clip's: missing {sorted(set(expected) - set(weights))[:8]}")
    for k, v in weights.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise ExportError(f"{k}: shape {tuple(v.shape)} != open_clip's {tuple(expected[k].shape)} "
                              "(a live ZeRO-3 model holds only partitions: export its checkpoint instead)")
    tensors = {k: (v.detach().to("cpu", torch.float32) if v.is_floating_point() else v.detach().cpu())
               .contiguous().clone() for k, v in weights.items()}
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ExportError(f"refusing to export non-finite weights: {len(bad)} tensors hold NaN/inf, e.g. "
                          f"{bad[:4]}")

    out_dir = check_output_dir(out_dir, is_previous_export, "a previous export")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = new_dir_beside(out_dir, private)
    try:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        meta: dict[str, Any] = {"model_cfg": model_cfg, "preprocess_cfg": preprocess}
        if text_pool != "default":
            meta["powerclip"] = {"text_pool": text_pool}
            # open_clip would pool the text at EOT: make it refuse the folder instead (factory.OPEN_CLIP_REFUSAL_KEY)
            meta["model_cfg"] = {**model_cfg, OPEN_CLIP_REFUSAL_KEY: True}
        (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2))
        if private:
            make_private(tmp)
        else:
            follow_umask(tmp / WEIGHTS_NAME)  # safetensors creates its file owner-only
        swap_in(tmp, out_dir, is_previous_export)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def run_preprocess_cfg(cfg, model_cfg: dict[str, Any]) -> dict[str, Any]:
    """open_clip's preprocess_cfg for a run's export: the model's, with the run's ``aug.mean``, ``aug.std``,
    ``aug.interpolation`` and ``aug.resize_mode`` over it, so open_clip's own transforms match training's."""
    from powerclip.config import aug_preprocess
    from powerclip.model.factory import preprocess_cfg, reference_model

    return {**preprocess_cfg(reference_model(model_cfg)), **aug_preprocess(cfg)}


def export_checkpoint(path: str | Path, out_dir: str | Path, tag: str | None = None,
                      config_path: str | Path | None = None, nonscalar_logit_scale: bool = False,
                      private: bool | None = None) -> Path:
    """Consolidate a run/checkpoint and export it with the model config of the run's config.yaml.

    ``private=None``: owner-only when the run's config says ``checkpoint.private``."""
    from powerclip.checkpoints.consolidate import consolidate_checkpoint
    from powerclip.checkpoints.discovery import resolve_checkpoint
    from powerclip.config import load_config
    from powerclip.model.factory import model_cfg_dict

    check_output_dir(out_dir, is_previous_export, "a previous export")  # before the slow consolidation
    ref = resolve_checkpoint(path, tag)
    cfg_file = Path(config_path) if config_path else ref.config
    if cfg_file is None or not cfg_file.is_file():
        raise ExportError(f"no config.yaml for {path} (looked at {cfg_file}); pass --config")
    cfg = load_config(cfg_file)
    model_cfg = model_cfg_dict(cfg.model)
    if nonscalar_logit_scale:
        model_cfg["nonscalar_logit_scale"] = True
    state = consolidate_checkpoint(ref.root, ref.tag)
    preprocess = run_preprocess_cfg(cfg, model_cfg)
    log.info("exporting %s (tag %s) to %s", ref.root, ref.tag, out_dir)
    private = cfg.checkpoint.private if private is None else private
    return export_open_clip(state, model_cfg, preprocess, out_dir, text_pool=cfg.model.pool, private=private)


# ------------------------------------------------------------------------------ CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", metavar="RUN_OR_CHECKPOINT",
                        help="run folder, checkpoint root (with 'latest') or one checkpoint folder")
    parser.add_argument("--out", required=True,
                        help="output folder: new, empty or a previous export (replaced atomically)")
    parser.add_argument("--tag", default=None, help="checkpoint tag (default: the 'latest' pointer)")
    parser.add_argument("--config", default=None, help="config.yaml (default: the run's own)")
    parser.add_argument("--nonscalar-logit-scale", action="store_true",
                        help="keep logit_scale as shape [1] (open_clip's nonscalar_logit_scale)")
    parser.add_argument("--private", action="store_true", default=None,
                        help="owner-only files (default: the process umask, or the run's checkpoint.private)")


def main(args: argparse.Namespace) -> int:
    try:
        out = export_checkpoint(args.source, args.out, tag=args.tag, config_path=args.config,
                                nonscalar_logit_scale=args.nonscalar_logit_scale, private=args.private)
    except CheckpointError as e:  # ExportError, or a source that is no usable checkpoint
        print(f"powerclip export: error: {e}")
        return 2
    print(f"exported {args.source} -> {out} (load with open_clip.create_model_and_transforms('local-dir:{out}'))")
    return 0

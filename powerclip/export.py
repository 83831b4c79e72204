"""``powerclip export RUN_OR_CHECKPOINT --out DIR``: a training run -> a plain open_clip folder.

The folder holds ``open_clip_config.json`` ({"model_cfg", "preprocess_cfg"}) and
``open_clip_model.safetensors`` with exactly the keys of the open_clip model that config builds,
so ``open_clip.create_model_and_transforms('local-dir:DIR')`` loads it strictly. Training-only
parameters (a DeGLA teacher, anything outside ``PowerClipModel.clip``) are dropped, and the logit
scale/bias go back to open_clip's 0-dim form unless the model_cfg says ``nonscalar_logit_scale``.

Where the weights come from:

* RUN: a run folder (``RUN/config.yaml`` + ``RUN/checkpoints/latest``);
* CHECKPOINT: a checkpoint root holding ``latest``, or one tag folder ``RUN/checkpoints/<tag>``.

DeepSpeed checkpoints of ZeRO stage 1/2/3 are consolidated to fp32 with DeepSpeed's own
``zero_to_fp32`` merge, stage 0 stores the full module state; either way every file is read with
``weights_only=True`` (``powerclip.train.safe_load``): a checkpoint from elsewhere cannot run code.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

log = logging.getLogger(__name__)

CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"


class ExportError(RuntimeError):
    """The source cannot be exported; the message names the path and the problem."""


# ------------------------------------------------------------------------------ checkpoints
@dataclass
class CheckpointRef:
    root: Path  # the folder passed to engine.save_checkpoint (holds ``latest``)
    tag: str  # the sub-folder of one checkpoint
    config: Path | None  # the run's resolved config.yaml, when found

    @property
    def dir(self) -> Path:
        return self.root / self.tag


def _read_latest(root: Path) -> str:
    latest = root / "latest"
    if not latest.is_file():
        raise ExportError(f"{root}: no 'latest' file (is this a checkpoint root?)")
    tag = latest.read_text().strip()
    if not (root / tag).is_dir():
        raise ExportError(f"{root}/latest points to {tag!r}, which does not exist")
    return tag


def _is_tag_dir(path: Path) -> bool:
    return any(path.glob("*model_states.pt"))


def resolve_checkpoint(path: str | Path, tag: str | None = None) -> CheckpointRef:
    """Find (root, tag, config.yaml) for a run folder, checkpoint root or tag folder."""
    path = Path(path)
    if not path.is_dir():
        raise ExportError(f"{path} is not a folder (expected a run folder or a DeepSpeed checkpoint)")
    if (path / "checkpoints").is_dir():
        root = path / "checkpoints"
        return CheckpointRef(root, tag or _read_latest(root), path / "config.yaml")
    if (path / "latest").is_file() or (tag and (path / tag).is_dir()):
        return CheckpointRef(path, tag or _read_latest(path), path.parent / "config.yaml")
    if _is_tag_dir(path):
        return CheckpointRef(path.parent, path.name, path.parent.parent / "config.yaml")
    raise ExportError(f"{path}: neither a run folder (checkpoints/), a checkpoint root (latest) "
                      f"nor a checkpoint folder (*model_states.pt)")


def consolidate_checkpoint(path: str | Path, tag: str | None = None) -> dict[str, torch.Tensor]:
    """The full fp32 state dict of the trained module, from a checkpoint of any ZeRO stage."""
    ref = resolve_checkpoint(path, tag)
    if not _is_tag_dir(ref.dir):
        raise ExportError(f"{ref.dir}: no *model_states.pt files, not a DeepSpeed checkpoint")
    from powerclip.train import ckpt_integrity
    from powerclip.train.safe_load import CheckpointReadError, consolidate_zero, safe_load

    if (ref.dir / ckpt_integrity.MANIFEST).is_file():
        try:
            ckpt_integrity.verify(ref.dir)
        except ckpt_integrity.CheckpointIntegrityError as e:
            raise ExportError(str(e)) from None
    else:
        log.warning("%s has no %s: its files cannot be verified", ref.dir, ckpt_integrity.MANIFEST)
    try:
        if any(ref.dir.glob("*zero_pp_rank_*optim_states.pt")):
            return consolidate_zero(ref.dir)
        # ZeRO stage 0: one rank's module state holds every parameter (in the training dtype)
        files = sorted(ref.dir.glob("mp_rank_*_model_states.pt"))
        if not files:
            raise ExportError(f"{ref.dir}: no mp_rank_*_model_states.pt")
        state = safe_load(files[0])
    except CheckpointReadError as e:
        raise ExportError(str(e)) from None
    module = state.get("module") if isinstance(state, dict) else None
    if not isinstance(module, dict):
        raise ExportError(f"{files[0]}: no 'module' state dict")
    return _stage0_fp32(module, state.get("optimizer"))


def _stage0_fp32(module: dict[str, torch.Tensor], optimizer: Any) -> dict[str, torch.Tensor]:
    """Stage-0 weights in fp32: the fp32 master copies when the run was bf16/fp16.

    DeepSpeed's stage-0 mixed-precision optimizers save ``fp32_groups`` (lists of master tensors in
    param-group order) without names. Each group is a subsequence of the module's parameter order,
    and each master rounds to the saved low-precision weight, so a left-to-right match on shape and
    rounded value names them. If that fails, the saved module weights are used (with a warning).
    """
    out = {k: (v.float() if v.is_floating_point() else v) for k, v in module.items()}
    groups = optimizer.get("fp32_groups") if isinstance(optimizer, dict) else None
    low = {k: v for k, v in module.items() if v.is_floating_point() and v.dtype != torch.float32}
    if not groups or not low:
        return out
    names = list(low)
    used: set[str] = set()
    masters: dict[str, torch.Tensor] = {}
    for group in groups:
        if not isinstance(group, (list, tuple)):
            log.warning("stage-0 fp32 master groups are flat; exporting the %s module weights",
                        next(iter(low.values())).dtype)
            return out
        start = 0
        for t in group:
            for i in range(start, len(names)):
                n = names[i]
                if n not in used and low[n].shape == t.shape and torch.equal(t.to(low[n].dtype), low[n]):
                    masters[n], start = t.float(), i + 1
                    used.add(n)
                    break
            else:
                log.warning("could not name the stage-0 fp32 master weights; exporting the %s module weights",
                            next(iter(low.values())).dtype)
                return out
    out.update(masters)
    return out


# ------------------------------------------------------------------------------ export
def _reference_model(model_cfg: dict[str, Any]) -> torch.nn.Module:
    """The open_clip model ``model_cfg`` builds, on the meta device (keys and shapes only)."""
    from powerclip.model.factory import _build_from_dict

    with torch.device("meta"):
        return _build_from_dict(model_cfg, {})


def export_open_clip(model_or_state: torch.nn.Module | dict[str, torch.Tensor], model_cfg: dict[str, Any],
                     preprocess: dict[str, Any], out_dir: str | Path, text_pool: str = "default") -> Path:
    """Write an open_clip folder at ``out_dir`` atomically (tmp folder, then rename).

    ``text_pool="mean"`` is recorded as ``"powerclip": {"text_pool": "mean"}`` next to open_clip's
    keys (open_clip reads only model_cfg/preprocess_cfg, so the folder still loads there, but with
    open_clip's EOT pooling of the text tower; powerclip's evaluation applies the mean).

    ``model_or_state``: a PowerClipModel, a bare open_clip model, or a state dict of either (any
    prefix; extra training-only keys are dropped). Returns ``out_dir``.
    """
    from powerclip.model.clip_model import PowerClipModel
    from powerclip.model.factory import ModelLoadError, extract_clip_state_dict

    if isinstance(model_or_state, PowerClipModel):
        state = model_or_state.clip.state_dict()
    elif isinstance(model_or_state, torch.nn.Module):
        state = model_or_state.state_dict()
    else:
        state = dict(model_or_state)
    ref = _reference_model(model_cfg)
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

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        meta: dict[str, Any] = {"model_cfg": model_cfg, "preprocess_cfg": preprocess}
        if text_pool != "default":
            meta["powerclip"] = {"text_pool": text_pool}
        (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2))
        old = None
        if out_dir.exists():
            old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
            out_dir.rename(old)
        tmp.rename(out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def export_checkpoint(path: str | Path, out_dir: str | Path, tag: str | None = None,
                      config_path: str | Path | None = None, nonscalar_logit_scale: bool = False) -> Path:
    """Consolidate a run/checkpoint and export it with the model config of the run's config.yaml."""
    from powerclip.config import load_config
    from powerclip.model.factory import model_cfg_dict

    ref = resolve_checkpoint(path, tag)
    cfg_file = Path(config_path) if config_path else ref.config
    if cfg_file is None or not cfg_file.is_file():
        raise ExportError(f"no config.yaml for {path} (looked at {cfg_file}); pass --config")
    cfg = load_config(cfg_file)
    model_cfg = model_cfg_dict(cfg.model)
    if nonscalar_logit_scale:
        model_cfg["nonscalar_logit_scale"] = True
    state = consolidate_checkpoint(ref.root, ref.tag)
    ref_model = _reference_model(model_cfg)
    preprocess = _preprocess_of(ref_model)
    log.info("exporting %s (tag %s) to %s", ref.root, ref.tag, out_dir)
    return export_open_clip(state, model_cfg, preprocess, out_dir, text_pool=cfg.model.pool)


def _preprocess_of(meta_model: torch.nn.Module) -> dict[str, Any]:
    import open_clip

    pre = open_clip.get_model_preprocess_cfg(meta_model)
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in pre.items()}


# ------------------------------------------------------------------------------ CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", metavar="RUN_OR_CHECKPOINT",
                        help="run folder, checkpoint root (with 'latest') or one checkpoint folder")
    parser.add_argument("--out", required=True, help="output folder (replaced atomically)")
    parser.add_argument("--tag", default=None, help="checkpoint tag (default: the 'latest' pointer)")
    parser.add_argument("--config", default=None, help="config.yaml (default: the run's own)")
    parser.add_argument("--nonscalar-logit-scale", action="store_true",
                        help="keep logit_scale as shape [1] (open_clip's nonscalar_logit_scale)")


def main(args: argparse.Namespace) -> int:
    try:
        out = export_checkpoint(args.source, args.out, tag=args.tag, config_path=args.config,
                                nonscalar_logit_scale=args.nonscalar_logit_scale)
    except ExportError as e:
        print(f"powerclip export: error: {e}")
        return 2
    print(f"exported {args.source} -> {out} (load with open_clip.create_model_and_transforms('local-dir:{out}'))")
    return 0

"""Load the model to evaluate from an export folder, a run folder or a DeepSpeed checkpoint.

An export folder (``open_clip_config.json`` + ``open_clip_model.safetensors``) is loaded by open_clip
itself through ``local-dir:``, exactly as clip_benchmark and every other open_clip user would load it,
so the numbers ``powerclip eval`` reports are the numbers of the artefact users receive. Run folders and
checkpoints are first exported by ``powerclip.export`` (which reads them through
``powerclip.checkpoints``, the one place that knows the checkpoint layout) into a temporary export
folder, then loaded the same way.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch

from powerclip.errors import UserError
from powerclip.model.factory import CONFIG_NAME, OPEN_CLIP_REFUSAL_KEY, WEIGHTS_NAME, open_clip_model_cfg

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """What every evaluation needs: the model (eval mode), its eval transform and tokenizer."""

    model: torch.nn.Module
    preprocess: Callable[[Any], torch.Tensor]
    tokenizer: Callable[..., torch.Tensor]
    name: str  # "model" field of the clip_benchmark result schema
    pretrained: str  # "pretrained" field: the path the weights came from


class ExportMismatchError(UserError, ValueError):
    """An export folder's config does not describe its weights; the message names key and file."""


def check_export(path: Path) -> list[str]:
    """Compare an export's ``open_clip_config.json`` with its weights before open_clip loads them.

    open_clip quietly interpolates position embeddings whose length differs from the config's
    (context length, image size), so an edited or mixed-up config evaluates a different model and
    reports different numbers without a word. Refused: a weight whose shape differs from the one
    the config builds, missing or unexpected weights, a preprocessing size other than the model's
    image size. Returned as warnings: preprocessing (mean, std, interpolation, resize mode) other
    than open_clip's default for that model, which is what ``powerclip export`` writes unless the run
    set ``aug.mean``, ``aug.std``, ``aug.interpolation`` or ``aug.resize_mode`` (then the warning names them).
    """
    import json

    from safetensors import safe_open

    from powerclip.model.factory import preprocess_cfg, reference_model

    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        return [f"{path}: no {WEIGHTS_NAME}; the config cannot be checked against the weights"]
    try:
        cfg = json.loads((path / CONFIG_NAME).read_text())
        model_cfg, pre = open_clip_model_cfg(cfg["model_cfg"]), cfg.get("preprocess_cfg", {})
        ref = reference_model(model_cfg)
    except (ValueError, KeyError, TypeError) as e:
        raise ExportMismatchError(f"{path / CONFIG_NAME}: unusable model_cfg ({e})") from None
    expected = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    with safe_open(str(weights), "pt") as f:
        have = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    for k in sorted(set(have) & set(expected)):
        if have[k] != expected[k] and not (k in ("logit_scale", "logit_bias") and
                                           max(len(have[k]), len(expected[k])) <= 1):
            hint = {"positional_embedding": " (model_cfg.text_cfg.context_length)",
                    "visual.positional_embedding": " (model_cfg.vision_cfg.image_size / patch_size)"}.get(k, "")
            raise ExportMismatchError(f"{path}: weight {k} has shape {list(have[k])} but {CONFIG_NAME} builds "
                                      f"{list(expected[k])}{hint}; refusing to evaluate a model its config "
                                      "does not describe")
    missing, extra = sorted(set(expected) - set(have)), sorted(set(have) - set(expected))
    if missing or extra:
        raise ExportMismatchError(f"{path}: {WEIGHTS_NAME} and {CONFIG_NAME} disagree: missing weights "
                                  f"{missing[:5]}, unexpected weights {extra[:5]}")
    default = preprocess_cfg(ref)
    size = pre.get("size", default["size"])
    size = [size, size] if isinstance(size, int) else list(size)
    if size != list(default["size"]):
        raise ExportMismatchError(f"{path / CONFIG_NAME}: preprocess_cfg.size={size} but the model takes "
                                  f"{list(default['size'])} px images (model_cfg.vision_cfg.image_size)")
    return [f"{path / CONFIG_NAME}: preprocess_cfg.{k}={pre[k]!r} differs from the model's default {default[k]!r}"
            for k in ("mean", "std", "interpolation", "resize_mode")
            if k in pre and k in default and _norm(pre[k]) != _norm(default[k])]


def _norm(v: Any) -> Any:
    return [round(float(x), 6) for x in v] if isinstance(v, (list, tuple)) else v


def is_export_dir(path: Path) -> bool:
    return path.is_dir() and (path / CONFIG_NAME).is_file()


def load_export_dir(path: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """Load an open_clip export folder through open_clip's own ``local-dir:`` loader."""
    path = Path(path)
    if not (path / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{path}: not an open_clip export folder (missing {CONFIG_NAME})")
    if not (path / WEIGHTS_NAME).is_file() and not any(path.glob("*.bin")) and not any(path.glob("*.pt")):
        # open_clip only warns and returns a randomly initialised model in this case
        raise FileNotFoundError(f"{path}: export folder has no weights file ({WEIGHTS_NAME})")
    for warning in check_export(path):
        log.warning("%s", warning)
    name = f"local-dir:{path.resolve()}"
    meta = json.loads((path / CONFIG_NAME).read_text())
    if OPEN_CLIP_REFUSAL_KEY in meta.get("model_cfg", {}):
        model, preprocess, tokenizer = _open_clip_load_without_refusal(path, meta, device)
    else:
        model, _, preprocess = open_clip.create_model_and_transforms(name, device=device)
        tokenizer = open_clip.get_tokenizer(name)
    model.eval()
    text_pool = meta.get("powerclip", {}).get("text_pool", "default")
    if text_pool == "mean":  # PowerCLIP's token-mean text pooling, which open_clip's config cannot say
        from powerclip.model.clip_model import mean_pool_text

        def encode_text(text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
            x = mean_pool_text(model, text)
            return torch.nn.functional.normalize(x, dim=-1) if normalize else x

        model.encode_text = encode_text
    elif text_pool != "default":
        raise ValueError(f"{path / CONFIG_NAME}: powerclip.text_pool={text_pool!r} is not 'default' or 'mean'")
    return LoadedModel(model, preprocess, tokenizer, name=name, pretrained=str(path.resolve()))


def _open_clip_load_without_refusal(path: Path, meta: dict, device: str | torch.device):
    """open_clip's own ``local-dir:`` load of an export that refuses plain open_clip: from a temporary
    folder holding the config without the refusal key and a link to the weights (not a copy)."""
    tmp = Path(tempfile.mkdtemp(prefix="powerclip-load-"))
    try:
        clean = {**meta, "model_cfg": open_clip_model_cfg(meta["model_cfg"])}
        (tmp / CONFIG_NAME).write_text(json.dumps(clean))
        (tmp / WEIGHTS_NAME).symlink_to((path / WEIGHTS_NAME).resolve())
        model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tmp}", device=device)
        tokenizer = open_clip.get_tokenizer(f"local-dir:{tmp}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return model, preprocess, tokenizer


def _export_checkpoint(path: Path, out_dir: Path) -> None:
    """Consolidate a run folder / DeepSpeed checkpoint into an export folder via powerclip.export."""
    from powerclip.checkpoints.discovery import CheckpointError
    from powerclip.export import export_checkpoint

    try:
        export_checkpoint(path, out_dir)
    except CheckpointError as e:  # ExportError too: not a usable checkpoint either way
        raise FileNotFoundError(f"cannot evaluate {path}: not an export folder, and {e}") from None


def load_model(path: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """Load ``RUN | CHECKPOINT | EXPORT_DIR`` for evaluation (see module docstring)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model not found: {path}")
    if is_export_dir(path):
        return load_export_dir(path, device)
    tmp = Path(tempfile.mkdtemp(prefix="powerclip-eval-export-"))
    try:
        _export_checkpoint(path, tmp / "export")
        loaded = load_export_dir(tmp / "export", device)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    loaded.name = f"powerclip:{path.resolve()}"
    loaded.pretrained = str(path.resolve())
    return loaded

"""Load the model to evaluate from an export folder, a run folder or a DeepSpeed checkpoint.

An export folder (``open_clip_config.json`` + ``open_clip_model.safetensors``) is loaded by open_clip
itself through ``local-dir:``, exactly as clip_benchmark and every other open_clip user would load it,
so the numbers ``powerclip eval`` reports are the numbers of the artefact users receive. Run folders and
checkpoints are first consolidated by ``powerclip.export`` (the one place that knows the checkpoint
layout) into a temporary export folder, then loaded the same way.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch

CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"


@dataclass
class LoadedModel:
    """What every evaluation needs: the model (eval mode), its eval transform and tokenizer."""

    model: torch.nn.Module
    preprocess: Callable[[Any], torch.Tensor]
    tokenizer: Callable[..., torch.Tensor]
    name: str  # "model" field of the clip_benchmark result schema
    pretrained: str  # "pretrained" field: the path the weights came from


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
    name = f"local-dir:{path.resolve()}"
    model, _, preprocess = open_clip.create_model_and_transforms(name, device=device)
    tokenizer = open_clip.get_tokenizer(name)
    model.eval()
    text_pool = json.loads((path / CONFIG_NAME).read_text()).get("powerclip", {}).get("text_pool", "default")
    if text_pool == "mean":  # PowerCLIP's token-mean text pooling, which open_clip's config cannot say
        from powerclip.model.clip_model import mean_pool_text

        def encode_text(text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
            x = mean_pool_text(model, text)
            return torch.nn.functional.normalize(x, dim=-1) if normalize else x

        model.encode_text = encode_text
    elif text_pool != "default":
        raise ValueError(f"{path / CONFIG_NAME}: powerclip.text_pool={text_pool!r} is not 'default' or 'mean'")
    return LoadedModel(model, preprocess, tokenizer, name=name, pretrained=str(path.resolve()))


def _export_checkpoint(path: Path, out_dir: Path) -> None:
    """Consolidate a run folder / DeepSpeed checkpoint into an export folder via powerclip.export."""
    from powerclip.export import ExportError, export_checkpoint

    try:
        export_checkpoint(path, out_dir)
    except ExportError as e:
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

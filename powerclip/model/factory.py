"""Build the open_clip model a run trains, and load starting weights into it.

Every model is built with ``nonscalar_logit_scale=True``: DeepSpeed crashes on open_clip's 0-dim
``logit_scale`` in ``deepspeed.initialize``, so the scale (and SigLIP bias) are shape-[1] parameters
while training and are reshaped back to 0-dim on export (``load_state_dict_into`` handles both ways).

Starting weights (``model.pretrained``) may be:

* an open_clip export folder (``open_clip_config.json`` + weights, what ``powerclip export`` writes);
* an open_clip-format weights file (``.pt``/``.pth``/``.bin``/``.safetensors`` state dict);
* one of our DeepSpeed checkpoints (a run folder, a checkpoint root with ``latest``, or a tag dir),
  consolidated through DeepSpeed's own ``zero_to_fp32`` (see ``powerclip.checkpoints``);
* an open_clip pretrained tag for a built-in name (``openai``, ``laion2b_s34b_b79k``...), which
  open_clip downloads itself (never in tests).
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.model import CLIP, CustomTextCLIP

from powerclip.config import ModelConfig
from powerclip.errors import UserError
from powerclip.model.clip_model import PowerClipModel

log = logging.getLogger(__name__)

# the two files of an open_clip export folder, as open_clip's ``local-dir:`` loader names them
CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")

# A model_cfg key that open_clip refuses, naming the loader to use instead. An export whose text tower
# pools by token mean (``model.pool=mean``) carries it: open_clip's text tower can pool only at one
# token (argmax/first/last/eos), so open_clip alone would load the folder and quietly encode text
# differently from the trained model. With the key, ``open_clip.create_model*('local-dir:DIR')``
# (and so clip_benchmark) stops with ``CLIP.__init__() got an unexpected keyword argument '<this
# sentence>'``; powerclip's loader removes it and applies the mean.
OPEN_CLIP_REFUSAL_KEY = ("powerclip_text_pool_mean: open_clip cannot pool text by token mean, so it must not load "
                         "this folder; load it with powerclip.eval_io.model_io.load_model or evaluate it with "
                         "`powerclip eval --model DIR`")


def open_clip_model_cfg(model_cfg: dict[str, Any]) -> dict[str, Any]:
    """An export's ``model_cfg`` as open_clip can build it (without ``OPEN_CLIP_REFUSAL_KEY``)."""
    return {k: v for k, v in model_cfg.items() if k != OPEN_CLIP_REFUSAL_KEY}


class ModelLoadError(UserError, RuntimeError):
    """A model or its starting weights cannot be built/loaded; the message names the source."""


def model_cfg_dict(cfg: ModelConfig) -> dict[str, Any]:
    """The open_clip ``model_cfg`` of this model (what ``open_clip_config.json`` stores).

    It is open_clip's portable form: no ``nonscalar_logit_scale`` (the export reshapes the scale to
    0-dim), but ``init_logit_bias`` when the model has a bias so the exported folder has that key.
    """
    if cfg.config is not None:
        out = copy.deepcopy(dict(cfg.config))
    elif cfg.name is not None:
        out = open_clip.get_model_config(cfg.name)
        if out is None:
            raise ModelLoadError(f"model.name={cfg.name!r} is not an open_clip built-in model "
                                 f"(see open_clip.list_models())")
        out = open_clip_model_cfg(copy.deepcopy(out))  # a ``local-dir:`` export may carry the refusal key
    else:
        raise ModelLoadError("exactly one of model.name and model.config must be set")
    for key in ("embed_dim", "vision_cfg", "text_cfg"):
        if key not in out:
            raise ModelLoadError(f"model.config is missing the open_clip key {key!r}")
    out.pop("nonscalar_logit_scale", None)
    out = _with_pool(out, cfg.pool)
    if cfg.init_logit_bias is not None:
        out["init_logit_bias"] = float(cfg.init_logit_bias)
    return out


def _with_pool(model_cfg: dict[str, Any], pool: str) -> dict[str, Any]:
    """``model.pool=mean``: the ViT averages its patch tokens (open_clip's own ``pool_type: avg``)."""
    if pool == "default":
        return model_cfg
    if pool != "mean":
        raise ModelLoadError(f"model.pool={pool!r} is not one of ('default', 'mean')")
    vision = dict(model_cfg["vision_cfg"])
    if "timm_model_name" in vision:
        raise ModelLoadError("model.pool=mean needs an open_clip ViT image tower (timm towers pool themselves)")
    vision["pool_type"] = "avg"
    return {**model_cfg, "vision_cfg": vision}


def preprocess_cfg(model: PowerClipModel | torch.nn.Module) -> dict[str, Any]:
    """open_clip's preprocess config of the model (image size, mean/std, interpolation...)."""
    clip = model.clip if isinstance(model, PowerClipModel) else model
    cfg = dict(open_clip.get_model_preprocess_cfg(clip))
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()}


def build_model_from_dict(model_cfg: dict[str, Any], overrides: dict[str, Any] | None = None) -> torch.nn.Module:
    """The bare open_clip model (``CLIP``, or ``CustomTextCLIP`` for custom/HF text) of a ``model_cfg``.

    ``model_cfg`` is open_clip's config dict (what ``model_cfg_dict`` returns and an export's
    ``open_clip_config.json`` stores); ``overrides`` are constructor arguments on top of it (e.g.
    ``nonscalar_logit_scale``). Pretrained timm/HF tower weights are never downloaded: the weights
    come from ``model.pretrained`` or a checkpoint. Randomly initialised; build it under
    ``torch.device("meta")`` when only keys and shapes are needed (``reference_model``).
    """
    model_cfg = copy.deepcopy(model_cfg)
    if "multimodal_cfg" in model_cfg:
        raise ModelLoadError("CoCa models (multimodal_cfg) are not supported by powerclip")
    custom_text = model_cfg.pop("custom_text", False) or "hf_model_name" in model_cfg.get("text_cfg", {})
    if "timm_model_name" in model_cfg.get("vision_cfg", {}):
        model_cfg["vision_cfg"]["timm_model_pretrained"] = False
    if "hf_model_name" in model_cfg.get("text_cfg", {}):
        model_cfg["text_cfg"]["hf_model_pretrained"] = False
    model_cfg.update(overrides or {})
    cls = CustomTextCLIP if custom_text else CLIP
    model = cls(**model_cfg)
    pre = open_clip.transform.merge_preprocess_dict(open_clip.transform.PreprocessCfg(), {})
    if hasattr(model.visual, "image_size"):
        pre["size"] = model.visual.image_size
    open_clip.set_model_preprocess_cfg(model, pre)
    return model


def reference_model(model_cfg: dict[str, Any]) -> torch.nn.Module:
    """The open_clip model ``model_cfg`` builds, on the meta device: its keys, shapes and preprocess
    config without allocating weights (what an export or an evaluation checks weights against)."""
    with torch.device("meta"):
        return build_model_from_dict(model_cfg)


def create_model(cfg: ModelConfig) -> PowerClipModel:
    """Build the model of ``cfg`` (random init, then ``cfg.pretrained`` if set).

    Seed torch before calling: ranks and resumed runs rely on identical initialisation.
    """
    # model.init_logit_bias=None means "whatever the open_clip config says": a built-in SigLIP config
    # keeps its bias (-10) rather than silently losing the parameter
    kwargs: dict[str, Any] = {"nonscalar_logit_scale": True, "init_logit_scale": float(cfg.init_logit_scale)}
    if cfg.init_logit_bias is not None:
        kwargs["init_logit_bias"] = float(cfg.init_logit_bias)
    tag = None
    if cfg.pretrained and cfg.name and not Path(cfg.pretrained).exists():
        if open_clip.get_pretrained_cfg(cfg.name, cfg.pretrained):
            tag = cfg.pretrained  # an open_clip pretrained tag: let open_clip fetch and load it
        else:
            raise ModelLoadError(f"model.pretrained={cfg.pretrained!r}: no such file or folder, and not "
                                 f"an open_clip pretrained tag of {cfg.name!r}")
    if cfg.config is not None:
        clip = build_model_from_dict(_with_pool(dict(cfg.config), cfg.pool), kwargs)
    elif cfg.name is not None and cfg.pool != "default":
        if tag is not None:
            raise ModelLoadError("model.pool=mean changes the architecture: it cannot load an open_clip "
                                 "pretrained tag; pass an export folder or weights file as model.pretrained")
        clip = build_model_from_dict(model_cfg_dict(cfg), kwargs)
    elif cfg.name is not None:
        clip = open_clip.create_model(cfg.name, pretrained=tag, **kwargs)
    else:
        raise ModelLoadError("exactly one of model.name and model.config must be set")
    model = PowerClipModel(clip, logit_scale_max=cfg.logit_scale_max, text_pool=cfg.pool)
    if cfg.pretrained and tag is None:
        load_state_dict_into(model, load_pretrained_state_dict(cfg.pretrained))
    model.reset_logit_scale_max()
    if cfg.grad_checkpointing:
        model.clip.set_grad_checkpointing(True)
    return model


def load_pretrained_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read the state dict behind ``model.pretrained`` (export folder, weights file, checkpoint)."""
    path = Path(path)
    if path.is_file():
        if not path.name.endswith(_WEIGHT_SUFFIXES):
            raise ModelLoadError(f"model.pretrained={str(path)!r}: expected one of {_WEIGHT_SUFFIXES}")
        return open_clip.factory.load_state_dict(str(path), weights_only=True)
    if not path.is_dir():
        raise ModelLoadError(f"model.pretrained={str(path)!r} does not exist")
    if (path / CONFIG_NAME).is_file():
        found = open_clip.factory._find_checkpoint_in_dir(path)
        if found is None:
            raise ModelLoadError(f"model.pretrained={str(path)!r}: open_clip folder without weights")
        return open_clip.factory.load_state_dict(found, weights_only=True)
    # our DeepSpeed checkpoints (any ZeRO stage); imported here: it loads DeepSpeed, which building
    # a model from open_clip weights does not need
    from powerclip.checkpoints.consolidate import consolidate_checkpoint

    return consolidate_checkpoint(path)


def _clip_prefix(state_dict: dict[str, torch.Tensor], expected: set[str]) -> str:
    """The key prefix under which ``state_dict`` holds the open_clip weights.

    Our checkpoints hold ``clip.*`` (the PowerClipModel) and may hold training-only modules next to
    it (e.g. a DeGLA ``teacher.*``); plain open_clip files have no prefix. A prefix must cover every
    parameter of the model; among several, the shortest one that is not a teacher wins.
    """
    anchor = "logit_scale"
    candidates = {k[: -len(anchor)] for k in state_dict if k.endswith(anchor)}
    candidates |= {"", "clip.", "module.", "module.clip."}
    good = [p for p in candidates if all(p + k in state_dict for k in expected)]
    if not good:
        missing = sorted(k for k in expected if k not in state_dict)[:8]
        raise ModelLoadError(f"state dict does not match the model: missing keys such as {missing}")
    good.sort(key=lambda p: ("teacher" in p, len(p)))
    return good[0]


def extract_clip_state_dict(clip: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The subset of ``state_dict`` that is ``clip``'s own, keyed and shaped as ``clip`` expects.

    Strips wrapper prefixes and training-only entries, and reshapes ``logit_scale``/``logit_bias``
    between open_clip's 0-dim and our shape-[1] form in whichever direction ``clip`` needs.
    """
    own = clip.state_dict()
    params = {k for k, _ in clip.named_parameters()}
    needed = params if "logit_scale" in params else set(own)
    prefix = _clip_prefix(state_dict, needed)
    out: dict[str, torch.Tensor] = {}
    for key, ref in own.items():
        if prefix + key not in state_dict:
            continue  # buffers a consolidated ZeRO state may not carry; load is then non-strict
        value = state_dict[prefix + key]
        if key in ("logit_scale", "logit_bias") and value.shape != ref.shape:
            if value.numel() != 1:
                raise ModelLoadError(f"{key} has shape {tuple(value.shape)}, expected one value")
            value = value.reshape(ref.shape)
        out[key] = value
    if "logit_bias" in own and "logit_bias" not in out:
        # open_clip's rule: a non-SigLIP checkpoint into a SigLIP model starts from bias 0
        out["logit_bias"] = torch.zeros_like(own["logit_bias"])
    return out


def load_state_dict_into(model: PowerClipModel | torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Load open_clip weights (any prefix, 0-dim or [1] logit scale) into ``model``.

    ``model`` is a PowerClipModel or a bare open_clip model. Every parameter must be present;
    keys that are not the model's (a teacher, optimizer leftovers) are ignored. For a PowerClipModel
    the logit-scale clamp is re-derived so a pretrained scale above the clamp is never clamped.
    """
    clip = model.clip if isinstance(model, PowerClipModel) else model
    sd = extract_clip_state_dict(clip, state_dict)
    sd = {k: v.to(clip.state_dict()[k].dtype) for k, v in sd.items()}
    result = clip.load_state_dict(sd, strict=False)
    params = {k for k, _ in clip.named_parameters()}
    missing = sorted(set(result.missing_keys) & params)
    if missing:
        raise ModelLoadError(f"state dict lacks parameters {missing[:8]}")
    if isinstance(model, PowerClipModel):
        model.reset_logit_scale_max()

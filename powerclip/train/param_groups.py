"""Which parameters train and at what lr / weight decay: tower locking, per-tower settings, layer decay.

The recipes this serves: LiT and partial fine-tuning (open_clip's ``--lock-image`` / ``--lock-text``
and their unlocked groups), and EVA-CLIP's per-tower lr, weight decay and layer-wise lr decay.

* Locking is open_clip's own ``lock_image_tower`` / ``lock_text_tower`` on the wrapped model, so a
  group means what it means in open_clip. It runs before ``deepspeed.initialize``: a locked
  parameter has ``requires_grad=False``, so it gets no gradient, no fp32 master and no Adam moments,
  and DeepSpeed saves it as a frozen parameter (the export and elastic resume read it from there).
* Each trainable parameter is placed by name: its tower (``visual.*`` = image; ``logit_scale`` /
  ``logit_bias`` = neither, always at ``optim.lr`` without decay; the rest = text) and, with layer
  decay, its layer id as EVA-CLIP counts them: 0 for the embeddings (and the ViT's ``ln_pre``),
  ``i + 1`` for block ``i``, ``depth + 1`` for the final norm, pooling and projection. Its lr is
  the tower's lr x ``layer_decay ** (depth + 1 - layer_id)`` (EVA-CLIP's ``LayerDecayValueAssigner``):
  the head trains at the tower's lr, the embeddings at the smallest.
* Weight decay follows open_clip's rule inside every group (``no_weight_decay``): gains, biases,
  every parameter with fewer than two dimensions (LayerNorm weights, the [1]-shaped logit
  scale/bias) and anything named ``logit_scale``/``logit_bias`` get none; matrices and
  convolution kernels get the tower's weight decay.

With every tower option at its default the groups are exactly ``param_groups``' two (decay /
no decay), so checkpoints written before these options existed resume unchanged. Every group's lr
is its peak lr; the schedule (a ``LambdaLR``) scales each group's own lr by the same multiplier.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from powerclip.config import ConfigError, OptimConfig, TowerOptimConfig

_NO_DECAY_NAMES = ("logit_scale", "logit_bias")


def no_weight_decay(name: str, param: torch.Tensor) -> bool:
    """True for gains, biases, 1-D parameters and the logit scale/bias (open_clip's rule)."""
    leaf = name.split(".")[-1]
    ndim = len(getattr(param, "ds_shape", param.shape))  # a ZeRO-3 partition is flat: its full shape
    return ndim < 2 or leaf == "bias" or any(n in name for n in _NO_DECAY_NAMES)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups (decay / no decay) over the trainable parameters, named for debugging."""
    decay, no_decay, decay_names, no_decay_names = [], [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if no_weight_decay(name, p):
            no_decay.append(p)
            no_decay_names.append(name)
        else:
            decay.append(p)
            decay_names.append(name)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay, "name": "decay"})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "name": "no_decay"})
    if not groups:
        raise ValueError("the model has no trainable parameters")
    return groups


TOWERS = ("image", "text")
OTHER = "other"  # the logit scale / bias: neither tower's
_OTHER_NAMES = ("logit_scale", "logit_bias")
# a numbered block: open_clip's resblocks, timm's blocks, Hugging Face's encoder.layer / layers
_BLOCK = re.compile(r"(?:^|\.)(?:resblocks|blocks|layer|layers)\.(\d+)\.")
# what comes before block 0 (EVA-CLIP's layer-0 names, plus open_clip's ln_pre and text cls_emb)
_EMBEDDING_PARTS = {"conv1", "class_embedding", "positional_embedding", "ln_pre", "patch_embed", "pos_embed",
                    "cls_token", "reg_token", "mask_token", "token_embedding", "cls_emb", "embeddings"}


def clip_of(model: nn.Module) -> nn.Module:
    """The open_clip model (``PowerClipModel.clip``), or ``model`` itself when it is one."""
    return getattr(model, "clip", model)


def _clip_name(name: str, model: nn.Module) -> str:
    return name[len("clip."):] if clip_of(model) is not model and name.startswith("clip.") else name


def tower_of(clip_name: str) -> str:
    """``image``, ``text`` or ``other`` for a parameter name of the open_clip model."""
    if clip_name.startswith("visual."):
        return "image"
    if clip_name in _OTHER_NAMES:
        return OTHER
    return "text"


def _within_tower(clip_name: str) -> str:
    for prefix in ("visual.", "text."):
        if clip_name.startswith(prefix):
            return clip_name[len(prefix):]
    return clip_name


def _block_of(clip_name: str) -> int | None:
    m = _BLOCK.search(_within_tower(clip_name))
    return int(m.group(1)) if m else None


def tower_depths(model: nn.Module) -> dict[str, int]:
    """Numbered blocks of each tower (0 when it has none powerclip can count), locked ones included."""
    depth = dict.fromkeys(TOWERS, 0)
    for name, _ in model.named_parameters():
        n = _clip_name(name, model)
        tower, block = tower_of(n), _block_of(n)
        if tower in depth and block is not None:
            depth[tower] = max(depth[tower], block + 1)
    return depth


def layer_id(clip_name: str, depth: int) -> int:
    """EVA-CLIP's layer id: 0 embeddings, ``i + 1`` block ``i``, ``depth + 1`` everything after."""
    block = _block_of(clip_name)
    if block is not None:
        return block + 1
    if set(_within_tower(clip_name).split(".")) & _EMBEDDING_PARTS:
        return 0
    return depth + 1


def layer_scale(layer: int, depth: int, decay: float) -> float:
    """The lr multiplier of layer ``layer`` in a tower of ``depth`` blocks (EVA-CLIP's rule)."""
    return decay ** (depth + 1 - layer)


def tower_options_set(cfg: OptimConfig) -> bool:
    """Any per-tower lr, weight decay or layer decay: the groups are split by tower (and layer)."""
    default = TowerOptimConfig()
    return any((t.lr, t.weight_decay, t.layer_decay) != (default.lr, default.weight_decay, default.layer_decay)
               for t in (cfg.image, cfg.text))


def lock_towers(model: nn.Module, cfg: OptimConfig) -> None:
    """``optim.image.lock`` / ``optim.text.lock`` through open_clip's own lock methods (in place)."""
    clip = clip_of(model)
    for tower, method in (("image", "lock_image_tower"), ("text", "lock_text_tower")):
        t: TowerOptimConfig = getattr(cfg, tower)
        if not t.lock:
            continue
        if not hasattr(clip, method):
            raise ConfigError(f"optim.{tower}.lock: {type(clip).__name__} has no {method} (not an open_clip model)")
        if tower == "image":
            clip.lock_image_tower(unlocked_groups=t.unlocked_groups, freeze_bn_stats=t.freeze_bn_stats)
        else:
            clip.lock_text_tower(unlocked_layers=t.unlocked_groups, freeze_layer_norm=True)


@dataclass(frozen=True)
class _Slot:
    tower: str
    layer: int | None
    decay: bool

    @property
    def name(self) -> str:
        layer = "" if self.layer is None else f".layer{self.layer:02d}"
        return f"{self.tower}{layer}.{'decay' if self.decay else 'no_decay'}"


def optimizer_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """AdamW groups over the trainable parameters, each with its own ``lr`` and ``weight_decay``
    and a ``name`` (pop it before handing the groups to torch). Order: by tower (image, text,
    other), then layer, decay before no decay; without tower options, ``param_groups``' two."""
    if not tower_options_set(cfg):
        return param_groups(model, cfg.weight_decay)
    depths = tower_depths(model)
    for tower in TOWERS:
        if getattr(cfg, tower).layer_decay < 1 and depths[tower] == 0:
            raise ConfigError(f"optim.{tower}.layer_decay needs a tower of numbered transformer blocks; this "
                              f"model's {tower} tower has none powerclip can count (set it to 1.0)")
    slots: dict[_Slot, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        n = _clip_name(name, model)
        tower = tower_of(n)
        lr, wd, layer = cfg.lr, cfg.weight_decay, None
        if tower != OTHER:
            t: TowerOptimConfig = getattr(cfg, tower)
            lr = cfg.lr if t.lr is None else t.lr
            wd = cfg.weight_decay if t.weight_decay is None else t.weight_decay
            if t.layer_decay < 1:
                layer = layer_id(n, depths[tower])
                lr *= layer_scale(layer, depths[tower], t.layer_decay)
        decay = not no_weight_decay(name, p)
        slot = _Slot(tower, layer, decay)
        group = slots.setdefault(slot, {"params": [], "lr": lr, "weight_decay": wd if decay else 0.0,
                                        "name": slot.name})
        group["params"].append(p)
    if not slots:
        raise ValueError("the model has no trainable parameters (are both towers locked?)")
    order = {t: i for i, t in enumerate((*TOWERS, OTHER))}
    keys = sorted(slots, key=lambda s: (order[s.tower], -1 if s.layer is None else s.layer, not s.decay))
    return [slots[k] for k in keys]


def _numel(p) -> int:
    return int(getattr(p, "ds_numel", p.numel()))  # a ZeRO-3 partition: its full size


def group_table(model: nn.Module, groups: list[dict], lr: float) -> str:
    """The start-up table: one line per group (name, parameters, peak lr, weight decay) and the
    locked parameters. ``lr``: the peak lr of a group that sets none (optim.lr)."""
    rows = [(g.get("name", f"group{i}"), sum(_numel(p) for p in g["params"]), f"{g.get('lr', lr):.3g}",
             f"{g['weight_decay']:g}") for i, g in enumerate(groups)]
    locked = sum(_numel(p) for p in model.parameters() if not p.requires_grad)
    if locked:
        rows.append(("locked", locked, "-", "-"))
    head = ("group", "#params", "lr", "wd")
    width = [max(len(str(r[i])) for r in [head, *rows]) for i in range(4)]
    return "\n".join("  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)
                               for i, (c, w) in enumerate(zip(r, width))) for r in [head, *rows])

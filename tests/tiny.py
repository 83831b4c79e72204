"""Tiny models (an open_clip ViT CLIP, a timm SigLIP-style tower) and a full Config around the first,
shared by every test that needs a model.

ViT: 64 wide, 2 layers, patch 8 on 32x32 images (T = 16 patches); text: 64 wide, 2 layers, 2 heads,
context 77, the real CLIP BPE vocabulary (49408) so the real tokenizer works.
"""

from __future__ import annotations

from typing import Any

from powerclip.config import Config, load_config


def tiny_model_config(image_size: int = 32, patch_size: int = 8, embed_dim: int = 64) -> dict[str, Any]:
    """An open_clip model_cfg dict for a tiny ViT CLIP."""
    return {
        "embed_dim": embed_dim,
        "vision_cfg": {"image_size": image_size, "layers": 2, "width": 64, "patch_size": patch_size,
                       "head_width": 32, "mlp_ratio": 2.0},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2,
                     "mlp_ratio": 2.0},
    }


def tiny_config(overrides: list[str] | tuple[str, ...] = (), **model_cfg_kwargs: Any) -> Config:
    """A validated Config whose model is ``tiny_model_config(**model_cfg_kwargs)``.

    ``overrides`` are dotted ``key=value`` strings as on the command line (``loss.global_loss=siglip``).
    """
    cfg = load_config(None, [f"model.config={_yaml_inline(tiny_model_config(**model_cfg_kwargs))}",
                             *overrides])
    return cfg


def _yaml_inline(d: dict[str, Any]) -> str:
    import json

    return json.dumps(d)  # JSON is YAML: the override parser reads it back as the same dict


def register_tiny_siglip(name: str = "powerclip_tiny_siglip") -> str:
    """Register (once) a tiny timm SigLIP-style ViT (MAP head, no class token) for the tests.

    open_clip's TimmModel passes no architecture kwargs to timm, so a small MAP tower needs a timm
    model name of its own; use it as ``vision_cfg: {timm_model_name: <name>, timm_pool: map,
    timm_proj: none}`` with ``embed_dim`` 64. Images are 32 px, patch 8 (T = 16).
    """
    from timm.models import is_model, register_model
    from timm.models.vision_transformer import VisionTransformer, _create_vision_transformer

    if is_model(name):
        return name

    def _build(pretrained: bool = False, **kwargs) -> VisionTransformer:
        if pretrained:
            raise ValueError(f"{name} has no pretrained weights")
        # the same arguments as timm's vit_*_siglip_* definitions, shrunk
        args = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, class_token=False,
                    global_pool="map")
        # timm's own model functions build through this helper (pretrained cfg, feature info)
        return _create_vision_transformer(name, pretrained=False, **dict(args, **kwargs))

    _build.__name__ = name
    register_model(_build)
    return name

"""A tiny open_clip model and a full Config around it, shared by every test that needs a model.

ViT: 64 wide, 2 layers, patch 8 on 32x32 images (T = 16 patches); text: 64 wide, 2 layers, 2 heads,
context 77, the real CLIP BPE vocabulary (49408) so the real tokenizer works. Builds in ~0.1 s.
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

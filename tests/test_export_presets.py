"""Every preset's export, at toy size: open_clip alone reproduces powerclip's embeddings from the
folder, or refuses to load it with a message naming powerclip's loader (never a silent difference).

Each preset keeps everything that decides how its towers pool (``model.pool``, the open_clip config's
``pool_type`` / ``timm_pool`` / ``no_causal_mask`` / logit bias ...); only widths, depths and image
size shrink, and a timm image tower becomes timm's tiny ViT with the same pooling.
Tolerance: both sides run the same float32 ops on one process, rtol 1e-4, atol 1e-5.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F

from powerclip.config import load_config
from powerclip.eval_io.model_io import load_export_dir
from powerclip.export import export_open_clip
from powerclip.model.factory import create_model, model_cfg_dict, preprocess_cfg, reference_model

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted(p.name for p in (ROOT / "configs").glob("*.yaml"))


def _shrink(model_cfg: dict) -> dict:
    """The preset's open_clip model_cfg at toy size, every pooling-related key kept."""
    mc = copy.deepcopy(model_cfg)
    vision = mc["vision_cfg"]
    mc["text_cfg"].update(width=64, heads=2, layers=2)
    mc["embed_dim"] = 32
    if "timm_model_name" in vision:
        vision.update(timm_model_name="vit_tiny_patch16_224", image_size=224)  # 192 wide, 12 thin layers
        if vision.get("timm_proj", "linear") == "none":
            mc["embed_dim"] = 192  # no projection: the tower's width is the embedding
    else:
        vision.update(image_size=32, patch_size=8, width=64, layers=2, head_width=32)
    return mc


def _preset_model(preset: str):
    """(the preset's config, its model section with the toy-size open_clip config in place of the name)."""
    cfg = load_config(ROOT / "configs" / preset, ["loss.degla.require_pretrained=false", "model.pretrained=null",
                                                  "data.sources=[{shards: unused.tar}]"])
    return cfg, replace(cfg.model, name=None, config=_shrink(model_cfg_dict(cfg.model)), grad_checkpointing=False)


def _tokens(context_length: int, vocab: int) -> torch.Tensor:
    """Token rows in open_clip's layout (SOT .. EOT, zero padding, EOT the highest id) without a
    tokenizer download: ids below the vocabulary, lengths 3, 7 and the full context."""
    g = torch.Generator().manual_seed(0)
    rows = torch.zeros(3, context_length, dtype=torch.long)
    for r, n in enumerate((3, 7, context_length)):
        rows[r, :n] = torch.randint(1, vocab - 2, (n,), generator=g)
        rows[r, 0], rows[r, n - 1] = vocab - 2, vocab - 1
    return rows


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_export_loads_in_open_clip_identically_or_is_refused(preset, tmp_path):
    cfg, mcfg = _preset_model(preset)
    torch.manual_seed(0)
    model = create_model(mcfg).eval()
    model_cfg = model_cfg_dict(mcfg)
    out = export_open_clip(model, model_cfg, preprocess_cfg(reference_model(model_cfg)), tmp_path / "export",
                           text_pool=mcfg.pool)
    text = _tokens(model_cfg["text_cfg"]["context_length"], model_cfg["text_cfg"]["vocab_size"])
    size = model_cfg["vision_cfg"]["image_size"]
    images = torch.randn(2, 3, size, size)
    with torch.no_grad():
        ours_img, ours_txt = model.encode_image(images)[0], model.encode_text(text)[0]
        if cfg.model.pool == "mean":  # token-mean text pooling: open_clip cannot express it and must refuse
            with pytest.raises(TypeError, match=r"powerclip\.eval_io\.model_io\.load_model"):
                open_clip.create_model(f"local-dir:{out}")
            plain = load_export_dir(out).model  # powerclip's loader: open_clip's own load, then the mean
        else:
            plain = open_clip.create_model(f"local-dir:{out}").eval()
        torch.testing.assert_close(plain.encode_image(images), ours_img, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(F.normalize(plain.encode_text(text), dim=-1), F.normalize(ours_txt, dim=-1),
                                   rtol=1e-4, atol=1e-5)


def test_the_presets_cover_both_text_poolings():
    pools = {_preset_model(p)[0].model.pool for p in PRESETS}
    assert pools == {"default", "mean"}
